"""Scale-out behind nginx, for real: edge sessions through Debian's nginx running deploy/nginx/specbridge-grpc.conf
in front of two `specbridge serve` replicas.

Every session's output equals the target's own greedy generate() token for token; the sessions spread over both
replicas; a resumed transcript lands on the replica its `x-specbridge-session` key hashes to; with one replica
killed mid-run, every session resumes on the other and still completes losslessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from cloud_verifier.launcher import VerifierProcess
from edge_client.client import ClientResult, VerifierClient
from edge_client.retry import RetryPolicy
from shared.decoding import DecodingConfig
from specbridge.v1 import specbridge_pb2 as pb
from tests.deploy.conftest import ScaledOut
from tests.lossless_prompts import LOSSLESS_PROMPTS

pytestmark = pytest.mark.slow

GREEDY = DecodingConfig()
# Which replica a session lands on hashes its key against the replicas' addresses, whose ports change every run:
# 16 sessions all land on one replica about once in 30,000 runs (8 would, about once in 130).
SESSIONS = 16
MAX_NEW_TOKENS = 16
PROMPTS = LOSSLESS_PROMPTS[::3][:SESSIONS]
# Whichever replica is first seen mid-session is killed: these need not cover both.
KILL_PROMPTS = PROMPTS[:8]
# A lost session comes back soon: the test waits on it.
FAST_RETRY = RetryPolicy(max_retries=8, initial_backoff_ms=50.0, max_backoff_ms=500.0)


async def _sessions_opened_on(replica: VerifierProcess) -> int:
    """Asked of the replica directly, not through nginx."""
    async with VerifierClient(replica.address) as direct:
        return (await direct.stats()).sessions_opened


async def _sessions_opened(scaled_out: ScaledOut) -> list[int]:
    return [await _sessions_opened_on(replica) for replica in scaled_out.replicas]


def _speculate_all(client: VerifierClient, scaled_out: ScaledOut, edge_drafts, prompts: list[str],
                   max_new_tokens: int) -> list[asyncio.Future]:
    drafts = edge_drafts(scaled_out.pair, len(prompts))
    return [asyncio.ensure_future(client.speculate(draft, prompt, GREEDY, max_new_tokens=max_new_tokens,
                                                   draft_len=(1, 2, 4)[i % 3]))
            for i, (draft, prompt) in enumerate(zip(drafts, prompts))]


def _assert_lossless(scaled_out: ScaledOut, prompts: list[str], results: list[ClientResult], max_new_tokens: int) -> None:
    mismatches = [prompt for prompt, result in zip(prompts, results, strict=True)
                  if list(result.target_token_ids) != scaled_out.pair.reference(prompt, max_new_tokens)]
    assert not mismatches, f"{len(mismatches)} of {len(results)} sessions differ from the target's greedy output"


def test_concurrent_sessions_spread_over_both_replicas_losslessly(scaled_out: ScaledOut, edge_drafts) -> None:
    async def scenario() -> tuple[list[ClientResult], list[int]]:
        before = await _sessions_opened(scaled_out)
        async with VerifierClient(scaled_out.pair.address) as client:
            results = list(await asyncio.gather(*_speculate_all(client, scaled_out, edge_drafts, PROMPTS, MAX_NEW_TOKENS)))
        return results, [after - earlier for after, earlier in zip(await _sessions_opened(scaled_out), before)]

    results, opened = asyncio.run(scenario())
    _assert_lossless(scaled_out, PROMPTS, results, MAX_NEW_TOKENS)
    assert all(result.reconnects == 0 for result in results)
    assert sum(opened) == SESSIONS and min(opened) >= 1, f"sessions opened per replica: {opened}"


def test_a_resumed_transcript_lands_on_the_replica_of_its_first_session(scaled_out: ScaledOut, edge_drafts) -> None:
    (draft,) = edge_drafts(scaled_out.pair, 1)

    async def landings() -> list[list[int]]:
        """For each prompt: sessions each replica opened for its first call and a resume of its transcript."""
        spread = []
        async with VerifierClient(scaled_out.pair.address) as client:
            for prompt in PROMPTS[:6]:
                before = await _sessions_opened(scaled_out)
                first = await client.speculate(draft, prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=3)
                cut = len(first.target_token_ids) // 2
                resumed = await client.speculate(draft, prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=3,
                                                  resume_target_ids=first.target_token_ids[:cut],
                                                  resume_bytes=scaled_out.pair.vocab.decode_bytes(first.target_token_ids[:cut]))
                assert resumed.target_token_ids == first.target_token_ids
                spread.append([after - earlier for after, earlier in zip(await _sessions_opened(scaled_out), before)])
        return spread

    spread = asyncio.run(landings())
    assert all(sorted(opened) == [0, 2] for opened in spread), f"sessions per replica, per transcript: {spread}"


def test_a_replica_killed_mid_run_loses_no_session(scaled_out_to_break: ScaledOut, edge_drafts) -> None:
    scaled_out = scaled_out_to_break
    max_new_tokens = 2 * MAX_NEW_TOKENS  # long enough that the kill lands mid-session

    async def scenario() -> tuple[list[ClientResult], list[int], list[int]]:
        async with VerifierClient(scaled_out.pair.address, retry=FAST_RETRY) as client:
            sessions = _speculate_all(client, scaled_out, edge_drafts, KILL_PROMPTS, max_new_tokens)
            victim = await _first_replica_mid_session(scaled_out, sessions)
            survivor = scaled_out.replicas[1 - victim]
            os.kill(scaled_out.replicas[victim].pid, signal.SIGKILL)
            opened_at_kill = await _sessions_opened_on(survivor)
            results = list(await asyncio.gather(*sessions))
            # A session opened now goes straight to the survivor: the dead replica is skipped.
            (draft,) = edge_drafts(scaled_out.pair, 1)
            late = await client.speculate(draft, PROMPTS[0], GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=2)
            return results, [opened_at_kill, await _sessions_opened_on(survivor)], list(late.target_token_ids)

    results, survivor_opened, late_ids = asyncio.run(scenario())
    _assert_lossless(scaled_out, KILL_PROMPTS, results, max_new_tokens)
    assert late_ids == scaled_out.pair.reference(PROMPTS[0], MAX_NEW_TOKENS)
    cut = sum(result.reconnects > 0 for result in results)
    assert cut >= 1, "no session was cut by the kill"
    # Each cut session finished on the survivor, and so did the late one.
    assert survivor_opened[1] - survivor_opened[0] >= cut + 1, f"the survivor's sessions_opened went {survivor_opened}"


async def _first_replica_mid_session(scaled_out: ScaledOut, sessions: list[asyncio.Future]) -> int:
    """The index of the first replica seen holding a live session that has committed tokens."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(VerifierClient(replica.address)) for replica in scaled_out.replicas]
        while not all(session.done() for session in sessions):
            for index, direct in enumerate(clients):
                stats: pb.VerifierStats = await direct.stats()
                if stats.live_sessions > 0 and stats.committed_tokens > 0:
                    return index
            await asyncio.sleep(0.005)
    raise AssertionError("every session finished before either replica was seen mid-session")
