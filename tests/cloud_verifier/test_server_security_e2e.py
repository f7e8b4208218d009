"""TLS, mutual TLS and bearer tokens over real sockets: the verifier started as `specbridge serve` starts it
(in-process, then as a child process for the SIGHUP reload), the edge's VerifierClient on the other end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud_verifier.auth import UNAUTHENTICATED_MESSAGE
from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig, start_server
from edge_client.client import EdgeClientError, VerifierClient
from shared.channel_security import ChannelSecurity, open_channel
from shared.decoding import DecodingConfig
from shared.wire import DraftTokenizerInfo, SessionRequest, encode_session_request
from specbridge.cli import main
from specbridge.v1 import specbridge_pb2 as pb
from specbridge.v1 import specbridge_pb2_grpc
from tests.certificates import Certificates, make_certificates

PAIR = "tiny-gpt2-mistral"
NEW_TOKENS = 3
RELOAD_WAIT_S = 30.0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def target(tiny_pair) -> str:
    return str(tiny_pair(PAIR).target_hf_dir)


def _token_file(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


@asynccontextmanager
async def serving(config: ServeConfig) -> AsyncIterator[str]:
    running = await start_server(config)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(drain_s=0)


async def _refusal(address: str, security: ChannelSecurity) -> EdgeClientError | None:
    """None when GetStats and then a generation go through; otherwise the edge's error (GetStats first: a refused
    generation would be retried, GetStats is not)."""
    try:
        async with VerifierClient(address, security) as client:
            await client.stats()
            result = await client.generate("Hello", DecodingConfig(), max_new_tokens=NEW_TOKENS)
        assert len(result.target_token_ids) == NEW_TOKENS
        return None
    except EdgeClientError as error:
        return error


def _codes(refusals: list[EdgeClientError | None]) -> list[grpc.StatusCode | None]:
    return [None if refusal is None else refusal.code for refusal in refusals]


def test_tls_serves_a_client_that_trusts_the_ca_and_no_other(target: str, certificates: Certificates) -> None:
    config = ServeConfig(target=target, port=0, tls_cert=str(certificates.server_cert), tls_key=str(certificates.server_key))

    async def scenario() -> list[EdgeClientError | None]:
        async with serving(config) as address:
            return [await _refusal(address, security) for security in (
                ChannelSecurity(tls_ca=str(certificates.server_ca)),
                ChannelSecurity(tls=True),  # the system's CAs never signed a throwaway certificate
                ChannelSecurity(tls_ca=str(certificates.client_ca)),  # a CA, but not the verifier's
                ChannelSecurity())]  # plaintext to a TLS port

    refusals = asyncio.run(scenario())
    assert _codes(refusals) == [None] + [grpc.StatusCode.UNAVAILABLE] * 3
    assert str(refusals[1]).startswith("cannot reach verifier at 127.0.0.1:")


def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(target: str, certificates: Certificates) -> None:
    config = ServeConfig(target=target, port=0, tls_cert=str(certificates.server_cert), tls_key=str(certificates.server_key),
                         tls_client_ca=str(certificates.client_ca))
    ca = str(certificates.server_ca)

    async def scenario() -> list[EdgeClientError | None]:
        async with serving(config) as address:
            return [await _refusal(address, security) for security in (
                ChannelSecurity(tls_ca=ca, tls_cert=str(certificates.client_cert), tls_key=str(certificates.client_key)),
                ChannelSecurity(tls_ca=ca),
                ChannelSecurity(tls_ca=ca, tls_cert=str(certificates.stranger_cert), tls_key=str(certificates.stranger_key)))]

    assert _codes(asyncio.run(scenario())) == [None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]


def _open_session() -> pb.SpeculateRequest:
    request = SessionRequest(prompt="Hello", config=DecodingConfig(), max_new_tokens=NEW_TOKENS,
                             draft_tokenizer=DraftTokenizerInfo("test", "byte_level_bpe", 0))
    return pb.SpeculateRequest(open=encode_session_request(request))


async def _raw_calls(address: str, security: ChannelSecurity) -> dict[str, grpc.StatusCode | int]:
    """Health, reflection and a Speculate stream, each by its bare stub: a status code, or the health status."""
    outcomes: dict[str, grpc.StatusCode | int] = {}
    async with open_channel(address, security) as channel:
        outcomes["health"] = (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status
        calls = {"reflection": lambda: reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                     iter([reflection_pb2.ServerReflectionRequest(list_services="")])),
                 "speculate": lambda: specbridge_pb2_grpc.VerifierStub(channel).Speculate(iter([_open_session()]))}
        for name, call in calls.items():
            try:
                async for _ in call():
                    break
                outcomes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                outcomes[name] = error.code()
                assert error.code() is not grpc.StatusCode.UNAUTHENTICATED or error.details() == UNAUTHENTICATED_MESSAGE
    return outcomes


def test_calls_without_a_valid_token_are_unauthenticated_but_health_stays_open(target: str, certificates: Certificates,
                                                                               tmp_path: Path) -> None:
    tokens = _token_file(tmp_path, "tokens", "# two edges\nedge-one-token\nedge-two-token\n")
    config = ServeConfig(target=target, port=0, tls_cert=str(certificates.server_cert), tls_key=str(certificates.server_key),
                         auth_token_file=tokens)
    tls = {"tls_ca": str(certificates.server_ca)}
    holders = {name: ChannelSecurity(**tls, auth_token_file=_token_file(tmp_path, name, f"{name}\n"))
               for name in ("edge-one-token", "edge-two-token", "edge-one-toke", "wrong")}

    async def scenario():
        async with serving(config) as address:
            refusals = {name: await _refusal(address, security) for name, security in holders.items()}
            refusals["none"] = await _refusal(address, ChannelSecurity(**tls))
            return refusals, await _raw_calls(address, ChannelSecurity(**tls)), await _raw_calls(address, holders["wrong"])

    refusals, without_token, wrong_token = asyncio.run(scenario())
    assert _codes(list(refusals.values())) == [None, None] + [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert str(refusals["none"]).endswith(f"answered UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}")
    assert str(refusals["wrong"]) == str(refusals["none"])  # a wrong token reads as a missing one: nothing revealed
    for outcomes in (without_token, wrong_token):
        assert outcomes == {"health": health_pb2.HealthCheckResponse.SERVING,
                            "reflection": grpc.StatusCode.UNAUTHENTICATED, "speculate": grpc.StatusCode.UNAUTHENTICATED}


def test_a_token_may_travel_without_tls_to_a_loopback_verifier(target: str, tmp_path: Path) -> None:
    config = ServeConfig(target=target, port=0, auth_token_file=_token_file(tmp_path, "tokens", "local-token\n"))
    with_token = ChannelSecurity(auth_token_file=config.auth_token_file)

    async def scenario():
        async with serving(config) as address:
            return [await _refusal(address, security) for security in (with_token, ChannelSecurity())]

    assert _codes(asyncio.run(scenario())) == [None, grpc.StatusCode.UNAUTHENTICATED]


def _wait_until_accepted(address: str, security: ChannelSecurity) -> None:
    async def poll() -> None:
        for _ in range(int(RELOAD_WAIT_S / 0.1)):
            if await _refusal(address, security) is None:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the new token was still refused {RELOAD_WAIT_S:.0f} s after SIGHUP")

    asyncio.run(poll())


def test_sighup_reloads_the_token_file_without_a_restart(target: str, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    tokens = Path(_token_file(tmp_path, "tokens", "first-token\n"))
    first = ChannelSecurity(auth_token_file=_token_file(tmp_path, "first", "first-token\n"))
    second = ChannelSecurity(auth_token_file=_token_file(tmp_path, "second", "second-token\n"))
    # Beyond loopback without TLS: the child warns on its stderr (this process's fd 2, which capfd reads).
    with VerifierProcess(ServeConfig(target=target, host="0.0.0.0", port=0, auth_token_file=str(tokens))) as verifier:
        address = f"127.0.0.1:{verifier.port}"
        assert _codes([asyncio.run(_refusal(address, s)) for s in (first, second)]) == [None, grpc.StatusCode.UNAUTHENTICATED]
        tokens.write_text("# first-token revoked\nsecond-token\n")
        os.kill(verifier.pid, signal.SIGHUP)
        _wait_until_accepted(address, second)
        assert asyncio.run(_refusal(address, first)).code is grpc.StatusCode.UNAUTHENTICATED
        started = capfd.readouterr().err
        # The same token through the CLI's flag: `specbridge generate --auth-token-file`.
        code = main(["generate", "--server", address, "--auth-token-file", str(second.auth_token_file),
                     "--prompt", "Hello", "--max-new-tokens", str(NEW_TOKENS), "--json"])
        assert code == 0 and len(json.loads(capfd.readouterr().out)["target_token_ids"]) == NEW_TOKENS
    assert verifier.stop() == 0, "the verifier did not shut down cleanly on SIGTERM"
    assert (f"specbridge: warning: the verifier listens on 0.0.0.0:{verifier.port}, beyond this machine, without TLS"
            in started)
    assert f"specbridge verifier reloaded 1 auth token from {tokens}" in started
