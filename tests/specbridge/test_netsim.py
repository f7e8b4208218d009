"""The network simulator: a local echo server behind the proxy; delays are checked as ratios to the direct path."""

import asyncio
import dataclasses
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from specbridge.cli import main
from specbridge.netsim import (PROFILES, READY_LINE, DelayProxy, Direction, NetsimConfig, NetsimConfigError,
                               NetworkProfile, OneWayLink, netem_command)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TRANSFER_BYTES = 200_000


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _transfer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """`up N` (then N bytes): answers `ok` once they are in; `down N`: sends N bytes."""
    verb, size = (await reader.readline()).split()
    if verb == b"up":
        await reader.readexactly(int(size))
        writer.write(b"ok")
    else:
        writer.write(bytes(int(size)))
    await writer.drain()
    writer.close()


@asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _echo_round_trip_s(address: str, repeats: int = 3) -> float:
    """The fastest of a few small echo round trips on one connection."""
    reader, writer = await asyncio.open_connection(*address.split(":"))
    fastest_s = float("inf")
    for _ in range(repeats):
        start_s = time.perf_counter()
        writer.write(b"ping")
        await reader.readexactly(4)
        fastest_s = min(fastest_s, time.perf_counter() - start_s)
    writer.close()
    return fastest_s


async def _transfer_s(address: str, direction: Direction) -> float:
    reader, writer = await asyncio.open_connection(*address.split(":"))
    start_s = time.perf_counter()
    if direction is Direction.UPLINK:
        writer.write(b"up %d\n" % TRANSFER_BYTES + bytes(TRANSFER_BYTES))
        assert await reader.readexactly(2) == b"ok"
    else:
        writer.write(b"down %d\n" % TRANSFER_BYTES)
        assert len(await reader.readexactly(TRANSFER_BYTES)) == TRANSFER_BYTES
    elapsed_s = time.perf_counter() - start_s
    writer.close()
    return elapsed_s


def _profile(**values: float) -> NetworkProfile:
    return NetworkProfile("test", **{"rtt_ms": 0.0, **values})


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_bytes_arrive_intact_and_in_order_under_heavy_jitter(run: Callable) -> None:
    rng = random.Random(0)
    payload = rng.randbytes(2_000_000)

    async def scenario() -> bytes:
        async with _server(_echo) as upstream, DelayProxy(_profile(rtt_ms=2.0, jitter_ms=20.0), upstream,
                                                          seed=1) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

            async def send() -> None:
                offset = 0
                while offset < len(payload):
                    size = rng.randint(1, 16_384)
                    writer.write(payload[offset:offset + size])
                    await writer.drain()
                    offset += size
                writer.write_eof()

            sending = asyncio.create_task(send())
            echoed = await reader.read()
            await sending
            writer.close()
            assert (proxy.uplink_bytes, proxy.downlink_bytes) == (len(payload), len(payload))
            return echoed

    assert run(scenario()) == payload


def test_round_trip_pays_the_rtt() -> None:
    rtt_ms = 100.0

    async def scenario() -> tuple[float, float]:
        async with _server(_echo) as upstream, DelayProxy(_profile(rtt_ms=rtt_ms), upstream) as proxy:
            return await _echo_round_trip_s(upstream), await _echo_round_trip_s(proxy.address)

    direct_s, proxied_s = asyncio.run(scenario())
    assert 0.8 * rtt_ms / 1000 < proxied_s < 5 * rtt_ms / 1000
    assert proxied_s > direct_s + 0.5 * rtt_ms / 1000


def test_back_to_back_messages_pipeline_instead_of_paying_one_rtt_each() -> None:
    rtt_ms, messages = 100.0, 20

    async def scenario() -> float:
        async with _server(_echo) as upstream, DelayProxy(_profile(rtt_ms=rtt_ms), upstream) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            start_s = time.perf_counter()
            for index in range(messages):
                writer.write(b"%04d" % index)
                await writer.drain()
                await asyncio.sleep(0.002)  # so that each message is a chunk of its own
            assert await reader.readexactly(4 * messages) == b"".join(b"%04d" % i for i in range(messages))
            elapsed_s = time.perf_counter() - start_s
            writer.close()
            return elapsed_s

    elapsed_s = asyncio.run(scenario())
    assert 0.8 * rtt_ms / 1000 < elapsed_s < messages * rtt_ms / 1000 / 4


