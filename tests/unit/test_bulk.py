"""Bulk jobs without a network: the records schema, the $batch wire format, bisect and per-record outcomes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
import responses

from shared.bulk import BulkRecord, write_bulk
from shared.contract import deterministic_id, parse_job, parse_message
from shared.dataverse import Caller, DataverseClient
from shared.errors import DataverseError, InvalidJob
from shared.jobs import record_job
from shared.odatabatch import BatchOperation, build, parse
from shared.settings import Settings

ORG = "https://org.crm.dynamics.com"
API = f"{ORG}/api/data/v9.2/"
SETTINGS = Settings(
    dataverse_url=ORG,
    tenant_id="11111111-2222-3333-4444-555555555555",
    client_id="66666666-7777-8888-9999-000000000000",
    key_vault_url="https://kv.local.test",
    max_retries=0,
)
ACTOR = "aaaaaaaa-0000-0000-0000-000000000001"
ACTOR_OID = "bbbbbbbb-0000-0000-0000-000000000001"


class Tokens:
    def get_token(self) -> str:
        return "token"

    def invalidate(self, token: str) -> None:
        pass


def client() -> DataverseClient:
    return DataverseClient(SETTINGS, Tokens(), session=requests.Session(), sleep=lambda _: None)  # type: ignore[arg-type]


def bulk(records: list[Any], **extra: Any) -> dict[str, Any]:
    return {"id": "b-1", "entity": "contacts", "operation": "upsert", "records": records, **extra}


# --- schema ---------------------------------------------------------------------------------------


def problems(obj: object) -> list[dict[str, Any]]:
    with pytest.raises(InvalidJob) as caught:
        parse_job(obj)
    return list(caught.value.details)


def test_a_bulk_job_parses_its_records() -> None:
    job = parse_job(
        bulk(
            [
                {"key": {"emailaddress1": "a@x.io"}, "data": {"firstname": "A"}},
                {"key": "AAAAAAAA-0000-0000-0000-000000000001", "data": {"firstname": "B"}},
            ]
        )
    )
    assert job.is_bulk and job.key is None and job.data is None
    assert job.records == (
        {"key": {"emailaddress1": "a@x.io"}, "data": {"firstname": "A"}},
        {"key": "aaaaaaaa-0000-0000-0000-000000000001", "data": {"firstname": "B"}},
    )
    assert parse_job(bulk([{"data": {"name": "x"}}], operation="create")).records == (
        {"data": {"name": "x"}},
    )


def test_record_problems_name_their_paths_all_at_once() -> None:
    records: list[Any] = [{"key": {"emailaddress1": "a@x.io"}, "data": {"firstname": "A"}}] * 20
    records = list(records)
    records[3] = {"data": {"firstname": "no key"}}
    records[17] = {"key": "not-a-guid", "data": {}, "extra": 1}
    records[19] = "text"
    assert problems(bulk(records)) == [
        {"field": "records[3].key", "message": "is required for upsert"},
        {"field": "records[17].extra", "message": "unknown field (allowed: key, data)"},
        {"field": "records[17].key", "message": "a string key must be the record's primary id (a GUID)"},
        {"field": "records[17].data", "message": "must not be empty"},
        {"field": "records[19]", "message": "must be an object with key and data, got a string"},
    ]
    assert problems(bulk([{"key": 1, "data": {"a": 1}}]))[0]["field"] == "records[0].key"
    assert problems(
        bulk([{"key": "aaaaaaaa-0000-0000-0000-000000000001", "data": {"a": 1}}], operation="delete")
    )[0] == {"field": "records[0].data", "message": "must be absent for delete"}


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ({"records": []}, "records", "must hold 1 to 1000 records (more: use recordsBlob), got 0"),
        (
            {"records": [{"data": {"a": 1}, "key": "aaaaaaaa-0000-0000-0000-000000000001"}] * 1001},
            "records",
            "must hold 1 to 1000 records (more: use recordsBlob), got 1001",
        ),
        ({"records": {"a": 1}}, "records", "must be an array of records, got an object"),
        (
            {"recordsBlob": "Bad_Container/x.json"},
            "recordsBlob",
            "must be '<container>/<blob path>' (container: 3-63 of a-z 0-9 -)",
        ),
        (
            {"recordsBlob": "azure-webjobs-secrets/host.json"},
            "recordsBlob",
            "must not name the Functions host's own containers (azure-webjobs-*)",
        ),
        (
            {"recordsBlob": "reconciliation/roster.csv"},
            "recordsBlob",
            "must not name the app's own state containers (reconciliation, webhook-replay, "
            "dataverse-throttle, config); claim-checks go to bulk-records",
        ),
        (
            {"recordsBlob": "batches/x.json", "records": [{"a": 1}]},
            "recordsBlob",
            "give records or recordsBlob, not both",
        ),
        (
            {"recordsBlob": "batches/x.json", "key": "aaaaaaaa-0000-0000-0000-000000000001"},
            "recordsBlob",
            "a bulk job has no top-level key or data (each record has its own): give one or the other",
        ),
    ],
)
def test_bulk_fields_are_strict(extra: dict[str, Any], field: str, message: str) -> None:
    job = {"id": "b-1", "entity": "contacts", "operation": "upsert", **extra}
    assert {"field": field, "message": message} in problems(job)


def test_paths_carry_the_webhook_batch_position() -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(bulk([{"key": 1, "data": {"a": 1}}]), where="jobs[2]")
    assert caught.value.details[0]["field"] == "jobs[2].records[0].key"


def test_a_message_over_48_kib_must_use_the_claim_check() -> None:
    records = [
        {"key": {"emailaddress1": f"p{i:05d}@example.com"}, "data": {"firstname": "x" * 40}}
        for i in range(600)
    ]
    with pytest.raises(InvalidJob) as caught:
        parse_message(json.dumps(bulk(records)))
    assert caught.value.code == "job_too_large"
    assert parse_message(json.dumps(bulk(records[:300]))).is_bulk


def test_a_failed_record_becomes_a_replayable_single_job() -> None:
    job = parse_job(
        {
            "id": "b-9",
            "entity": "accounts",
            "operation": "create",
            "source": "crm",
            "actAs": {"email": "jane@contoso.com"},
            "records": [{"data": {"name": "A"}}],
        }
    )
    single = record_job(job, 0, {"data": {"name": "A"}})
    assert single == {
        "id": "b-9.0",
        "entity": "accounts",
        "operation": "create",
        "key": str(deterministic_id("accounts", "b-9/0", "crm")),
        "data": {"name": "A"},
        "actAs": {"email": "jane@contoso.com"},
        "source": "crm",
    }
    assert not parse_job(single).is_bulk  # a valid single-record job: replay it from the dead-letter queue
    assert (
        len(
            record_job(
                parse_job(
                    bulk([{"key": "aaaaaaaa-0000-0000-0000-000000000001", "data": {"a": 1}}], id="x" * 128)
                ),
                999,
                {"key": "k"},
            )["id"]
        )
        == 128
    )


# --- $batch wire format ---------------------------------------------------------------------------


def test_a_batch_body_holds_one_http_request_per_part() -> None:
    ops = [
        BatchOperation("PATCH", f"{API}contacts(1)", {"a": 1}, {"If-Match": "*"}),
        BatchOperation("DELETE", f"{API}contacts(2)"),
    ]
    content_type, body = build(ops, boundary="batch_X")
    assert content_type == "multipart/mixed; boundary=batch_X"
    assert body.decode() == (
        "--batch_X\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"PATCH {API}contacts(1) HTTP/1.1\r\nIf-Match: *\r\n"
        "Content-Type: application/json; type=entry\r\n\r\n"
        '{"a":1}\r\n'
        "--batch_X\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"DELETE {API}contacts(2) HTTP/1.1\r\n\r\n"
        "--batch_X--\r\n"
    )
    _, change_set = build(ops, change_set=True)
    assert change_set.count(b"Content-ID: ") == 2 and b"boundary=changeset_" in change_set
    with pytest.raises(ValueError, match="at most 1000"):
        build([ops[0]] * 1001)
    with pytest.raises(ValueError, match="line break"):
        build([BatchOperation("GET", "x", None, {"X": "a\r\nInjected: 1"})])


# Learn, "Execute batch operations using the Web API" (the continue-on-error example, CRLF line ends)
LEARN_RESPONSE = """--batchresponse_f44bd09d
Content-Type: application/http
Content-Transfer-Encoding: binary

