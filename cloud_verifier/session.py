"""One generation session on the verifier: re-tokenize and align a proposal, then decide and commit.

A round is split around the target forward so the scheduler can batch many sessions' forwards:
`plan` (CPU: retokenize, align, proposal law) -> TargetModel.forward -> `decide_together` (acceptance
rules, their logits rows computed lazily and batched; commit, crop the cache). The committed target
ids are the truth; the KV cache is derived state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cloud_verifier.align import draft_positions_per_target, dtw_align
from cloud_verifier.errors import LimitExceededError, ProposalError, SessionFinishedError
from cloud_verifier.lazy_head import LazyLogits, run_rules
from cloud_verifier.kv_cache import RowCache
from cloud_verifier.transfer import transfer_top_k
from cloud_verifier.verify import Rule, Verdict, greedy_rule, point_mass_rule, rejection_rule, warped_rule
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.proposal import DraftProposal, RoundOutcome
from shared.retokenize import retokenize
from shared.utf8 import incomplete_tail_length
from shared.vocab import Vocab
from shared.wire import FinishReason, ServedRound


@dataclass(frozen=True)
class PlannedRound:
    proxy_ids: tuple[int, ...]  # the proposal in the target vocabulary, x_1..x_m
    feed_ids: tuple[int, ...]  # committed ids not yet in the cache, then the proxy ids
    draft_positions: tuple[tuple[int, ...], ...]  # A(j): draft tokens aligned to each proxy token
    proposal_probs: tuple[dict[int, float], ...] | None  # q_j for the min(1, p/q) rules
    align_us: float  # CPU time of DTW alignment and the proposal law (TokenTiming reports 663 us)

    def verify_rows(self, feed_logits: LazyLogits) -> LazyLogits:
        """The m + 1 rows the acceptance rule reads, out of a forward's rows over `feed_ids`: the last ones."""
        return feed_logits.tail(len(self.proxy_ids) + 1)


@dataclass(frozen=True)
class ProposalLimits:
    """What one proposal may cost the verifier: each bounds the CPU work of a round or the rows of its forward."""

    max_draft_tokens: int = 16
    max_token_bytes: int = 256  # bytes of one draft token or top-k alternative
    max_top_k: int = 64  # alternatives per draft token
    # Proxy target tokens per draft token: a draft token of odd bytes can re-tokenize into one target
    # token per byte; the proposal is cut there (any prefix of a proposal verifies exactly).
    max_proxy_per_draft_token: int = 4

    def check(self, proposal: DraftProposal) -> None:
        if len(proposal.tokens) > self.max_draft_tokens:
            raise ProposalError(f"a proposal may hold at most {self.max_draft_tokens} draft tokens, got {len(proposal.tokens)}")
        for position, token in enumerate(proposal.tokens):
            if len(token.top_k) > self.max_top_k:
                raise LimitExceededError(f"draft token {position} carries {len(token.top_k)} top-k alternatives; "
                                         f"this verifier's limit is {self.max_top_k} (--max-top-k)")
            longest = max([len(token.token_bytes)] + [len(data) for data, _ in token.top_k])
            if longest > self.max_token_bytes:
                raise LimitExceededError(f"draft token {position} holds a {longest}-byte token; "
                                         f"this verifier's limit is {self.max_token_bytes} bytes (--max-token-bytes)")

    def proxy_budget(self, proposal: DraftProposal) -> int:
        """Most proxy tokens the proposal may become (its EOS included)."""
        return self.max_proxy_per_draft_token * len(proposal.tokens) + int(proposal.ends_with_eos)


