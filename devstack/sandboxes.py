"""Isolated tenants inside one stack process, so parallel tests never see each other's state.

Every emulator finds its sandbox from something the real client already sends (the tenant in the
Entra path, the managed-identity header, the ``tid`` of a bearer token), so the production code
needs no test hooks: only the settings differ between sandboxes.
"""

from __future__ import annotations

import re
import secrets as _random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt

SERVICES: tuple[str, ...] = ("identity", "entra", "keyvault", "dataverse")
KEYVAULT_AUDIENCE = "https://vault.azure.net"
DEFAULT_TOKEN_LIFETIME = 3599
CLIENT_SECRET_NAME = "dataverse-client-secret"
CERTIFICATE_NAME = "dataverse-certificate"
# The audience of a managed identity's token for workload identity federation (public cloud).
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
CREDENTIAL_MODES = ("secret", "federated", "certificate")
WEBHOOK_SECRET_NAME = "webhook-signing-secret"
MESSAGE_SECRET_NAME = "queue-message-signing-key"

# The `default` sandbox has fixed ids so `make run --serve` and the README's curl examples are stable.
DEFAULT_SANDBOX_ID = "default"
DEFAULT_TENANT_ID = "00000000-0000-4000-8000-00000000d5ac"
DEFAULT_CLIENT_ID = "00000000-0000-4000-8000-00000000c11e"
DEFAULT_APP_OBJECT_ID = "00000000-0000-4000-8000-0000000000a0"
DEFAULT_MI_PRINCIPAL_ID = "00000000-0000-4000-8000-0000000000e1"
DEFAULT_MI_CLIENT_ID = "00000000-0000-4000-8000-0000000000e2"
DEFAULT_IDENTITY_HEADER = "devstack-default-identity-header"
# THROWAWAY DEV-ONLY VALUE: accepted only by the local Entra emulator, never by anything real.
DEFAULT_CLIENT_SECRET = "devstack-default-client-secret-NOT-A-REAL-SECRET"
# THROWAWAY DEV-ONLY VALUE: the webhook signing key of the `default` sandbox (README curl examples).
DEFAULT_WEBHOOK_SECRET = "devstack-default-webhook-key-NOT-A-REAL-SECRET"
# THROWAWAY DEV-ONLY VALUE: the queue message signing key of the `default` sandbox (queuectl --state).
DEFAULT_MESSAGE_SECRET = "devstack-default-message-key-NOT-A-REAL-SECRET"


class OrgLike(Protocol):
    """What the stack needs from the Dataverse state (devstack.dataverse.state.Org implements much more)."""

    def users_wire(self) -> list[dict[str, Any]]: ...


OrgFactory = Callable[["Sandbox", str, int], OrgLike]
"""Builds the Dataverse state of a new sandbox: ``(sandbox, seed, users) -> organisation``."""


class Counters:
    """Per-service request counters; tests assert on them instead of timing things."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {s: {} for s in SERVICES}

    def count(self, service: str, key: str, n: int = 1) -> None:
        with self._lock:
            bucket = self._counts.setdefault(service, {})
            bucket[key] = bucket.get(key, 0) + n

    def get(self, service: str, key: str) -> int:
        with self._lock:
            return self._counts.get(service, {}).get(key, 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {service: dict(bucket) for service, bucket in self._counts.items()}

    def reset(self) -> None:
        with self._lock:
            self._counts = {s: {} for s in SERVICES}


@dataclass
class Fault:
    """One scripted misbehaviour; ``times == -1`` repeats forever.

    ``status``/``body``/``raw_body``/``headers`` replace the answer (status 500 unless given),
    ``delay`` sleeps first (alone it only slows the normal answer down), ``drop`` resets the TCP
    connection without any answer.
    """

    service: str
    method: str | None = None
    path_regex: str | None = None
    status: int | None = None
    body: Any = None
    raw_body: str | None = None
    headers: dict[str, str] | None = None
    delay: float = 0.0
    drop: bool = False
    times: int = 1

    def __post_init__(self) -> None:
        if self.service not in SERVICES:
            raise ValueError(f"unknown service {self.service!r}; one of {', '.join(SERVICES)}")
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as error:
                raise ValueError(f"path is not a valid regular expression: {error}") from None
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be a positive count or -1 (forever)")

    def matches(self, service: str, method: str, path: str) -> bool:
        if service != self.service:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_regex is None or re.search(self.path_regex, path) is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service, "method": self.method, "path": self.path_regex,
            "status": self.status, "body": self.body, "raw_body": self.raw_body,
            "headers": self.headers, "delay": self.delay, "drop": self.drop, "times": self.times,
        }


@dataclass
class SecretVersion:
    value: str
    version: str
    created: int
    enabled: bool = True
    content_type: str | None = None
    managed: bool = False  # the secret side of a Key Vault certificate (read-only, has a kid)


@dataclass
class ClientSecret:
    """A credential of the sandbox's Entra app registration; ``expires_at`` None means never."""

    value: str
    expires_at: float | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at


