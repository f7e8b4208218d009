"""The edge client's pure parts: a JSON-ready result, its text cut at the stop sequence, its prediction counts, the
routing key."""

import json

from edge_client.client import ClientResult, routing_key
from edge_client.speculation import RoundRecord
from shared.wire import ChatMessage, FinishReason


def test_client_result_summary_is_json() -> None:
    result = ClientResult(output_bytes="東京".encode(), target_token_ids=(5, 6), prompt_token_count=3,
                          finish_reason=FinishReason.LENGTH, wall_ms=12.5, arrival_ms=(4.0, 9.0), committed_per_response=(1, 1),
                          speculation_rounds=(_round(accepted=0, proposed=2), _round(accepted=0, proposed=1)))
    summary = json.loads(json.dumps(result.summary(), ensure_ascii=False))
    assert summary["text"] == "東京" and summary["rounds"] == 2 and summary["finish_reason"] == "length"
    assert summary["target_token_ids"] == [5, 6] and "output_bytes" not in summary
    assert summary["accepted_per_round"] == [0, 0] and summary["proposed_per_round"] == [2, 1]
    assert summary["speculation_rounds"][0]["round_trip_ms"] == 7.0


def _round(*, accepted: int, proposed: int) -> RoundRecord:
    return RoundRecord(draft_len=3, draft_tokens_accepted=0, proposed_count=proposed, accepted_count=accepted,
                       committed_count=accepted + 1, draft_ms=5.0, round_trip_ms=7.0, verify_ms=2.0, ahead_drafted=1,
                       ahead_survived=0)


def test_text_ends_before_the_stop_sequence_and_predictions_add_up() -> None:
    result = ClientResult(output_bytes=b"def f():\n    return 1\n\ndef g", target_token_ids=(1,) * 9, prompt_token_count=2,
                          finish_reason=FinishReason.STOP, wall_ms=1.0, arrival_ms=(1.0, 2.0), committed_per_response=(4, 5),
                          speculation_rounds=(_round(accepted=3, proposed=5), _round(accepted=4, proposed=4)),
                          stop=("\n\n", "return"))
    assert result.text == "def f():\n    "
    assert (result.accepted_prediction_tokens, result.rejected_prediction_tokens) == (7, 2)


def test_the_routing_key_follows_the_conversation_not_its_latest_turn() -> None:
    opening = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi!"))
    later = (*opening, ChatMessage("assistant", "Hello."), ChatMessage("user", "How are you?"))
    assert routing_key("", later) == routing_key("", opening)  # every turn of one conversation: one replica
    assert routing_key("", (ChatMessage("system", "Be brief."), ChatMessage("user", "Bye!"))) != routing_key("", opening)
    assert routing_key("def f():", ()) == routing_key("def f():", ()) != routing_key("def g():", ())
