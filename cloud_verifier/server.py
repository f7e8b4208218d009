"""The verifier process: loads the target, serves Verifier, health checking and reflection over grpc.aio.

`specbridge serve` runs `serve(ServeConfig)`; tests and benchmarks start the same server
in-process with `start_server`. Prints one ready line, stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
import torch
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_verifier.auth import BearerTokenInterceptor, TokenStore, exposure_warning, reload_tokens, server_credentials
from cloud_verifier.engine import EngineLimits, VerifierEngine
from cloud_verifier.errors import ServeConfigError
from cloud_verifier.interceptor import ErrorStatusInterceptor
from cloud_verifier.logs import LogFormat, LogLevel, configure_logging
from cloud_verifier.metrics import MetricsServer, start_metrics_server
from cloud_verifier.servicer import VerifierServicer
from cloud_verifier.target import TargetModel
from shared.channel_security import missing_file
from shared.vocab import Vocab
from specbridge.v1 import specbridge_pb2, specbridge_pb2_grpc

# float64 is for exactness tests on CPU: batching changes fp32 rounding (~1e-6), which can flip near-ties.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
READY_LINE = "specbridge verifier listening on {host}:{port}"
METRICS_LINE = "specbridge verifier metrics on http://{host}:{port}/metrics"
HEALTH_POLL_S = 0.5
DRAIN_POLL_S = 0.05
STOP_GRACE_S = 1.0  # after draining: for answers already on their way
_LIMITS = EngineLimits()
VERIFIER_SERVICE = specbridge_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


@dataclass(frozen=True)
class ServeConfig:
    target: str = field(metadata={"help": "target model: Hugging Face directory or model id"})
    device: str = field(default="cpu", metadata={"help": "torch device for the target: cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={"help": "target weights dtype: " + ", ".join(DTYPES)})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "port to listen on (0: any free port, printed when ready)"})
    # Limits on what clients may make the verifier do (EngineLimits holds their defaults).
    max_batch: int = field(default=_LIMITS.max_batch, metadata={"help": "most session rows in one target forward"})
    max_sessions: int = field(default=_LIMITS.max_sessions, metadata={"help": "most live sessions; more are refused (RESOURCE_EXHAUSTED)"})
    max_sessions_per_client: int = field(default=_LIMITS.max_sessions_per_client, metadata={
        "help": "most live sessions of one client (its peer address, or its token's name under --auth-token-file)"})
    max_draft_tokens: int = field(default=_LIMITS.max_draft_tokens, metadata={"help": "most draft tokens one proposal may hold"})
    max_token_bytes: int = field(default=_LIMITS.max_token_bytes, metadata={"help": "most bytes of one draft token or top-k alternative"})
    max_top_k: int = field(default=_LIMITS.max_top_k, metadata={"help": "most top-k alternatives per draft token"})
    max_proxy_per_draft_token: int = field(default=_LIMITS.max_proxy_per_draft_token, metadata={
        "help": "most target tokens verified per draft token (a longer re-tokenization is cut)"})
    max_new_tokens_limit: int = field(default=_LIMITS.max_new_tokens_limit, metadata={"help": "largest max_new_tokens a client may ask for"})
    max_prompt_bytes: int = field(default=_LIMITS.max_prompt_bytes, metadata={"help": "most bytes of a prompt (or of its chat messages)"})
    max_prompt_tokens: int = field(default=_LIMITS.max_prompt_tokens, metadata={
        "help": "most target tokens of a prompt (never more than the target's positions allow)"})
    idle_timeout_s: float = field(default=_LIMITS.idle_timeout_s, metadata={
        "help": "seconds a Speculate stream may stay silent before its session is ended (DEADLINE_EXCEEDED)"})
    max_message_bytes: int = field(default=8 << 20, metadata={
        "help": "largest gRPC message accepted (the draft_probs rule's opening message carries the draft vocabulary)"})
    keepalive_s: float = field(default=30.0, metadata={"help": "seconds between HTTP/2 keepalive pings; a peer silent for one more is dropped"})
    drain_s: float = field(default=5.0, metadata={"help": "on SIGTERM, seconds sessions in flight may take to finish (new ones get UNAVAILABLE)"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads for the target (unset: torch's default)"})
    # Security: TLS, mutual TLS and bearer tokens (cloud_verifier/auth.py).
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain to serve TLS with (with --tls-key)"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str | None = field(default=None, metadata={
        "help": "PEM CA(s) that must have signed each client's certificate (mutual TLS; needs --tls-cert)"})
    auth_token_file: str | None = field(default=None, metadata={
        "help": "file of accepted bearer tokens, one a line ('#' comments), reloaded on SIGHUP; calls without one "
                "are UNAUTHENTICATED, except health checks"})
    # Observability: Prometheus metrics (cloud_verifier/metrics.py) and log lines (cloud_verifier/logs.py).
    metrics_port: int | None = field(default=None, metadata={
        "help": "port of a Prometheus /metrics endpoint over plain HTTP (unset: none; 0: any free port, printed when ready)"})
    metrics_host: str | None = field(default=None, metadata={"help": "address of the metrics endpoint (unset: --host)"})
    log_format: LogFormat = field(default=LogFormat.TEXT, metadata={
        "help": "log lines on stderr, each with its session's id: text, or json (one object a line)"})
    log_level: LogLevel = field(default=LogLevel.INFO, metadata={
        "help": "least severe log lines shown: debug, info (a line per session), warning, error"})
    log_prompts: bool = field(default=False, metadata={"help": "log each session's prompt text (off: no prompt reaches the logs)"})
    # KV memory (cloud_verifier/kv_pool.py): sessions are admitted by the KV cache they may grow to.
    prefix_reuse: bool = field(default=True, metadata={
        "help": "keep finished sessions' KV caches (within --kv-cache-gib) for follow-up turns that start with their "
                "tokens (off: every session prefills its whole prompt)"})
    kv_cache_gib: float | None = field(default=None, metadata={
        "help": "GiB of target KV cache for live sessions and kept prefixes; a session reserves prompt + max_new_tokens "
                "positions at open, and one past the budget is refused (RESOURCE_EXHAUSTED) (unset: half the memory free "
                "at start: available RAM on cpu, free device memory less 2 GiB on cuda)"})

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ServeConfigError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ServeConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ServeConfigError(f"--port must lie in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ServeConfigError(f"--metrics-port must lie in [0, 65535], got {self.metrics_port}")
        self.limits  # validates them
        for name in ("max_message_bytes", "keepalive_s"):
            if not getattr(self, name) > 0:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not self.drain_s >= 0:
            raise ServeConfigError(f"--drain-s must be >= 0, got {self.drain_s}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ServeConfigError(f"--kv-cache-gib must be > 0, got {self.kv_cache_gib}")
        if self.threads is not None and self.threads < 1:
            raise ServeConfigError(f"--threads must be >= 1, got {self.threads}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServeConfigError("--tls-cert and --tls-key go together (the certificate and its private key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ServeConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if complaint := missing_file((("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                                      ("--tls-client-ca", self.tls_client_ca), ("--auth-token-file", self.auth_token_file))):
            raise ServeConfigError(complaint)

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(**{item.name: getattr(self, item.name) for item in fields(EngineLimits)})


@dataclass(frozen=True)
class RunningVerifier:
    server: grpc.aio.Server
    port: int
    engine: VerifierEngine
    health: health.aio.HealthServicer
    health_watch: asyncio.Task[None]
    drain_s: float
    tokens: TokenStore | None = None  # the accepted bearer tokens, when --auth-token-file asks for them
    metrics_server: MetricsServer | None = None  # the /metrics endpoint, when --metrics-port asks for one

    async def stop(self, drain_s: float | None = None) -> None:
        """Drain, then stop: health says NOT_SERVING and new sessions get UNAVAILABLE while the live ones
        have `drain_s` (default: the config's) to finish; then the server and the batch worker stop."""
        self.health_watch.cancel()
        await self.health.enter_graceful_shutdown()
        self.engine.sessions.start_draining()
        deadline = time.monotonic() + (self.drain_s if drain_s is None else drain_s)
        while self.engine.sessions.counts.live and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.server.stop(STOP_GRACE_S)
        await asyncio.to_thread(self.engine.close)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)


