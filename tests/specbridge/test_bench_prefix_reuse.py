"""The prefix-reuse benchmark plays a chat on a tiny pair: later turns reuse the earlier ones' KV, and the
answers with and without reuse are the same ids (no timing asserted)."""

import json

from specbridge.bench.prefix_reuse import PrefixReuseBenchConfig, run_prefix_reuse_bench


def test_later_turns_reuse_the_conversation_so_far_and_answer_identically(tiny_pair, tmp_path, monkeypatch) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    config = PrefixReuseBenchConfig(pair="tiny-gpt2-mistral", turns=3, max_new_tokens=8, repeats=1,
                                    json=str(tmp_path / "prefix_reuse.json"), plot=str(tmp_path / "prefix_reuse.png"))
    run_prefix_reuse_bench(config)
    rows = json.loads((tmp_path / "prefix_reuse.json").read_text())["rows"]
    assert [row["turn"] for row in rows] == [1, 2, 3] and all(row["identical"] for row in rows)
    assert rows[0]["reused_tokens"] == 0
    for earlier, later in zip(rows, rows[1:]):
        # most of the conversation so far is reused (the seam with the new text may re-tokenize); never all of it
        assert earlier["prompt_tokens"] // 2 < later["reused_tokens"] < later["prompt_tokens"]
    assert (tmp_path / "prefix_reuse.png").stat().st_size > 0
