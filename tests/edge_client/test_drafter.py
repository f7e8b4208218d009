"""The drafter's draft-ahead and byte re-sync, step by step on a real ONNX draft (a tiny pair's).

What survives a verdict is decided by the committed bytes alone: tokens drafted ahead continue
into the next proposal exactly when the committed text ends on a drafted token's boundary, and a
proposal built from survivors equals the one a freshly started drafter makes on the same text.
"""

from __future__ import annotations

import threading

import pytest

from edge_client.drafter import Drafter
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from specbridge.loading import load_drafter

GREEDY = DecodingConfig()
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def drafter(tiny_pair) -> Drafter:
    return load_drafter(tiny_pair("tiny-gpt2-mistral").draft_onnx_dir)


def _never() -> threading.Event:
    return threading.Event()


def _fresh_proposal(drafter: Drafter, text: str, draft_len: int) -> tuple[bytes, ...]:
    drafter.start(text)
    return tuple(token.token_bytes for token in drafter.propose(draft_len, GREEDY).tokens)


def test_ahead_tokens_survive_when_the_verdict_ends_on_their_boundary(drafter: Drafter) -> None:
    drafted_at_once = _fresh_proposal(drafter, PROMPT, 7)
    drafter.start(PROMPT)
    proposal = drafter.propose(3, GREEDY)
    assert tuple(t.token_bytes for t in proposal.tokens) == drafted_at_once[:3]
    assert drafter.draft_ahead(4, GREEDY, _never()) == 4
    # The verdict accepts the proposal, and its bonus token is the draft's own next token.
    assert drafter.commit(b"".join(drafted_at_once[:4])) == 3
    survivors = drafter.propose(3, GREEDY)
    assert tuple(t.token_bytes for t in survivors.tokens) == drafted_at_once[4:]


def test_a_correction_rolls_the_ahead_draft_back(drafter: Drafter) -> None:
    drafter.start(PROMPT)
    proposal = drafter.propose(4, GREEDY)
    drafter.draft_ahead(3, GREEDY, _never())
    first = proposal.tokens[0].token_bytes
    correction = b" zzq"  # not what the draft proposed second
    assert proposal.tokens[1].token_bytes != correction
    assert drafter.commit(first + correction) == 0
    assert drafter.ahead_count == 0
    after = tuple(t.token_bytes for t in drafter.propose(2, GREEDY).tokens)
    assert after == _fresh_proposal(drafter, PROMPT + (first + correction).decode("utf-8"), 2)


def test_a_set_stop_event_drafts_nothing_ahead(drafter: Drafter) -> None:
    drafter.start(PROMPT)
    drafter.propose(2, GREEDY)
    stop = threading.Event()
    stop.set()
    assert drafter.draft_ahead(5, GREEDY, stop) == 0


def test_greedy_and_point_mass_send_no_top_k_and_the_sampling_rules_do(drafter: Drafter) -> None:
    drafter.start(PROMPT)
    assert all(not token.top_k for token in drafter.propose(3, GREEDY).tokens)
    point_mass = DecodingConfig(mode=DecodeMode.SAMPLE, seed=1)
    drafter.start(PROMPT)
    assert all(not token.top_k for token in drafter.propose(3, point_mass).tokens)
    approx = DecodingConfig(mode=DecodeMode.SAMPLE, seed=1, rule=AcceptanceRule.DTW_TRANSFER_APPROX)
    drafter.start(PROMPT)
    assert all(token.top_k for token in drafter.propose(3, approx).tokens)


def test_sampled_tokens_drafted_ahead_are_those_a_fresh_draft_draws(drafter: Drafter) -> None:
    config = DecodingConfig(mode=DecodeMode.SAMPLE, seed=11, rule=AcceptanceRule.DTW_TRANSFER_APPROX)
    drafter.start(PROMPT, seed=5)
    proposal = drafter.propose(2, config)
    drafter.draft_ahead(6, config, _never())
    drafter.commit(proposal.text_bytes)
    with_ahead = tuple(t.token_bytes for t in drafter.propose(4, config).tokens)
    drafter.start(PROMPT, seed=5)
    proposal_again = drafter.propose(2, config)
    drafter.commit(proposal_again.text_bytes)
    without_ahead = tuple(t.token_bytes for t in drafter.propose(4, config).tokens)
    assert proposal_again == proposal and with_ahead == without_ahead
