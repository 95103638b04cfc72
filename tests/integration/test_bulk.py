"""Bulk jobs against the emulators (real runtime): bulk messages, $batch fallback, bisect, claim-check."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from azure.functions.queue import QueueMessage

import function_app
from devstack.control import SandboxClient, Stack
from shared.contract import deterministic_id
from shared.dataverse import Caller
from shared.errors import DataverseError
from shared.messages import strip, verify
from shared.odatabatch import BatchOperation
from shared.runtime import get_runtime
from tests.bindings import Out
from tests.signing import SOURCE, message_key, signed_for_env

pytestmark = pytest.mark.integration


def user_id(sbx: SandboxClient, email: str) -> str:
    return next(str(u["systemuserid"]) for u in sbx.users if u.get("internalemailaddress") == email)


def run(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Deliver one message through sync_job; the dead-letter records it wrote."""
    out = Out()
    function_app.sync_job(
        QueueMessage(id=str(uuid.uuid4()), body=signed_for_env(payload).encode(), dequeue_count=1), out
    )
    assert len(out.sets) <= 1
    return [json.loads(text) for text in out.value] if out.sets else []


def bulk_job(entity: str, operation: str, records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": f"bulk-{uuid.uuid4().hex[:10]}",
        "entity": entity,
        "operation": operation,
        "records": records,
        "actAs": {"email": "jane@contoso.com"},
        **extra,
    }


def dv(sbx: SandboxClient) -> dict[str, int]:
    return dict(sbx.counters().get("dataverse", {}))


