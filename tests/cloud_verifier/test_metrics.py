"""The verifier's metrics: what Prometheus scrapes equals what GetStats answers and what the clients saw.

A tiny target served in-process (float64) with `--metrics-port 0`; speculative and target-only sessions
run through the real gRPC client, then the real HTTP endpoint is scraped and parsed. The pair's draft
is the target's own weights, so drafts are accepted at many positions.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_verifier.errors import ServeConfigError
from cloud_verifier.metrics import VerifierMetrics
from cloud_verifier.server import RunningVerifier, ServeConfig, start_server
from edge_client.client import VerifierClient
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal, DraftToken, RoundOutcome
from specbridge.v1 import specbridge_pb2 as pb
from specbridge.v1 import specbridge_pb2_grpc

GREEDY = DecodingConfig()
PROMPTS = ("The capital of France is", "def fibonacci(n):")
MAX_NEW_TOKENS = 12
PAIR = "tiny-same-gpt2"
METRIC_NAMES = {
    "specbridge:spec_decode_num_drafts", "specbridge:spec_decode_num_draft_tokens",
    "specbridge:spec_decode_num_accepted_tokens", "specbridge:spec_decode_num_accepted_tokens_per_pos",
    "specbridge:generation_tokens", "specbridge:tokens_fed", "specbridge:forward_rows",
    "specbridge:forward_duration_seconds", "specbridge:prefix_cache_hits", "specbridge:sessions_opened",
    "specbridge:sessions_closed", "specbridge:rejected_calls", "specbridge:num_sessions_running",
    "specbridge:num_rounds_waiting", "specbridge:kv_cache_bytes", "specbridge:kv_cache_budget_bytes",
}


@asynccontextmanager
async def serving(tiny_pair, **settings) -> AsyncIterator[RunningVerifier]:
    """The tiny float64 target served in this process on free ports; `settings` add ServeConfig fields."""
    config = ServeConfig(target=str(tiny_pair(PAIR).target_hf_dir), port=0, dtype="float64", **settings)
    running = await start_server(config)
    try:
        yield running
    finally:
        await running.stop(drain_s=0.0)


async def scrape(running: RunningVerifier) -> tuple[set[str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The metric families the endpoint serves, and every sample by (name, sorted labels)."""
    url = f"http://127.0.0.1:{running.metrics_server.port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    families = list(text_string_to_metric_families(text))
    return ({family.name for family in families},
            {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in families for sample in family.samples})


async def wait_for_no_live_sessions(client: VerifierClient) -> pb.VerifierStats:
    """GetStats once the server has run every handler's exit (a call ends at the client a moment before)."""
    while (stats := await client.stats()).live_sessions:
        await asyncio.sleep(0.02)
    return stats


