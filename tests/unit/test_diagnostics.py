"""GET /api/diagnostics: each link of the chain, its fix text, and that no secret is ever shown."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared import logs
from shared.diagnostics import STEPS, run_diagnostics
from shared.errors import AuthError, ConfigurationError, DataverseError, SyncError
from shared.settings import Settings
from tests.unit.functions_fakes import (
    APP_USER,
    JANE,
    JOHN,
    FakeDataverse,
    FakeRuntime,
    FakeSecrets,
    FakeTokens,
    settings,
)

SECRET = "client-SECRET-value-123"
WEBHOOK_KEY = "webhook-KEY-value-456"


def jane_page() -> list[dict[str, Any]]:
    return [
        {
            "value": [
                {
                    "systemuserid": JANE.systemuserid,
                    "internalemailaddress": JANE.email,
                    "azureactivedirectoryobjectid": JANE.azure_ad_object_id,
                    "isdisabled": False,
                    "accessmode": 0,
                }
            ]
        }
    ]


def healthy_runtime() -> FakeRuntime:
    dataverse = FakeDataverse(pages=jane_page(), request_answer={"UserId": JANE.systemuserid})
    return FakeRuntime(dataverse=dataverse)


def diagnose(
    runtime: FakeRuntime | None = None,
    *,
    settings_error: SyncError | None = None,
    identity_error: SyncError | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    runtime = runtime or healthy_runtime()

    def settings_factory() -> Settings:
        if settings_error is not None:
            raise settings_error
        return settings()

    def identity(_: Settings) -> str:
        if identity_error is not None:
            raise identity_error
        return "token for Key Vault issued to identity mi"

    return run_diagnostics(
        settings_factory,
        runtime_factory=lambda _: runtime,
        identity_check=identity,
        **kwargs,  # type: ignore[arg-type, return-value]
    )


def step(result: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in result["steps"] if s["name"] == name)
    return found


def test_healthy_chain() -> None:
    runtime = healthy_runtime()
    result = diagnose(runtime)
    assert result["ok"] is True
    assert [s["name"] for s in result["steps"]] == list(STEPS)
    for s in result["steps"]:
        assert s["ok"] is True and s["fix"] is None and isinstance(s["ms"], float) and s["skipped"] is False
    assert runtime.secrets.reads == ["dataverse-client-secret", "webhook-signing-secret"]
    assert APP_USER in step(result, "dataverse_whoami")["detail"]
    # the impersonated read carried the caller header of an enabled user other than the app user
    method, path, headers = runtime.dataverse.requests[-1]
    assert (method, path, headers) == ("GET", "WhoAmI", {"CallerObjectId": JANE.azure_ad_object_id})
    _, users_path, params = runtime.dataverse.requests[0]
    assert users_path == "systemusers" and f"systemuserid ne {APP_USER}" in params["$filter"]
    assert runtime.closed


def test_token_claims_are_shown_but_never_the_token() -> None:
    result = diagnose()
    detail = step(result, "entra_token")["detail"]
    assert "https://contoso.crm4.dynamics.com" in detail
    assert FakeTokens().token not in json.dumps(result)


def test_no_secret_is_ever_returned_even_inside_an_error_message() -> None:
    logs.register_secret(SECRET)
    runtime = healthy_runtime()
    runtime.tokens = FakeTokens(
        fail=AuthError(f"Entra refused client_secret={SECRET}", code="entra_invalid_client")
    )
    text = json.dumps(diagnose(runtime))
    assert SECRET not in text and WEBHOOK_KEY not in text
    assert "7000215" in text


def test_missing_setting_names_it_and_skips_the_rest() -> None:
    result = diagnose(
        settings_error=ConfigurationError("DATAVERSE_URL", "is required", code="setting_missing")
    )
    assert result["ok"] is False
    first = step(result, "settings")
    assert first["ok"] is False and "DATAVERSE_URL" in first["detail"] and "DATAVERSE_URL" in first["fix"]
    rest = result["steps"][1:]
    assert [s["name"] for s in rest] == list(STEPS[1:])
    assert all(s["skipped"] and not s["ok"] and "settings failed" in s["detail"] for s in rest)


@pytest.mark.parametrize(
    ("where", "error", "fix_words"),
    [
        (
            "identity",
            AuthError("no MI", code="managed_identity_not_configured"),
            ["managed identity", "AZURE_CLIENT_ID"],
        ),
        ("secret", AuthError("403", code="keyvault_forbidden", status=403), ["Key Vault Secrets User"]),
        (
            "secret",
            AuthError("404", code="keyvault_secret_not_found", status=404),
            ["dataverse-client-secret"],
        ),
        ("token", AuthError("bad", code="entra_invalid_client", aadsts=7000215), ["7000215", "expired"]),
        ("token", AuthError("who", code="entra_unauthorized_client", aadsts=700016), ["700016", "client id"]),
        ("token", AuthError("tenant", code="entra_invalid_tenant", aadsts=90002), ["90002", "tenant"]),
        ("whoami", DataverseError("401", status=401), ["application user"]),
        (
            "impersonation",
            DataverseError("no", status=403, dataverse_code="0x8004A110"),
            ["prvActOnBehalfOfAnotherUser"],
        ),
    ],
)
def test_each_failure_carries_its_fix(where: str, error: SyncError, fix_words: list[str]) -> None:
    runtime = healthy_runtime()
    identity_error = None
    if where == "identity":
        identity_error = error
    elif where == "secret":
        runtime.secrets = FakeSecrets(fail={"dataverse-client-secret": error})
    elif where == "token":
        runtime.tokens = FakeTokens(fail=error)
    elif where == "whoami":
        runtime.dataverse.fail = error
    else:
        runtime.dataverse.request_answer = error
    result = diagnose(runtime, identity_error=identity_error)
    assert result["ok"] is False
    failed = [s for s in result["steps"] if not s["ok"] and not s["skipped"]]
    assert len(failed) == 1
    assert error.code in failed[0]["detail"]
    for word in fix_words:
        assert word in failed[0]["fix"]
    after = result["steps"][result["steps"].index(failed[0]) + 1 :]
    assert all(s["skipped"] for s in after)


def test_webhook_secret_failure_does_not_stop_the_chain() -> None:
    runtime = healthy_runtime()
    runtime.secrets = FakeSecrets(
        fail={"webhook-signing-secret": AuthError("x", code="keyvault_secret_not_found")}
    )
    result = diagnose(runtime)
    assert result["ok"] is False
    assert step(result, "webhook_secret")["ok"] is False
    assert step(result, "impersonation")["ok"] is True and not step(result, "impersonation")["skipped"]


def test_impersonation_silently_ignored_is_a_failure() -> None:
    runtime = healthy_runtime()
    runtime.dataverse.request_answer = {"UserId": APP_USER}
    result = diagnose(runtime)
    impersonation = step(result, "impersonation")
    assert impersonation["ok"] is False and "impersonation_not_applied" in impersonation["detail"]


def test_impersonation_with_a_chosen_user_without_entra_id_uses_mscrmcallerid() -> None:
    runtime = healthy_runtime()
    runtime.dataverse.request_answer = {"UserId": JOHN.systemuserid}
    result = diagnose(runtime, act_as={"email": JOHN.email})
    assert step(result, "impersonation")["ok"] is True
    assert runtime.dataverse.requests[-1] == ("GET", "WhoAmI", {"MSCRMCallerID": JOHN.systemuserid})
    assert runtime.users.resolved == [{"email": JOHN.email}]


def test_impersonation_with_an_unknown_chosen_user() -> None:
    result = diagnose(act_as={"email": "ghost@contoso.com"})
    impersonation = step(result, "impersonation")
    assert impersonation["ok"] is False and "actor_not_found" in impersonation["detail"]


def test_no_other_user_means_not_checked() -> None:
    runtime = healthy_runtime()
    runtime.dataverse.pages = [{"value": []}]
    result = diagnose(runtime)
    impersonation = step(result, "impersonation")
    assert impersonation["ok"] is True and "not checked" in impersonation["detail"]
    assert all(r[1] != "WhoAmI" or not r[2] for r in runtime.dataverse.requests)


def test_an_unexpected_exception_is_reported_not_raised() -> None:
    runtime = healthy_runtime()
    runtime.dataverse.fail = KeyError("bug")
    result = diagnose(runtime)
    whoami = step(result, "dataverse_whoami")
    assert whoami["ok"] is False and "KeyError" in whoami["detail"]


@pytest.mark.parametrize("user_id", [None, "", "x or true", f"{APP_USER}) or (1 eq 1"])
def test_a_whoami_without_a_guid_fails_before_it_reaches_a_filter(user_id: Any) -> None:
    """The application user's id goes into the next step's $filter as a bare GUID literal."""
    runtime = healthy_runtime()
    runtime.dataverse.whoami_answer = {"UserId": user_id}
    result = diagnose(runtime)
    whoami = step(result, "dataverse_whoami")
    assert whoami["ok"] is False and "dataverse_malformed_response" in whoami["detail"]
    assert step(result, "impersonation")["skipped"] is True
    assert all(path != "systemusers" for _, path, _ in runtime.dataverse.requests)
