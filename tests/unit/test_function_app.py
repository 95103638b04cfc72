"""function_app: indexing (with no settings at all) and every trigger invoked with azure.functions objects."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

import function_app
import shared
from shared.errors import AuthError, DataverseError
from shared.messages import strip, verify
from shared.settings import SETTINGS
from shared.webhooks import signature_header
from tests.bindings import Out
from tests.signing import UNIT_MESSAGE_KEY, signed_text
from tests.unit.functions_fakes import DISABLED, JANE, FakeDataverse, FakeRuntime, FakeSecrets, FakeUsers

ROOT = Path(__file__).resolve().parents[2]
KEY = "webhook-KEY-value-456"

_INDEX_SCRIPT = """
import json, sys
import function_app
functions = function_app.app.get_functions()
heavy = sorted(m for m in ("requests", "azure.identity", "azure.keyvault.secrets", "shared.runtime",
                           "shared.dataverse") if m in sys.modules)
print(json.dumps({
    "functions": {f.get_function_name(): json.loads(f.get_function_json())["bindings"] for f in functions},
    "heavy": heavy,
}))
"""


@pytest.fixture(scope="module")
def indexed() -> dict[str, Any]:
    """get_functions() once, in a process with no app settings at all (it raises if called twice)."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _INDEX_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def binding(indexed: dict[str, Any], function: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(b for b in indexed["functions"][function] if b["name"] == name)
    return found


# --- indexing ------------------------------------------------------------------------------------


def test_every_function_is_indexed_without_settings(indexed: dict[str, Any]) -> None:
    assert set(indexed["functions"]) == {
        "sync_job",
        "webhook",
        "lookup_user",
        "lookup_user_any",
        "health",
        "diagnostics",
        "reconcile_users",
    }
    # nothing heavy or networked is loaded by the import: the runtime is built lazily
    assert indexed["heavy"] == []


def test_sync_job_bindings(indexed: dict[str, Any]) -> None:
    assert binding(indexed, "sync_job", "msg") == {
        "direction": "IN",
        "type": "queueTrigger",
        "name": "msg",
        "queueName": "%SYNC_QUEUE_NAME%",
        "connection": "AzureWebJobsStorage",
    }
    assert binding(indexed, "sync_job", "deadletter") == {
        "direction": "OUT",
        "type": "queue",
        "name": "deadletter",
        "queueName": "%SYNC_QUEUE_NAME%-deadletter",
        "connection": "AzureWebJobsStorage",
    }
    assert len(indexed["functions"]["sync_job"]) == 2


def test_webhook_bindings(indexed: dict[str, Any]) -> None:
    trigger = binding(indexed, "webhook", "req")
    assert (trigger["type"], trigger["route"], trigger["methods"], trigger["authLevel"]) == (
        "httpTrigger",
        "webhooks/{source}",
        ["POST"],
        "FUNCTION",
    )
    assert binding(indexed, "webhook", "jobs") == {
        "direction": "OUT",
        "type": "queue",
        "name": "jobs",
        "queueName": "%SYNC_QUEUE_NAME%",
        "connection": "AzureWebJobsStorage",
    }
    assert binding(indexed, "webhook", "$return") == {"direction": "OUT", "type": "http", "name": "$return"}


@pytest.mark.parametrize(
    ("function", "route", "level"),
    [
        ("lookup_user", "users", "FUNCTION"),
        ("health", "health", "ANONYMOUS"),
        ("diagnostics", "diagnostics", "ADMIN"),
    ],
)
def test_http_bindings(indexed: dict[str, Any], function: str, route: str, level: str) -> None:
    trigger = binding(indexed, function, "req")
    assert (
        trigger["type"],
        trigger["direction"],
        trigger["route"],
        trigger["methods"],
        trigger["authLevel"],
    ) == (
        "httpTrigger",
        "IN",
        route,
        ["GET"],
        level,
    )
    assert binding(indexed, function, "$return")["type"] == "http"