@dataclass
class FederatedCredential:
    """A federatedIdentityCredential of the app registration (Microsoft Graph's shape).

    Entra matches issuer, subject and one of the audiences exactly (case-sensitive).
    """

    name: str
    issuer: str
    subject: str
    audiences: list[str]

    def matches(self, issuer: object, subject: object, audiences: list[str]) -> bool:
        return (issuer == self.issuer and subject == self.subject
                and any(a in self.audiences for a in audiences))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "issuer": self.issuer, "subject": self.subject,
                "audiences": list(self.audiences)}


@dataclass
class RegisteredCertificate:
    """A certificate (keyCredential, AsymmetricX509Cert) uploaded to the app registration."""

    sha1: str  # upper-case hex thumbprints of the DER certificate
    sha256: str
    public_key: Any  # cryptography RSAPublicKey
    not_after: float

    def to_dict(self) -> dict[str, Any]:
        return {"thumbprint": self.sha1, "thumbprint_sha256": self.sha256, "not_after": self.not_after}


class NoDataverse:
    """The organisation of a registry built without the Dataverse emulator (tests of identity, Entra and
    Key Vault alone): no users, no tables."""

    def __init__(self, sandbox: Sandbox, seed: str = "default", users: int = 0) -> None:
        self.sandbox = sandbox
        self.seed = seed
        self.user_count = users

    def users_wire(self) -> list[dict[str, Any]]:
        return []


def _new_guid() -> str:
    return str(uuid.uuid4())


