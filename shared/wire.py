"""Codecs between the specbridge.v1 protobuf messages and the records both sides compute with.

The wire stage of the pipeline: the edge client and the verifier's servicer convert here and
nowhere else. Pure functions; malformed input raises WireFormatError (INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.errors import UserFacingError
from shared.proposal import DraftProposal, DraftToken, RoundOutcome
from specbridge.v1 import specbridge_pb2 as pb

UINT32_MAX = 2**32 - 1
# gRPC metadata beside the messages. RESOURCE_EXHAUSTED carries RETRY_AFTER_MS_KEY (trailing, milliseconds) when
# waiting may help (a full verifier), and not when the request itself is too large. Every Speculate and Generate
# call carries ROUTING_KEY, the same for every resume of one transcript and every turn of one conversation, so a
# load balancer hashing it (nginx `hash $http_x_specbridge_session consistent`) keeps the conversation on the
# replica that holds its prefix.
RETRY_AFTER_MS_KEY = "retry-after-ms"
ROUTING_KEY = "x-specbridge-session"

Member = TypeVar("Member", bound=Enum)


class WireFormatError(UserFacingError, ValueError):
    """A message that does not decode to a valid record (or a record that cannot be encoded)."""


class FinishReason(Enum):
    EOS = "eos"
    LENGTH = "length"  # the max_new_tokens budget is spent
    STOP = "stop"  # a stop sequence appeared in the committed text (the edge decides this one)


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; the verifier renders a list of them with the target's own chat template."""

    role: str
    content: str


@dataclass(frozen=True)
class DraftTokenizerInfo:
    name: str
    family: str
    vocab_size: int


@dataclass(frozen=True)
class SessionRequest:
    """What opens a speculative session."""

    prompt: str
    config: DecodingConfig
    max_new_tokens: int  # the whole output's budget, resumed ids included
    draft_tokenizer: DraftTokenizerInfo
    resume_target_ids: tuple[int, ...] = ()
    draft_vocab_bytes: tuple[bytes, ...] | None = None  # only for the draft_probs rule
    messages: tuple[ChatMessage, ...] = ()  # chat: used instead of `prompt` when given


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    prompt_token_count: int
    target_model: str
    shared_draft_ids: tuple[int, ...] = ()
    rendered_prompt: str = ""  # the text the target reads; empty from a verifier before chat (revision 1)


@dataclass(frozen=True)
class ServedRound:
    """A RoundOutcome as served: where the correction starts in its bytes, and why it finished."""

    outcome: RoundOutcome
    accepted_bytes: bytes  # the prefix of outcome.committed_bytes the accepted ids contribute
    finish_reason: FinishReason | None
    verify_ms: float = 0.0  # the verifier's own time on the round (arrival to answer)


@dataclass(frozen=True)
class GenerationRequest:
    """What starts a target-only generation."""

    prompt: str
    config: DecodingConfig
    max_new_tokens: int  # the whole output's budget, resumed ids included
    messages: tuple[ChatMessage, ...] = ()  # chat: used instead of `prompt` when given
    resume_target_ids: tuple[int, ...] = ()  # output ids an interrupted stream already delivered


@dataclass(frozen=True)
class GeneratedStep:
    token_ids: tuple[int, ...]
    token_bytes: bytes
    finish_reason: FinishReason | None
    prompt_token_count: int
    rendered_prompt: str = ""  # the text the target reads, on the first step only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_MODES = {DecodeMode.GREEDY: pb.DECODE_MODE_GREEDY, DecodeMode.SAMPLE: pb.DECODE_MODE_SAMPLE}
_RULES = {
    AcceptanceRule.POINT_MASS: pb.ACCEPTANCE_RULE_POINT_MASS,
    AcceptanceRule.DRAFT_PROBS: pb.ACCEPTANCE_RULE_DRAFT_PROBS,
    AcceptanceRule.DTW_TRANSFER_APPROX: pb.ACCEPTANCE_RULE_DTW_TRANSFER_APPROX,
}
_FINISH_REASONS = {FinishReason.EOS: pb.FINISH_REASON_EOS, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
                   FinishReason.STOP: pb.FINISH_REASON_STOP}


def _from_wire_enum(table: dict[Member, int], value: int, what: str) -> Member:
    for member, number in table.items():
        if number == value:
            return member
    raise WireFormatError(f"unknown {what} {value}")


def _check_range(name: str, value: int, maximum: int) -> int:
    if not 0 <= value <= maximum:
        raise WireFormatError(f"{name} must lie in [0, {maximum}], got {value}")
    return value


