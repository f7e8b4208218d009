"""The one place where exceptions become gRPC status codes, with their one-line message.

Wraps every handler of the server (unary and streaming alike); handlers raise the core's
precise exceptions and never touch status codes themselves. Each status sent is logged and
counted by code in the metrics.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cloud_verifier.errors import (
    CapacityError,
    ChatMessagesError,
    ContextLengthError,
    IdleSessionError,
    LimitExceededError,
    NoChatTemplateError,
    ProposalError,
    SessionFinishedError,
    SessionNotFoundError,
    VerifierUnavailableError,
)
from cloud_verifier.metrics import VerifierMetrics
from shared.decoding import DecodingConfigError
from shared.vocab import VocabError
from shared.wire import RETRY_AFTER_MS_KEY, WireFormatError

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ContextLengthError, grpc.StatusCode.OUT_OF_RANGE),
    (IdleSessionError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (VerifierUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (SessionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SessionFinishedError, grpc.StatusCode.FAILED_PRECONDITION),
    (NoChatTemplateError, grpc.StatusCode.FAILED_PRECONDITION),
    (ChatMessagesError, grpc.StatusCode.INVALID_ARGUMENT),
    (ProposalError, grpc.StatusCode.INVALID_ARGUMENT),
    (WireFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (DecodingConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (VocabError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and one-line message an exception escaping a handler becomes."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code, line
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {line}"


async def _abort(error: Exception, context: grpc.aio.ServicerContext, metrics: VerifierMetrics) -> None:
    code, message = status_for(error)
    metrics.rejected(code)
    status = {"fields": {"status_code": code.name, "error": message}}
    if code is grpc.StatusCode.INTERNAL:
        log.exception("handler failed", exc_info=error, extra=status)
    else:
        log.warning("call rejected", extra=status)
    hint = ((RETRY_AFTER_MS_KEY, str(error.retry_after_ms)),) if isinstance(error, CapacityError) else ()
    await context.abort(code, message, hint)


@dataclass(frozen=True)
class _Unparsable:
    """A request whose bytes are not the message they should be; the handler's wrapper refuses it."""

    error: Exception


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The handler's deserializer, made to hand a parse failure on instead of raising: grpc would answer a
    raising deserializer with INTERNAL, and bytes that are not a protobuf are the client's mistake."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - whatever the parser says, the bytes were bad
            return _Unparsable(error)

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Unparsable):
        raise WireFormatError(f"a request is not a valid protobuf message: {status_for(request.error)[1]}")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def _parsed(request: Any) -> Any:
    """A unary request checked now, a request stream checked message by message as the handler reads it."""
    return _checked_stream(request) if hasattr(request, "__aiter__") else _checked(request)


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]], metrics: VerifierMetrics) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_parsed(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every error gets a status; see STATUS_BY_ERROR
            await _abort(error, context, metrics)

    return handle


def _wrap_stream_response(behavior: Callable[..., Any], metrics: VerifierMetrics) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_unary_response(behavior, metrics)  # a handler that streams with context.write

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(_parsed(request), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every error gets a status; see STATUS_BY_ERROR
            await _abort(error, context, metrics)

    return handle


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: VerifierMetrics) -> None:
        self.metrics = metrics  # counts each status it sends, by code

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        codec = {"request_deserializer": _tolerant(handler.request_deserializer),
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(handler.unary_unary, self.metrics), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream_response(handler.unary_stream, self.metrics), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(handler.stream_unary, self.metrics), **codec)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream_response(handler.stream_stream, self.metrics), **codec)
