"""Two local Functions hosts, one queue, one sandbox with service protection on: one 429, one budget.

Host A serves ``/api/users`` and fills the sandbox's request window (1 request per ``WINDOW`` s) until
Dataverse answers 429; A writes "throttled until" into ``dataverse-throttle/<host>/<client id>.json``
in the shared storage account (Azurite).  Then jobs go onto the queue both hosts listen to.  Host B
has never been throttled itself: it must learn the window from the blob and leave the job unsent
(its wait budget, ``DATAVERSE_MAX_RETRY_SECONDS``, is shorter than the window, so it says so in its
log and the queue redelivers the message) instead of sending into the window and being refused.

Proof without timing: the host's own log lines (a refusal "(shared window) ... not sent" in B's log,
written only after B decided not to send) and the emulator's ``status:429`` counter, read right
then.  The window (``WINDOW`` s) is only a margin for B to pick up a message, never an assertion.
The control runs the same with ``DATAVERSE_SHARED_THROTTLE=false``: B then sends into the window
and the emulator counts a second 429.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from typing import Any

import pytest

from devstack.control import SandboxClient
from shared.throttle import CONTAINER, blob_name
from tests.e2e.conftest import ROOT, HostProcess, StartHost, blob_text, queue_texts, send_raw
from tests.signing import message_key, signed_text

pytestmark = pytest.mark.e2e
WINDOW = 15  # seconds; the margin for B to take a message while the window is open
JOBS = 6
SUCCEEDED = r"Executed 'Functions.sync_job' \(Succeeded"
NOT_SENT = r"\(shared window\), beyond this request's wait budget; not sent"
RECEIVED_429 = r"answered 429 \(code 0x80072322\)|: 429 \(0x80072322\); giving up"


def start_pair(start_host: StartHost, sandbox: SandboxClient, queue_name: str,
               shared: str) -> tuple[HostProcess, HostProcess]:
    env = {
        **sandbox.env,
        "SYNC_QUEUE_NAME": queue_name,
        "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
        "DATAVERSE_SHARED_THROTTLE": shared,
        # a job does not wait out the window in process: it fails unsent, the queue redelivers it
        "DATAVERSE_MAX_RETRY_SECONDS": "2",
        # one job at a time per host, redelivered after 1 s, never poisoned by the window's refusals
        "AzureFunctionsJobHost__extensions__queues__batchSize": "1",
        "AzureFunctionsJobHost__extensions__queues__newBatchThreshold": "0",
        "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:01",
        "AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "100",
        "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:01",
    }
    return (start_host(app="function_app", script_root=ROOT, env=env),
            start_host(app="function_app", script_root=ROOT, env=env))


def throttle_a_through_http(a: HostProcess, sandbox: SandboxClient) -> None:
    """One request per window: A's first lookup passes, its second is refused (429 -> HTTP 503)."""
    sandbox.set_limits(requests=1, window_seconds=WINDOW)
    sandbox.reset_counters()
    assert a.call("GET", "/api/users", params={"email": "jane@contoso.com"}).status_code == 200
    response = a.call("GET", "/api/users", params={"email": "john@contoso.com"})
    assert response.status_code == 503, response.text
    assert sandbox.counters()["dataverse"]["status:429"] == 1


def enqueue(azurite_connection: str, queue_name: str, sandbox: SandboxClient, prefix: str) -> list[str]:
    """Signed like the webhook's messages (sync_job dead-letters unsigned ones)."""
    names = [f"{prefix}-{i}" for i in range(JOBS)]
    key = message_key(sandbox)
    for name in names:
        job = {"id": name, "entity": "contacts", "operation": "create",
               "data": {"firstname": "Ada", "lastname": name}, "actAs": {"email": "jane@contoso.com"}}
        text = signed_text(job, key, source="crm")
        send_raw(azurite_connection, queue_name, base64.b64encode(text.encode()).decode())
    return names


