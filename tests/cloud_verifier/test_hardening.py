"""A verifier that does not trust its clients: every per-request quantity is bounded with a precise status
code, silent sessions expire, one client cannot hold every session, a dead batch worker or a draining
server says so (health NOT_SERVING, UNAVAILABLE), and a fuzzer throwing malformed streams at a live
server never gets INTERNAL while an honest session beside it finishes token-identical.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig, start_server
from cloud_verifier.session import ProposalLimits, VerifierSession
from edge_client.client import EdgeClientError, VerifierClient
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal, DraftToken
from shared.wire import GenerationRequest, encode_generation_request
from specbridge.loading import load_target
from specbridge.v1 import specbridge_pb2 as pb
from specbridge.v1 import specbridge_pb2_grpc
from tests.cloud_verifier.conftest import ServedPair
from tests.cloud_verifier.test_server_e2e import _open_message, _rpc_error, _wait_for_no_live_sessions, run

PAIR = "tiny-gpt2-mistral"
LIMITS = dict(max_sessions=6, max_sessions_per_client=3, max_top_k=8, max_token_bytes=32, max_prompt_bytes=4000,
              max_prompt_tokens=300, idle_timeout_s=4.0, max_message_bytes=1 << 20)  # idle: room for a slow CI machine
HONEST_PROMPT = "The history of the printing press"
HONEST_TOKENS = 24
SPECULATE = "/specbridge.v1.Verifier/Speculate"
# What a malformed stream may be answered with: precise codes, never INTERNAL or UNKNOWN.
PRECISE_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class HardenedServer(ServedPair):
    metrics_url: str = ""


@pytest.fixture(scope="module")
def hardened(tiny_pair) -> Iterator[HardenedServer]:
    """The tiny target served with small limits, so each can be crossed cheaply."""
    pair = tiny_pair(PAIR)
    target, vocab = load_target(pair.target_hf_dir, dtype=torch.float64)
    config = ServeConfig(target=str(pair.target_hf_dir), port=0, dtype="float64", metrics_port=_free_port(), **LIMITS)
    with VerifierProcess(config) as verifier:
        yield HardenedServer(PAIR, verifier.address, Path(pair.draft_onnx_dir), Path(pair.target_hf_dir), target, vocab,
                             metrics_url=f"http://127.0.0.1:{config.metrics_port}/metrics")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rejected_by_code(metrics_url: str) -> dict[str, float]:
    """The server's own count of the calls it ended with an error status, by code."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {sample.labels["code"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "specbridge:rejected_calls_total"}


def _draft(*tokens: pb.DraftToken) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(draft=pb.Draft(tokens=list(tokens)))


def _resume(ids: list[int]) -> pb.SpeculateRequest:
    message = _open_message()
    message.open.resume_target_ids.extend(ids)
    return message


@dataclass(frozen=True)
class Refusal:
    messages: list[pb.SpeculateRequest]
    code: grpc.StatusCode
    says: str


