"""The edge's Python API: connect to a verifier, generate, stream text as it is committed, read its counters.

A small surface over `VerifierClient`, and so over the one draft -> verify -> commit loop
(edge_client.speculation); the CLI, the OpenAI-compatible server and the benchmarks all use it.
`import specbridge` exposes it without loading grpc or onnxruntime until first use:

    import asyncio
    import specbridge

    async def main() -> None:
        async with specbridge.connect("gpu-host:50051", draft="~/.cache/specbridge/models/smollm2-135m-instruct/onnx") as edge:
            result = await edge.generate("def fibonacci(n):")
            print(result.text, result.accepted_prediction_tokens)
            chat = specbridge.Generation(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32, stop=["\n\n"])
            async with edge.stream(chat) as stream:
                async for piece in stream:  # piece.origin: accepted draft text, or the target's own tokens
                    print(piece.text, end="", flush=True)
            print(stream.result.finish_reason, (await edge.stats()).live_sessions)

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edge_client.client import ClientResult, EdgeClientError, EdgeDraft, PieceSink, VerifierClient, load_edge_draft
from edge_client.committed_text import TextPiece
from edge_client.draft_length import DraftLengthPolicy
from edge_client.retry import RetryPolicy
from shared.channel_security import ChannelSecurity
from shared.decoding import DecodeMode, DecodingConfig
from shared.wire import ChatMessage
from specbridge.v1 import specbridge_pb2 as pb

GREEDY = DecodingConfig()


def chat_messages(messages: Sequence[ChatMessage | Mapping[str, str]]) -> tuple[ChatMessage, ...]:
    """Chat turns as records; a mapping needs "role" and "content" (OpenAI's message shape)."""
    return tuple(message if isinstance(message, ChatMessage) else ChatMessage(role=message["role"], content=message["content"])
                 for message in messages)


@dataclass(frozen=True)
class Generation:
    """What to generate: a prompt, or chat messages (rendered by the verifier with the target's chat template)."""

    prompt: str = ""
    messages: Sequence[ChatMessage | Mapping[str, str]] = ()
    max_tokens: int = 64  # target tokens at most
    decoding: DecodingConfig = GREEDY
    stop: Sequence[str] = ()  # the output ends before the first of these to appear, and the session ends there
    speculative: bool = True  # False: target-only generation on the verifier (the baseline)
    draft_len: int | None = None  # draft tokens per round; None adapts it to the network each round (not when seeded)
    draft_ahead: bool = True  # keep drafting while a verification is in flight

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", chat_messages(self.messages))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.messages and self.prompt:
            raise ValueError("give a prompt or chat messages, not both")
        if any(not sequence for sequence in self.stop):
            raise ValueError("a stop sequence must not be empty")

    @property
    def rounds_draft_len(self) -> int | None:
        """`draft_len`, except that a seeded sampled generation never adapts it: the controller follows the network's
        timing, the proposals follow the controller and the verifier's draws follow the proposals, so the text would
        change from run to run. It drafts the controller's initial length instead."""
        if self.draft_len is None and self.decoding.mode is DecodeMode.SAMPLE and self.decoding.seed is not None:
            return DraftLengthPolicy().initial_len
        return self.draft_len


class DraftPool:
    """Drafts for concurrent generations: each its own KV cache and tokenizer, all on the one loaded model.

    The loaded draft is only ever forked, never leased: a fork copies its tokenizer, which must not be in
    use by a drafting thread meanwhile.
    """

    def __init__(self, draft: EdgeDraft) -> None:
        self._template = draft
        self._idle: list[EdgeDraft] = []
        self._made = 0
        self._forking = asyncio.Lock()

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[EdgeDraft]:
        if self._idle:
            draft = self._idle.pop()
        else:
            async with self._forking:
                draft = await asyncio.to_thread(self._template.fork)
                self._made += 1
        try:
            yield draft
        finally:
            self._idle.append(draft)  # Drafter.start resets the cache, so a returned draft is as good as new

    @property
    def size(self) -> int:
        """Drafts made so far (the most generations that ran at once), leased or idle."""
        return self._made


class GenerationStream:
    """Committed text as it arrives, by whole characters: `async with edge.stream(...) as stream:` then
    `async for piece in stream:`; `stream.result` once it has ended.

    Leaving early (a break, an exception, a cancelled task) ends the verifier session at once.
    """

    def __init__(self, run: Callable[[PieceSink], Awaitable[ClientResult]]) -> None:
        self._run = run
        self._pieces: asyncio.Queue[TextPiece | None] = asyncio.Queue()
        self._task: asyncio.Task[ClientResult] | None = None
        self.result: ClientResult | None = None

    def _started(self) -> asyncio.Task[ClientResult]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(self._pieces.put_nowait))
            self._task.add_done_callback(lambda _: self._pieces.put_nowait(None))
        return self._task

    async def __aenter__(self) -> GenerationStream:
        self._started()
        return self

    async def __aexit__(self, error_type: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[TextPiece]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TextPiece]:
        task = self._started()
        try:
            while (piece := await self._pieces.get()) is not None:
                yield piece
            self.result = await task
        finally:
            task.cancel()  # a no-op once it ended; a consumer that left early ends the session here

    async def aclose(self) -> None:
        """End the generation now (its verifier session too) and wait until it has."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])


class Edge:
    """A verifier connection and (for speculative generation) a loaded draft model.

    Use it as `async with connect(...) as edge:`, inside the event loop that generates (the gRPC channel
    belongs to one loop); concurrent generations each get their own draft state on the shared weights.
    """

    def __init__(self, server: str, draft: EdgeDraft | None, security: ChannelSecurity = ChannelSecurity(),
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.server = server
        self.draft = draft
        self.security = security
        self.retry = retry
        self._drafts = DraftPool(draft) if draft is not None else None
        self._client: VerifierClient | None = None

    async def __aenter__(self) -> Edge:
        self._client = VerifierClient(self.server, self.security, self.retry)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(*exc_info)

    @property
    def client(self) -> VerifierClient:
        if self._client is None:
            raise RuntimeError("use the edge inside `async with edge:` (the channel opens on the running event loop)")
        return self._client

    @property
    def draft_pool_size(self) -> int:
        return self._drafts.size if self._drafts is not None else 0

    async def generate(self, request: Generation | str, on_piece: PieceSink | None = None) -> ClientResult:
        """One generation to its end; `on_piece` sees the committed text as it arrives."""
        request = Generation(prompt=request) if isinstance(request, str) else request
        if not request.speculative:
            return await self.client.generate(request.prompt, request.decoding, max_new_tokens=request.max_tokens,
                                              on_piece=on_piece, messages=request.messages, stop=request.stop)
        if self._drafts is None:
            raise EdgeClientError("speculative generation needs a draft: connect(server, draft=DIR), or speculative=False")
        async with self._drafts.lease() as draft:
            return await self.client.speculate(draft, request.prompt, request.decoding, max_new_tokens=request.max_tokens,
                                               draft_len=request.rounds_draft_len, draft_ahead=request.draft_ahead,
                                               on_piece=on_piece, messages=request.messages, stop=request.stop)

    def stream(self, request: Generation | str) -> GenerationStream:
        return GenerationStream(lambda on_piece: self.generate(request, on_piece))

    async def stats(self) -> pb.VerifierStats:
        """The verifier's counters (sessions, forwards, committed tokens, ...), as GetStats answers."""
        return await self.client.stats()


def connect(server: str, draft: str | Path | EdgeDraft | None = None, *, variant: str = "fp32",
            threads: int | None = None, security: ChannelSecurity = ChannelSecurity(),
            retry: RetryPolicy = RetryPolicy()) -> Edge:
    """An edge for the verifier at `server` (HOST:PORT), loading the exported ONNX draft in `draft` now
    (seconds); without a draft only target-only generation (`speculative=False`) is possible.

    `variant` picks fp32 or int8 weights; `threads` caps onnxruntime's threads (None: its default); `security`
    secures the channel (TLS, mutual TLS, a bearer token: shared.channel_security.ChannelSecurity); `retry` says how a
    lost session is resumed (edge_client.retry.RetryPolicy: reconnects with backoff, from the ids committed so far).
    """
    if draft is not None and not isinstance(draft, EdgeDraft):
        draft = load_edge_draft(Path(draft).expanduser(), variant=variant, threads=threads)
    return Edge(server, draft, security, retry)
