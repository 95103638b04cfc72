"""A bulk job end to end: signed webhook -> queue -> local host -> UpsertMultiple, dead-letter per record."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from devstack.control import SandboxClient
from tests.e2e.conftest import ROOT, HostProcess, StartHost, put_blob, queue_texts

pytestmark = pytest.mark.e2e
WEBHOOK_KEY = "e2e-bulk-signing-key"


@pytest.fixture
def host(start_host: StartHost, sandbox: SandboxClient, queue_name: str) -> HostProcess:
    sandbox.set_secret(sandbox.env["WEBHOOK_SECRET_NAME"], WEBHOOK_KEY)
    env = {
        **sandbox.env,
        "SYNC_QUEUE_NAME": queue_name,
        "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
        "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:00",
    }
    return start_host(app="function_app", script_root=ROOT, env=env)


def post(host: HostProcess, jobs: list[dict[str, Any]]) -> None:
    from shared.webhooks import signature_header

    body = json.dumps({"jobs": jobs}).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Signature": signature_header(WEBHOOK_KEY.encode(), body, int(time.time()), source="crm"),
    }
    response = host.call("POST", "/api/webhooks/crm", data=body, headers=headers)
    assert response.status_code == 202, response.text


def test_a_bulk_job_writes_its_records_and_dead_letters_the_bad_one(
    host: HostProcess, sandbox: SandboxClient, queue_name: str, azurite_connection: str
) -> None:
    records: list[dict[str, Any]] = [
        {"key": {"emailaddress1": f"e{i}@x.io"}, "data": {"firstname": f"E{i}"}} for i in range(300)
    ]
    records[42]["data"] = {"firstname": "E42", "colour": "red"}  # a column contacts does not have
    container = f"bulk-{uuid.uuid4().hex[:8]}"
    put_blob(
        azurite_connection,
        container,
        "in/1.json",
        json.dumps(
            [{"key": {"emailaddress1": f"b{i}@x.io"}, "data": {"firstname": "B"}} for i in range(1500)]
        ),
    )
    actor = {"email": "jane@contoso.com"}
    post(
        host,
        [
            {
                "id": "bulk-inline",
                "entity": "contacts",
                "operation": "upsert",
                "records": records,
                "actAs": actor,
            },
            {
                "id": "bulk-blob",
                "entity": "contacts",
                "operation": "upsert",
                "recordsBlob": f"{container}/in/1.json",
                "actAs": actor,
            },
        ],
    )
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=2, timeout=90)
    emails = {r["emailaddress1"] for r in sandbox.records("contacts")}
    assert len(emails) == 299 + 1500 and "e42@x.io" not in emails
    jane = next(
        u["systemuserid"] for u in sandbox.users if u.get("internalemailaddress") == "jane@contoso.com"
    )
    assert {r["_modifiedby_value"] for r in sandbox.records("contacts")} == {jane}
    (dead,) = map(json.loads, queue_texts(azurite_connection, f"{queue_name}-deadletter"))
    assert dead["bulk"] == {"job": "bulk-inline", "index": 42, "records": 300}
    assert dead["reason"] == "invalid_column"
    assert dead["job"]["id"] == "bulk-inline.42" and dead["job"]["key"] == {"emailaddress1": "e42@x.io"}
    counters = sandbox.counters()["dataverse"]
    assert counters["bulk:records"] >= 1799
    assert counters["bulk:UpsertMultiple"] < 40  # 1800 records: 1 + 3 requests, plus the bisect of one
    assert queue_texts(azurite_connection, f"{queue_name}-poison") == []
