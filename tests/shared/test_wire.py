"""The wire codecs: every record survives a round trip through its message and its bytes; bad input is refused."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig, DecodingConfigError
from shared.proposal import DraftProposal, DraftToken, RoundOutcome
from shared.wire import (
    ChatMessage,
    DraftTokenizerInfo,
    FinishReason,
    GeneratedStep,
    GenerationRequest,
    ServedRound,
    SessionInfo,
    SessionRequest,
    WireFormatError,
    decode_decoding,
    decode_generated_step,
    decode_generation_request,
    decode_proposal,
    decode_round,
    decode_session_info,
    decode_session_request,
    encode_decoding,
    encode_generated_step,
    encode_generation_request,
    encode_proposal,
    encode_round,
    encode_session_info,
    encode_session_request,
)
from specbridge.v1 import specbridge_pb2 as pb

# Probabilities travel as float32: the drafter computes them in float32, so these are exact.
float32_probability = st.floats(0.0, 1.0, width=32)
token_bytes = st.binary(max_size=12)
draft_tokens = st.builds(DraftToken, token_bytes=token_bytes,
                         top_k=st.lists(st.tuples(token_bytes, float32_probability), max_size=8).map(tuple))
proposals = st.builds(DraftProposal, tokens=st.lists(draft_tokens, max_size=16).map(tuple), ends_with_eos=st.booleans())
SAMPLING = DecodingConfig(mode=DecodeMode.SAMPLE, temperature=0.7, top_k=40, top_p=0.9, seed=2**63 + 5,
                          rule=AcceptanceRule.DRAFT_PROBS)


def through_bytes(message):
    return type(message).FromString(message.SerializeToString())


@given(proposals)
def test_proposal_round_trip(proposal: DraftProposal) -> None:
    assert decode_proposal(through_bytes(encode_proposal(proposal))) == proposal


@pytest.mark.parametrize("config", [DecodingConfig(), SAMPLING, DecodingConfig(mode=DecodeMode.SAMPLE, temperature=1.5)])
def test_decoding_round_trip(config: DecodingConfig) -> None:
    assert decode_decoding(through_bytes(encode_decoding(config))) == config


def test_session_request_round_trip() -> None:
    request = SessionRequest(prompt="héllo 東京", config=SAMPLING, max_new_tokens=64,
                             draft_tokenizer=DraftTokenizerInfo("smollm2", "byte_level_bpe", 3),
                             resume_target_ids=(5, 0, 2**32 - 1), draft_vocab_bytes=(b"", b"\xe6", b" the"))
    assert decode_session_request(through_bytes(encode_session_request(request))) == request
    plain = SessionRequest(prompt="x", config=DecodingConfig(), max_new_tokens=1,
                           draft_tokenizer=DraftTokenizerInfo("d", "sentencepiece", 100))
    assert decode_session_request(through_bytes(encode_session_request(plain))) == plain
    chat = SessionRequest(prompt="", config=DecodingConfig(), max_new_tokens=5,
                          draft_tokenizer=DraftTokenizerInfo("d", "sentencepiece", 100),
                          messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "héllo\n東京 ")))
    assert decode_session_request(through_bytes(encode_session_request(chat))) == chat


@pytest.mark.parametrize("info", [
    SessionInfo(session_id="abc", prompt_token_count=7, target_model="gemma", shared_draft_ids=(1, 9)),
    SessionInfo(session_id="abc", prompt_token_count=7, target_model="gemma", rendered_prompt="<s>[user]\nhi\n"),
])
def test_session_info_round_trip(info: SessionInfo) -> None:
    assert decode_session_info(through_bytes(encode_session_info(info))) == info


def test_a_revision_1_peer_reads_as_no_chat() -> None:
    """Revision-1 messages lack the chat fields: they decode as a plain prompt and an unrendered session."""
    opened = pb.SessionOpened(session_id="s", prompt_token_count=3, target_model="t")
    assert decode_session_info(through_bytes(opened)).rendered_prompt == ""
    request = pb.GenerateRequest(prompt="x", decoding=encode_decoding(DecodingConfig()), max_new_tokens=2)
    assert decode_generation_request(through_bytes(request)).messages == ()


def test_a_chat_message_needs_a_role() -> None:
    message = pb.OpenSession(decoding=encode_decoding(DecodingConfig()), messages=[pb.ChatMessage(content="hi")])
    with pytest.raises(WireFormatError, match="chat message 0 has no role"):
        decode_session_request(message)


@pytest.mark.parametrize("served", [
    ServedRound(RoundOutcome((4, 5), 6, b"ab\xe6\x9d", 3, 2, False), accepted_bytes=b"ab", finish_reason=None,
                verify_ms=12.5),
    ServedRound(RoundOutcome((), 0, b"", 0, 0, True), accepted_bytes=b"", finish_reason=FinishReason.LENGTH),
    ServedRound(RoundOutcome((7, 1), None, b"x", 2, 1, True), accepted_bytes=b"x", finish_reason=FinishReason.EOS),
])
def test_round_round_trip(served: ServedRound) -> None:
    assert decode_round(through_bytes(encode_round(served))) == served


def test_generation_round_trips() -> None:
    request = GenerationRequest(prompt="def f():", config=DecodingConfig(), max_new_tokens=9, resume_target_ids=(5, 6))
    assert decode_generation_request(through_bytes(encode_generation_request(request))) == request
    chat = GenerationRequest(prompt="", config=DecodingConfig(), max_new_tokens=9, messages=(ChatMessage("user", "hi"),))
    assert decode_generation_request(through_bytes(encode_generation_request(chat))) == chat
    step = GeneratedStep(token_ids=(3,), token_bytes=b"\xf0\x9f", finish_reason=FinishReason.EOS, prompt_token_count=4)
    assert decode_generated_step(through_bytes(encode_generated_step(step))) == step
    first = GeneratedStep(token_ids=(3,), token_bytes=b"a", finish_reason=None, prompt_token_count=4, rendered_prompt="p")
    assert decode_generated_step(through_bytes(encode_generated_step(first))) == first
    stopped = GeneratedStep(token_ids=(3,), token_bytes=b"a", finish_reason=FinishReason.STOP, prompt_token_count=4)
    assert decode_generated_step(through_bytes(encode_generated_step(stopped))) == stopped


@pytest.mark.parametrize("probability", [-0.1, 1.5, math.nan, math.inf])
def test_bad_probability_is_refused_both_ways(probability: float) -> None:
    with pytest.raises(WireFormatError):
        encode_proposal(DraftProposal(tokens=(DraftToken(b"a", ((b"a", probability),)),)))
    draft = pb.Draft(tokens=[pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a"], top_k_probs=[probability])])
    with pytest.raises(WireFormatError, match="finite number in"):
        decode_proposal(draft)


def test_mismatched_top_k_lengths_are_refused() -> None:
    draft = pb.Draft(tokens=[pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a", b"b"], top_k_probs=[0.5])])
    with pytest.raises(WireFormatError, match="2 top-k tokens but 1 probabilities"):
        decode_proposal(draft)


@pytest.mark.parametrize("settings, error", [
    (pb.DecodingSettings(mode=9, temperature=1.0, top_p=1.0, rule=pb.ACCEPTANCE_RULE_POINT_MASS), WireFormatError),
    (pb.DecodingSettings(mode=pb.DECODE_MODE_UNSPECIFIED, temperature=1.0, top_p=1.0, rule=1), WireFormatError),
    (pb.DecodingSettings(mode=pb.DECODE_MODE_GREEDY, temperature=1.0, top_p=1.0, rule=0), WireFormatError),
    (pb.DecodingSettings(mode=pb.DECODE_MODE_SAMPLE, temperature=0.0, top_p=1.0, rule=1), DecodingConfigError),
    (pb.DecodingSettings(mode=pb.DECODE_MODE_SAMPLE, temperature=1.0, top_p=1.0, top_k=-1, rule=1), DecodingConfigError),
    (pb.DecodingSettings(mode=pb.DECODE_MODE_SAMPLE, temperature=math.nan, top_p=1.0, rule=1), DecodingConfigError),
])
def test_bad_decoding_settings_are_refused(settings, error) -> None:
    with pytest.raises(error):
        decode_decoding(settings)


def test_inconsistent_messages_are_refused() -> None:
    with pytest.raises(WireFormatError, match="contradicts"):
        decode_round(pb.RoundResult(finished=True))
    with pytest.raises(WireFormatError, match="contradicts"):
        decode_generated_step(pb.GenerateResponse(finished=False, finish_reason=pb.FINISH_REASON_EOS))
    with pytest.raises(WireFormatError, match="accepted ids of only"):
        decode_round(pb.RoundResult(accepted_ids=[1, 2], proposed_count=1))
    with pytest.raises(WireFormatError, match="vocab_size"):
        decode_session_request(pb.OpenSession(draft_tokenizer=pb.DraftTokenizer(vocab_size=3), draft_vocab_bytes=[b"a"],
                                              decoding=encode_decoding(DecodingConfig())))
    with pytest.raises(WireFormatError, match="milliseconds"):
        decode_round(pb.RoundResult(verify_ms=math.nan))
    with pytest.raises(WireFormatError, match="milliseconds"):
        decode_round(pb.RoundResult(verify_ms=-1.0))
    with pytest.raises(WireFormatError, match="prefix"):
        encode_round(ServedRound(RoundOutcome((1,), 2, b"ab", 1, 1, False), accepted_bytes=b"x", finish_reason=None))


def test_out_of_range_values_are_refused_when_encoding() -> None:
    with pytest.raises(DecodingConfigError, match="seed"):  # a seed the wire's uint64 cannot carry never gets that far
        DecodingConfig(seed=-1)
    with pytest.raises(WireFormatError, match="resume_target_ids"):
        encode_session_request(SessionRequest(prompt="x", config=DecodingConfig(), max_new_tokens=1,
                                              draft_tokenizer=DraftTokenizerInfo("d", "f", 1), resume_target_ids=(-3,)))
