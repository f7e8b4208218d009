"""Continuous batching: batched verification equals unbatched token for token, rows share forwards,
sessions join and leave between steps, and a failed forward fails only its own batch."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

import pytest
import torch

from cloud_verifier import lazy_head
from cloud_verifier.lazy_head import LazyLogits
from cloud_verifier.scheduler import BatchForwardError, BatchScheduler, SchedulerClosedError, split_by_feed_length
from cloud_verifier.session import ProposalLimits, VerifierSession
from cloud_verifier.verify import Rule, Verdict
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal, DraftToken, RoundOutcome
from tests.lossless_prompts import LOSSLESS_PROMPTS

MAX_NEW_TOKENS = 16


@dataclass
class FakeCache:
    length: int = 0


@dataclass
class FakePlanned:
    feed_ids: tuple[int, ...]

    def verify_rows(self, feed_logits: LazyLogits) -> LazyLogits:
        return feed_logits.tail(1)


def _echo_rule() -> Rule:
    row = yield 0
    return Verdict(accepted=0, next_token=int(row[0]))


@dataclass
class FakeSession:
    cache: FakeCache = field(default_factory=FakeCache)

    def rule(self, planned: FakePlanned) -> Rule:
        return _echo_rule()

    def commit(self, planned: FakePlanned, verdict: Verdict) -> RoundOutcome:
        return RoundOutcome((), verdict.next_token, b"x", 0, 0, False)


def _identity_head(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class FakeTarget:
    """Echoes each row's last fed id; can be told to fail, or to hold a forward until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail_on: int | None = None
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, rows):
        self.gate.wait()
        self.batches.append([len(ids) for _, ids in rows])
        if any(ids[-1] == self.fail_on for _, ids in rows):
            raise RuntimeError("boom\nsecond line")
        return [LazyLogits(torch.full((len(ids), 1), float(ids[-1])), _identity_head) for _, ids in rows]


def test_split_by_feed_length_keeps_prefills_apart() -> None:
    lengths = [1, 7, 60, 3, 50, 1, 200]
    groups = split_by_feed_length(lengths)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    assert [[lengths[row] for row in group] for group in groups] == [[1, 1, 3, 7], [50, 60, 200]]
    assert split_by_feed_length([5, 9, 12]) == [[0, 1, 2]]  # short feeds always share
    assert split_by_feed_length([]) == []


def test_lone_request_runs_at_once_and_queued_ones_share_a_forward() -> None:
    target = FakeTarget()
    scheduler = BatchScheduler(target, max_batch=3)

    async def scenario() -> None:
        assert (await scheduler.submit(FakeSession(), FakePlanned((1, 2)))).next_id == 2
        target.gate.clear()  # hold the worker in a forward while five more rounds queue up
        first = asyncio.ensure_future(scheduler.submit(FakeSession(), FakePlanned((9,))))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(scheduler.submit(FakeSession(), FakePlanned((i,)))) for i in range(10, 15)]
        await asyncio.sleep(0.05)
        target.gate.set()
        outcomes = await asyncio.gather(first, *rest)
        assert [o.next_id for o in outcomes] == [9, 10, 11, 12, 13, 14]

    asyncio.run(scenario())
    scheduler.close()
    assert target.batches == [[2], [1], [1, 1, 1], [1, 1]]  # max_batch 3: the rest waits a step
    counts = scheduler.metrics.counts()
    assert counts.forwards == 4 and counts.rows == 7 and counts.tokens_fed == 8
    assert counts.busy_ms > 0


def test_failed_forward_fails_only_its_batch() -> None:
    target = FakeTarget()
    target.fail_on = 666
    scheduler = BatchScheduler(target, max_batch=8)

    async def scenario() -> None:
        with pytest.raises(BatchForwardError, match="target forward failed: RuntimeError: boom$"):
            await scheduler.submit(FakeSession(), FakePlanned((666,)))
        assert (await scheduler.submit(FakeSession(), FakePlanned((5,)))).next_id == 5

    asyncio.run(scenario())
    scheduler.close()


