"""The gRPC Verifier service: converts specbridge.v1 messages and delegates to the engine.

The serve stage's shell. Exceptions are left to the interceptor; a session lives exactly as
long as its call (the registry's `hold` frees it when the handler ends for any reason).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import replace

import grpc

from cloud_verifier.auth import presented_token
from cloud_verifier.engine import TargetPrompt, VerifierEngine
from cloud_verifier.errors import IdleSessionError
from cloud_verifier.logs import SessionTally, logged_session
from cloud_verifier.session import VerifierSession
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


def client_key(context: grpc.aio.ServicerContext, by_token: bool) -> str:
    """Whose session this is, for the per-client limit: the bearer token under auth (each token a client),
    else the peer's address without its port."""
    if by_token and (token := presented_token(context.invocation_metadata())) is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class VerifierServicer(specbridge_pb2_grpc.VerifierServicer):
    def __init__(self, engine: VerifierEngine, clients_by_token: bool = False, log_prompts: bool = False) -> None:
        self.engine = engine
        self.clients_by_token = clients_by_token
        self.log_prompts = log_prompts

    def _logged(self, session_id: str, rpc: str, session: VerifierSession,
                prompt: TargetPrompt) -> AbstractContextManager[SessionTally]:
        return logged_session(session_id, rpc, session.prompt_length, session.config.mode,
                              prompt.text if self.log_prompts else None)

    async def _next_message(self, request_iterator: AsyncIterator[pb.SpeculateRequest]) -> pb.SpeculateRequest | None:
        """The stream's next message; a client silent past the idle timeout loses its session."""
        try:
            return await asyncio.wait_for(anext(request_iterator, None), self.engine.limits.idle_timeout_s)
        except TimeoutError:
            raise IdleSessionError(f"no message for {self.engine.limits.idle_timeout_s:g} s (--idle-timeout-s); "
                                   f"the session has ended, resume it from its transcript") from None

    async def Speculate(self, request_iterator: AsyncIterator[pb.SpeculateRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SpeculateResponse]:
        first = await self._next_message(request_iterator)
        if first is None or first.WhichOneof("kind") != "open":
            raise WireFormatError("a Speculate stream must start with an 'open' message")
        request = decode_session_request(first.open)
        prompt = await self.engine.off_loop(self.engine.target_prompt, request.prompt, request.messages)
        session = await self.engine.off_loop(self.engine.speculative_session, request, prompt)
        shared_ids = (await self.engine.off_loop(self.engine.shared_draft_ids, request.draft_vocab_bytes)
                      if request.draft_vocab_bytes else ())
        with (self.engine.sessions.hold(session, client_key(context, self.clients_by_token)) as session_id,
              self._logged(session_id, "Speculate", session, prompt) as tally):
            info = SessionInfo(session_id=session_id, prompt_token_count=session.prompt_length,
                               target_model=self.engine.target_name, shared_draft_ids=shared_ids,
                               rendered_prompt=prompt.text)
            yield pb.SpeculateResponse(opened=encode_session_info(info))
            while (message := await self._next_message(request_iterator)) is not None:
                if message.WhichOneof("kind") != "draft":
                    raise WireFormatError("after 'open', every Speculate message must be a 'draft'")
                served = await self.engine.speculate_round(session, decode_proposal(message.draft))
                tally.observe(len(served.outcome.new_ids), served.finish_reason)
                yield pb.SpeculateResponse(round=encode_round(served))
                if served.outcome.finished:
                    return

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        generation = decode_generation_request(request)
        prompt = await self.engine.off_loop(self.engine.target_prompt, generation.prompt, generation.messages)
        session = await self.engine.off_loop(self.engine.generation_session, generation, prompt)
        rendered_prompt = prompt.text  # told once, with the first step
        with (self.engine.sessions.hold(session, client_key(context, self.clients_by_token)) as session_id,
              self._logged(session_id, "Generate", session, prompt) as tally):
            while not session.finished:
                step = await self.engine.generate_step(session)
                tally.observe(len(step.token_ids), step.finish_reason)
                yield encode_generated_step(replace(step, rendered_prompt=rendered_prompt))
                rendered_prompt = ""

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.VerifierStats:
        counts = self.engine.metrics.counts()
        return pb.VerifierStats(live_sessions=counts.live_sessions, sessions_opened=counts.sessions_opened,
                                sessions_closed=counts.sessions_closed, forwards=counts.forwards, rows=counts.rows,
                                tokens_fed=counts.tokens_fed, committed_tokens=counts.committed_tokens,
                                rows_per_forward=counts.rows_per_forward, target_model=self.engine.target_name,
                                cache_bytes=counts.cache_bytes, busy_ms=counts.busy_ms, drafts=counts.drafts,
                                draft_tokens=counts.draft_tokens, accepted_tokens=counts.accepted_tokens,
                                accepted_per_position=counts.accepted_per_position,
                                kv_budget_bytes=counts.kv_budget_bytes,
                                prefix_cache_hit_tokens=counts.prefix_cache_hit_tokens)