def _check_ids(name: str, ids: tuple[int, ...]) -> tuple[int, ...]:
    for token_id in ids:
        _check_range(name, token_id, UINT32_MAX)
    return ids


def _check_probability(probability: float) -> float:
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise WireFormatError(f"a top-k probability must be a finite number in [0, 1], got {probability}")
    return probability


def _check_duration_ms(duration_ms: float) -> float:
    if not (math.isfinite(duration_ms) and duration_ms >= 0.0):
        raise WireFormatError(f"a duration must be a finite number of milliseconds >= 0, got {duration_ms}")
    return duration_ms


def _check_vocab_bytes(vocab_bytes: tuple[bytes, ...] | None, info: DraftTokenizerInfo) -> tuple[bytes, ...] | None:
    if vocab_bytes is not None and len(vocab_bytes) != info.vocab_size:
        raise WireFormatError(f"{len(vocab_bytes)} draft vocabulary entries for a vocab_size of {info.vocab_size}")
    return vocab_bytes


def _finish_reason_to_wire(reason: FinishReason | None, finished: bool) -> int:
    if (reason is not None) != finished:
        raise WireFormatError(f"finish reason {reason} contradicts finished={finished}")
    return _FINISH_REASONS[reason] if reason is not None else pb.FINISH_REASON_UNSPECIFIED


def _finish_reason_from_wire(value: int, finished: bool) -> FinishReason | None:
    reason = None if value == pb.FINISH_REASON_UNSPECIFIED else _from_wire_enum(_FINISH_REASONS, value, "finish reason")
    if (reason is not None) != finished:
        raise WireFormatError(f"finish reason {value} contradicts finished={finished}")
    return reason


def encode_messages(messages: Sequence[ChatMessage]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=message.role, content=message.content) for message in messages]


def decode_messages(messages: Sequence[pb.ChatMessage]) -> tuple[ChatMessage, ...]:
    for position, message in enumerate(messages):
        if not message.role:
            raise WireFormatError(f"chat message {position} has no role")
    return tuple(ChatMessage(role=message.role, content=message.content) for message in messages)


def encode_decoding(config: DecodingConfig) -> pb.DecodingSettings:
    settings = pb.DecodingSettings(mode=_MODES[config.mode], temperature=config.temperature, top_k=config.top_k,
                                   top_p=config.top_p, rule=_RULES[config.rule])
    if config.seed is not None:
        settings.seed = config.seed  # DecodingConfig holds it to uint64
    return settings


def decode_decoding(settings: pb.DecodingSettings) -> DecodingConfig:
    """Raises DecodingConfigError for values out of range, WireFormatError for unknown enums."""
    return DecodingConfig(
        mode=_from_wire_enum(_MODES, settings.mode, "decode mode"),
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=settings.seed if settings.HasField("seed") else None,
        rule=_from_wire_enum(_RULES, settings.rule, "acceptance rule"),
    )


def encode_proposal(proposal: DraftProposal) -> pb.Draft:
    return pb.Draft(
        tokens=[pb.DraftToken(token_bytes=token.token_bytes, top_k_bytes=[data for data, _ in token.top_k],
                              top_k_probs=[_check_probability(p) for _, p in token.top_k])
                for token in proposal.tokens],
        ends_with_eos=proposal.ends_with_eos,
    )


def decode_proposal(draft: pb.Draft) -> DraftProposal:
    tokens = []
    for position, token in enumerate(draft.tokens):
        if len(token.top_k_bytes) != len(token.top_k_probs):
            raise WireFormatError(f"draft token {position}: {len(token.top_k_bytes)} top-k tokens but "
                                  f"{len(token.top_k_probs)} probabilities")
        top_k = tuple((data, _check_probability(p)) for data, p in zip(token.top_k_bytes, token.top_k_probs))
        tokens.append(DraftToken(token_bytes=token.token_bytes, top_k=top_k))
    return DraftProposal(tokens=tuple(tokens), ends_with_eos=draft.ends_with_eos)


def encode_session_request(request: SessionRequest) -> pb.OpenSession:
    info = request.draft_tokenizer
    return pb.OpenSession(
        prompt=request.prompt,
        decoding=encode_decoding(request.config),
        max_new_tokens=_check_range("max_new_tokens", request.max_new_tokens, UINT32_MAX),
        draft_tokenizer=pb.DraftTokenizer(name=info.name, family=info.family,
                                          vocab_size=_check_range("vocab_size", info.vocab_size, UINT32_MAX)),
        resume_target_ids=_check_ids("resume_target_ids", request.resume_target_ids),
        draft_vocab_bytes=_check_vocab_bytes(request.draft_vocab_bytes, info) or (),
        messages=encode_messages(request.messages),
    )


