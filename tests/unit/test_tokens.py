"""TokenProvider with the real azure-identity ClientSecretCredential against a mocked Entra ID."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import responses

from shared.errors import AuthError
from shared.settings import Settings
from shared.tokens import TokenProvider
from tests.concurrency import gate_single_flight, in_parallel

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "66666666-7777-8888-9999-000000000000"
AUTHORITY = "https://login.local.test"
TOKEN_URL = f"{AUTHORITY}/{TENANT}/oauth2/v2.0/token"
DISCOVERY_URL = f"{AUTHORITY}/{TENANT}/v2.0/.well-known/openid-configuration"
SETTINGS = Settings(
    dataverse_url="https://org.crm.dynamics.com",
    tenant_id=TENANT,
    client_id=CLIENT,
    key_vault_url="https://kv.local.test",
    authority_host=AUTHORITY,
)


def entra_error(error: str, code: int, description: str | None = None) -> dict[str, Any]:
    return {
        "error": error,
        "error_description": description or f"AADSTS{code}: something went wrong.",
        "error_codes": [code],
        "timestamp": "2026-01-01 00:00:00Z",
        "trace_id": "0000",
        "correlation_id": "1111",
    }


class FakeEntra:
    """OIDC discovery + the v2 token endpoint; accepts the secrets in ``accepted``."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.accepted = {"current-secret"}
        self.lifetime = 3599
        self.token_posts: list[str] = []
        self.failure: tuple[int, Any] | None = None
        self.discovery_failure: tuple[int, Any] | None = None
        self.before_answer: threading.Event | None = None
        self._issued = 0
        self._lock = threading.Lock()
        mock.add_callback("GET", DISCOVERY_URL, callback=self._discovery)
        mock.add_callback("POST", TOKEN_URL, callback=self._token)

    def _discovery(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if self.discovery_failure is not None:
            status, body = self.discovery_failure
            return status, {}, json.dumps(body)
        doc = {
            "token_endpoint": TOKEN_URL,
            "authorization_endpoint": f"{AUTHORITY}/{TENANT}/oauth2/v2.0/authorize",
            "issuer": f"{AUTHORITY}/{TENANT}/v2.0",
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(doc)

    def _token(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        form = parse_qs(str(request.body))
        secret = form["client_secret"][0]
        with self._lock:
            self.token_posts.append(secret)
        if self.before_answer is not None:
            assert self.before_answer.wait(10)
        if self.failure is not None:
            status, body = self.failure
            return status, {}, body if isinstance(body, str) else json.dumps(body)
        if secret not in self.accepted:
            return 401, {}, json.dumps(entra_error("invalid_client", 7000215))
        with self._lock:
            self._issued += 1
            token = f"access-token-{self._issued}"
        body = {
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "ext_expires_in": self.lifetime,
            "access_token": token,
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body)


class FakeSecrets:
    """The SecretStore surface the token provider uses; ``vault`` is what Key Vault holds now."""

    vault_url = "https://kv.local.test"

    def __init__(self, value: str = "current-secret") -> None:
        self.vault = value
        self.cached: str | None = None
        self.gets = 0
        self.reads = 0
        self.refreshes = 0

    def get(self, name: str) -> str:
        assert name == SETTINGS.client_secret_name
        self.gets += 1
        if self.cached is None:
            self.reads += 1
            self.cached = self.vault
        return self.cached

    def refresh(self, name: str, stale: str | None = None) -> str:
        self.refreshes += 1
        self.reads += 1
        self.cached = self.vault
        return self.cached


@pytest.fixture
def entra() -> Iterator[FakeEntra]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeEntra(mock)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Moves time.time for everybody (MSAL's cache, azure-identity, the provider)."""
    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def advance(seconds: float) -> None:
        offset[0] += seconds

    return advance


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def provider(secrets: FakeSecrets | None = None) -> TokenProvider:
    return TokenProvider(SETTINGS, secrets or FakeSecrets(), clock=lambda: time.time())  # type: ignore[arg-type]


def test_token_is_reused_until_five_minutes_before_expiry(
    entra: FakeEntra, clock: Callable[[float], None]
) -> None:
    tokens = provider()
    first = tokens.get_token()
    assert tokens.get_token() == first
    clock(3599 - 305)
    assert tokens.get_token() == first
    assert len(entra.token_posts) == 1
    clock(10)  # now 295 s before expiry
    second = tokens.get_token()
    assert second != first
    assert len(entra.token_posts) == 2


def test_32_cold_callers_cause_one_token_request_and_one_secret_read(entra: FakeEntra) -> None:
    secrets = FakeSecrets()
    tokens = provider(secrets)
    entra.before_answer = gate_single_flight(tokens, 32)
    assert in_parallel(32, tokens.get_token) == ["access-token-1"] * 32
    assert len(entra.token_posts) == 1
    assert secrets.reads == 1


def test_a_caller_that_missed_the_token_while_the_leader_finished_does_not_request_again(
    entra: FakeEntra, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token was missing when this caller looked, and the leader stored one before it entered
    the single flight: it must take that token, not send a second request."""
    tokens = provider()
    first = tokens.get_token()
    real = tokens._fresh
    looks = 0

    def fresh(token: Any) -> bool:
        nonlocal looks
        looks += 1
        return looks > 1 and real(token)  # the first look, before the flight, finds nothing usable

    monkeypatch.setattr(tokens, "_fresh", fresh)
    assert tokens.get_token() == first
    assert looks == 2 and len(entra.token_posts) == 1


def test_invalidate_after_a_dataverse_401_forces_one_new_token(entra: FakeEntra) -> None:
    tokens = provider()
    old = tokens.get_token()
    tokens.invalidate(old)
    new = tokens.get_token()
    assert new != old  # azure-identity's own cache would have handed `old` back
    assert len(entra.token_posts) == 2
    tokens.invalidate(old)  # a second caller that saw the same 401: nothing more to do
    assert tokens.get_token() == new
    assert len(entra.token_posts) == 2


def test_rotated_secret_is_reread_once_and_used_without_restart(entra: FakeEntra) -> None:
    secrets = FakeSecrets("old-secret")
    entra.accepted = {"old-secret"}
    tokens = provider(secrets)
    first = tokens.get_token()
    # the secret is rotated: Entra only accepts the new one, Key Vault holds it
    entra.accepted = {"new-secret"}
    secrets.vault = "new-secret"
    tokens.invalidate(first)
    assert tokens.get_token() not in (first, None)
    assert secrets.refreshes == 1
    assert entra.token_posts == ["old-secret", "old-secret", "new-secret"]


def test_a_wrong_secret_in_key_vault_is_a_permanent_error_naming_the_secret(entra: FakeEntra) -> None:
    secrets = FakeSecrets("wrong-secret")
    tokens = provider(secrets)
    secrets.get(SETTINGS.client_secret_name)  # the instance holds the old value...
    secrets.vault = "still-wrong-secret"  # ...and Key Vault has a new one, wrong as well
    with pytest.raises(AuthError) as info:
        tokens.get_token()
    err = info.value
    assert (err.code, err.transient, err.aadsts) == ("entra_invalid_client", False, 7000215)
    assert "dataverse-client-secret" in err.message and "wrong or expired" in err.message
    assert secrets.refreshes == 1
    assert entra.token_posts == ["wrong-secret", "still-wrong-secret"]  # one retry, no more


def test_unchanged_secret_is_not_retried(entra: FakeEntra) -> None:
    secrets = FakeSecrets("wrong-secret")
    with pytest.raises(AuthError) as info:
        provider(secrets).get_token()
    assert info.value.code == "entra_invalid_client"
    assert secrets.refreshes == 1
    assert entra.token_posts == ["wrong-secret"]


def test_expired_secret_7000222_is_invalid_client(entra: FakeEntra) -> None:
    entra.failure = (401, entra_error("invalid_client", 7000222))
    with pytest.raises(AuthError) as info:
        provider().get_token()
    assert (info.value.code, info.value.aadsts) == ("entra_invalid_client", 7000222)


@pytest.mark.parametrize(
    ("failure", "code", "transient"),
    [
        ((400, entra_error("unauthorized_client", 700016)), "entra_unauthorized_client", False),
        ((400, entra_error("invalid_scope", 70011)), "entra_invalid_scope", False),
        ((400, entra_error("invalid_request", 90014)), "entra_rejected", False),
        ((503, entra_error("temporarily_unavailable", 0)), "entra_unavailable", True),
        ((500, "<html>oops</html>"), "entra_unavailable", True),
    ],
)
def test_entra_errors_are_classified(
    entra: FakeEntra, no_sleep: None, failure: tuple[int, Any], code: str, transient: bool
) -> None:
    entra.failure = failure
    with pytest.raises(AuthError) as info:
        provider().get_token()
    assert (info.value.code, info.value.transient) == (code, transient)
    if transient:
        assert len(entra.token_posts) == 3  # azure-core's bounded retries: 1 + 2


def test_classification_uses_error_codes_not_the_description(entra: FakeEntra) -> None:
    entra.failure = (400, entra_error("unauthorized_client", 700016, "AADSTS7000215: Invalid client secret."))
    with pytest.raises(AuthError) as info:
        provider().get_token()
    assert info.value.code == "entra_unauthorized_client"
    assert CLIENT in info.value.message and TENANT in info.value.message


def test_unknown_tenant_is_found_at_discovery(entra: FakeEntra) -> None:
    entra.discovery_failure = (400, entra_error("invalid_tenant", 90002))
    with pytest.raises(AuthError) as info:
        provider().get_token()
    assert (info.value.code, info.value.transient) == ("entra_invalid_tenant", False)
    assert entra.token_posts == []


def test_unreachable_entra_is_transient(no_sleep: None) -> None:
    with responses.RequestsMock() as mock:
        mock.add("GET", DISCOVERY_URL, body=requests.exceptions.ConnectionError("refused"))
        with pytest.raises(AuthError) as info:
            provider().get_token()
        assert len(mock.calls) == 3
    assert (info.value.code, info.value.transient) == ("entra_unavailable", True)


def test_failures_are_shared_by_concurrent_callers_not_repeated(entra: FakeEntra) -> None:
    """Single flight also covers failure: 8 callers waiting on a rejected request get its error."""
    entra.failure = (400, entra_error("unauthorized_client", 700016))
    tokens = provider()
    entra.before_answer = gate_single_flight(tokens, 8)
    outcomes = in_parallel(8, tokens.get_token)
    assert [getattr(o, "code", o) for o in outcomes] == ["entra_unauthorized_client"] * 8
    assert len(entra.token_posts) == 1


def test_credential_is_built_with_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Recorder:
        def __init__(self, tenant: str, client: str, secret: str, **kwargs: Any) -> None:
            seen.update(kwargs, tenant=tenant, client=client, secret=secret)

        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            from azure.core.credentials import AccessToken

            seen["scopes"] = scopes
            return AccessToken("t", int(time.time()) + 3600)

    import azure.identity

    monkeypatch.setattr(azure.identity, "ClientSecretCredential", Recorder)
    provider().get_token()
    assert (seen["tenant"], seen["client"], seen["secret"]) == (TENANT, CLIENT, "current-secret")
    assert seen["scopes"] == ("https://org.crm.dynamics.com/.default",)
    assert seen["authority"] == AUTHORITY
    assert seen["disable_instance_discovery"] is True
    assert seen["connection_timeout"] <= 10 and seen["read_timeout"] <= 10
    assert seen["retry_total"] <= 3
    public = Settings(
        dataverse_url="https://o.crm.dynamics.com",
        tenant_id=TENANT,
        client_id=CLIENT,
        key_vault_url="https://kv.vault.azure.net",
    )
    TokenProvider(public, FakeSecrets()).get_token()  # type: ignore[arg-type]
    assert seen["authority"] is None and seen["disable_instance_discovery"] is False


# -- DATAVERSE_CREDENTIAL (issue 10) --------------------------------------------------------------

_ENV = {
    "DATAVERSE_URL": "https://org.crm.dynamics.com",
    "DATAVERSE_TENANT_ID": TENANT,
    "DATAVERSE_CLIENT_ID": CLIENT,
    "KEY_VAULT_URL": "https://kv.local.test",
}


def test_credential_mode_defaults_to_secret_and_accepts_the_other_modes() -> None:
    assert Settings.from_env(_ENV).credential == "secret"
    assert Settings.from_env({**_ENV, "DATAVERSE_CREDENTIAL": "Federated"}).credential == "federated"
    cert = Settings.from_env({**_ENV, "DATAVERSE_CREDENTIAL": "certificate"})
    assert (cert.credential, cert.certificate_name) == ("certificate", "dataverse-certificate")


def test_unknown_credential_mode_is_named() -> None:
    from shared.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({**_ENV, "DATAVERSE_CREDENTIAL": "password"})
    assert info.value.setting == "DATAVERSE_CREDENTIAL"
    assert info.value.code == "setting_invalid"
