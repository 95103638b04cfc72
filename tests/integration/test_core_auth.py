"""Secret, token and their failures: the real azure-identity and Key Vault SDK against the local stack."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from devstack.control import SandboxClient
from shared.errors import AuthError
from shared.runtime import Runtime, get_runtime
from shared.settings import Settings
from tests.concurrency import in_parallel

pytestmark = pytest.mark.integration


def runtime_with(**overrides: str) -> Runtime:
    """A fresh runtime on the sandbox's settings (already in os.environ), with some overridden."""
    return Runtime.from_settings(Settings.from_env({**os.environ, **overrides}))


def rotate(sbx: SandboxClient, *, keep_old: bool = False) -> str:
    """A new client secret: Entra accepts it (only it, unless keep_old) and Key Vault holds it."""
    secret = f"rotated-{uuid.uuid4().hex}"
    sbx.set_client_secret(secret, keep_old=keep_old)
    sbx.set_secret(sbx.env["DATAVERSE_CLIENT_SECRET_NAME"], secret)
    return secret


def test_32_cold_threads_cause_one_identity_one_secret_and_one_token_request(
    sandbox_env: SandboxClient,
) -> None:
    sandbox_env.set_latency("entra", 0.2)  # keep the first request in flight while the others arrive
    sandbox_env.set_latency("keyvault", 0.2)
    runtime = get_runtime()
    tokens = in_parallel(32, runtime.tokens.get_token, timeout=60)
    assert len(set(tokens)) == 1 and isinstance(tokens[0], str)
    counters = sandbox_env.counters()
    assert counters["identity"]["GET msi"] == 1
    assert counters["keyvault"]["GET secret"] == 1
    assert counters["entra"]["POST token"] == 1
    assert runtime.dataverse.whoami()["UserId"]
    assert sandbox_env.counters()["entra"]["POST token"] == 1


def test_token_is_reused_until_near_expiry(sandbox_env: SandboxClient) -> None:
    """A 4-second token is kept for half its life (a real one: until 5 minutes before expiry)."""
    sandbox_env.set_token_lifetime(4)
    runtime = get_runtime()
    first = runtime.tokens.get_token()
    assert runtime.tokens.get_token() == first
    assert sandbox_env.counters()["entra"]["POST token"] == 1
    time.sleep(2.2)  # the token's own clock, not synchronisation: it must age past its margin
    second = runtime.tokens.get_token()
    assert second != first
    assert sandbox_env.counters()["entra"]["POST token"] == 2


def test_dataverse_401_forces_one_refresh_and_one_retry(sandbox_env: SandboxClient) -> None:
    runtime = get_runtime()
    runtime.dataverse.whoami()
    sandbox_env.revoke_tokens()
    sandbox_env.reset_counters()
    assert runtime.dataverse.whoami()["UserId"]
    counters = sandbox_env.counters()
    assert counters["entra"]["POST token"] == 1
    assert counters["dataverse"]["GET WhoAmI"] == 2
    assert counters["dataverse"]["status:401"] == 1


def test_secret_rotation_needs_no_restart(sandbox_env: SandboxClient) -> None:
    runtime = get_runtime()
    runtime.dataverse.whoami()
    rotate(sandbox_env)  # Entra now rejects the secret this instance holds
    sandbox_env.revoke_tokens()  # ...and the cached token dies, so a new one is needed
    sandbox_env.reset_counters()
    assert runtime.dataverse.whoami()["UserId"]
    counters = sandbox_env.counters()
    assert counters["keyvault"]["GET secret"] == 1  # one re-read
    assert counters["entra"]["POST token"] == 2  # rejected with the old secret, issued with the new
    assert counters["entra"]["status:401"] == 1


def test_concurrent_callers_during_rotation_reread_once(sandbox_env: SandboxClient) -> None:
    runtime = get_runtime()
    runtime.tokens.get_token()
    rotate(sandbox_env)
    sandbox_env.revoke_tokens()
    sandbox_env.reset_counters()
    sandbox_env.set_latency("entra", 0.1)
    results = in_parallel(16, runtime.dataverse.whoami, timeout=60)
    assert all(isinstance(r, dict) and r.get("UserId") for r in results), results
    counters = sandbox_env.counters()
    assert counters["keyvault"]["GET secret"] == 1
    assert counters["entra"]["POST token"] == 2


def test_wrong_secret_in_key_vault_is_permanent_and_names_the_secret(sandbox_env: SandboxClient) -> None:
    sandbox_env.set_secret(sandbox_env.env["DATAVERSE_CLIENT_SECRET_NAME"], "not-the-client-secret")
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    err = info.value
    assert (err.code, err.transient, err.aadsts) == ("entra_invalid_client", False, 7000215)
    assert sandbox_env.env["DATAVERSE_CLIENT_SECRET_NAME"] in err.message
    counters = sandbox_env.counters()
    assert counters["keyvault"]["GET secret"] == 2  # the read, and one re-read in case it was rotated
    assert counters["entra"]["POST token"] == 1  # same value again: no pointless retry


def test_expired_client_secret(sandbox_env: SandboxClient) -> None:
    sandbox_env.expire_client_secret()
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    assert (info.value.code, info.value.aadsts) == ("entra_invalid_client", 7000222)


@pytest.mark.parametrize(
    ("setting", "code"),
    [("DATAVERSE_TENANT_ID", "entra_invalid_tenant"), ("DATAVERSE_CLIENT_ID", "entra_unauthorized_client")],
)
def test_wrong_ids_are_permanent_and_named(sandbox_env: SandboxClient, setting: str, code: str) -> None:
    wrong = str(uuid.uuid4())
    with pytest.raises(AuthError) as info:
        runtime_with(**{setting: wrong}).tokens.get_token()
    assert (info.value.code, info.value.transient) == (code, False)
    assert wrong in info.value.message


def test_key_vault_refusals(sandbox_env: SandboxClient) -> None:
    with pytest.raises(AuthError) as info:
        runtime_with(DATAVERSE_CLIENT_SECRET_NAME="no-such-secret").tokens.get_token()
    assert (info.value.code, info.value.transient) == ("keyvault_secret_not_found", False)
    assert "no-such-secret" in info.value.message and sandbox_env.env["KEY_VAULT_URL"] in info.value.message
    sandbox_env.set_keyvault_access(False)
    with pytest.raises(AuthError) as info:
        runtime_with().tokens.get_token()
    assert (info.value.code, info.value.transient) == ("keyvault_forbidden", False)
    assert "Key Vault Secrets User" in info.value.message


@pytest.mark.parametrize(
    ("service", "status", "code"),
    [
        ("entra", 503, "entra_unavailable"),
        ("keyvault", 503, "keyvault_unavailable"),
        ("identity", 500, "managed_identity_unavailable"),
    ],
)
def test_outages_are_transient_and_bounded(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch, service: str, status: int, code: str
) -> None:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # azure-core's back-off: count, don't wait
    sandbox_env.add_fault(service, status=status, body={"error": "unavailable"}, times=-1)
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    assert (info.value.code, info.value.transient) == (code, True)
    answered = sandbox_env.counters()[service].get(f"status:{status}", 0)
    assert 1 <= answered <= 3  # the SDKs' retries are bounded


def test_timeouts_are_transient(sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr("shared.tokens.AUTH_TIMEOUT_SECONDS", 0.5)
    sandbox_env.add_fault("entra", path="token", delay=1.5, times=-1)
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    assert (info.value.code, info.value.transient) == ("entra_unavailable", True)
