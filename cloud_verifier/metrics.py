"""The verifier's counters, gauges and histograms: the one place they live, exposed to Prometheus.

The batch worker, the session registry, the engine and the error interceptor report into one
`VerifierMetrics`; `GetStats` answers from its `counts()` and `--metrics-port` serves its registry
over HTTP. Names follow vLLM's (`vllm:spec_decode_*`) where the concept is the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from cloud_verifier.errors import ServeConfigError
from shared.proposal import DraftProposal, RoundOutcome

if TYPE_CHECKING:
    from cloud_verifier.engine import VerifierEngine

PREFIX = "specbridge:"
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FORWARD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Target-vocabulary draft tokens, as GetStats and the exposition define them; see VerifierMetrics.
DRAFT_TOKENS_HELP = ("Target-vocabulary tokens the drafts became (the proxy tokens the target verifies). vLLM counts "
                     "the drafter's own tokens; ours has another tokenizer, so this counts what the verifier verifies")


@dataclass(frozen=True)
class VerifierCounts:
    """One reading of the metrics, as GetStats answers it."""

    live_sessions: int
    sessions_opened: int
    sessions_closed: int
    forwards: int
    rows: int
    tokens_fed: int
    committed_tokens: int
    busy_ms: float
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    accepted_per_position: tuple[int, ...]  # index k: drafts whose k-th proxy token was accepted
    prefix_cache_hit_tokens: int
    cache_bytes: int
    kv_budget_bytes: int

    @property
    def rows_per_forward(self) -> float:
        return self.rows / self.forwards if self.forwards else 0.0


class VerifierMetrics:
    """Thread-safe: the batch worker, the event loop and the scrape thread all touch it.

    A draft is one speculative round whose proposal is not empty; target-only steps are not drafts.
    Its tokens are counted in the target vocabulary, and accepted ones by position k = 0, 1, ...
    """

    def __init__(self) -> None:
        # A registry of its own, not prometheus_client's global one: one process may run several verifiers (tests).
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # one reading never sees half of a forward's or a round's updates
        self._engine: VerifierEngine | None = None
        registry = self.registry
        self._drafts = Counter(PREFIX + "spec_decode_num_drafts", "Speculative rounds with a non-empty proposal",
                               registry=registry)
        self._draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens", DRAFT_TOKENS_HELP, registry=registry)
        self._accepted_tokens = Counter(PREFIX + "spec_decode_num_accepted_tokens",
                                        "Target-vocabulary draft tokens the target accepted", registry=registry)
        self._accepted_per_position = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Drafts whose target-vocabulary token at this position (0-based) was accepted", ["position"], registry=registry)
        self._generation_tokens = Counter(PREFIX + "generation_tokens", "Target tokens committed, speculative and "
                                          "target-only (accepted plus each round's correction or bonus)", registry=registry)
        self._tokens_fed = Counter(PREFIX + "tokens_fed", "Target tokens fed to forwards (prefill and proposals), "
                                   "padding excluded", registry=registry)
        self._forward_rows = Histogram(PREFIX + "forward_rows", "Session rows per batched target forward",
                                       buckets=ROWS_BUCKETS, registry=registry)
        self._forward_seconds = Histogram(
            PREFIX + "forward_duration_seconds", "One batched target forward and its acceptance decisions; the sum "
            "is the batch worker's busy time", buckets=FORWARD_SECONDS_BUCKETS, registry=registry)
        self._prefix_cache_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens not prefilled because a "
                                          "cached prefix already held their keys and values", registry=registry)
        self._sessions_opened = Counter(PREFIX + "sessions_opened", "Sessions registered (Speculate and Generate)",
                                        registry=registry)
        self._sessions_closed = Counter(PREFIX + "sessions_closed", "Sessions freed, for any reason", registry=registry)
        self._rejected_calls = Counter(PREFIX + "rejected_calls", "Calls ended with an error status, by gRPC status code",
                                       ["code"], registry=registry)
        Gauge(PREFIX + "num_sessions_running", "Live sessions", registry=registry).set_function(self._live_sessions)
        Gauge(PREFIX + "num_rounds_waiting", "Rounds queued for the next target forward",
              registry=registry).set_function(self._rounds_waiting)
        Gauge(PREFIX + "kv_cache_bytes", "Target KV cache held by the live sessions",
              registry=registry).set_function(self._cache_bytes)
        Gauge(PREFIX + "kv_cache_budget_bytes", "Target KV cache the verifier may hold (0: no budget set)",
              registry=registry).set_function(self._kv_budget_bytes)

    def watch(self, engine: VerifierEngine) -> None:
        """Read the engine's live state (queue, KV cache) whenever the gauges are read."""
        self._engine = engine

    def observe_forward(self, rows: int, tokens_fed: int, seconds: float, committed: int) -> None:
        with self._lock:
            self._forward_rows.observe(rows)
            self._forward_seconds.observe(seconds)
            self._tokens_fed.inc(tokens_fed)
            self._generation_tokens.inc(committed)

    def observe_round(self, proposal: DraftProposal, outcome: RoundOutcome) -> None:
        """A speculative round's draft figures (target-only steps never come here)."""
        if not proposal.tokens:
            return
        with self._lock:
            self._drafts.inc()
            self._draft_tokens.inc(outcome.proposed_count)
            self._accepted_tokens.inc(len(outcome.accepted_ids))
            for position in range(len(outcome.accepted_ids)):
                self._accepted_per_position.labels(position=str(position)).inc()

    def prefix_reused(self, tokens: int) -> None:
        """`tokens` prompt tokens whose KV a cached prefix supplied (the KV layout reports these)."""
        self._prefix_cache_hits.inc(tokens)

    def session_opened(self) -> None:
        with self._lock:
            self._sessions_opened.inc()

    def session_closed(self) -> None:
        with self._lock:
            self._sessions_closed.inc()

    def rejected(self, code: grpc.StatusCode) -> None:
        self._rejected_calls.labels(code=code.name).inc()

    def counts(self) -> VerifierCounts:
        with self._lock:
            values = _sample_values((self._sessions_opened, self._sessions_closed, self._forward_rows,
                                     self._forward_seconds, self._tokens_fed, self._generation_tokens, self._drafts,
                                     self._draft_tokens, self._accepted_tokens, self._prefix_cache_hits))
            per_position = _per_label(self._accepted_per_position, "position")
        opened, closed = int(values["sessions_opened_total"]), int(values["sessions_closed_total"])
        return VerifierCounts(
            live_sessions=opened - closed, sessions_opened=opened, sessions_closed=closed,
            forwards=int(values["forward_rows_count"]), rows=int(values["forward_rows_sum"]),
            tokens_fed=int(values["tokens_fed_total"]), committed_tokens=int(values["generation_tokens_total"]),
            busy_ms=values["forward_duration_seconds_sum"] * 1e3, drafts=int(values["spec_decode_num_drafts_total"]),
            draft_tokens=int(values["spec_decode_num_draft_tokens_total"]),
            accepted_tokens=int(values["spec_decode_num_accepted_tokens_total"]),
            # Contiguous: accepting position k means accepting every one before it.
            accepted_per_position=tuple(int(per_position[str(k)]) for k in range(len(per_position))),
            prefix_cache_hit_tokens=int(values["prefix_cache_hits_total"]),
            cache_bytes=self._cache_bytes(), kv_budget_bytes=self._kv_budget_bytes())

    def _live_sessions(self) -> int:
        values = _sample_values((self._sessions_opened, self._sessions_closed))
        return int(values["sessions_opened_total"] - values["sessions_closed_total"])

    def _rounds_waiting(self) -> int:
        return self._engine.scheduler.queued_rounds if self._engine is not None else 0

    def _cache_bytes(self) -> int:
        return self._engine.sessions.counts.cache_bytes if self._engine is not None else 0

    def _kv_budget_bytes(self) -> int:
        return self._engine.kv_budget_bytes if self._engine is not None else 0


def _sample_values(metrics: Iterable[MetricWrapperBase]) -> dict[str, float]:
    """Unlabelled samples by name less the `specbridge:` prefix: `x_total`, `x_sum`, `x_count`, ..."""
    return {sample.name.removeprefix(PREFIX): sample.value for metric in metrics for family in metric.collect()
            for sample in family.samples if not sample.labels}


def _per_label(counter: Counter, label: str) -> dict[str, float]:
    return {sample.labels[label]: sample.value for family in counter.collect() for sample in family.samples
            if sample.name.endswith("_total")}


@dataclass(frozen=True)
class MetricsServer:
    """Prometheus's text exposition of one `VerifierMetrics` over HTTP, served by a thread of its own."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_server(metrics: VerifierMetrics, host: str, port: int) -> MetricsServer:
    """Serve `metrics` at http://host:port/metrics (port 0: any free port, see `.port`)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as error:
        raise ServeConfigError(f"cannot serve metrics on {host}:{port} ({error.strerror or error})") from None
    return MetricsServer(server, thread)
