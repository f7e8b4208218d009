"""The edge's gRPC session with the verifier: draft, send, await the verdict, re-sync, repeat.

The network shell around the drafter (edge_client.drafter): one Speculate stream per
generation, plus the target-only Generate baseline; a lost stream is opened again, resuming
from the ids the edge holds (it owns the transcript), as edge_client.retry schedules.
Committed text streams out as it arrives, whole characters only, tagged by origin (accepted
draft vs the target's own tokens) and cut before the first stop sequence. Imports onnxruntime
and grpc; never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

import grpc

from edge_client.committed_text import CommittedText, Origin, TextPiece, cut_at_stop
from edge_client.draft_length import DraftLengthPolicy
from edge_client.draft_runtime import DraftRuntime
from edge_client.drafter import Drafter
from edge_client.retry import RetryPolicy, retry_delay_s
from edge_client.speculation import RoundRecord, RoundsView, SpeculationSettings, on_drafter_thread, run_speculation
from shared.channel_security import ChannelSecurity, open_channel
from shared.decoding import DecodingConfig
from shared.errors import UserFacingError
from shared.proposal import DraftProposal
from shared.vocab import Vocab
from shared.wire import (
    RETRY_AFTER_MS_KEY,
    ROUTING_KEY,
    ChatMessage,
    DraftTokenizerInfo,
    FinishReason,
    GeneratedStep,
    GenerationRequest,
    ServedRound,
    SessionInfo,
    SessionRequest,
    decode_generated_step,
    decode_round,
    decode_session_info,
    encode_generation_request,
    encode_proposal,
    encode_session_request,
)
from specbridge.v1 import specbridge_pb2 as pb
from specbridge.v1 import specbridge_pb2_grpc

# A verifier that vanished without closing (a dropped NAT entry, a dead host) shows within 40 s as a lost
# connection, which the client resumes from; the verifier allows pings this often (its --keepalive-s / 2).
KEEPALIVE_OPTIONS = (("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000))
TextSink = Callable[[str], None]
PieceSink = Callable[[TextPiece], None]
Attempt = TypeVar("Attempt")
# Failures after which a new session, resuming the transcript, may well succeed: the connection or the verifier was
# lost, or a full verifier said when to come back (RESOURCE_EXHAUSTED without that hint is a request over a limit).
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})


class EdgeClientError(UserFacingError):
    """The verifier cannot be reached or refused the session; the message is one line.

    `retryable`: a new session may succeed, after `retry_after_ms` when the verifier named a wait.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, *, retryable: bool = False,
                 retry_after_ms: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class EdgeDraft:
    """An exported draft model and its vocabulary, loaded once and reused by successive sessions."""

    runtime: DraftRuntime
    vocab: Vocab
    onnx_dir: Path
    variant: str
    threads: int | None

    @property
    def tokenizer_info(self) -> DraftTokenizerInfo:
        return DraftTokenizerInfo(name=Path(self.vocab.tokenizer.name_or_path).name, family=self.vocab.family.value,
                                  vocab_size=self.vocab.size)

    def fork(self) -> EdgeDraft:
        """A draft for another concurrent session: its own KV cache and its own tokenizer; the same loaded
        weights and byte table.

        A tokenizer must not be shared across threads: each call may flip its special-token mode.
        """
        vocab = replace(self.vocab, tokenizer=copy.deepcopy(self.vocab.tokenizer))
        return EdgeDraft(self.runtime.fork(), vocab, self.onnx_dir, self.variant, self.threads)


def load_edge_draft(onnx_dir: str | Path, *, variant: str = "fp32", threads: int | None = None) -> EdgeDraft:
    onnx_dir = Path(onnx_dir)
    return EdgeDraft(DraftRuntime.load(onnx_dir, variant=variant, threads=threads), Vocab.from_pretrained(onnx_dir),
                     onnx_dir, variant, threads)


