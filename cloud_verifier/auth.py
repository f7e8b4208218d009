"""Who may call the verifier: one server interceptor that checks bearer tokens, the token file it reloads on
SIGHUP, the TLS (and mutual TLS) credentials, and the warning for a verifier open to the network without them.

cloud_verifier.server puts BearerTokenInterceptor first, so that nothing runs for a call without a valid token;
the health service stays open to probes (Kubernetes asks it without a token).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from shared.channel_security import (
    AUTHORIZATION_KEY,
    BEARER_PREFIX,
    ChannelSecurityError,
    is_loopback,
    read_pem,
    read_tokens,
)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
# The same words for a missing, malformed or wrong token: a caller learns nothing about which tokens exist.
UNAUTHENTICATED_MESSAGE = "a valid bearer token is required"


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps even a token's length out of the comparison's timing.
    return hashlib.sha256(token.encode("ascii")).digest()


class TokenStore:
    """The accepted tokens (as digests) from a token file; `reload` swaps them in at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._digests = self._read()

    def _read(self) -> tuple[bytes, ...]:
        return tuple(_digest(token) for token in read_tokens(self.path))

    def reload(self) -> int:
        """Re-read the file and return how many tokens it holds; if it cannot be read, the tokens in use stay
        (ChannelSecurityError says why)."""
        self._digests = self._read()
        return len(self._digests)

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        accepted = False
        for digest in self._digests:  # every token compared, match or not: the time taken says nothing
            accepted |= hmac.compare_digest(presented, digest)
        return accepted


def presented_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer TOKEN` header, if the call carries one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value.startswith(BEARER_PREFIX):
            return value[len(BEARER_PREFIX):]
    return None


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (so a stream is refused before its first message) that refuses."""
    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_refuse, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_refuse, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(_refuse, **codec)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without a valid token, except the health service's."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        token = presented_token(handler_call_details.invocation_metadata)
        if token is not None and self.tokens.accepts(token):
            return handler
        return _refusal(handler)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with this certificate chain and key; with `client_ca`, mutual TLS: a client must show a certificate
    that CA signed."""
    return grpc.ssl_server_credentials([(read_pem(key, "PRIVATE KEY"), read_pem(cert, "CERTIFICATE"))],
                                       root_certificates=read_pem(client_ca, "CERTIFICATE") if client_ca else None,
                                       require_client_auth=client_ca is not None)


def exposure_warning(host: str, port: int, *, tls: bool, auth: bool) -> str | None:
    """The one line `specbridge serve` prints when it listens beyond this machine without TLS or without tokens."""
    if is_loopback(host) or (tls and auth):
        return None
    gaps = []
    if not tls:
        gaps.append("without TLS (--tls-cert, --tls-key): prompts and output cross the network in plaintext")
    if not auth:
        gaps.append("without --auth-token-file: anyone who reaches the port can use it")
    return f"specbridge: warning: the verifier listens on {host}:{port}, beyond this machine, {'; and '.join(gaps)}"


def reload_tokens(tokens: TokenStore | None) -> str:
    """Reload the token file (on SIGHUP) and say what happened in one line; a bad file keeps the tokens in use.
    Without a token file there is nothing to reload: SIGHUP's default, ending the process, would surprise a
    `systemctl reload`."""
    if tokens is None:
        return "specbridge verifier: nothing to reload on SIGHUP (no --auth-token-file)"
    try:
        count = tokens.reload()
    except ChannelSecurityError as error:
        return f"specbridge: error: kept the auth tokens in use: {error}"
    return f"specbridge verifier reloaded {count} auth token{'s' if count != 1 else ''} from {tokens.path}"
