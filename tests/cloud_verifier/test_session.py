"""The verifier session on proposals cut from the target's own continuation: high acceptance across
vocabularies, seams inside words and characters, corrupted tails, EOS and the token budget."""

import random

import pytest
import torch

from cloud_verifier.errors import ProposalError, SessionFinishedError
from cloud_verifier.session import ProposalLimits, VerifierSession
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.proposal import DraftProposal, DraftToken
from specbridge.loading import load_target
from tests.lossless_prompts import LOSSLESS_PROMPTS

MAX_NEW_TOKENS = 24


def _proposal_from(data: bytes, rng: random.Random) -> DraftProposal:
    """Cut bytes into 'draft tokens' of 1-5 bytes: any byte offset, inside characters too."""
    tokens, position = [], 0
    while position < len(data):
        step = rng.randint(1, 5)
        tokens.append(DraftToken(token_bytes=data[position : position + step]))
        position += step
    return DraftProposal(tokens=tuple(tokens))


def _run_oracle(session: VerifierSession, target, reference_bytes: bytes, rng: random.Random, corrupt: float) -> list[int]:
    while not session.finished:
        done = len(session.output_bytes)
        chunk = reference_bytes[done : done + rng.randint(0, 24)]
        if chunk and rng.random() < corrupt:
            cut = rng.randrange(len(chunk))
            chunk = chunk[:cut] + b"#" + chunk[cut + 1 :]
        planned = session.plan(_proposal_from(chunk, rng))
        session.decide(planned, target.forward([(session.cache, planned.feed_ids)])[0])
    return session.committed_ids[session.prompt_length :]


@pytest.fixture(scope="module", params=["tiny-gpt2-mistral", "tiny-deepseek-gpt2", "tiny-mistral-gemma3arch"])
def target_and_vocab(request, tiny_pair):
    return load_target(tiny_pair(request.param).target_hf_dir, dtype=torch.float64)


def test_oracle_proposals_are_lossless_and_mostly_accepted(target_and_vocab) -> None:
    target, vocab = target_and_vocab
    rng = random.Random(0)
    accepted = proposed = 0
    for prompt in LOSSLESS_PROMPTS[::3]:
        prompt_ids = vocab.tokenizer(prompt)["input_ids"]
        inputs = torch.tensor([prompt_ids])
        with torch.inference_mode():
            reference = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_NEW_TOKENS,
                                              do_sample=False)[0, len(prompt_ids):].tolist()
        session = VerifierSession(vocab, prompt_ids, DecodingConfig(), MAX_NEW_TOKENS, ProposalLimits(max_draft_tokens=64))
        assert _run_oracle(session, target, vocab.decode_bytes(reference), rng, corrupt=0.3) == reference
        assert session.output_bytes == vocab.decode_bytes(reference)
    # Proposals re-tokenized from the target's own text are accepted most of the time.
    session = VerifierSession(vocab, vocab.tokenizer(LOSSLESS_PROMPTS[0])["input_ids"], DecodingConfig(), MAX_NEW_TOKENS, ProposalLimits(max_draft_tokens=64))
    inputs = torch.tensor([session.committed_ids])
    with torch.inference_mode():
        reference = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_NEW_TOKENS,
                                          do_sample=False)[0, inputs.shape[1]:].tolist()
    text = vocab.decode_bytes(reference)
    while not session.finished:
        planned = session.plan(DraftProposal(tokens=(DraftToken(text[len(session.output_bytes):][:40]),)))
        outcome = session.decide(planned, target.forward([(session.cache, planned.feed_ids)])[0])
        accepted += len(outcome.accepted_ids)
        proposed += outcome.proposed_count
    # The last proxy token of a chunk cut mid-word is usually rejected (the target would merge on).
    assert accepted >= 0.5 * proposed


def test_budget_and_finish(target_and_vocab) -> None:
    target, vocab = target_and_vocab
    session = VerifierSession(vocab, vocab.encode("hello world"), DecodingConfig(), 3, ProposalLimits(max_draft_tokens=8))
    planned = session.plan(DraftProposal(tokens=tuple(DraftToken(b"ab") for _ in range(8))))
    assert len(planned.proxy_ids) <= 2  # 3 tokens of budget: at most 2 proposed + 1 correction
    while not session.finished:
        planned = session.plan(DraftProposal(tokens=(DraftToken(b" the"),)))
        session.decide(planned, target.forward([(session.cache, planned.feed_ids)])[0])
    assert session.generated_count <= 3
    with pytest.raises(SessionFinishedError):
        session.plan(DraftProposal(tokens=()))


def test_bad_proposals_are_rejected(target_and_vocab) -> None:
    _, vocab = target_and_vocab
    with pytest.raises(ProposalError):
        VerifierSession(vocab, vocab.encode("x"), DecodingConfig(), 4, ProposalLimits(max_draft_tokens=2)).plan(
            DraftProposal(tokens=(DraftToken(b"a"),) * 3))
    with pytest.raises(ProposalError):
        VerifierSession(vocab, [], DecodingConfig(), 4, ProposalLimits(max_draft_tokens=2))
    session = VerifierSession(vocab, vocab.encode("x"), DecodingConfig(mode=DecodeMode.SAMPLE, rule=AcceptanceRule.DRAFT_PROBS), 4, ProposalLimits(max_draft_tokens=4))
    with pytest.raises(ProposalError):
        session.plan(DraftProposal(tokens=(DraftToken("\U0010fffd\U0010fffd".encode(), ((b"x", 1.0),)),)))
