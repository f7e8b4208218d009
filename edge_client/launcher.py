"""`specbridge edge serve` in a child process, as the tests, the HTTP benchmark and the demo run it: the command
a user types, its ready line read for the port it bound (port 0 picks one), SIGTERM to stop it.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from edge_client.openai_server import EdgeServeConfig
from shared.child_server import ChildServer, ChildServerError, specbridge_command
from specbridge.cli_args import config_arguments


class EdgeServeLaunchError(ChildServerError):
    """`specbridge edge serve` exited or stayed silent instead of announcing that it serves."""


class EdgeServeProcess(ChildServer):
    """Use as `with EdgeServeProcess(config) as edge:`, then point an OpenAI client at `edge.base_url`."""

    ready_pattern = re.compile(r"^specbridge edge serving the OpenAI API on http://(?P<host>.+):(?P<port>\d+)/v1 ")
    name = "`specbridge edge serve`"
    launch_error = EdgeServeLaunchError

    def __init__(self, config: EdgeServeConfig, *, cpus: Collection[int] | None = None, ready_timeout_s: float = 120.0,
                 stop_timeout_s: float = 30.0) -> None:
        """`cpus`: pin the child to these CPUs (benchmarks keep it off the verifier's)."""
        super().__init__(specbridge_command("edge", "serve", *config_arguments(config)),
                         environment={"OMP_WAIT_POLICY": "PASSIVE"}, cpus=cpus, ready_timeout_s=ready_timeout_s,
                         stop_timeout_s=stop_timeout_s)
        self.config = config

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"
