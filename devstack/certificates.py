"""Self-signed certificates for the app registration's certificate credential, and their Key Vault forms.

A Key Vault certificate is readable as the secret of the same name, holding the private key and the
certificate in the format of the certificate's policy: ``application/x-pem-file`` (PEM text: the
PKCS#8 private key, then the certificate) or ``application/x-pkcs12`` (the PFX, base64-encoded, no
password).  The emulator stores exactly these two forms, so the production code is tested on both.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

PEM_CONTENT_TYPE = "application/x-pem-file"
PFX_CONTENT_TYPE = "application/x-pkcs12"
FORMATS = {"pem": PEM_CONTENT_TYPE, "pfx": PFX_CONTENT_TYPE}


@dataclass(frozen=True)
class GeneratedCertificate:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def sha1_thumbprint(self) -> str:
        """Upper-case hex, as the portal and Graph's ``customKeyIdentifier`` show it."""
        return hashlib.sha1(self.der).hexdigest().upper()  # noqa: S324 (an identifier, as Entra uses it)

    @property
    def sha256_thumbprint(self) -> str:
        return hashlib.sha256(self.der).hexdigest().upper()

    def public_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def key_vault_value(self, fmt: str) -> str:
        """The secret value Key Vault shows for this certificate in ``fmt`` (``pem`` or ``pfx``)."""
        if fmt == "pem":
            key = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
            return (key + self.certificate.public_bytes(serialization.Encoding.PEM)).decode()
        if fmt == "pfx":
            pfx = pkcs12.serialize_key_and_certificates(None, self.key, self.certificate, None,
                                                        serialization.NoEncryption())
            return base64.b64encode(pfx).decode()
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def generate(common_name: str = "dataverse-app", *, days: int = 365) -> GeneratedCertificate:
    """An RSA-2048 self-signed certificate, valid from a minute ago (clock skew) for ``days``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return GeneratedCertificate(key, certificate)


def b64url_thumbprint(hex_thumbprint: str) -> str:
    """The ``x5t`` / ``x5t#S256`` header form of a hex thumbprint."""
    return base64.urlsafe_b64encode(bytes.fromhex(hex_thumbprint)).decode().rstrip("=")