@dataclass(frozen=True)
class ClientResult(RoundsView):
    """One generation as the edge saw it. Per-response lists cover this call only."""

    output_bytes: bytes  # the whole output, resumed part included
    target_token_ids: tuple[int, ...]  # the whole output in target ids, resumed ones included
    prompt_token_count: int
    finish_reason: FinishReason
    wall_ms: float
    arrival_ms: tuple[float, ...]  # when each response arrived, from the start of the call
    committed_per_response: tuple[int, ...]  # target tokens each response committed
    speculation_rounds: tuple[RoundRecord, ...] = ()  # speculative only: each round as the edge saw it
    stop: tuple[str, ...] = ()  # the call's stop sequences
    rendered_prompt: str = ""  # the text the target read: the prompt, or the chat its template rendered
    reconnects: int = 0  # sessions opened again, resuming the transcript, after a lost connection or a full verifier

    @property
    def text(self) -> str:
        """The output, ending before the first stop sequence that appeared (the committed ids may run past it)."""
        return cut_at_stop(self.output_bytes.decode("utf-8", errors="replace"), self.stop)

    @property
    def rounds(self) -> int:
        return len(self.arrival_ms)

    @property
    def accepted_prediction_tokens(self) -> int:
        """Target tokens of the draft's proposals the target accepted (OpenAI's predicted-outputs name)."""
        return sum(self.accepted_per_round)

    @property
    def rejected_prediction_tokens(self) -> int:
        """Target tokens of the draft's proposals the target rejected."""
        return sum(self.proposed_per_round) - self.accepted_prediction_tokens

    def summary(self) -> dict:
        """JSON-ready: everything but the raw bytes, plus the text and the round count."""
        values = {item.name: getattr(self, item.name) for item in fields(self)
                  if item.name not in ("output_bytes", "speculation_rounds")}
        return {"text": self.text, "rounds": self.rounds, **values, "finish_reason": self.finish_reason.value,
                "accepted_per_round": self.accepted_per_round, "proposed_per_round": self.proposed_per_round,
                "speculation_rounds": [asdict(record) for record in self.speculation_rounds]}


@dataclass
class _Transcript:
    """What a call accumulates while responses arrive."""

    started: float
    on_text: TextSink | None
    on_piece: PieceSink | None
    text: CommittedText
    output_bytes: bytes = b""
    target_token_ids: list[int] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    reconnects: int = 0

    def add(self, ids: Sequence[int], parts: Sequence[tuple[bytes, Origin]]) -> None:
        """One response: its new ids, and their bytes by origin."""
        self.arrival_ms.append(_ms_since(self.started))
        self.committed.append(len(ids))
        self.target_token_ids.extend(ids)
        for data, origin in parts:
            self.output_bytes += data
            self._show(self.text.push(data, origin))

    def finish(self) -> None:
        self._show(self.text.finish())

    def _show(self, pieces: list[TextPiece]) -> None:
        for piece in pieces:
            if self.on_text is not None:
                self.on_text(piece.text)
            if self.on_piece is not None:
                self.on_piece(piece)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def session_request(draft: EdgeDraft, prompt: str, config: DecodingConfig, *, max_new_tokens: int,
                    resume_target_ids: Sequence[int] = (), messages: Sequence[ChatMessage] = ()) -> SessionRequest:
    """What opens a speculative session; the draft_probs rule also sends the draft vocabulary's bytes."""
    return SessionRequest(prompt=prompt, config=config, max_new_tokens=max_new_tokens,
                          draft_tokenizer=draft.tokenizer_info, resume_target_ids=tuple(resume_target_ids),
                          draft_vocab_bytes=draft.vocab.token_bytes if config.uses_draft_probs else None,
                          messages=tuple(messages))


