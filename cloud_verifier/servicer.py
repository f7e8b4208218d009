"""The gRPC Verifier service: converts specbridge.v1 messages and delegates to the engine.

The serve stage's shell. Exceptions are left to the interceptor; a session lives exactly as
long as its call (the registry's `hold` frees it when the handler ends for any reason).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from cloud_verifier.engine import VerifierEngine
from shared.wire import (
    SessionInfo,
    WireFormatError,
    decode_generation_request,
    decode_proposal,
    decode_session_request,
    encode_generated_step,
    encode_round,
    encode_session_info,
)
from specbridge.v1 import specbridge_pb2 as pb
from specbridge.v1 import specbridge_pb2_grpc


class VerifierServicer(specbridge_pb2_grpc.VerifierServicer):
    def __init__(self, engine: VerifierEngine) -> None:
        self.engine = engine

    async def Speculate(self, request_iterator: AsyncIterator[pb.SpeculateRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SpeculateResponse]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise WireFormatError("a Speculate stream must start with an 'open' message")
        request = decode_session_request(first.open)
        prompt = self.engine.target_prompt(request.prompt, request.messages)
        session = self.engine.speculative_session(request, prompt)
        shared_ids = self.engine.shared_draft_ids(request.draft_vocab_bytes) if request.draft_vocab_bytes else ()
        with self.engine.sessions.hold(session) as session_id:
            info = SessionInfo(session_id=session_id, prompt_token_count=session.prompt_length,
                               target_model=self.engine.target_name, shared_draft_ids=shared_ids,
                               rendered_prompt=prompt.text)
            yield pb.SpeculateResponse(opened=encode_session_info(info))
            async for message in request_iterator:
                if message.WhichOneof("kind") != "draft":
                    raise WireFormatError("after 'open', every Speculate message must be a 'draft'")
                served = await self.engine.speculate_round(session, decode_proposal(message.draft))
                yield pb.SpeculateResponse(round=encode_round(served))
                if served.outcome.finished:
                    return

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        generation = decode_generation_request(request)
        prompt = self.engine.target_prompt(generation.prompt, generation.messages)
        session = self.engine.generation_session(generation, prompt)
        rendered_prompt = prompt.text  # told once, with the first step
        with self.engine.sessions.hold(session):
            while not session.finished:
                step = await self.engine.generate_step(session)
                yield encode_generated_step(replace(step, rendered_prompt=rendered_prompt))
                rendered_prompt = ""

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.VerifierStats:
        batches = self.engine.scheduler.stats
        sessions = self.engine.sessions.counts
        return pb.VerifierStats(live_sessions=sessions.live, sessions_opened=sessions.opened,
                                sessions_closed=sessions.closed, forwards=batches.forwards, rows=batches.rows,
                                tokens_fed=batches.tokens_fed, committed_tokens=batches.committed_tokens,
                                rows_per_forward=batches.rows_per_forward, target_model=self.engine.target_name,
                                cache_bytes=sessions.cache_bytes, busy_ms=batches.busy_ms)