def test_reconcile_users_bindings(indexed: dict[str, Any]) -> None:
    assert binding(indexed, "reconcile_users", "timer") == {
        "direction": "IN",
        "type": "timerTrigger",
        "name": "timer",
        "schedule": "%RECONCILE_SCHEDULE%",
        "runOnStartup": False,
        "useMonitor": True,
    }
    expected = {
        "roster": ("IN", "reconciliation/roster.csv"),
        "previous": ("IN", "reconciliation/users/latest.json"),
        "snapshot": ("OUT", "reconciliation/users/latest.json"),
        "report": ("OUT", "reconciliation/reports/{DateTime}.json"),
    }
    for name, (direction, path) in expected.items():
        b = binding(indexed, "reconcile_users", name)
        assert (b["type"], b["direction"], b["path"], b["connection"], b["dataType"]) == (
            "blob",
            direction,
            path,
            "AzureWebJobsStorage",
            "STRING",
        )


def test_host_json() -> None:
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensionBundle"] == {
        "id": "Microsoft.Azure.Functions.ExtensionBundle",
        "version": "[4.*, 5.0.0)",
    }
    queues = host["extensions"]["queues"]
    assert (queues["batchSize"], queues["newBatchThreshold"], queues["maxDequeueCount"]) == (16, 8, 5)
    assert queues["messageEncoding"] == "base64" and queues["visibilityTimeout"] != "00:00:00"
    assert "functionTimeout" in host
    sampling = host["logging"]["applicationInsights"]["samplingSettings"]
    assert set(sampling["excludedTypes"].split(";")) >= {"Request", "Exception"}


def test_local_settings_example_declares_every_setting() -> None:
    example = json.loads((ROOT / "local.settings.example.json").read_text())
    values = example["Values"]
    assert example["IsEncrypted"] is False
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert {s.name for s in SETTINGS} <= set(values)
    assert all("SECRET" not in value for value in values.values())


