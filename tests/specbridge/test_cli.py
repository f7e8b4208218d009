"""The CLI shell: every subcommand has --help with defaults; user mistakes end in one line, exit 2."""

import subprocess
import sys

import pytest

from specbridge.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specbridge.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["models", "prepare"], ["models", "measure"], ["export-draft"], ["demo"], ["serve"],
                                     ["edge"], ["edge", "serve"], ["generate"], ["bench", "draft"],
                                     ["bench", "acceptance"], ["bench", "throughput"], ["bench", "http-overhead"],
                                     ["bench", "load"], ["bench", "engine"], ["bench", "prefix-reuse"]])
def test_every_subcommand_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: specbridge" in out
    if command not in (["export-draft"],):
        assert "default" in out


@pytest.mark.parametrize(("args", "message"), [
    (["export-draft", "--model", "/no/such/dir", "--out", "/tmp/x"], "model directory not found"),
    (["edge", "--server", "nohost", "--draft", "/no/such", "--prompt", "hi"], "--server must be HOST:PORT"),
    (["edge", "--draft", "/no/such", "--prompt", "hi", "--draft-len", "many"], "--draft-len must be 'auto' or a number"),
    (["edge", "--draft", "/no/such", "--prompt", "hi", "--draft-len", "0"], "--draft-len must be 'auto' or a number"),
    (["generate", "--prompt", "hi", "--temperature", "0"], "temperature must lie in [0.01, 100]"),
    (["generate", "--prompt", "hi", "--mode", "sample", "--temperature", "1e-30"], "temperature must lie in [0.01, 100]"),
    (["generate", "--prompt", "hi", "--mode", "sample", "--seed", "-1"], "seed must lie in [0, 2**64 - 1]"),
    (["edge", "--draft", "/no/such", "--prompt", "hi", "--mode", "sample", "--seed", "-1"], "seed must lie in"),
    (["serve", "--target", "/no/such/model", "--max-top-k", "0"], "--max-top-k must be > 0"),
    (["serve", "--target", "/no/such/model", "--idle-timeout-s", "0"], "--idle-timeout-s must be > 0"),
    (["generate"], "give the prompt once: --prompt TEXT, --prompt - (standard input) or --prompt-file PATH"),
    (["edge", "--draft", "/no/such", "--prompt-file", "/no/such/prompt.txt"], "/no/such/prompt.txt"),
    (["edge", "serve", "--draft", "/no/such", "--port", "70000"], "--port must lie in"),
    (["edge", "serve", "--draft", "/no/such", "--api-key-file", "/dev/null"], "/dev/null holds no API key"),
    (["serve", "--target", "/no/such/model", "--port", "70000"], "--port must lie in"),
    (["bench", "acceptance", "--mode", "fast"], "--mode must be one of"),
    (["models", "prepare", "--pair", "no-such-pair"], "no-such-pair"),
])
def test_user_mistakes_give_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process, through the CLI's own entry point (a subprocess per case would cost seconds of imports each;
    `test_a_mistake_through_the_installed_command_is_one_line` runs the real command once)."""
    code = main(args)
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("specbridge: error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr


def test_a_mistake_through_the_installed_command_is_one_line() -> None:
    result = _run("generate", "--prompt", "hi", "--mode", "sample", "--seed", "-1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["specbridge: error: seed must lie in [0, 2**64 - 1], got -1"]


def test_bad_flag_value_is_an_argparse_error() -> None:
    result = _run("edge", "--prompt", "hi", "--draft", "d", "--max-new-tokens", "many")
    assert result.returncode == 2
    assert "invalid int value" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_server_is_one_line(tiny_pair) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    result = _run("edge", "--server", "127.0.0.1:9", "--draft", str(pair.draft_onnx_dir), "--prompt", "hi", "--max-retries", "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("specbridge: error:")
    assert "Traceback" not in result.stderr


def test_edge_serve_without_a_verifier_is_one_line(tiny_pair) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    result = _run("edge", "serve", "--server", "127.0.0.1:9", "--draft", str(pair.draft_onnx_dir), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "specbridge: error: cannot reach verifier at 127.0.0.1:9 (UNAVAILABLE)"
