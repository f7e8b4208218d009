"""`specbridge bench acceptance`: acceptance of the cross-vocabulary core against Hugging Face's own
cross-tokenizer assisted generation, on the same prompts, in one run.

Per pair and mode: mean accepted length (target tokens committed per target forward),
forwards per token, align CPU time per round, and the same or the error for the HF baseline.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.errors import UserFacingError

MODES = ("greedy", "sample", "all")


class AcceptanceBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class AcceptanceBenchConfig:
    pair: str = field(default="smollm2-gemma3", metadata={"help": "pair name, or 'all' for both real pairs"})
    prompts: int = field(default=10, metadata={"help": "held-out prompts to run"})
    draft_len: int = field(default=8, metadata={"help": "draft tokens per round"})
    mode: str = field(default="all", metadata={"help": "greedy | sample | all"})
    max_new_tokens: int = field(default=32, metadata={"help": "target tokens per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    seed: int = field(default=0, metadata={"help": "seed for sampling"})
    hf_baseline: bool = field(default=True, metadata={"help": "also run HF assisted generation"})
    json: str = field(default="results/acceptance.json", metadata={"help": "write results here"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AcceptanceBenchConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.prompts < 1 or self.draft_len < 1 or self.max_new_tokens < 1:
            raise AcceptanceBenchConfigError("--prompts, --draft-len and --max-new-tokens must be >= 1")


def _variants(config: AcceptanceBenchConfig) -> list[tuple[str, DecodingConfig]]:
    variants = []
    if config.mode in ("greedy", "all"):
        variants.append(("greedy", DecodingConfig()))
    if config.mode in ("sample", "all"):
        for rule in AcceptanceRule:
            variants.append((f"sample/{rule.value}", DecodingConfig(mode=DecodeMode.SAMPLE, temperature=config.temperature,
                                                                   seed=config.seed, rule=rule)))
    return variants


def _hf_assisted(pair, prompts: list[str], decoding: DecodingConfig, max_new_tokens: int, draft_len: int) -> dict:
    """HF universal assisted generation, counting target forwards with a hook; errors are results too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(str(pair.target_hf_dir), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(pair.draft_hf_dir), dtype=torch.float32).eval()
    target_tok = AutoTokenizer.from_pretrained(str(pair.target_hf_dir))
    draft_tok = AutoTokenizer.from_pretrained(str(pair.draft_hf_dir))
    draft.generation_config.num_assistant_tokens = draft_len
    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    forwards = [0]
    hook = target.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    tokens = total_forwards = matches = 0
    wall = []
    try:
        for prompt in prompts:
            inputs = target_tok(prompt, return_tensors="pt")
            sample = decoding.mode is DecodeMode.SAMPLE
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=target_tok.pad_token_id or target_tok.eos_token_id)
            if sample:
                kwargs["temperature"] = decoding.temperature
                torch.manual_seed(decoding.seed or 0)
            with torch.inference_mode():
                reference = None if sample else target.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
                forwards[0] = 0
                started = time.perf_counter()
                output = target.generate(**inputs, assistant_model=draft, tokenizer=target_tok, assistant_tokenizer=draft_tok, **kwargs)
                wall.append(time.perf_counter() - started)
            new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
            tokens += len(new_ids)
            total_forwards += forwards[0]
            matches += int(reference is not None and new_ids == reference)
    except Exception as error:  # noqa: BLE001 - HF's failure is a measured outcome, recorded not raised
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    finally:
        hook.remove()
    return {
        "mean_accepted_length": tokens / total_forwards,
        "forwards_per_token": total_forwards / tokens,
        "identical_to_target_greedy": None if decoding.mode is DecodeMode.SAMPLE else f"{matches}/{len(prompts)}",
        "wall_s_median": statistics.median(wall),
    }


