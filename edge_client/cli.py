"""`specbridge edge` and `specbridge generate`: one generation against a running verifier.

Settings are frozen dataclasses (the flags follow from them, see specbridge/cli_args.py); both run
through the Python API (edge_client.api). Text streams to stdout as it is committed, colored by
origin with --color, or one JSON object is printed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edge_client.api import Edge, Generation, connect
from edge_client.client import ClientResult, EdgeClientError, PieceSink
from edge_client.committed_text import Origin, TextPiece
from edge_client.draft_runtime import Variant
from edge_client.retry import RetryPolicy
from shared.channel_security import ChannelSecurity
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.event_loop import run

AUTO_DRAFT_LEN = "auto"
STDIN_PROMPT = "-"
# ANSI colors by origin: the draft's tokens the target accepted in green, the target's own tokens in yellow.
ORIGIN_COLORS = {Origin.DRAFT: "\x1b[32m", Origin.TARGET: "\x1b[33m"}
RESET_COLOR = "\x1b[0m"


class EdgeConfigError(EdgeClientError, ValueError):
    """An edge setting out of its valid range."""


@dataclass(frozen=True, kw_only=True)
class VerifierSettings(ChannelSecurity):
    """Where the verifier is and how the channel to it is secured (TLS, client certificate, token)."""

    server: str = field(default="127.0.0.1:50051", metadata={"help": "verifier address HOST:PORT"})
    max_retries: int = field(default=RetryPolicy.max_retries, metadata={
        "help": "reconnects in a row, with backoff, after a lost connection or a full verifier; each resumes from the "
                "tokens committed so far (0: fail at once)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit():
            raise EdgeConfigError(f"--server must be HOST:PORT, got {self.server!r}")
        if self.max_retries < 0:
            raise EdgeConfigError(f"--max-retries must be >= 0, got {self.max_retries}")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_retries=self.max_retries)


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(VerifierSettings):
    prompt: str | None = field(default=None, metadata={"help": f"prompt text; '{STDIN_PROMPT}' reads it from standard input"})
    prompt_file: str | None = field(default=None, metadata={
        "help": "read the prompt from this file, byte for byte (trailing newlines kept)"})
    max_new_tokens: int = field(default=64, metadata={"help": "target tokens to generate at most"})
    mode: DecodeMode = field(default=DecodeMode.GREEDY, metadata={"help": "greedy or sampled decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 disables it)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens (0 disables it)"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling (unset: random)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object at the end instead of streaming text"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prompt is None) == (self.prompt_file is None):
            raise EdgeConfigError(f"give the prompt once: --prompt TEXT, --prompt {STDIN_PROMPT} (standard input) "
                                  f"or --prompt-file PATH")
        if self.max_new_tokens < 1:
            raise EdgeConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        _ = self.decoding  # DecodingConfig validates the decoding flags together

    @property
    def decoding(self) -> DecodingConfig:
        return DecodingConfig(mode=self.mode, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed)


@dataclass(frozen=True, kw_only=True)
class DraftSettings(VerifierSettings):
    draft: str = field(metadata={"help": "exported ONNX draft directory"})
    draft_len: str = field(default=AUTO_DRAFT_LEN, metadata={
        "help": f"draft tokens per round: '{AUTO_DRAFT_LEN}' adapts it to the network and the acceptance seen, a number fixes it"})
    draft_ahead: bool = field(default=True, metadata={"help": "keep drafting while a verification is in flight"})
    rule: AcceptanceRule = field(default=AcceptanceRule.POINT_MASS, metadata={"help": "acceptance rule when sampling"})
    variant: Variant = field(default=Variant.FP32, metadata={"help": "draft weights: fp32 or int8"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft_len != AUTO_DRAFT_LEN and not (self.draft_len.isdigit() and int(self.draft_len) >= 1):
            raise EdgeConfigError(f"--draft-len must be '{AUTO_DRAFT_LEN}' or a number >= 1, got {self.draft_len!r}")

    @property
    def fixed_draft_len(self) -> int | None:
        """None when the length adapts each round."""
        return None if self.draft_len == AUTO_DRAFT_LEN else int(self.draft_len)


@dataclass(frozen=True, kw_only=True)
class EdgeConfig(GenerateConfig, DraftSettings):
    color: bool = field(default=False, metadata={
        "help": "color the text by origin: draft tokens the target accepted (green) vs the target's own tokens "
                "(yellow); on a terminal only, unless FORCE_COLOR is set (NO_COLOR turns it off)"})

    @property
    def decoding(self) -> DecodingConfig:
        return dataclasses.replace(super().decoding, rule=self.rule)


def read_prompt(config: GenerateConfig, stdin: BinaryIO | None = None) -> str:
    """The prompt exactly as given; a file or standard input byte for byte, since shell command substitution
    strips trailing newlines and code prompts often end with one."""
    if config.prompt_file is None and config.prompt != STDIN_PROMPT:
        return config.prompt
    source = config.prompt_file or "standard input"
    data = Path(config.prompt_file).read_bytes() if config.prompt_file else (stdin or sys.stdin.buffer).read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EdgeConfigError(f"the prompt in {source} is not UTF-8 text (byte {error.start})") from None


def use_color(requested: bool, is_tty: bool, environ: Mapping[str, str]) -> bool:
    """Color only when asked and shown on a terminal; FORCE_COLOR forces it, NO_COLOR (no-color.org) vetoes it."""
    if not requested or environ.get("NO_COLOR"):
        return False
    return is_tty or environ.get("FORCE_COLOR", "") not in ("", "0")


def _stdout_writer(color: bool) -> PieceSink:
    def write(piece: TextPiece) -> None:
        sys.stdout.write(f"{ORIGIN_COLORS[piece.origin]}{piece.text}{RESET_COLOR}" if color else piece.text)
        sys.stdout.flush()

    return write


def _report(result: ClientResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.summary(), ensure_ascii=False))
    else:
        print()


async def _generate(edge: Edge, request: Generation, on_piece: PieceSink | None) -> ClientResult:
    async with edge:
        return await edge.generate(request, on_piece)


def run_edge(config: EdgeConfig) -> ClientResult:
    request = Generation(prompt=read_prompt(config), max_tokens=config.max_new_tokens, decoding=config.decoding,
                         draft_len=config.fixed_draft_len, draft_ahead=config.draft_ahead)
    edge = connect(config.server, config.draft, variant=config.variant, security=config.channel_security(),
                   retry=config.retry_policy)
    color = not config.json and use_color(config.color, sys.stdout.isatty(), os.environ)
    if color:
        print(f"{ORIGIN_COLORS[Origin.DRAFT]}draft tokens the target accepted{RESET_COLOR}  "
              f"{ORIGIN_COLORS[Origin.TARGET]}the target's own tokens{RESET_COLOR}", file=sys.stderr)
    result = run(_generate(edge, request, None if config.json else _stdout_writer(color)))
    _report(result, config.json)
    return result


def run_generate(config: GenerateConfig) -> ClientResult:
    request = Generation(prompt=read_prompt(config), max_tokens=config.max_new_tokens, decoding=config.decoding,
                         speculative=False)
    edge = connect(config.server, security=config.channel_security(), retry=config.retry_policy)
    result = run(_generate(edge, request, None if config.json else _stdout_writer(False)))
    _report(result, config.json)
    return result
