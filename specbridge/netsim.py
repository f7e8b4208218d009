"""`specbridge netsim`: a TCP proxy that adds network delay, jitter, bandwidth limits and loss.

A tool, part of neither side: put it between an edge client and a verifier on machines without
`tc netem` (`netem_command` gives the kernel's equivalent where it exists).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import random
import signal
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

import uvloop

from shared.errors import UserFacingError

READY_LINE = "specbridge netsim listening on {address} -> {upstream} (profile {profile})"
CHUNK_BYTES = 64 * 1024
# Like a TCP window: a direction holds this much read and not yet delivered before it stops reading (the
# sender's socket buffer then fills, as behind a slow link). It caps a connection at 4 MiB per one-way
# delay, far above any profile's bandwidth.
MAX_IN_FLIGHT_BYTES = 4 * 1024 * 1024

log = logging.getLogger(__name__)


class NetsimConfigError(UserFacingError, ValueError):
    """A network profile or proxy setting out of its valid range."""


class Direction(enum.Enum):
    UPLINK = "uplink"  # client -> server
    DOWNLINK = "downlink"  # server -> client


@dataclass(frozen=True)
class NetworkProfile:
    """What the network adds to a TCP connection, as the proxy simulates it.

    Each direction delays every chunk by rtt_ms/2 plus jitter drawn per chunk, uniform in
    ±jitter_ms/2 and clipped at 0, so a round trip lies in rtt_ms ± jitter_ms; bytes still arrive
    in order (a chunk waits for the one before it). A bandwidth limit is a serialisation delay:
    n bytes hold their direction's link for n*8/kbps ms (None: unlimited). TCP loses no bytes, so
    loss is modelled as what it costs: a chunk lost with probability loss_pct/100 arrives one RTT
    late (the retransmission), and the chunks behind it wait (head-of-line blocking).
    """

    name: str
    rtt_ms: float
    jitter_ms: float = 0.0
    uplink_kbps: float | None = None
    downlink_kbps: float | None = None
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "jitter_ms"):
            if not getattr(self, name) >= 0:
                raise NetsimConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("uplink_kbps", "downlink_kbps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise NetsimConfigError(f"{name} must be > 0 (or unset for no limit), got {getattr(self, name)}")
        if not 0 <= self.loss_pct < 100:
            raise NetsimConfigError(f"loss_pct must lie in [0, 100), got {self.loss_pct}")

    def kbps(self, direction: Direction) -> float | None:
        return self.uplink_kbps if direction is Direction.UPLINK else self.downlink_kbps

    def describe(self) -> str:
        """`wifi: rtt 15 ms, jitter 3 ms, up -, down -` (loss only where there is some)."""
        rates = [f"{kbps:g} kbps" if kbps else "-" for kbps in (self.uplink_kbps, self.downlink_kbps)]
        loss = f", loss {self.loss_pct:g}%" if self.loss_pct else ""
        return f"{self.name}: rtt {self.rtt_ms:g} ms, jitter {self.jitter_ms:g} ms, up {rates[0]}, down {rates[1]}{loss}"


PROFILES: dict[str, NetworkProfile] = {profile.name: profile for profile in (
    NetworkProfile("loopback", rtt_ms=0.0),
    NetworkProfile("lan", rtt_ms=1.0),
    NetworkProfile("wifi", rtt_ms=15.0, jitter_ms=3.0),
    NetworkProfile("4g", rtt_ms=60.0, jitter_ms=10.0, uplink_kbps=5000.0, downlink_kbps=20000.0),
    NetworkProfile("cross-region", rtt_ms=150.0),
)}


def netem_command(profile: NetworkProfile, interface: str) -> str:
    """The `tc netem` line that gives `profile` on a machine whose kernel has netem; run it on the edge machine.

    netem shapes only what leaves an interface, so the whole RTT goes on the edge's way out and
    `rate` is the uplink; a downlink limit needs `netem rate Nkbit` on the server's interface (or
    on an ifb device). On `lo`, which both directions cross, halve the delay. The profiles give:
        loopback:     tc qdisc add dev eth0 root netem delay 0ms
        lan:          tc qdisc add dev eth0 root netem delay 1ms
        wifi:         tc qdisc add dev eth0 root netem delay 15ms 3ms
        4g:           tc qdisc add dev eth0 root netem delay 60ms 10ms rate 5000kbit   (server: rate 20000kbit)
        cross-region: tc qdisc add dev eth0 root netem delay 150ms
    Undo with `tc qdisc del dev eth0 root`.
    """
    command = f"tc qdisc add dev {interface} root netem delay {profile.rtt_ms:g}ms"
    if profile.jitter_ms:
        command += f" {profile.jitter_ms:g}ms"
    if profile.uplink_kbps:
        command += f" rate {profile.uplink_kbps:g}kbit"
    if profile.loss_pct:
        command += f" loss {profile.loss_pct:g}%"
    return command


def split_address(address: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) to (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise NetsimConfigError(f"{what} must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass
class OneWayLink:
    """One direction of one connection: when each chunk read now is delivered (no I/O: the clock is an argument)."""

    profile: NetworkProfile
    direction: Direction
    rng: random.Random
    link_free_s: float = -math.inf
    last_delivery_s: float = -math.inf

    def delivery_time_s(self, size_bytes: int, now_s: float) -> float:
        kbps = self.profile.kbps(self.direction)
        self.link_free_s = max(now_s, self.link_free_s) + (size_bytes * 8 / kbps / 1000 if kbps else 0.0)
        jitter_ms = self.profile.jitter_ms
        delay_ms = max(0.0, self.profile.rtt_ms / 2 + self.rng.uniform(-jitter_ms / 2, jitter_ms / 2))
        if self.rng.random() < self.profile.loss_pct / 100:
            delay_ms += self.profile.rtt_ms
        # TCP delivers bytes in order: a chunk never overtakes an earlier one, whatever delay it drew.
        self.last_delivery_s = max(self.last_delivery_s, self.link_free_s + delay_ms / 1000)
        return self.last_delivery_s


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN (SO_LINGER 0), as a peer sees a crashed host or a dropped route."""
    if not writer.transport.is_closing():
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _InFlight:
    """One direction's chunks read and not yet delivered, in order, each with its delivery time."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._size_bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, delivery_time_s: float, chunk: bytes) -> None:
        """Queue a chunk, then wait while the direction holds MAX_IN_FLIGHT_BYTES."""
        self.chunks.put_nowait((delivery_time_s, chunk))
        self._size_bytes += len(chunk)
        if self._size_bytes >= MAX_IN_FLIGHT_BYTES:
            self._room.clear()
            await self._room.wait()

    def delivered(self, size_bytes: int) -> None:
        self._size_bytes -= size_bytes
        if self._size_bytes < MAX_IN_FLIGHT_BYTES:
            self._room.set()


class DelayProxy:
    """Use as `async with DelayProxy(profile, upstream) as proxy:`, then connect to `proxy.address`.

    Each accepted connection gets its own upstream connection; each direction is read as fast as
    it comes and delivered by its own task at the times `OneWayLink` gives, so chunks pipeline.
    """

    def __init__(self, profile: NetworkProfile, upstream: str, *, listen: str = "127.0.0.1:0",
                 seed: int | None = None) -> None:
        self.profile = profile
        self.upstream = upstream
        self._upstream_host, self._upstream_port = split_address(upstream, "upstream")
        self._listen_host, self._listen_port = split_address(listen, "listen")
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._delivered_bytes = {direction: 0 for direction in Direction}

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        host = f"[{self._listen_host}]" if ":" in self._listen_host else self._listen_host
        return f"{host}:{self.port}"

    @property
    def uplink_bytes(self) -> int:
        """Bytes delivered client -> server, over all connections so far."""
        return self._delivered_bytes[Direction.UPLINK]

    @property
    def downlink_bytes(self) -> int:
        """Bytes delivered server -> client, over all connections so far."""
        return self._delivered_bytes[Direction.DOWNLINK]

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, self._listen_host, self._listen_port)
        except OSError as error:
            raise NetsimConfigError(f"cannot listen on {self._listen_host}:{self._listen_port}: {error.strerror}") from None

    async def close(self) -> None:
        """Stop accepting and reset the live connections."""
        if self._server is not None:
            self._server.close()
            await self.reset_connections()
            await self._server.wait_closed()

    async def reset_connections(self) -> None:
        """Reset every live connection at both ends (RST), as a network fault would; new ones are still accepted."""
        for task, writers in list(self._connections.items()):
            for writer in writers:
                _reset(writer)
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, error_type: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # A task of our own, not start_server's: that one must not end cancelled (3.11 logs an error then).
        writers = [client_writer]
        task = asyncio.get_running_loop().create_task(self._relay(client_reader, writers))
        self._connections[task] = writers
        task.add_done_callback(self._connections.pop)

    async def _relay(self, client_reader: asyncio.StreamReader, writers: list[asyncio.StreamWriter]) -> None:
        client_writer = writers[0]
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self._upstream_host, self._upstream_port)
        except OSError as error:
            log.warning("upstream %s unreachable (%s): resetting the client's connection", self.upstream, error)
            _reset(client_writer)
            return
        writers.append(upstream_writer)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(client_reader, upstream_writer, Direction.UPLINK))
                group.create_task(self._pump(upstream_reader, client_writer, Direction.DOWNLINK))
        except* OSError:
            # One end reset its connection: the other end of a real TCP connection would see that reset too.
            for writer in writers:
                _reset(writer)
        finally:
            for writer in writers:
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        """Read chunks as they come and queue each with its delivery time; an empty chunk is the EOF."""
        link = OneWayLink(self.profile, direction, random.Random(self._rng.getrandbits(64)))
        loop = asyncio.get_running_loop()
        in_flight = _InFlight()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._deliver(in_flight, writer, direction))
            while chunk := await reader.read(CHUNK_BYTES):
                await in_flight.put(link.delivery_time_s(len(chunk), loop.time()), chunk)
            await in_flight.put(link.delivery_time_s(0, loop.time()), b"")

    async def _deliver(self, in_flight: _InFlight, writer: asyncio.StreamWriter, direction: Direction) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delivery_time_s, chunk = await in_flight.chunks.get()
            if (wait_s := delivery_time_s - loop.time()) > 0:
                await asyncio.sleep(wait_s)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            self._delivered_bytes[direction] += len(chunk)
            await writer.drain()
            in_flight.delivered(len(chunk))


@dataclass(frozen=True)
class NetsimConfig:
    listen: str = field(metadata={"help": "address to listen on, HOST:PORT (port 0: any free port, printed when ready)"})
    upstream: str = field(metadata={"help": "address to forward to (the verifier), HOST:PORT"})
    profile: str = field(default="loopback", metadata={"help": "network profile: " + ", ".join(PROFILES)})
    rtt_ms: float | None = field(default=None, metadata={"help": "round-trip time to add, ms (unset: the profile's)"})
    jitter_ms: float | None = field(default=None, metadata={"help": "round-trip jitter, ms (unset: the profile's)"})
    uplink_kbps: float | None = field(default=None, metadata={"help": "client -> server kbit/s (unset: the profile's)"})
    downlink_kbps: float | None = field(default=None, metadata={"help": "server -> client kbit/s (unset: the profile's)"})
    loss_pct: float | None = field(default=None, metadata={
        "help": "percent of chunks delayed one RTT, as if retransmitted (unset: the profile's)"})
    seed: int | None = field(default=None, metadata={"help": "seed for the jitter and loss draws (unset: random)"})

    def __post_init__(self) -> None:
        split_address(self.listen, "--listen")
        split_address(self.upstream, "--upstream")
        if self.profile not in PROFILES:
            raise NetsimConfigError(f"--profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        _ = self.network_profile  # NetworkProfile validates the overridden values together

    @property
    def network_profile(self) -> NetworkProfile:
        """The named profile with the values given explicitly put in its place."""
        names = ("rtt_ms", "jitter_ms", "uplink_kbps", "downlink_kbps", "loss_pct")
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return dataclasses.replace(PROFILES[self.profile], **overrides)


async def _run_netsim(config: NetsimConfig) -> None:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    async with DelayProxy(config.network_profile, config.upstream, listen=config.listen, seed=config.seed) as proxy:
        print(READY_LINE.format(address=proxy.address, upstream=config.upstream, profile=proxy.profile.describe()),
              flush=True)
        await stop_requested.wait()


def run_netsim(config: NetsimConfig) -> None:
    """Run the proxy until SIGINT or SIGTERM."""
    uvloop.run(_run_netsim(config))
