"""SecretStore: the real Key Vault SDK over mocked HTTP, with a fake or a real managed identity."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import responses
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import CredentialUnavailableError

from shared.errors import AuthError
from shared.logs import redact
from shared.secrets import SecretStore, is_key_vault_host
from tests.concurrency import gate_single_flight, in_parallel

LOCAL_VAULT = "https://kv.local.test"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CHALLENGE = (
    f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://vault.azure.net"'
)
SECRET_URL = re.compile(r"https://[^/]+/secrets/(?P<name>[^/?]+)/?(?P<version>[^/?]*)\?.*")


class FakeCredential:
    """What the Key Vault SDK sees of a TokenCredential; counts and can fail."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls = 0
        self.error = error

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return AccessToken("mi-token", int(time.time()) + 3600)


class FakeVault:
    """Key Vault's secret GET: challenge first, then versions, with a read counter."""

    def __init__(self, mock: responses.RequestsMock, challenge: str = CHALLENGE) -> None:
        self.secrets: dict[str, str] = {}
        self.reads = 0
        self.status: int | None = None
        self.challenge = challenge
        self.before_answer: threading.Event | None = None
        self.reject_tokens = 0
        mock.add_callback("GET", SECRET_URL, callback=self._answer)

    def _answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if "Authorization" not in request.headers:
            return 401, {"WWW-Authenticate": self.challenge}, ""
        match = SECRET_URL.match(request.url or "")
        assert match
        name = match.group("name")
        self.reads += 1
        if self.reject_tokens > 0:
            self.reject_tokens -= 1
            return 401, {"WWW-Authenticate": self.challenge}, json.dumps({"error": {"code": "Unauthorized"}})
        if self.before_answer is not None:
            assert self.before_answer.wait(10)
        if self.status is not None:
            code = {403: "Forbidden", 404: "SecretNotFound"}.get(self.status, "ServiceUnavailable")
            return self.status, {}, json.dumps({"error": {"code": code, "message": "no"}})
        if name not in self.secrets:
            return 404, {}, json.dumps({"error": {"code": "SecretNotFound", "message": f"{name} not found"}})
        secret_id = f"{LOCAL_VAULT}/secrets/{name}/v{self.reads}"
        body = {"value": self.secrets[name], "id": secret_id, "attributes": {}}
        return 200, {"Content-Type": "application/json"}, json.dumps(body)


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeVault(mock)


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """azure-core's retry back-off sleeps through time.sleep; the count of attempts is what matters."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def test_reads_once_and_caches(vault: FakeVault) -> None:
    vault.secrets["dataverse-client-secret"] = "s3cret-value-1"
    cred = FakeCredential()
    store = SecretStore(LOCAL_VAULT, cred)
    assert store.get("dataverse-client-secret") == "s3cret-value-1"
    assert store.get("dataverse-client-secret") == "s3cret-value-1"
    assert vault.reads == 1
    assert cred.calls == 1


def test_32_cold_threads_cause_one_read(vault: FakeVault) -> None:
    vault.secrets["dataverse-client-secret"] = "s3cret-value-1"
    store = SecretStore(LOCAL_VAULT, FakeCredential())
    vault.before_answer = gate_single_flight(store, 32)
    results = in_parallel(32, lambda: store.get("dataverse-client-secret"))
    assert results == ["s3cret-value-1"] * 32
    assert vault.reads == 1


def test_refresh_under_concurrency_rereads_once(vault: FakeVault) -> None:
    vault.secrets["s"] = "old-secret-value"
    store = SecretStore(LOCAL_VAULT, FakeCredential())
    assert store.get("s") == "old-secret-value"
    vault.secrets["s"] = "new-secret-value"
    vault.before_answer = gate_single_flight(store, 16)
    results = in_parallel(16, lambda: store.refresh("s", stale="old-secret-value"))
    assert results == ["new-secret-value"] * 16
    assert vault.reads == 2
    # a late caller still holding the stale value gets the new one without another read
    assert store.refresh("s", stale="old-secret-value") == "new-secret-value"
    assert store.get("s") == "new-secret-value"
    assert vault.reads == 2


def test_a_caller_that_missed_the_cache_while_the_leader_finished_does_not_read_again(
    vault: FakeVault,
) -> None:
    """The cache was empty when this caller looked, and the leader stored the value before it
    entered the single flight: it must take that value, not read Key Vault a second time."""
    vault.secrets["s"] = "s3cret-value-1"
    store = SecretStore(LOCAL_VAULT, FakeCredential())
    assert store.get("s") == "s3cret-value-1"

    class EmptyAtFirstLook(dict):  # type: ignore[type-arg]
        looked = False

        def get(self, key: Any, default: Any = None) -> Any:
            if not self.looked:
                self.looked = True
                return default
            return super().get(key, default)

    store._values = EmptyAtFirstLook(store._values)
    assert store.get("s") == "s3cret-value-1"
    assert store._values.looked and vault.reads == 1


def test_refresh_if_due_rereads_at_most_once_per_interval(
    vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("shared.secrets.time.monotonic", lambda: clock[0])
    vault.secrets["w"] = "key-1"
    store = SecretStore(LOCAL_VAULT, FakeCredential())
    store.get("w")
    vault.secrets["w"] = "key-2"
    assert store.refresh_if_due("w", "key-1", min_interval=60) == "key-2"
    vault.secrets["w"] = "key-3"
    clock[0] += 59
    assert store.refresh_if_due("w", "key-2", min_interval=60) is None  # bad signatures are not KV traffic
    assert vault.reads == 2
    clock[0] += 2
    assert store.refresh_if_due("w", "key-2", min_interval=60) == "key-3"
    assert vault.reads == 3


def test_every_secret_read_is_registered_for_redaction(vault: FakeVault) -> None:
    vault.secrets["w"] = "webhook-key-9f8e7d6c"
    SecretStore(LOCAL_VAULT, FakeCredential()).get("w")
    assert "webhook-key-9f8e7d6c" not in redact("key=webhook-key-9f8e7d6c")


def test_missing_secret_names_secret_and_vault(vault: FakeVault) -> None:
    with pytest.raises(AuthError) as info:
        SecretStore(LOCAL_VAULT, FakeCredential()).get("dataverse-client-secret")
    err = info.value
    assert (err.code, err.transient, err.status) == ("keyvault_secret_not_found", False, 404)
    assert "dataverse-client-secret" in err.message and LOCAL_VAULT in err.message


def test_forbidden_says_which_role_is_missing(vault: FakeVault) -> None:
    vault.status = 403
    with pytest.raises(AuthError) as info:
        SecretStore(LOCAL_VAULT, FakeCredential()).get("s")
    assert (info.value.code, info.value.transient) == ("keyvault_forbidden", False)
    assert "Key Vault Secrets User" in info.value.message


def test_a_refused_token_is_replaced_once(vault: FakeVault) -> None:
    """A credential whose cache holds a revoked token gives the same one back to the SDK, so the
    store starts over once with a new client and credential; a vault that keeps refusing is
    reported as keyvault_forbidden after a bounded number of tries."""
    vault.secrets["s"] = "value-1"
    store = SecretStore(LOCAL_VAULT, FakeCredential())
    vault.reject_tokens = 1
    assert store.get("s") == "value-1"
    assert vault.reads == 2
    vault.reject_tokens = 99
    with pytest.raises(AuthError) as info:
        store.refresh("s")
    assert (info.value.code, info.value.status, info.value.transient) == ("keyvault_forbidden", 401, False)
    assert vault.reads - 2 <= 4


def test_vault_5xx_is_transient_after_bounded_retries(vault: FakeVault, no_sleep: None) -> None:
    vault.status = 503
    with pytest.raises(AuthError) as info:
        SecretStore(LOCAL_VAULT, FakeCredential()).get("s")
    assert (info.value.code, info.value.transient) == ("keyvault_unavailable", True)
    assert vault.reads == 3  # the first try and two retries, then it gives up


def test_vault_unreachable_is_transient(no_sleep: None) -> None:
    with responses.RequestsMock() as mock:
        mock.add("GET", SECRET_URL, body=requests.exceptions.ConnectionError("refused"))
        with pytest.raises(AuthError) as info:
            SecretStore(LOCAL_VAULT, FakeCredential()).get("s")
        assert len(mock.calls) == 3
    assert (info.value.code, info.value.transient) == ("keyvault_unavailable", True)


@pytest.mark.parametrize(
    ("error", "code", "transient"),
    [
        (CredentialUnavailableError("no identity here"), "managed_identity_not_configured", False),
        (
            ClientAuthenticationError("wrapped", error=ServiceRequestError("connection refused")),
            "managed_identity_unavailable",
            True,
        ),
    ],
)
def test_identity_failures_are_classified(
    vault: FakeVault, error: BaseException, code: str, transient: bool
) -> None:
    if isinstance(error, ClientAuthenticationError) and not isinstance(error, CredentialUnavailableError):
        error.__cause__ = ServiceRequestError("connection refused")
    with pytest.raises(AuthError) as info:
        SecretStore(LOCAL_VAULT, FakeCredential(error)).get("s")
    assert (info.value.code, info.value.transient) == (code, transient)
    assert vault.reads == 0


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [(500, "managed_identity_unavailable", True), (400, "managed_identity_not_configured", False)],
)
def test_real_managed_identity_endpoint_failures(
    monkeypatch: pytest.MonkeyPatch, no_sleep: None, status: int, code: str, transient: bool
) -> None:
    """DefaultAzureCredential against a mocked App Service identity endpoint (the Functions protocol)."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:41999/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "identity-header-secret-1")
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        FakeVault(mock)
        msi_url = re.compile(r"http://127\.0\.0\.1:41999/msi/token.*")
        mock.add("GET", msi_url, status=status, json={"error": "x"})
        with pytest.raises(AuthError) as info:
            SecretStore(LOCAL_VAULT).get("s")
        msi_calls = [c for c in mock.calls if "/msi/token" in (c.request.url or "")]
    assert (info.value.code, info.value.transient) == (code, transient)
    assert msi_calls and msi_calls[0].request.headers["X-IDENTITY-HEADER"] == "identity-header-secret-1"
    assert len(msi_calls) <= 3  # bounded retries on the identity endpoint too
    assert "identity-header-secret-1" not in redact("X-IDENTITY-HEADER: identity-header-secret-1 sent")


