"""How a gRPC channel to the verifier is secured: TLS (a custom CA, a client certificate for mutual TLS) and a
bearer token, plus the PEM and token files both sides read.

The edge's VerifierClient opens its channel with `open_channel`; the verifier reads its certificate and token
files with the same readers (cloud_verifier.auth). Imports grpc only, never torch.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc

from shared.errors import UserFacingError

# The header gRPC's access-token credentials send and cloud_verifier.auth checks: `authorization: Bearer TOKEN`.
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "
LOOPBACK_NAMES = frozenset({"localhost"})


class ChannelSecurityError(UserFacingError, ValueError):
    """A TLS or token setting that cannot work (a missing file, a key without its certificate); one line."""


def read_tokens(path: str | Path) -> tuple[str, ...]:
    """The tokens in a token file: one a line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ChannelSecurityError(f"cannot read the token file {path}: {error}") from None
    tokens = []
    for number, line in enumerate(lines, start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # A metadata value must be printable ASCII; a space would split "Bearer TOKEN" differently on each side.
        if not (token.isascii() and token.isprintable() and " " not in token):
            raise ChannelSecurityError(f"line {number} of {path} is not a token (printable ASCII without spaces)")
        tokens.append(token)
    if not tokens:
        raise ChannelSecurityError(f"the token file {path} holds no token")
    return tuple(tokens)


def read_pem(path: str | Path, kind: str) -> bytes:
    """A PEM file's bytes, checked to hold a `kind` block ("CERTIFICATE", "PRIVATE KEY"): gRPC itself would only
    say that it failed to bind."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ChannelSecurityError(f"cannot read {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data or f"{kind}-----".encode() not in data:
        raise ChannelSecurityError(f"{path} holds no PEM {kind}")
    return data


def missing_file(flags_and_paths: Sequence[tuple[str, str | None]]) -> str | None:
    """The one-line complaint about the first flag whose file does not exist; None when all that are set exist."""
    for flag, path in flags_and_paths:
        if path is not None and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    return None


def is_loopback(host: str) -> bool:
    """Whether HOST (a name or an address, IPv6 with or without brackets) names this machine only."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ChannelSecurity:
    """The edge's side: TLS is on once any tls_* setting is given (or `tls`); the token goes with every call."""

    tls: bool = field(default=False, metadata={
        "help": "connect with TLS, trusting the system's CAs (implied by --tls-ca, --tls-cert)"})
    tls_ca: str | None = field(default=None, metadata={
        "help": "PEM file of the CA(s) that signed the verifier's certificate (turns TLS on)"})
    tls_cert: str | None = field(default=None, metadata={
        "help": "PEM client certificate for a verifier that requires mutual TLS (with --tls-key)"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    auth_token_file: str | None = field(default=None, metadata={
        "help": "file holding the bearer token the verifier asks for (one line; '#' lines ignored)"})

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ChannelSecurityError("--tls-cert and --tls-key go together (a client certificate and its key)")
        if complaint := missing_file((("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                                      ("--auth-token-file", self.auth_token_file))):
            raise ChannelSecurityError(complaint)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def channel_security(self) -> ChannelSecurity:
        """Just these settings (a config that extends this class carries others too)."""
        return ChannelSecurity(**{item.name: getattr(self, item.name) for item in fields(ChannelSecurity)})

    def token(self) -> str | None:
        if self.auth_token_file is None:
            return None
        tokens = read_tokens(self.auth_token_file)
        if len(tokens) > 1:
            raise ChannelSecurityError(f"the token file {self.auth_token_file} holds {len(tokens)} tokens; a client sends one")
        return tokens[0]

    def credentials(self, address: str) -> grpc.ChannelCredentials | None:
        """None: plaintext without a token. A token never travels in plaintext beyond this machine: without TLS
        it goes only to a loopback address (gRPC's local credentials check that too)."""
        token = self.token()
        if self.uses_tls:
            channel = grpc.ssl_channel_credentials(
                root_certificates=read_pem(self.tls_ca, "CERTIFICATE") if self.tls_ca else None,
                private_key=read_pem(self.tls_key, "PRIVATE KEY") if self.tls_key else None,
                certificate_chain=read_pem(self.tls_cert, "CERTIFICATE") if self.tls_cert else None)
        elif token is None:
            return None
        elif is_loopback(address.rpartition(":")[0]):
            channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        else:
            raise ChannelSecurityError(f"a bearer token goes to {address} only over TLS (give --tls-ca or --tls)")
        if token is None:
            return channel
        return grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))


def open_channel(address: str, security: ChannelSecurity = ChannelSecurity(),
                 options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """A channel to HOST:PORT, on the running event loop, secured as `security` says."""
    credentials = security.credentials(address)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credentials, options=list(options))
