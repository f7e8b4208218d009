"""Bearer tokens (compared against every accepted one, reloaded in place), the serve flags for TLS and tokens,
and the warning for a verifier open to the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_verifier.auth import (
    TokenStore,
    exposure_warning,
    presented_token,
    reload_tokens,
)
from cloud_verifier.server import ServeConfig, ServeConfigError
from specbridge.cli import EXIT_USER_ERROR, main


def _token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_every_listed_token_is_accepted_and_nothing_else(tmp_path: Path) -> None:
    tokens = TokenStore(_token_file(tmp_path, "# edge fleet\nalpha-1\n\nbeta-2\n"))
    assert tokens.accepts("alpha-1") and tokens.accepts("beta-2")
    for other in ("alpha-", "alpha-11", "ALPHA-1", "", "# edge fleet"):
        assert not tokens.accepts(other), other


def test_reload_swaps_the_tokens_in_place(tmp_path: Path) -> None:
    path = _token_file(tmp_path, "old\nkept\n")
    tokens = TokenStore(path)
    path.write_text("kept\nnew\n")
    assert reload_tokens(tokens) == f"specbridge verifier reloaded 2 auth tokens from {path}"
    assert tokens.accepts("new") and tokens.accepts("kept") and not tokens.accepts("old")


def test_reload_without_a_token_file_is_harmless() -> None:
    assert reload_tokens(None) == "specbridge verifier: nothing to reload on SIGHUP (no --auth-token-file)"


def test_a_bad_token_file_on_reload_keeps_the_tokens_in_use(tmp_path: Path) -> None:
    path = _token_file(tmp_path, "kept\n")
    tokens = TokenStore(path)
    path.write_text("# everything commented out by mistake\n")
    assert reload_tokens(tokens) == f"specbridge: error: kept the auth tokens in use: the token file {path} holds no token"
    assert tokens.accepts("kept")


@pytest.mark.parametrize(("metadata", "token"), [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("user-agent", "grpc"), ("authorization", "Bearer a.b-c")), "a.b-c"),
    ((("authorization", "Basic abc"),), None),
    ((("x-token", "Bearer abc"),), None),
    ((), None),
    (None, None),
])
def test_the_token_is_read_from_the_bearer_authorization_header(metadata, token) -> None:
    assert presented_token(metadata) == token


def test_loopback_needs_no_warning_and_the_network_needs_tls_and_tokens() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        assert exposure_warning(host, 50051, tls=False, auth=False) is None
    assert exposure_warning("0.0.0.0", 50051, tls=True, auth=True) is None
    both = exposure_warning("0.0.0.0", 50051, tls=False, auth=False)
    assert both.startswith("specbridge: warning: the verifier listens on 0.0.0.0:50051, beyond this machine, without TLS")
    assert "without --auth-token-file" in both and "\n" not in both
    assert "TLS" not in exposure_warning("::", 50051, tls=True, auth=False)
    assert "--auth-token-file" not in exposure_warning("10.0.0.7", 50051, tls=False, auth=True)


def test_serve_security_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    present = _token_file(tmp_path, "token\n")
    with pytest.raises(ServeConfigError, match="--tls-cert and --tls-key go together"):
        ServeConfig(target="t", tls_cert=str(present))
    with pytest.raises(ServeConfigError, match="--tls-client-ca \\(mutual TLS\\) needs --tls-cert"):
        ServeConfig(target="t", tls_client_ca=str(present))
    with pytest.raises(ServeConfigError, match=f"--auth-token-file {tmp_path / 'absent'}: no such file"):
        ServeConfig(target="t", auth_token_file=str(tmp_path / "absent"))
    assert ServeConfig(target="t", tls_cert=str(present), tls_key=str(present)).uses_tls


def test_serve_with_a_key_but_no_certificate_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--target", "t", "--tls-key", str(_token_file(tmp_path, "not a key"))])
    assert code == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        "specbridge: error: --tls-cert and --tls-key go together (the certificate and its private key)"]