@dataclass
class Sandbox:
    """One tenant: Entra app, managed identity, Key Vault, Dataverse org, faults, latency, counters."""

    id: str
    tenant_id: str = field(default_factory=_new_guid)
    client_id: str = field(default_factory=_new_guid)
    app_object_id: str = field(default_factory=_new_guid)
    mi_principal_id: str = field(default_factory=_new_guid)
    mi_client_id: str = field(default_factory=_new_guid)
    identity_header: str = field(default_factory=lambda: _random.token_urlsafe(24))
    client_secrets: list[ClientSecret] = field(default_factory=list)
    federated_credentials: list[FederatedCredential] = field(default_factory=list)
    certificates: list[RegisteredCertificate] = field(default_factory=list)
    credential_mode: str = "secret"  # what sandbox_env tells the app to use (DATAVERSE_CREDENTIAL)
    # How Entra refuses a federated assertion no record matches: "current" (401 invalid_client,
    # AADSTS700211/700212/700213 naming the claim) or "legacy" (400 invalid_request, AADSTS70021).
    federation_errors: str = "current"
    secrets: dict[str, list[SecretVersion]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    token_lifetime: int = DEFAULT_TOKEN_LIFETIME
    tokens_revoked_before: float = 0.0
    keyvault_forbidden: bool = False
    created: float = field(default_factory=time.time)
    org: Any = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # --- faults and latency -------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, service: str, method: str, path: str) -> Fault | None:
        """First matching fault in insertion order, consuming one of its ``times``."""
        with self.lock:
            for index, fault in enumerate(self.faults):
                if fault.matches(service, method, path):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            del self.faults[index]
                    return fault
        return None

    def set_latency(self, service: str, seconds: float) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
        if seconds < 0:
            raise ValueError("latency must not be negative")
        with self.lock:
            self.latency[service] = float(seconds)

    # --- Entra app credentials ----------------------------------------------------------------
    def check_client_secret(self, value: str) -> str:
        """``ok``, ``expired`` or ``invalid`` — the three answers Entra distinguishes."""
        with self.lock:
            candidates = [c for c in self.client_secrets if _random.compare_digest(c.value, value)]
        if not candidates:
            return "invalid"
        return "ok" if any(not c.expired() for c in candidates) else "expired"

    def set_client_secret(self, value: str, *, keep_old: bool = False) -> None:
        with self.lock:
            if keep_old:
                self.client_secrets.append(ClientSecret(value))
            else:
                self.client_secrets = [ClientSecret(value)]

    def expire_client_secret(self) -> None:
        now = time.time()
        with self.lock:
            for secret in self.client_secrets:
                secret.expires_at = now

    def remove_client_secrets(self) -> None:
        """No client secret at all: none on the app registration, none in Key Vault."""
        with self.lock:
            self.client_secrets = []
        self.delete_secret(CLIENT_SECRET_NAME)

    def add_federated_credential(self, credential: FederatedCredential) -> None:
        with self.lock:
            if any(c.name == credential.name for c in self.federated_credentials):
                raise ValueError(f"a federated credential named {credential.name!r} already exists")
            self.federated_credentials.append(credential)

    def remove_federated_credentials(self) -> None:
        with self.lock:
            self.federated_credentials = []

    def find_federated_credential(self, issuer: object, subject: object,
                                  audiences: list[str]) -> FederatedCredential | None:
        with self.lock:
            found = [c for c in self.federated_credentials if c.matches(issuer, subject, audiences)]
        return found[0] if found else None

    def register_certificate(self, certificate: RegisteredCertificate) -> None:
        with self.lock:
            self.certificates = [c for c in self.certificates if c.sha1 != certificate.sha1]
            self.certificates.append(certificate)

    def unregister_certificate(self, thumbprint: str) -> bool:
        with self.lock:
            before = len(self.certificates)
            self.certificates = [c for c in self.certificates
                                 if thumbprint.upper() not in (c.sha1, c.sha256)]
            return len(self.certificates) != before

    def find_certificate(self, *, sha1: str | None = None,
                         sha256: str | None = None) -> RegisteredCertificate | None:
        with self.lock:
            for certificate in self.certificates:
                if ((sha256 and certificate.sha256 == sha256.upper())
                        or (sha1 and certificate.sha1 == sha1.upper())):
                    return certificate
        return None

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens_revoked_before = time.time()

    # --- Key Vault ----------------------------------------------------------------------------
    def set_secret(self, name: str, value: str, *, content_type: str | None = None,
                   managed: bool = False) -> SecretVersion:
        version = SecretVersion(value=value, version=uuid.uuid4().hex, created=int(time.time()),
                                content_type=content_type, managed=managed)
        with self.lock:
            existing = next((k for k in self.secrets if k.lower() == name.lower()), name)
            self.secrets.setdefault(existing, []).append(version)
        return version

    def get_secret(self, name: str, version: str | None = None) -> SecretVersion | None:
        """Latest enabled version, or the named one; names are case-insensitive as in Key Vault."""
        with self.lock:
            versions = next((v for k, v in self.secrets.items() if k.lower() == name.lower()), None)
            if not versions:
                return None
            if version:
                return next((v for v in versions if v.version == version.lower()), None)
            enabled = [v for v in versions if v.enabled]
            return enabled[-1] if enabled else None

    def delete_secret(self, name: str) -> bool:
        """Every version gone (a deleted and purged secret)."""
        with self.lock:
            key = next((k for k in self.secrets if k.lower() == name.lower()), None)
            if key is None:
                return False
            del self.secrets[key]
            return True

    def secret_versions(self, name: str) -> list[SecretVersion]:
        with self.lock:
            versions = next((v for k, v in self.secrets.items() if k.lower() == name.lower()), [])
            return list(versions)

    def info(self) -> dict[str, Any]:
        """What the control API tells a test about its sandbox (secrets included: it is all local)."""
        with self.lock:
            return {
                "id": self.id,
                "tenant_id": self.tenant_id,
                "client_id": self.client_id,
                "app_object_id": self.app_object_id,
                "mi_principal_id": self.mi_principal_id,
                "mi_client_id": self.mi_client_id,
                "identity_header": self.identity_header,
                "client_secret_name": CLIENT_SECRET_NAME,
                "webhook_secret_name": WEBHOOK_SECRET_NAME,
                "certificate_name": CERTIFICATE_NAME,
                "message_secret_name": MESSAGE_SECRET_NAME,
                "token_lifetime": self.token_lifetime,
                "credential_mode": self.credential_mode,
                # The app registration's credentials (no values) and the vault's secret names.
                "client_secrets": len(self.client_secrets),
                "federated_credentials": [c.to_dict() for c in self.federated_credentials],
                "certificates": [c.to_dict() for c in self.certificates],
                "vault_secrets": sorted(name for name, versions in self.secrets.items() if versions),
            }


class Registry:
    """All sandboxes of one stack plus the stack's token signing key. Thread-safe."""

    def __init__(self, *, signing_key: bytes | None = None, org_factory: OrgFactory = NoDataverse) -> None:
        """``org_factory`` builds each sandbox's Dataverse organisation: the stack passes
        ``devstack.dataverse.state.Org``; the default has none, for tests of the other emulators."""
        self._org_factory = org_factory
        self._lock = threading.RLock()
        self._by_id: dict[str, Sandbox] = {}
        self._by_tenant: dict[str, Sandbox] = {}
        self._by_header: dict[str, Sandbox] = {}
        self._key = signing_key or _random.token_bytes(32)
        # Filled in by the stack once the servers are bound: service name -> base URL.
        self.urls: dict[str, str] = {}
        self.ca_bundle: str | None = None

    # --- lookup -------------------------------------------------------------------------------
    def get(self, sandbox_id: str) -> Sandbox | None:
        with self._lock:
            return self._by_id.get(sandbox_id)

    def by_tenant(self, tenant_id: str) -> Sandbox | None:
        with self._lock:
            return self._by_tenant.get(tenant_id.lower())

    def by_identity_header(self, header: str) -> Sandbox | None:
        with self._lock:
            return self._by_header.get(header)

    def __iter__(self) -> Iterator[Sandbox]:
        with self._lock:
            return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    # --- lifecycle ----------------------------------------------------------------------------
    def create(self, seed: str = "default", users: int = 0, sandbox_id: str | None = None) -> Sandbox:
        if seed not in ("default", "empty"):
            raise ValueError(f"unknown seed {seed!r}; 'default' or 'empty'")
        if users < 0:
            raise ValueError("users must not be negative")
        if sandbox_id == DEFAULT_SANDBOX_ID:
            sandbox = Sandbox(
                id=DEFAULT_SANDBOX_ID, tenant_id=DEFAULT_TENANT_ID, client_id=DEFAULT_CLIENT_ID,
                app_object_id=DEFAULT_APP_OBJECT_ID, mi_principal_id=DEFAULT_MI_PRINCIPAL_ID,
                mi_client_id=DEFAULT_MI_CLIENT_ID, identity_header=DEFAULT_IDENTITY_HEADER,
            )
            client_secret, webhook_secret = DEFAULT_CLIENT_SECRET, DEFAULT_WEBHOOK_SECRET
            message_secret = DEFAULT_MESSAGE_SECRET
        else:
            sandbox = Sandbox(id=sandbox_id or f"sbx-{uuid.uuid4().hex[:12]}")
            client_secret, webhook_secret = _random.token_urlsafe(30), _random.token_urlsafe(32)
            message_secret = _random.token_urlsafe(32)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", sandbox.id):
            raise ValueError("sandbox id: 1-64 letters, digits, '_', '.', '-'")
        sandbox.set_client_secret(client_secret)
        sandbox.set_secret(CLIENT_SECRET_NAME, client_secret)
        sandbox.set_secret(WEBHOOK_SECRET_NAME, webhook_secret)
        sandbox.set_secret(MESSAGE_SECRET_NAME, message_secret)
        sandbox.org = self._org_factory(sandbox, seed, users)
        with self._lock:
            if sandbox.id in self._by_id:
                raise ValueError(f"sandbox {sandbox.id!r} already exists")
            self._by_id[sandbox.id] = sandbox
            self._by_tenant[sandbox.tenant_id.lower()] = sandbox
            self._by_header[sandbox.identity_header] = sandbox
        return sandbox

    def delete(self, sandbox_id: str) -> bool:
        with self._lock:
            sandbox = self._by_id.pop(sandbox_id, None)
            if sandbox is None:
                return False
            self._by_tenant.pop(sandbox.tenant_id.lower(), None)
            self._by_header.pop(sandbox.identity_header, None)
        close = getattr(sandbox.org, "close", None)
        if callable(close):
            close()
        return True

    # --- tokens -------------------------------------------------------------------------------
    def federation_issuer(self, sandbox: Sandbox) -> str:
        """The issuer of the managed identity's tokens for the token exchange.

        Azure: ``https://login.microsoftonline.com/<tenant>/v2.0``; here the Entra emulator's host.
        """
        return f"{self.urls.get('entra', 'https://login.microsoftonline.com').rstrip('/')}/{sandbox.tenant_id}/v2.0"

    def issue_token(self, sandbox: Sandbox, audience: str, oid: str, appid: str,
                    lifetime: int | None = None, *, issuer: str | None = None) -> tuple[str, int]:
        """A token for ``audience`` (v1-style unless ``issuer`` is given); returns ``(token, exp)``."""
        now = time.time()
        life = sandbox.token_lifetime if lifetime is None else lifetime
        exp = int(now) + int(life)
        claims = {
            "aud": audience,
            "iss": issuer or f"https://sts.windows.net/{sandbox.tenant_id}/",
            "tid": sandbox.tenant_id,
            "appid": appid,
            "oid": oid,
            "sub": oid,
            "iat": int(now),
            "nbf": int(now) - 1,
            "exp": exp,
            "jti": uuid.uuid4().hex,
            # iat has whole seconds; revocation must not hit a token issued just after it.
            "xms_devstack_iat": now,
            "ver": "2.0" if issuer else "1.0",
        }
        if issuer:
            claims["azp"] = appid
        return jwt.encode(claims, self._key, algorithm="HS256"), exp

    def verify_token(self, token: str, audience: str) -> dict[str, Any] | None:
        """Claims of a valid, unexpired, unrevoked token for ``audience`` of a live sandbox, else None."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=["HS256"], audience=audience.rstrip("/"),
                options={"require": ["exp", "iat", "tid", "aud"]}, leeway=0,
            )
        except jwt.PyJWTError:
            return None
        sandbox = self.by_tenant(str(claims["tid"]))
        if sandbox is None:
            return None
        issued = float(claims.get("xms_devstack_iat", claims["iat"]))
        if issued < sandbox.tokens_revoked_before:
            return None
        return claims

    def verify_assertion(self, token: str) -> tuple[dict[str, Any] | None, str]:
        """Signature and lifetime of a token this stack issued, presented as a federated client assertion.

        ``(claims, "")``, or ``(None, "expired" | "invalid")``; the audience is Entra's to match.
        """
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=["HS256"], options={"verify_aud": False, "require": ["exp"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            return None, "expired"
        except jwt.PyJWTError:
            return None, "invalid"
        return claims, ""

    def sandbox_for_token(self, token: str, audience: str) -> tuple[Sandbox, dict[str, Any]] | None:
        claims = self.verify_token(token, audience)
        if claims is None:
            return None
        sandbox = self.by_tenant(str(claims["tid"]))
        return (sandbox, claims) if sandbox is not None else None