class VerifierClient:
    """A channel to one verifier; use as `async with VerifierClient("host:port") as client:`."""

    def __init__(self, address: str, security: ChannelSecurity = ChannelSecurity(),
                 retry: RetryPolicy = RetryPolicy()) -> None:
        """`security`: TLS (a custom CA, a client certificate for mutual TLS) and the bearer token; plaintext by default.
        `retry`: how a lost session is resumed (edge_client.retry)."""
        self.address = address
        # gRPC's own reconnect backoff (1 s growing to 120 s) would outlast the retry policy's after an outage.
        reconnect = (("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff_ms)),
                     ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff_ms)))
        self._channel = open_channel(address, security, KEEPALIVE_OPTIONS + reconnect)
        self._stub = specbridge_pb2_grpc.VerifierStub(self._channel)
        self.retry = retry

    async def __aenter__(self) -> VerifierClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()

    def _error(self, error: grpc.aio.AioRpcError) -> EdgeClientError:
        code = error.code()
        retry_after_ms = _retry_after_ms(error)
        retryable = (code in RETRYABLE_CODES or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms is not None)
                     or _reset_by_proxy(error))
        if code is grpc.StatusCode.UNAVAILABLE:
            return EdgeClientError(f"cannot reach verifier at {self.address} (UNAVAILABLE)", code, retryable=retryable)
        details = (error.details() or "").strip().splitlines()
        return EdgeClientError(f"verifier at {self.address} answered {code.name}: {details[0] if details else ''}", code,
                               retryable=retryable, retry_after_ms=retry_after_ms)

    async def stats(self) -> pb.VerifierStats:
        try:
            return await self._stub.GetStats(pb.GetStatsRequest())
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None

    async def speculate(self, draft: EdgeDraft, prompt: str, config: DecodingConfig, *, max_new_tokens: int,
                        draft_len: int | None = None, draft_ahead: bool = True, on_text: TextSink | None = None,
                        on_piece: PieceSink | None = None, messages: Sequence[ChatMessage] = (),
                        stop: Sequence[str] = (), resume_target_ids: Sequence[int] = (), resume_bytes: bytes = b"",
                        top_k_size: int = 8) -> ClientResult:
        """Speculative generation; `draft_len` None adapts it to the network each round; `messages` (chat) are
        rendered by the verifier and replace `prompt`; the session ends as soon as a `stop` sequence appears;
        resume_* continue a transcript an earlier call returned (ids and their bytes). A lost session is resumed
        from the ids committed so far, as the retry policy allows."""
        settings = SpeculationSettings(draft_len=draft_len, policy=DraftLengthPolicy(draft_ahead=draft_ahead))
        transcript = _Transcript(started=time.perf_counter(), on_text=on_text, on_piece=on_piece,
                                 text=CommittedText(stop, shown=resume_bytes), output_bytes=resume_bytes,
                                 target_token_ids=list(resume_target_ids))
        records: list[RoundRecord] = []  # every attempt's rounds

        async def verify_on(call: grpc.aio.StreamStreamCall, proposal: DraftProposal) -> ServedRound:
            await _write(call, pb.SpeculateRequest(draft=encode_proposal(proposal)))
            served = decode_round((await self._read(call, "round")).round)
            outcome = served.outcome
            transcript.add(outcome.new_ids, ((served.accepted_bytes, Origin.DRAFT),
                                             (outcome.committed_bytes[len(served.accepted_bytes) :], Origin.TARGET)))
            if transcript.text.stopped:  # the output ends at the stop sequence: this verdict is the last
                return replace(served, outcome=replace(outcome, finished=True), finish_reason=FinishReason.STOP)
            return served

        async def session() -> tuple[ServedRound, SessionInfo, str]:
            """One verifier session from the transcript so far to the end, or to a failure."""
            request = session_request(draft, prompt, config, max_new_tokens=max_new_tokens,
                                      resume_target_ids=transcript.target_token_ids, messages=messages)
            call = self._stub.Speculate(metadata=_call_metadata(prompt, messages))
            try:
                await _write(call, pb.SpeculateRequest(open=encode_session_request(request)))
                info = decode_session_info((await self._read(call, "opened")).opened)
                draft_prompt = self._rendered_prompt(prompt, messages, info.rendered_prompt)
                drafter = Drafter(draft.runtime, draft.vocab, top_k_size=top_k_size,
                                  shared_ids=info.shared_draft_ids if config.uses_draft_probs else None)
                # run_speculation has stopped its draft-ahead thread before it returns or raises: the drafter is ours.
                await on_drafter_thread(_start_drafter, drafter, draft_prompt, config.seed, transcript.output_bytes)
                last, _ = await run_speculation(drafter, lambda proposal: verify_on(call, proposal), config, settings,
                                                on_round=records.append)
                with contextlib.suppress(grpc.aio.AioRpcError):  # the last verdict is in: a connection lost now loses nothing
                    await call.done_writing()
            except grpc.aio.AioRpcError as error:
                raise self._error(error) from None
            finally:
                call.cancel()  # no-op once the call completed; otherwise frees the server's session now
            return last, info, draft_prompt

        last, info, draft_prompt = await self._resuming(session, transcript)
        transcript.finish()
        return ClientResult(output_bytes=transcript.output_bytes, target_token_ids=tuple(transcript.target_token_ids),
                            prompt_token_count=info.prompt_token_count, finish_reason=last.finish_reason,
                            wall_ms=_ms_since(transcript.started), arrival_ms=tuple(transcript.arrival_ms),
                            committed_per_response=tuple(transcript.committed), speculation_rounds=tuple(records),
                            stop=tuple(stop), rendered_prompt=draft_prompt, reconnects=transcript.reconnects)

    async def generate(self, prompt: str, config: DecodingConfig, *, max_new_tokens: int,
                       on_text: TextSink | None = None, on_piece: PieceSink | None = None,
                       messages: Sequence[ChatMessage] = (), stop: Sequence[str] = ()) -> ClientResult:
        """Target-only generation on the verifier (the baseline): one response per target step. A lost stream is
        resumed from the ids received so far, as the retry policy allows."""
        transcript = _Transcript(started=time.perf_counter(), on_text=on_text, on_piece=on_piece,
                                 text=CommittedText(stop))

        async def stream() -> tuple[GeneratedStep, str]:
            """One target-only stream from the transcript so far to the end, or to a failure."""
            request = GenerationRequest(prompt=prompt, config=config, max_new_tokens=max_new_tokens,
                                        messages=tuple(messages), resume_target_ids=tuple(transcript.target_token_ids))
            call = self._stub.Generate(encode_generation_request(request), metadata=_call_metadata(prompt, messages))
            step = None
            rendered_prompt = None
            try:
                async for response in call:
                    step = decode_generated_step(response)
                    if rendered_prompt is None:
                        rendered_prompt = self._rendered_prompt(prompt, messages, step.rendered_prompt)
                    transcript.add(step.token_ids, ((step.token_bytes, Origin.TARGET),))
                    if transcript.text.stopped:
                        step = replace(step, finish_reason=FinishReason.STOP)
                        break
            except grpc.aio.AioRpcError as error:
                raise self._error(error) from None
            finally:
                call.cancel()
            if step is None or step.finish_reason is None:
                raise EdgeClientError(f"verifier at {self.address} ended the generation before it finished", retryable=True)
            return step, rendered_prompt

        step, rendered_prompt = await self._resuming(stream, transcript)
        transcript.finish()
        return ClientResult(output_bytes=transcript.output_bytes, target_token_ids=tuple(transcript.target_token_ids),
                            prompt_token_count=step.prompt_token_count, finish_reason=step.finish_reason,
                            wall_ms=_ms_since(transcript.started), arrival_ms=tuple(transcript.arrival_ms),
                            committed_per_response=tuple(transcript.committed), stop=tuple(stop),
                            rendered_prompt=rendered_prompt, reconnects=transcript.reconnects)

    async def _resuming(self, attempt: Callable[[], Awaitable[Attempt]], transcript: _Transcript) -> Attempt:
        """`attempt` (one session, resuming `transcript`) until one ends; after a retryable failure, another after the
        policy's backoff. An attempt that commits tokens resets the count of retries in a row."""
        rng = random.Random()
        retries_in_a_row = 0
        while True:
            committed_before = len(transcript.target_token_ids)
            try:
                return await attempt()
            except EdgeClientError as error:
                if len(transcript.target_token_ids) > committed_before:
                    retries_in_a_row = 0
                if not error.retryable or retries_in_a_row >= self.retry.max_retries:
                    if retries_in_a_row:
                        raise EdgeClientError(f"{error}, still after {retries_in_a_row} retries", error.code) from None
                    raise
                delay_s = retry_delay_s(self.retry, retries_in_a_row, rng, error.retry_after_ms)
            await asyncio.sleep(delay_s)
            retries_in_a_row += 1
            transcript.reconnects += 1

    def _rendered_prompt(self, prompt: str, messages: Sequence[ChatMessage], rendered: str) -> str:
        """The text the target reads, as the verifier told it (a verifier before chat tells nothing)."""
        if messages and not rendered:
            raise EdgeClientError(f"verifier at {self.address} predates chat messages (protocol revision 1): "
                                  f"send a prompt instead")
        return rendered or prompt

    async def _read(self, call: grpc.aio.StreamStreamCall, kind: str) -> pb.SpeculateResponse:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise EdgeClientError(f"verifier at {self.address} ended the session before it finished", retryable=True)
        if response.WhichOneof("kind") != kind:
            raise EdgeClientError(f"verifier at {self.address} sent '{response.WhichOneof('kind')}' where '{kind}' was due")
        return response