def test_after_one_hosts_429_the_other_host_sends_nothing_into_the_window(
    start_host: StartHost, sandbox: SandboxClient, queue_name: str, azurite_connection: str
) -> None:
    a, b = start_pair(start_host, sandbox, queue_name, "auto")
    throttle_a_through_http(a, sandbox)
    state = shared_state(sandbox, azurite_connection)
    assert state["cut"] == 1 and state["reason"] == "0x80072322"  # A published the window

    names = enqueue(azurite_connection, queue_name, sandbox, f"st-{uuid.uuid4().hex[:6]}")
    b.wait_for(NOT_SENT)  # B learned A's window from the blob and left its job unsent
    # Read while B's refusal is fresh (WINDOW s before either host may send again): B sent nothing
    # into the window, so the emulator has refused A's one request and no other.
    assert sandbox.counters()["dataverse"]["status:429"] == 1
    assert b.count(RECEIVED_429) == 0
    assert a.count(RECEIVED_429) == 1  # the /api/users lookup's; A's queue jobs honoured its window

    sandbox.set_limits(requests=6000, window_seconds=300)  # room for every job once the window ends
    wait_for_total([a, b], SUCCEEDED, JOBS)
    created = [r["lastname"] for r in sandbox.records("contacts")]
    assert sorted(created) == sorted(names)  # 0 lost, 0 duplicates (creates without a key)
    assert a.count(SUCCEEDED) + b.count(SUCCEEDED) == JOBS
    assert sandbox.counters()["dataverse"]["status:429"] == 1  # and none after the window either
    for suffix in ("", "-poison", "-deadletter"):
        assert queue_texts(azurite_connection, f"{queue_name}{suffix}") == []
    state = shared_state(sandbox, azurite_connection)
    assert state["cut"] == 1  # one episode
    assert len(heartbeats(sandbox, azurite_connection)) == 2  # both hosts beat beside it


def test_control_without_the_shared_throttle_the_other_host_is_refused_too(
    start_host: StartHost, sandbox: SandboxClient, queue_name: str, azurite_connection: str
) -> None:
    a, b = start_pair(start_host, sandbox, queue_name, "false")
    throttle_a_through_http(a, sandbox)
    enqueue(azurite_connection, queue_name, sandbox, f"sc-{uuid.uuid4().hex[:6]}")
    b.wait_for(RECEIVED_429)  # B knew nothing of A's window: it sent into it
    assert sandbox.counters()["dataverse"]["status:429"] >= 2
    assert b.count(NOT_SENT) == 0


def shared_state(sandbox: SandboxClient, azurite_connection: str) -> dict[str, Any]:
    name = blob_name(sandbox.env["DATAVERSE_URL"], sandbox.env["DATAVERSE_CLIENT_ID"])
    state: dict[str, Any] = json.loads(blob_text(azurite_connection, CONTAINER, name) or "{}")
    return state


def heartbeats(sandbox: SandboxClient, azurite_connection: str) -> list[str]:
    from azure.storage.blob import ContainerClient

    prefix = blob_name(sandbox.env["DATAVERSE_URL"], sandbox.env["DATAVERSE_CLIENT_ID"]).removesuffix(".json")
    container = ContainerClient.from_connection_string(azurite_connection, CONTAINER)
    return [item.name for item in container.list_blobs(name_starts_with=f"{prefix}/instances/")]


def wait_for_total(hosts: list[HostProcess], pattern: str, count: int, timeout: float = 60.0) -> None:
    """Until the hosts' logs together hold ``count`` lines matching ``pattern`` (each waits in turn)."""
    deadline = time.monotonic() + timeout
    while sum(h.count(pattern) for h in hosts) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} lines matching {pattern!r} in all:\n"
                                 + "\n----\n".join(h.log for h in hosts))
        for host in hosts:
            with contextlib.suppress(AssertionError):
                host.wait_for(pattern, count=host.count(pattern) + 1, timeout=0.5)
