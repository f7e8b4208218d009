"""The verifier process: loads the target, serves Verifier, health checking and reflection over grpc.aio.

`specbridge serve` runs `serve(ServeConfig)`; tests and benchmarks start the same server
in-process with `start_server`. Prints one ready line, stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_verifier.engine import EngineLimits, VerifierEngine
from cloud_verifier.errors import VerifierError
from cloud_verifier.interceptor import ErrorStatusInterceptor
from cloud_verifier.servicer import VerifierServicer
from cloud_verifier.target import TargetModel
from shared.vocab import Vocab
from specbridge.v1 import specbridge_pb2, specbridge_pb2_grpc

# float64 is for exactness tests on CPU: batching changes fp32 rounding (~1e-6), which can flip near-ties.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
READY_LINE = "specbridge verifier listening on {host}:{port}"
SHUTDOWN_GRACE_S = 2.0
# Room for a draft vocabulary's bytes (the draft_probs rule) in the opening message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
VERIFIER_SERVICE = specbridge_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


class ServeConfigError(VerifierError, ValueError):
    """A serve setting out of its valid range."""


@dataclass(frozen=True)
class ServeConfig:
    target: str = field(metadata={"help": "target model: Hugging Face directory or model id"})
    device: str = field(default="cpu", metadata={"help": "torch device for the target: cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={"help": "target weights dtype: " + ", ".join(DTYPES)})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "port to listen on (0: any free port, printed when ready)"})
    max_batch: int = field(default=32, metadata={"help": "most session rows in one target forward"})
    max_sessions: int = field(default=256, metadata={"help": "most live sessions; more are refused (RESOURCE_EXHAUSTED)"})
    max_draft_tokens: int = field(default=16, metadata={"help": "most draft tokens one proposal may hold"})
    max_new_tokens_limit: int = field(default=4096, metadata={"help": "largest max_new_tokens a client may ask for"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads for the target (unset: torch's default)"})

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ServeConfigError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ServeConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ServeConfigError(f"--port must lie in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_sessions", "max_draft_tokens", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ServeConfigError(f"--threads must be >= 1, got {self.threads}")

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(max_batch=self.max_batch, max_sessions=self.max_sessions,
                            max_draft_tokens=self.max_draft_tokens, max_new_tokens_limit=self.max_new_tokens_limit)


@dataclass(frozen=True)
class RunningVerifier:
    server: grpc.aio.Server
    port: int
    engine: VerifierEngine
    health: health.aio.HealthServicer

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace_s`, then stop the batch worker."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await asyncio.to_thread(self.engine.close)


def load_engine(config: ServeConfig) -> VerifierEngine:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    target = TargetModel.from_pretrained(config.target, device=config.device, dtype=DTYPES[config.dtype])
    return VerifierEngine(target, Vocab.from_pretrained(config.target), Path(config.target).name, config.limits)


async def start_server(config: ServeConfig) -> RunningVerifier:
    """Load the target and start serving; `port` is the bound one (config.port 0 picks a free port)."""
    engine = await asyncio.to_thread(load_engine, config)
    server = grpc.aio.server(interceptors=[ErrorStatusInterceptor()],
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      # A port already in use must fail, not be shared with another verifier.
                                      ("grpc.so_reuseport", 0)])
    specbridge_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((VERIFIER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError:
        engine.close()
        raise ServeConfigError(f"cannot listen on {config.host}:{config.port} (in use, or not an address of this machine)") from None
    await server.start()
    for service in ("", VERIFIER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningVerifier(server=server, port=port, engine=engine, health=health_servicer)


async def _serve(config: ServeConfig) -> None:
    running = await start_server(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    print(READY_LINE.format(host=config.host, port=running.port), flush=True)
    await stop_requested.wait()
    await running.stop()


def serve(config: ServeConfig) -> None:
    uvloop.run(_serve(config))
