"""The verifier without the network: opens sessions, runs their rounds through the batch scheduler.

The servicer converts messages and calls this; tests and benchmarks can call it directly.
Speculative rounds and target-only steps are the same session driven through one scheduler
(a target-only step is a round with an empty proposal).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_verifier.chat import render_chat
from cloud_verifier.errors import ProposalError
from cloud_verifier.scheduler import BatchScheduler
from cloud_verifier.session import VerifierSession
from cloud_verifier.session_registry import SessionRegistry
from cloud_verifier.target import TargetModel
from cloud_verifier.transfer import shared_vocabulary_map
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal
from shared.vocab import Vocab
from shared.wire import ChatMessage, GeneratedStep, GenerationRequest, ServedRound, SessionRequest

TARGET_STEP = DraftProposal(tokens=())


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 32
    max_sessions: int = 256
    max_draft_tokens: int = 16
    max_new_tokens_limit: int = 4096


@dataclass(frozen=True)
class TargetPrompt:
    """The text the target reads; a rendered chat already holds its special tokens (BOS included)."""

    text: str
    is_chat: bool


class VerifierEngine:
    def __init__(self, target: TargetModel, vocab: Vocab, target_name: str, limits: EngineLimits) -> None:
        self.vocab = vocab
        self.target_name = target_name
        self.limits = limits
        self.scheduler = BatchScheduler(target, limits.max_batch)
        self.sessions = SessionRegistry(limits.max_sessions)

    def target_prompt(self, prompt: str, messages: Sequence[ChatMessage] = ()) -> TargetPrompt:
        """`prompt` as it is, or `messages` rendered with the target's own chat template."""
        if not messages:
            return TargetPrompt(prompt, is_chat=False)
        return TargetPrompt(render_chat(self.vocab.tokenizer, messages, self.target_name), is_chat=True)

    def _new_session(self, prompt: TargetPrompt, config: DecodingConfig, max_new_tokens: int,
                     resume_ids: Sequence[int] = ()) -> VerifierSession:
        if max_new_tokens > self.limits.max_new_tokens_limit:
            raise ProposalError(f"max_new_tokens {max_new_tokens} exceeds this verifier's limit of {self.limits.max_new_tokens_limit}")
        prompt_ids = list(self.vocab.tokenizer(prompt.text, add_special_tokens=not prompt.is_chat)["input_ids"])
        return VerifierSession(self.vocab, prompt_ids, config, max_new_tokens, self.limits.max_draft_tokens,
                               resume_ids=resume_ids)

    def speculative_session(self, request: SessionRequest, prompt: TargetPrompt | None = None) -> VerifierSession:
        """A session on the prompt (`prompt`: the request's, already rendered), holding the resumed output ids."""
        prompt = prompt or self.target_prompt(request.prompt, request.messages)
        return self._new_session(prompt, request.config, request.max_new_tokens, request.resume_target_ids)

    def generation_session(self, request: GenerationRequest, prompt: TargetPrompt | None = None) -> VerifierSession:
        prompt = prompt or self.target_prompt(request.prompt, request.messages)
        return self._new_session(prompt, request.config, request.max_new_tokens)

    def shared_draft_ids(self, draft_vocab_bytes: Sequence[bytes]) -> tuple[int, ...]:
        """Draft ids whose bytes are exactly one (non-special) target token."""
        return tuple(shared_vocabulary_map(draft_vocab_bytes, self.vocab.id_by_bytes))

    async def speculate_round(self, session: VerifierSession, proposal: DraftProposal) -> ServedRound:
        """One round; `verify_ms` is the verifier's own time on it: plan, queueing, forward and decision."""
        started = time.perf_counter()
        outcome = await self.scheduler.submit(session, session.plan(proposal))
        return session.served(outcome, verify_ms=(time.perf_counter() - started) * 1e3)

    async def generate_step(self, session: VerifierSession) -> GeneratedStep:
        outcome = await self.scheduler.submit(session, session.plan(TARGET_STEP))
        return GeneratedStep(token_ids=outcome.new_ids, token_bytes=outcome.committed_bytes,
                             finish_reason=session.finish_reason(outcome), prompt_token_count=session.prompt_length)

    def close(self) -> None:
        self.scheduler.close()