class VerifierSession:
    def __init__(self, vocab: Vocab, prompt_ids: list[int], config: DecodingConfig, max_new_tokens: int,
                 limits: ProposalLimits, align_window: int | None = 32, resume_ids: Sequence[int] = (),
                 embedding_rows: int | None = None) -> None:
        """`resume_ids`: output ids the client already holds (it owns the transcript); they count as generated.

        `embedding_rows`: the target's vocabulary size as its weights know it; a tokenizer may count more
        (added tokens), and an id past the embedding must fail this session before it joins a forward.
        """
        if not prompt_ids:
            raise ProposalError("the prompt tokenizes to no target tokens")
        if max_new_tokens < 1:
            raise ProposalError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.embedding_rows = min(vocab.size, embedding_rows) if embedding_rows is not None else vocab.size
        self._check_ids("prompt", prompt_ids)
        self._check_ids("resume_target_ids", resume_ids)
        if any(i in vocab.eos_ids for i in resume_ids):
            raise ProposalError("resume_target_ids hold an EOS: that transcript has already ended")
        if len(resume_ids) >= max_new_tokens:
            raise ProposalError(f"{len(resume_ids)} resumed ids leave nothing of max_new_tokens {max_new_tokens} to generate")
        self.vocab = vocab
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.limits = limits
        self.align_window = align_window
        self.committed_ids = list(prompt_ids) + list(resume_ids)
        self.prompt_length = len(prompt_ids)
        self.output_bytes = vocab.decode_bytes(resume_ids)
        # A round feeds at most the proposal that max_new_tokens leaves room for: prompt + max_new_tokens positions.
        self.cache = RowCache(capacity_tokens=self.reserved_tokens)
        self.finished = False
        self.generator = torch.Generator()
        self.generator.manual_seed(config.seed if config.seed is not None else torch.seed())

    @property
    def reserved_tokens(self) -> int:
        """The most positions this session's KV cache will ever hold."""
        return self.prompt_length + self.max_new_tokens

    def _check_ids(self, what: str, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.embedding_rows]
        if bad:
            raise ProposalError(f"{what}: token ids out of the target's vocabulary [0, {self.embedding_rows}): {bad[:5]}")

    @property
    def generated_count(self) -> int:
        return len(self.committed_ids) - self.prompt_length

    def _usable_bytes(self, proposal: DraftProposal) -> bytes:
        """The draft bytes up to the last whole character of the output stream."""
        draft = proposal.text_bytes
        held_back = incomplete_tail_length(self.output_bytes[-3:] + draft)
        return draft[: max(0, len(draft) - held_back)]

    def _proxy_ids(self, proposal: DraftProposal) -> list[int]:
        if self.config.uses_draft_probs:
            by_bytes = self.vocab.id_by_bytes
            missing = [t.token_bytes for t in proposal.tokens if t.token_bytes not in by_bytes]
            if missing:
                raise ProposalError(f"draft_probs proposals may hold only tokens the target vocabulary shares; {missing[0]!r} is not one")
            if proposal.ends_with_eos:
                raise ProposalError("draft_probs proposals cannot end with the draft's EOS (it has no shared-vocabulary law)")
            return [by_bytes[t.token_bytes] for t in proposal.tokens]
        return retokenize(self.vocab, self.committed_ids, self._usable_bytes(proposal))

    def plan(self, proposal: DraftProposal) -> PlannedRound:
        if self.finished:
            raise SessionFinishedError("this session has finished; start a new one")
        self.limits.check(proposal)
        proxy = self._proxy_ids(proposal)
        if proposal.ends_with_eos and self.vocab.tokenizer.eos_token_id is not None:
            proxy.append(self.vocab.tokenizer.eos_token_id)
        # Verifying m tokens can emit m + 1: never propose past the token budget.
        proxy = proxy[: min(self.max_new_tokens - self.generated_count - 1, self.limits.proxy_budget(proposal))]
        self._check_ids("proposal", proxy)
        align_started = time.perf_counter()
        draft_texts = [t.token_bytes.decode("utf-8", errors="replace") for t in proposal.tokens]
        alignment = dtw_align(draft_texts, [self.vocab.token_text(i) for i in proxy], window=self.align_window)
        positions = draft_positions_per_target(alignment, len(proxy))
        proposal_probs = self._proposal_probs(proposal, proxy, positions)
        return PlannedRound(
            proxy_ids=tuple(proxy),
            feed_ids=tuple(self.committed_ids[self.cache.length :]) + tuple(proxy),
            draft_positions=positions,
            proposal_probs=proposal_probs,
            align_us=(time.perf_counter() - align_started) * 1e6,
        )

    def _proposal_probs(self, proposal: DraftProposal, proxy: list[int],
                        positions: tuple[tuple[int, ...], ...]) -> tuple[dict[int, float], ...] | None:
        if self.config.mode is DecodeMode.GREEDY or self.config.rule is AcceptanceRule.POINT_MASS:
            return None
        if self.config.rule is AcceptanceRule.DRAFT_PROBS:
            by_bytes = self.vocab.id_by_bytes
            laws = []
            for token, proxy_id in zip(proposal.tokens, proxy):
                # The draft samples an id but proposes its bytes, so q(bytes) sums every id with those
                # bytes (SentencePiece's `▁` and `<0x20>`); keeping one understates q and biases acceptance.
                law: dict[int, float] = {}
                for data, probability in token.top_k:
                    if data in by_bytes:
                        law[by_bytes[data]] = law.get(by_bytes[data], 0.0) + probability
                if law.get(proxy_id, 0.0) <= 0.0:
                    raise ProposalError("draft_probs proposal: a drafted token has no probability in its own top-k law")
                laws.append(law)
            return tuple(laws)
        return tuple(transfer_top_k([t.top_k for t in proposal.tokens], positions, proxy, self.vocab.id_by_bytes))

    def rule(self, planned: PlannedRound) -> Rule:
        """The acceptance rule of this round, to be sent the logits of `planned.verify_rows`."""
        proxy, eos = list(planned.proxy_ids), self.vocab.eos_ids
        if self.config.mode is DecodeMode.GREEDY:
            return greedy_rule(proxy, eos)
        if planned.proposal_probs is None:
            return warped_rule(point_mass_rule(proxy, eos, self.generator), self.config)
        return warped_rule(rejection_rule(proxy, planned.proposal_probs, eos, self.generator), self.config)

    def decide(self, planned: PlannedRound, feed_logits: LazyLogits) -> RoundOutcome:
        """Apply the acceptance rule to the logits of a forward over `planned.feed_ids`, and commit."""
        (outcome,) = decide_together([(self, planned, feed_logits)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def finish_reason(self, outcome: RoundOutcome) -> FinishReason | None:
        """Why the session ended with this round; None while it goes on."""
        if not outcome.finished:
            return None
        return FinishReason.EOS if any(i in self.vocab.eos_ids for i in outcome.new_ids) else FinishReason.LENGTH

    def served(self, outcome: RoundOutcome, verify_ms: float) -> ServedRound:
        """The round as it is answered to the edge, wherever the edge is."""
        return ServedRound(outcome=outcome, accepted_bytes=self.vocab.decode_bytes(outcome.accepted_ids),
                           finish_reason=self.finish_reason(outcome), verify_ms=verify_ms)

    def commit(self, planned: PlannedRound, verdict: Verdict) -> RoundOutcome:
        accepted = planned.proxy_ids[: verdict.accepted]
        new_ids = list(accepted) + ([verdict.next_token] if verdict.next_token is not None else [])
        self.cache.crop(len(self.committed_ids) + len(accepted))
        self.committed_ids.extend(new_ids)
        committed_bytes = self.vocab.decode_bytes(new_ids)
        self.output_bytes += committed_bytes
        self.finished = (verdict.next_token is None or any(i in self.vocab.eos_ids for i in new_ids)
                         or self.generated_count >= self.max_new_tokens)
        return RoundOutcome(
            accepted_ids=accepted,
            next_id=verdict.next_token,
            committed_bytes=committed_bytes,
            proposed_count=len(planned.proxy_ids),
            draft_tokens_accepted=_leading_draft_tokens_covered(planned.draft_positions, verdict.accepted),
            finished=self.finished,
        )


def decide_together(rounds: Sequence[tuple[VerifierSession, PlannedRound, LazyLogits]]) -> list[RoundOutcome | Exception]:
    """Decide and commit the rounds of one forward, given each its forward's rows; their rules share head calls.

    A round that fails fails alone (its exception is its result); a failing head call raises.
    """
    verdicts = run_rules([session.rule(planned) for session, planned, _ in rounds],
                         [planned.verify_rows(feed_logits) for _, planned, feed_logits in rounds])
    outcomes: list[RoundOutcome | Exception] = []
    for (session, planned, _), verdict in zip(rounds, verdicts):
        if isinstance(verdict, Exception):
            outcomes.append(verdict)
            continue
        try:
            outcomes.append(session.commit(planned, verdict))
        except Exception as error:  # noqa: BLE001 - one session's bad round must not fail the others
            outcomes.append(error)
    return outcomes


def _leading_draft_tokens_covered(draft_positions: tuple[tuple[int, ...], ...], accepted: int) -> int:
    """Draft tokens before the first one that DTW ties to a rejected proxy token."""
    rejected = [i for j, positions in enumerate(draft_positions) if j >= accepted for i in positions]
    aligned = [i for positions in draft_positions for i in positions]
    if not aligned:
        return 0
    return min(rejected) if rejected else max(aligned) + 1