def routing_key(prompt: str, messages: Sequence[ChatMessage]) -> str:
    """The ROUTING_KEY value of a call: a hash of how its conversation opens, the chat up to its first user turn
    (every later turn repeats those), or else the prompt; the same for every resume of the transcript."""
    user_turns = [index for index, message in enumerate(messages) if message.role == "user"]
    opening = messages[: user_turns[0] + 1] if user_turns else messages
    text = json.dumps([[message.role, message.content] for message in opening]) if messages else prompt
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


async def _write(call: grpc.aio.StreamStreamCall, request: pb.SpeculateRequest) -> None:
    """`call.write`, failing with the call's own status once the call has ended (gRPC says only that it has), and as
    UNAVAILABLE where the connection drops under the write (gRPC says INTERNAL: a server's errors come with reads)."""
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        raise grpc.aio.AioRpcError(await call.code(), await call.initial_metadata(), await call.trailing_metadata(),
                                   await call.details()) from None
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.INTERNAL:
            raise
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, error.initial_metadata(), error.trailing_metadata(),
                                   f"the connection dropped during a write ({error.details()})") from None


def _call_metadata(prompt: str, messages: Sequence[ChatMessage]) -> tuple[tuple[str, str], ...]:
    return ((ROUTING_KEY, routing_key(prompt, messages)),)


def _reset_by_proxy(error: grpc.aio.AioRpcError) -> bool:
    """A proxy in front of the verifier (nginx, deploy/nginx) that loses it mid-stream resets the stream with HTTP/2
    INTERNAL_ERROR, which grpc reports as INTERNAL, not UNAVAILABLE: the session is lost all the same."""
    return error.code() is grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or "")


def _retry_after_ms(error: grpc.aio.AioRpcError) -> float | None:
    """The verifier's hint of when a retry may find room, if it gave one."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_MS_KEY and isinstance(value, str) and value.isdigit():
            return float(value)
    return None


def _start_drafter(drafter: Drafter, prompt: str, seed: int | None, resume_bytes: bytes) -> None:
    drafter.start(prompt, seed)
    if resume_bytes:
        drafter.commit(resume_bytes)
