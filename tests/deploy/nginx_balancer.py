"""Debian's nginx on loopback, as tests/deploy run it: the shipped deploy/nginx/specbridge-grpc.conf with this run's
replicas and port swapped in, under a top-level config of the test's own (prefix, pid, logs and temp paths in a
temporary directory). Never assumes an nginx is running; runs as root or not.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE_CONF = REPO_ROOT / "deploy" / "nginx" / "specbridge-grpc.conf"
NGINX_PATHS = ("/usr/sbin/nginx",)  # Debian's, outside a non-root user's PATH
READY_TIMEOUT_S = 10.0
_UPSTREAM_SERVER = re.compile(r"^(?P<indent>[ \t]*)server [^\s;]+(?P<options>[^;\n]*);\n", re.MULTILINE)
_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen \d+(?P<options>[^;\n]*);$", re.MULTILINE)


def nginx_binary() -> str:
    """The nginx executable; missing, it fails the test under CI (CI=true) and skips it elsewhere."""
    found = shutil.which("nginx") or next((path for path in NGINX_PATHS if os.access(path, os.X_OK)), None)
    if found is None:
        reason = "nginx is not installed: `make install` installs Debian's nginx (as root or with sudo)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must have it")
        pytest.skip(reason)
    return found


def site_config(replicas: Sequence[str], listen_port: int) -> str:
    """The shipped site config, its upstream servers replaced by `replicas` (HOST:PORT, each keeping the first
    server line's options) and its listener moved to 127.0.0.1:`listen_port`."""
    text = SITE_CONF.read_text()
    servers = list(_UPSTREAM_SERVER.finditer(text))
    listens = list(_LISTEN.finditer(text))
    assert servers and len(listens) == 1, f"{SITE_CONF} no longer has the upstream servers and one listen line this test rewrites"
    first = servers[0]
    replaced = "".join(f"{first['indent']}server {replica}{first['options']};\n" for replica in replicas)
    text = text[: first.start()] + replaced + text[servers[-1].end():]
    return _LISTEN.sub(lambda match: f"{match['indent']}listen 127.0.0.1:{listen_port}{match['options']};", text)


def main_config(prefix: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf is in a real install: process settings, then the site in the http context."""
    # A root master hands requests to workers running as `nobody`, who could not enter a private temp dir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} info;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log {prefix / 'access.log'};\n{temp_paths}    include {site};\n}}\n")


def write_config(prefix: Path, replicas: Sequence[str], listen_port: int) -> Path:
    """Write the site and main configs under `prefix`; returns the main one."""
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / SITE_CONF.name
    site.write_text(site_config(replicas, listen_port))
    main = prefix / "nginx.conf"
    main.write_text(main_config(prefix, site))
    return main


def nginx_command(prefix: Path, config: Path, *options: str) -> list[str]:
    # -e: the error log from the first moment, before the config names one (the default is under /var/log).
    return [nginx_binary(), "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log"), *options]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NginxBalancer:
    """`with NginxBalancer(tmp_dir, ["127.0.0.1:5001", ...]) as nginx:` then connect to `nginx.address`."""

    def __init__(self, prefix: Path, replicas: Sequence[str]) -> None:
        self.prefix = prefix
        self.port = free_port()
        self.config = write_config(prefix, replicas, self.port)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(nginx_command(self.prefix, self.config))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self._process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"nginx did not listen on {self.address}: {self.error_log()}")

    def __exit__(self, error_type: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()  # nginx's fast shutdown
            self._process.wait(10)

    def error_log(self) -> str:
        log = self.prefix / "error.log"
        return log.read_text() if log.exists() else "(no error log)"
