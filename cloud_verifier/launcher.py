"""A verifier in a child process (`specbridge serve`), as tests and benchmarks run it.

The child has its own interpreter (and GIL), like a real deployment; shared.child_server waits for
its ready line, reads the port it bound (port 0 picks one) and stops it with SIGTERM.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import replace

from cloud_verifier.logs import LogLevel
from cloud_verifier.server import ServeConfig
from shared.child_server import ChildServer, ChildServerError, specbridge_command
from specbridge.cli_args import config_arguments

READY_PATTERN = re.compile(r"^specbridge verifier listening on (?P<host>.+):(?P<port>\d+)$")


class VerifierLaunchError(ChildServerError):
    """The child verifier exited or stayed silent instead of announcing that it listens."""


class VerifierProcess(ChildServer):
    """Use as `with VerifierProcess(config) as verifier:`, then connect to `verifier.address`."""

    ready_pattern = READY_PATTERN
    name = "the verifier"
    launch_error = VerifierLaunchError

    def __init__(self, config: ServeConfig, *, cpus: Collection[int] | None = None, ready_timeout_s: float = 180.0,
                 stop_timeout_s: float = 30.0) -> None:
        """`cpus`: pin the verifier process to these CPUs (benchmarks keep it off the edge's cores)."""
        # OpenMP workers that spin after each forward starve the server's event loop and any client sharing the
        # CPU: measured here, 250 ms stalls per step with 2 clients on 2 cores, none once they sleep instead.
        # The child's weight-loading bar says nothing to whoever runs a test, a benchmark or the demo.
        # Its per-session log lines would interleave with the output of whatever started it: warnings only,
        # unless the config asks for another level.
        logged = replace(config, log_level=LogLevel.WARNING) if config.log_level is LogLevel.INFO else config
        super().__init__(specbridge_command("serve", *config_arguments(logged)),
                         environment={"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, cpus=cpus,
                         ready_timeout_s=ready_timeout_s, stop_timeout_s=stop_timeout_s)
        self.config = config

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"
