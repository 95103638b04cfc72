"""DATAVERSE_CREDENTIAL=federated and =certificate: real azure-identity against the local stack over HTTPS.

Each mode keeps the secret mode's guarantees (one token per instance under concurrent cold callers,
refresh before expiry, a new token after a Dataverse 401), with no client secret anywhere; the
certificate is rotated in Key Vault without a restart; each mode's misconfigurations are named.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from devstack import certificates
from devstack.control import SandboxClient
from devstack.sandboxes import CLIENT_SECRET_NAME, TOKEN_EXCHANGE_AUDIENCE
from shared.diagnostics import run_diagnostics, steps_for
from shared.errors import AuthError
from shared.runtime import Runtime, get_runtime
from shared.settings import Settings
from tests.concurrency import in_parallel

pytestmark = pytest.mark.integration

MODES = ["federated", "certificate-pem", "certificate-pfx"]


def configure(sbx: SandboxClient, monkeypatch: pytest.MonkeyPatch, variant: str) -> str:
    """Switch the sandbox (and this process's settings) to a credential mode; returns the mode."""
    mode, _, fmt = variant.partition("-")
    env = sbx.use_credential(mode, fmt=fmt or "pem")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from shared.runtime import reset_runtime

    reset_runtime()
    sbx.reset_counters()
    return mode


@pytest.fixture(params=MODES)
def keyless(request: pytest.FixtureRequest, sandbox_env: SandboxClient,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxClient]:
    """A sandbox in federated or certificate mode, with no client secret on the app or in the vault."""
    configure(sandbox_env, monkeypatch, request.param)
    yield sandbox_env


def runtime_with(**overrides: str) -> Runtime:
    return Runtime.from_settings(Settings.from_env({**os.environ, **overrides}))


def no_client_secret_anywhere(sbx: SandboxClient) -> None:
    view = sbx.show()
    assert view["client_secrets"] == 0
    assert CLIENT_SECRET_NAME not in view["vault_secrets"]
    assert "DATAVERSE_CLIENT_SECRET" not in os.environ


# --- happy paths ---------------------------------------------------------------------------------


def test_24_cold_callers_share_one_token_and_no_secret_exists(keyless: SandboxClient) -> None:
    mode = keyless.env["DATAVERSE_CREDENTIAL"]
    no_client_secret_anywhere(keyless)
    keyless.set_latency("entra", 0.2)  # keep the first request in flight while the others arrive
    runtime = get_runtime()
    tokens = in_parallel(24, runtime.tokens.get_token, timeout=60)
    assert len(set(tokens)) == 1
    counters = keyless.counters()
    assert counters["entra"]["POST token"] == 1
    if mode == "federated":
        assert counters["identity"]["token-exchange"] == 1  # the assertion: one MI token
        assert counters["keyvault"].get("GET secret", 0) == 0  # nothing to read
    else:
        assert counters["keyvault"]["GET secret"] == 1  # the certificate, once
        assert counters["identity"].get("token-exchange", 0) == 0
    assert runtime.dataverse.whoami()["UserId"]
    assert keyless.counters()["entra"]["POST token"] == 1
    claims = jwt.decode(tokens[0], options={"verify_signature": False})
    assert claims["appid"] == keyless.client_id  # the app's token, not the identity's


def test_token_is_refreshed_before_expiry(keyless: SandboxClient) -> None:
    """A 4-second token is kept for half its life (a real one: until 5 minutes before expiry)."""
    keyless.set_token_lifetime(4)
    runtime = get_runtime()
    first = runtime.tokens.get_token()
    assert runtime.tokens.get_token() == first
    time.sleep(2.2)  # the token's own clock, not synchronisation: it must age past its margin
    second = runtime.tokens.get_token()
    assert second != first
    assert keyless.counters()["entra"]["POST token"] == 2


def test_dataverse_401_fetches_a_new_token_once(keyless: SandboxClient) -> None:
    runtime = get_runtime()
    runtime.dataverse.whoami()
    keyless.revoke_tokens()
    keyless.reset_counters()
    assert runtime.dataverse.whoami()["UserId"]
    counters = keyless.counters()
    assert counters["entra"]["POST token"] == 1
    assert counters["dataverse"]["status:401"] == 1
    assert counters["dataverse"]["GET WhoAmI"] == 2


# --- certificate rotation ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pem", "pfx"])
def test_certificate_rotation_needs_no_restart(sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch,
                                               fmt: str) -> None:
    configure(sandbox_env, monkeypatch, f"certificate-{fmt}")
    old = sandbox_env.show()["certificates"][0]["thumbprint"]
    runtime = get_runtime()
    runtime.dataverse.whoami()
    sandbox_env.add_certificate(fmt=fmt)  # the new one: uploaded to the app, latest version in Key Vault
    sandbox_env.remove_certificate(old)  # ...and the old one gone from the app registration
    sandbox_env.revoke_tokens()  # the cached token dies too, so a new one is needed
    sandbox_env.reset_counters()
    sandbox_env.set_latency("entra", 0.1)
    results = in_parallel(16, runtime.dataverse.whoami, timeout=60)
    assert all(isinstance(r, dict) and r.get("UserId") for r in results), results
    counters = sandbox_env.counters()
    assert counters["keyvault"]["GET secret"] == 1  # one re-read for all 16 callers
    assert counters["entra"]["assertion:700027"] == 1  # the old certificate, refused once
    assert counters["entra"]["POST token"] == 2


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("style", "aadsts"), [("current", 700213), ("legacy", 70021)])
def test_no_matching_federated_credential_is_named_with_the_fix(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch, style: str, aadsts: int
) -> None:
    """Current Entra: 401 invalid_client AADSTS700213 (the subject matches no record); older answers:
    400 invalid_request AADSTS70021. azure-identity raises both as ClientAuthenticationError."""
    configure(sandbox_env, monkeypatch, "federated")
    sandbox_env.set_federation_errors(style)
    sandbox_env.remove_federated_credentials()
    # a record for another identity does not match either (subject is the principal id, exactly)
    sandbox_env.add_federated_credential(name="other", subject=str(uuid.uuid4()))
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    err = info.value
    assert (err.code, err.transient, err.aadsts) == ("entra_federation_mismatch", False, aadsts)
    principal = sandbox_env.info["mi_principal_id"]
    assert err.details == [{
        "issuer": f"{sandbox_env.env['AZURE_AUTHORITY_HOST']}/{sandbox_env.tenant_id}/v2.0",
        "subject": principal,
        "audience": TOKEN_EXCHANGE_AUDIENCE,
    }]
    assert sandbox_env.counters()["entra"]["POST token"] == 1  # nothing to re-read: no retry

    result = run_diagnostics()
    assert [s["name"] for s in result["steps"]] == list(steps_for("federated"))
    failed = next(s for s in result["steps"] if s["name"] == "entra_token")
    assert not failed["ok"] and "entra_federation_mismatch" in failed["detail"]
    assert (f"az ad app federated-credential create --id {sandbox_env.client_id} --parameters "
            f"'{{\"name\":\"function-app-identity\",\"issuer\":\"{err.details[0]['issuer']}\","
            f"\"subject\":\"{principal}\",\"audiences\":[\"api://AzureADTokenExchange\"]}}'") in failed["fix"]