# --- helpers for direct invocation -----------------------------------------------------------------


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    fake = FakeRuntime()
    monkeypatch.setattr("shared.runtime.get_runtime", lambda: fake)
    return fake


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real lazy runtime with an empty environment: the first trigger that needs it fails cleanly."""
    from shared.runtime import reset_runtime

    for spec in SETTINGS:
        monkeypatch.delenv(spec.name, raising=False)
    reset_runtime()
    yield
    reset_runtime()


def body_of(response: func.HttpResponse) -> Any:
    assert response.mimetype == "application/json"
    return json.loads(response.get_body())


def webhook_request(
    payload: object, *, key: str = KEY, content_type: str = "application/json", signed: bool = True
) -> func.HttpRequest:
    import time

    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": content_type}
    if signed:
        headers["X-Signature"] = signature_header(key.encode(), body, int(time.time()), source="crm")
    return func.HttpRequest(
        "POST", "/api/webhooks/crm", headers=headers, route_params={"source": "crm"}, body=body
    )


def job(i: int = 0, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"evt-{i}",
        "entity": "contacts",
        "operation": "upsert",
        "key": {"emailaddress1": f"u{i}@example.com"},
        "data": {"firstname": "Ada"},
        "actAs": {"email": "jane@contoso.com"},
    }
    base.update(overrides)
    return base


# --- webhook -------------------------------------------------------------------------------------


def test_webhook_202_enqueues_one_message_per_job(runtime: FakeRuntime) -> None:
    out = Out()
    jobs = [job(i) for i in range(3)]
    response = function_app.webhook(webhook_request({"jobs": jobs}), out)
    assert response.status_code == 202
    assert body_of(response) == {"accepted": 3, "ids": ["evt-0", "evt-1", "evt-2"]}
    messages = [json.loads(m) for m in out.value]
    assert [strip(m) for m in messages] == [{**j, "source": "crm"} for j in jobs]
    assert all(verify(m, [UNIT_MESSAGE_KEY]) and m["_auth"]["source"] == "crm" for m in messages)
    assert runtime.secrets.reads == ["webhook-signing-secret", "queue-message-signing-key"]


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({"payload": {"jobs": [job(0), job(1, operation="merge")]}}, 400, "invalid_job"),
        ({"payload": b"{oops"}, 400, "invalid_json"),
        ({"payload": job(), "signed": False}, 401, "signature_missing"),
        ({"payload": job(), "key": "wrong"}, 401, "signature_invalid"),
        ({"payload": job(data={"d": "x" * 50_000})}, 413, "job_too_large"),
        ({"payload": b"{" + b" " * (1024 * 1024) + b"}"}, 413, "payload_too_large"),
        ({"payload": job(), "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
def test_webhook_errors_enqueue_nothing(
    runtime: FakeRuntime, request_args: dict[str, Any], status: int, code: str
) -> None:
    out = Out()
    response = function_app.webhook(webhook_request(**request_args), out)
    assert response.status_code == status
    assert body_of(response)["error"]["code"] == code
    assert not out.was_set


def test_webhook_key_vault_failure_is_503(runtime: FakeRuntime) -> None:
    runtime.secrets = FakeSecrets(fail={"webhook-signing-secret": AuthError("kv", code="keyvault_forbidden")})
    out = Out()
    response = function_app.webhook(webhook_request(job()), out)
    assert response.status_code == 503
    assert body_of(response)["error"]["code"] == "signing_key_unavailable" and not out.was_set


def test_webhook_missing_setting_is_500_naming_it(no_settings: Any) -> None:
    out = Out()
    response = function_app.webhook(webhook_request(job()), out)
    assert response.status_code == 500
    error = body_of(response)["error"]
    assert error["code"] == "setting_missing" and "DATAVERSE_URL" in error["message"]
    assert "Traceback" not in response.get_body().decode() and not out.was_set


def test_unexpected_error_is_500_without_a_traceback(
    runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(function_app, "receive_webhook", boom)
    with caplog.at_level(logging.ERROR, logger="function_app"):
        response = function_app.webhook(webhook_request(job()), Out())
    assert response.status_code == 500
    text = response.get_body().decode()
    assert body_of(response)["error"]["code"] == "internal_error"
    assert "internal detail" not in text and "Traceback" not in text
    assert "RuntimeError: internal detail" in caplog.text  # the trace goes to the log only


# --- users ---------------------------------------------------------------------------------------


def users_request(email: str | None) -> func.HttpRequest:
    params = {} if email is None else {"email": email}
    return func.HttpRequest("GET", "/api/users", params=params, body=b"")


def test_lookup_user_200(runtime: FakeRuntime) -> None:
    response = function_app.lookup_user(users_request("Jane@Contoso.com"))
    assert response.status_code == 200
    assert body_of(response) == {
        "systemUserId": JANE.systemuserid,
        "email": "jane@contoso.com",
        "fullName": JANE.fullname,
        "azureAdObjectId": JANE.azure_ad_object_id,
        "isDisabled": False,
        "accessMode": 0,
    }


def test_lookup_hides_a_disabled_user_unless_asked_with_the_admin_route(runtime: FakeRuntime) -> None:
    hidden = function_app.lookup_user(users_request(DISABLED.email))
    assert hidden.status_code == 404 and body_of(hidden)["error"]["code"] == "actor_not_found"
    missing = function_app.lookup_user(users_request("nobody@contoso.com"))
    assert body_of(hidden)["error"]["message"] == body_of(missing)["error"]["message"].replace(
        "nobody@contoso.com", DISABLED.email or "")  # the same answer as for nobody
    shown = function_app.lookup_user_any(users_request(DISABLED.email))
    assert shown.status_code == 200 and body_of(shown)["isDisabled"] is True


@pytest.mark.parametrize(
    ("email", "status", "code"),
    [
        (None, 400, "invalid_email"),
        ("", 400, "invalid_email"),
        ("jane", 400, "invalid_email"),
        ("a b@c.d", 400, "invalid_email"),
        ("nobody@contoso.com", 404, "actor_not_found"),
        ("shared@contoso.com", 409, "actor_ambiguous"),
    ],
)
def test_lookup_user_errors(runtime: FakeRuntime, email: str | None, status: int, code: str) -> None:
    response = function_app.lookup_user(users_request(email))
    assert response.status_code == status
    assert body_of(response)["error"]["code"] == code


def test_lookup_user_transient_dataverse_failure_is_503(
    runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*_: Any, **__: Any) -> Any:
        raise DataverseError("unavailable", status=503)

    monkeypatch.setattr(runtime.users, "by_email", down)
    response = function_app.lookup_user(users_request("jane@contoso.com"))
    assert response.status_code == 503 and body_of(response)["error"]["code"] == "dataverse_unavailable"
    assert response.headers.get("Retry-After")


def test_lookup_user_missing_setting_is_500(no_settings: Any) -> None:
    response = function_app.lookup_user(users_request("jane@contoso.com"))
    assert response.status_code == 500 and "DATAVERSE_URL" in body_of(response)["error"]["message"]


# --- health & diagnostics -------------------------------------------------------------------------


def test_health_needs_nothing(no_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "shared.runtime.get_runtime", lambda: pytest.fail("health must not build the runtime")
    )
    response = function_app.health(func.HttpRequest("GET", "/api/health", body=b""))
    assert response.status_code == 200
    assert body_of(response) == {"status": "ok", "version": shared.__version__}


@pytest.mark.parametrize(("ok", "status"), [(True, 200), (False, 503)])
def test_diagnostics_status_follows_the_report(
    monkeypatch: pytest.MonkeyPatch, ok: bool, status: int
) -> None:
    seen: list[Any] = []

    def fake(**kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs)
        return {"ok": ok, "steps": [{"name": "settings", "ok": ok}]}

    monkeypatch.setattr(function_app, "run_diagnostics", fake)
    request = func.HttpRequest("GET", "/api/diagnostics", params={"email": "jane@contoso.com"}, body=b"")
    response = function_app.diagnostics(request)
    assert response.status_code == status and body_of(response)["ok"] is ok
    assert seen == [{"act_as": {"email": "jane@contoso.com"}, "credential": None}]


def test_diagnostics_can_walk_another_credential_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(
        function_app, "run_diagnostics", lambda **kw: seen.append(kw) or {"ok": True, "steps": []}
    )
    request = func.HttpRequest("GET", "/api/diagnostics", params={"credential": " Federated "}, body=b"")
    assert function_app.diagnostics(request).status_code == 200
    assert seen == [{"act_as": None, "credential": "federated"}]


def test_diagnostics_rejects_a_bad_email(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(function_app, "run_diagnostics", lambda **_: pytest.fail("must not run"))
    request = func.HttpRequest("GET", "/api/diagnostics", params={"email": "nope"}, body=b"")
    assert function_app.diagnostics(request).status_code == 400


def test_diagnostics_without_settings_reports_the_missing_one(no_settings: Any) -> None:
    response = function_app.diagnostics(func.HttpRequest("GET", "/api/diagnostics", body=b""))
    assert response.status_code == 503
    report = body_of(response)
    assert report["steps"][0]["name"] == "settings" and "DATAVERSE_URL" in report["steps"][0]["fix"]


# --- queue ---------------------------------------------------------------------------------------


def message(payload: object) -> QueueMessage:
    """What the worker passes: azure.functions.queue.QueueMessage (func.QueueMessage has no dequeue count).

    A job (dict) is signed as the webhook would sign it; bytes are sent as they are.
    """
    body = payload if isinstance(payload, bytes) else signed_text(payload).encode()  # type: ignore[arg-type]
    return QueueMessage(id="m1", body=body, dequeue_count=1)


def test_sync_job_success_writes_and_dead_letters_nothing(runtime: FakeRuntime) -> None:
    out = Out()
    function_app.sync_job(message(job()), out)
    assert not out.was_set
    (call,) = runtime.dataverse.calls
    assert call.caller == JANE.caller()


@pytest.mark.parametrize(
    ("payload", "setup", "reason"),
    [
        (b"not json", None, "invalid_json"),
        (job(entity="Bad"), None, "invalid_job"),
        (job(actAs={"email": "nobody@contoso.com"}), None, "actor_not_found"),
        (job(actAs={"email": DISABLED.email}), None, "actor_disabled"),
        (job(actAs={"email": "shared@contoso.com"}), None, "actor_ambiguous"),
        (job(), DataverseError("bad", status=400), "dataverse_bad_request"),
        (
            job(),
            DataverseError("no", status=403, dataverse_code="0x8004A110"),
            "impersonation_privilege_missing",
        ),
        (
            job(operation="update", key="5f2b3c1e-1111-4222-8333-944455556666"),
            DataverseError("gone", status=404, dataverse_code="0x80040217"),
            "record_not_found",
        ),
        (job(), DataverseError("etag", status=412), "precondition_failed"),
    ],
)
def test_sync_job_dead_letters_permanent_failures(
    runtime: FakeRuntime, payload: object, setup: Any, reason: str
) -> None:
    runtime.dataverse = FakeDataverse(fail=setup)
    out = Out()
    delivered = message(payload)
    function_app.sync_job(delivered, out)
    assert out.was_set
    (record,) = [json.loads(text) for text in out.value]
    assert record["reason"] == reason and set(record) == {"job", "reason", "detail", "failedAt"}
    expected_job = payload.decode() if isinstance(payload, bytes) else json.loads(delivered.get_body())
    assert record["job"] == expected_job  # the message as it came, _auth included: a replay still verifies


@pytest.mark.parametrize(
    "error",
    [
        DataverseError("busy", status=429),
        DataverseError("down", status=503),
        AuthError("kv", code="keyvault_unavailable", transient=True),
    ],
)
def test_sync_job_raises_on_transient_failures(runtime: FakeRuntime, error: Exception) -> None:
    runtime.dataverse = FakeDataverse(fail=error)
    out = Out()
    with pytest.raises(type(error)):
        function_app.sync_job(message(job()), out)
    assert not out.was_set


def test_sync_job_raises_when_settings_are_missing(no_settings: Any) -> None:
    out = Out()
    with pytest.raises(Exception, match="DATAVERSE_URL"):
        function_app.sync_job(message(job()), out)
    assert not out.was_set


# --- timer ---------------------------------------------------------------------------------------


def test_reconcile_users_writes_snapshot_and_report(
    runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot, report = Out(), Out()
    roster = func.blob.InputStream(data=b"email,externalId\njane@contoso.com,E1\nghost@contoso.com,E2\n")
    with caplog.at_level(logging.INFO):
        function_app.reconcile_users(TimerRequest(past_due=True), roster, None, snapshot, report)
    document = json.loads(snapshot.value)
    assert JANE.systemuserid in document["users"]
    parsed = json.loads(report.value)
    assert parsed["roster"]["missing"] == [{"email": "ghost@contoso.com", "externalId": "E2"}]
    assert parsed["counts"]["users"] == len(runtime.users.users)
    assert runtime.users.all_users_calls == 1 and runtime.users.primed is not None
    messages = [r.getMessage() for r in caplog.records]
    assert any("past_due" in m for m in messages)
    assert any(m.startswith("reconciliation users=") for m in messages)


def test_reconcile_users_twice_with_its_own_snapshot_changes_nothing(runtime: FakeRuntime) -> None:
    first_snapshot, first_report = Out(), Out()
    function_app.reconcile_users(TimerRequest(past_due=False), None, None, first_snapshot, first_report)
    second_snapshot, second_report = Out(), Out()
    previous = func.blob.InputStream(data=first_snapshot.value.encode())
    function_app.reconcile_users(TimerRequest(past_due=False), None, previous, second_snapshot, second_report)
    assert json.loads(second_snapshot.value)["users"] == json.loads(first_snapshot.value)["users"]
    assert all(v == [] for v in json.loads(second_report.value)["changes"].values())


def test_reconcile_users_with_a_bad_roster_raises_and_writes_nothing(runtime: FakeRuntime) -> None:
    snapshot, report = Out(), Out()
    runtime.users = FakeUsers()
    with pytest.raises(Exception, match="roster"):
        function_app.reconcile_users(TimerRequest(), "name\nx\n", None, snapshot, report)
    assert not snapshot.was_set and not report.was_set


def test_webhook_lone_surrogate_is_400_invalid_json_not_500(runtime: FakeRuntime) -> None:
    body = b'{"id":"evt-1","entity":"contacts","operation":"create","data":{"firstname":"\\ud800"}}'
    out = Out()
    response = function_app.webhook(webhook_request(body), out)
    assert response.status_code == 400
    assert body_of(response)["error"]["code"] == "invalid_json"
    assert not out.was_set


class _UnreadableRequest(func.HttpRequest):
    """A request whose body must not be read: the stand-in for a huge upload still streaming in."""

    def get_body(self) -> bytes:
        raise AssertionError("the body was read")


def test_webhook_huge_content_length_is_413_without_reading_the_body(runtime: FakeRuntime) -> None:
    req = _UnreadableRequest(
        "POST", "/api/webhooks/crm", route_params={"source": "crm"}, body=b"",
        headers={"Content-Type": "application/json", "Content-Length": str(50 * 1024 * 1024)},
    )
    out = Out()
    response = function_app.webhook(req, out)
    assert response.status_code == 413
    assert body_of(response)["error"]["code"] == "payload_too_large"
    assert not out.was_set
    assert runtime.secrets.reads == []


def test_webhook_refuses_a_body_signed_for_another_source(runtime: FakeRuntime) -> None:
    import time

    body = json.dumps(job()).encode()
    headers = {"Content-Type": "application/json",
               "X-Signature": signature_header(KEY.encode(), body, int(time.time()), source="crm")}
    request = func.HttpRequest("POST", "/api/webhooks/erp", headers=headers, route_params={"source": "erp"},
                               body=body)
    out = Out()
    response = function_app.webhook(request, out)
    assert response.status_code == 401
    assert body_of(response)["error"]["code"] == "signature_invalid"
    assert not out.was_set


# --- replay window, sealed messages, ifMatch -------------------------------------------------------


def test_webhook_replay_is_409_and_enqueues_nothing(runtime: FakeRuntime) -> None:
    request = webhook_request(job())
    first, second = Out(), Out()
    assert function_app.webhook(request, first).status_code == 202 and first.was_set
    response = function_app.webhook(request, second)  # the very same signed bytes again
    assert response.status_code == 409
    assert body_of(response)["error"]["code"] == "replayed" and not second.was_set


def test_webhook_refused_body_is_not_remembered(runtime: FakeRuntime) -> None:
    """Only an accepted body enters the window: fixing nothing and resending an invalid one is still 400."""
    request = webhook_request(job(operation="merge"))
    assert function_app.webhook(request, Out()).status_code == 400
    assert function_app.webhook(request, Out()).status_code == 400
    assert runtime.replay.seen == set()


def test_webhook_replay_store_down_is_503_with_retry_after(runtime: FakeRuntime) -> None:
    from shared.errors import ReplayStoreUnavailable

    runtime.replay.fail = ReplayStoreUnavailable("blob down")
    out = Out()
    response = function_app.webhook(webhook_request(job()), out)
    assert response.status_code == 503 and response.headers.get("Retry-After") == "5"
    assert body_of(response)["error"]["code"] == "replay_store_unavailable" and not out.was_set


def test_webhook_message_key_unavailable_is_503_and_enqueues_nothing(runtime: FakeRuntime) -> None:
    runtime.secrets = FakeSecrets(
        values={"webhook-signing-secret": KEY},
        fail={"queue-message-signing-key": AuthError("kv", code="keyvault_forbidden")},
    )
    out = Out()
    response = function_app.webhook(webhook_request(job()), out)
    assert response.status_code == 503 and not out.was_set
    assert body_of(response)["error"]["code"] == "signing_key_unavailable"
    assert runtime.replay.seen == set()  # a retry of the same request is not taken for a replay


@pytest.mark.parametrize(
    "payload",
    [
        job(),  # unsigned
        {**job(), "_auth": {"source": "crm", "t": 1, "sig": "0" * 64}},  # forged
    ],
    ids=["unsigned", "forged"],
)
def test_sync_job_dead_letters_unauthenticated_messages(
    runtime: FakeRuntime, payload: dict[str, Any]
) -> None:
    out = Out()
    function_app.sync_job(QueueMessage(id="m", body=json.dumps(payload).encode(), dequeue_count=1), out)
    (record,) = [json.loads(text) for text in out.value]
    assert record["reason"] == "unauthenticated_message" and record["job"] == payload
    assert runtime.dataverse.calls == [] and runtime.attribution.verified == []


def test_sync_job_sends_if_match(runtime: FakeRuntime) -> None:
    out = Out()
    guid = "5f2b3c1e-1111-4222-8333-944455556666"
    function_app.sync_job(message(job(operation="update", key=guid, ifMatch='W/"42"')), out)
    assert not out.was_set
    (call,) = runtime.dataverse.calls
    assert call.if_match == 'W/"42"'
