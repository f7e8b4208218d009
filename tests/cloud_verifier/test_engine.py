"""The engine without the network: a round reports the verifier's own time on it, and the batch worker its busy time."""

from __future__ import annotations

import asyncio
import time

from cloud_verifier.engine import EngineLimits, VerifierEngine
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal, DraftToken
from shared.wire import DraftTokenizerInfo, SessionRequest


def test_rounds_report_the_verifiers_own_time(tiny_target) -> None:
    target, vocab = tiny_target
    engine = VerifierEngine(target, vocab, "tiny", EngineLimits())
    request = SessionRequest(prompt="The quick brown fox", config=DecodingConfig(), max_new_tokens=8,
                             draft_tokenizer=DraftTokenizerInfo("draft", "byte_level_bpe", 1))

    async def scenario() -> tuple[list[float], float]:
        session = engine.speculative_session(request)
        started = time.perf_counter()
        verify_ms = [(await engine.speculate_round(session, DraftProposal((DraftToken(b" jumps"),)))).verify_ms
                     for _ in range(3)]
        return verify_ms, (time.perf_counter() - started) * 1e3

    try:
        verify_ms, elapsed_ms = asyncio.run(scenario())
        busy_ms = engine.metrics.counts().busy_ms
    finally:
        engine.close()
    assert all(ms > 0 for ms in verify_ms) and sum(verify_ms) <= elapsed_ms
    assert 0 < busy_ms <= sum(verify_ms)  # forwards and decisions, within the rounds' own time
