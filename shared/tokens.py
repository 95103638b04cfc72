"""The application's Dataverse access token: one credential per warm instance, one request at a time.

azure-identity's ``ClientSecretCredential`` caches its token, but concurrent cold callers each
send their own token request; this provider puts a single flight in front of it, keeps the
token until five minutes before it expires, and answers two events azure-identity cannot:

* Dataverse rejected the token (401): :meth:`TokenProvider.invalidate` drops it *and* the
  credential, because the credential's cache would hand the same token back.
* Entra ID rejected the client secret (``invalid_client``, AADSTS7000215 / 7000222): the secret
  was rotated in Key Vault, so it is re-read once and the request tried once more with a new
  credential; no restart needed.

``DATAVERSE_CREDENTIAL`` picks what proves the app to Entra ID, with the same guarantees for each:

* ``secret``: the client secret read from Key Vault (above).
* ``federated``: no secret at all.  ``ClientAssertionCredential`` sends a managed-identity token for
  ``api://AzureADTokenExchange`` as the client assertion; Entra ID accepts it when the app
  registration has a matching federated credential (else AADSTS70021, ``entra_federation_mismatch``).
* ``certificate``: ``CertificateCredential`` with the PEM/PFX that Key Vault exposes as the secret
  named like the certificate; an unknown or rotated certificate (AADSTS700027) is re-read once,
  like a rotated secret (``entra_invalid_certificate`` when the re-read does not help).

Entra's answer is classified from the ``error`` and ``error_codes`` of its JSON body (captured
through azure-core's response hook, since the credential's exception keeps only a message),
never from ``error_description`` text.

The certificate's Key Vault secret is either ``application/x-pem-file`` (PEM text: private key and
certificate) or ``application/x-pkcs12`` (the PFX, base64, no password): a PEM always starts with
``-----BEGIN``, so the value alone says which, and the secret store stays content-type agnostic.
In federated mode a failure of the managed identity itself is a ``managed_identity_*`` error (the
identity endpoint, not Entra, is what to fix or wait for).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import AuthError
from shared.logs import register_secret
from shared.secrets import SecretStore, is_network_failure
from shared.singleflight import SingleFlight

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.pipeline import PipelineResponse

    from shared.secrets import _IdentityProbe
    from shared.settings import Settings

logger = logging.getLogger("shared.tokens")

REFRESH_MARGIN_SECONDS = 300.0
AUTH_TIMEOUT_SECONDS = 10.0
AUTH_RETRIES = 2

INVALID_CLIENT_CODES = frozenset({7000215, 7000222})
UNAUTHORIZED_CLIENT_CODES = frozenset({700016})
INVALID_TENANT_CODES = frozenset({90002})
INVALID_SCOPE_CODES = frozenset({70011, 500011})
# 70021: no federated credential matches the assertion's issuer/subject/audience; the 7002xx forms name
# which claim did not match (newer answers), 7002138: the subject matches only case-insensitively.
FEDERATION_MISMATCH_CODES = frozenset({70021, 700211, 700212, 700213, 7002137, 7002138})
INVALID_CERTIFICATE_CODES = frozenset({700027})
# The assertion itself is unusable: expired / not yet valid (700024, a clock problem), malformed
# (50027), issued for another client id (700021) or another token endpoint (50013).
INVALID_ASSERTION_CODES = frozenset({700024, 50027, 700021, 50013})
TOKEN_EXCHANGE_SCOPE = "api://AzureADTokenExchange/.default"  # noqa: S105 (a scope, not a secret)
# What a rejected credential of each mode is classified as; these (and only these) trigger a re-read.
_ROTATABLE = {
    "secret": {"entra_invalid_client"},
    "certificate": {"entra_invalid_certificate", "entra_invalid_client"},
}


@dataclass(frozen=True)
class EntraAnswer:
    """What Entra answered to the last failed request: status, ``error`` and ``error_codes``."""

    status: int
    error: str | None
    error_codes: tuple[int, ...]

    @classmethod
    def from_body(cls, status: int, body: bytes | str | None) -> EntraAnswer:
        error: str | None = None
        codes: tuple[int, ...] = ()
        try:
            data = json.loads(body or b"")
        except (ValueError, TypeError):
            data = None
        if isinstance(data, dict):
            raw_error = data.get("error")
            error = raw_error if isinstance(raw_error, str) else None
            raw_codes = data.get("error_codes")
            if isinstance(raw_codes, list):
                codes = tuple(c for c in raw_codes if isinstance(c, int) and not isinstance(c, bool))
        return cls(status, error, codes)


class _EntraProbe:
    """Keeps, per thread, the last error answer from the authority (token or discovery endpoint)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def reset(self) -> None:
        self._local.answer = None

    def on_response(self, response: PipelineResponse[Any, Any]) -> None:
        http = response.http_response
        if http.status_code >= 400:
            try:
                body: bytes | None = http.body()
            except Exception:
                body = None
            self._local.answer = EntraAnswer.from_body(http.status_code, body)

    @property
    def answer(self) -> EntraAnswer | None:
        answer: EntraAnswer | None = getattr(self._local, "answer", None)
        return answer