def decode_session_request(message: pb.OpenSession) -> SessionRequest:
    info = DraftTokenizerInfo(name=message.draft_tokenizer.name, family=message.draft_tokenizer.family,
                              vocab_size=message.draft_tokenizer.vocab_size)
    return SessionRequest(
        prompt=message.prompt,
        config=decode_decoding(message.decoding),
        max_new_tokens=message.max_new_tokens,
        draft_tokenizer=info,
        resume_target_ids=tuple(message.resume_target_ids),
        draft_vocab_bytes=_check_vocab_bytes(tuple(message.draft_vocab_bytes) or None, info),
        messages=decode_messages(message.messages),
    )


def encode_session_info(info: SessionInfo) -> pb.SessionOpened:
    return pb.SessionOpened(session_id=info.session_id, prompt_token_count=info.prompt_token_count,
                            target_model=info.target_model,
                            shared_draft_ids=_check_ids("shared_draft_ids", info.shared_draft_ids),
                            rendered_prompt=info.rendered_prompt)


def decode_session_info(message: pb.SessionOpened) -> SessionInfo:
    return SessionInfo(session_id=message.session_id, prompt_token_count=message.prompt_token_count,
                       target_model=message.target_model, shared_draft_ids=tuple(message.shared_draft_ids),
                       rendered_prompt=message.rendered_prompt)


def encode_round(served: ServedRound) -> pb.RoundResult:
    outcome = served.outcome
    if not outcome.committed_bytes.startswith(served.accepted_bytes):
        raise WireFormatError("the accepted bytes are not a prefix of the committed bytes")
    result = pb.RoundResult(
        accepted_bytes=served.accepted_bytes,
        correction_bytes=outcome.committed_bytes[len(served.accepted_bytes) :],
        accepted_ids=_check_ids("accepted_ids", outcome.accepted_ids),
        proposed_count=outcome.proposed_count,
        draft_tokens_accepted=outcome.draft_tokens_accepted,
        finished=outcome.finished,
        finish_reason=_finish_reason_to_wire(served.finish_reason, outcome.finished),
        verify_ms=_check_duration_ms(served.verify_ms),
    )
    if outcome.next_id is not None:
        result.correction_id = _check_range("correction_id", outcome.next_id, UINT32_MAX)
    return result


def decode_round(result: pb.RoundResult) -> ServedRound:
    if len(result.accepted_ids) > result.proposed_count:
        raise WireFormatError(f"{len(result.accepted_ids)} accepted ids of only {result.proposed_count} proposed")
    outcome = RoundOutcome(
        accepted_ids=tuple(result.accepted_ids),
        next_id=result.correction_id if result.HasField("correction_id") else None,
        committed_bytes=result.accepted_bytes + result.correction_bytes,
        proposed_count=result.proposed_count,
        draft_tokens_accepted=result.draft_tokens_accepted,
        finished=result.finished,
    )
    return ServedRound(outcome=outcome, accepted_bytes=result.accepted_bytes,
                       finish_reason=_finish_reason_from_wire(result.finish_reason, result.finished),
                       verify_ms=_check_duration_ms(result.verify_ms))


def encode_generation_request(request: GenerationRequest) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=request.prompt, decoding=encode_decoding(request.config),
                              max_new_tokens=_check_range("max_new_tokens", request.max_new_tokens, UINT32_MAX),
                              messages=encode_messages(request.messages),
                              resume_target_ids=_check_ids("resume_target_ids", request.resume_target_ids))


def decode_generation_request(message: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(prompt=message.prompt, config=decode_decoding(message.decoding),
                             max_new_tokens=message.max_new_tokens, messages=decode_messages(message.messages),
                             resume_target_ids=tuple(message.resume_target_ids))


def encode_generated_step(step: GeneratedStep) -> pb.GenerateResponse:
    return pb.GenerateResponse(token_ids=_check_ids("token_ids", step.token_ids), token_bytes=step.token_bytes,
                               finished=step.finished,
                               finish_reason=_finish_reason_to_wire(step.finish_reason, step.finished),
                               prompt_token_count=step.prompt_token_count, rendered_prompt=step.rendered_prompt)


def decode_generated_step(message: pb.GenerateResponse) -> GeneratedStep:
    return GeneratedStep(token_ids=tuple(message.token_ids), token_bytes=message.token_bytes,
                         finish_reason=_finish_reason_from_wire(message.finish_reason, message.finished),
                         prompt_token_count=message.prompt_token_count, rendered_prompt=message.rendered_prompt)
