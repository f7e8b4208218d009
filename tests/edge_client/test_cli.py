"""`specbridge edge` and `generate` as a user runs them: the prompt from a file or standard input byte for byte,
and text colored by origin only where asked and shown on a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.cli import EdgeConfigError, GenerateConfig, ORIGIN_COLORS, read_prompt, use_color
from edge_client.committed_text import Origin
from tests.cloud_verifier.conftest import ServedPair

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_PROMPT = "def add(a, b):\r\n    return a + b\n\n"  # ends with newlines that $(cat file) would strip


def _specbridge(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specbridge.cli", *args], cwd=REPO_ROOT, input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_the_prompt_is_read_byte_for_byte(tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_bytes(CODE_PROMPT.encode())
    assert read_prompt(GenerateConfig(prompt_file=str(prompt_file))) == CODE_PROMPT
    assert read_prompt(GenerateConfig(prompt="-"), stdin=io.BytesIO(CODE_PROMPT.encode())) == CODE_PROMPT
    assert read_prompt(GenerateConfig(prompt="as typed\n")) == "as typed\n"
    prompt_file.write_bytes(b"caf\xe9")
    with pytest.raises(EdgeConfigError, match="is not UTF-8 text"):
        read_prompt(GenerateConfig(prompt_file=str(prompt_file)))
    with pytest.raises(EdgeConfigError, match="give the prompt once"):
        GenerateConfig(prompt="x", prompt_file=str(prompt_file))


@pytest.mark.parametrize(("requested", "is_tty", "environ", "expected"), [
    (True, True, {}, True),
    (True, False, {}, False),  # a pipe or a file gets plain text
    (True, False, {"FORCE_COLOR": "1"}, True),
    (True, True, {"NO_COLOR": "1"}, False),
    (False, True, {"FORCE_COLOR": "1"}, False),
])
def test_color_only_where_asked_and_seen(requested: bool, is_tty: bool, environ: dict, expected: bool) -> None:
    assert use_color(requested, is_tty, environ) is expected


def test_edge_and_generate_read_the_prompt_from_a_file_and_from_stdin(chat_served: ServedPair, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_bytes(CODE_PROMPT.encode())
    common = ["--server", chat_served.address, "--max-new-tokens", "6", "--json"]
    runs = [_specbridge("edge", *common, "--draft", str(chat_served.draft_onnx_dir), "--prompt-file", str(prompt_file)),
            _specbridge("edge", *common, "--draft", str(chat_served.draft_onnx_dir), "--prompt", "-", stdin=CODE_PROMPT),
            _specbridge("generate", *common, "--prompt", "-", stdin=CODE_PROMPT)]
    summaries = []
    for run in runs:
        assert run.returncode == 0, run.stderr
        summaries.append(json.loads(run.stdout))
    assert all(summary["rendered_prompt"] == CODE_PROMPT for summary in summaries)
    assert summaries[0]["prompt_token_count"] == len(chat_served.prompt_ids(CODE_PROMPT))
    assert len({tuple(summary["target_token_ids"]) for summary in summaries}) == 1


def test_color_shows_the_accepted_draft_and_the_targets_tokens(same_served: ServedPair) -> None:
    args = ["edge", "--server", same_served.address, "--draft", str(same_served.draft_onnx_dir), "--prompt", "Hello",
            "--max-new-tokens", "16", "--draft-len", "4", "--color"]
    forced = _specbridge(*args, env={"FORCE_COLOR": "1"})
    assert forced.returncode == 0, forced.stderr
    assert ORIGIN_COLORS[Origin.DRAFT] in forced.stdout and ORIGIN_COLORS[Origin.TARGET] in forced.stdout
    piped = _specbridge(*args, env={"FORCE_COLOR": ""})
    assert "\x1b[" not in piped.stdout and piped.stdout.strip()
