"""Greedy losslessness of the in-process loop: the ids equal the target's own generate(do_sample=False).

Random-weight tiny pairs on real tokenizers of different families (and a same-tokenizer
control), many prompts, several draft lengths; the real pair in a slow test. Tiny targets run
in float64: random weights put exact fp32 ties between top logits (seen: two logits equal to 7
digits), and a multi-token verification forward may break such a tie differently from
generate()'s one-token steps. That is arithmetic, not the algorithm; the real pair runs in fp32.
"""

import pytest
import torch

from shared.decoding import DecodingConfig
from specbridge.loading import load_drafter, load_target
from specbridge.speculative import speculative_generate
from tests.lossless_prompts import LOSSLESS_PROMPTS

MAX_NEW_TOKENS = 16
CROSS_FAMILY_PAIRS = ["tiny-gpt2-mistral", "tiny-deepseek-gpt2", "tiny-mistral-gemma3arch"]


def target_greedy(target, prompt_ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
    inputs = torch.tensor([list(prompt_ids)])
    with torch.inference_mode():
        output = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                       do_sample=False)
    return output[0, inputs.shape[1]:].tolist()


@pytest.fixture(scope="module", params=CROSS_FAMILY_PAIRS + ["tiny-same-gpt2"])
def loaded_pair(request, tiny_pair):
    pair = tiny_pair(request.param)
    target, target_vocab = load_target(pair.target_hf_dir, dtype=torch.float64)
    return request.param, target, target_vocab, load_drafter(pair.draft_onnx_dir, target_vocab=target_vocab)


# (draft length, draft-ahead): None is the adaptive length, the product's default with draft-ahead on.
@pytest.mark.parametrize(("draft_len", "draft_ahead"), [(1, False), (4, False), (8, False), (4, True), (None, True)])
def test_greedy_equals_target_generate(loaded_pair, draft_len: int | None, draft_ahead: bool) -> None:
    name, target, target_vocab, drafter = loaded_pair
    every_prompt = draft_len == 4 and draft_ahead and name != "tiny-same-gpt2"  # the others: every 5th prompt
    prompts = LOSSLESS_PROMPTS if every_prompt else LOSSLESS_PROMPTS[::5]
    mismatches = []
    for prompt in prompts:
        result = speculative_generate(drafter, target, target_vocab, prompt, max_new_tokens=MAX_NEW_TOKENS,
                                      draft_len=draft_len, config=DecodingConfig(), draft_ahead=draft_ahead)
        if list(result.target_token_ids) != target_greedy(target, result.prompt_ids, MAX_NEW_TOKENS):
            mismatches.append(prompt)
        assert result.rounds == result.target_forwards == len(result.accepted_per_round)
        assert sum(result.accepted_per_round) + result.rounds >= len(result.target_token_ids)
        if not draft_ahead:
            assert all(record.ahead_drafted == 0 for record in result.speculation_rounds)
    assert not mismatches, f"{name} k={draft_len} ahead={draft_ahead}: {len(mismatches)} prompts differ, e.g. {mismatches[0]!r}"


def test_same_tokenizer_control_accepts_whole_drafts(tiny_pair) -> None:
    pair = tiny_pair("tiny-same-gpt2")
    target, target_vocab = load_target(pair.target_hf_dir, dtype=torch.float64)
    drafter = load_drafter(pair.draft_onnx_dir, target_vocab=target_vocab)
    result = speculative_generate(drafter, target, target_vocab, LOSSLESS_PROMPTS[0], max_new_tokens=24, draft_len=4,
                                  config=DecodingConfig())
    # Draft = target weights (fp32 ONNX vs fp64 torch): nearly every draft is accepted whole.
    assert result.mean_accepted_length > 3.0


@pytest.mark.slow
def test_real_pair_greedy_lossless(real_pair) -> None:
    from specbridge.prompts import HELD_OUT_PROMPTS

    target, target_vocab = load_target(real_pair.target_hf_dir)
    drafter = load_drafter(real_pair.draft_onnx_dir, target_vocab=target_vocab)
    accepted = []
    for prompt in HELD_OUT_PROMPTS[:6]:
        result = speculative_generate(drafter, target, target_vocab, prompt, max_new_tokens=24, draft_len=6,
                                      config=DecodingConfig())
        assert list(result.target_token_ids) == target_greedy(target, result.prompt_ids, 24), prompt
        accepted.append(result.mean_accepted_length)
    assert sum(accepted) / len(accepted) > 1.2  # the real pair agrees often enough to pay off
