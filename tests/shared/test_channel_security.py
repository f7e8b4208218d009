"""The edge's channel settings: token and PEM files, which settings go together, and when a token may travel."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from shared.channel_security import (
    ChannelSecurity,
    ChannelSecurityError,
    is_loopback,
    read_pem,
    read_tokens,
)
from specbridge.cli import EXIT_USER_ERROR, main
from tests.certificates import Certificates, make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def _file(tmp_path: Path, text: str, name: str = "tokens") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_token_file_ignores_blank_lines_comments_and_surrounding_space(tmp_path: Path) -> None:
    path = _file(tmp_path, "# rotated 2026-11\n\n  first-token  \n#second-token\nthird.token_3\n")
    assert read_tokens(path) == ("first-token", "third.token_3")


@pytest.mark.parametrize(("text", "complaint"), [
    ("# only a comment\n\n", "holds no token"),
    ("good\nhas a space\n", "line 2 of .* is not a token"),
    ("tök\n", "line 1 of .* is not a token"),
])
def test_a_token_file_without_usable_tokens_is_refused(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(ChannelSecurityError, match=complaint):
        read_tokens(_file(tmp_path, text))


def test_pem_files_must_hold_what_they_are_given_for(certificates: Certificates) -> None:
    assert read_pem(certificates.server_cert, "CERTIFICATE").startswith(b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ChannelSecurityError, match="holds no PEM CERTIFICATE"):
        read_pem(certificates.server_key, "CERTIFICATE")  # the key given where the certificate belongs
    with pytest.raises(ChannelSecurityError, match="holds no PEM PRIVATE KEY"):
        read_pem(certificates.server_cert, "PRIVATE KEY")


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True),
                                                 ("[::1]", True), ("::1", True), ("0.0.0.0", False), ("::", False),
                                                 ("10.0.0.7", False), ("gpu-host", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_client_certificate_needs_its_key_and_files_must_exist(certificates: Certificates, tmp_path: Path) -> None:
    with pytest.raises(ChannelSecurityError, match="--tls-cert and --tls-key go together"):
        ChannelSecurity(tls_cert=str(certificates.client_cert))
    with pytest.raises(ChannelSecurityError, match=f"--tls-ca {tmp_path / 'absent.crt'}: no such file"):
        ChannelSecurity(tls_ca=str(tmp_path / "absent.crt"))


def test_tls_is_on_once_any_tls_setting_is_given(certificates: Certificates) -> None:
    assert not ChannelSecurity().uses_tls
    assert ChannelSecurity(tls=True).uses_tls
    assert ChannelSecurity(tls_ca=str(certificates.server_ca)).uses_tls
    assert ChannelSecurity(tls_cert=str(certificates.client_cert), tls_key=str(certificates.client_key)).uses_tls


def test_a_token_travels_in_plaintext_only_to_this_machine(tmp_path: Path, certificates: Certificates) -> None:
    token_only = ChannelSecurity(auth_token_file=_file(tmp_path, "secret\n"))
    assert ChannelSecurity().credentials("10.0.0.7:50051") is None  # plaintext, nothing to protect
    assert isinstance(token_only.credentials("127.0.0.1:50051"), grpc.ChannelCredentials)
    assert isinstance(token_only.credentials("[::1]:50051"), grpc.ChannelCredentials)
    with pytest.raises(ChannelSecurityError, match="a bearer token goes to 10.0.0.7:50051 only over TLS"):
        token_only.credentials("10.0.0.7:50051")
    over_tls = ChannelSecurity(tls_ca=str(certificates.server_ca), auth_token_file=token_only.auth_token_file)
    assert isinstance(over_tls.credentials("10.0.0.7:50051"), grpc.ChannelCredentials)


def test_a_client_sends_exactly_one_token(tmp_path: Path) -> None:
    assert ChannelSecurity(auth_token_file=_file(tmp_path, "# mine\nsecret\n")).token() == "secret"
    with pytest.raises(ChannelSecurityError, match="holds 2 tokens; a client sends one"):
        ChannelSecurity(auth_token_file=_file(tmp_path, "one\ntwo\n")).token()


def test_edge_settings_keep_only_the_channel_security() -> None:
    from edge_client.cli import GenerateConfig

    config = GenerateConfig(prompt="hi", tls=True)
    assert config.channel_security() == ChannelSecurity(tls=True)


@pytest.mark.parametrize("flags", [["--tls-cert", "{client_cert}"], ["--tls-ca", "{missing}"],
                                   ["--auth-token-file", "{missing}"]])
def test_cli_security_mistakes_are_one_line_and_exit_2(flags: list[str], certificates: Certificates, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    values = {"client_cert": certificates.client_cert, "missing": tmp_path / "missing"}
    code = main(["generate", "--prompt", "hi", *(flag.format(**values) for flag in flags)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith(("specbridge: error: --tls-", "specbridge: error: --auth-token-file"))
