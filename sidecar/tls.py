"""TLS for the sidecar's listeners and its client to the orchestrator, and the rule that keeps an admin token off
the network in clear text.

Pure helpers: the config validator asks :func:`insecure_admin_problem`, ``serve`` builds its context with
:func:`server_ssl_context`, the tuner's client verifies with :func:`client_ssl_context`. The orchestrator has its own
copy (``orchestrator/tls.py``): the two processes share no code.
"""

from __future__ import annotations

import ipaddress
import ssl

from sidecar.errors import SidecarError


class TlsConfigError(SidecarError, ValueError):
    """The certificate or key named in the configuration cannot be loaded."""


def is_loopback(host: str) -> bool:
    """Whether a listen address only reaches this machine: ``localhost``, 127.0.0.0/8, ``::1``.

    Anything else (``0.0.0.0``, ``::``, an interface address, a host name) may be reached from the network.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_admin_problem(
    *, section: str, host: str, token_key: str, token_set: bool, tls_on: bool, allowed: bool
) -> str | None:
    """Why this listener must not start (a bearer token would cross the network unencrypted), or None.

    ``section`` prefixes the key names in the message (``server``, ``sidecar``), so the operator reads which keys
    to change.
    """
    if not token_set or tls_on or allowed or is_loopback(host):
        return None
    return (
        f"{section}.host {host!r} is reachable beyond loopback and {token_key} is set, but TLS is off: the bearer "
        f"token would cross the network in clear text. Set {section}.tls.cert_file and {section}.tls.key_file, "
        f"listen on 127.0.0.1, or set {section}.allow_insecure_admin: true (only behind a TLS-terminating proxy)"
    )


def server_ssl_context(cert_file: str, key_file: str, *, section: str = "sidecar") -> ssl.SSLContext:
    """A server-side context presenting ``cert_file`` (PEM chain) with ``key_file``; TLS 1.2 at least."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"{section}.tls.cert_file {cert_file!r} / {section}.tls.key_file {key_file!r} cannot be loaded: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from exc
    return context


def client_ssl_context(ca_file: str | None, *, key: str) -> ssl.SSLContext:
    """A client context that verifies the peer against ``ca_file`` (PEM), or the system's trust store without one."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"{key} {ca_file!r} cannot be loaded: {getattr(exc, 'strerror', None) or exc}") from exc


__all__ = ["TlsConfigError", "client_ssl_context", "insecure_admin_problem", "is_loopback", "server_ssl_context"]
