"""The pure parts of the federated and certificate modes: Key Vault certificate formats, assertion claims,
the diagnostics walk per mode and its fix texts (no network: the integration tests drive the real SDKs)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import jwt
import pytest

from devstack import certificates
from shared.diagnostics import STEPS, federated_credential_command, run_diagnostics, steps_for
from shared.errors import AuthError
from shared.settings import Settings
from shared.tokens import assertion_claims, certificate_bytes, describe_certificate
from tests.unit.functions_fakes import JANE, FakeDataverse, FakeRuntime, FakeSecrets, FakeTokens, settings

GENERATED = certificates.generate("unit-test")


@pytest.mark.parametrize("fmt", ["pem", "pfx"])
def test_both_key_vault_certificate_formats_are_read(fmt: str) -> None:
    value = GENERATED.key_vault_value(fmt)
    data = certificate_bytes(value)
    assert data.startswith(b"-----BEGIN") if fmt == "pem" else base64.b64encode(data).decode() == value
    info = describe_certificate(value)
    assert info.thumbprint == GENERATED.sha1_thumbprint
    assert info.subject == "CN=unit-test"
    assert info.not_after == GENERATED.certificate.not_valid_after_utc.timestamp()


@pytest.mark.parametrize("value", [
    "not a certificate",
    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
    base64.b64encode(b"garbage").decode(),
])
def test_anything_else_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        describe_certificate(value)


def test_a_certificate_without_its_private_key_is_refused() -> None:
    with pytest.raises(ValueError):
        describe_certificate(GENERATED.public_pem())


def test_assertion_claims_never_contain_the_token() -> None:
    token = jwt.encode({"iss": "https://login.microsoftonline.com/t/v2.0", "sub": "principal",
                        "aud": ["api://AzureADTokenExchange"], "exp": 1}, "k" * 32, algorithm="HS256")
    claims = assertion_claims(token)
    assert claims == {"issuer": "https://login.microsoftonline.com/t/v2.0", "subject": "principal",
                      "audience": "api://AzureADTokenExchange"}
    assert assertion_claims("garbage") == {}


def test_the_az_command_is_exact() -> None:
    command = federated_credential_command("cid", "https://login.microsoftonline.com/tid/v2.0", "pid")
    assert command == (
        "az ad app federated-credential create --id cid --parameters "
        "'{\"name\":\"function-app-identity\",\"issuer\":\"https://login.microsoftonline.com/tid/v2.0\","
        "\"subject\":\"pid\",\"audiences\":[\"api://AzureADTokenExchange\"]}'"
    )
    assert json.loads(command.split("--parameters ")[1].strip("'"))["audiences"] == ["api://AzureADTokenExchange"]


def test_steps_per_mode() -> None:
    assert steps_for("secret") == STEPS
    assert "key_vault_secret" not in steps_for("federated") and "federation_token" in steps_for("federated")
    assert steps_for("certificate")[2] == "key_vault_certificate"


class FederatedTokens(FakeTokens):
    claims = {"issuer": "https://login.microsoftonline.com/tid/v2.0", "subject": "the-principal-id",
              "audience": "api://AzureADTokenExchange"}

    def federation_claims(self) -> dict[str, str]:
        return dict(self.claims)


def diagnose(mode: str, tokens: FakeTokens, secrets: FakeSecrets | None = None) -> dict[str, Any]:
    dataverse = FakeDataverse(pages=[{"value": [{
        "systemuserid": JANE.systemuserid, "internalemailaddress": JANE.email,
        "azureactivedirectoryobjectid": JANE.azure_ad_object_id, "isdisabled": False, "accessmode": 0}]}],
        request_answer={"UserId": JANE.systemuserid})
    runtime = FakeRuntime(dataverse=dataverse)
    runtime.tokens = tokens
    if secrets is not None:
        runtime.secrets = secrets
    s: Settings = dataclasses.replace(settings(), credential=mode)
    return run_diagnostics(lambda: s, runtime_factory=lambda _: runtime, identity_check=lambda _: "mi ok")


def step(result: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in result["steps"] if s["name"] == name)
    return found


def test_federated_walk_reads_no_secret_and_shows_what_the_record_must_match() -> None:
    secrets = FakeSecrets()
    result = diagnose("federated", FederatedTokens(), secrets)
    assert [s["name"] for s in result["steps"]] == list(steps_for("federated"))
    assert result["ok"], result
    assert "dataverse-client-secret" not in secrets.reads
    detail = step(result, "federation_token")["detail"]
    assert "the-principal-id" in detail and "https://login.microsoftonline.com/tid/v2.0" in detail
    assert "DATAVERSE_CREDENTIAL=federated" in step(result, "settings")["detail"]


def test_federation_mismatch_fix_is_the_command_with_the_presented_values() -> None:
    error = AuthError("no match", code="entra_federation_mismatch", aadsts=70021)
    result = diagnose("federated", FederatedTokens(fail=error))
    fix = step(result, "entra_token")["fix"]
    assert federated_credential_command(settings().client_id, "https://login.microsoftonline.com/tid/v2.0",
                                        "the-principal-id") in fix


def test_certificate_walk_shows_the_thumbprint_and_the_fix_names_it() -> None:
    secrets = FakeSecrets({"dataverse-certificate": GENERATED.key_vault_value("pfx"),
                           "webhook-signing-secret": "k"})
    result = diagnose("certificate", FakeTokens(fail=AuthError("no key", code="entra_invalid_certificate")),
                      secrets)
    assert GENERATED.sha1_thumbprint in step(result, "key_vault_certificate")["detail"]
    fix = step(result, "entra_token")["fix"]
    assert GENERATED.sha1_thumbprint in fix and "az ad app credential reset" in fix


def test_a_plain_secret_instead_of_a_certificate_is_named() -> None:
    secrets = FakeSecrets({"dataverse-certificate": "hunter2", "webhook-signing-secret": "k"})
    result = diagnose("certificate", FakeTokens(), secrets)
    failed = step(result, "key_vault_certificate")
    assert not failed["ok"] and "keyvault_certificate_invalid" in failed["detail"]
    assert "az keyvault certificate import" in failed["fix"]
    assert step(result, "entra_token")["skipped"]


@pytest.mark.parametrize(("code", "words"), [
    ("entra_invalid_assertion", "clock"),
    ("managed_identity_unavailable", "federated credential's subject"),
])
def test_other_federated_fixes(code: str, words: str) -> None:
    result = diagnose("federated", FederatedTokens(fail=AuthError("x", code=code)))
    assert words in step(result, "entra_token")["fix"]