def test_a_failed_batched_forward_is_retried_row_by_row_so_only_the_guilty_row_fails() -> None:
    target = FakeTarget()
    target.fail_on = 666
    scheduler = BatchScheduler(target, max_batch=8)

    async def scenario() -> list[object]:
        target.gate.clear()  # queue the four rounds into one step
        rounds = [asyncio.ensure_future(scheduler.submit(FakeSession(), FakePlanned((i,)))) for i in (1, 666, 3, 4)]
        await asyncio.sleep(0.05)
        target.gate.set()
        return await asyncio.gather(*rounds, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    scheduler.close()
    assert [o.next_id for o in (outcomes[0], outcomes[2], outcomes[3])] == [1, 3, 4]
    assert isinstance(outcomes[1], BatchForwardError)
    assert target.batches == [[1, 1, 1, 1], [1], [1], [1], [1]]  # the batch, then each row alone


class WorkerKilled(BaseException):
    """Not an Exception: escapes the per-forward handling, as a bug in the worker itself would."""


def test_a_dead_worker_fails_every_round_and_says_so() -> None:
    target = FakeTarget()
    scheduler = BatchScheduler(target, max_batch=8)

    def die(rows):
        raise WorkerKilled("worker bug")

    async def scenario() -> None:
        assert (await scheduler.submit(FakeSession(), FakePlanned((1,)))).next_id == 1
        assert scheduler.alive
        target.forward = die
        with pytest.raises(SchedulerClosedError, match="batch worker stopped: WorkerKilled: worker bug"):
            await scheduler.submit(FakeSession(), FakePlanned((2,)))
        assert not scheduler.alive
        with pytest.raises(SchedulerClosedError):
            await scheduler.submit(FakeSession(), FakePlanned((3,)))

    asyncio.run(scenario())
    scheduler.close()


def test_close_fails_queued_rounds() -> None:
    target = FakeTarget()
    scheduler = BatchScheduler(target, max_batch=1)

    async def scenario() -> None:
        target.gate.clear()
        running = asyncio.ensure_future(scheduler.submit(FakeSession(), FakePlanned((1,))))
        queued = asyncio.ensure_future(scheduler.submit(FakeSession(), FakePlanned((2,))))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(asyncio.to_thread(scheduler.close))
        await asyncio.sleep(0.05)
        target.gate.set()
        await closing
        assert (await running).next_id == 1
        with pytest.raises(SchedulerClosedError):
            await queued
        with pytest.raises(SchedulerClosedError):
            await scheduler.submit(FakeSession(), FakePlanned((3,)))

    asyncio.run(scenario())


def _greedy_reference(target, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    inputs = torch.tensor([prompt_ids])
    with torch.inference_mode():
        output = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                       do_sample=False)
    return output[0, len(prompt_ids):].tolist()


def _proposal(data: bytes, rng: random.Random) -> DraftProposal:
    """Bytes cut into 1-4 byte 'draft tokens' anywhere, characters included."""
    cuts = [0]
    while cuts[-1] < len(data):
        cuts.append(min(len(data), cuts[-1] + rng.randint(1, 4)))
    return DraftProposal(tuple(DraftToken(data[a:b]) for a, b in zip(cuts, cuts[1:])))


async def _drive(scheduler: BatchScheduler, session: VerifierSession, reference_bytes: bytes, seed: int,
                 start_after: asyncio.Event | None, started_steps: list[int]) -> list[int]:
    """Propose slices of the reference text (some corrupted, some empty) until the session finishes."""
    rng = random.Random(seed)
    if start_after is not None:
        await start_after.wait()
    started_steps.append(scheduler.metrics.counts().forwards)
    while not session.finished:
        done = len(session.output_bytes)
        chunk = reference_bytes[done : done + rng.randint(0, 12)]
        if chunk and rng.random() < 0.3:
            chunk = chunk[: rng.randrange(len(chunk))] + b"#"
        await scheduler.submit(session, session.plan(_proposal(chunk, rng)))
    return session.committed_ids[session.prompt_length :]


# 0: every step computes first rows alone, then the rest for the rounds that accepted x_1.
@pytest.mark.parametrize("lazy_from_rows", [lazy_head.LAZY_FROM_ROWS, 0])
def test_batched_greedy_equals_unbatched_generate(tiny_target, lazy_from_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_head, "LAZY_FROM_ROWS", lazy_from_rows)
    target, vocab = tiny_target
    prompts = LOSSLESS_PROMPTS[::3][:12]
    budgets = [MAX_NEW_TOKENS - 2 * (i % 4) for i in range(len(prompts))]  # sessions leave at different steps
    references = []
    for prompt, budget in zip(prompts, budgets):
        prompt_ids = vocab.tokenizer(prompt)["input_ids"]
        references.append((prompt_ids, _greedy_reference(target, prompt_ids, budget)))
    scheduler = BatchScheduler(target, max_batch=8)
    started_steps: list[int] = []

    async def scenario() -> list[list[int]]:
        late_start = asyncio.Event()
        tasks = []
        for index, ((prompt_ids, reference), budget) in enumerate(zip(references, budgets)):
            session = VerifierSession(vocab, list(prompt_ids), DecodingConfig(), budget, ProposalLimits())
            # The last third joins only once the others have run a few steps.
            gate = late_start if index >= 2 * len(prompts) // 3 else None
            tasks.append(asyncio.ensure_future(_drive(scheduler, session, vocab.decode_bytes(reference), index, gate,
                                                      started_steps)))
        while scheduler.metrics.counts().forwards < 3:
            await asyncio.sleep(0.01)
        late_start.set()
        return await asyncio.gather(*tasks)

    outputs = asyncio.run(scenario())
    scheduler.close()
    assert outputs == [reference for _, reference in references]
    assert max(started_steps) >= 3  # late sessions joined a running batch
    stats = scheduler.metrics.counts()
    assert stats.rows_per_forward > 1.5
    assert stats.committed_tokens == sum(len(reference) for _, reference in references)
