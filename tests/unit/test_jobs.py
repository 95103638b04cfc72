"""The sync-job contract (issue 3) and what one delivery of a message does."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import contract, jobs
from shared.contract import MAX_JOB_BYTES, deterministic_id, parse_job, parse_message
from shared.errors import (
    ActorError,
    AuthError,
    ConfigurationError,
    DataverseError,
    ImpersonationNotApplied,
    InvalidJob,
    SyncError,
)
from shared.jobs import process_message, run_job
from shared.messages import strip
from tests.signing import SOURCE, signed_text
from tests.unit.functions_fakes import DISABLED, JANE, JOHN, FakeDataverse, FakeRuntime

GUID = "5f2b3c1e-1111-4222-8333-944455556666"


def job(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "crm-evt-000123",
        "entity": "contacts",
        "operation": "upsert",
        "key": {"emailaddress1": "ada@example.com"},
        "data": {"firstname": "Ada", "lastname": "Lovelace"},
        "actAs": {"email": "jane@contoso.com"},
    }
    for name, value in overrides.items():
        if value is ...:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def fields_of(exc: InvalidJob) -> list[str]:
    return [d["field"] for d in exc.details]


# --- schema: valid jobs ---------------------------------------------------------------------------


def test_issue_example_parses() -> None:
    parsed = parse_job(job())
    assert (parsed.id, parsed.entity, parsed.operation) == ("crm-evt-000123", "contacts", "upsert")
    assert parsed.key == {"emailaddress1": "ada@example.com"}
    assert parsed.act_as == {"email": "jane@contoso.com"}
    assert parsed.raw == job()


@pytest.mark.parametrize(
    "overrides",
    [
        {"operation": "create", "key": ...},
        {"operation": "create", "key": GUID},
        {"operation": "update", "key": GUID},
        {"operation": "delete", "data": ...},
        {"operation": "delete", "data": ..., "key": {"accountnumber": 42}},
        {"actAs": ...},
        {"actAs": {"systemUserId": GUID}},
        {"actAs": {"azureAdObjectId": GUID.upper()}},
        {"actAs": {"email": "o'brien@contoso.com"}},
        {"id": "a" * 128},
        {"id": "A.b_c:d-9"},
        {"entity": "new_custom_entity1"},
        {"key": {"_parentcustomerid_value": GUID, "flag": True, "n": 1.5}},
    ],
)
def test_valid_jobs(overrides: dict[str, Any]) -> None:
    parsed = parse_job(job(**overrides))
    assert parsed.operation == job(**overrides)["operation"]


def test_guids_are_normalised_but_raw_is_kept() -> None:
    raw = job(key=GUID.upper(), actAs={"systemUserId": GUID.upper()})
    parsed = parse_job(raw)
    assert parsed.key == GUID and parsed.act_as == {"systemUserId": GUID}
    assert parsed.raw["key"] == GUID.upper()


# --- schema: every error names its field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": ...}, "id"),
        ({"id": ""}, "id"),
        ({"id": "a" * 129}, "id"),
        ({"id": "has space"}, "id"),
        ({"id": "new\nline"}, "id"),
        ({"id": 123}, "id"),
        ({"entity": ...}, "entity"),
        ({"entity": "Contacts"}, "entity"),
        ({"entity": "1contacts"}, "entity"),
        ({"entity": "contacts(1)"}, "entity"),
        ({"entity": "contacts\n"}, "entity"),
        ({"operation": ...}, "operation"),
        ({"operation": "merge"}, "operation"),
        ({"operation": "UPSERT"}, "operation"),
        ({"key": ...}, "key"),
        ({"operation": "update", "key": ...}, "key"),
        ({"operation": "delete", "key": ..., "data": ...}, "key"),
        ({"key": "not-a-guid"}, "key"),
        ({"key": {}}, "key"),
        ({"key": None}, "key"),
        ({"key": 12}, "key"),
        ({"key": ["a"]}, "key"),
        ({"key": {"EmailAddress1": "x"}}, "key.EmailAddress1"),
        ({"key": {"emailaddress1": None}}, "key.emailaddress1"),
        ({"key": {"emailaddress1": {"nested": 1}}}, "key.emailaddress1"),
        ({"key": {"emailaddress1": [1]}}, "key.emailaddress1"),
        ({"data": ...}, "data"),
        ({"data": {}}, "data"),
        ({"data": []}, "data"),
        ({"data": "x"}, "data"),
        ({"operation": "create", "data": ...}, "data"),
        ({"operation": "delete"}, "data"),
        ({"actAs": None}, "actAs"),
        ({"actAs": "jane@contoso.com"}, "actAs"),
        ({"actAs": {}}, "actAs"),
        ({"actAs": {"email": "jane@contoso.com", "systemUserId": GUID}}, "actAs"),
        ({"actAs": {"mail": "jane@contoso.com"}}, "actAs.mail"),
        ({"actAs": {"email": "jane"}}, "actAs.email"),
        ({"actAs": {"email": "jane @contoso.com"}}, "actAs.email"),
        ({"actAs": {"email": 5}}, "actAs.email"),
        ({"actAs": {"systemUserId": "123"}}, "actAs.systemUserId"),
        ({"actAs": {"azureAdObjectId": "x"}}, "actAs.azureAdObjectId"),
        ({"actas": {"email": "jane@contoso.com"}}, "actas"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_jobs_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(**overrides))
    assert caught.value.code == "invalid_job"
    assert field in fields_of(caught.value)
    assert caught.value.message.startswith(caught.value.details[0]["field"])


def test_errors_in_a_batch_carry_the_index() -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(actAs={"email": "nope"}, entity="Bad"), where="jobs[3]")
    assert set(fields_of(caught.value)) == {"jobs[3].actAs.email", "jobs[3].entity"}


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job({"id": "", "entity": "X", "operation": "merge", "bogus": 1})
    assert set(fields_of(caught.value)) >= {"id", "entity", "operation", "bogus"}
    assert "more problems" in caught.value.message


@pytest.mark.parametrize("value", [None, [], "job", 3, True])
def test_a_job_must_be_an_object(value: object) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(value, where="jobs[0]")
    assert fields_of(caught.value) == ["jobs[0]"]


# --- parse_message ---------------------------------------------------------------------------------


def test_parse_message_accepts_bytes_str_and_bom() -> None:
    text = json.dumps(job())
    assert parse_message(text).id == "crm-evt-000123"
    assert parse_message(text.encode()).id == "crm-evt-000123"
    assert parse_message(b"\xef\xbb\xbf" + text.encode()).id == "crm-evt-000123"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe{}",
        b'{"id": NaN}',
        b'{"data": {"x": 1e400}}',
        b'{"id": "a", "id": "b"}',
        b"[1,2",
        b'{"id": Infinity}',
    ],
)
def test_parse_message_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_message(body)
    assert caught.value.code == "invalid_json"


def test_parse_message_valid_json_but_invalid_job() -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_message(b"[1, 2]")
    assert caught.value.code == "invalid_job"


def _padded(size: int) -> bytes:
    base = json.dumps(job(data={"description": ""}), separators=(",", ":")).encode()
    body = json.dumps(job(data={"description": "x" * (size - len(base))}), separators=(",", ":")).encode()
    assert len(body) == size
    return body


def test_parse_message_size_limit_is_exact() -> None:
    assert parse_message(_padded(MAX_JOB_BYTES)).id == "crm-evt-000123"
    with pytest.raises(InvalidJob) as caught:
        parse_message(_padded(MAX_JOB_BYTES + 1))
    assert caught.value.code == "job_too_large"
    with pytest.raises(InvalidJob) as caught:
        parse_message(_padded(MAX_JOB_BYTES + 1).decode())
    assert caught.value.code == "job_too_large"


def test_size_counts_utf8_bytes_not_characters() -> None:
    body = json.dumps(job(data={"d": "é" * (MAX_JOB_BYTES // 2)}), ensure_ascii=False)
    assert len(body) < MAX_JOB_BYTES < len(body.encode())
    with pytest.raises(InvalidJob) as caught:
        parse_message(body)
    assert caught.value.code == "job_too_large"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_any_json_is_a_job_or_an_invalid_job(value: object) -> None:
    try:
        parsed = parse_message(json.dumps(value))
    except InvalidJob as exc:
        assert exc.code in ("invalid_job", "job_too_large")
        assert exc.details and all("field" in d and "message" in d for d in exc.details)
    else:
        assert parsed.raw == value


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
    st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True),
    st.sampled_from(contract.OPERATIONS),
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        st.text(max_size=20) | st.integers() | st.booleans(),
        min_size=1,
        max_size=3,
    ),
)
def test_fuzz_generated_valid_jobs_parse(
    job_id: str, entity: str, operation: str, key: dict[str, Any]
) -> None:
    raw: dict[str, Any] = {"id": job_id, "entity": entity, "operation": operation, "key": key}
    if operation != "delete":
        raw["data"] = {"name": "x"}
    parsed = parse_message(contract.dumps(raw).encode())
    assert (parsed.id, parsed.entity, parsed.operation, parsed.key) == (job_id, entity, operation, key)


# --- run_job -----------------------------------------------------------------------------------------


def test_run_job_writes_on_behalf_of_the_actor() -> None:
    runtime = FakeRuntime()
    result = run_job(parse_job(job()), runtime)  # type: ignore[arg-type]
    (call,) = runtime.dataverse.calls
    assert (call.operation, call.entity, call.key) == (
        "upsert",
        "contacts",
        {"emailaddress1": "ada@example.com"},
    )
    assert call.caller == JANE.caller() and call.correlation_id == "crm-evt-000123"
    assert result.modified_by == JANE.systemuserid


def test_run_job_without_act_as_writes_as_the_application_user() -> None:
    runtime = FakeRuntime()
    run_job(parse_job(job(actAs=...)), runtime)  # type: ignore[arg-type]
    assert runtime.dataverse.calls[0].caller is None
    assert runtime.users.resolved == []


def test_actor_without_entra_id_uses_systemuserid_caller() -> None:
    runtime = FakeRuntime()
    run_job(parse_job(job(actAs={"email": JOHN.email})), runtime)  # type: ignore[arg-type]
    assert runtime.dataverse.calls[0].caller.headers() == {"MSCRMCallerID": JOHN.systemuserid}


def test_disabled_actor_is_refused_before_any_write() -> None:
    runtime = FakeRuntime()
    with pytest.raises(ActorError) as caught:
        run_job(parse_job(job(actAs={"email": DISABLED.email})), runtime)  # type: ignore[arg-type]
    assert caught.value.code == "actor_disabled"
    assert runtime.dataverse.calls == []


@pytest.mark.parametrize("operation", ["update", "upsert", "delete"])
def test_run_job_maps_operations(operation: str) -> None:
    runtime = FakeRuntime()
    overrides: dict[str, Any] = {"operation": operation, "key": GUID}
    if operation == "delete":
        overrides["data"] = ...
    run_job(parse_job(job(**overrides)), runtime)  # type: ignore[arg-type]
    (call,) = runtime.dataverse.calls
    assert (call.operation, call.key) == (operation, GUID)


def test_keyless_create_gets_a_deterministic_id_and_is_written_with_it() -> None:
    runtime = FakeRuntime()
    raw = job(operation="create", key=...)
    run_job(parse_job(raw), runtime)  # type: ignore[arg-type]
    expected = str(uuid.uuid5(contract.JOB_NAMESPACE, "contacts:crm-evt-000123"))
    assert runtime.dataverse.calls[0].key == expected == str(deterministic_id("contacts", "crm-evt-000123"))
    assert expected != str(deterministic_id("accounts", "crm-evt-000123"))


def test_create_with_a_key_uses_that_key() -> None:
    runtime = FakeRuntime()
    run_job(parse_job(job(operation="create", key=GUID)), runtime)  # type: ignore[arg-type]
    assert runtime.dataverse.calls[0].key == GUID


def test_replayed_keyless_create_writes_once() -> None:
    runtime = FakeRuntime()
    body = signed_text(job(operation="create", key=...))
    first = process_message(body, lambda: runtime)  # type: ignore[arg-type, return-value]
    second = process_message(body, lambda: runtime)  # type: ignore[arg-type, return-value]
    assert first.result is not None and not first.result.noop
    assert second.result is not None and second.result.noop and second.dead_letter is None
    assert len(runtime.dataverse.records) == 1


def test_impersonation_mismatch_is_caught() -> None:
    runtime = FakeRuntime(dataverse=FakeDataverse(modified_by="00000000-0000-4000-8000-0000000000aa"))
    with pytest.raises(ImpersonationNotApplied):
        run_job(parse_job(job()), runtime)  # type: ignore[arg-type]


# --- process_message outcomes --------------------------------------------------------------------------


def process(body: str | bytes, runtime: FakeRuntime) -> jobs.JobOutcome:
    return process_message(body, lambda: runtime)  # type: ignore[arg-type, return-value]


def test_success_outcome() -> None:
    outcome = process(signed_text(job()), FakeRuntime())
    assert outcome.job_id == "crm-evt-000123" and outcome.dead_letter is None
    assert outcome.result is not None and outcome.result.operation == "upsert"


def test_invalid_json_dead_letters_the_raw_text() -> None:
    runtime = FakeRuntime()
    outcome = process(b"{not json", runtime)
    assert outcome.dead_letter is not None
    assert outcome.dead_letter["job"] == "{not json"
    assert outcome.dead_letter["reason"] == "invalid_json"
    assert runtime.dataverse.calls == []


def test_invalid_job_dead_letters_the_original_object() -> None:
    raw = job(actAs={"email": "nope"})
    outcome = process(signed_text(raw), FakeRuntime())
    assert outcome.dead_letter is not None
    assert strip(outcome.dead_letter["job"]) == {**raw, "source": SOURCE}
    assert outcome.dead_letter["reason"] == "invalid_job"
    assert "actAs.email" in outcome.dead_letter["detail"]
    assert outcome.job_id == "crm-evt-000123"


def test_dead_letter_record_shape() -> None:
    outcome = process(signed_text(job(actAs={"email": DISABLED.email})), FakeRuntime())
    record = outcome.dead_letter
    assert record is not None and set(record) == {"job", "reason", "detail", "failedAt"}
    assert record["reason"] == "actor_disabled"
    assert record["failedAt"].endswith("Z")
    assert datetime.fromisoformat(record["failedAt"].replace("Z", "+00:00")).utcoffset() is not None


@pytest.mark.parametrize(
    ("act_as", "reason"),
    [
        ({"email": "nobody@contoso.com"}, "actor_not_found"),
        ({"email": DISABLED.email}, "actor_disabled"),
        ({"email": "shared@contoso.com"}, "actor_ambiguous"),
    ],
)
def test_actor_failures_are_dead_lettered(act_as: dict[str, str], reason: str) -> None:
    runtime = FakeRuntime()
    outcome = process(signed_text(job(actAs=act_as)), runtime)
    assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == reason
    assert runtime.dataverse.calls == []


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DataverseError("bad", status=400, dataverse_code="0x80040203"), "dataverse_bad_request"),
        (DataverseError("no", status=403, dataverse_code="0x80040220"), "dataverse_forbidden"),
        (
            DataverseError("no priv", status=403, dataverse_code="0x8004A110"),
            "impersonation_privilege_missing",
        ),
        (DataverseError("gone", status=404, dataverse_code="0x80040217"), "record_not_found"),
        (DataverseError("no set", status=404, dataverse_code="0x80060888"), "entity_not_found"),
        (DataverseError("data.x: no column", status=400, code="invalid_column"), "invalid_column"),
        (DataverseError("etag", status=412), "precondition_failed"),
        (ImpersonationNotApplied("ran as app user"), "impersonation_not_applied"),
    ],
)
def test_permanent_dataverse_failures_are_dead_lettered(error: SyncError, reason: str) -> None:
    runtime = FakeRuntime(dataverse=FakeDataverse(fail=error))
    outcome = process(signed_text(job()), runtime)
    assert outcome.dead_letter is not None
    assert outcome.dead_letter["reason"] == reason
    assert strip(outcome.dead_letter["job"]) == {**job(), "source": SOURCE}
    assert "_auth" in outcome.dead_letter["job"]  # kept, so a replay from -deadletter still verifies


@pytest.mark.parametrize(
    "error",
    [
        DataverseError("busy", status=429, retry_after=5),
        DataverseError("down", status=503),
        DataverseError("timeout", status=None),
        AuthError("kv down", code="keyvault_unavailable", transient=True),
    ],
)
def test_transient_failures_raise(error: SyncError) -> None:
    runtime = FakeRuntime(dataverse=FakeDataverse(fail=error))
    with pytest.raises(SyncError) as caught:
        process(signed_text(job()), runtime)
    assert caught.value is error


@pytest.mark.parametrize(
    "error",
    [
        AuthError("bad secret", code="entra_invalid_client", aadsts=7000215),
        AuthError("kv 403", code="keyvault_forbidden", status=403),
        DataverseError("no app user", status=401),
    ],
)
def test_environment_faults_raise_rather_than_dead_letter(error: SyncError) -> None:
    runtime = FakeRuntime(dataverse=FakeDataverse(fail=error))
    with pytest.raises(SyncError):
        process(signed_text(job()), runtime)


def test_missing_setting_raises() -> None:
    def broken() -> FakeRuntime:
        raise ConfigurationError("DATAVERSE_URL", "is required", code="setting_missing")

    with pytest.raises(ConfigurationError):
        process_message(signed_text(job()), broken)  # type: ignore[arg-type]


def test_the_caller_hands_in_the_runtime_and_a_bad_message_never_builds_it() -> None:
    """As run_reconciliation: the trigger passes the runtime (a factory), shared/ never fetches a global."""
    import inspect

    assert inspect.signature(process_message).parameters["runtime"].default is inspect.Parameter.empty
    built: list[int] = []

    def factory() -> FakeRuntime:
        built.append(1)
        raise ConfigurationError("DATAVERSE_URL", "is required", code="setting_missing")

    outcome = process_message("{not json", factory)  # type: ignore[arg-type]
    assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == "invalid_json"
    assert built == []


def test_unexpected_exception_raises_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    runtime = FakeRuntime(dataverse=FakeDataverse(fail=RuntimeError("bug")))
    with caplog.at_level(logging.INFO, logger="shared.jobs"), pytest.raises(RuntimeError):
        process(signed_text(job()), runtime)
    assert any("unexpected_error" in r.getMessage() for r in caplog.records)
    assert "RuntimeError: bug" in caplog.text  # with its trace


def test_oversized_dead_letter_record_raises_instead_of_truncating() -> None:
    text = '"' * (MAX_JOB_BYTES - 10)  # not JSON; escaping doubles it in the record
    with pytest.raises(SyncError) as caught:
        process(text, FakeRuntime())
    assert caught.value.code == "dead_letter_too_large"


def test_logs_carry_the_job_id_and_no_data_values(caplog: pytest.LogCaptureFixture) -> None:
    raw = job(data={"firstname": "TopSecretValue"}, key={"emailaddress1": "ada@example.com"})
    with caplog.at_level(logging.DEBUG, logger="shared.jobs"):
        process(signed_text(raw), FakeRuntime())
        process(signed_text(job(actAs={"email": DISABLED.email})), FakeRuntime())
    lines = [r.getMessage() for r in caplog.records if r.name == "shared.jobs"]
    assert lines and all("job=crm-evt-000123" in line for line in lines)
    text = "\n".join(lines)
    assert "TopSecretValue" not in text and "ada@example.com" not in text
    assert "fields=firstname" in text and "key=alt(emailaddress1)" in text


# --- text that cannot be UTF-8 ------------------------------------------------------------------------

LONE_SURROGATES = [
    '{"id": "a", "data": {"firstname": "\\ud800"}}',
    '{"id": "a", "data": {"firstname": "x\\udfffy"}}',
    '{"id": "a", "data": {"\\udc00": 1}}',
    '{"id": "a", "actAs": {"email": "\\ud83d@contoso.com"}}',
    '{"jobs": [["\\ud800"]]}',
]


@pytest.mark.parametrize("text", LONE_SURROGATES)
def test_a_lone_surrogate_escape_is_invalid_json(text: str) -> None:
    """json accepts "\\ud800", but the string can never be encoded as UTF-8 (queue, Dataverse): refuse it."""
    with pytest.raises(ValueError, match="surrogate"):
        contract.loads(text)


def test_a_surrogate_pair_escape_is_fine() -> None:
    assert contract.loads('{"x": "\\ud83d\\ude00"}') == {"x": "\U0001f600"}


def test_a_lone_surrogate_on_the_queue_is_dead_lettered_not_poisoned() -> None:
    runtime = FakeRuntime()
    raw = json.dumps(job(operation="create", data={"firstname": "\ud800"})).encode()
    assert b"\\ud800" in raw
    outcome = process(raw, runtime)
    assert outcome.dead_letter is not None
    assert outcome.dead_letter["reason"] == "invalid_json"
    assert "surrogate" in outcome.dead_letter["detail"]
    assert runtime.dataverse.calls == []
    contract.dumps(outcome.dead_letter).encode("utf-8")  # the record itself is sendable


def test_a_lone_surrogate_in_a_str_message_is_dead_lettered() -> None:
    outcome = process('{"id": "crm-1", "entity": "contacts", "operation": "create", "data": {"a": "\ud800"}}',
                      FakeRuntime())
    assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == "invalid_json"
    contract.dumps(outcome.dead_letter).encode("utf-8")


# --- source: the scope of a keyless create's idempotency key ------------------------------------------


def _keyless(**overrides: Any) -> dict[str, Any]:
    raw = job(operation="create", **overrides)
    raw.pop("key", None)
    return raw


def test_keyless_create_id_is_scoped_by_source() -> None:
    crm = parse_job(_keyless(source="crm")).write_key()
    erp = parse_job(_keyless(source="erp")).write_key()
    assert crm != erp
    assert parse_job(_keyless(source="crm")).write_key() == crm
    raw = _keyless(source="crm")
    assert crm == str(uuid.uuid5(contract.JOB_NAMESPACE, f"crm:{raw['entity']}:{raw['id']}"))


def test_a_message_without_source_keeps_the_old_id_so_queued_jobs_replay_identically() -> None:
    raw = _keyless()
    assert "source" not in raw
    parsed = parse_job(raw)
    assert parsed.source is None
    assert parsed.write_key() == str(uuid.uuid5(contract.JOB_NAMESPACE, f"{raw['entity']}:{raw['id']}"))
    assert parsed.write_key() == str(deterministic_id(raw["entity"], raw["id"]))


@pytest.mark.parametrize("value", ["", "a/b", "x" * 65, 5, None, "crm "])
def test_an_invalid_source_is_an_invalid_job(value: object) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(source=value))
    assert fields_of(caught.value) == ["source"]


def test_two_sources_same_job_id_write_two_records() -> None:
    runtime = FakeRuntime()
    for source in ("crm", "erp", "crm"):
        outcome = process(signed_text(_keyless(source=source)), runtime)
        assert outcome.dead_letter is None
    keys = [str(call.key) for call in runtime.dataverse.calls]
    assert len(keys) == 3
    assert keys[0] == keys[2] != keys[1]  # crm twice: one record; erp: its own


def test_the_contract_lives_in_one_module() -> None:
    """shared.contract owns the schema, the codec and the one GUID/email check; shared.jobs only runs
    jobs, so it neither defines nor re-exports them (callers import the contract from its home)."""
    import shared.contract
    import shared.jobs

    for name in ("is_guid", "is_email_address", "ACT_AS_FIELDS", "FIELDS", "OPERATIONS", "problems_message",
                 "check_records", "MAX_NESTING"):
        assert hasattr(shared.contract, name) and not hasattr(shared.jobs, name), name
    assert shared.jobs.parse_job is shared.contract.parse_job  # used by read_message, not a copy
    for module in (shared.jobs, shared.contract):
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        assert source.count("re.compile(r\"[0-9a-fA-F]{8}") == (module is shared.contract), module


# --- ifMatch (ordering) ------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["update", "upsert", "delete"])
def test_if_match_is_sent_with_the_write(operation: str) -> None:
    runtime = FakeRuntime()
    raw = job(operation=operation, key=GUID, ifMatch='W/"1234"', data=... if operation == "delete" else None)
    if operation != "delete":
        raw["data"] = {"firstname": "Ada"}
    run_job(parse_job(raw), runtime)  # type: ignore[arg-type]
    assert runtime.dataverse.calls[-1].if_match == 'W/"1234"'


def test_without_if_match_nothing_changes() -> None:
    runtime = FakeRuntime()
    run_job(parse_job(job()), runtime)  # type: ignore[arg-type]
    assert runtime.dataverse.calls[-1].if_match is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"operation": "create", "ifMatch": 'W/"1"'}, "not allowed for create"),
        ({"ifMatch": "*"}, "ETag"),
        ({"ifMatch": "1234"}, "ETag"),
        ({"ifMatch": 'W/"1"\r\nX-Evil: 1'}, "ETag"),
        ({"ifMatch": 5}, "ETag"),
    ],
)
def test_bad_if_match_is_an_invalid_job(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(**overrides))
    assert fields_of(caught.value) == ["ifMatch"] and message in caught.value.message


def test_a_newer_write_dead_letters_the_older_job_as_precondition_failed() -> None:
    error = DataverseError(
        "The version of the existing record doesn't match the RowVersion property provided.",
        status=412, dataverse_code="0x80060882",
    )
    runtime = FakeRuntime(dataverse=FakeDataverse(fail=error))
    outcome = process(signed_text(job(operation="update", key=GUID, ifMatch='W/"1"')), runtime)
    assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == "precondition_failed"