REFUSALS = {
    "top-k wider than --max-top-k": Refusal(
        [_open_message(), _draft(pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a"] * 9, top_k_probs=[0.1] * 9))],
        grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-top-k"),
    "a draft token longer than --max-token-bytes": Refusal(
        [_open_message(), _draft(pb.DraftToken(token_bytes=b"a" * 33))], grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-token-bytes"),
    "a top-k alternative longer than --max-token-bytes": Refusal(
        [_open_message(), _draft(pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"b" * 40], top_k_probs=[0.5]))],
        grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-token-bytes"),
    "thousands of one-byte tokens": Refusal(
        [_open_message(), _draft(*[pb.DraftToken(token_bytes=b"a")] * 5000)], grpc.StatusCode.INVALID_ARGUMENT, "at most 16"),
    "a prompt past --max-prompt-bytes": Refusal(
        [_open_message("word " * 1000)], grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-prompt-bytes"),
    "a prompt past --max-prompt-tokens": Refusal(
        [_open_message("to be " * 330)], grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-prompt-tokens"),
    "a prompt and budget past the model's positions": Refusal(
        [_open_message("Hello", max_new_tokens=2048)], grpc.StatusCode.OUT_OF_RANGE, "positions"),
    "a message past --max-message-bytes": Refusal(
        [_open_message("x" * (1 << 20))], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "resume ids past the embedding": Refusal(
        [_resume([5, 10**6])], grpc.StatusCode.INVALID_ARGUMENT, "out of the target's vocabulary"),
    "a draft before the open": Refusal([_draft(pb.DraftToken(token_bytes=b"a"))], grpc.StatusCode.INVALID_ARGUMENT, "'open'"),
    "a second open": Refusal([_open_message(), _open_message()], grpc.StatusCode.INVALID_ARGUMENT, "must be a 'draft'"),
    "negative probabilities": Refusal(
        [_open_message(), _draft(pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a"], top_k_probs=[-0.5]))],
        grpc.StatusCode.INVALID_ARGUMENT, "[0, 1]"),
    "probabilities above one": Refusal(
        [_open_message(), _draft(pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a"], top_k_probs=[1.5]))],
        grpc.StatusCode.INVALID_ARGUMENT, "[0, 1]"),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_each_limit_and_malformation_gets_its_precise_status(hardened: HardenedServer, case: Refusal) -> None:
    error = run(_rpc_error(case.messages, hardened.address))
    assert error.code() is case.code, error.details()
    assert case.says in error.details() and "\n" not in error.details()


def test_resume_ids_holding_eos_are_refused(hardened: HardenedServer) -> None:
    eos = hardened.vocab.tokenizer.eos_token_id
    error = run(_rpc_error([_resume([5, eos])], hardened.address))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "EOS" in error.details()


def test_a_long_re_tokenization_is_cut_relative_to_the_draft(tiny_target) -> None:
    """Bytes that re-tokenize one target token per byte must not buy a forward over thousands of positions."""
    _, vocab = tiny_target
    limits = ProposalLimits(max_draft_tokens=4, max_token_bytes=64, max_proxy_per_draft_token=4)
    session = VerifierSession(vocab, vocab.encode("Hello"), DecodingConfig(), 1000, limits)
    odd = "\u0b95\u0bcd\u0bb7\u0bc0\u0f40\u0f71".encode() * 3  # rare scripts: byte fallback, about a token a byte
    proposal = DraftProposal(tuple(DraftToken(odd) for _ in range(4)))
    planned = session.plan(proposal)
    assert len(planned.proxy_ids) == 4 * 4  # 4 draft tokens x 4, not one per byte (4 x 54)
    assert len(planned.feed_ids) <= len(session.committed_ids) + 16


def test_a_silent_session_expires_and_frees_its_slot(hardened: HardenedServer) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(hardened.address) as channel, VerifierClient(hardened.address) as client:
            call = specbridge_pb2_grpc.VerifierStub(channel).Speculate()
            await call.write(_open_message())
            assert (await call.read()).WhichOneof("kind") == "opened"
            assert (await client.stats()).live_sessions == 1
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # then nothing is sent for longer than the timeout
                await call.read()
            await _wait_for_no_live_sessions(client)
            return caught.value

    error = run(scenario())
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and "--idle-timeout-s" in error.details()


def test_one_client_cannot_hold_every_session(hardened: HardenedServer) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(hardened.address) as channel, VerifierClient(hardened.address) as client:
            stub = specbridge_pb2_grpc.VerifierStub(channel)
            calls = []
            for _ in range(LIMITS["max_sessions_per_client"]):
                call = stub.Speculate()
                await call.write(_open_message())
                assert (await call.read()).WhichOneof("kind") == "opened"
                calls.append(call)
            refused = stub.Speculate()
            await refused.write(_open_message())
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused.read()
            calls.pop().cancel()  # one slot of this client's frees up: it may open again
            await asyncio.sleep(0.2)
            again = stub.Speculate()
            await again.write(_open_message())
            assert (await again.read()).WhichOneof("kind") == "opened"
            for call in [*calls, again]:
                call.cancel()
            await _wait_for_no_live_sessions(client)
            return caught.value

    error = run(scenario())
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "this client already holds" in error.details()


# -- the fuzzer: malformed, truncated, out-of-order and semantically wrong streams at a live server --

_token = st.builds(lambda data, alternatives, probabilities: pb.DraftToken(
    token_bytes=data, top_k_bytes=alternatives, top_k_probs=probabilities),
    st.binary(max_size=40), st.lists(st.binary(max_size=6), max_size=10),
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.just(0.5)), max_size=10))
_settings = st.builds(lambda mode, temperature, top_p, top_k, rule: pb.DecodingSettings(
    mode=mode, temperature=temperature, top_p=top_p, top_k=top_k, rule=rule),
    st.integers(0, 3), st.floats(allow_nan=True, width=32), st.floats(allow_nan=True, width=32), st.integers(-5, 50),
    st.integers(0, 4))
_open = st.builds(lambda prompt, settings_, budget, resume: pb.SpeculateRequest(open=pb.OpenSession(
    prompt=prompt, decoding=settings_, max_new_tokens=budget, resume_target_ids=resume)),
    st.text(max_size=60), _settings, st.integers(0, 3000), st.lists(st.integers(0, 70000), max_size=6))
_message = st.one_of(_open, st.builds(lambda tokens, eos: pb.SpeculateRequest(draft=pb.Draft(tokens=tokens, ends_with_eos=eos)),
                                      st.lists(_token, max_size=20), st.booleans()),
                     st.just(pb.SpeculateRequest()))
# A stream: parsed messages (serialized here), or raw bytes that are not a valid protobuf at all.
_stream = st.one_of(st.lists(_message.map(lambda m: m.SerializeToString()), min_size=1, max_size=5),
                    st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=3))


async def _throw(channel: grpc.aio.Channel, frames: list[bytes]) -> grpc.StatusCode | None:
    """The server's status for a stream of raw frames; None when a write raced the server's refusal (the
    client library then reports its own INTERNAL, not the server's status: the server's count tells)."""
    call = channel.stream_stream(SPECULATE, request_serializer=None, response_deserializer=None)()
    try:
        for frame in frames:
            await call.write(frame)
        await call.done_writing()
    except grpc.aio.AioRpcError:
        return None
    except asyncio.InvalidStateError:  # refused before the last frame went out; its status is the server's
        pass
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass
    return await call.code()


def test_fuzzed_streams_get_precise_codes_while_an_honest_session_stays_exact(hardened: HardenedServer, edge_drafts) -> None:
    reference = hardened.reference(HONEST_PROMPT, HONEST_TOKENS)
    (draft,) = edge_drafts(hardened, 1)
    codes: list[grpc.StatusCode] = []

    async def scenario() -> tuple[list[int], pb.VerifierStats, int]:
        async with grpc.aio.insecure_channel(hardened.address) as channel, VerifierClient(hardened.address) as client:
            loop = asyncio.get_running_loop()
            honest = asyncio.ensure_future(client.speculate(draft, HONEST_PROMPT, DecodingConfig(),
                                                            max_new_tokens=HONEST_TOKENS, draft_len=3))

            @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(_stream)
            def throw(frames: list[bytes]) -> None:
                codes.append(asyncio.run_coroutine_threadsafe(_throw(channel, frames), loop).result())

            await asyncio.to_thread(throw)
            result = await honest
            stats = await _wait_for_no_live_sessions(client)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            return list(result.target_token_ids), stats, health.status

    rejected_before = _rejected_by_code(hardened.metrics_url)
    honest_ids, stats, health = run(scenario())
    rejected = _rejected_by_code(hardened.metrics_url)
    assert honest_ids == reference
    assert set(codes) <= PRECISE_CODES | {grpc.StatusCode.OK, None}, set(codes)
    assert rejected.get("INTERNAL", 0) == rejected_before.get("INTERNAL", 0) and rejected.get("UNKNOWN", 0) == 0, rejected
    assert sum(rejected.values()) - sum(rejected_before.values()) >= codes.count(grpc.StatusCode.INVALID_ARGUMENT) > 0
    assert stats.live_sessions == 0 and stats.cache_bytes == 0
    assert health == health_pb2.HealthCheckResponse.SERVING


# -- the worker and the shutdown: in-process, so that the test can break the model or stop the server --

def _serve_config(tiny_pair) -> ServeConfig:
    return ServeConfig(target=str(tiny_pair(PAIR).target_hf_dir), port=0, dtype="float64", drain_s=10.0)


def _greedy_generation(prompt: str, max_new_tokens: int) -> pb.GenerateRequest:
    return encode_generation_request(GenerationRequest(prompt=prompt, config=DecodingConfig(), max_new_tokens=max_new_tokens))


async def _health(channel: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status


class ModelCrash(BaseException):
    """Not an Exception: it escapes the per-forward handling, as a bug in the worker itself would."""


def test_a_dead_batch_worker_turns_health_to_not_serving_and_rounds_to_unavailable(tiny_pair) -> None:
    async def scenario() -> tuple[int, int, EdgeClientError]:
        running = await start_server(_serve_config(tiny_pair))
        address = f"127.0.0.1:{running.port}"
        try:
            async with grpc.aio.insecure_channel(address) as channel, VerifierClient(address) as client:
                before = await _health(channel)

                def crash(rows):
                    raise ModelCrash("the model crashed")

                running.engine.scheduler.target.forward = crash
                with pytest.raises(EdgeClientError) as caught:
                    await client.generate("Hello", DecodingConfig(), max_new_tokens=4)
                for _ in range(40):
                    if (after := await _health(channel)) != health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.1)
                return before, after, caught.value
        finally:
            await running.stop(drain_s=0.5)

    before, after, error = run(scenario())
    assert before == health_pb2.HealthCheckResponse.SERVING and after == health_pb2.HealthCheckResponse.NOT_SERVING
    assert error.code is grpc.StatusCode.UNAVAILABLE


def test_draining_refuses_new_sessions_and_lets_live_ones_finish(tiny_pair, tiny_target) -> None:
    target, vocab = tiny_target
    prompt_ids = list(vocab.tokenizer(HONEST_PROMPT)["input_ids"])
    with torch.inference_mode():
        inputs = torch.tensor([prompt_ids])
        reference = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=HONEST_TOKENS,
                                          do_sample=False)[0, len(prompt_ids):].tolist()

    async def scenario() -> tuple[list[int], int, grpc.aio.AioRpcError]:
        running = await start_server(_serve_config(tiny_pair))
        address = f"127.0.0.1:{running.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = specbridge_pb2_grpc.VerifierStub(channel)
            live = stub.Speculate()  # a session the client paces: it is live while the server drains
            await live.write(_open_message(HONEST_PROMPT, max_new_tokens=HONEST_TOKENS))
            assert (await live.read()).WhichOneof("kind") == "opened"
            stopping = asyncio.ensure_future(running.stop())
            await asyncio.sleep(0.2)
            health = await _health(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Generate(_greedy_generation("Hi", 2)):
                    pass
            ids: list[int] = []
            finished = False
            while not finished:  # empty drafts: the target's own token each round
                await live.write(pb.SpeculateRequest(draft=pb.Draft()))
                result = (await live.read()).round
                ids += [*result.accepted_ids, *([result.correction_id] if result.HasField("correction_id") else [])]
                finished = result.finished
            await stopping
            return ids, health, refused.value

    ids, health, refused = run(scenario())
    assert ids == reference
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused.code() is grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details()
