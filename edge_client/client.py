"""The edge's gRPC session with the verifier: draft, send, await the verdict, re-sync, repeat.

The network shell around the drafter (edge_client.drafter): one Speculate stream per
generation, plus the target-only Generate baseline. Committed text streams out as it arrives,
whole characters only, tagged by origin (accepted draft vs the target's own tokens) and cut
before the first stop sequence. Imports onnxruntime and grpc; never torch.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import grpc

from edge_client.committed_text import CommittedText, Origin, TextPiece, cut_at_stop
from edge_client.draft_runtime import DraftRuntime
from edge_client.draft_length import DraftLengthPolicy
from edge_client.drafter import Drafter
from edge_client.speculation import RoundRecord, RoundsView, SpeculationSettings, run_speculation
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal
from shared.vocab import Vocab
from shared.wire import (
    ChatMessage,
    DraftTokenizerInfo,
    FinishReason,
    GenerationRequest,
    ServedRound,
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

TextSink = Callable[[str], None]
PieceSink = Callable[[TextPiece], None]


class EdgeClientError(Exception):
    """The verifier cannot be reached or refused the session; the message is one line."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


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

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = specbridge_pb2_grpc.VerifierStub(self._channel)

    async def __aenter__(self) -> VerifierClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()

    def _error(self, error: grpc.aio.AioRpcError) -> EdgeClientError:
        code = error.code()
        if code is grpc.StatusCode.UNAVAILABLE:
            return EdgeClientError(f"cannot reach verifier at {self.address} (UNAVAILABLE)", code)
        details = (error.details() or "").strip().splitlines()
        return EdgeClientError(f"verifier at {self.address} answered {code.name}: {details[0] if details else ''}", code)

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
        resume_* continue a transcript an earlier call returned (ids and their bytes)."""
        settings = SpeculationSettings(draft_len=draft_len, policy=DraftLengthPolicy(draft_ahead=draft_ahead))
        request = session_request(draft, prompt, config, max_new_tokens=max_new_tokens,
                                  resume_target_ids=resume_target_ids, messages=messages)
        transcript = _Transcript(started=time.perf_counter(), on_text=on_text, on_piece=on_piece,
                                 text=CommittedText(stop, shown=resume_bytes), output_bytes=resume_bytes,
                                 target_token_ids=list(resume_target_ids))
        call = self._stub.Speculate()

        async def verify(proposal: DraftProposal) -> ServedRound:
            await call.write(pb.SpeculateRequest(draft=encode_proposal(proposal)))
            served = decode_round((await self._read(call, "round")).round)
            outcome = served.outcome
            transcript.add(outcome.new_ids, ((served.accepted_bytes, Origin.DRAFT),
                                             (outcome.committed_bytes[len(served.accepted_bytes) :], Origin.TARGET)))
            if transcript.text.stopped:  # the output ends at the stop sequence: this verdict is the last
                return replace(served, outcome=replace(outcome, finished=True), finish_reason=FinishReason.STOP)
            return served

        try:
            await call.write(pb.SpeculateRequest(open=encode_session_request(request)))
            info = decode_session_info((await self._read(call, "opened")).opened)
            draft_prompt = self._rendered_prompt(prompt, messages, info.rendered_prompt)
            drafter = Drafter(draft.runtime, draft.vocab, top_k_size=top_k_size,
                              shared_ids=info.shared_draft_ids if config.uses_draft_probs else None)
            await asyncio.to_thread(_start_drafter, drafter, draft_prompt, config.seed, resume_bytes)
            last, records = await run_speculation(drafter, verify, config, settings)
            await call.done_writing()
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()  # no-op once the call completed; otherwise frees the server's session now
        transcript.finish()
        return ClientResult(output_bytes=transcript.output_bytes, target_token_ids=tuple(transcript.target_token_ids),
                            prompt_token_count=info.prompt_token_count, finish_reason=last.finish_reason,
                            wall_ms=_ms_since(transcript.started), arrival_ms=tuple(transcript.arrival_ms),
                            committed_per_response=tuple(transcript.committed), speculation_rounds=records,
                            stop=tuple(stop), rendered_prompt=draft_prompt)

    async def generate(self, prompt: str, config: DecodingConfig, *, max_new_tokens: int,
                       on_text: TextSink | None = None, on_piece: PieceSink | None = None,
                       messages: Sequence[ChatMessage] = (), stop: Sequence[str] = ()) -> ClientResult:
        """Target-only generation on the verifier (the baseline): one response per target step."""
        request = GenerationRequest(prompt=prompt, config=config, max_new_tokens=max_new_tokens, messages=tuple(messages))
        transcript = _Transcript(started=time.perf_counter(), on_text=on_text, on_piece=on_piece,
                                 text=CommittedText(stop))
        call = self._stub.Generate(encode_generation_request(request))
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
            raise EdgeClientError(f"verifier at {self.address} ended the generation before it finished")
        transcript.finish()
        return ClientResult(output_bytes=transcript.output_bytes, target_token_ids=tuple(transcript.target_token_ids),
                            prompt_token_count=step.prompt_token_count, finish_reason=step.finish_reason,
                            wall_ms=_ms_since(transcript.started), arrival_ms=tuple(transcript.arrival_ms),
                            committed_per_response=tuple(transcript.committed), stop=tuple(stop),
                            rendered_prompt=rendered_prompt)

    def _rendered_prompt(self, prompt: str, messages: Sequence[ChatMessage], rendered: str) -> str:
        """The text the target reads, as the verifier told it (a verifier before chat tells nothing)."""
        if messages and not rendered:
            raise EdgeClientError(f"verifier at {self.address} predates chat messages (protocol revision 1): "
                                  f"send a prompt instead")
        return rendered or prompt

    async def _read(self, call: grpc.aio.StreamStreamCall, kind: str) -> pb.SpeculateResponse:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise EdgeClientError(f"verifier at {self.address} ended the session before it finished")
        if response.WhichOneof("kind") != kind:
            raise EdgeClientError(f"verifier at {self.address} sent '{response.WhichOneof('kind')}' where '{kind}' was due")
        return response


def _start_drafter(drafter: Drafter, prompt: str, seed: int | None, resume_bytes: bytes) -> None:
    drafter.start(prompt, seed)
    if resume_bytes:
        drafter.commit(resume_bytes)
