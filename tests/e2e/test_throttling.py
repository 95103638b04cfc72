"""Throttling never outlives the function: through the local host, Azurite and the emulators.

The sandbox is throttled by its own service-protection window (``set_limits``), so ``Retry-After``
is what Dataverse would answer: the time until the window admits a request again.
"""

from __future__ import annotations

from typing import Any

import pytest

from devstack.control import SandboxClient
from tests.e2e.conftest import queue_texts
from tests.e2e.test_function_app import (  # noqa: F401  (start_app is the fixture)
    contact_job,
    contacts_by_email,
    post_jobs,
    start_app,
    user_id,
)

pytestmark = pytest.mark.e2e
FAILED_ON_DEADLINE = r"Exception: DeadlineExceeded: job_deadline_exceeded"
HOST_TIMEOUT = r"Timeout value of .* exceeded by function"


def test_a_throttled_job_ends_at_its_deadline_and_lands_once_when_retried(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str  # noqa: F811
) -> None:
    # Retry-After (about 30 s) is inside DATAVERSE_MAX_RETRY_SECONDS (300) but past the job's deadline
    # (3 s) and past functionTimeout (20 s): without the deadline the invocation would sleep through
    # the host's timeout and the message would come back while that copy still ran.
    host = start_app(
        JOB_DEADLINE_SECONDS="3",
        DATAVERSE_TIMEOUT_SECONDS="10",
        AzureFunctionsJobHost__functionTimeout="00:00:20",
        AzureFunctionsJobHost__extensions__queues__visibilityTimeout="00:00:02",
        # The test clears the emulator's window early (below), which the real service never does; the
        # shared throttle would rightly keep honouring the 30 s Retry-After past all five dequeues.
        DATAVERSE_SHARED_THROTTLE="false",
    )
    # the webhook's policy check (actor lookup + roles/teams read) passes; sync_job finds both cached,
    # and its WhoAmI is refused
    sandbox.set_limits(requests=2, window_seconds=30)
    post_jobs(host, [contact_job("t-1", "ada@example.com", "jane@contoso.com")])
    host.wait_for(FAILED_ON_DEADLINE)
    assert sandbox.records("contacts") == []
    assert sandbox.counters()["dataverse"]["status:429"] >= 1

    sandbox.set_limits(requests=6000, window_seconds=300)  # the throttle passes: the window is cleared
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded")

    records = contacts_by_email(sandbox)
    assert list(records) == ["ada@example.com"]  # exactly once: nothing lost, nothing duplicated
    assert records["ada@example.com"]["_createdby_value"] == user_id(sandbox, "jane@contoso.com")
    assert host.count(HOST_TIMEOUT) == 0  # every invocation ended by itself, before functionTimeout
    assert host.count(FAILED_ON_DEADLINE) == host.count(r"Executed 'Functions.sync_job' \(Failed")
    assert queue_texts(azurite_connection, f"{queue_name}-poison") == []
    assert queue_texts(azurite_connection, f"{queue_name}-deadletter") == []


def test_users_under_throttling_answers_503_with_retry_after(
    start_app: Any, sandbox: SandboxClient  # noqa: F811
) -> None:
    host = start_app()
    sandbox.set_limits(requests=1, window_seconds=120)
    assert host.call("GET", "/api/users", params={"email": "jane@contoso.com"}).status_code == 200
    # the client's own timeout (30 s) would fail this call if the trigger waited out the window
    response = host.call("GET", "/api/users", params={"email": "john@contoso.com"})
    assert response.status_code == 503
    assert 115 <= int(response.headers["Retry-After"]) <= 120
    assert response.json()["error"]["code"] == "dataverse_throttled"
    assert sandbox.counters()["dataverse"]["status:429"] == 1
