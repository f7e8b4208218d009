"""The target's logits, computed after its forward: one row bit for bit the model's own, blocks to the last bits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GraniteConfig, LlamaConfig, PretrainedConfig

from cloud_verifier.lazy_head import LazyLogits, compute_rows, head_block
from cloud_verifier.target import RowCache, TargetModel, TargetModelError

VOCAB = 96
POSITIONS = 9
LLAMA_LIKE = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "vocab_size": VOCAB, "tie_word_embeddings": False}

# The architectures of the tiny pairs (specbridge/model_zoo.py), and Gemma's softcapped head.
CONFIGS = {
    "llama": LlamaConfig(num_key_value_heads=2, **LLAMA_LIKE),
    "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, tie_word_embeddings=False),
    "gemma3": Gemma3TextConfig(num_key_value_heads=1, head_dim=8, sliding_window=4, **LLAMA_LIKE,
                               layer_types=["sliding_attention", "full_attention"]),
    "gemma3 softcapped, tied": Gemma3TextConfig(num_key_value_heads=1, head_dim=8, final_logit_softcapping=2.0,
                                                **{**LLAMA_LIKE, "tie_word_embeddings": True}),
}


def _target(config: PretrainedConfig) -> TargetModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)  # logits past the softcap, so it matters
    return TargetModel(model, torch.device("cpu"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_are_the_models_own(name: str) -> None:
    target = _target(CONFIGS[name])
    ids = torch.randint(0, VOCAB, (1, POSITIONS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = target.decoder(input_ids=ids).last_hidden_state[0]
        own = target.model(input_ids=ids).logits[0]
        assert name != "gemma3 softcapped, tied" or own.abs().max() <= 2.0 < target.output_head(hidden).abs().max()
        # One row, as target-only decoding reads it: bit for bit the model's own.
        for position in range(POSITIONS):
            one_row = LazyLogits(hidden[position : position + 1], target.logits)
            compute_rows([(one_row, 0, 1)])
            kept = target.model(input_ids=ids, logits_to_keep=torch.arange(position, position + 1)).logits[0, 0]
            assert torch.equal(one_row[0], kept)
        # Blocks, as verification reads them: the model's own up to the last bits any blocked product changes.
        every_row = LazyLogits(hidden, target.logits)
        compute_rows([(every_row, 0, POSITIONS)])
        blocked = torch.stack([every_row[position] for position in range(POSITIONS)])
        torch.testing.assert_close(blocked, own, rtol=1e-5, atol=1e-5)
        assert torch.equal(blocked.argmax(-1), own.argmax(-1))
        # Each block the rules' schedule computes, against the model's logits for exactly those positions.
        lazy = LazyLogits(hidden, target.logits)
        for start, stop in sorted({head_block(position, POSITIONS, lazy=True) for position in range(POSITIONS)}):
            compute_rows([(lazy, start, stop)])
            kept = target.model(input_ids=ids, logits_to_keep=torch.arange(start, stop)).logits[0]
            torch.testing.assert_close(torch.stack([lazy[position] for position in range(start, stop)]), kept,
                                       rtol=1e-5, atol=1e-5)


def test_a_model_that_rescales_its_logits_is_refused() -> None:
    # Granite divides its logits by `logits_scaling` after the head: verifying without it would not be lossless.
    with pytest.raises(TargetModelError, match="GraniteForCausalLM"):
        _target(GraniteConfig(num_key_value_heads=2, logits_scaling=4.0, **LLAMA_LIKE))


def test_forward_rows_are_the_feeds_and_grow_the_caches() -> None:
    target = _target(CONFIGS["gemma3"])
    caches = [RowCache(), RowCache()]
    feeds = target.forward([(caches[0], [1, 2, 3]), (caches[1], [4])])
    assert [len(feed) for feed in feeds] == [3, 1] and [cache.length for cache in caches] == [3, 1]
    compute_rows([(feeds[0], 2, 3)])
    assert feeds[0][2].shape == (VOCAB,) and feeds[0][2].dtype == torch.float32


@pytest.mark.parametrize("pair_name", ["tiny-gpt2-mistral", "tiny-mistral-gemma3arch"])
def test_the_verifiers_attention_leaves_the_models_own_generate_unchanged(tiny_pair, pair_name: str) -> None:
    """The tests' greedy references run generate() on a TargetModel's model, whose attention goes through the
    verifier's row implementation: outside a verifier forward that must be the stock model's, bit for bit."""
    hf_dir = tiny_pair(pair_name).target_hf_dir
    stock = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    ours = TargetModel.from_pretrained(hf_dir, dtype=torch.float64).model
    inputs = torch.tensor([[1, 17, 42, 99, 7, 256, 3]])
    with torch.inference_mode():
        outputs = [model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=12, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True) for model in (stock, ours)]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outputs[0].logits, outputs[1].logits))
