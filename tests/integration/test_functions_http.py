"""HTTP triggers and the timer against the emulators: real Key Vault key, real lookups, real diagnostics."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import azure.functions as func
import pytest
from azure.functions.timer import TimerRequest

import function_app
from devstack.control import SandboxClient
from shared.messages import strip
from shared.webhooks import signature_header
from tests.bindings import Out

pytestmark = pytest.mark.integration


def body_of(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body())


def count(sbx: SandboxClient, service: str, key: str) -> int:
    return int(sbx.counters().get(service, {}).get(key, 0))


# --- webhook -------------------------------------------------------------------------------------


def signed_request(key: str, payload: object) -> func.HttpRequest:
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Signature": signature_header(key.encode(), body, int(time.time()), source="crm"),
    }
    return func.HttpRequest(
        "POST", "/api/webhooks/crm", headers=headers, route_params={"source": "crm"}, body=body
    )


def test_webhook_checks_the_signature_with_the_key_from_key_vault(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    key = f"whk-{uuid.uuid4().hex}"
    sbx.set_secret("webhook-signing-secret", key)
    jobs = [
        {
            "id": f"evt-{i}",
            "entity": "contacts",
            "operation": "upsert",
            "key": {"emailaddress1": f"u{i}@example.com"},
            "data": {"firstname": "A"},
        }
        for i in range(3)
    ]
    out = Out()
    response = function_app.webhook(signed_request(key, {"jobs": jobs}), out)
    assert response.status_code == 202 and body_of(response)["accepted"] == 3
    assert [strip(json.loads(m)) for m in out.value] == [{**j, "source": "crm"} for j in jobs]  # stamped
    refused = Out()
    assert function_app.webhook(signed_request("not-the-key", {"jobs": jobs}), refused).status_code == 401
    assert not refused.was_set
    # cached per instance (+1: the queue message key); a bad signature may mean a rotated key: one
    # re-read, then no more for a minute
    assert count(sbx, "keyvault", "GET secret") == 3
    assert function_app.webhook(signed_request("still-not", {"jobs": jobs}), Out()).status_code == 401
    assert count(sbx, "keyvault", "GET secret") == 3


def test_webhook_accepts_a_key_rotated_in_key_vault_without_a_restart(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    job = {"id": "evt-rot", "entity": "contacts", "operation": "upsert",
           "key": {"emailaddress1": "rot@example.com"}, "data": {"firstname": "A"}}
    sbx.set_secret("webhook-signing-secret", "old-key")
    assert function_app.webhook(signed_request("old-key", job), Out()).status_code == 202
    sbx.set_secret("webhook-signing-secret", "new-key")
    out = Out()
    # the next job (the same body at the same t would be the same request: 409 replayed)
    assert function_app.webhook(signed_request("new-key", {**job, "id": "evt-rot-2"}), out).status_code == 202
    assert out.was_set


def test_webhook_key_vault_refusal_is_503(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_keyvault_access(False)
    response = function_app.webhook(
        signed_request(
            "whatever", {"id": "a", "entity": "contacts", "operation": "delete", "key": str(uuid.uuid4())}
        ),
        Out(),
    )
    assert response.status_code == 503
    error = body_of(response)["error"]
    assert error["code"] == "signing_key_unavailable" and error["details"][0]["cause"] == "keyvault_forbidden"


# --- users ---------------------------------------------------------------------------------------


def lookup(email: str) -> func.HttpResponse:
    response: func.HttpResponse = function_app.lookup_user(
        func.HttpRequest("GET", "/api/users", params={"email": email}, body=b"")
    )
    return response


def test_lookup_user(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    response = lookup("O'Brien@contoso.com")
    assert response.status_code == 200
    found = body_of(response)
    assert found["email"].lower() == "o'brien@contoso.com"
    assert set(found) == {"systemUserId", "email", "fullName", "azureAdObjectId", "isDisabled", "accessMode"}
    assert lookup("nobody@contoso.com").status_code == 404
    assert lookup("shared@contoso.com").status_code == 409
    assert lookup("noentra@contoso.com").status_code == 200
    assert body_of(lookup("noentra@contoso.com"))["azureAdObjectId"] is None
    before = count(sbx, "dataverse", "GET systemusers")
    lookup("o'brien@contoso.com")
    assert count(sbx, "dataverse", "GET systemusers") == before  # cached


# --- diagnostics ---------------------------------------------------------------------------------


def diagnose(email: str | None = None) -> tuple[int, dict[str, Any]]:
    params = {"email": email} if email else {}
    response = function_app.diagnostics(func.HttpRequest("GET", "/api/diagnostics", params=params, body=b""))
    return response.status_code, body_of(response)


def test_diagnostics_walks_the_whole_chain(sandbox_env: SandboxClient) -> None:
    status, report = diagnose()
    assert status == 200 and report["ok"] is True, report
    assert [s["name"] for s in report["steps"]] == [
        "settings",
        "managed_identity",
        "key_vault_secret",
        "webhook_secret",
        "entra_token",
        "dataverse_whoami",
        "impersonation",
    ]
    assert "impersonated read as" in report["steps"][-1]["detail"]
    assert "CallerObjectId" in report["steps"][-1]["detail"]
    status, report = diagnose("noentra@contoso.com")
    assert status == 200 and "MSCRMCallerID" in report["steps"][-1]["detail"]


def test_diagnostics_names_a_missing_impersonation_privilege(sandbox_env: SandboxClient) -> None:
    sandbox_env.set_privilege(impersonation=False)
    status, report = diagnose()
    assert status == 503
    last = report["steps"][-1]
    assert last["name"] == "impersonation" and not last["ok"]
    assert "prvActOnBehalfOfAnotherUser" in last["fix"]


def test_diagnostics_names_a_wrong_client_secret(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_client_secret(
        f"rotated-{uuid.uuid4().hex}"
    )  # Entra's secret changed, Key Vault still holds the old
    status, report = diagnose()
    assert status == 503
    failed = next(s for s in report["steps"] if not s["ok"])
    assert failed["name"] == "entra_token" and "7000215" in failed["fix"]
    assert all(s["skipped"] for s in report["steps"][report["steps"].index(failed) + 1 :])


def test_diagnostics_names_a_key_vault_refusal(sandbox_env: SandboxClient) -> None:
    sandbox_env.set_keyvault_access(False)
    status, report = diagnose()
    failed = next(s for s in report["steps"] if not s["ok"])
    assert status == 503 and failed["name"] == "key_vault_secret"
    assert "Key Vault Secrets User" in failed["fix"]


# --- timer ---------------------------------------------------------------------------------------


def test_reconcile_users_pages_once_and_primes_the_cache(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    roster = func.blob.InputStream(
        data=b"email,externalId\njane@contoso.com,E1\ndisabled@contoso.com,E2\nshared@contoso.com,E3\n"
        b"ghost@contoso.com,E4\nnoentra@contoso.com,E5\n"
    )
    snapshot, report = Out(), Out()
    function_app.reconcile_users(TimerRequest(past_due=False), roster, None, snapshot, report)
    parsed = json.loads(report.value)
    assert [e["email"] for e in parsed["roster"]["missing"]] == ["ghost@contoso.com"]
    assert [e["email"] for e in parsed["roster"]["disabled"]] == ["disabled@contoso.com"]
    assert [e["email"] for e in parsed["roster"]["ambiguous"]] == ["shared@contoso.com"]
    assert [e["email"] for e in parsed["roster"]["noEntraId"]] == ["noentra@contoso.com"]
    assert parsed["counts"]["users"] == len(sbx.users)
    assert len(json.loads(snapshot.value)["users"]) == len(sbx.users)
    assert count(sbx, "dataverse", "GET systemusers") == 1
    # the instance's cache now knows jane: a job or a lookup costs no further query
    assert lookup("jane@contoso.com").status_code == 200
    assert count(sbx, "dataverse", "GET systemusers") == 1

    # a second run over its own snapshot reports no change; a user disabled meanwhile shows up
    jane = next(u for u in sbx.users if u["internalemailaddress"] == "jane@contoso.com")
    sbx.update_user(jane["systemuserid"], isdisabled=True)
    previous = func.blob.InputStream(data=snapshot.value.encode())
    again, again_report = Out(), Out()
    function_app.reconcile_users(TimerRequest(past_due=False), None, previous, again, again_report)
    changes = json.loads(again_report.value)["changes"]
    assert changes["disabled"] == [{"systemUserId": jane["systemuserid"], "email": "jane@contoso.com"}]
    assert changes["added"] == changes["removed"] == changes["enabled"] == changes["emailChanged"] == []