HTTP/1.1 400 Bad Request
REQ_ID: de4c5227
Content-Type: application/json; odata.metadata=minimal
OData-Version: 4.0

{"error":{"code":"0x80044331","message":"A validation error occurred."}}
--batchresponse_f44bd09d
Content-Type: multipart/mixed; boundary=changesetresponse_64cc

--changesetresponse_64cc
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 1

HTTP/1.1 204 No Content
OData-Version: 4.0
OData-EntityId: [Organization Uri]/api/data/v9.2/tasks(aed2ae8b-3c94-ed11-aad1-000d3a9933c9)


--changesetresponse_64cc--
--batchresponse_f44bd09d--
""".replace("\n", "\r\n").encode()


def test_a_batch_answer_is_read_part_by_part_change_sets_flattened() -> None:
    parts = parse("multipart/mixed; boundary=batchresponse_f44bd09d", LEARN_RESPONSE)
    assert [(p.status, p.content_id) for p in parts] == [(400, None), (204, "1")]
    assert parts[0].json() == {"error": {"code": "0x80044331", "message": "A validation error occurred."}}
    assert parts[1].headers["odata-entityid"].endswith("tasks(aed2ae8b-3c94-ed11-aad1-000d3a9933c9)")
    assert parts[1].json() is None


# --- bisect and per-record outcomes (mocked Dataverse) --------------------------------------------


def capabilities(rsps: responses.RequestsMock, supported: bool) -> None:
    rsps.get(
        re.compile(re.escape(API) + r"EntityDefinitions\?.*"),
        json={
            "value": [
                {"LogicalName": "contact", "EntitySetName": "contacts", "PrimaryIdAttribute": "contactid"}
            ]
        },
    )
    rsps.get(
        re.compile(re.escape(API) + r"sdkmessagefilters\?.*"),
        json={"value": [{"sdkmessagefilterid": "f9bedb46-856e-ed11-9561-002248081470"}] if supported else []},
    )


def records(n: int) -> list[BulkRecord]:
    return [
        BulkRecord(i, {"emailaddress1": f"p{i}@x.io"}, {"firstname": f"P{i}", "emailaddress1": f"p{i}@x.io"})
        for i in range(n)
    ]


BAD = "p37@x.io"


@responses.activate
def test_one_bad_record_is_isolated_by_bisect_and_the_rest_are_written() -> None:
    capabilities(responses.mock, True)
    sizes: list[int] = []

    def upsert_multiple(request: Any) -> tuple[int, dict[str, str], str]:
        targets = json.loads(request.body)["Targets"]
        sizes.append(len(targets))
        assert request.headers["CallerObjectId"] == ACTOR_OID
        for t in targets:
            assert t["@odata.type"] == "Microsoft.Dynamics.CRM.contact"
            assert "emailaddress1" not in t  # the key is in @odata.id only
        if any(t["@odata.id"] == "contacts(emailaddress1='p37%40x.io')" for t in targets):
            return 400, {}, json.dumps({"error": {"code": "0x80048d19", "message": "bad column"}})
        return 200, {}, json.dumps({"Ids": []})

    responses.add_callback(
        responses.POST, f"{API}contacts/Microsoft.Dynamics.CRM.UpsertMultiple", callback=upsert_multiple
    )
    single = responses.patch(
        re.compile(re.escape(API) + r"contacts\(emailaddress1='p37%40x\.io'\).*"),
        status=400,
        json={"error": {"code": "0x80048d19", "message": "bad column"}},
    )
    report = write_bulk(
        client(), "contacts", "upsert", records(100), caller=Caller(ACTOR, ACTOR_OID), batch_size=100
    )
    assert report.via == "UpsertMultiple"
    assert report.written == 99
    (failed,) = report.failed
    assert failed.index == 37 and isinstance(failed.error, DataverseError) and failed.error.status == 400
    assert sizes[0] == 100 and sum(sizes) < 100 * 3  # halves, not one request per record
    assert single.call_count == 1  # the last record alone, through the single-record request
    assert report.requests == len(sizes) + 1
    assert sorted(o.index for o in report.outcomes) == list(range(100))


@responses.activate
def test_a_throttled_bulk_request_raises_for_the_whole_job() -> None:
    capabilities(responses.mock, True)
    responses.post(
        f"{API}contacts/Microsoft.Dynamics.CRM.UpsertMultiple",
        status=429,
        headers={"Retry-After": "5"},
        json={"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit"}},
    )
    with pytest.raises(DataverseError) as caught:
        write_bulk(client(), "contacts", "upsert", records(10))
    assert caught.value.transient and caught.value.code == "dataverse_throttled"


def batch_answer(statuses: list[tuple[int, dict[str, Any] | None]]) -> bytes:
    lines = []
    for status, body in statuses:
        lines += [
            "--batchresponse_1",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            "",
            f"HTTP/1.1 {status} X",
            "Content-Type: application/json; odata.metadata=minimal",
            "",
            json.dumps(body) if body is not None else "",
        ]
    lines += ["--batchresponse_1--", ""]
    return "\r\n".join(lines).encode()


@responses.activate
def test_without_the_messages_batch_gives_each_record_its_own_outcome() -> None:
    capabilities(responses.mock, False)
    answers = [
        (201, {"_modifiedby_value": ACTOR}),
        (
            412,
            {"error": {"code": "0x80040237", "message": "A record with matching key values already exists."}},
        ),
        (400, {"error": {"code": "0x80048d19", "message": "bad column"}}),
        (201, {"_modifiedby_value": "eeeeeeee-0000-0000-0000-000000000009"}),
    ]

    def batch(request: Any) -> tuple[int, dict[str, str], bytes]:
        assert request.headers["Prefer"] == "odata.continue-on-error"
        assert request.headers["Content-Type"].startswith("multipart/mixed; boundary=batch_")
        body = request.body.decode()
        assert body.count("If-None-Match: *") == 4 and body.count(f"CallerObjectId: {ACTOR_OID}") == 4
        return 200, {"Content-Type": "multipart/mixed; boundary=batchresponse_1"}, batch_answer(answers)

    responses.add_callback(responses.POST, f"{API}$batch", callback=batch)
    report = write_bulk(client(), "contacts", "create", records(4), caller=Caller(ACTOR, ACTOR_OID))
    assert report.via == "$batch" and report.requests == 1
    by_index = {o.index: o for o in report.outcomes}
    assert by_index[0].result is not None and by_index[0].result.modified_by == ACTOR
    assert by_index[1].result is not None and by_index[1].result.noop  # already there: a replay
    assert by_index[2].error is not None and by_index[2].error.code == "dataverse_bad_request"
    assert by_index[3].error is not None and by_index[3].error.code == "impersonation_not_applied"


@responses.activate
def test_a_5xx_inside_a_batch_raises_for_the_whole_job() -> None:
    capabilities(responses.mock, False)
    responses.post(
        f"{API}$batch",
        body=batch_answer([(204, None), (503, None)]),
        headers={"Content-Type": "multipart/mixed; boundary=batchresponse_1"},
    )
    with pytest.raises(DataverseError) as caught:
        write_bulk(client(), "contacts", "upsert", records(2))
    assert caught.value.transient


@responses.activate
def test_message_support_is_asked_once_with_escaped_literals() -> None:
    capabilities(responses.mock, True)
    c = client()
    assert c.supports_message("contacts", "CreateMultiple") and c.supports_message(
        "contacts", "CreateMultiple"
    )
    (definitions, filters) = [call.request.url for call in responses.calls]
    assert "EntitySetName%20eq%20%27contacts%27" in definitions
    assert filters.endswith(
        "$filter=sdkmessageid%2Fname%20eq%20%27CreateMultiple%27%20and%20"
        "primaryobjecttypecode%20eq%20%27contact%27"
    )


def test_the_app_state_containers_are_the_ones_the_app_uses() -> None:
    """A claim-check may never name a container the app keeps its own state in (a new one must be added)."""
    from shared import contract, reconciliation, replay, throttle

    used = {replay.CONTAINER, throttle.CONTAINER, reconciliation.ROSTER_PATH.split("/")[0],
            reconciliation.SNAPSHOT_PATH.split("/")[0], "config"}
    assert used == set(contract.APP_STATE_CONTAINERS)
