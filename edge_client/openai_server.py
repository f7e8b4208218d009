"""`specbridge edge serve`: the edge as a local OpenAI-compatible HTTP endpoint. Any OpenAI client, editor
plugin or chat UI points at it; it drafts here and has the cloud verifier verify.

A thin ASGI shell (starlette, uvicorn, sse-starlette): routes, the API key, server-sent events and
client disconnects live here; request checking and response shapes are edge_client.openai_protocol,
generation is the Python API (edge_client.api). Never imports torch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_client.api import Edge, GenerationStream, connect
from edge_client.cli import DraftSettings, EdgeConfigError
from edge_client.client import EdgeClientError
from edge_client.committed_text import TextPiece
from edge_client.openai_protocol import (
    APIError,
    EndpointSettings,
    Endpoint,
    ParsedRequest,
    chunk_body,
    completion_body,
    model_body,
    models_body,
    parse_request,
    usage_chunk_body,
)
from shared.event_loop import run

READY_LINE = "specbridge edge serving the OpenAI API on http://{host}:{port}/v1 (model {model}, verifier {server})"
HEALTH_TIMEOUT_S = 3.0
SSE_PING_S = 15  # comment lines that keep idle proxies from closing a long stream
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up first; nobody reads it
# How a verifier's refusal reads over HTTP: the request's fault (400), too busy (429), unreachable (503).
HTTP_STATUS_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

log = logging.getLogger(__name__)
Result = TypeVar("Result")


class EdgeServeConfigError(EdgeConfigError):
    """An `edge serve` setting out of its valid range."""


@dataclass(frozen=True, kw_only=True)
class EdgeServeConfig(DraftSettings):
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (127.0.0.1: this machine only)"})
    port: int = field(default=8000, metadata={"help": "port to listen on (0: any free port, printed when ready)"})
    api_key_file: str | None = field(default=None, metadata={
        "help": "file holding the key clients must send as 'Authorization: Bearer KEY' (unset: no key needed)"})
    model_name: str | None = field(default=None, metadata={
        "help": "the model id clients name (unset: the verifier's target model)"})
    max_tokens: int = field(default=512, metadata={
        "help": "max_tokens of a chat request that sets none (completions default to OpenAI's 16)"})
    threads: int | None = field(default=None, metadata={"help": "onnxruntime threads for the draft (unset: its default)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise EdgeServeConfigError(f"--port must lie in [0, 65535], got {self.port}")
        if self.max_tokens < 1:
            raise EdgeServeConfigError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.threads is not None and self.threads < 1:
            raise EdgeServeConfigError(f"--threads must be >= 1, got {self.threads}")

    def endpoint_settings(self, model_id: str) -> EndpointSettings:
        return EndpointSettings(model_id=model_id, chat_default_max_tokens=self.max_tokens,
                                draft_len=self.fixed_draft_len, draft_ahead=self.draft_ahead, rule=self.rule)


def read_api_key(path: str | Path) -> str:
    key = Path(path).read_text(encoding="utf-8").strip()
    if not key:
        raise EdgeServeConfigError(f"{path} holds no API key")
    return key


def api_error_for(error: EdgeClientError) -> APIError:
    """A verifier's refusal (or absence) as OpenAI's error: 400 for the request's fault, 5xx for the service's."""
    status = HTTP_STATUS_BY_GRPC.get(error.code, 502)
    if status == 400:
        return APIError(400, str(error), code="verifier_refused")
    error_type = "rate_limit_error" if status == 429 else "server_error"
    return APIError(status, str(error), error_type=error_type, code="verifier_unavailable" if status >= 500 else None)


class _ClientDisconnected(Exception):
    """The HTTP client hung up before the answer was ready."""


async def _hang_up(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Result]) -> Result:
    """`work`'s result; a client that hangs up first cancels it (and so its verifier session) at once."""
    work_task = asyncio.ensure_future(work)
    hang_up = asyncio.ensure_future(_hang_up(request))
    try:
        await asyncio.wait({work_task, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        if not work_task.done():
            raise _ClientDisconnected
        return work_task.result()
    finally:
        hang_up.cancel()
        work_task.cancel()


class OpenAIEndpoint:
    """The routes, over one `Edge` (entered by the caller) and one model id."""

    def __init__(self, edge: Edge, settings: EndpointSettings, api_key: str | None, created: int) -> None:
        self.edge = edge
        self.settings = settings
        self.api_key = api_key
        self.created = created

    def app(self) -> Starlette:
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={APIError: _api_error_response,
                                                            HTTPException: _http_error_response})

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "no API key: send it as 'Authorization: Bearer KEY'", code="missing_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        try:
            stats = await asyncio.wait_for(self.edge.stats(), HEALTH_TIMEOUT_S)
        except (EdgeClientError, TimeoutError) as error:
            return JSONResponse({"status": "unavailable", "verifier": self.edge.server,
                                 "error": str(error) or "no answer within the timeout"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "verifier": self.edge.server,
                             "target_model": stats.target_model, "live_sessions": stats.live_sessions,
                             "drafts_loaded": self.edge.draft_pool_size})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(models_body(self.settings.model_id, self.created))

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        if request.path_params["model"] != self.settings.model_id:
            raise APIError(404, f"the model '{request.path_params['model']}' is not served here; this endpoint serves "
                                f"'{self.settings.model_id}'", param="model", code="model_not_found")
        return JSONResponse(model_body(self.settings.model_id, self.created))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.CHAT)

    async def _generate(self, request: Request, endpoint: Endpoint) -> Response:
        self._authorize(request)
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        parsed = parse_request(endpoint, body, self.settings)
        response_id = f"{'chatcmpl' if endpoint is Endpoint.CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            if parsed.stream:
                return await self._stream(request, parsed, response_id, created)
            result = await _unless_disconnected(request, self.edge.generate(parsed.generation))
        except EdgeClientError as error:
            raise api_error_for(error) from None
        except _ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(completion_body(parsed, result, response_id=response_id, created=created))

    async def _stream(self, request: Request, parsed: ParsedRequest, response_id: str, created: int) -> Response:
        """Headers go out with the first text, so that a refusal (a chat with no template, a busy verifier)
        is still a plain HTTP error; after that, errors travel as an event."""
        stream = self.edge.stream(parsed.generation)
        pieces = aiter(stream)
        try:
            first = await _unless_disconnected(request, anext(pieces, None))
        except BaseException:
            await stream.aclose()
            raise
        return EventSourceResponse(self._events(parsed, stream, pieces, first, response_id, created), sep="\n",
                                   ping=SSE_PING_S)

    async def _events(self, parsed: ParsedRequest, stream: GenerationStream, pieces: AsyncIterator[TextPiece],
                      first: TextPiece | None, response_id: str, created: int) -> AsyncIterator[dict[str, str]]:
        def event(body: dict[str, Any]) -> dict[str, str]:
            return {"data": json.dumps(body, ensure_ascii=False)}

        ids = {"response_id": response_id, "created": created}
        try:
            if parsed.endpoint is Endpoint.CHAT:
                yield event(chunk_body(parsed, text="", first=True, **ids))
            piece = first
            while piece is not None:
                yield event(chunk_body(parsed, text=piece.text, **ids))
                piece = await anext(pieces, None)
            yield event(chunk_body(parsed, result=stream.result, **ids))
            if parsed.include_usage:
                yield event(usage_chunk_body(parsed, stream.result, **ids))
        except EdgeClientError as error:
            yield event(api_error_for(error).body)
        finally:
            await stream.aclose()  # a disconnect lands here: the verifier session ends now
        yield {"data": "[DONE]"}