async def _watch_worker(engine: VerifierEngine, health_servicer: health.aio.HealthServicer) -> None:
    """Health follows the batch worker: if it ever stops, probes see NOT_SERVING (and sessions get UNAVAILABLE)."""
    while engine.scheduler.alive:
        await asyncio.sleep(HEALTH_POLL_S)
    for service in ("", VERIFIER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def _channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    keepalive_ms = int(config.keepalive_s * 1000)
    return [("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Pings find peers that vanished without closing (a laptop's lid, a dropped NAT entry): their
            # streams end and their sessions and KV cache are freed instead of held forever.
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            # Clients ping too (the edge keeps its channel alive at the same period): allow it.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms // 2),
            ("grpc.http2.max_ping_strikes", 0),
            # A port already in use must fail, not be shared with another verifier.
            ("grpc.so_reuseport", 0)]


def load_engine(config: ServeConfig) -> VerifierEngine:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    target = TargetModel.from_pretrained(config.target, device=config.device, dtype=DTYPES[config.dtype])
    kv_budget_bytes = int(config.kv_cache_gib * (1 << 30)) if config.kv_cache_gib is not None else None
    return VerifierEngine(target, Vocab.from_pretrained(config.target), Path(config.target).name, config.limits,
                          kv_budget_bytes, prefix_reuse=config.prefix_reuse)


async def start_server(config: ServeConfig) -> RunningVerifier:
    """Load the target and start serving; `port` is the bound one (config.port 0 picks a free port)."""
    # Unreadable certificates or tokens fail now, not after the target has loaded.
    tokens = TokenStore(config.auth_token_file) if config.auth_token_file is not None else None
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca) if config.uses_tls else None
    engine = await asyncio.to_thread(load_engine, config)
    authentication = [BearerTokenInterceptor(tokens)] if tokens is not None else []
    server = grpc.aio.server(interceptors=[*authentication, ErrorStatusInterceptor(engine.metrics)],
                             options=_channel_options(config))
    servicer = VerifierServicer(engine, clients_by_token=tokens is not None, log_prompts=config.log_prompts)
    specbridge_pb2_grpc.add_VerifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((VERIFIER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address = f"{config.host}:{config.port}"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        engine.close()
        reasons = ("in use, not an address of this machine, or a key that does not match the certificate" if credentials
                   else "in use, or not an address of this machine")
        raise ServeConfigError(f"cannot listen on {config.host}:{config.port} ({reasons})") from None
    try:
        metrics_server = (start_metrics_server(engine.metrics, config.metrics_host or config.host, config.metrics_port)
                          if config.metrics_port is not None else None)
    except ServeConfigError:
        engine.close()
        raise
    await server.start()
    for service in ("", VERIFIER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningVerifier(server=server, port=port, engine=engine, health=health_servicer,
                           health_watch=asyncio.create_task(_watch_worker(engine, health_servicer)),
                           drain_s=config.drain_s, tokens=tokens, metrics_server=metrics_server)


async def _serve(config: ServeConfig) -> None:
    configure_logging(config.log_format, config.log_level)
    running = await start_server(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: print(reload_tokens(running.tokens), file=sys.stderr, flush=True))
    if warning := exposure_warning(config.host, running.port, tls=config.uses_tls, auth=running.tokens is not None):
        print(warning, file=sys.stderr, flush=True)
    if running.metrics_server is not None:
        print(METRICS_LINE.format(host=config.metrics_host or config.host, port=running.metrics_server.port), flush=True)
    print(READY_LINE.format(host=config.host, port=running.port), flush=True)
    await stop_requested.wait()
    await running.stop()


def serve(config: ServeConfig) -> None:
    uvloop.run(_serve(config))
