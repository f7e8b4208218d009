"""The verifier's log lines: JSON objects that name their session, one line per session opening and
closing, rejected calls with their status code, and no prompt text unless `--log-prompts`."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest

from cloud_verifier.logs import SESSION_ID, LogFormat, log_handler
from edge_client.client import VerifierClient
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal, DraftToken
from shared.wire import DraftTokenizerInfo, SessionRequest, encode_proposal, encode_session_request
from specbridge.v1 import specbridge_pb2 as pb
from tests.cloud_verifier.test_metrics import PAIR, refused, serving, wait_for_no_live_sessions

GREEDY = DecodingConfig()
SPECULATED, GENERATED, REFUSED = "Zebras graze on the savanna", "Quokkas smile at tourists", "Narwhals hide tusks"
MAX_DRAFT_TOKENS = 4


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What the verifier's loggers write through the JSON handler `specbridge serve --log-format json` installs."""
    stream = io.StringIO()
    handler = log_handler(LogFormat.JSON, stream)
    verifier_log = logging.getLogger("cloud_verifier")
    level = verifier_log.level
    verifier_log.addHandler(handler)
    verifier_log.setLevel(logging.INFO)
    yield stream
    verifier_log.removeHandler(handler)
    verifier_log.setLevel(level)


def test_json_lines_carry_the_session_id_of_their_context_and_their_fields() -> None:
    stream = io.StringIO()
    logger = logging.Logger("cloud_verifier.test", logging.INFO)
    logger.addHandler(log_handler(LogFormat.JSON, stream))

    def in_a_session() -> None:
        SESSION_ID.set("abc123")
        logger.info("inside", extra={"fields": {"rounds": 3, "prompt": 'a "quoted"\nline'}})

    def outside_any_session() -> None:
        logger.info("outside")
        logger.info("explicit", extra={"session_id": "def456"})

    contextvars.copy_context().run(in_a_session)
    contextvars.Context().run(outside_any_session)  # a fresh context: whatever earlier tests left in this thread's
    inside, outside, explicit = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["session_id"] == "abc123" and inside["message"] == "inside" and inside["rounds"] == 3
    assert inside["prompt"] == 'a "quoted"\nline' and inside["level"] == "INFO" and inside["time"].endswith("+00:00")
    assert outside["session_id"] is None
    assert explicit["session_id"] == "def456"


def test_text_lines_name_the_session_and_quote_string_fields() -> None:
    stream = io.StringIO()
    logger = logging.Logger("cloud_verifier.test", logging.INFO)
    logger.addHandler(log_handler(LogFormat.TEXT, stream))
    logger.info("session closed", extra={"session_id": "abc123", "fields": {"rounds": 3, "error": "two\nlines"}})
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(' INFO cloud_verifier.test session=abc123: session closed rounds=3 error="two\\nlines"')


async def _refused_in_session(address: str) -> grpc.StatusCode:
    """A session opened, then a proposal longer than the verifier allows: INVALID_ARGUMENT inside the session."""
    request = SessionRequest(prompt=REFUSED, config=GREEDY, max_new_tokens=8,
                             draft_tokenizer=DraftTokenizerInfo("test", "byte_level_bpe", 0))
    too_long = DraftProposal(tuple(DraftToken(b"x") for _ in range(MAX_DRAFT_TOKENS + 1)))
    return await refused(address, [pb.SpeculateRequest(open=encode_session_request(request)),
                                   pb.SpeculateRequest(draft=encode_proposal(too_long))])


def test_one_line_per_session_opening_and_closing_and_no_prompt_text(tiny_pair, edge_drafts, log_lines) -> None:
    (draft,) = edge_drafts(tiny_pair(PAIR), 1)

    async def scenario():
        async with serving(tiny_pair, max_draft_tokens=MAX_DRAFT_TOKENS) as running:
            address = f"127.0.0.1:{running.port}"
            async with VerifierClient(address) as client:
                speculated = await client.speculate(draft, SPECULATED, GREEDY, max_new_tokens=10, draft_len=3)
                generated = await client.generate(GENERATED, GREEDY, max_new_tokens=6)
                code = await _refused_in_session(address)
                await wait_for_no_live_sessions(client)
        return speculated, generated, code

    speculated, generated, code = asyncio.run(scenario())
    text = log_lines.getvalue()
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert not any(prompt in text for prompt in (SPECULATED, GENERATED, REFUSED)), "prompt text reached the log"
    lines = [json.loads(line) for line in text.splitlines()]
    opened = {line["session_id"]: line for line in lines if line["message"] == "session opened"}
    closed = {line["session_id"]: line for line in lines if line["message"] == "session closed"}
    assert len(opened) == 3 and opened.keys() == closed.keys() and None not in opened
    by_outcome = {(line["rpc"], line["finish_reason"]): line for line in closed.values()}
    spoken, target_only, refused = (by_outcome[("Speculate", speculated.finish_reason.value)],
                                    by_outcome[("Generate", generated.finish_reason.value)], by_outcome[("Speculate", "error")])
    assert (spoken["rounds"], spoken["committed_tokens"]) == (speculated.rounds, len(speculated.target_token_ids))
    assert (target_only["rounds"], target_only["committed_tokens"]) == (generated.rounds, len(generated.target_token_ids))
    assert opened[spoken["session_id"]]["prompt_tokens"] == speculated.prompt_token_count
    assert opened[spoken["session_id"]]["mode"] == "greedy" and spoken["duration_ms"] > 0
    assert (refused["rounds"], refused["error"]) == (0, "ProposalError")
    (rejection,) = (line for line in lines if line["message"] == "call rejected")
    assert rejection["status_code"] == "INVALID_ARGUMENT" and rejection["session_id"] == refused["session_id"]
    assert f"at most {MAX_DRAFT_TOKENS} draft tokens" in rejection["error"]


def test_log_prompts_puts_the_prompt_in_the_opening_line(tiny_pair, log_lines) -> None:
    async def scenario() -> None:
        async with serving(tiny_pair, log_prompts=True) as running, VerifierClient(f"127.0.0.1:{running.port}") as client:
            await client.generate(GENERATED, GREEDY, max_new_tokens=2)
            await wait_for_no_live_sessions(client)

    asyncio.run(scenario())
    (opened,) = (line for line in map(json.loads, log_lines.getvalue().splitlines()) if line["message"] == "session opened")
    assert opened["prompt"] == GENERATED
