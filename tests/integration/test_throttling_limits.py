"""HTTP triggers under Dataverse service protection (the emulator's own limits): never a long wait.

The limits are the sandbox's service-protection window (``set_limits``): the emulator answers 429
with ``Retry-After`` = the time until the window admits the request again, as Dataverse does.
"""

from __future__ import annotations

import json
import time
from typing import Any

import azure.functions as func
import pytest

import function_app
from devstack.control import SandboxClient
from shared.webhooks import signature_header
from tests.bindings import Out

pytestmark = pytest.mark.integration
WINDOW = 120  # far beyond HTTP_MAX_WAIT_SECONDS (5)


def lookup(email: str) -> func.HttpResponse:
    response: func.HttpResponse = function_app.lookup_user(
        func.HttpRequest("GET", "/api/users", params={"email": email}, body=b"")
    )
    return response


def dataverse(sbx: SandboxClient) -> dict[str, int]:
    return dict(sbx.counters().get("dataverse", {}))


def test_users_answers_503_with_dataverses_retry_after_instead_of_waiting(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_limits(requests=1, window_seconds=WINDOW)
    assert lookup("jane@contoso.com").status_code == 200  # the window's one request
    response = lookup("john@contoso.com")
    assert response.status_code == 503
    retry_after = int(response.headers["Retry-After"])
    assert WINDOW - 5 <= retry_after <= WINDOW  # the seconds Dataverse asked for, not a made-up 5
    assert json.loads(response.get_body())["error"]["code"] == "dataverse_throttled"
    counters = dataverse(sbx)
    assert counters["status:429"] == 1  # asked once, did not retry into the window


def test_users_waits_out_a_short_retry_after(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_limits(requests=1, window_seconds=2)  # Retry-After 1-2 s: within HTTP_MAX_WAIT_SECONDS
    assert lookup("jane@contoso.com").status_code == 200
    assert lookup("john@contoso.com").status_code == 200
    assert dataverse(sbx)["status:429"] == 1


def test_users_honours_a_smaller_http_max_wait(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbx = sandbox_env
    monkeypatch.setenv("HTTP_MAX_WAIT_SECONDS", "1")
    sbx.set_limits(requests=1, window_seconds=4)  # Retry-After about 4: the default 5 would wait it out
    assert lookup("jane@contoso.com").status_code == 200
    response = lookup("john@contoso.com")
    assert response.status_code == 503 and 2 <= int(response.headers["Retry-After"]) <= 4


def test_diagnostics_answers_503_with_retry_after_when_throttled(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_limits(requests=1, window_seconds=WINDOW)  # WhoAmI passes, the impersonation step is refused
    response = function_app.diagnostics(func.HttpRequest("GET", "/api/diagnostics", body=b""))
    assert response.status_code == 503
    report: dict[str, Any] = json.loads(response.get_body())
    failed = next(step for step in report["steps"] if not step["ok"])
    assert failed["name"] == "impersonation" and "dataverse_throttled" in failed["detail"]
    assert WINDOW - 5 <= int(response.headers["Retry-After"]) <= WINDOW
    assert report["retryAfter"] == int(response.headers["Retry-After"])
    assert dataverse(sbx)["status:429"] == 1


def _webhook(key: str, job: dict[str, Any]) -> tuple[func.HttpResponse, Out]:
    body = json.dumps(job).encode()
    headers = {"Content-Type": "application/json",
               "X-Signature": signature_header(key.encode(), body, int(time.time()), source="crm")}
    out = Out()
    response = function_app.webhook(
        func.HttpRequest("POST", "/api/webhooks/crm", headers=headers, route_params={"source": "crm"},
                         body=body),
        out,
    )
    return response, out


def test_the_webhook_never_waits_on_dataverse(sandbox_env: SandboxClient) -> None:
    """The authorization policy looks actors up at the webhook (issue 8): those requests are bounded by
    HTTP_MAX_WAIT_SECONDS like /api/users, and a job with no actor to check asks Dataverse nothing."""
    sbx = sandbox_env
    sbx.set_limits(requests=1, window_seconds=WINDOW)
    key = "throttle-webhook-key"
    sbx.set_secret(sbx.env["WEBHOOK_SECRET_NAME"], key)
    job = {"id": "wh-1", "entity": "contacts", "operation": "upsert",
           "key": {"emailaddress1": "ada@example.com"}, "data": {"firstname": "Ada"}}
    response, out = _webhook(key, job)
    assert response.status_code == 202 and out.was_set
    assert dataverse(sbx) == {}  # no actor: not one request

    # two actors, looked up on pool threads (which must inherit the wait limit): the window's one request
    # goes to one lookup, the rest is throttled for WINDOW seconds -> 503 at once, nothing enqueued
    batch = {"jobs": [{**job, "id": "wh-2", "actAs": {"email": "jane@contoso.com"}},
                      {**job, "id": "wh-3", "actAs": {"email": "john@contoso.com"}}]}
    response, out = _webhook(key, batch)
    assert response.status_code == 503 and not out.was_set
    assert WINDOW - 5 <= int(response.headers["Retry-After"]) <= WINDOW
    assert json.loads(response.get_body())["error"]["code"] == "dataverse_throttled"
    assert 1 <= dataverse(sbx)["status:429"] <= 3  # each throttled request asked once, none waited
