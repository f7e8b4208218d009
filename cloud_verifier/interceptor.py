"""The one place where exceptions become gRPC status codes, with their one-line message.

Wraps every handler of the server (unary and streaming alike); handlers raise the core's
precise exceptions and never touch status codes themselves.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cloud_verifier.errors import (
    CapacityError,
    ChatMessagesError,
    NoChatTemplateError,
    ProposalError,
    SessionFinishedError,
    SessionNotFoundError,
)
from shared.decoding import DecodingConfigError
from shared.vocab import VocabError
from shared.wire import WireFormatError

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


async def _abort(error: Exception, context: grpc.aio.ServicerContext) -> None:
    code, message = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("handler failed", exc_info=error)
    await context.abort(code, message)


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every error gets a status; see STATUS_BY_ERROR
            await _abort(error, context)

    return handle


def _wrap_stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_unary_response(behavior)  # a handler that streams with context.write

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every error gets a status; see STATUS_BY_ERROR
            await _abort(error, context)

    return handle


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(handler.unary_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream_response(handler.unary_stream), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(handler.stream_unary), **codec)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream_response(handler.stream_stream), **codec)