def test_unknown_certificate_is_reread_once_then_named(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(sandbox_env, monkeypatch, "certificate")
    sandbox_env.add_certificate(register=False)  # in Key Vault, never uploaded to the app registration
    sandbox_env.reset_counters()
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    err = info.value
    assert (err.code, err.transient, err.aadsts) == ("entra_invalid_certificate", False, 700027)
    assert sandbox_env.env["DATAVERSE_CERTIFICATE_NAME"] in err.message
    counters = sandbox_env.counters()
    assert counters["keyvault"]["GET secret"] == 2  # the read, and one re-read in case it was rotated
    assert counters["entra"]["POST token"] == 1  # same certificate again: no pointless retry

    result = run_diagnostics()
    cert_step = next(s for s in result["steps"] if s["name"] == "key_vault_certificate")
    assert cert_step["ok"] and "thumbprint" in cert_step["detail"]
    failed = next(s for s in result["steps"] if s["name"] == "entra_token")
    assert not failed["ok"] and "az ad app credential reset" in failed["fix"]
    thumbprint = cert_step["detail"].split("thumbprint ")[1].split(",")[0]
    assert thumbprint in failed["fix"]


def test_a_plain_secret_where_the_certificate_should_be(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(sandbox_env, monkeypatch, "certificate")
    sandbox_env.set_secret(sandbox_env.env["DATAVERSE_CERTIFICATE_NAME"], "not a certificate")
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    assert (info.value.code, info.value.transient) == ("keyvault_certificate_invalid", False)
    assert sandbox_env.counters()["entra"].get("POST token", 0) == 0


def test_a_missing_certificate_is_named_as_one(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(sandbox_env, monkeypatch, "certificate")
    with pytest.raises(AuthError) as info:
        runtime_with(DATAVERSE_CERTIFICATE_NAME="no-such-certificate").tokens.get_token()
    assert (info.value.code, info.value.transient) == ("keyvault_certificate_not_found", False)
    assert "no-such-certificate" in info.value.message


@pytest.mark.parametrize(("status", "code", "transient"), [
    (500, "managed_identity_unavailable", True),
    (None, "managed_identity_not_configured", False),
])
def test_managed_identity_failures_in_federated_mode(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch, status: int | None, code: str,
    transient: bool,
) -> None:
    configure(sandbox_env, monkeypatch, "federated")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # azure-core's back-off: count, don't wait
    if status is None:
        monkeypatch.setenv("AZURE_CLIENT_ID", str(uuid.uuid4()))  # an identity the app does not have
    else:
        sandbox_env.add_fault("identity", status=status, body={"error": "down"}, times=-1)
    with pytest.raises(AuthError) as info:
        get_runtime().tokens.get_token()
    assert (info.value.code, info.value.transient) == (code, transient)
    assert "api://AzureADTokenExchange" in info.value.message
    assert sandbox_env.counters()["entra"].get("POST token", 0) == 0


@pytest.mark.parametrize("variant", MODES)
def test_diagnostics_walks_the_mode_and_passes(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    mode = configure(sandbox_env, monkeypatch, variant)
    result = run_diagnostics()
    names = [s["name"] for s in result["steps"]]
    assert names == list(steps_for(mode))
    assert "key_vault_secret" not in names
    assert result["ok"], result
    settings_detail = result["steps"][0]["detail"]
    assert f"DATAVERSE_CREDENTIAL={mode}" in settings_detail
    if mode == "federated":
        detail = next(s for s in result["steps"] if s["name"] == "federation_token")["detail"]
        assert sandbox_env.info["mi_principal_id"] in detail and TOKEN_EXCHANGE_AUDIENCE in detail


# --- the emulator's wire: what Entra answers to each kind of bad assertion ------------------------


def _post(sbx: SandboxClient, form: dict[str, str]) -> requests.Response:
    url = f"{sbx.env['AZURE_AUTHORITY_HOST']}/{sbx.tenant_id}/oauth2/v2.0/token"
    return requests.post(url, data={"grant_type": "client_credentials", "client_id": sbx.client_id,
                                    "scope": f"{sbx.env['DATAVERSE_URL']}/.default", **form},
                         verify=sbx.env["REQUESTS_CA_BUNDLE"], timeout=30)


def _assertion_form(token: str) -> dict[str, str]:
    return {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": token}


def _signed(cert: certificates.GeneratedCertificate, claims: dict[str, Any], *, alg: str = "PS256") -> str:
    header = ({"x5t#S256": certificates.b64url_thumbprint(cert.sha256_thumbprint)} if alg == "PS256"
              else {"x5t": certificates.b64url_thumbprint(cert.sha1_thumbprint)})
    key = cert.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def _load_pem(value: str) -> certificates.GeneratedCertificate:
    from cryptography import x509

    data = value.encode()
    key = serialization.load_pem_private_key(data, password=None)
    return certificates.GeneratedCertificate(key, x509.load_pem_x509_certificate(data))  # type: ignore[arg-type]


def test_entra_wire_for_client_assertions(sandbox: SandboxClient) -> None:
    sandbox.use_credential("certificate")
    endpoint = f"{sandbox.env['AZURE_AUTHORITY_HOST']}/{sandbox.tenant_id}/oauth2/v2.0/token"
    # the registered certificate's private key, as the app reads it from Key Vault
    stack_secret = _read_certificate_secret(sandbox)
    cert = _load_pem(stack_secret)
    now = int(time.time())
    good = {"aud": endpoint, "iss": sandbox.client_id, "sub": sandbox.client_id, "exp": now + 600,
            "iat": now, "jti": str(uuid.uuid4())}
    for alg in ("PS256", "RS256"):
        answer = _post(sandbox, _assertion_form(_signed(cert, good, alg=alg)))
        assert answer.status_code == 200, answer.text
        assert answer.json()["token_type"] == "Bearer"

    def refused(token: str) -> tuple[int, str, int, str]:
        answer = _post(sandbox, _assertion_form(token))
        body = answer.json()
        return answer.status_code, body["error"], body["error_codes"][0], body["error_description"]

    status, error, code, text = refused(_signed(certificates.generate(), good))
    assert (status, error, code) == (401, "invalid_client", 700027) and "The key was not found" in text
    impostor = certificates.GeneratedCertificate(certificates.generate().key, cert.certificate)
    status, error, code, text = refused(_signed(impostor, good))  # the registered thumbprint, another key
    assert (status, code) == (401, 700027) and "did not match the expected signature" in text
    status, error, code, text = refused(_signed(cert, {**good, "exp": now - 60}))
    assert (status, error, code) == (401, "invalid_client", 700024)
    assert "not within its valid time range" in text
    assert refused(_signed(cert, {**good, "iss": str(uuid.uuid4())}))[2] == 700021
    assert refused(_signed(cert, {**good, "aud": "https://example.com/token"}))[2] == 50013
    assert refused("not-a-jwt")[:3] == (401, "invalid_client", 50027)
    # a federated assertion nobody trusts: current Entra names the first claim no record has
    foreign = jwt.encode({"iss": "https://issuer.example", "sub": "someone", "aud": TOKEN_EXCHANGE_AUDIENCE,
                          "exp": now + 600}, "k" * 32, algorithm="HS256")
    status, error, code, text = refused(foreign)
    assert (status, error, code) == (401, "invalid_client", 700211)
    assert "presented assertion issuer 'https://issuer.example'" in text
    sandbox.set_federation_errors("legacy")  # AADSTS70021 named all three
    status, error, code, text = refused(foreign)
    assert (status, error, code) == (400, "invalid_request", 70021)
    assert ("Assertion Issuer: 'https://issuer.example'. Assertion Subject: 'someone'. "
            "Assertion Audience: 'api://AzureADTokenExchange'.") in text
    missing_type = _post(sandbox, {"client_assertion": _signed(cert, good)})
    assert missing_type.status_code == 400 and missing_type.json()["error_codes"] == [90014]


def _read_certificate_secret(sbx: SandboxClient) -> str:
    """The certificate's Key Vault secret, read as the app reads it (managed identity, Key Vault SDK)."""
    from shared.secrets import SecretStore

    saved = {k: os.environ.get(k) for k in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER")}
    os.environ.update({k: sbx.env[k] for k in saved})
    try:
        store = SecretStore(sbx.env["KEY_VAULT_URL"])
        try:
            return store.get(sbx.env["DATAVERSE_CERTIFICATE_NAME"])
        finally:
            store.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_key_vault_shows_a_certificate_as_a_managed_secret(sandbox: SandboxClient) -> None:
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.secrets import SecretClient

    sandbox.use_credential("certificate", fmt="pfx")
    saved = {k: os.environ.get(k) for k in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER")}
    os.environ.update({k: sandbox.env[k] for k in saved})
    try:
        client = SecretClient(sandbox.env["KEY_VAULT_URL"], ManagedIdentityCredential(),
                              verify_challenge_resource=False)
        secret = client.get_secret(sandbox.env["DATAVERSE_CERTIFICATE_NAME"])
        client.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert secret.properties.content_type == "application/x-pkcs12"
    assert secret.properties.managed is True
    assert secret.properties.key_id and "/keys/" in secret.properties.key_id


def test_migration_from_secret_to_federated_without_downtime(sandbox_env: SandboxClient) -> None:
    """docs/credentials.md's steps: add the federated credential, check it with /api/diagnostics'
    ?credential=federated while the secret still serves, switch the setting, delete the secret."""
    running = get_runtime()  # an instance on the client secret, serving throughout
    assert running.dataverse.whoami()["UserId"]

    before = run_diagnostics(credential="federated")  # step 0: not ready yet, and says why
    assert not before["ok"]
    failed = next(s for s in before["steps"] if s["name"] == "entra_token")
    assert "az ad app federated-credential create" in failed["fix"]

    sandbox_env.add_federated_credential()  # step 1
    check = run_diagnostics(credential="federated")  # step 2
    assert check["ok"], check
    assert [s["name"] for s in check["steps"]] == list(steps_for("federated"))
    assert running.dataverse.whoami()["UserId"]  # the secret mode was not touched

    switched = runtime_with(DATAVERSE_CREDENTIAL="federated")  # step 3: new instances use federation
    assert switched.dataverse.whoami()["UserId"]
    sandbox_env.remove_client_secret()  # step 4: no secret left anywhere
    no_client_secret_anywhere(sandbox_env)
    sandbox_env.revoke_tokens()
    assert switched.dataverse.whoami()["UserId"]
    switched.close()


def test_diagnostics_refuses_an_unknown_mode(sandbox_env: SandboxClient) -> None:
    result = run_diagnostics(credential="password")
    assert not result["ok"] and "password" in result["steps"][0]["detail"]
