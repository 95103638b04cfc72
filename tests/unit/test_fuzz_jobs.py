"""Fuzz: the job parser and one delivery of a message, for any input.

Already covered in tests/unit/test_jobs.py: any JSON *value* serialised by ``json.dumps`` is a Job or
an InvalidJob, and jobs with generated ids/entities/alternate keys parse.  These properties go
further: any *bytes or text* (not only well-formed JSON), fully generated valid jobs (every
operation, GUID and alternate keys, every ``actAs`` form, arbitrary data, any field order, str /
bytes / BOM) that round-trip, mutated jobs whose error names the field that was broken, and
``process_message`` that ends every invalid message in a dead-letter record and never in a stray
exception.  The strategies are reused by tests/unit/test_fuzz_webhooks.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import contract
from shared.contract import (
    ACT_AS_FIELDS,
    FIELDS,
    MAX_JOB_BYTES,
    OPERATIONS,
    Job,
    is_email_address,
    parse_job,
    parse_message,
)
from shared.errors import InvalidJob
from shared.jobs import process_message
from shared.keyring import KeyRing
from shared.messages import strip
from tests.signing import signed_text
from tests.unit.functions_fakes import FakeSecrets

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PARSE_CODES = {"invalid_json", "invalid_job", "job_too_large"}
DEAD_LETTER_CODES = PARSE_CODES | {"unauthenticated_message"}

# --- strategies (shared with the webhook fuzz) ------------------------------------------------------

job_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
entities = st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True)
guids = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers() | finite_floats | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
key_columns = st.from_regex(r"_?[a-z][a-z0-9_]{0,20}", fullmatch=True)
alternate_keys = st.dictionaries(
    key_columns, st.text(max_size=30) | st.integers() | finite_floats | st.booleans(), min_size=1, max_size=3
)
_email_part = st.text(
    st.characters(exclude_categories=["Cc", "Cs", "Z"], exclude_characters="@"), min_size=1, max_size=24
)
emails = (
    st.builds(lambda local, domain: f"{local}@{domain}", _email_part, _email_part)
    | st.sampled_from(["jane@contoso.com", "o'brien@contoso.com", "élodie@exämple.com"])
).filter(is_email_address)
act_as = st.one_of(
    st.none(),
    emails.map(lambda e: {"email": e}),
    guids.map(lambda g: {"systemUserId": g}),
    guids.map(lambda g: {"azureAdObjectId": g}),
)
data_objects = st.dictionaries(st.text(min_size=1, max_size=12), json_values, min_size=1, max_size=4)


@st.composite
def valid_jobs(draw: st.DrawFn, job_id: st.SearchStrategy[str] = job_ids) -> dict[str, Any]:
    """A job the contract accepts, with its fields in any order."""
    operation = draw(st.sampled_from(OPERATIONS))
    job: dict[str, Any] = {"id": draw(job_id), "entity": draw(entities), "operation": operation}
    key = draw((st.none() | guids | alternate_keys) if operation == "create" else (guids | alternate_keys))
    if key is not None:
        job["key"] = key
    if operation != "delete":
        job["data"] = draw(data_objects)
    actor = draw(act_as)
    if actor is not None:
        job["actAs"] = actor
    order = draw(st.permutations(list(job)))
    return {name: job[name] for name in order}


def _unknown_name(name: str) -> bool:
    return name not in FIELDS


@st.composite
def broken_jobs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """(a valid job with one field broken, the field).  The result may happen to be valid again."""
    job = dict(draw(valid_jobs()))
    how = draw(st.sampled_from(["add", "remove", "replace", "nested"]))
    if how == "add":
        name = draw(st.text(min_size=1, max_size=10).filter(_unknown_name))
        job[name] = draw(json_values)
        return job, name
    if how == "remove":
        name = draw(st.sampled_from(list(job)))
        del job[name]
        return job, name
    if how == "replace":
        name = draw(st.sampled_from(FIELDS))
        job[name] = draw(json_values | st.sampled_from(["", "Contacts", "merge", "not-a-guid", {}, []]))
        return job, name
    if "actAs" in job and draw(st.booleans()):
        job["actAs"] = {**job["actAs"], draw(st.text(min_size=1, max_size=8)): draw(scalars)}
        return job, "actAs"
    if isinstance(job.get("key"), dict):
        job["key"] = {**job["key"], draw(st.text(max_size=8)): draw(json_values)}
        return job, "key"
    job["id"] = draw(st.text(max_size=140))
    return job, "id"


# --- any input -------------------------------------------------------------------------------------


def assert_invalid_job(exc: InvalidJob, where: str = "") -> None:
    """The documented failure: a machine code and details that each name a field."""
    assert exc.code in PARSE_CODES
    assert exc.details
    for detail in exc.details:
        assert isinstance(detail["field"], str) and detail["field"]
        assert isinstance(detail["message"], str) and detail["message"]
        assert detail["field"].startswith(where)
    assert exc.message and str(exc).startswith(exc.code)


nested = st.integers(min_value=1, max_value=5000).flatmap(
    lambda depth: st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
)
any_messages = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=400),
    st.text(max_size=400).map(lambda t: t.encode("utf-8")),
    json_values.map(json.dumps),
    valid_jobs().map(contract.dumps),
    broken_jobs().map(lambda broken: contract.dumps(broken[0])),
    nested,
)


@FUZZ
@given(any_messages)
def test_any_message_is_a_job_or_an_invalid_job(body: str | bytes) -> None:
    try:
        job = parse_message(body)
    except InvalidJob as exc:
        assert_invalid_job(exc)
    else:
        assert isinstance(job, Job) and isinstance(job.raw, dict)


@pytest.mark.parametrize("depth", [contract.MAX_NESTING + 1, 990, 5000])
def test_deeply_nested_json_is_invalid_json_not_a_crash(depth: int) -> None:
    """json recurses per level: a few thousand brackets, far below the size limit, used to escape as
    RecursionError (from parsing, or from dumping a value parsed just under the interpreter's limit)."""
    for body in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        with pytest.raises(InvalidJob) as caught:
            parse_message(body)
        assert caught.value.code == "invalid_json"
        outcome = process_message(body, _runtime)
        assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == "invalid_json"


def test_nesting_up_to_the_bound_is_a_job() -> None:
    inner = contract.MAX_NESTING - 2  # the job object and its data object are two levels
    nested_list = json.loads("[" * inner + "]" * inner)
    job = {"id": "j", "entity": "contacts", "operation": "create", "data": {"a": nested_list}}
    assert parse_message(contract.dumps(job)).raw == job


# --- valid jobs ------------------------------------------------------------------------------------


def expected_act_as(raw: dict[str, str] | None) -> dict[str, str] | None:
    if raw is None:
        return None
    ((name, value),) = raw.items()
    return {name: value if name == "email" else value.lower()}


@FUZZ
@given(valid_jobs())
def test_valid_jobs_parse_and_round_trip(raw: dict[str, Any]) -> None:
    text = contract.dumps(raw)
    assume(contract.text_size(text) <= MAX_JOB_BYTES)
    parsed = parse_message(text)
    assert parsed.raw == raw
    assert (parsed.id, parsed.entity, parsed.operation) == (raw["id"], raw["entity"], raw["operation"])
    key = raw.get("key")
    assert parsed.key == (key.lower() if isinstance(key, str) else key)
    assert parsed.data == raw.get("data")
    assert parsed.act_as == expected_act_as(raw.get("actAs"))
    # every encoding a queue client may use gives the same job
    for body in (text.encode("utf-8"), b"\xef\xbb\xbf" + text.encode("utf-8"), json.dumps(raw)):
        assert parse_message(body) == parsed
    # the canonical text is stable: what is enqueued again parses to the same job
    assert contract.dumps(parsed.raw) == text
    assert parse_message(contract.dumps(parsed.raw)) == parsed
    # a keyless create writes to the same record on every delivery, and only this job does
    write_key = parsed.write_key()
    assert write_key == parse_message(text).write_key()
    if key is None:
        other_id = raw["id"][:127] + ("y" if raw["id"].endswith("x") else "x")
        other = parse_message(contract.dumps({**raw, "id": other_id}))
        assert isinstance(write_key, str) and other.write_key() != write_key


# --- broken jobs -----------------------------------------------------------------------------------


def _names(field: str, where: str, name: str) -> bool:
    """Whether the detail's ``field`` path is ``name`` or inside it (names may contain dots)."""
    relative = field.removeprefix(where).removeprefix(".")
    return relative == name or relative.startswith(name + ".")


@FUZZ
@given(broken_jobs(), st.sampled_from(["", "jobs[0]", "jobs[99]"]))
def test_a_broken_job_names_the_broken_field(broken: tuple[dict[str, Any], str], where: str) -> None:
    job, field = broken
    try:
        parse_job(job, where=where)
    except InvalidJob as exc:
        assert exc.code == "invalid_job"
        assert_invalid_job(exc, where)
        # operation decides whether key and data are required, so its errors may land there
        allowed = {field, "key", "data"} if field == "operation" else {field}
        for detail in exc.details:
            assert any(_names(detail["field"], where, name) for name in allowed), (field, exc.details)
        assert exc.message.startswith(exc.details[0]["field"] + ": ")
    else:
        assert all(name in job for name in ("id", "entity", "operation"))


@FUZZ
@given(json_values)
def test_act_as_accepts_exactly_one_documented_form(value: Any) -> None:
    job = {"id": "j", "entity": "contacts", "operation": "delete", "key": {"a": 1}, "actAs": value}
    try:
        parsed = parse_job(job)
    except InvalidJob as exc:
        assert {d["field"].split(".")[0] for d in exc.details} == {"actAs"}
    else:
        assert parsed.act_as is not None and len(parsed.act_as) == 1
        assert set(parsed.act_as) <= set(ACT_AS_FIELDS)


# --- one delivery ----------------------------------------------------------------------------------


class _Reached(Exception):
    """Raised by the runtime: the message was valid and processing went on to the write."""


class _KeysOnly:
    """A runtime with only the message keys: anything else it is asked for means the job got through."""

    def __init__(self) -> None:
        self.message_keys = KeyRing(FakeSecrets(), "queue-message-signing-key")

    def __getattr__(self, name: str) -> Any:
        raise _Reached


_KEYS_ONLY = _KeysOnly()


def _runtime() -> Any:
    return _KEYS_ONLY


def _signed(body: str | bytes) -> str | bytes:
    """A JSON object is signed as the webhook would (so the schema is what is fuzzed); anything else,
    or an object signing refuses (a foreign ``source``), goes as it is and must be refused."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        value = contract.loads(text.removeprefix("\ufeff"))
    except ValueError:
        return body
    if not isinstance(value, dict) or "_auth" in value:
        return body
    try:
        return signed_text(value)
    except (ValueError, TypeError):
        return body


@FUZZ
@given(any_messages)
def test_process_message_dead_letters_every_invalid_message(body: str | bytes) -> None:
    body = _signed(body)
    try:
        outcome = process_message(body, _runtime)
    except _Reached:
        parse_job(strip(contract.loads(body if isinstance(body, str) else body.decode())))  # only a valid job
        return
    assert outcome.result is None
    record = outcome.dead_letter
    assert record is not None and set(record) == {"job", "reason", "detail", "failedAt"}
    assert record["reason"] in DEAD_LETTER_CODES and record["detail"]
    text = contract.dumps(record)  # strict JSON that fits on a queue
    assert contract.text_size(text) <= MAX_JOB_BYTES
    decoded = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        original: Any = contract.loads(decoded.removeprefix("\ufeff"))
    except ValueError:
        original = decoded
    assert record["job"] == original
    if isinstance(original, dict) and isinstance(original.get("id"), str):
        assert outcome.job_id in (original["id"], None)
    else:
        assert outcome.job_id is None
