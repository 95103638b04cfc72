"""The project's function_app end to end: local host + Azurite + the emulators (one sandbox per test)."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest

from devstack.control import SandboxClient
from shared.messages import strip
from tests.e2e.conftest import ROOT, HostProcess, StartHost, blob_names, blob_text, put_blob, queue_texts
from tools import queuectl

pytestmark = pytest.mark.e2e
WEBHOOK_KEY = "e2e-webhook-signing-key"


def user_id(sandbox: SandboxClient, email: str) -> str:
    return next(str(u["systemuserid"]) for u in sandbox.users if u.get("internalemailaddress") == email)


@pytest.fixture
def start_app(start_host: StartHost, sandbox: SandboxClient, queue_name: str) -> Any:
    sandbox.set_secret(sandbox.env["WEBHOOK_SECRET_NAME"], WEBHOOK_KEY)

    def start(**extra: str) -> HostProcess:
        env = {
            **sandbox.env,
            "SYNC_QUEUE_NAME": queue_name,
            "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
            "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:00",
            **extra,
        }
        return start_host(app="function_app", script_root=ROOT, env=env)

    return start


def post_jobs(host: HostProcess, jobs: list[dict[str, Any]], *, t: int | None = None) -> None:
    from shared.webhooks import signature_header

    body = json.dumps({"jobs": jobs}).encode()
    timestamp = int(time.time()) if t is None else t
    headers = {"Content-Type": "application/json",
               "X-Signature": signature_header(WEBHOOK_KEY.encode(), body, timestamp, source="crm")}
    response = host.call("POST", "/api/webhooks/crm", data=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == len(jobs)


def contact_job(job_id: str, email: str, actor: str) -> dict[str, Any]:
    return {"id": job_id, "entity": "contacts", "operation": "upsert", "key": {"emailaddress1": email},
            "data": {"firstname": "Ada", "lastname": "Lovelace"}, "actAs": {"email": actor}}


def contacts_by_email(sandbox: SandboxClient) -> dict[str, dict[str, Any]]:
    return {str(r.get("emailaddress1")): r for r in sandbox.records("contacts")}


def test_webhook_to_queue_to_dataverse_on_behalf_of_the_actor(
    start_app: Any, sandbox: SandboxClient
) -> None:
    host = start_app()
    post_jobs(host, [contact_job("e2e-1", "ada@example.com", "jane@contoso.com"),
                     contact_job("e2e-2", "bob@example.com", "john@contoso.com")])
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=2)
    records = contacts_by_email(sandbox)
    assert records["ada@example.com"]["_createdby_value"] == user_id(sandbox, "jane@contoso.com")
    assert records["bob@example.com"]["_createdby_value"] == user_id(sandbox, "john@contoso.com")
    assert records["ada@example.com"]["firstname"] == "Ada"


def test_permanent_failures_are_dead_lettered_with_their_reasons(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str
) -> None:
    host = start_app()
    post_jobs(host, [contact_job("dl-unknown", "a@example.com", "nobody@contoso.com"),
                     contact_job("dl-disabled", "b@example.com", "disabled@contoso.com")])
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=2)
    dead = queue_texts(azurite_connection, f"{queue_name}-deadletter")
    records = {r["job"]["id"]: r for r in map(json.loads, dead)}
    assert records["dl-unknown"]["reason"] == "actor_not_found"
    assert records["dl-disabled"]["reason"] == "actor_disabled"
    assert all(r["detail"] and r["failedAt"] for r in records.values())
    assert strip(records["dl-unknown"]["job"]) == {
        **contact_job("dl-unknown", "a@example.com", "nobody@contoso.com"), "source": "crm"}
    assert records["dl-unknown"]["job"]["_auth"]["source"] == "crm"  # kept: a replay still verifies
    assert sandbox.records("contacts") == []
    assert queue_texts(azurite_connection, f"{queue_name}-poison") == []


def test_a_persistent_503_ends_in_poison_after_five_dequeues(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str
) -> None:
    sandbox.add_fault("dataverse", path="contacts", status=503, times=1000)
    host = start_app(DATAVERSE_MAX_RETRIES="0")
    job = contact_job("p-1", "c@example.com", "jane@contoso.com")
    post_jobs(host, [job])
    host.wait_for(rf"Moved message \S+ to queue '{queue_name}-poison'", timeout=60)
    assert host.count(r"Executed 'Functions.sync_job' \(Failed") == 5
    poisoned = [json.loads(t) for t in queue_texts(azurite_connection, f"{queue_name}-poison")]
    assert [strip(p) for p in poisoned] == [{**job, "source": "crm"}]  # as enqueued: source stamped
    assert poisoned[0]["_auth"]["source"] == "crm"  # and sealed
    assert queue_texts(azurite_connection, f"{queue_name}-deadletter") == []


def test_replay_moves_a_dead_lettered_job_back_and_it_lands_once_fixed(
    start_app: Any, sandbox: SandboxClient, queue_name: str, azurite_connection: str
) -> None:
    # The app remembers "no such user" for USER_CACHE_NEGATIVE_TTL_SECONDS; replaying sooner would
    # dead-letter the job again, so this instance forgets at once.
    host = start_app(USER_CACHE_NEGATIVE_TTL_SECONDS="0")
    post_jobs(host, [contact_job("r-1", "late@example.com", "late@contoso.com")])
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded")
    assert len(queue_texts(azurite_connection, f"{queue_name}-deadletter")) == 1
    late = sandbox.add_user("late@contoso.com", fullname="Late Joiner")  # the cause, fixed
    out = io.StringIO()
    code = queuectl.main(["--connection-string", azurite_connection, "--queue", queue_name,
                          "replay", "deadletter"], out=out)
    assert code == 0, out.getvalue()
    host.wait_for(r"Executed 'Functions.sync_job' \(Succeeded", count=2)
    assert contacts_by_email(sandbox)["late@example.com"]["_createdby_value"] == late["systemuserid"]
    assert queue_texts(azurite_connection, f"{queue_name}-deadletter") == []


@pytest.mark.xdist_group("reconciliation-blobs")
def test_reconciliation_timer_writes_snapshot_and_report(
    start_app: Any, sandbox: SandboxClient, azurite_connection: str
) -> None:
    put_blob(azurite_connection, "reconciliation", "roster.csv",
             "email,externalId\njane@contoso.com,E1\nghost@contoso.com,E2\ndisabled@contoso.com,E3\n")
    before = set(blob_names(azurite_connection, "reconciliation", "reports/"))
    host = start_app()
    assert host.run_function("reconcile_users").status_code == 202
    host.wait_for(r"Executed 'Functions.reconcile_users' \(Succeeded", timeout=60)
    snapshot = json.loads(blob_text(azurite_connection, "reconciliation", "users/latest.json") or "null")
    assert snapshot is not None
    new_reports = sorted(set(blob_names(azurite_connection, "reconciliation", "reports/")) - before)
    assert new_reports, "no report written"
    report = json.loads(blob_text(azurite_connection, "reconciliation", new_reports[-1]) or "{}")
    assert set(report) >= {"generatedAt", "counts", "roster", "changes"}
    assert "ghost@contoso.com" in json.dumps(report["roster"]["missing"])
    assert "disabled@contoso.com" in json.dumps(report["roster"]["disabled"])
