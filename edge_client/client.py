"""The edge's gRPC session with the verifier: draft, send, await the verdict, re-sync, repeat.

The network shell around the drafter (edge_client.drafter): one Speculate stream per
generation, plus the target-only Generate baseline. Committed text streams out as it arrives,
whole characters only. Imports numpy, onnxruntime and grpc; never torch.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import grpc
import numpy as np

from edge_client.draft_runtime import DraftRuntime
from edge_client.drafter import Drafter
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.utf8 import split_complete
from shared.vocab import Vocab
from shared.wire import (
    DraftTokenizerInfo,
    FinishReason,
    GenerationRequest,
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
        """A draft for another concurrent session: its own KV cache and its own tokenizer, the same byte table.

        A tokenizer must not be shared across threads: each call may flip its special-token mode.
        """
        vocab = replace(self.vocab, tokenizer=copy.deepcopy(self.vocab.tokenizer))
        return EdgeDraft(DraftRuntime.load(self.onnx_dir, variant=self.variant, threads=self.threads), vocab,
                         self.onnx_dir, self.variant, self.threads)


def load_edge_draft(onnx_dir: str | Path, *, variant: str = "fp32", threads: int | None = None) -> EdgeDraft:
    onnx_dir = Path(onnx_dir)
    return EdgeDraft(DraftRuntime.load(onnx_dir, variant=variant, threads=threads), Vocab.from_pretrained(onnx_dir),
                     onnx_dir, variant, threads)


@dataclass(frozen=True)
class ClientResult:
    """One generation as the edge saw it. Per-response lists cover this call only."""

    output_bytes: bytes  # the whole output, resumed part included
    target_token_ids: tuple[int, ...]  # the whole output in target ids, resumed ones included
    prompt_token_count: int
    finish_reason: FinishReason
    wall_ms: float
    arrival_ms: tuple[float, ...]  # when each response arrived, from the start of the call
    committed_per_response: tuple[int, ...]  # target tokens each response committed
    accepted_per_round: tuple[int, ...] = ()  # speculative only: proposed target tokens accepted
    proposed_per_round: tuple[int, ...] = ()  # speculative only: target tokens the draft became
    draft_ms_per_round: tuple[float, ...] = ()  # speculative only: edge drafting time
    round_trip_ms: tuple[float, ...] = ()  # speculative only: draft sent -> verdict received

    @property
    def text(self) -> str:
        return self.output_bytes.decode("utf-8", errors="replace")

    @property
    def rounds(self) -> int:
        return len(self.arrival_ms)

    def summary(self) -> dict:
        """JSON-ready: everything but the raw bytes, plus the text and the round count."""
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "output_bytes"}
        return {"text": self.text, "rounds": self.rounds, **values, "finish_reason": self.finish_reason.value}


class Utf8Stream:
    """Turns a byte stream cut anywhere into text, holding back an incomplete trailing character."""

    def __init__(self) -> None:
        self._pending = b""

    def push(self, data: bytes) -> str:
        complete, self._pending = split_complete(self._pending + data)
        return complete.decode("utf-8", errors="replace")

    def flush(self) -> str:
        rest, self._pending = self._pending, b""
        return rest.decode("utf-8", errors="replace")


@dataclass
class _Transcript:
    """What a call accumulates while responses arrive."""

    started: float
    on_text: TextSink | None
    output_bytes: bytes = b""
    target_token_ids: list[int] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    text: Utf8Stream = field(default_factory=Utf8Stream)

    def add(self, ids: Sequence[int], data: bytes) -> None:
        self.arrival_ms.append(_ms_since(self.started))
        self.committed.append(len(ids))
        self.target_token_ids.extend(ids)
        self.output_bytes += data
        if self.on_text is not None:
            self.on_text(self.text.push(data))

    def finish(self) -> None:
        if self.on_text is not None:
            self.on_text(self.text.flush())


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


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
                        draft_len: int, on_text: TextSink | None = None, resume_target_ids: Sequence[int] = (),
                        resume_bytes: bytes = b"", top_k_size: int = 8) -> ClientResult:
        """Speculative generation; resume_* continue a transcript an earlier call returned (ids and their bytes)."""
        draft_probs = config.mode is DecodeMode.SAMPLE and config.rule is AcceptanceRule.DRAFT_PROBS
        request = SessionRequest(prompt=prompt, config=config, max_new_tokens=max_new_tokens,
                                 draft_tokenizer=draft.tokenizer_info, resume_target_ids=tuple(resume_target_ids),
                                 draft_vocab_bytes=draft.vocab.token_bytes if draft_probs else None)
        transcript = _Transcript(started=time.perf_counter(), on_text=on_text, output_bytes=resume_bytes,
                                 target_token_ids=list(resume_target_ids))
        transcript.text.push(resume_bytes)  # shown by the earlier call; only its unfinished character carries over
        call = self._stub.Speculate()
        accepted, proposed, draft_ms, round_trip_ms = [], [], [], []
        try:
            await call.write(pb.SpeculateRequest(open=encode_session_request(request)))
            info = decode_session_info((await self._read(call, "opened")).opened)
            drafter = Drafter(draft.runtime, draft.vocab, top_k_size=top_k_size,
                              shared_ids=info.shared_draft_ids if draft_probs else None)
            await asyncio.to_thread(_start_drafter, drafter, prompt, resume_bytes)
            rng = np.random.default_rng(config.seed)
            while True:
                drafting = time.perf_counter()
                proposal = await asyncio.to_thread(drafter.propose, draft_len, config, rng)
                sent = time.perf_counter()
                await call.write(pb.SpeculateRequest(draft=encode_proposal(proposal)))
                served = decode_round((await self._read(call, "round")).round)
                draft_ms.append((sent - drafting) * 1e3)
                round_trip_ms.append(_ms_since(sent))
                outcome = served.outcome
                accepted.append(len(outcome.accepted_ids))
                proposed.append(outcome.proposed_count)
                transcript.add(outcome.new_ids, outcome.committed_bytes)
                if served.finish_reason is not None:
                    break
                await asyncio.to_thread(drafter.commit, outcome.committed_bytes)
            await call.done_writing()
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()  # no-op once the call completed; otherwise frees the server's session now
        transcript.finish()
        return ClientResult(output_bytes=transcript.output_bytes, target_token_ids=tuple(transcript.target_token_ids),
                            prompt_token_count=info.prompt_token_count, finish_reason=served.finish_reason,
                            wall_ms=_ms_since(transcript.started), arrival_ms=tuple(transcript.arrival_ms),
                            committed_per_response=tuple(transcript.committed), accepted_per_round=tuple(accepted),
                            proposed_per_round=tuple(proposed), draft_ms_per_round=tuple(draft_ms),
                            round_trip_ms=tuple(round_trip_ms))

    async def generate(self, prompt: str, config: DecodingConfig, *, max_new_tokens: int,
                       on_text: TextSink | None = None) -> ClientResult:
        """Target-only generation on the verifier (the baseline): one response per target step."""
        request = GenerationRequest(prompt=prompt, config=config, max_new_tokens=max_new_tokens)
        transcript = _Transcript(started=time.perf_counter(), on_text=on_text)
        call = self._stub.Generate(encode_generation_request(request))
        step = None
        try:
            async for response in call:
                step = decode_generated_step(response)
                transcript.add(step.token_ids, step.token_bytes)
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
                            committed_per_response=tuple(transcript.committed))

    async def _read(self, call: grpc.aio.StreamStreamCall, kind: str) -> pb.SpeculateResponse:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise EdgeClientError(f"verifier at {self.address} ended the session before it finished")
        if response.WhichOneof("kind") != kind:
            raise EdgeClientError(f"verifier at {self.address} sent '{response.WhichOneof('kind')}' where '{kind}' was due")
        return response


def _start_drafter(drafter: Drafter, prompt: str, resume_bytes: bytes) -> None:
    drafter.start(prompt)
    if resume_bytes:
        drafter.commit(resume_bytes)
