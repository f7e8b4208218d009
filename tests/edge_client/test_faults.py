"""Faults over real sockets: a connection reset by the network simulator, a verifier killed and restarted, a full
verifier. The edge resumes from the ids it committed, and its output stays the target's own greedy output."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig, start_server
from edge_client.client import ClientResult, EdgeClientError, EdgeDraft, VerifierClient, load_edge_draft
from edge_client.retry import RetryPolicy
from shared.decoding import DecodingConfig
from specbridge.netsim import DelayProxy, NetworkProfile
from tests.cloud_verifier.conftest import ServedPair

PROMPT = "The quick brown fox"
MAX_NEW_TOKENS = 40
GREEDY = DecodingConfig()
# Rounds slow enough that a fault triggered after the first text lands mid-generation.
SLOW_LINK = NetworkProfile("test", rtt_ms=20.0)
FAST_RETRIES = RetryPolicy(max_retries=5, initial_backoff_ms=10.0, max_backoff_ms=100.0)
NO_RETRIES = RetryPolicy(max_retries=0)


@pytest.fixture(scope="module")
def draft(plain_served: ServedPair) -> EdgeDraft:
    return load_edge_draft(plain_served.draft_onnx_dir, threads=1)


def after_first_text(fault: Callable[[], object]) -> Callable[[str], None]:
    """An on_text sink that starts `fault` (once) when the first committed text arrives, and records the text."""
    shown: list[str] = []

    def on_text(text: str) -> None:
        if not shown:
            asyncio.get_running_loop().call_soon(fault)
        shown.append(text)

    on_text.shown = shown  # type: ignore[attr-defined]
    return on_text


async def _through_reset(served: ServedPair, draft: EdgeDraft, speculative: bool, retry: RetryPolicy) -> tuple[ClientResult, str]:
    async with DelayProxy(SLOW_LINK, served.address) as proxy, VerifierClient(proxy.address, retry=retry) as client:
        resets: list[asyncio.Task[None]] = []
        on_text = after_first_text(lambda: resets.append(asyncio.ensure_future(proxy.reset_connections())))
        try:
            if speculative:
                result = await client.speculate(draft, PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=2,
                                                on_text=on_text)
            else:
                result = await client.generate(PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS, on_text=on_text)
        finally:
            await asyncio.gather(*resets)
        return result, "".join(on_text.shown)  # type: ignore[attr-defined]


@pytest.mark.parametrize("speculative", [True, False], ids=["speculate", "generate"])
def test_a_reset_connection_is_resumed_without_losing_or_repeating_a_token(plain_served: ServedPair, draft: EdgeDraft,
                                                                           speculative: bool) -> None:
    result, shown = asyncio.run(_through_reset(plain_served, draft, speculative, FAST_RETRIES))
    assert result.reconnects >= 1
    assert list(result.target_token_ids) == plain_served.reference(PROMPT, MAX_NEW_TOKENS)
    assert shown == result.text  # every piece shown once, in order, across the reconnect
    assert sum(result.committed_per_response) == MAX_NEW_TOKENS
    if speculative:
        assert len(result.speculation_rounds) == result.rounds  # the rounds of the lost session are kept


def test_without_retries_a_reset_fails_with_one_line(plain_served: ServedPair, draft: EdgeDraft) -> None:
    with pytest.raises(EdgeClientError) as caught:
        asyncio.run(_through_reset(plain_served, draft, True, NO_RETRIES))
    message = str(caught.value)
    assert caught.value.retryable and "\n" not in message and "retries" not in message


def test_a_full_verifier_says_when_to_retry_and_the_second_client_gets_in(plain_served: ServedPair, draft: EdgeDraft) -> None:
    config = ServeConfig(target=str(plain_served.target_hf_dir), port=0, dtype="float64", max_sessions=1)

    async def scenario() -> tuple[ClientResult, ClientResult]:
        running = await start_server(config)
        try:
            address = f"127.0.0.1:{running.port}"
            async with DelayProxy(SLOW_LINK, address) as proxy, VerifierClient(proxy.address, retry=FAST_RETRIES) as first, \
                    VerifierClient(address, retry=RetryPolicy(max_retries=20, initial_backoff_ms=1.0)) as second:
                opened = asyncio.Event()
                holding = asyncio.ensure_future(first.speculate(draft, PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS,
                                                                draft_len=1, on_text=lambda _: opened.set()))
                await opened.wait()  # the first client holds the only session
                waiting = await second.generate(PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS)
                return await holding, waiting
        finally:
            await running.stop(0)

    holding, waiting = asyncio.run(scenario())
    assert holding.reconnects == 0 and waiting.reconnects >= 1
    assert list(holding.target_token_ids) == list(waiting.target_token_ids) == plain_served.reference(PROMPT, MAX_NEW_TOKENS)


def test_a_full_verifier_without_retries_is_one_clear_line(plain_served: ServedPair) -> None:
    config = ServeConfig(target=str(plain_served.target_hf_dir), port=0, dtype="float64", max_sessions=1)

    async def scenario() -> None:
        running = await start_server(config)
        address = f"127.0.0.1:{running.port}"
        try:
            async with VerifierClient(address, retry=NO_RETRIES) as client:
                holding = asyncio.ensure_future(client.generate(PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS))
                while running.engine.sessions.counts.live == 0:
                    await asyncio.sleep(0.005)
                try:
                    await client.generate(PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS)
                finally:
                    await holding
        finally:
            await running.stop(0)

    with pytest.raises(EdgeClientError, match="RESOURCE_EXHAUSTED: the verifier already serves its maximum of 1") as caught:
        asyncio.run(scenario())
    assert caught.value.retryable and caught.value.retry_after_ms is not None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_verifier_killed_and_restarted_on_its_port_is_resumed(plain_served: ServedPair, draft: EdgeDraft) -> None:
    config = ServeConfig(target=str(plain_served.target_hf_dir), port=_free_port(), dtype="float64")
    verifiers = [VerifierProcess(config).__enter__()]
    # Patient enough to outlast a restart: the child loads torch and the target again.
    patient = RetryPolicy(max_retries=100, initial_backoff_ms=100.0, max_backoff_ms=1000.0)

    def restart() -> None:
        verifiers.append(VerifierProcess(config).__enter__())

    def kill_and_restart(restarts: list[asyncio.Future[None]]) -> None:
        verifiers[0].kill()  # at once, before the next round: the restart, seconds, runs while the client retries
        restarts.append(asyncio.ensure_future(asyncio.to_thread(restart)))

    async def scenario() -> ClientResult:
        async with VerifierClient(f"127.0.0.1:{config.port}", retry=patient) as client:
            restarts: list[asyncio.Future[None]] = []
            on_text = after_first_text(lambda: kill_and_restart(restarts))
            try:
                return await client.speculate(draft, PROMPT, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=1,
                                              on_text=on_text)
            finally:
                await asyncio.gather(*restarts)

    try:
        result = asyncio.run(scenario())
    finally:
        for verifier in verifiers:
            verifier.stop()
    assert len(verifiers) == 2 and result.reconnects >= 1
    assert list(result.target_token_ids) == plain_served.reference(PROMPT, MAX_NEW_TOKENS)
