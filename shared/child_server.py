"""A server in a child process, as tests, benchmarks and the demo run one: start the command a user would type,
wait for the one line it prints once it serves (which names the port it bound), stop it with SIGTERM.

The child has its own interpreter (and GIL), like a real deployment. `cloud_verifier.launcher` (the
verifier) and `edge_client.launcher` (the edge's HTTP endpoint) say which command and which line.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from shared.errors import UserFacingError

REPO_ROOT = Path(__file__).resolve().parent.parent


class ChildServerError(UserFacingError, RuntimeError):
    """The child exited or stayed silent instead of announcing that it serves."""


class ChildServer:
    """Use as `with Subclass(...) as server:`; `port` is known inside the block."""

    ready_pattern: re.Pattern[str]  # matches the ready line; its group "port" is the bound port
    name = "the server"  # for messages
    launch_error: type[Exception] = ChildServerError

    def __init__(self, command: list[str], *, environment: Mapping[str, str] = {}, cpus: Collection[int] | None = None,
                 ready_timeout_s: float, stop_timeout_s: float) -> None:
        """`environment` adds to (and yields to) this process's; `cpus` pins the child to these CPUs."""
        self.command = command
        self.environment = {**environment, **os.environ}
        self.cpus = None if cpus is None else frozenset(cpus)
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        cpus = self.cpus
        pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
        self._process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.environment, stdout=subprocess.PIPE,
                                         text=True, bufsize=1, preexec_fn=pin)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self._process.stdout, lines), daemon=True).start()
        try:
            while (line := lines.get(timeout=self.ready_timeout_s)) is not None:
                if match := self.ready_pattern.match(line.strip()):
                    self.port = int(match["port"])
                    return self
        except queue.Empty:
            self.stop()
            raise self.launch_error(f"{self.name} printed no ready line within {self.ready_timeout_s:.0f} s") from None
        code = self._process.wait()
        raise self.launch_error(f"{self.name} exited with status {code} before it was ready (its stderr is above)")

    def __exit__(self, error_type: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The child's process id (a benchmark samples its memory by it); known inside the block."""
        if self._process is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._process.pid

    def kill(self) -> int | None:
        """SIGKILL now, as a crash would end it (fault tests); returns the exit status."""
        if self._process is None:
            return None
        self._process.kill()
        return self._process.wait()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after stop_timeout_s; returns the exit status."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode


def specbridge_command(*args: str) -> list[str]:
    """`specbridge ARGS` run by this interpreter (the same environment, installed or not)."""
    return [sys.executable, "-m", "specbridge.cli", *args]


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Drain the child's stdout for as long as it runs (so it never blocks), echoing it to our stderr."""
    for line in stream:
        lines.put(line)
        sys.stderr.write(line)
    lines.put(None)
