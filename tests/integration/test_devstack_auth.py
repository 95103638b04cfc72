"""Managed identity, Entra ID and Key Vault emulators driven by the real Azure SDKs over real HTTPS."""

from __future__ import annotations

import uuid
from typing import Any

import jwt
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.identity import ClientSecretCredential, DefaultAzureCredential, ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient

from devstack.control import SandboxClient
from devstack.sandboxes import DEFAULT_TENANT_ID

pytestmark = pytest.mark.integration

VAULT_SCOPE = "https://vault.azure.net/.default"


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def token_request(sbx: SandboxClient, *, tenant: str | None = None, **form: str) -> requests.Response:
    body = {"grant_type": "client_credentials", "client_id": sbx.client_id,
            "scope": sbx.env["DATAVERSE_URL"] + "/.default"}
    body.update(form)
    return requests.post(f"{sbx.env['AZURE_AUTHORITY_HOST']}/{tenant or sbx.tenant_id}/oauth2/v2.0/token",
                         data=body, timeout=10)


def client_secret(sbx: SandboxClient) -> str:
    """The app's secret, as the production code finds it: in the sandbox's Key Vault."""
    secret = f"it-{uuid.uuid4().hex}"
    sbx.set_client_secret(secret)
    return secret


def credential(sbx: SandboxClient, secret: str, *, tenant: str | None = None,
               client_id: str | None = None) -> ClientSecretCredential:
    return ClientSecretCredential(tenant or sbx.tenant_id, client_id or sbx.client_id, secret,
                                  authority=sbx.env["AZURE_AUTHORITY_HOST"], disable_instance_discovery=True)