def contacts(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Small records: a queue message holds 48 KiB, so 500 inline records have ~90 bytes each."""
    return [
        {"key": {"emailaddress1": f"p{i:05d}@x.io"}, "data": {"firstname": f"P{i}"}}
        for i in range(start, start + n)
    ]


def test_upsert_multiple_by_alternate_key_writes_every_record_as_the_actor(
    sandbox_env: SandboxClient,
) -> None:
    sbx = sandbox_env
    assert run(bulk_job("contacts", "upsert", contacts(500))) == []
    records = sbx.records("contacts")
    jane = user_id(sbx, "jane@contoso.com")
    assert len(records) == 500
    assert {r["_modifiedby_value"] for r in records} == {jane}
    assert {r["_modifiedonbehalfby_value"] for r in records} == {str(sbx.users[0]["systemuserid"])}
    counters = dv(sbx)
    assert counters["bulk:UpsertMultiple"] == 1  # 500 records, one request
    assert counters["bulk:records"] == 500
    assert counters["caller:CallerObjectId"] == 1  # the actor's header on the bulk request
    assert counters.get("POST $batch", 0) == 0 and counters.get("PATCH contacts", 0) == 0
    # again, now every record exists: the update path, still one request
    assert run(bulk_job("contacts", "upsert", contacts(500))) == []
    assert len(sbx.records("contacts")) == 500 and dv(sbx)["bulk:UpsertMultiple"] == 2


def test_keyless_create_multiple_delivered_twice_creates_each_record_once(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    payload = bulk_job("accounts", "create", [{"data": {"name": f"Account {i}"}} for i in range(40)])
    assert run(payload) == []
    assert dv(sbx)["bulk:CreateMultiple"] == 1
    first = {r["accountid"] for r in sbx.records("accounts")}
    assert first == {str(deterministic_id("accounts", f"{payload['id']}/{i}", SOURCE)) for i in range(40)}
    assert run(payload) == []  # at-least-once: the replay is refused as duplicates, each record a no-op
    assert {r["accountid"] for r in sbx.records("accounts")} == first


def test_update_multiple_by_primary_id(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    run(bulk_job("contacts", "upsert", contacts(5)))
    ids = sorted(r["contactid"] for r in sbx.records("contacts"))
    assert (
        run(bulk_job("contacts", "update", [{"key": i, "data": {"lastname": "Updated"}} for i in ids])) == []
    )
    assert {r["lastname"] for r in sbx.records("contacts")} == {"Updated"}
    assert dv(sbx)["bulk:UpdateMultiple"] == 1


def test_one_bad_record_among_500_is_dead_lettered_and_499_are_written(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    records = contacts(500)
    # a column the table does not have (an object value would be a deep insert, refused by the policy)
    records[137]["data"] = {"firstname": "P137", "colour": "red"}
    payload = bulk_job("contacts", "upsert", records)
    (letter,) = run(payload)
    assert letter["reason"] == "invalid_column"
    assert "colour" in letter["detail"]
    assert letter["bulk"] == {"job": payload["id"], "index": 137, "records": 500}
    assert strip(letter["job"]) == {
        "id": f"{payload['id']}.137",
        "entity": "contacts",
        "operation": "upsert",
        "key": {"emailaddress1": "p00137@x.io"},
        "data": records[137]["data"],
        "actAs": {"email": "jane@contoso.com"},
        "source": SOURCE,
    }
    assert verify(letter["job"], [message_key(sbx)])  # signed by the app: replayable as is
    written = {r["emailaddress1"] for r in sbx.records("contacts")}
    assert len(written) == 499 and "p00137@x.io" not in written
    assert {r["_modifiedby_value"] for r in sbx.records("contacts")} == {user_id(sbx, "jane@contoso.com")}
    # the bisect: far fewer requests than one per record
    assert dv(sbx)["bulk:UpsertMultiple"] < 30


def test_a_table_without_the_messages_falls_back_to_batch(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    records: list[dict[str, Any]] = [{"data": {"subject": f"Lead {i}"}} for i in range(60)]
    records[7] = {"data": {"subject": "Lead 7", "colour": "red"}}
    payload = bulk_job("leads", "create", records)
    (letter,) = run(payload)
    assert letter["bulk"]["index"] == 7 and letter["reason"] == "dataverse_bad_request"
    assert letter["job"]["key"] == str(deterministic_id("leads", f"{payload['id']}/7", SOURCE))  # replayable
    leads = sbx.records("leads")
    assert len(leads) == 59
    assert {r["_createdby_value"] for r in leads} == {user_id(sbx, "jane@contoso.com")}
    counters = dv(sbx)
    assert counters["POST $batch"] == 1 and counters["batch:requests"] == 60
    assert counters["batch:caller:CallerObjectId"] == 60  # impersonation on every request of the batch
    assert counters.get("bulk:CreateMultiple", 0) == 0
    (again,) = run(payload)  # a replay: 59 no-ops, the bad record dead-lettered again
    assert again["bulk"]["index"] == 7 and len(sbx.records("leads")) == 59


def test_batch_replay_and_delete_are_no_ops_per_record(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    payload = bulk_job("leads", "create", [{"data": {"subject": f"Lead {i}"}} for i in range(10)])
    run(payload)
    assert run(payload) == []  # 412 already there, per request
    ids = [r["leadid"] for r in sbx.records("leads")]
    delete = bulk_job("leads", "delete", [{"key": i} for i in ids])
    assert run(delete) == [] and sbx.records("leads") == []
    assert run(delete) == []  # 404 already gone, per request


def test_message_support_comes_from_sdkmessagefilters_once_per_table(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    client = get_runtime().dataverse
    assert client.supports_message("contacts", "CreateMultiple")
    assert client.supports_message("contacts", "UpsertMultiple")
    assert not client.supports_message("leads", "CreateMultiple")
    assert client.supports_message("contacts", "CreateMultiple")
    assert dv(sbx)["GET sdkmessagefilters"] == 3
    assert dv(sbx)["GET EntityDefinitions"] == 2  # contacts, leads


def test_upsert_multiple_refuses_alternate_key_columns_in_the_body_of_a_new_record(
    sandbox_env: SandboxClient,
) -> None:
    sbx = sandbox_env
    client = get_runtime().dataverse
    target = {
        "@odata.type": "Microsoft.Dynamics.CRM.contact",
        "@odata.id": "contacts(emailaddress1='k@example.com')",
        "emailaddress1": "k@example.com",
        "firstname": "K",
    }
    with pytest.raises(DataverseError) as caught:
        client.bulk_message("UpsertMultiple", "contacts", [target])
    assert (caught.value.status, caught.value.dataverse_code) == (400, "0x80040216")
    assert sbx.records("contacts") == []
    client.bulk_message(
        "UpsertMultiple", "contacts", [{k: v for k, v in target.items() if k != "emailaddress1"}]
    )
    client.bulk_message("UpsertMultiple", "contacts", [target | {"firstname": "K2"}])  # exists: tolerated
    (record,) = sbx.records("contacts")
    assert (record["emailaddress1"], record["firstname"]) == ("k@example.com", "K2")


def test_create_multiple_is_all_or_nothing_with_the_bad_record_s_own_error(
    sandbox_env: SandboxClient,
) -> None:
    sbx = sandbox_env
    client = get_runtime().dataverse
    targets = [
        {"@odata.type": "Microsoft.Dynamics.CRM.contact", "emailaddress1": f"a{i}@example.com"}
        for i in range(5)
    ]
    targets[3]["emailaddress1"] = "a1@example.com"  # the alternate key of record 1 again
    with pytest.raises(DataverseError) as caught:
        client.bulk_message("CreateMultiple", "contacts", targets)
    assert (caught.value.status, caught.value.dataverse_code) == (412, "0x80060892")
    assert sbx.records("contacts") == []  # records 0-2 were rolled back
    with pytest.raises(DataverseError) as missing_type:
        client.bulk_message("CreateMultiple", "contacts", [{"emailaddress1": "t@example.com"}])
    assert missing_type.value.status == 400
    with pytest.raises(DataverseError) as unsupported:
        client.bulk_message("CreateMultiple", "leads", [{"@odata.type": "Microsoft.Dynamics.CRM.lead"}])
    assert unsupported.value.status == 400


def test_a_change_set_is_atomic_and_answers_per_content_id(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    client = get_runtime().dataverse
    ok = [
        BatchOperation(
            "PATCH", client.url(f"contacts(emailaddress1='c{i}%40example.com')"), {"firstname": "C"}
        )
        for i in range(3)
    ]
    parts = client.batch(ok, change_set=True, continue_on_error=False)
    assert [(p.status, p.content_id) for p in parts] == [(204, "1"), (204, "2"), (204, "3")]
    assert len(sbx.records("contacts")) == 3
    bad = [
        BatchOperation("PATCH", client.url("contacts(emailaddress1='d%40example.com')"), {"firstname": "D"}),
        BatchOperation("PATCH", client.url("contacts(emailaddress1='e%40example.com')"), {"firstname": [1]}),
    ]
    with pytest.raises(DataverseError) as caught:
        client.batch(bad, change_set=True, continue_on_error=False)
    assert caught.value.status == 400  # the batch answers with the failing request's status
    assert len(sbx.records("contacts")) == 3  # the first request of the change set was rolled back


def test_batch_applies_the_outer_caller_and_counts_once_for_service_protection(
    sandbox_env: SandboxClient,
) -> None:
    sbx = sandbox_env
    client = get_runtime().dataverse
    jane = next(u for u in sbx.users if u.get("internalemailaddress") == "jane@contoso.com")
    sbx.set_limits(requests=3)
    ops = [
        BatchOperation(
            "PATCH", client.url(f"contacts(emailaddress1='b{i}%40example.com')"), {"firstname": "B"}
        )
        for i in range(200)
    ]
    parts = client.batch(ops, caller=Caller(jane["systemuserid"], jane["azureactivedirectoryobjectid"]))
    assert {p.status for p in parts} == {204}
    assert {r["_createdby_value"] for r in sbx.records("contacts")} == {jane["systemuserid"]}
    assert dv(sbx).get("status:429", 0) == 0  # 200 writes, one request against a limit of 3


def test_a_claim_check_blob_carries_a_batch_larger_than_a_queue_message(
    sandbox_env: SandboxClient, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.storage.blob import BlobServiceClient

    sbx = sandbox_env
    connection = stack.azurite["connection_string"]
    monkeypatch.setenv("AzureWebJobsStorage", connection)
    container = f"bulk-{uuid.uuid4().hex[:8]}"
    service = BlobServiceClient.from_connection_string(connection)
    service.create_container(container)
    text = json.dumps(contacts(1200))
    assert len(text) > 48 * 1024
    service.get_blob_client(container, "batches/one.json").upload_blob(text)
    job = {
        "id": "blob-1",
        "entity": "contacts",
        "operation": "upsert",
        "recordsBlob": f"{container}/batches/one.json",
        "actAs": {"email": "jane@contoso.com"},
    }
    assert run(job) == []
    assert len(sbx.records("contacts")) == 1200 and dv(sbx)["bulk:UpsertMultiple"] == 3
    (letter,) = run(job | {"recordsBlob": f"{container}/missing.json"})
    assert letter["reason"] == "invalid_job" and "no blob" in letter["detail"]