async def _api_error_response(request: Request, error: APIError) -> Response:
    return JSONResponse(error.body, status_code=error.status)


async def _http_error_response(request: Request, error: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error shape."""
    return JSONResponse(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").body,
                        status_code=error.status_code, headers=error.headers)


class _Server(uvicorn.Server):
    """uvicorn, announcing one ready line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self._ready_line = ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(self._ready_line, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGINT or SIGTERM is how a user stops the server: shut down gracefully and exit 0, as `specbridge serve`
        does (uvicorn would raise the signal again once it has shut down, and die of it)."""
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise EdgeServeConfigError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None


async def _serve(config: EdgeServeConfig, edge: Edge, api_key: str | None) -> None:
    async with edge:
        model_id = config.model_name or (await edge.stats()).target_model
        app = OpenAIEndpoint(edge, config.endpoint_settings(model_id), api_key, created=int(time.time())).app()
        listener = _listening_socket(config.host, config.port)
        ready = READY_LINE.format(host=config.host, port=listener.getsockname()[1], model=model_id, server=config.server)
        server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"), ready)
        await server.serve(sockets=[listener])


def serve(config: EdgeServeConfig) -> None:
    """Load the draft, ask the verifier its model (unless --model-name names it), serve until SIGINT/SIGTERM."""
    api_key = read_api_key(config.api_key_file) if config.api_key_file else None
    edge = connect(config.server, config.draft, variant=config.variant, threads=config.threads,
                   security=config.channel_security(), retry=config.retry_policy)
    run(_serve(config, edge, api_key))