def test_real_managed_identity_token_reaches_the_vault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:41999/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "identity-header-secret-2")
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        vault = FakeVault(mock)
        vault.secrets["s"] = "value-from-vault"
        expires = str(int(time.time()) + 3600)
        mock.add(
            "GET",
            re.compile(r"http://127\.0\.0\.1:41999/msi/token.*"),
            json={
                "access_token": "mi-access-token",
                "expires_on": expires,
                "resource": "https://vault.azure.net",
                "token_type": "Bearer",
            },
        )
        assert SecretStore(LOCAL_VAULT).get("s") == "value-from-vault"
        authorized = [c for c in mock.calls if c.request.headers.get("Authorization")]
        msi = [c.request.url or "" for c in mock.calls if "/msi/token" in (c.request.url or "")]
    assert authorized[-1].request.headers["Authorization"] == "Bearer mi-access-token"
    assert len(msi) == 1 and "resource=https://vault.azure.net" in unquote(msi[0])


def test_challenge_resource_is_verified_only_for_real_vault_domains() -> None:
    assert is_key_vault_host("https://contoso.vault.azure.net")
    assert is_key_vault_host("https://contoso.vault.usgovcloudapi.net/")
    assert not is_key_vault_host("https://127.0.0.1:8443")
    assert not is_key_vault_host("https://vault.azure.net.evil.example")
    foreign = (
        f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://evil.example"'
    )
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        vault = FakeVault(mock, challenge=foreign)
        vault.secrets["s"] = "value"
        # the local emulator's host: the SDK accepts whatever resource the challenge names
        assert SecretStore(LOCAL_VAULT, FakeCredential()).get("s") == "value"
        # a real vault: a challenge for another resource is refused and no token is sent
        cred = FakeCredential()
        with pytest.raises(Exception, match=r"(?i)resource"):
            SecretStore("https://contoso.vault.azure.net", cred).get("s")
        assert cred.calls == 0


def test_client_has_bounded_timeouts(vault: FakeVault) -> None:
    store = SecretStore(LOCAL_VAULT, FakeCredential(), timeout=7)
    transport = store._secret_client()._client._client._pipeline._transport  # type: ignore[attr-defined]
    assert transport.connection_config.timeout == 7
    assert transport.connection_config.read_timeout == 7
