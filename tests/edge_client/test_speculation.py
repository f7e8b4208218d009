"""The loop's drafter threads: a cancelled generation gives its drafter back only once no thread uses it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edge_client.speculation import on_drafter_thread


def test_a_cancelled_caller_waits_for_the_drafting_thread_before_it_lets_go() -> None:
    release = threading.Event()
    events: list[str] = []

    def draft_step() -> str:
        release.wait(5)
        events.append("thread done")
        return "draft"

    async def scenario() -> None:
        generation = asyncio.ensure_future(on_drafter_thread(draft_step))
        await asyncio.sleep(0.05)
        generation.cancel()
        await asyncio.sleep(0.05)
        assert not generation.done()  # cancelled, but the thread still owns the drafter
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await generation
        events.append("caller let go")

    asyncio.run(scenario())
    assert events == ["thread done", "caller let go"]


def test_an_uncancelled_caller_gets_the_threads_result_or_error() -> None:
    def fail() -> None:
        raise ValueError("bad draft")

    async def scenario() -> str:
        with pytest.raises(ValueError, match="bad draft"):
            await on_drafter_thread(fail)
        return await on_drafter_thread(str.upper, "draft")

    assert asyncio.run(scenario()) == "DRAFT"
