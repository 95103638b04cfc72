"""Key Vault secrets read with the managed identity, cached per warm instance.

The client secret of the app registration and the webhook signing key live in Key Vault; the
Function App reads them with its managed identity (``DefaultAzureCredential``: the App Service
identity endpoint in Azure and on the local stack, ``AZURE_CLIENT_ID`` selecting a user-assigned
identity, ``az login`` on a developer's machine).  A warm instance reads each secret once; a
rotated secret is picked up by :meth:`SecretStore.refresh`, which the token provider calls when
Entra ID rejects the old one, so rotation needs no restart.

``verify_challenge_resource``: the Key Vault SDK checks that the resource in the vault's 401
challenge belongs to the vault's own domain.  That check is kept for real vaults
(``*.vault.azure.net`` and the sovereign clouds' domains) and turned off for any other host,
which can only be a local emulator (``https://127.0.0.1:<port>``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shared.errors import AuthError
from shared.logs import register_secret
from shared.singleflight import SingleFlight

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken, AccessTokenInfo, TokenCredential
    from azure.core.pipeline import PipelineRequest, PipelineResponse
    from azure.keyvault.secrets import SecretClient

logger = logging.getLogger("shared.secrets")

KEY_VAULT_DOMAINS = (
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".vault.microsoftazure.de",
)
_IMDS_HOST = "169.254.169.254"
_IDENTITY_RETRIES = 2
_VAULT_RETRIES = 2


def is_key_vault_host(vault_url: str) -> bool:
    host = (urlsplit(vault_url).hostname or "").lower()
    return any(host.endswith(domain) for domain in KEY_VAULT_DOMAINS)


class _IdentityProbe:
    """Remembers, per thread, what the identity endpoint answered, through azure-core's hooks.

    ``DefaultAzureCredential`` reduces a failure to a message text; the status of the last
    answer (or the absence of one) is what tells a transient outage from a misconfiguration.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def reset(self) -> None:
        self._local.sent = False
        self._local.status = None

    def on_request(self, request: PipelineRequest[Any]) -> None:
        if urlsplit(request.http_request.url).hostname != _IMDS_HOST:  # DefaultAzureCredential's probe
            self._local.sent = True
            self._local.status = None

    def on_response(self, response: PipelineResponse[Any, Any]) -> None:
        if urlsplit(response.http_request.url).hostname != _IMDS_HOST:
            self._local.status = response.http_response.status_code

    @property
    def sent(self) -> bool:
        return bool(getattr(self._local, "sent", False))

    @property
    def status(self) -> int | None:
        status: int | None = getattr(self._local, "status", None)
        return status


def is_network_failure(exc: BaseException) -> bool:
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ServiceRequestError | ServiceResponseError | TimeoutError | ConnectionError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def classify_identity_failure(exc: BaseException, probe: _IdentityProbe | None = None) -> AuthError:
    """The managed identity could not produce a token: transient outage or misconfiguration."""
    from azure.identity import CredentialUnavailableError

    status = probe.status if probe is not None else None
    if status is None:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
    kind = type(exc).__name__
    if status is not None and (status == 429 or status >= 500):
        return AuthError(
            f"The managed identity endpoint answered {status}; Key Vault cannot be reached for now ({kind}).",
            code="managed_identity_unavailable",
            transient=True,
            status=status,
        )
    if status is not None:
        return AuthError(
            f"The managed identity endpoint refused to issue a token ({status}): the Function App has no "
            "identity with that client id. Set AZURE_CLIENT_ID to the client id of a user-assigned identity "
            "attached to the app, or leave it empty to use the system-assigned identity.",
            code="managed_identity_not_configured",
            status=status,
        )
    if (probe is not None and probe.sent) or is_network_failure(exc):
        return AuthError(
            f"The managed identity endpoint did not answer ({kind}); Key Vault cannot be reached for now.",
            code="managed_identity_unavailable",
            transient=True,
        )
    if isinstance(exc, CredentialUnavailableError) or probe is not None:
        return AuthError(
            "No managed identity is available to read Key Vault: in Azure, enable the Function App's "
            "identity (AZURE_CLIENT_ID = the client id of a user-assigned one); on a workstation, run "
            "`az login` with an account that has 'Key Vault Secrets User' on the vault.",
            code="managed_identity_not_configured",
        )
    return AuthError(
        f"The managed identity failed to issue a token ({kind}).",
        code="managed_identity_unavailable",
        transient=True,
    )


