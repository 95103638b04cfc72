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
from tests.e2e.conftest import HostProcess, queue_texts, send_raw
from tests.e2e.test_function_app import WEBHOOK_KEY, start_app  # noqa: F401  (the fixture)

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
