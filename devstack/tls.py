"""A throwaway certificate authority per stack, so the real SDKs talk real HTTPS to the emulators.

Clients trust it through ``REQUESTS_CA_BUNDLE`` (honoured by requests, hence azure-core and MSAL);
nothing is installed system-wide and the key never touches the disk.
"""

from __future__ import annotations

import os
import ssl
import threading
from pathlib import Path

import trustme

_lock = threading.Lock()
_ca: trustme.CA | None = None
_server_cert: trustme.LeafCert | None = None

SERVER_NAMES = ("127.0.0.1", "localhost")


def _materials() -> tuple[trustme.CA, trustme.LeafCert]:
    global _ca, _server_cert
    with _lock:
        if _ca is None or _server_cert is None:
            _ca = trustme.CA(organization_name="devstack throwaway local CA")
            _server_cert = _ca.issue_cert(*SERVER_NAMES)
        return _ca, _server_cert


def server_context() -> ssl.SSLContext:
    """TLS context of every emulator in this process (one CA, one leaf for 127.0.0.1 and localhost)."""
    _, leaf = _materials()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    leaf.configure_cert(context)
    return context


def write_ca_bundle(directory: str | os.PathLike[str]) -> str:
    """Write the CA certificate (PEM) into ``directory``; returns the path for REQUESTS_CA_BUNDLE."""
    ca, _ = _materials()
    path = Path(directory) / "ca.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def client_context() -> ssl.SSLContext:
    """A client context trusting the stack's CA (for in-process checks such as readiness probes)."""
    ca, _ = _materials()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