async def refused(address: str, messages: list[pb.SpeculateRequest]) -> grpc.StatusCode:
    """The error status that a Speculate stream of `messages` ends with."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = specbridge_pb2_grpc.VerifierStub(channel).Speculate(iter(messages))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        return caught.value.code()


def test_scraped_metrics_equal_getstats_and_what_clients_saw(tiny_pair, edge_drafts) -> None:
    drafts = edge_drafts(tiny_pair(PAIR), len(PROMPTS))

    async def scenario():
        async with serving(tiny_pair, metrics_port=0) as running, VerifierClient(f"127.0.0.1:{running.port}") as client:
            speculative = await asyncio.gather(*(
                client.speculate(draft, prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=draft_len)
                for draft, prompt, draft_len in zip(drafts, PROMPTS, (3, 5))))
            target_only = await client.generate(PROMPTS[0], GREEDY, max_new_tokens=MAX_NEW_TOKENS)
            # A stream that starts with a draft instead of an 'open': INVALID_ARGUMENT, before any session.
            code = await refused(f"127.0.0.1:{running.port}", [pb.SpeculateRequest(draft=pb.Draft())])
            stats = await wait_for_no_live_sessions(client)
            return speculative, target_only, code, stats, await scrape(running)

    speculative, target_only, code, stats, (families, samples) = asyncio.run(scenario())
    assert METRIC_NAMES <= families, f"missing: {METRIC_NAMES - families}"

    def value(name: str, **labels: str) -> float:
        return samples[(f"specbridge:{name}", tuple(sorted(labels.items())))]

    rounds = [record for result in speculative for record in result.speculation_rounds if record.draft_len > 0]
    assert rounds and sum(record.accepted_count for record in rounds) > 0, "no draft token accepted: nothing to check"
    assert value("spec_decode_num_drafts_total") == stats.drafts == len(rounds)
    assert value("spec_decode_num_draft_tokens_total") == stats.draft_tokens == sum(r.proposed_count for r in rounds)
    accepted = sum(sum(result.accepted_per_round) for result in speculative)
    assert value("spec_decode_num_accepted_tokens_total") == stats.accepted_tokens == accepted
    per_position = [value("spec_decode_num_accepted_tokens_per_pos_total", position=str(k))
                    for k in range(len(stats.accepted_per_position))]
    assert per_position == list(stats.accepted_per_position)
    assert sum(per_position) == accepted
    # Position k counts the drafts that had at least k + 1 tokens accepted.
    assert per_position == [sum(r.accepted_count > k for r in rounds) for k in range(len(per_position))]

    results = [*speculative, target_only]
    assert value("generation_tokens_total") == stats.committed_tokens == sum(len(r.target_token_ids) for r in results)
    assert value("sessions_opened_total") == value("sessions_closed_total") == stats.sessions_opened == len(results)
    assert value("num_sessions_running") == stats.live_sessions == 0
    assert value("forward_rows_count") == value("forward_duration_seconds_count") == stats.forwards
    # One row per round a client saw: each speculative round and each target-only step.
    assert value("forward_rows_sum") == stats.rows == sum(result.rounds for result in results)
    assert value("forward_duration_seconds_sum") * 1e3 == pytest.approx(stats.busy_ms, rel=1e-9) and stats.busy_ms > 0
    assert value("tokens_fed_total") == stats.tokens_fed > 0
    assert value("kv_cache_bytes") == stats.cache_bytes
    assert value("kv_cache_budget_bytes") == stats.kv_budget_bytes
    assert value("prefix_cache_hits_total") == stats.prefix_cache_hit_tokens
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert value("rejected_calls_total", code="INVALID_ARGUMENT") == 1


def _outcome(accepted: int, proposed: int) -> RoundOutcome:
    return RoundOutcome(accepted_ids=tuple(range(accepted)), next_id=7, committed_bytes=b"x" * (accepted + 1),
                        proposed_count=proposed, draft_tokens_accepted=accepted, finished=False)


def test_a_draft_is_a_round_with_a_non_empty_proposal() -> None:
    metrics = VerifierMetrics()
    two_tokens = DraftProposal(tokens=(DraftToken(b"a"), DraftToken(b"b")))
    metrics.observe_round(two_tokens, _outcome(accepted=2, proposed=3))
    metrics.observe_round(two_tokens, _outcome(accepted=0, proposed=2))
    metrics.observe_round(DraftProposal(tokens=()), _outcome(accepted=0, proposed=0))
    counts = metrics.counts()
    assert (counts.drafts, counts.draft_tokens, counts.accepted_tokens) == (2, 5, 2)
    assert counts.accepted_per_position == (1, 1)


def test_metrics_endpoint_is_off_unless_asked_and_a_taken_port_fails_in_one_line(tiny_pair) -> None:
    with pytest.raises(ServeConfigError, match="--metrics-port must lie in"):
        ServeConfig(target="t", metrics_port=70000)

    async def scenario() -> bool:
        async with serving(tiny_pair) as running:
            return running.metrics_server is None

    assert asyncio.run(scenario())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeConfigError, match=f"cannot serve metrics on 127.0.0.1:{taken.getsockname()[1]}"):
            asyncio.run(start_server(ServeConfig(target=str(tiny_pair(PAIR).target_hf_dir), port=0,
                                                 metrics_port=taken.getsockname()[1])))