def _run_core(pair, loaded, prompts: list[str], decoding: DecodingConfig, config: AcceptanceBenchConfig) -> dict:
    from specbridge.speculative import speculative_generate

    target, target_vocab, drafter = loaded
    tokens = forwards = 0
    align_us, plan_us, wall, matches = [], [], [], 0
    for index, prompt in enumerate(prompts):
        result = speculative_generate(drafter, target, target_vocab, prompt, max_new_tokens=config.max_new_tokens,
                                      draft_len=config.draft_len, config=decoding, draft_seed=config.seed + index)
        tokens += len(result.target_token_ids)
        forwards += result.target_forwards
        align_us.append(result.align_us_per_round)
        plan_us.append(result.plan_us_per_round)
        wall.append(result.wall_s)
        if decoding.mode is DecodeMode.GREEDY:
            inputs = torch.tensor([list(result.prompt_ids)])
            with torch.inference_mode():
                reference = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=config.max_new_tokens,
                                                  do_sample=False, pad_token_id=target_vocab.tokenizer.pad_token_id or 0)
            matches += int(reference[0, inputs.shape[1]:].tolist() == list(result.target_token_ids))
        print(f"  [{pair.name} {decoding.mode.value}/{decoding.rule.value}] prompt {index + 1}/{len(prompts)}: "
              f"{len(result.target_token_ids)} tokens in {result.rounds} rounds", file=sys.stderr)
    return {
        "mean_accepted_length": tokens / forwards,
        "forwards_per_token": forwards / tokens,
        "align_us_per_round": statistics.median(align_us),
        "retokenize_and_align_us_per_round": statistics.median(plan_us),
        "identical_to_target_greedy": f"{matches}/{len(prompts)}" if decoding.mode is DecodeMode.GREEDY else None,
        "wall_s_median": statistics.median(wall),
    }


def run_acceptance_bench(config: AcceptanceBenchConfig) -> dict:
    from specbridge.loading import load_drafter, load_target
    from specbridge.model_zoo import prepare_pair
    from specbridge.prompts import HELD_OUT_PROMPTS

    pair_names = ["smollm2-gemma3", "gemma3-smollm2"] if config.pair == "all" else [config.pair]
    prompts = list(HELD_OUT_PROMPTS[: config.prompts])
    results: dict = {"config": asdict(config), "pairs": {}}
    for name in pair_names:
        pair = prepare_pair(name)
        target, target_vocab = load_target(pair.target_hf_dir)
        loaded = (target, target_vocab, load_drafter(pair.draft_onnx_dir, target_vocab=target_vocab))
        per_mode = {}
        for label, decoding in _variants(config):
            print(f"[{name}] {label}: specbridge core", file=sys.stderr)
            row = {"specbridge": _run_core(pair, loaded, prompts, decoding, config)}
            hf_applies = config.hf_baseline and decoding.rule is AcceptanceRule.POINT_MASS
            if hf_applies:
                print(f"[{name}] {label}: Hugging Face assisted generation", file=sys.stderr)
                row["hf_assisted"] = _hf_assisted(pair, prompts, decoding, config.max_new_tokens, config.draft_len)
            per_mode[label] = row
        results["pairs"][name] = per_mode
    _print_table(results)
    out = Path(config.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return results


def _print_table(results: dict) -> None:
    header = f"{'pair':<16} {'mode':<28} {'system':<12} {'acc.len':>8} {'fwd/tok':>8} {'align us':>9} {'greedy==':>9}"
    print(header)
    print("-" * len(header))
    for pair, modes in results["pairs"].items():
        for mode, systems in modes.items():
            for system, row in systems.items():
                if "error" in row:
                    print(f"{pair:<16} {mode:<28} {system:<12} error: {row['error'][:60]}")
                    continue
                align = f"{row['align_us_per_round']:.0f}" if "align_us_per_round" in row else "-"
                print(f"{pair:<16} {mode:<28} {system:<12} {row['mean_accepted_length']:>8.2f} {row['forwards_per_token']:>8.3f} "
                      f"{align:>9} {row['identical_to_target_greedy'] or '-':>9}")