def assert_entra_error(response: requests.Response, status: int, error: str, code: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= body.keys()


# --- managed identity -------------------------------------------------------------------------

def test_managed_identity_credential_gets_a_token_for_the_sandbox(sandbox_env: SandboxClient) -> None:
    token = ManagedIdentityCredential().get_token(VAULT_SCOPE)

    claims = claims_of(token.token)
    assert claims["aud"] == "https://vault.azure.net"
    assert claims["tid"] == sandbox_env.tenant_id
    assert claims["oid"] == sandbox_env.info["mi_principal_id"]
    assert sandbox_env.counters()["identity"] == {"GET msi": 1, "status:200": 1}


def test_managed_identity_wire_shape_and_bad_header(sandbox: SandboxClient) -> None:
    endpoint = sandbox.env["IDENTITY_ENDPOINT"]
    params = {"api-version": "2019-08-01", "resource": "https://vault.azure.net"}

    good = requests.get(endpoint, params=params, headers={"X-IDENTITY-HEADER": sandbox.identity_header},
                        timeout=10)
    bad = requests.get(endpoint, params=params, headers={"X-IDENTITY-HEADER": "not-a-sandbox"}, timeout=10)
    missing = requests.get(endpoint, params=params, timeout=10)

    assert good.status_code == 200
    body = good.json()
    assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert isinstance(body["expires_on"], str) and body["expires_on"].isdigit()
    assert body["resource"] == "https://vault.azure.net" and body["token_type"] == "Bearer"
    assert bad.status_code == 401 and {"statusCode", "message", "correlationId"} <= bad.json().keys()
    assert missing.status_code == 400


def test_managed_identity_refuses_a_foreign_user_assigned_client_id(sandbox: SandboxClient) -> None:
    response = requests.get(
        sandbox.env["IDENTITY_ENDPOINT"],
        params={"api-version": "2019-08-01", "resource": "https://vault.azure.net",
                "client_id": str(uuid.uuid4())},
        headers={"X-IDENTITY-HEADER": sandbox.identity_header}, timeout=10)
    assert response.status_code == 400
    assert response.json()["message"] == (
        "No User Assigned or Delegated Managed Identity found for specified ClientId/ResourceId/PrincipalId."
    )


def test_managed_identity_token_for_an_unknown_resource_is_a_vague_500(sandbox_env: SandboxClient) -> None:
    response = requests.get(
        sandbox_env.env["IDENTITY_ENDPOINT"],
        params={"api-version": "2019-08-01", "resource": "https://nothing.example.com"},
        headers={"X-IDENTITY-HEADER": sandbox_env.identity_header}, timeout=10)
    assert response.status_code == 500
    assert response.json()["message"] == "An unexpected error occured while fetching the AAD Token."
    with pytest.raises(ClientAuthenticationError, match="unexpected error occured"):
        ManagedIdentityCredential().get_token("https://nothing.example.com/.default")
    assert ManagedIdentityCredential().get_token("https://management.azure.com/.default").token


# --- Entra ID ---------------------------------------------------------------------------------

def test_client_secret_credential_gets_a_dataverse_token(sandbox: SandboxClient) -> None:
    token = credential(sandbox, client_secret(sandbox)).get_token(sandbox.env["DATAVERSE_URL"] + "/.default")

    claims = claims_of(token.token)
    assert claims["aud"] == sandbox.env["DATAVERSE_URL"]
    assert claims["tid"] == sandbox.tenant_id
    assert claims["appid"] == sandbox.client_id
    entra = sandbox.counters()["entra"]
    assert entra["GET openid-configuration"] == 1 and entra["POST token"] == 1


def test_token_response_shape_and_lifetime(sandbox: SandboxClient) -> None:
    sandbox.set_token_lifetime(120)
    response = token_request(sandbox, client_secret=client_secret(sandbox))

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert body["expires_in"] == 120
    claims = claims_of(body["access_token"])
    assert claims["exp"] - claims["iat"] == 120


def test_discovery_document_has_what_msal_needs(sandbox: SandboxClient) -> None:
    base = sandbox.env["AZURE_AUTHORITY_HOST"]
    doc = requests.get(f"{base}/{sandbox.tenant_id}/v2.0/.well-known/openid-configuration", timeout=10).json()
    assert doc["token_endpoint"] == f"{base}/{sandbox.tenant_id}/oauth2/v2.0/token"
    assert doc["authorization_endpoint"].startswith(f"{base}/{sandbox.tenant_id}/")
    assert doc["issuer"] == f"{base}/{sandbox.tenant_id}/v2.0"
    assert set(doc) == {  # the fields of login.microsoftonline.com's v2.0 document
        "token_endpoint", "token_endpoint_auth_methods_supported", "jwks_uri", "response_modes_supported",
        "subject_types_supported", "id_token_signing_alg_values_supported", "response_types_supported",
        "scopes_supported", "issuer", "request_uri_parameter_supported", "userinfo_endpoint",
        "authorization_endpoint", "device_authorization_endpoint", "http_logout_supported",
        "frontchannel_logout_supported", "end_session_endpoint", "claims_supported", "kerberos_endpoint",
        "tenant_region_scope", "cloud_instance_name", "cloud_graph_host_name", "msgraph_host", "rbac_url",
    }


@pytest.mark.parametrize(
    ("case", "status", "error", "code"),
    [
        ("wrong_secret", 401, "invalid_client", 7000215),
        ("expired_secret", 401, "invalid_client", 7000222),
        ("unknown_client", 400, "unauthorized_client", 700016),
        ("unknown_tenant", 400, "invalid_tenant", 90002),
        ("bad_scope", 400, "invalid_scope", 70011),
        ("unknown_resource", 400, "invalid_resource", 500011),
        ("no_secret", 401, "invalid_client", 7000216),
    ],
)
def test_entra_errors_on_the_wire(sandbox: SandboxClient, case: str, status: int, error: str,
                                  code: int) -> None:
    secret = client_secret(sandbox)
    form = {"client_secret": secret}
    tenant = None
    if case == "wrong_secret":
        form["client_secret"] = "wrong"
    elif case == "expired_secret":
        sandbox.expire_client_secret()
    elif case == "unknown_client":
        form["client_id"] = str(uuid.uuid4())
    elif case == "unknown_tenant":
        tenant = str(uuid.uuid4())
    elif case == "bad_scope":
        form["scope"] = sandbox.env["DATAVERSE_URL"] + "/user_impersonation"
    elif case == "unknown_resource":
        form["scope"] = "https://contoso.crm4.dynamics.com/.default"
    elif case == "no_secret":
        del form["client_secret"]

    assert_entra_error(token_request(sandbox, tenant=tenant, **form), status, error, code)


@pytest.mark.parametrize(
    ("case", "code"),
    [("wrong_secret", 7000215), ("expired_secret", 7000222), ("unknown_client", 700016),
     ("bad_resource", 500011)],
)
def test_entra_errors_reach_the_sdk_caller_with_their_code(sandbox: SandboxClient, case: str,
                                                           code: int) -> None:
    secret = client_secret(sandbox)
    scope = sandbox.env["DATAVERSE_URL"] + "/.default"
    cred = credential(sandbox, secret)
    if case == "wrong_secret":
        cred = credential(sandbox, "wrong")
    elif case == "expired_secret":
        sandbox.expire_client_secret()
    elif case == "unknown_client":
        cred = credential(sandbox, secret, client_id=str(uuid.uuid4()))
    elif case == "bad_resource":
        scope = "https://contoso.crm4.dynamics.com/.default"

    with pytest.raises(ClientAuthenticationError) as caught:
        cred.get_token(scope)
    assert f"AADSTS{code}:" in caught.value.message


def test_unknown_tenant_fails_discovery_and_the_code_survives_in_the_exception_chain(
        sandbox: SandboxClient) -> None:
    base = sandbox.env["AZURE_AUTHORITY_HOST"]
    tenant = str(uuid.uuid4())
    discovery = requests.get(f"{base}/{tenant}/v2.0/.well-known/openid-configuration", timeout=10)
    assert_entra_error(discovery, 400, "invalid_tenant", 90002)

    with pytest.raises(ClientAuthenticationError) as caught:
        cred = credential(sandbox, client_secret(sandbox), tenant=tenant)
        cred.get_token(sandbox.env["DATAVERSE_URL"] + "/.default")
    chain: list[str] = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("AADSTS90002" in text for text in chain), chain


def test_client_secret_rotation_with_and_without_overlap(sandbox: SandboxClient) -> None:
    old = client_secret(sandbox)
    sandbox.set_client_secret("new-secret-1", keep_old=True)
    assert token_request(sandbox, client_secret=old).status_code == 200
    assert token_request(sandbox, client_secret="new-secret-1").status_code == 200

    sandbox.set_client_secret("new-secret-2")
    assert_entra_error(token_request(sandbox, client_secret=old), 401, "invalid_client", 7000215)
    assert token_request(sandbox, client_secret="new-secret-2").status_code == 200


# --- Key Vault --------------------------------------------------------------------------------

def secret_client(sbx: SandboxClient) -> SecretClient:
    return SecretClient(sbx.env["KEY_VAULT_URL"], DefaultAzureCredential(), verify_challenge_resource=False)


def test_secret_client_reads_the_seeded_secrets_with_managed_identity(sandbox_env: SandboxClient) -> None:
    client = secret_client(sandbox_env)
    secret = client.get_secret(sandbox_env.env["DATAVERSE_CLIENT_SECRET_NAME"])

    # The Key Vault copy is the secret Entra accepts: the production path works end to end.
    assert token_request(sandbox_env, client_secret=secret.value or "").status_code == 200
    vault = sandbox_env.env["KEY_VAULT_URL"]
    assert (secret.id or "").startswith(f"{vault}/secrets/dataverse-client-secret/")
    assert secret.properties.enabled is True
    assert client.get_secret(sandbox_env.env["WEBHOOK_SECRET_NAME"]).value
    counters = sandbox_env.counters()
    assert counters["keyvault"]["GET secret"] == 2
    assert counters["identity"]["GET msi"] == 1  # one MI token serves both reads


def test_secret_versions_and_rotation(sandbox_env: SandboxClient) -> None:
    client = secret_client(sandbox_env)
    first = client.get_secret("webhook-signing-secret")
    new_version = sandbox_env.set_secret("webhook-signing-secret", "rotated-value")

    latest = client.get_secret("webhook-signing-secret")
    pinned = client.get_secret("webhook-signing-secret", first.properties.version)
    versions = {p.version for p in client.list_properties_of_secret_versions("webhook-signing-secret")}

    assert latest.value == "rotated-value" and latest.properties.version == new_version
    assert pinned.value == first.value
    assert versions == {first.properties.version, new_version}


def test_missing_secret_is_404_secret_not_found(sandbox_env: SandboxClient) -> None:
    with pytest.raises(ResourceNotFoundError) as caught:
        secret_client(sandbox_env).get_secret("no-such-secret")
    assert caught.value.status_code == 404
    assert caught.value.error is not None and caught.value.error.code == "SecretNotFound"


def test_identity_without_the_role_gets_403_forbidden(sandbox_env: SandboxClient) -> None:
    sandbox_env.set_keyvault_access(False)
    with pytest.raises(HttpResponseError) as caught:
        secret_client(sandbox_env).get_secret("webhook-signing-secret")
    assert caught.value.status_code == 403
    assert caught.value.error is not None and caught.value.error.code == "Forbidden"


def test_key_vault_challenge_and_bad_tokens(sandbox: SandboxClient) -> None:
    from azure.keyvault.secrets._shared.http_challenge import HttpChallenge

    url = f"{sandbox.env['KEY_VAULT_URL']}/secrets/webhook-signing-secret?api-version=7.6"
    anonymous = requests.get(url, timeout=10)
    assert anonymous.status_code == 401
    challenge = HttpChallenge(url, anonymous.headers["WWW-Authenticate"])
    assert challenge.get_resource() == "https://vault.azure.net"
    assert challenge.tenant_id == DEFAULT_TENANT_ID

    # A Dataverse-audience token is a valid token, but not for Key Vault.
    dataverse_token = token_request(sandbox, client_secret=client_secret(sandbox)).json()["access_token"]
    wrong_audience = requests.get(url, headers={"Authorization": f"Bearer {dataverse_token}"}, timeout=10)
    garbage = requests.get(url, headers={"Authorization": "Bearer not.a.jwt"}, timeout=10)
    assert wrong_audience.status_code == 401 and wrong_audience.json()["error"]["code"] == "Unauthorized"
    assert HttpChallenge(url, wrong_audience.headers["WWW-Authenticate"]).tenant_id == sandbox.tenant_id
    assert garbage.status_code == 401


def test_revoked_managed_identity_token_is_refused_by_key_vault(sandbox: SandboxClient) -> None:
    minted = requests.get(sandbox.env["IDENTITY_ENDPOINT"],
                          params={"api-version": "2019-08-01", "resource": "https://vault.azure.net"},
                          headers={"X-IDENTITY-HEADER": sandbox.identity_header}, timeout=10).json()
    url = f"{sandbox.env['KEY_VAULT_URL']}/secrets/webhook-signing-secret?api-version=7.6"
    headers = {"Authorization": f"Bearer {minted['access_token']}"}
    assert requests.get(url, headers=headers, timeout=10).status_code == 200

    sandbox.revoke_tokens()
    assert requests.get(url, headers=headers, timeout=10).status_code == 401


def test_key_vault_refuses_an_api_version_it_does_not_know(sandbox: SandboxClient) -> None:
    minted = requests.get(sandbox.env["IDENTITY_ENDPOINT"],
                          params={"api-version": "2019-08-01", "resource": "https://vault.azure.net"},
                          headers={"X-IDENTITY-HEADER": sandbox.identity_header}, timeout=10).json()
    headers = {"Authorization": f"Bearer {minted['access_token']}"}
    url = f"{sandbox.env['KEY_VAULT_URL']}/secrets/webhook-signing-secret"
    for known in ("7.6", "2026-04-01", "7.6-preview"):
        answer = requests.get(url, params={"api-version": known}, headers=headers, timeout=10)
        assert answer.status_code == 200
    unknown = requests.get(url, params={"api-version": "7.9"}, headers=headers, timeout=10)
    assert unknown.status_code == 400
    assert unknown.json()["error"] == {
        "code": "BadParameter",
        "message": "The specified version (7.9) is not recognized. Consider using the latest supported "
        "version (2026-04-01).",
    }


def test_managed_identity_errors_reach_the_sdk_caller(sandbox_env: SandboxClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-a-sandbox")
    with pytest.raises(ClientAuthenticationError) as caught:
        ManagedIdentityCredential().get_token(VAULT_SCOPE)
    assert "Invalid X-IDENTITY-HEADER" in caught.value.message
