"""Attacks on the webhook and the queue, through the local host + Azurite + the Dataverse emulator.

One host per test is the expensive part, so each test groups the attacks that need the same host.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from devstack.control import SandboxClient
from shared.webhooks import signature_header
from tests.e2e.conftest import MASTER_KEY, HostProcess, queue_texts, send_raw
from tests.e2e.test_function_app import WEBHOOK_KEY, start_app  # noqa: F401  (the fixture)
from tests.signing import signed_for

pytestmark = pytest.mark.e2e


def post(host: HostProcess, source: str, body: bytes, *, signed_for: str | None = None,
         t: int | None = None) -> Any:
    timestamp = int(time.time()) if t is None else t
    signature = signature_header(WEBHOOK_KEY.encode(), body, timestamp, source=signed_for or source)
    return host.call("POST", f"/api/webhooks/{source}", data=body,
                     headers={"Content-Type": "application/json", "X-Signature": signature})


def keyless_create(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "entity": "contacts", "operation": "create",
            "data": {"firstname": "Ada", "lastname": job_id}}


def test_webhook_attacks_are_refused_and_enqueue_nothing(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str  # noqa: F811
) -> None:
    host = start_app()
    surrogate = b'{"id":"a-1","entity":"contacts","operation":"create","data":{"firstname":"\\ud800"}}'
    response = post(host, "crm", surrogate)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"

    other_source = post(host, "erp", json.dumps(keyless_create("a-2")).encode(), signed_for="crm")
    assert other_source.status_code == 401
    assert other_source.json()["error"]["code"] == "signature_invalid"

    huge = b'{"id":"a-3","entity":"contacts","operation":"create","data":{"x":"' + b"y" * 2**20 + b'"}}'
    too_large = post(host, "crm", huge)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "payload_too_large"

    assert queue_texts(azurite_connection, queue_name) == []
    assert sandbox.records("contacts") == []


def test_same_job_id_from_two_sources_makes_two_records_and_a_surrogate_is_dead_lettered(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str  # noqa: F811
) -> None:
    host = start_app()
    job = keyless_create("same-id")
    now = int(time.time())
    # crm sends its job again later (a new signature: the very same request would be 409 replayed)
    for source, t in (("crm", now - 2), ("erp", now - 1), ("crm", now)):
        response = post(host, source, json.dumps(job).encode(), t=t)
        assert response.status_code == 202, response.text
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=3, timeout=60)
    records = sandbox.records("contacts")
    assert queue_texts(azurite_connection, f"{queue_name}-deadletter") == []
    assert len(records) == 2  # crm's replay is a no-op; erp's job is its own record

    poisoned = b'{"id":"q-1","entity":"contacts","operation":"create","data":{"firstname":"\\udfff"}}'
    send_raw(azurite_connection, queue_name, base64.b64encode(poisoned).decode())
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=4, timeout=60)
    (dead,) = map(json.loads, queue_texts(azurite_connection, f"{queue_name}-deadletter"))
    assert dead["reason"] == "invalid_json" and "surrogate" in dead["detail"]
    assert queue_texts(azurite_connection, f"{queue_name}-poison") == []
    assert len(sandbox.records("contacts")) == 2


# --- the authorization policy ----------------------------------------------------------------------

POLICY = {"sources": {
    "crm": {"entities": {"contacts": {"operations": "*",
                                      "columns": ["firstname", "lastname", "emailaddress1"]}},
            "actAs": {"anyPerson": True}},
    "erp": {"entities": {"contacts": {"operations": "*", "columns": "*"}},
            "actAs": {"users": ["jane@contoso.com"]}},
}}


ACCOUNT = "/accounts(00000000-0000-4000-8000-000000000001)"


def policy_attacks(jane_id: str) -> list[tuple[str, dict[str, Any], str]]:
    """(source, job, the field the refusal names): what a holder of the webhook key tries."""
    def create(job_id: str, actor: str, **data: Any) -> dict[str, Any]:
        return {"id": job_id, "entity": "contacts", "operation": "create",
                "data": {"firstname": "Mallory", **data}, "actAs": {"email": actor}}

    return [
        ("crm", create("p-admin", "john@contoso.com"), "actAs"),  # john holds System Administrator
        ("erp", create("p-outsider", "o'brien@contoso.com"), "actAs"),  # erp may act only as jane
        ("crm", {"id": "p-system", "entity": "systemusers", "operation": "update", "key": jane_id,
                 "data": {"isdisabled": True}, "actAs": {"email": "jane@contoso.com"}}, "entity"),
        ("crm", create("p-column", "jane@contoso.com", description="not allowed"), "data.description"),
        ("crm", create("p-bind", "jane@contoso.com", **{"parentcustomerid_account@odata.bind": ACCOUNT}),
         "data.parentcustomerid_account@odata.bind"),
        ("crm", create("p-deep", "jane@contoso.com", parentcustomerid_account={"name": "Deep insert"}),
         "data.parentcustomerid_account"),  # would create an account: a table crm may not write
    ]


def test_what_the_policy_forbids_is_refused_at_the_webhook_and_dead_lettered_from_the_queue(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str  # noqa: F811
) -> None:
    users = {u["internalemailaddress"]: str(u["systemuserid"]) for u in sandbox.list_users()}
    sandbox.set_user_roles(users["john@contoso.com"], [sandbox.role_id("System Administrator")])
    host = start_app(AUTHORIZATION_POLICY=json.dumps(POLICY))
    attacks = policy_attacks(users["jane@contoso.com"])

    for source, job, field in attacks:
        response = post(host, source, json.dumps(job).encode())
        assert response.status_code == 403, (job["id"], response.text)
        error = response.json()["error"]
        assert error["code"] == "forbidden_by_policy" and [d["field"] for d in error["details"]] == [field]
    crm = [job for source, job, _ in attacks if source == "crm"]
    fine = {**keyless_create("p-fine"), "actAs": {"email": "jane@contoso.com"}}
    batch = post(host, "crm", json.dumps({"jobs": [fine, *crm]}).encode())
    assert batch.status_code == 403  # all or nothing: the allowed job is not enqueued either
    assert [d["field"] for d in batch.json()["error"]["details"]] == [
        f"jobs[{i + 1}].{field}" for i, (_, _, field) in enumerate(a for a in attacks if a[0] == "crm")]
    assert queue_texts(azurite_connection, queue_name) == []

    # the same jobs put on the queue directly (stamped with their source and signed, as the webhook would:
    # the policy is enforced again at sync_job, not only at the webhook)
    for source, job, _ in attacks:
        stamped = signed_for(sandbox, job, source=source).encode()
        send_raw(azurite_connection, queue_name, base64.b64encode(stamped).decode())
    allowed = signed_for(sandbox, fine, source="crm").encode()
    send_raw(azurite_connection, queue_name, base64.b64encode(allowed).decode())
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=len(attacks) + 1, timeout=60)
    dead = [json.loads(t) for t in queue_texts(azurite_connection, f"{queue_name}-deadletter")]
    assert sorted((d["job"]["id"], d["reason"]) for d in dead) == sorted(
        (job["id"], "forbidden_by_policy") for _, job, _ in attacks)
    (record,) = sandbox.records("contacts")  # only the allowed job was written
    assert record["firstname"] == "Ada"
    jane = next(u for u in sandbox.list_users() if u["internalemailaddress"] == "jane@contoso.com")
    assert jane["isdisabled"] is False
    assert sandbox.counters()["dataverse"].get("PATCH systemusers", 0) == 0

    # /api/users does not reveal a disabled user to a function key; /api/users/any needs the admin key
    hidden = host.call("GET", "/api/users", params={"email": "disabled@contoso.com"})
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "actor_not_found"
    assert host.call("GET", "/api/users/any", params={"email": "disabled@contoso.com"}).status_code == 401
    shown = host.call("GET", "/api/users/any", params={"email": "disabled@contoso.com"}, key=MASTER_KEY)
    assert shown.status_code == 200 and shown.json()["isDisabled"] is True
