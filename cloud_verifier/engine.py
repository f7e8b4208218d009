"""The verifier without the network: opens sessions, runs their rounds through the batch scheduler.

The servicer converts messages and calls this; tests and benchmarks can call it directly.
Speculative rounds and target-only steps are the same session driven through one scheduler
(a target-only step is a round with an empty proposal).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from cloud_verifier.chat import render_chat
from cloud_verifier.errors import ContextLengthError, LimitExceededError, ProposalError, ServeConfigError
from cloud_verifier.kv_pool import KvPool, default_budget_bytes
from cloud_verifier.metrics import VerifierMetrics
from cloud_verifier.scheduler import BatchScheduler
from cloud_verifier.session import ProposalLimits, VerifierSession
from cloud_verifier.session_registry import SessionRegistry
from cloud_verifier.target import TargetModel
from cloud_verifier.transfer import shared_vocabulary_map
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal
from shared.vocab import Vocab
from shared.wire import ChatMessage, GeneratedStep, GenerationRequest, ServedRound, SessionRequest

TARGET_STEP = DraftProposal(tokens=())
# Threads for the CPU work of rounds and session openings; the batch worker has its own thread.
CPU_WORKERS = 2
Result = TypeVar("Result")


@dataclass(frozen=True)
class EngineLimits:
    """What the verifier lets clients make it do; every quantity a request controls has its bound here."""

    max_batch: int = 32
    max_sessions: int = 256
    max_sessions_per_client: int = 64  # a client: its peer address (or its token's name under auth)
    max_draft_tokens: int = 16
    max_token_bytes: int = 256
    max_top_k: int = 64
    max_proxy_per_draft_token: int = 4
    max_new_tokens_limit: int = 4096
    max_prompt_bytes: int = 1 << 20  # checked before tokenizing: the text, or the chat messages' contents
    max_prompt_tokens: int = 16384  # and never past the target's own positions (OUT_OF_RANGE)
    idle_timeout_s: float = 120.0  # a Speculate stream silent this long is ended and its session freed

    def __post_init__(self) -> None:
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                raise ServeConfigError(f"--{item.name.replace('_', '-')} must be > 0, got {getattr(self, item.name)}")

    @property
    def proposal(self) -> ProposalLimits:
        return ProposalLimits(max_draft_tokens=self.max_draft_tokens, max_token_bytes=self.max_token_bytes,
                              max_top_k=self.max_top_k, max_proxy_per_draft_token=self.max_proxy_per_draft_token)


@dataclass(frozen=True)
class TargetPrompt:
    """The text the target reads; a rendered chat already holds its special tokens (BOS included)."""

    text: str
    is_chat: bool


class VerifierEngine:
    def __init__(self, target: TargetModel, vocab: Vocab, target_name: str, limits: EngineLimits,
                 kv_budget_bytes: int | None = None, prefix_reuse: bool = True) -> None:
        """`kv_budget_bytes`: the KV cache live and kept sessions may hold (None: kv_pool.default_budget_bytes);
        `prefix_reuse`: keep finished sessions' caches for follow-up turns that start with their ids."""
        self.vocab = vocab
        self.target_name = target_name
        self.limits = limits
        self.embedding_rows = target.vocab_size
        self.max_positions: int | None = getattr(target.config, "max_position_embeddings", None)
        # Tokenizing, chat rendering, re-tokenizing and DTW take CPU in proportion to what a client sent:
        # they run here, never on the event loop that every session and the health check share.
        self._cpu = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="specbridge-cpu")
        self.metrics = VerifierMetrics()
        self.scheduler = BatchScheduler(target, limits.max_batch, self.metrics)
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else default_budget_bytes(target.device)
        self.kv_pool = KvPool(self.kv_budget_bytes, target.kv_bytes_per_token, keeps_finished=prefix_reuse)
        self.sessions = SessionRegistry(limits.max_sessions, limits.max_sessions_per_client, self.metrics, self.kv_pool)
        self.metrics.watch(self)

    async def off_loop(self, work: Callable[..., Result], *args: Any) -> Result:
        """`work(*args)` on the engine's CPU threads."""
        # In the caller's context, so that log lines from the work carry its session's id.
        return await asyncio.get_running_loop().run_in_executor(self._cpu, contextvars.copy_context().run, work, *args)

    def target_prompt(self, prompt: str, messages: Sequence[ChatMessage] = ()) -> TargetPrompt:
        """`prompt` as it is, or `messages` rendered with the target's own chat template."""
        prompt_bytes = sum(len(m.content.encode()) + len(m.role.encode()) for m in messages) if messages else len(prompt.encode())
        if prompt_bytes > self.limits.max_prompt_bytes:
            raise LimitExceededError(f"the prompt holds {prompt_bytes} bytes; this verifier's limit is "
                                     f"{self.limits.max_prompt_bytes} (--max-prompt-bytes)")
        if not messages:
            return TargetPrompt(prompt, is_chat=False)
        return TargetPrompt(render_chat(self.vocab.tokenizer, messages, self.target_name), is_chat=True)

    def _new_session(self, prompt: TargetPrompt, config: DecodingConfig, max_new_tokens: int,
                     resume_ids: Sequence[int] = ()) -> VerifierSession:
        if max_new_tokens > self.limits.max_new_tokens_limit:
            raise ProposalError(f"max_new_tokens {max_new_tokens} exceeds this verifier's limit of {self.limits.max_new_tokens_limit}")
        prompt_ids = list(self.vocab.tokenizer(prompt.text, add_special_tokens=not prompt.is_chat)["input_ids"])
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise LimitExceededError(f"the prompt is {len(prompt_ids)} target tokens; this verifier's limit is "
                                     f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)")
        if self.max_positions is not None and len(prompt_ids) + max_new_tokens > self.max_positions:
            raise ContextLengthError(f"{len(prompt_ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                                     f"target's {self.max_positions} positions")
        session = VerifierSession(self.vocab, prompt_ids, config, max_new_tokens, self.limits.proposal,
                                  resume_ids=resume_ids, embedding_rows=self.embedding_rows)
        # A follow-up turn starts with the committed ids of a finished session: its keys/values are reused.
        session.cache, reused_tokens = self.kv_pool.take_prefix(session.committed_ids, session.reserved_tokens)
        self.metrics.prefix_reused(reused_tokens)
        return session

    def speculative_session(self, request: SessionRequest, prompt: TargetPrompt | None = None) -> VerifierSession:
        """A session on the prompt (`prompt`: the request's, already rendered), holding the resumed output ids."""
        prompt = prompt or self.target_prompt(request.prompt, request.messages)
        return self._new_session(prompt, request.config, request.max_new_tokens, request.resume_target_ids)

    def generation_session(self, request: GenerationRequest, prompt: TargetPrompt | None = None) -> VerifierSession:
        """As `speculative_session`, for a target-only stream (resumed ones included)."""
        prompt = prompt or self.target_prompt(request.prompt, request.messages)
        return self._new_session(prompt, request.config, request.max_new_tokens, request.resume_target_ids)

    def shared_draft_ids(self, draft_vocab_bytes: Sequence[bytes]) -> tuple[int, ...]:
        """Draft ids whose bytes are exactly one (non-special) target token."""
        return tuple(shared_vocabulary_map(draft_vocab_bytes, self.vocab.id_by_bytes))

    async def speculate_round(self, session: VerifierSession, proposal: DraftProposal) -> ServedRound:
        """One round; `verify_ms` is the verifier's own time on it: plan, queueing, forward and decision."""
        started = time.perf_counter()
        outcome = await self.scheduler.submit(session, await self.off_loop(session.plan, proposal))
        self.metrics.observe_round(proposal, outcome)
        return session.served(outcome, verify_ms=(time.perf_counter() - started) * 1e3)

    async def generate_step(self, session: VerifierSession) -> GeneratedStep:
        outcome = await self.scheduler.submit(session, session.plan(TARGET_STEP))
        return GeneratedStep(token_ids=outcome.new_ids, token_bytes=outcome.committed_bytes,
                             finish_reason=session.finish_reason(outcome), prompt_token_count=session.prompt_length)

    def close(self) -> None:
        self.scheduler.close()
        self._cpu.shutdown(wait=True, cancel_futures=True)
