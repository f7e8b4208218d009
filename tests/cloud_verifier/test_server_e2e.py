"""The served path end to end: `specbridge serve` in a child process, edge clients over loopback gRPC.

Greedy output equals the target's own generate() token for token, alone and with many sessions
batched together; sessions are freed on cancel and disconnect; errors map to status codes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud_verifier.server import ServeConfig, ServeConfigError, start_server
from edge_client.client import EdgeClientError, VerifierClient
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.proposal import DraftProposal, DraftToken
from shared.wire import DraftTokenizerInfo, FinishReason, SessionRequest, encode_decoding, encode_proposal, encode_session_request
from specbridge.v1 import specbridge_pb2 as pb
from specbridge.v1 import specbridge_pb2_grpc
from tests.cloud_verifier.conftest import MAX_SESSIONS, ServedPair
from tests.lossless_prompts import CODE, HARD, LOSSLESS_PROMPTS, PROSE

MAX_NEW_TOKENS = 20
GREEDY = DecodingConfig()
REPO_ROOT = Path(__file__).resolve().parents[2]
MIXED_PROMPTS = CODE[:4] + PROSE[:4] + HARD[:6]


def run(coroutine):
    return asyncio.run(coroutine)


async def _wait_for_no_live_sessions(client: VerifierClient, timeout_s: float = 10.0) -> pb.VerifierStats:
    for _ in range(int(timeout_s / 0.05)):
        stats = await client.stats()
        if stats.live_sessions == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stats.live_sessions} sessions still live after {timeout_s} s")


def _open_message(prompt: str = "Hello", *, config: DecodingConfig = GREEDY, max_new_tokens: int = MAX_NEW_TOKENS,
                  settings: pb.DecodingSettings | None = None) -> pb.SpeculateRequest:
    request = SessionRequest(prompt=prompt, config=config, max_new_tokens=max_new_tokens,
                             draft_tokenizer=DraftTokenizerInfo("test", "byte_level_bpe", 0))
    message = encode_session_request(request)
    if settings is not None:
        message.decoding.CopyFrom(settings)
    return pb.SpeculateRequest(open=message)


async def _rpc_error(messages: list[pb.SpeculateRequest], address: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = specbridge_pb2_grpc.VerifierStub(channel).Speculate(iter(messages))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        return caught.value


def test_greedy_speculation_equals_target_generate(served_pair: ServedPair, edge_drafts) -> None:
    (draft,) = edge_drafts(served_pair, 1)

    async def scenario() -> list[str]:
        mismatches = []
        async with VerifierClient(served_pair.address) as client:
            for index, prompt in enumerate(MIXED_PROMPTS):
                # Fixed lengths and the adaptive one (None), each with draft-ahead on and off.
                result = await client.speculate(draft, prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS,
                                                draft_len=(1, 3, 6, None)[index % 4], draft_ahead=index % 3 != 0)
                if list(result.target_token_ids) != served_pair.reference(prompt, MAX_NEW_TOKENS):
                    mismatches.append(prompt)
                assert result.output_bytes == served_pair.vocab.decode_bytes(result.target_token_ids)
                assert result.prompt_token_count == len(served_pair.prompt_ids(prompt))
                assert result.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
                assert result.rounds == len(result.accepted_per_round) == len(result.round_trip_ms)
        return mismatches

    mismatches = run(scenario())
    assert not mismatches, f"{served_pair.name}: {len(mismatches)} of {len(MIXED_PROMPTS)} prompts differ, e.g. {mismatches[0]!r}"


def test_concurrent_sessions_are_lossless_and_share_forwards(served_pair: ServedPair, edge_drafts) -> None:
    speculative_prompts = LOSSLESS_PROMPTS[1::3][:18]
    generate_prompts = LOSSLESS_PROMPTS[2::7][:3]
    drafts = edge_drafts(served_pair, len(speculative_prompts))

    async def scenario():
        async with VerifierClient(served_pair.address) as client:
            before = await client.stats()
            speculative = [client.speculate(draft, prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=(1, 2, 4, 6, 8)[i % 5])
                           for i, (draft, prompt) in enumerate(zip(drafts, speculative_prompts))]
            target_only = [client.generate(prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS) for prompt in generate_prompts]
            results = await asyncio.gather(*speculative, *target_only)
            after = await _wait_for_no_live_sessions(client)
        return before, results, after

    before, results, after = run(scenario())
    for prompt, result in zip(speculative_prompts + generate_prompts, results):
        assert list(result.target_token_ids) == served_pair.reference(prompt, MAX_NEW_TOKENS), prompt
    forwards, rows = after.forwards - before.forwards, after.rows - before.rows
    assert rows / forwards > 1.5, f"{rows} rows in {forwards} forwards"
    assert after.sessions_opened - before.sessions_opened == len(results)
    assert after.committed_tokens - before.committed_tokens == sum(len(r.target_token_ids) for r in results)
    assert after.busy_ms > before.busy_ms


def test_generate_equals_target_generate(served_pair: ServedPair) -> None:
    async def scenario():
        async with VerifierClient(served_pair.address) as client:
            return [await client.generate(prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS) for prompt in MIXED_PROMPTS[::4]]

    for prompt, result in zip(MIXED_PROMPTS[::4], run(scenario())):
        assert list(result.target_token_ids) == served_pair.reference(prompt, MAX_NEW_TOKENS)
        assert all(count == 1 for count in result.committed_per_response)


def test_resume_from_any_point_continues_losslessly(served_pair: ServedPair, edge_drafts) -> None:
    (draft,) = edge_drafts(served_pair, 1)
    prompt = HARD[0]
    reference = served_pair.reference(prompt, MAX_NEW_TOKENS)

    async def scenario():
        async with VerifierClient(served_pair.address) as client:
            return [await client.speculate(draft, prompt, GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=4,
                                           resume_target_ids=reference[:cut],
                                           resume_bytes=served_pair.vocab.decode_bytes(reference[:cut]))
                    for cut in (1, 7, len(reference) - 1)]

    for result in run(scenario()):
        assert list(result.target_token_ids) == reference


def test_sampled_sessions_are_reproducible_with_a_seed(served_pair: ServedPair, edge_drafts) -> None:
    (draft,) = edge_drafts(served_pair, 1)
    configs = [DecodingConfig(mode=DecodeMode.SAMPLE, temperature=0.8, seed=7, rule=rule)
               for rule in (AcceptanceRule.POINT_MASS, AcceptanceRule.DRAFT_PROBS)]

    async def scenario():
        async with VerifierClient(served_pair.address) as client:
            return [[await client.speculate(draft, PROSE[0], config, max_new_tokens=12, draft_len=4) for _ in range(2)]
                    for config in configs]

    for first, second in run(scenario()):
        assert first.target_token_ids == second.target_token_ids
        assert 0 < len(first.target_token_ids) <= 12


def test_cancel_and_disconnect_free_the_session(served_pair: ServedPair, edge_drafts) -> None:
    (draft,) = edge_drafts(served_pair, 1)

    async def scenario() -> None:
        async with VerifierClient(served_pair.address) as client:
            first_text = asyncio.Event()
            task = asyncio.ensure_future(client.speculate(draft, PROSE[1], GREEDY, max_new_tokens=400, draft_len=2,
                                                          on_text=lambda _: first_text.set()))
            await first_text.wait()
            assert (await client.stats()).live_sessions == 1
            task.cancel()
            await _wait_for_no_live_sessions(client)

            channel = grpc.aio.insecure_channel(served_pair.address)
            call = specbridge_pb2_grpc.VerifierStub(channel).Speculate()
            await call.write(_open_message(max_new_tokens=400))
            assert (await call.read()).WhichOneof("kind") == "opened"
            await channel.close()  # the edge vanishes mid-session
            await _wait_for_no_live_sessions(client)

            result = await client.speculate(draft, PROSE[2], GREEDY, max_new_tokens=MAX_NEW_TOKENS, draft_len=3)
            assert list(result.target_token_ids) == served_pair.reference(PROSE[2], MAX_NEW_TOKENS)

    run(scenario())


@pytest.mark.parametrize("messages, expected", [
    ([_open_message(), pb.SpeculateRequest(draft=pb.Draft(tokens=[pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a", b"b"],
                                                                                 top_k_probs=[0.5])]))], "top-k"),
    ([_open_message(), pb.SpeculateRequest(draft=pb.Draft(tokens=[pb.DraftToken(token_bytes=b"a", top_k_bytes=[b"a"],
                                                                                 top_k_probs=[float("nan")])]))], "finite"),
    ([_open_message(), pb.SpeculateRequest(draft=encode_proposal(DraftProposal(tuple(DraftToken(b"x") for _ in range(17)))))],
     "at most 16"),
    ([pb.SpeculateRequest(draft=pb.Draft())], "must start with an 'open'"),
    ([_open_message(), _open_message()], "must be a 'draft'"),
    ([_open_message(settings=pb.DecodingSettings(mode=pb.DECODE_MODE_SAMPLE, temperature=0.0, top_p=1.0, rule=1))], "temperature"),
    ([_open_message(settings=pb.DecodingSettings(mode=9, temperature=1.0, top_p=1.0, rule=1))], "unknown decode mode"),
    ([_open_message(max_new_tokens=10**6)], "exceeds this verifier's limit"),
    ([_open_message(max_new_tokens=0)], "max_new_tokens must be >= 1"),
])
def test_bad_requests_are_invalid_argument(served_pair: ServedPair, messages, expected: str) -> None:
    error = run(_rpc_error(messages, served_pair.address))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details() and "\n" not in error.details()


def test_bad_generate_settings_are_invalid_argument(served_pair: ServedPair) -> None:
    async def scenario() -> EdgeClientError:
        async with VerifierClient(served_pair.address) as client:
            with pytest.raises(EdgeClientError) as caught:
                await client.generate("x", DecodingConfig(mode=DecodeMode.SAMPLE, top_p=0.5), max_new_tokens=0)
            return caught.value

    error = run(scenario())
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in str(error)
    request = pb.GenerateRequest(prompt="x", max_new_tokens=4, decoding=encode_decoding(GREEDY))
    request.decoding.top_p = 2.0

    async def raw() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(served_pair.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in specbridge_pb2_grpc.VerifierStub(channel).Generate(request):
                    pass
            return caught.value.code()

    assert run(raw()) is grpc.StatusCode.INVALID_ARGUMENT


def test_sessions_over_the_limit_are_resource_exhausted(served_pair: ServedPair) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(served_pair.address) as channel, VerifierClient(served_pair.address) as client:
            stub = specbridge_pb2_grpc.VerifierStub(channel)
            calls = []
            for _ in range(MAX_SESSIONS):
                call = stub.Speculate()
                await call.write(_open_message())
                assert (await call.read()).WhichOneof("kind") == "opened"
                calls.append(call)
            assert (await client.stats()).live_sessions == MAX_SESSIONS
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Speculate(iter([_open_message()])):
                    pass
            for call in calls:
                call.cancel()
            await _wait_for_no_live_sessions(client)
            return caught.value

    error = run(scenario())
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"maximum of {MAX_SESSIONS} sessions" in error.details()


def test_health_is_serving_and_reflection_lists_the_service(served_pair: ServedPair) -> None:
    async def scenario():
        async with grpc.aio.insecure_channel(served_pair.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = [(await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                        for name in ("", "specbridge.v1.Verifier")]
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = [r async for r in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        return statuses, {service.name for service in responses[0].list_services_response.service}

    statuses, services = run(scenario())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert {"specbridge.v1.Verifier", "grpc.health.v1.Health"} <= services


def _specbridge(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specbridge.cli", *arguments], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_edge_and_generate_cli_print_lossless_json(served_pair: ServedPair) -> None:
    prompt = MIXED_PROMPTS[1]
    edge = _specbridge("edge", "--server", served_pair.address, "--draft", str(served_pair.draft_onnx_dir), "--prompt", prompt,
                       "--max-new-tokens", str(MAX_NEW_TOKENS), "--draft-len", "4", "--json")
    generate = _specbridge("generate", "--server", served_pair.address, "--prompt", prompt, "--max-new-tokens",
                           str(MAX_NEW_TOKENS), "--json")
    for completed in (edge, generate):
        assert completed.returncode == 0, completed.stderr
        report = json.loads(completed.stdout)
        assert report["target_token_ids"] == served_pair.reference(prompt, MAX_NEW_TOKENS)
        assert report["text"] == served_pair.vocab.decode_bytes(report["target_token_ids"]).decode("utf-8", errors="replace")
        assert {"rounds", "accepted_per_round", "wall_ms"} <= report.keys()


def test_edge_cli_with_unreachable_server_fails_in_one_line(tiny_pair) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    completed = _specbridge("edge", "--server", f"127.0.0.1:{port}", "--draft", str(tiny_pair("tiny-gpt2-mistral").draft_onnx_dir),
                            "--prompt", "hello", "--max-retries", "0")  # retries on: the same line, said after the last
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"specbridge: error: cannot reach verifier at 127.0.0.1:{port} (UNAVAILABLE)"


def test_threads_must_be_at_least_one() -> None:
    assert ServeConfig(target="t", threads=1).threads == 1 and ServeConfig(target="t").threads is None
    with pytest.raises(ServeConfigError, match="--threads must be >= 1"):
        ServeConfig(target="t", threads=0)


def test_in_process_server_picks_a_free_port_and_stops(tiny_pair) -> None:
    async def scenario() -> tuple[int, int]:
        running = await start_server(ServeConfig(target=str(tiny_pair("tiny-gpt2-mistral").target_hf_dir), port=0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        finally:
            await running.stop(drain_s=0.5)
        return running.port, response.status

    port, status = run(scenario())
    assert port > 0 and status == health_pb2.HealthCheckResponse.SERVING


def test_serve_on_a_port_in_use_fails_in_one_line(served_pair: ServedPair) -> None:
    port = served_pair.address.rpartition(":")[2]
    completed = _specbridge("serve", "--target", str(served_pair.target_hf_dir), "--port", port)
    assert completed.returncode == 2
    message = completed.stderr.strip().splitlines()[-1]
    assert message == f"specbridge: error: cannot listen on 127.0.0.1:{port} (in use, or not an address of this machine)"