def test_a_stream_pipelines_instead_of_paying_one_delay_per_chunk() -> None:
    rtt_ms, payload = 100.0, bytes(2_000_000)  # some 30 reads of 64 KiB each way

    async def scenario() -> float:
        async with _server(_echo) as upstream, DelayProxy(_profile(rtt_ms=rtt_ms), upstream) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            start_s = time.perf_counter()
            writer.write(payload)
            assert len(await reader.readexactly(len(payload))) == len(payload)
            elapsed_s = time.perf_counter() - start_s
            writer.close()
            return elapsed_s

    elapsed_s = asyncio.run(scenario())
    assert 0.8 * rtt_ms / 1000 < elapsed_s < 5 * rtt_ms / 1000


@pytest.mark.parametrize("limited", list(Direction))
def test_a_bandwidth_limit_slows_its_own_direction_only(limited: Direction) -> None:
    kbps = 4000.0
    serialisation_s = TRANSFER_BYTES * 8 / kbps / 1000
    other = Direction.DOWNLINK if limited is Direction.UPLINK else Direction.UPLINK

    async def scenario() -> tuple[float, float, float]:
        profile = _profile(**{f"{limited.value}_kbps": kbps})
        async with _server(_transfer) as upstream, DelayProxy(profile, upstream) as proxy:
            return (await _transfer_s(upstream, limited), await _transfer_s(proxy.address, limited),
                    await _transfer_s(proxy.address, other))

    direct_s, limited_s, other_s = asyncio.run(scenario())
    assert 0.7 * serialisation_s < limited_s < 5 * serialisation_s
    assert limited_s > 3 * direct_s
    assert other_s < 0.5 * serialisation_s


def test_reset_connections_breaks_live_connections_and_new_ones_still_work() -> None:
    async def scenario() -> None:
        async with _server(_echo) as upstream, DelayProxy(_profile(), upstream) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            await proxy.reset_connections()
            try:
                assert await asyncio.wait_for(reader.read(1), 2.0) == b""
            except ConnectionResetError:
                pass
            writer.close()
            assert await _echo_round_trip_s(proxy.address) < 2.0

    asyncio.run(scenario())


def test_an_unreachable_upstream_resets_the_client() -> None:
    async def scenario() -> None:
        async with _server(_echo) as upstream:
            pass
        async with DelayProxy(_profile(), upstream) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                assert await asyncio.wait_for(reader.read(1), 2.0) == b""
            except ConnectionResetError:
                pass
            writer.close()

    asyncio.run(scenario())


def test_link_delivers_in_order_after_its_delay_and_serialisation() -> None:
    link = OneWayLink(_profile(rtt_ms=10.0, jitter_ms=40.0), Direction.UPLINK, random.Random(0))
    times_s = [link.delivery_time_s(100, now_s=i * 0.001) for i in range(1000)]
    assert times_s == sorted(times_s)
    assert all(t >= i * 0.001 for i, t in enumerate(times_s))

    slow = OneWayLink(_profile(rtt_ms=10.0, uplink_kbps=8.0), Direction.UPLINK, random.Random(0))
    assert slow.delivery_time_s(1000, now_s=0.0) == pytest.approx(1.0 + 0.005)  # 8000 bits at 8 kbit/s, then rtt/2
    assert slow.delivery_time_s(1000, now_s=0.0) == pytest.approx(2.0 + 0.005)  # waits for the link
    unlimited = OneWayLink(slow.profile, Direction.DOWNLINK, random.Random(0))
    assert unlimited.delivery_time_s(1000, now_s=0.0) == pytest.approx(0.005)


def test_loss_costs_one_rtt_on_about_its_share_of_chunks() -> None:
    link = OneWayLink(_profile(rtt_ms=100.0, loss_pct=10.0), Direction.UPLINK, random.Random(0))
    late = sum(link.delivery_time_s(1, now_s=float(i)) - i > 0.1 for i in range(2000))
    assert 100 < late < 300