class _IdentityCredential:
    """Wraps the Key Vault credential so its failures surface as classified :class:`AuthError`.

    The Key Vault pipeline lets a non-azure-core exception raised by the credential through
    unchanged, so a missing identity is not mistaken for a vault that refused or failed.
    """

    def __init__(self, inner: Any, probe: _IdentityProbe | None) -> None:
        self._inner = inner
        self._probe = probe

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        token: AccessToken = self._classified(lambda: self._inner.get_token(*scopes, **kwargs))
        return token

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        from azure.core.credentials import AccessTokenInfo

        if not hasattr(self._inner, "get_token_info"):
            kwargs = dict(options or {})
            kwargs.pop("pop", None)
            token = self.get_token(*scopes, **kwargs)
            return AccessTokenInfo(token.token, token.expires_on)
        info: AccessTokenInfo = self._classified(lambda: self._inner.get_token_info(*scopes, options=options))
        return info

    def _classified(self, fetch: Callable[[], Any]) -> Any:
        if self._probe is not None:
            self._probe.reset()
        try:
            return fetch()
        except AuthError:
            raise
        except Exception as exc:
            raise classify_identity_failure(exc, self._probe) from exc

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class SecretStore:
    """Key Vault secrets, each read once per instance (single flight) and re-read on demand."""

    def __init__(
        self, vault_url: str, credential: TokenCredential | None = None, *, timeout: float = 10
    ) -> None:
        self._vault_url = vault_url.rstrip("/")
        self._credential = credential
        self._timeout = timeout
        self._client: SecretClient | None = None
        self._client_lock = threading.Lock()
        self._values: dict[str, str] = {}
        self._flight: SingleFlight[str] = SingleFlight()
        self._last_refresh: dict[str, float] = {}
        self._refresh_lock = threading.Lock()
        self.reads = 0
        register_secret(os.environ.get("IDENTITY_HEADER"))

    @property
    def vault_url(self) -> str:
        return self._vault_url

    def get(self, name: str) -> str:
        value = self._values.get(name)
        if value is not None:
            return value

        def read_once() -> str:
            cached = self._values.get(name)
            return cached if cached is not None else self._read(name)

        return self._flight.do(("get", name), read_once)

    def refresh(self, name: str, stale: str | None = None) -> str:
        """Re-read ``name`` unless another caller already replaced ``stale`` with a newer value."""

        def reread() -> str:
            cached = self._values.get(name)
            if stale is not None and cached is not None and cached != stale:
                return cached
            return self._read(name)

        return self._flight.do(("refresh", name), reread)

    def refresh_if_due(self, name: str, stale: str, *, min_interval: float = 60.0) -> str | None:
        """``refresh`` at most once per ``min_interval`` seconds, else None.

        For re-reads that an unauthenticated caller can provoke (a webhook with a bad signature may
        mean the key was rotated, or may be anybody): they must not turn into Key Vault traffic.
        """
        with self._refresh_lock:
            now = time.monotonic()
            last = self._last_refresh.get(name)
            if last is not None and now - last < min_interval:
                return None
            self._last_refresh[name] = now
        return self.refresh(name, stale)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _secret_client(self) -> SecretClient:
        with self._client_lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _build_client(self) -> SecretClient:
        from azure.keyvault.secrets import SecretClient

        bounds: dict[str, Any] = {
            "connection_timeout": self._timeout,
            "read_timeout": self._timeout,
            "retry_backoff_factor": 0.5,
            "retry_backoff_max": 4,
        }
        probe: _IdentityProbe | None = None
        inner = self._credential
        if inner is None:
            from azure.identity import DefaultAzureCredential

            probe = _IdentityProbe()
            inner = DefaultAzureCredential(
                retry_total=_IDENTITY_RETRIES,
                raw_request_hook=probe.on_request,
                raw_response_hook=probe.on_response,
                **bounds,
            )
        return SecretClient(
            self._vault_url,
            _IdentityCredential(inner, probe),
            verify_challenge_resource=is_key_vault_host(self._vault_url),
            retry_total=_VAULT_RETRIES,
            retry_connect=_VAULT_RETRIES,
            retry_read=_VAULT_RETRIES,
            retry_status=_VAULT_RETRIES,
            timeout=self._timeout * (_VAULT_RETRIES + 2),
            **bounds,
        )

    def _read(self, name: str) -> str:
        from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError

        where = f"secret '{name}' in {self._vault_url}"
        self.reads += 1
        try:
            try:
                secret = self._secret_client().get_secret(name)
            except HttpResponseError as exc:
                if exc.status_code != 401:
                    raise
                # The vault refused a token the SDK had cached (revoked, or issued before a change
                # of identity): start over once with a new credential, as after a Dataverse 401.
                logger.info("Key Vault answered 401 to a cached token; retrying once with a new one")
                with self._client_lock:
                    self._client = None  # not closed: another read may still be using it
                secret = self._secret_client().get_secret(name)
        except AuthError:
            raise
        except ResourceNotFoundError as exc:
            raise AuthError(
                f"Key Vault has no {where}: create it (az keyvault secret set --vault-name <vault> "
                f"--name {name} --value <client secret>) or fix the secret name setting.",
                code="keyvault_secret_not_found",
                status=404,
            ) from exc
        except HttpResponseError as exc:
            raise self._http_failure(exc, where) from exc
        except AzureError as exc:
            raise AuthError(
                f"Key Vault did not answer for {where} ({type(exc).__name__}).",
                code="keyvault_unavailable",
                transient=True,
            ) from exc
        value = secret.value
        if not value:
            raise AuthError(
                f"Key Vault {where} is empty or disabled.",
                code="keyvault_secret_not_found",
            )
        register_secret(value)
        self._values[name] = value
        logger.info("read %s (version %s)", where, secret.properties.version)
        return value

    @staticmethod
    def _http_failure(exc: Any, where: str) -> AuthError:
        status: int | None = exc.status_code
        if status == 401:
            return AuthError(
                f"Key Vault refused the managed identity's token twice for {where} (401): is the vault "
                "in the same tenant as the Function App's identity?",
                code="keyvault_forbidden",
                status=status,
            )
        if status == 403:
            return AuthError(
                f"Key Vault refused to read {where} ({status}): the managed identity lacks the "
                "'Key Vault Secrets User' role on the vault (or, with access policies, 'get' on secrets).",
                code="keyvault_forbidden",
                status=status,
            )
        if status is None or status == 429 or status >= 500:
            return AuthError(
                f"Key Vault failed to read {where} ({status}); try again later.",
                code="keyvault_unavailable",
                transient=True,
                status=status,
            )
        return AuthError(
            f"Key Vault refused to read {where} ({status}): check the secret name.",
            code="keyvault_secret_not_found",
            status=status,
        )
