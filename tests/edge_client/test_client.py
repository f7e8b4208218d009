"""The edge client's pure parts: text streamed by whole characters, and a JSON-ready result."""

import json

from edge_client.client import ClientResult, Utf8Stream
from shared.wire import FinishReason


def test_utf8_stream_never_shows_a_broken_character() -> None:
    data = "a東🙂b".encode()
    for cut in range(len(data) + 1):
        stream = Utf8Stream()
        pieces = [stream.push(data[:cut]), stream.push(data[cut:]), stream.flush()]
        assert "".join(pieces) == "a東🙂b"
        assert "\ufffd" not in "".join(pieces)


def test_utf8_stream_flushes_an_unfinished_character_as_a_replacement() -> None:
    stream = Utf8Stream()
    assert stream.push(b"x\xe6\x9d") == "x"
    assert stream.flush() == "\ufffd"


def test_client_result_summary_is_json() -> None:
    result = ClientResult(output_bytes="東京".encode(), target_token_ids=(5, 6), prompt_token_count=3,
                          finish_reason=FinishReason.LENGTH, wall_ms=12.5, arrival_ms=(4.0, 9.0), committed_per_response=(1, 1),
                          accepted_per_round=(0, 0), proposed_per_round=(2, 1))
    summary = json.loads(json.dumps(result.summary(), ensure_ascii=False))
    assert summary["text"] == "東京" and summary["rounds"] == 2 and summary["finish_reason"] == "length"
    assert summary["target_token_ids"] == [5, 6] and "output_bytes" not in summary
