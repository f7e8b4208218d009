"""The demo's last step runs on a tiny pair: curl line, the openai package streaming from `edge serve`, the check."""

from specbridge.demo_openai import run_openai_demo


def test_openai_demo_smoke(tiny_pair, monkeypatch, capsys) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    run_openai_demo("tiny-gpt2-mistral", "The quick brown fox", 6)
    out = capsys.readouterr().out
    assert "curl http://127.0.0.1:" in out and "/v1/completions" in out
    assert "identical to target-only greedy decoding: yes" in out and "completion tokens" in out
