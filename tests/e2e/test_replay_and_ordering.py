"""Replay and ordering attacks through the local host (issue 8): each failed before this change.

* The very same signed request, sent again within the signature's 300 s — to the same instance or to
  another one — is answered 409 ``replayed`` and enqueues nothing: the window lives in blob storage.
* An older job cannot overwrite a newer write: a job carrying ``ifMatch`` (the ETag its sender read),
  dead-lettered and replayed after a newer job wrote the record, ends ``precondition_failed`` and the
  record keeps the newer value.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest

from devstack.control import SandboxClient
from shared.replay import CONTAINER
from shared.webhooks import signature_header
from tests.e2e.conftest import HostProcess, blob_names, queue_texts
from tests.e2e.test_function_app import WEBHOOK_KEY, contact_job, post_jobs, start_app  # noqa: F401
from tools import queuectl

pytestmark = pytest.mark.e2e

SUCCEEDED = r"Executed 'Functions.sync_job' \(Succeeded"


def signed_request(jobs: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"jobs": jobs}).encode()
    headers = {"Content-Type": "application/json",
               "X-Signature": signature_header(WEBHOOK_KEY.encode(), body, int(time.time()), source="crm")}
    return body, headers


def send(host: HostProcess, body: bytes, headers: dict[str, str]) -> Any:
    return host.call("POST", "/api/webhooks/crm", data=body, headers=headers)


def test_the_same_signed_request_is_accepted_once_by_any_instance(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str  # noqa: F811
) -> None:
    body, headers = signed_request([contact_job("rp-1", "ada@example.com", "jane@contoso.com")])
    first = start_app()
    accepted = send(first, body, headers)
    assert accepted.status_code == 202, accepted.text
    again = send(first, body, headers)  # the same instance
    assert again.status_code == 409 and again.json()["error"]["code"] == "replayed", again.text
    first.wait_for(SUCCEEDED)
    assert first.stop() == 0

    second = start_app()  # another instance of the app: same queue, same storage account
    replayed = send(second, body, headers)
    assert replayed.status_code == 409 and replayed.json()["error"]["code"] == "replayed", replayed.text
    post_jobs(second, [contact_job("rp-2", "bob@example.com", "john@contoso.com")])  # a new request: fine
    second.wait_for(SUCCEEDED)
    assert second.stop() == 0  # in-flight executions finish first

    # Nothing was enqueued by the replays: one execution each, two writes, an empty queue.
    assert first.count(SUCCEEDED) == 1 and second.count(SUCCEEDED) == 1
    assert queue_texts(azurite_connection, queue_name) == []
    assert sandbox.counters()["dataverse"].get("PATCH contacts") == 2
    assert sorted(r["emailaddress1"] for r in sandbox.records("contacts")) == ["ada@example.com",
                                                                                 "bob@example.com"]
    assert len(blob_names(azurite_connection, CONTAINER)) >= 2  # <t>/<digest>, one per accepted body


def etag(record: dict[str, Any]) -> str:
    """What a sender's earlier read returned: Dataverse's W/"<rowversion>" (the emulator's too)."""
    return f'W/"{record["versionnumber"]}"'


def test_an_older_job_replayed_after_a_newer_write_is_refused(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str  # noqa: F811
) -> None:
    # The app remembers "no such user" for USER_CACHE_NEGATIVE_TTL_SECONDS: forget at once for the replay.
    host = start_app(USER_CACHE_NEGATIVE_TTL_SECONDS="0")
    post_jobs(host, [contact_job("o-0", "ada@example.com", "jane@contoso.com")])
    host.wait_for(SUCCEEDED)
    (record,) = sandbox.records("contacts")
    read = etag(record)  # both senders read this version

    # Job A, from what was read: its actor does not exist yet, so it is dead-lettered.
    job_a = {"id": "o-a", "entity": "contacts", "operation": "update", "key": record["contactid"],
             "data": {"jobtitle": "from A (older)"}, "actAs": {"email": "late@contoso.com"}, "ifMatch": read}
    post_jobs(host, [job_a])
    host.wait_for(SUCCEEDED, count=2)
    (dead,) = map(json.loads, queue_texts(azurite_connection, f"{queue_name}-deadletter"))
    assert dead["reason"] == "actor_not_found" and dead["job"]["ifMatch"] == read

    # Job B, newer, writes the record.
    job_b = {**job_a, "id": "o-b", "data": {"jobtitle": "from B (newer)"},
             "actAs": {"email": "jane@contoso.com"}}
    post_jobs(host, [job_b])
    host.wait_for(SUCCEEDED, count=3)
    assert sandbox.records("contacts")[0]["jobtitle"] == "from B (newer)"

    # A's cause is fixed and A is replayed: its If-Match no longer matches, so it writes nothing.
    sandbox.add_user("late@contoso.com", fullname="Late Joiner")
    out = io.StringIO()
    assert queuectl.main(["--connection-string", azurite_connection, "--queue", queue_name,
                          "replay", "deadletter"], out=out) == 0, out.getvalue()
    host.wait_for(SUCCEEDED, count=4)
    (again,) = map(json.loads, queue_texts(azurite_connection, f"{queue_name}-deadletter"))
    assert again["reason"] == "precondition_failed" and again["job"]["id"] == "o-a"
    (final,) = sandbox.records("contacts")
    assert final["jobtitle"] == "from B (newer)"
