"""Throwaway TLS certificates for the security tests, made at run time (none are committed): a CA that signs
the verifier's certificate, a CA that signs client certificates (mutual TLS), and a stranger CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The names a test connects by: the verifier's certificate must cover both.
SERVER_NAMES = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


@dataclass(frozen=True)
class Certificates:
    server_ca: Path  # signed server_cert
    server_cert: Path
    server_key: Path
    client_ca: Path  # signed client_cert
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate that no CA of the verifier's signed
    stranger_key: Path


def _issue(common_name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
           *, is_ca: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(SERVER_NAMES)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_certificates(directory: Path) -> Certificates:
    server_ca, client_ca, stranger_ca = (_issue(name, None, is_ca=True) for name in ("server-ca", "client-ca", "stranger-ca"))
    server_ca_path, _ = _write(directory, "server-ca", *server_ca)
    client_ca_path, _ = _write(directory, "client-ca", *client_ca)
    server_cert, server_key = _write(directory, "server", *_issue("verifier", server_ca, is_ca=False))
    client_cert, client_key = _write(directory, "client", *_issue("edge", client_ca, is_ca=False))
    stranger_cert, stranger_key = _write(directory, "stranger", *_issue("stranger", stranger_ca, is_ca=False))
    return Certificates(server_ca_path, server_cert, server_key, client_ca_path, client_cert, client_key, stranger_cert,
                        stranger_key)