def _answer_from_exception(exc: BaseException) -> EntraAnswer | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if response is None or not isinstance(status, int):
        return None
    try:
        body = response.body()
    except Exception:
        body = None
    return EntraAnswer.from_body(status, body)


@dataclass(frozen=True)
class _Token:
    value: str
    expires_on: float
    lifetime: float


class TokenProvider:
    """Bearer tokens for ``settings.scope``; see the module docstring for the rules."""

    def __init__(
        self,
        settings: Settings,
        secrets: SecretStore,
        *,
        credential_factory: Callable[[str], TokenCredential] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._secrets = secrets
        self._factory = credential_factory
        self._clock = clock
        self._probe = _EntraProbe()
        self._lock = threading.Lock()
        self._credential: TokenCredential | None = None
        self._credential_secret: str | None = None
        self._token: _Token | None = None
        self._flight: SingleFlight[str] = SingleFlight()
        self._identity: TokenCredential | None = None  # federated mode: the managed identity
        self._identity_probe: _IdentityProbe | None = None
        self._local = threading.local()  # federated mode: claims of this thread's last assertion
        self.requests = 0  # token requests sent through a credential (for diagnostics and tests)

    # -- public -----------------------------------------------------------------------------------

    def get_token(self) -> str:
        token = self._token
        if token is not None and self._fresh(token):
            return token.value
        return self._flight.do("token", self._fetch_if_needed)

    def federation_claims(self) -> dict[str, str]:
        """Issuer, subject and audience of the managed identity's token-exchange token (diagnostics)."""
        return assertion_claims(self._assertion())

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (Dataverse refused it); a token already replaced by another caller stays."""
        with self._lock:
            if self._token is not None and self._token.value == token:
                logger.info("Dataverse refused the cached token; the next call fetches a new one")
                self._token = None
                self._drop_credential()

    # -- internals --------------------------------------------------------------------------------

    def _fresh(self, token: _Token) -> bool:
        # Short-lived tokens (a test authority) keep half their lifetime rather than none of it.
        margin = min(REFRESH_MARGIN_SECONDS, token.lifetime / 2)
        return self._clock() < token.expires_on - margin

    def _fetch_if_needed(self) -> str:
        token = self._token
        if token is not None and self._fresh(token):
            return token.value
        return self._fetch()

    def _fetch(self) -> str:
        mode = self._settings.credential
        if mode == "federated":
            # Nothing to read or rotate: the assertion is the managed identity's current token, asked
            # for at each token request (azure-identity caches it until it nears expiry).
            token = self._request("federated")
            with self._lock:
                self._token = token
            return token.value
        secret = read_material(self._secrets, self._settings)
        rotatable = _ROTATABLE.get(mode, _ROTATABLE["secret"])
        try:
            token = self._request(secret)
        except AuthError as exc:
            if exc.code not in rotatable:
                raise
            fresh = read_material(self._secrets, self._settings, stale=secret)
            if fresh == secret:
                raise self._rejected(exc) from exc
            logger.warning(
                "Entra ID rejected the %s (AADSTS%s); Key Vault has a new one: retrying once",
                mode,
                exc.aadsts,
            )
            try:
                token = self._request(fresh)
            except AuthError as again:
                if again.code in rotatable:
                    raise self._rejected(again) from again
                raise
        with self._lock:
            self._token = token
        return token.value

    def _request(self, secret: str) -> _Token:
        stale = self._token
        token = self._request_once(secret)
        if stale is not None and token.value == stale.value:
            # The credential's own cache handed back the token being replaced (azure-identity's
            # ClientAssertionCredential waits 30 s between refresh attempts): ask a new credential.
            with self._lock:
                self._drop_credential()
            token = self._request_once(secret)
        return token

    def _request_once(self, secret: str) -> _Token:
        credential = self._credential_for(secret)
        self._probe.reset()
        self._local.assertion = None
        self.requests += 1
        started = self._clock()
        try:
            access = credential.get_token(self._settings.scope)
        except AuthError:
            raise
        except Exception as exc:
            raise self._classify(exc) from exc
        lifetime = max(0.0, float(access.expires_on) - started)
        return _Token(access.token, float(access.expires_on), lifetime)

    def _credential_for(self, secret: str) -> TokenCredential:
        with self._lock:
            if self._credential is None or self._credential_secret != secret:
                self._drop_credential()
                self._credential = self._build(secret)
                self._credential_secret = secret
            return self._credential

    def _drop_credential(self) -> None:
        # Not closed here: another thread may still be inside it; its pool goes with the object.
        self._credential = None
        self._credential_secret = None

    def _build(self, secret: str) -> TokenCredential:
        mode = self._settings.credential
        if mode != "federated":
            register_secret(secret)
        if self._factory is not None:
            return self._factory(secret)
        s = self._settings
        common: dict[str, Any] = {
            "authority": s.authority_host or None,
            "disable_instance_discovery": not s.public_authority,
            "connection_timeout": AUTH_TIMEOUT_SECONDS,
            "read_timeout": AUTH_TIMEOUT_SECONDS,
            "retry_total": AUTH_RETRIES,
            "retry_connect": AUTH_RETRIES,
            "retry_read": AUTH_RETRIES,
            "retry_status": AUTH_RETRIES,
            "retry_backoff_factor": 0.5,
            "retry_backoff_max": 4,
            "raw_response_hook": self._probe.on_response,
        }
        if mode == "federated":
            from azure.identity import ClientAssertionCredential

            return ClientAssertionCredential(s.tenant_id, s.client_id, self._assertion, **common)
        if mode == "certificate":
            from azure.identity import CertificateCredential

            try:
                return CertificateCredential(
                    s.tenant_id, s.client_id, certificate_data=certificate_bytes(secret), **common
                )
            except ValueError as exc:
                raise AuthError(
                    f"Key Vault secret '{s.certificate_name}' ({self._secrets.vault_url}) holds no usable "
                    "certificate: a Key Vault certificate with its private key is expected (content type "
                    f"application/x-pem-file or application/x-pkcs12, not password-protected) ({exc}).",
                    code="keyvault_certificate_invalid",
                ) from exc
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(s.tenant_id, s.client_id, secret, **common)

    def _assertion(self) -> str:
        """The client assertion of federated mode: the managed identity's token for the token exchange.

        Asked for at each token request (the MI endpoint caches it), so an expired assertion is never sent.
        """
        from shared.secrets import _IdentityProbe, classify_identity_failure

        with self._lock:
            if self._identity is None:
                from azure.identity import ManagedIdentityCredential

                # The probe sees the identity endpoint's status, which MSAL's error does not keep
                # (a 500 becomes "invalid_scope"): outage and misconfiguration stay apart.
                self._identity_probe = _IdentityProbe()
                self._identity = ManagedIdentityCredential(
                    client_id=os.environ.get("AZURE_CLIENT_ID") or None,
                    raw_request_hook=self._identity_probe.on_request,
                    raw_response_hook=self._identity_probe.on_response,
                    connection_timeout=AUTH_TIMEOUT_SECONDS,
                    read_timeout=AUTH_TIMEOUT_SECONDS,
                    retry_total=AUTH_RETRIES,
                    retry_backoff_factor=0.5,
                    retry_backoff_max=4,
                )
            identity, probe = self._identity, self._identity_probe
        assert probe is not None
        probe.reset()
        try:
            assertion = identity.get_token(TOKEN_EXCHANGE_SCOPE).token
        except Exception as exc:
            cause = classify_identity_failure(exc, probe)
            raise AuthError(
                "The managed identity gave no token for api://AzureADTokenExchange, the client assertion of "
                f"DATAVERSE_CREDENTIAL=federated ({cause.code}): {cause.message}",
                code=cause.code,
                transient=cause.transient,
                status=cause.status,
            ) from exc
        self._local.assertion = assertion_claims(assertion)
        return assertion

    def _classify(self, exc: BaseException) -> AuthError:
        answer = self._probe.answer or _answer_from_exception(exc)
        s = self._settings
        if answer is not None:
            codes = set(answer.error_codes)
            aadsts = answer.error_codes[0] if answer.error_codes else None
            if codes & FEDERATION_MISMATCH_CODES:
                presented: dict[str, Any] = getattr(self._local, "assertion", None) or {}
                error = AuthError(
                    f"Entra ID found no federated credential on the app registration {s.client_id} that "
                    f"matches the managed identity's token (AADSTS{aadsts}): issuer "
                    f"{presented.get('issuer', '?')}, subject {presented.get('subject', '?')}, audience "
                    f"{presented.get('audience', '?')}.",
                    code="entra_federation_mismatch",
                    status=answer.status,
                    aadsts=aadsts,
                )
                error.details = [presented] if presented else []
                return error
            if codes & INVALID_ASSERTION_CODES:
                return AuthError(
                    f"Entra ID refused the client assertion of DATAVERSE_CREDENTIAL={s.credential} "
                    f"(AADSTS{aadsts}): expired or not yet valid (check the clock), malformed, or made for "
                    "another client id or token endpoint.",
                    code="entra_invalid_assertion",
                    status=answer.status,
                    aadsts=aadsts,
                )
            if codes & INVALID_CERTIFICATE_CODES:
                return AuthError(
                    "Entra ID rejected the certificate's signature or does not know its key "
                    f"(AADSTS{aadsts}).",
                    code="entra_invalid_certificate",
                    status=answer.status,
                    aadsts=aadsts,
                )
            if codes & INVALID_CLIENT_CODES or answer.error == "invalid_client":
                return AuthError(
                    f"Entra ID rejected the client secret (invalid_client, AADSTS{aadsts}).",
                    code="entra_invalid_client",
                    status=answer.status,
                    aadsts=aadsts,
                )
            if codes & UNAUTHORIZED_CLIENT_CODES or answer.error == "unauthorized_client":
                return AuthError(
                    f"Entra ID does not know the application {s.client_id} in tenant {s.tenant_id} "
                    f"(unauthorized_client, AADSTS{aadsts}): DATAVERSE_CLIENT_ID or DATAVERSE_TENANT_ID is "
                    "wrong, or the app registration was deleted.",
                    code="entra_unauthorized_client",
                    status=answer.status,
                    aadsts=aadsts,
                )
            if codes & INVALID_TENANT_CODES or answer.error == "invalid_tenant":
                return AuthError(
                    f"Entra ID does not know the tenant {s.tenant_id} (AADSTS{aadsts}): DATAVERSE_TENANT_ID "
                    "must be the directory (tenant) id of the app registration.",
                    code="entra_invalid_tenant",
                    status=answer.status,
                    aadsts=aadsts,
                )
            if codes & INVALID_SCOPE_CODES or answer.error in ("invalid_scope", "invalid_resource"):
                return AuthError(
                    f"Entra ID refused the scope {s.scope} (AADSTS{aadsts}): DATAVERSE_URL must be the "
                    "environment URL (https://<org>.crm.dynamics.com) of a Dataverse environment in that "
                    "tenant.",
                    code="entra_invalid_scope",
                    status=answer.status,
                    aadsts=aadsts,
                )
            if answer.status == 429 or answer.status >= 500:
                return AuthError(
                    f"Entra ID answered {answer.status}; no token for now.",
                    code="entra_unavailable",
                    transient=True,
                    status=answer.status,
                    aadsts=aadsts,
                )
            return AuthError(
                f"Entra ID refused the token request ({answer.status} {answer.error}, AADSTS{aadsts}).",
                code="entra_rejected",
                status=answer.status,
                aadsts=aadsts,
            )
        if is_network_failure(exc):
            return AuthError(
                f"Entra ID did not answer ({type(exc).__name__}); no token for now.",
                code="entra_unavailable",
                transient=True,
            )
        return AuthError(
            f"The token request failed ({type(exc).__name__}); no token for now.",
            code="entra_unavailable",
            transient=True,
        )

    def _rejected(self, cause: AuthError) -> AuthError:
        s = self._settings
        if s.credential != "certificate":
            return self._invalid_client(cause)
        return AuthError(
            f"Entra ID rejected the certificate in Key Vault '{s.certificate_name}' "
            f"({self._secrets.vault_url}) (AADSTS{cause.aadsts}): upload the certificate's public part to "
            f"the app registration {s.client_id} (Certificates & secrets), or store the registered "
            "certificate's PEM in Key Vault.",
            code="entra_invalid_certificate",
            status=cause.status,
            aadsts=cause.aadsts,
        )

    def _invalid_client(self, cause: AuthError) -> AuthError:
        name = self._settings.client_secret_name
        return AuthError(
            f"Entra ID rejected the client secret (AADSTS{cause.aadsts}): the client secret in Key Vault "
            f"secret '{name}' ({self._secrets.vault_url}) is wrong or expired. Create a new client secret "
            f"for the app registration {self._settings.client_id} and store its value (not its id) there.",
            code="entra_invalid_client",
            status=cause.status,
            aadsts=cause.aadsts,
        )


def read_material(secrets: SecretStore, settings: Settings, *, stale: str | None = None) -> str:
    """The client secret or the certificate from Key Vault (``stale``: re-read unless already replaced).

    A missing certificate is ``keyvault_certificate_not_found``: its fix is a certificate import, not
    the client secret's.
    """
    certificate = settings.credential == "certificate"
    name = settings.certificate_name if certificate else settings.client_secret_name
    try:
        return secrets.get(name) if stale is None else secrets.refresh(name, stale=stale)
    except AuthError as exc:
        if not certificate or exc.code != "keyvault_secret_not_found":
            raise
        raise AuthError(
            f"Key Vault {secrets.vault_url} has no certificate '{name}' (DATAVERSE_CERTIFICATE_NAME), or it "
            "is disabled.",
            code="keyvault_certificate_not_found",
            status=exc.status,
        ) from exc


def certificate_bytes(value: str) -> bytes:
    """The bytes CertificateCredential takes, from a Key Vault certificate's secret value (PEM or PFX).

    Raises ValueError when the value is neither PEM text nor base64.
    """
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text.encode()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("neither PEM text nor a base64-encoded PFX") from None


@dataclass(frozen=True)
class CertificateInfo:
    """What diagnostics shows about the certificate in Key Vault (public facts only)."""

    thumbprint: str  # SHA-1, upper-case hex: the portal's "Thumbprint" column
    subject: str
    not_after: float


def describe_certificate(value: str) -> CertificateInfo:
    """Thumbprint, subject and expiry of a Key Vault certificate's secret value; ValueError if unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    data = certificate_bytes(value)
    if data.startswith(b"-----BEGIN"):
        serialization.load_pem_private_key(data, password=None)
        certificate = x509.load_pem_x509_certificate(data)
    else:
        key, loaded, _ = pkcs12.load_key_and_certificates(data, None)
        if key is None or loaded is None:
            raise ValueError("the PFX holds no private key or no certificate")
        certificate = loaded
    return CertificateInfo(
        thumbprint=certificate.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 (an identifier)
        subject=certificate.subject.rfc4514_string(),
        not_after=certificate.not_valid_after_utc.timestamp(),
    )


def assertion_claims(assertion: str) -> dict[str, str]:
    """Issuer, subject and audience of a client assertion, for the fix text (never the token itself)."""
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    if not isinstance(claims, dict):
        return {}
    aud = claims.get("aud")
    audience = " ".join(a for a in aud if isinstance(a, str)) if isinstance(aud, list) else aud
    return {
        k: str(v)
        for k, v in (("issuer", claims.get("iss")), ("subject", claims.get("sub")), ("audience", audience))
        if isinstance(v, str)
    }
