"""The KV layout: caches persist across steps in place, rows of any context and feed length batch exactly,
a failed forward leaves every cache as it was, admission is by KV bytes, and kept prefixes are reused."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
)

from cloud_verifier.engine import EngineLimits, VerifierEngine
from cloud_verifier.errors import CapacityError
from cloud_verifier.kv_cache import RowCache
from cloud_verifier.kv_pool import KvPool
from cloud_verifier.lazy_head import compute_rows
from cloud_verifier.target import TargetModel
from shared.decoding import DecodingConfig
from shared.wire import GenerationRequest

VOCAB = 96
LLAMA_LIKE = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "vocab_size": VOCAB, "tie_word_embeddings": False}
CONFIGS = {
    "llama": LlamaConfig(num_key_value_heads=2, **LLAMA_LIKE),
    "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB),
    # Contexts far past the window: a sliding layer must see exactly the last 4 positions.
    "gemma3": Gemma3TextConfig(num_key_value_heads=1, head_dim=8, sliding_window=4, **LLAMA_LIKE,
                               layer_types=["sliding_attention", "full_attention"]),
}


def _target(config: PretrainedConfig) -> TargetModel:
    torch.manual_seed(0)
    return TargetModel(AutoModelForCausalLM.from_config(config).to(torch.float64), torch.device("cpu"))


def _ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(target: TargetModel, cache: RowCache, ids: list[int]) -> torch.Tensor:
    (feed,) = target.forward([(cache, ids)])
    compute_rows([(feed, 0, len(feed))])
    return torch.stack([feed[position] for position in range(len(feed))])


def _full_sequence_logits(target: TargetModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return target.model(input_ids=torch.tensor([ids])).logits[0].float()  # as TargetModel.logits gives them


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_contexts_and_feeds_in_one_forward_equal_each_row_alone(name: str) -> None:
    target = _target(CONFIGS[name])
    # A long-context row next to short ones, feeds of 1 to 7 tokens: no row's result depends on the others.
    contexts, feeds = [_ids(40, 1), _ids(3, 2), _ids(9, 3)], [_ids(7, 4), _ids(1, 5), _ids(3, 6)]
    batched = [RowCache() for _ in contexts]
    for cache, context in zip(batched, contexts):
        target.forward([(cache, context)])
    outputs = target.forward([(cache, feed) for cache, feed in zip(batched, feeds)])
    compute_rows([(output, 0, len(output)) for output in outputs])
    for cache, context, feed, output in zip(batched, contexts, feeds, outputs):
        assert cache.length == len(context) + len(feed)
        alone = _logits(target, _prefilled(target, context), feed)
        rows = torch.stack([output[position] for position in range(len(feed))])
        torch.testing.assert_close(rows, alone, rtol=1e-12, atol=1e-12)
        # And what the model computes over the whole sequence at once, without any cache.
        torch.testing.assert_close(rows, _full_sequence_logits(target, context + feed)[len(context):], rtol=1e-6, atol=1e-6)


def _prefilled(target: TargetModel, ids: list[int]) -> RowCache:
    cache = RowCache()
    target.forward([(cache, ids)])
    return cache


def test_a_cache_is_appended_and_cropped_in_place() -> None:
    target = _target(CONFIGS["gemma3"])
    cache = RowCache(capacity_tokens=32)
    target.forward([(cache, _ids(10, 1))])
    buffer = cache._keys[0].data_ptr()
    cache.crop(6)  # a rejected proposal's positions go by moving the length
    target.forward([(cache, _ids(5, 2))])
    assert cache.length == 11 and cache._keys[0].data_ptr() == buffer and cache.nbytes == _reservation(target, 32)
    torch.testing.assert_close(_logits(target, cache, [7]), _full_sequence_logits(target, _ids(10, 1)[:6] + _ids(5, 2) + [7])[-1:],
                               rtol=1e-6, atol=1e-6)


def _reservation(target: TargetModel, tokens: int) -> int:
    return target.kv_bytes_per_token * tokens


def test_a_cache_grows_past_its_reservation_keeping_its_positions() -> None:
    target = _target(CONFIGS["llama"])
    cache = RowCache(capacity_tokens=4)
    target.forward([(cache, _ids(3, 1))])
    target.forward([(cache, _ids(6, 2))])
    torch.testing.assert_close(_logits(target, cache, [5]), _full_sequence_logits(target, _ids(3, 1) + _ids(6, 2) + [5])[-1:],
                               rtol=1e-6, atol=1e-6)


def test_a_forward_that_raises_leaves_every_cache_as_it_was() -> None:
    target = _target(CONFIGS["gemma3"])
    caches = [_prefilled(target, _ids(8, 1)), _prefilled(target, _ids(2, 2))]

    def fail(*_: object) -> None:
        raise RuntimeError("out of memory, say")

    hook = target.decoder.layers[-1].register_forward_hook(fail)  # after the first layer's keys were written
    with pytest.raises(RuntimeError, match="out of memory"):
        target.forward([(caches[0], [1, 2, 3]), (caches[1], [4])])
    hook.remove()
    assert [cache.length for cache in caches] == [8, 2]
    # Retried row by row, each is exactly what it would have been.
    torch.testing.assert_close(_logits(target, caches[0], [1, 2, 3]), _full_sequence_logits(target, _ids(8, 1) + [1, 2, 3])[-3:],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(target, caches[1], [4]), _full_sequence_logits(target, _ids(2, 2) + [4])[-1:],
                               rtol=1e-6, atol=1e-6)


def test_sessions_are_admitted_by_kv_bytes_and_kept_caches_make_room() -> None:
    pool = KvPool(budget_bytes=100 * 8, bytes_per_token=8)
    first = pool.reserve(60)
    with pytest.raises(CapacityError, match="KV cache budget"):
        pool.reserve(41)
    pool.release(first)
    cache = RowCache()
    cache.write(0, torch.zeros(1, 1, 30, 1, dtype=torch.float64), torch.zeros(1, 1, 30, 1, dtype=torch.float64))
    cache.length = 30
    pool.keep(list(range(30)), cache)  # 2 x 30 x 8 bytes = 480, kept
    assert pool.kept_bytes == 480
    pool.reserve(70)  # needs the kept cache's room: it goes, the reservation does not wait
    assert pool.kept_bytes == 0 and pool.reserved_bytes == 560


def test_the_longest_common_prefix_is_reused_and_never_the_whole_prompt() -> None:
    pool = KvPool(budget_bytes=1 << 20, bytes_per_token=8)
    for ids in ([1, 2, 3, 4, 5], [1, 2, 9]):
        cache = RowCache()
        cache.write(0, torch.zeros(1, 1, len(ids), 1), torch.zeros(1, 1, len(ids), 1))
        cache.length = len(ids)
        pool.keep(ids, cache)
    cache, reused = pool.take_prefix([1, 2, 3, 4, 5], capacity_tokens=8)
    assert reused == cache.length == 4  # one token left to feed, for the next token's logits
    assert pool.take_prefix([7, 7], capacity_tokens=4)[1] == 0
    cache, reused = pool.take_prefix([1, 2, 9, 9], capacity_tokens=8)
    assert reused == 3 and pool.kept_bytes == 0


def test_a_follow_up_turn_reuses_the_finished_sessions_cache_and_decodes_the_same(tiny_target) -> None:
    target, vocab = tiny_target
    engine, cold = (VerifierEngine(target, vocab, "tiny", EngineLimits(), kv_budget_bytes=64 << 20) for _ in range(2))
    try:
        first_text = "The quick brown fox" + vocab.tokenizer.decode(asyncio.run(_generate(engine, "The quick brown fox")))
        follow_up = asyncio.run(_generate(engine, first_text + " and then"))
        reference = asyncio.run(_generate(cold, first_text + " and then"))
    finally:
        engine.close()
        cold.close()
    assert engine.metrics.counts().prefix_cache_hit_tokens > 0 and cold.metrics.counts().prefix_cache_hit_tokens == 0
    assert follow_up == reference


async def _generate(engine: VerifierEngine, prompt: str) -> list[int]:
    session = engine.generation_session(GenerationRequest(prompt=prompt, config=DecodingConfig(), max_new_tokens=6))
    ids: list[int] = []
    with engine.sessions.hold(session):
        while not session.finished:
            ids.extend((await engine.generate_step(session)).token_ids)
    return ids


def test_a_session_past_the_kv_budget_is_refused_and_the_admitted_one_keeps_its_room(tiny_target) -> None:
    target, vocab = tiny_target
    request = GenerationRequest(prompt="The quick brown fox", config=DecodingConfig(), max_new_tokens=16)
    engine = VerifierEngine(target, vocab, "tiny", EngineLimits(), kv_budget_bytes=40 * target.kv_bytes_per_token)
    try:
        admitted = engine.generation_session(request)
        with engine.sessions.hold(admitted):
            assert engine.kv_pool.reserved_bytes == admitted.reserved_tokens * target.kv_bytes_per_token
            with pytest.raises(CapacityError, match="KV cache budget"), engine.sessions.hold(engine.generation_session(request)):
                pass
        assert engine.kv_pool.reserved_bytes == 0
        with engine.sessions.hold(engine.generation_session(request)):  # its room is free again
            pass
    finally:
        engine.close()
