"""A verifier in a child process (`specbridge serve`), as tests and benchmarks run it.

The child has its own interpreter (and GIL), like a real deployment; this waits for its ready
line, reads the port it bound (port 0 picks one) and stops it with SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import IO

from cloud_verifier.server import ServeConfig

READY_PATTERN = re.compile(r"^specbridge verifier listening on (?P<host>.+):(?P<port>\d+)$")
REPO_ROOT = Path(__file__).resolve().parent.parent


class VerifierLaunchError(RuntimeError):
    """The child verifier exited or stayed silent instead of announcing that it listens."""


def serve_arguments(config: ServeConfig) -> list[str]:
    """The `specbridge serve` flags that reproduce `config`."""
    arguments = []
    for item in dataclasses.fields(config):
        arguments += [f"--{item.name.replace('_', '-')}", str(getattr(config, item.name))]
    return arguments


class VerifierProcess:
    """Use as `with VerifierProcess(config) as verifier:`, then connect to `verifier.address`."""

    def __init__(self, config: ServeConfig, *, ready_timeout_s: float = 180.0, stop_timeout_s: float = 30.0) -> None:
        self.config = config
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def __enter__(self) -> VerifierProcess:
        command = [sys.executable, "-m", "specbridge.cli", "serve", *serve_arguments(self.config)]
        # OpenMP workers that spin after each forward starve the server's event loop and any client sharing the
        # CPU: measured here, 250 ms stalls per step with 2 clients on 2 cores, none once they sleep instead.
        environment = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        self._process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, text=True,
                                         bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self._process.stdout, lines), daemon=True).start()
        try:
            while (line := lines.get(timeout=self.ready_timeout_s)) is not None:
                if match := READY_PATTERN.match(line.strip()):
                    self.port = int(match["port"])
                    return self
        except queue.Empty:
            self.stop()
            raise VerifierLaunchError(f"the verifier printed no ready line within {self.ready_timeout_s:.0f} s") from None
        code = self._process.wait()
        raise VerifierLaunchError(f"the verifier exited with status {code} before it was ready (its stderr is above)")

    def __exit__(self, error_type: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

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


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Drain the child's stdout for as long as it runs (so it never blocks), echoing it to our stderr."""
    for line in stream:
        lines.put(line)
        sys.stderr.write(line)
    lines.put(None)
