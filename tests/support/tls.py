"""A self-signed certificate made in the test, and clients that verify against it (no network, no openssl CLI)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSigned:
    cert_file: Path
    key_file: Path

    @property
    def ca_file(self) -> Path:
        """The certificate is its own authority: clients trust exactly it."""
        return self.cert_file

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def self_signed(directory: Path, *, name: str = "muai-test") -> SelfSigned:
    """A P-256 certificate for localhost, 127.0.0.1 and ::1, valid for a day, written as PEM into ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return SelfSigned(cert_file, key_file)


def https_json(url: str, context: ssl.SSLContext, *, method: str = "GET", body: Any = None,
               headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One request over TLS, verified with ``context``: (status, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json",
                                                                            **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        raw = response.read()
        return response.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()
