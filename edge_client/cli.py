"""`specbridge edge` and `specbridge generate`: one generation against a running verifier.

Settings are frozen dataclasses (the flags follow from them, see specbridge/cli_args.py);
text streams to stdout as it is committed, or one JSON object is printed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

import uvloop

from edge_client.client import ClientResult, EdgeClientError, EdgeDraft, TextSink, VerifierClient, load_edge_draft
from edge_client.draft_runtime import Variant
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig


class EdgeConfigError(EdgeClientError, ValueError):
    """An edge setting out of its valid range."""


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    server: str = field(default="127.0.0.1:50051", metadata={"help": "verifier address HOST:PORT"})
    prompt: str = field(metadata={"help": "prompt text"})
    max_new_tokens: int = field(default=64, metadata={"help": "target tokens to generate at most"})
    mode: DecodeMode = field(default=DecodeMode.GREEDY, metadata={"help": "greedy or sampled decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 disables it)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens (0 disables it)"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling (unset: random)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object at the end instead of streaming text"})

    def __post_init__(self) -> None:
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit():
            raise EdgeConfigError(f"--server must be HOST:PORT, got {self.server!r}")
        if self.max_new_tokens < 1:
            raise EdgeConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        _ = self.decoding  # DecodingConfig validates the decoding flags together

    @property
    def decoding(self) -> DecodingConfig:
        return DecodingConfig(mode=self.mode, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed)


@dataclass(frozen=True, kw_only=True)
class EdgeConfig(GenerateConfig):
    draft: str = field(metadata={"help": "exported ONNX draft directory"})
    draft_len: int = field(default=6, metadata={"help": "draft tokens proposed per round"})
    rule: AcceptanceRule = field(default=AcceptanceRule.POINT_MASS, metadata={"help": "acceptance rule when sampling"})
    variant: Variant = field(default=Variant.FP32, metadata={"help": "draft weights: fp32 or int8"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft_len < 1:
            raise EdgeConfigError(f"--draft-len must be >= 1, got {self.draft_len}")

    @property
    def decoding(self) -> DecodingConfig:
        return dataclasses.replace(super().decoding, rule=self.rule)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(result: ClientResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.summary(), ensure_ascii=False))
    else:
        print()


async def _edge(config: EdgeConfig, draft: EdgeDraft, on_text: TextSink | None) -> ClientResult:
    async with VerifierClient(config.server) as client:
        return await client.speculate(draft, config.prompt, config.decoding, max_new_tokens=config.max_new_tokens,
                                      draft_len=config.draft_len, on_text=on_text)


async def _generate(config: GenerateConfig, on_text: TextSink | None) -> ClientResult:
    async with VerifierClient(config.server) as client:
        return await client.generate(config.prompt, config.decoding, max_new_tokens=config.max_new_tokens, on_text=on_text)


def run_edge(config: EdgeConfig) -> ClientResult:
    draft = load_edge_draft(config.draft, variant=config.variant)
    result = uvloop.run(_edge(config, draft, None if config.json else _write_stdout))
    _report(result, config.json)
    return result


def run_generate(config: GenerateConfig) -> ClientResult:
    result = uvloop.run(_generate(config, None if config.json else _write_stdout))
    _report(result, config.json)
    return result