def test_profile_table() -> None:
    assert list(PROFILES) == ["loopback", "lan", "wifi", "4g", "cross-region"]
    assert PROFILES["4g"] == NetworkProfile("4g", rtt_ms=60.0, jitter_ms=10.0, uplink_kbps=5000.0,
                                            downlink_kbps=20000.0)
    assert (PROFILES["wifi"].rtt_ms, PROFILES["wifi"].jitter_ms) == (15.0, 3.0)
    assert (PROFILES["loopback"].rtt_ms, PROFILES["lan"].rtt_ms, PROFILES["cross-region"].rtt_ms) == (0.0, 1.0, 150.0)
    assert PROFILES["wifi"].describe() == "wifi: rtt 15 ms, jitter 3 ms, up -, down -"
    assert PROFILES["4g"].describe() == "4g: rtt 60 ms, jitter 10 ms, up 5000 kbps, down 20000 kbps"


@pytest.mark.parametrize(("values", "message"), [
    ({"rtt_ms": -1.0}, "rtt_ms must be >= 0"),
    ({"jitter_ms": float("nan")}, "jitter_ms must be >= 0"),
    ({"uplink_kbps": 0.0}, "uplink_kbps must be > 0"),
    ({"loss_pct": 100.0}, "loss_pct must lie in [0, 100)"),
])
def test_profile_validation(values: dict, message: str) -> None:
    with pytest.raises(NetsimConfigError, match=re.escape(message)):
        _profile(**values)


def test_config_overrides_the_profile() -> None:
    config = NetsimConfig(listen="127.0.0.1:0", upstream="127.0.0.1:50051", profile="4g", rtt_ms=80.0, loss_pct=1.0)
    assert config.network_profile == dataclasses.replace(PROFILES["4g"], rtt_ms=80.0, loss_pct=1.0)


@pytest.mark.parametrize(("values", "message"), [
    ({"listen": "nohost"}, "--listen must be HOST:PORT, got 'nohost'"),
    ({"upstream": "host:99999"}, "--upstream must be HOST:PORT"),
    ({"profile": "5g"}, "--profile must be one of loopback, lan, wifi, 4g, cross-region, got '5g'"),
    ({"downlink_kbps": -5.0}, "downlink_kbps must be > 0"),
])
def test_config_validation(values: dict, message: str) -> None:
    with pytest.raises(NetsimConfigError, match=re.escape(message)):
        NetsimConfig(**{"listen": "127.0.0.1:0", "upstream": "127.0.0.1:50051", **values})


def test_netem_command() -> None:
    assert netem_command(PROFILES["wifi"], "eth0") == "tc qdisc add dev eth0 root netem delay 15ms 3ms"
    assert netem_command(PROFILES["4g"], "wlan0") == "tc qdisc add dev wlan0 root netem delay 60ms 10ms rate 5000kbit"
    assert netem_command(PROFILES["loopback"], "eth0") == "tc qdisc add dev eth0 root netem delay 0ms"
    assert (netem_command(_profile(rtt_ms=150.0, loss_pct=0.5), "eth0")
            == "tc qdisc add dev eth0 root netem delay 150ms loss 0.5%")
    documented = netem_command.__doc__ or ""
    for profile in PROFILES.values():
        assert netem_command(profile, "eth0") in documented


def test_cli_bad_address_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netsim", "--listen", "bad", "--upstream", "127.0.0.1:50051"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["specbridge: error: --listen must be HOST:PORT, got 'bad'"]


def test_cli_help_shows_the_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["netsim", "--help"])
    assert exit_info.value.code == 0
    assert "cross-region" in capsys.readouterr().out


def test_cli_prints_its_ready_line_and_stops_on_sigterm() -> None:
    process = subprocess.Popen([sys.executable, "-m", "specbridge.cli", "netsim", "--listen", "127.0.0.1:0",
                                "--upstream", "127.0.0.1:9", "--profile", "wifi"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) ", line)
        assert match and int(match[1]) > 0, line
        assert line == READY_LINE.format(address=f"127.0.0.1:{match[1]}", upstream="127.0.0.1:9",
                                         profile=PROFILES["wifi"].describe())
    finally:
        process.terminate()
    assert process.wait(10) == 0
