"""The Python API (`specbridge.connect`, `Edge.generate` / `stream` / `stats`) against tiny pairs served by a real verifier."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import specbridge
from edge_client.api import Generation
from edge_client.draft_length import DraftLengthPolicy
from tests.cloud_verifier.conftest import ServedPair

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Where is Tokyo?"}]


def _edge(served: ServedPair, draft: bool = True) -> specbridge.Edge:
    return specbridge.connect(served.address, served.draft_onnx_dir if draft else None, threads=1)


async def _wait_for_no_live_sessions(edge: specbridge.Edge, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if (await edge.stats()).live_sessions == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"sessions still live after {timeout_s} s")


def test_import_specbridge_is_light_and_names_the_api() -> None:
    script = ("import sys, specbridge\n"
              "heavy = [m for m in ('grpc', 'onnxruntime', 'torch', 'transformers') if m in sys.modules]\n"
              "assert not heavy, heavy\n"
              "assert callable(specbridge.connect) and specbridge.Generation and specbridge.Origin.DRAFT\n"
              "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_generate_stream_and_stats(chat_served: ServedPair) -> None:
    reference = chat_served.reference(PROMPT, 16)

    async def scenario():
        async with _edge(chat_served) as edge:
            result = await edge.generate(Generation(prompt=PROMPT, max_tokens=16))
            async with edge.stream(Generation(prompt=PROMPT, max_tokens=16)) as stream:
                pieces = [piece async for piece in stream]
            await _wait_for_no_live_sessions(edge)  # the server frees a session as its call completes
            return result, pieces, stream.result, await edge.stats()

    result, pieces, streamed, stats = asyncio.run(scenario())
    assert list(result.target_token_ids) == reference == list(streamed.target_token_ids)
    assert "".join(piece.text for piece in pieces) == result.text == streamed.text
    assert result.rendered_prompt == PROMPT and stats.live_sessions == 0 and stats.sessions_opened >= 2


def test_chat_speculative_equals_target_only_on_the_same_rendering(chat_served: ServedPair) -> None:
    rendered = chat_served.vocab.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)

    async def scenario():
        async with _edge(chat_served) as edge:
            return [await edge.generate(Generation(messages=MESSAGES, max_tokens=12, speculative=speculative))
                    for speculative in (True, False)]

    speculative, target_only = asyncio.run(scenario())
    assert speculative.target_token_ids == target_only.target_token_ids
    assert speculative.rendered_prompt == target_only.rendered_prompt == rendered
    assert speculative.prompt_token_count == target_only.prompt_token_count


def test_stop_sequences_cut_speculative_and_target_only_output_alike(chat_served: ServedPair) -> None:
    full = chat_served.vocab.decode_bytes(chat_served.reference(PROMPT, 30)).decode("utf-8", errors="replace")
    stop = full[10:13]

    async def scenario():
        async with _edge(chat_served) as edge:
            results = [await edge.generate(Generation(prompt=PROMPT, max_tokens=30, stop=[stop], speculative=speculative))
                       for speculative in (True, False)]
            # The client cancels its call at the stop; the server frees the session once the cancel reaches it.
            await _wait_for_no_live_sessions(edge)
            return results

    results = asyncio.run(scenario())
    assert [result.text for result in results] == [full[: full.find(stop)]] * 2
    assert all(result.finish_reason is specbridge.FinishReason.STOP for result in results)
    assert all(len(result.target_token_ids) < 30 for result in results)  # the sessions ended at the stop


def test_leaving_a_stream_early_ends_the_session_at_once(chat_served: ServedPair) -> None:
    async def scenario() -> None:
        async with _edge(chat_served) as edge:
            async with edge.stream(Generation(prompt=PROMPT, max_tokens=400)) as stream:
                async for _ in stream:
                    assert (await edge.stats()).live_sessions == 1
                    break
            await _wait_for_no_live_sessions(edge)
            assert stream.result is None

    asyncio.run(scenario())


def test_pieces_name_their_origin(same_served: ServedPair) -> None:
    async def scenario():
        async with _edge(same_served) as edge:
            pieces = []
            result = await edge.generate(Generation(prompt=PROMPT, max_tokens=24, draft_len=4), pieces.append)
            return result, pieces

    result, pieces = asyncio.run(scenario())
    drafted = "".join(piece.text for piece in pieces if piece.origin is specbridge.Origin.DRAFT)
    assert "".join(piece.text for piece in pieces) == result.text
    assert result.accepted_prediction_tokens > 0 and drafted  # the draft is the target: most of it is accepted
    assert any(piece.origin is specbridge.Origin.TARGET for piece in pieces)  # the bonus tokens are the target's


def test_without_a_draft_only_target_only_generation(chat_served: ServedPair) -> None:
    async def scenario():
        async with _edge(chat_served, draft=False) as edge:
            with pytest.raises(specbridge.EdgeClientError, match="needs a draft"):
                await edge.generate(PROMPT)
            return await edge.generate(Generation(prompt=PROMPT, max_tokens=8, speculative=False))

    assert list(asyncio.run(scenario()).target_token_ids) == chat_served.reference(PROMPT, 8)


def test_a_seeded_sample_drafts_a_fixed_length_so_its_text_repeats() -> None:
    seeded = specbridge.DecodingConfig(mode=specbridge.DecodeMode.SAMPLE, seed=3)
    assert Generation(decoding=seeded).rounds_draft_len == DraftLengthPolicy().initial_len
    assert Generation().rounds_draft_len is None  # greedy: the same text whatever the draft length
    assert Generation(decoding=seeded, draft_len=2).rounds_draft_len == 2
