"""The job contract: what a job is, as text and as a value, and the one GUID and email check.

Everything a sender, the webhook, the queue trigger and the operator CLI must agree on lives here: the
job schema (``Job``, ``parse_job``; a bulk job's ``records`` / ``recordsBlob``), the strict JSON codec
(``loads`` / ``dumps``, the queue's size limit ``MAX_JOB_BYTES``), ``parse_message`` for one queue
message, and the HTTP error body.  Running a job is ``shared.jobs``; signing a message is
``shared.messages``.

The schema is strict on purpose: an unknown field is an error, because a typo such as ``actas``
silently ignored would write a record as the application user instead of the person named.

A keyless create is given a deterministic primary id, ``uuid5(JOB_NAMESPACE,
f"{source}:{entity}:{job.id}")``, so a replay writes the same record (see ``shared.jobs``): the job
``id`` is the idempotency key of keyless creates, and ``source`` (the webhook route's ``{source}``,
stamped on each message by the webhook) keeps two senders apart; a message without it (queued before the
field existed) keeps the old ``f"{entity}:{job.id}"`` and replays identically.

It sits low in shared/ (it imports only ``shared.errors``), so the user directory, the policy, the
reconciliation, the diagnostics, the webhook and the operator CLI use the same schema and the same checks
without importing the module that runs jobs — imports in shared/ run one way (see ``.importlinter``).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidJob

ACT_AS_FIELDS = ("email", "systemUserId", "azureAdObjectId")
"""The ways a job names the user to act as; exactly one is given."""

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+")
_MAX_EMAIL = 254


def is_email_address(value: object) -> bool:
    """A deliberately loose check: one ``@``, something on each side, no spaces; quotes are fine (o'brien)."""
    return (
        isinstance(value, str)
        and len(value) <= _MAX_EMAIL
        and _EMAIL.fullmatch(value) is not None
        and not value.endswith(".")
    )


def is_guid(value: object) -> bool:
    return isinstance(value, str) and _GUID.fullmatch(value) is not None


MAX_JOB_BYTES = 48 * 1024
"""A queue message is at most 64 KiB after base64, i.e. 48 KiB of JSON text (UTF-8 bytes)."""

OPERATIONS = ("create", "update", "upsert", "delete")
FIELDS = ("id", "entity", "operation", "key", "data", "actAs", "source", "records", "recordsBlob", "ifMatch")
RECORD_FIELDS = ("key", "data")
"""A bulk job's records: each has the single-record job's ``key`` and ``data`` for its operation."""

JOB_NAMESPACE = uuid.UUID("5b0c7c8e-2f4a-5d8e-9a57-3c1d0e6f9b21")
"""Fixed forever: changing it would make replays of old keyless creates create duplicates."""

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SOURCE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""The webhook route's ``{source}``; the webhook stamps it on every message as ``source``."""
_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Alternate keys may include lookup columns, which Dataverse names _<column>_value.
_KEY_PROPERTY = re.compile(r"_?[a-z][a-z0-9_]*")
# An ETag as Dataverse sends it (W/"<rowversion>"), or a strong one: quoted, printable, no quote inside.
_ETAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e]{1,128}"')


@dataclass(frozen=True)
class Job:
    id: str
    entity: str
    operation: str
    key: str | dict[str, Any] | None
    data: dict[str, Any] | None
    act_as: dict[str, str] | None
    raw: dict[str, Any]
    source: str | None = None
    if_match: str | None = None
    records: tuple[dict[str, Any], ...] | None = None  # a bulk job's inline records (validated)
    records_blob: str | None = None  # a bulk job's claim-check: "<container>/<path>"

    @property
    def is_bulk(self) -> bool:
        return self.records is not None or self.records_blob is not None

    def write_key(self) -> str | dict[str, Any]:
        """The key the write uses: the job's own, or the deterministic id of a keyless create."""
        if self.key is not None:
            return self.key
        return str(deterministic_id(self.entity, self.id, self.source))


def deterministic_id(entity: str, job_id: str, source: str | None = None) -> uuid.UUID:
    """The primary id a keyless create gets, the same on every delivery of the same job.

    With a ``source`` (stamped by the webhook) two senders reusing a job id get different records;
    without one the old name is kept, so messages queued before the field existed replay identically.
    """
    name = f"{entity}:{job_id}" if source is None else f"{source}:{entity}:{job_id}"
    return uuid.uuid5(JOB_NAMESPACE, name)


def json_type(value: object) -> str:
    """How an error message names a JSON value's type (policy validation words it the same way)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Errors:
    """Collects every problem of a job at once, so a sender fixes them in one round trip."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[dict[str, Any]] = []

    def field(self, *parts: str) -> str:
        path = ".".join(p for p in parts if p)
        if not self.where:
            return path or "job"
        return f"{self.where}.{path}" if path else self.where

    def add(self, message: str, *parts: str) -> None:
        self.items.append({"field": self.field(*parts), "message": message})


def parse_job(obj: object, *, where: str = "") -> Job:
    """Validate one job (already decoded JSON).  ``where`` prefixes field names, e.g. ``jobs[3]``."""
    errors = _Errors(where)
    if not isinstance(obj, dict):
        errors.add(f"must be a JSON object, got {json_type(obj)}")
        raise _invalid(errors)

    for name in obj:
        if name not in FIELDS:
            errors.add(f"unknown field (allowed: {', '.join(FIELDS)})", name)

    job_id = obj.get("id")
    if "id" not in obj:
        errors.add("is required", "id")
    elif not isinstance(job_id, str) or _ID.fullmatch(job_id) is None:
        errors.add("must be 1-128 characters of A-Z a-z 0-9 . _ : -", "id")

    entity = obj.get("entity")
    if "entity" not in obj:
        errors.add("is required", "entity")
    elif not isinstance(entity, str) or _NAME.fullmatch(entity) is None:
        errors.add("must be an entity set name matching ^[a-z][a-z0-9_]*$ (e.g. contacts)", "entity")

    operation = obj.get("operation")
    if "operation" not in obj:
        errors.add("is required", "operation")
    elif operation not in OPERATIONS:
        errors.add(f"must be one of {', '.join(OPERATIONS)}", "operation")

    records: tuple[dict[str, Any], ...] | None = None
    records_blob: str | None = None
    if "records" in obj or "recordsBlob" in obj:
        records, records_blob = check_bulk_fields(obj, operation, errors)
        key, data = None, None
    else:
        key = _check_key(obj, operation, errors)
        data = _check_data(obj, operation, errors)
    act_as = _check_act_as(obj, errors)
    source = obj.get("source")
    if "source" in obj and (not isinstance(source, str) or SOURCE.fullmatch(source) is None):
        errors.add("must be 1-64 characters of A-Z a-z 0-9 . _ -", "source")
    if_match = _check_if_match(obj, operation, errors)

    if errors.items:
        raise _invalid(errors)
    assert isinstance(job_id, str) and isinstance(entity, str) and isinstance(operation, str)
    assert source is None or isinstance(source, str)
    return Job(id=job_id, entity=entity, operation=operation, key=key, data=data, act_as=act_as, raw=obj,
               source=source, records=records, records_blob=records_blob,
               if_match=if_match)


def _check_if_match(obj: Mapping[str, Any], operation: object, errors: _Errors) -> str | None:
    """``ifMatch``: the ETag of the version the sender last read; the write is sent with ``If-Match``.

    So an older job (a late redelivery, a replay from -deadletter) cannot overwrite a newer write:
    Dataverse answers 412 and the job is dead-lettered ``precondition_failed``.  Meaningless for a
    create (there is no version yet), so refused there rather than ignored.
    """
    if "ifMatch" not in obj:
        return None
    value = obj["ifMatch"]
    if operation == "create":
        errors.add("is not allowed for create (a new record has no version to match)", "ifMatch")
        return None
    if "records" in obj or "recordsBlob" in obj:
        errors.add("is not allowed for a bulk job (one ETag cannot match many records)", "ifMatch")
        return None
    if not isinstance(value, str) or _ETAG.fullmatch(value) is None:
        errors.add('must be an ETag from a previous read, e.g. W/"12345678"', "ifMatch")
        return None
    return value


def _check_key(obj: Mapping[str, Any], operation: object, errors: _Errors) -> str | dict[str, Any] | None:
    if "key" not in obj:
        if operation in ("update", "upsert", "delete"):
            errors.add(f"is required for {operation}", "key")
        return None
    key = obj["key"]
    if isinstance(key, str):
        if not is_guid(key):
            errors.add("a string key must be the record's primary id (a GUID)", "key")
            return None
        return key.lower()
    if isinstance(key, dict):
        if not key:
            errors.add("an alternate key must name at least one column", "key")
            return None
        for name, value in key.items():
            if _KEY_PROPERTY.fullmatch(name) is None:
                errors.add("must be a column name matching ^_?[a-z][a-z0-9_]*$", "key", name)
            elif isinstance(value, float) and not math.isfinite(value):
                errors.add("must be a finite number", "key", name)
            elif not isinstance(value, str | int | float | bool):
                errors.add(f"must be a string, number or boolean, got {json_type(value)}", "key", name)
        return key
    errors.add(
        f"must be a GUID string or an alternate-key object, got {json_type(key)}"
        + (" (omit it instead of null)" if key is None else ""),
        "key",
    )
    return None


def _check_data(obj: Mapping[str, Any], operation: object, errors: _Errors) -> dict[str, Any] | None:
    if operation == "delete":
        if "data" in obj:
            errors.add("must be absent for delete", "data")
        return None
    if "data" not in obj:
        if operation in OPERATIONS:
            errors.add(f"is required for {operation}", "data")
        return None
    data = obj["data"]
    if not isinstance(data, dict):
        errors.add(f"must be an object of column values, got {json_type(data)}", "data")
        return None
    if not data:
        errors.add("must not be empty", "data")
        return None
    return data


def _check_act_as(obj: Mapping[str, Any], errors: _Errors) -> dict[str, str] | None:
    if "actAs" not in obj:
        return None
    act_as = obj["actAs"]
    if not isinstance(act_as, dict):
        hint = " (omit it to act as the application user)" if act_as is None else ""
        errors.add(f"must be an object, got {json_type(act_as)}{hint}", "actAs")
        return None
    unknown = [name for name in act_as if name not in ACT_AS_FIELDS]
    for name in unknown:
        errors.add(f"unknown field (allowed: {', '.join(ACT_AS_FIELDS)})", "actAs", name)
    present = [name for name in ACT_AS_FIELDS if name in act_as]
    if len(present) != 1:
        if not unknown:
            errors.add(f"must have exactly one of {', '.join(ACT_AS_FIELDS)}", "actAs")
        return None
    (name,) = present
    value = act_as[name]
    if name == "email":
        if not is_email_address(value):
            errors.add("must be an email address", "actAs", name)
            return None
    elif not is_guid(value):
        errors.add("must be a GUID", "actAs", name)
        return None
    if unknown:
        return None
    assert isinstance(value, str)
    return {name: value if name == "email" else value.lower()}


def problems_message(details: list[dict[str, Any]]) -> str:
    """One line for a list of ``{"field", "message"}`` problems: the first, and how many more."""
    first = details[0]
    more = len(details) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{first['field']}: {first['message']}{suffix}"


def _invalid(errors: _Errors) -> InvalidJob:
    return InvalidJob(problems_message(errors.items), code="invalid_job", details=errors.items)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate field {name!r}")
        result[name] = value
    return result


def loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no numbers that overflow to infinity, no duplicate fields.

    A duplicate field would make the signed bytes and the parsed job disagree about, say, ``actAs``.
    Nesting is bounded too: json recurses per level, so a few thousand brackets (well inside the size
    limits) would raise RecursionError here, or later when the parsed value is dumped again.
    A lone surrogate (``"\\ud800"``) is refused as well: json decodes it to a str that can never be
    encoded as UTF-8, so it would fail later — re-serialising for the queue (a 500 at the webhook) or
    sending to Dataverse (a poisoned message) — instead of being reported as the sender's bad JSON.
    """
    if _too_deep(text):
        raise ValueError(f"JSON nested more than {MAX_NESTING} levels deep")
    value = json.loads(
        text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
    )
    _refuse_surrogates(value)
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_surrogates(value: object) -> None:
    """Raise ValueError naming the first string (key or value) with a surrogate code point."""
    pending: list[object] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                raise ValueError(
                    f"a string holds the lone surrogate \\u{ord(found.group()):04x}, not Unicode text"
                )
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


MAX_NESTING = 64
"""Far beyond any Dataverse payload, far below the interpreter's recursion limit."""
# a string literal (an unterminated one runs to the end: one linear pass), or a bracket
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


def _too_deep(text: str) -> bool:
    """Whether arrays/objects nest deeper than MAX_NESTING (counted without recursion)."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    depth = 0
    for token in _STRING_OR_BRACKET.findall(text):
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def dumps(job: object) -> str:
    """The canonical text of a job on the queue (compact, UTF-8, field order kept)."""
    return json.dumps(job, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def text_size(text: str) -> int:
    """UTF-8 bytes; a lone surrogate counts its 3 bytes instead of raising, so the JSON check names it."""
    return len(text.encode("utf-8", errors="surrogatepass"))


def _decode(body: str | bytes) -> str:
    if isinstance(body, str):
        return body
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidJob(
            f"message is not UTF-8 text (byte {exc.start})",
            code="invalid_json",
            details=[{"field": "job", "message": "not UTF-8"}],
        ) from None


def decode_message(body: str | bytes) -> Any:
    """The JSON value of one queue message: ``invalid_json`` or ``job_too_large``."""
    size = len(body) if isinstance(body, bytes) else text_size(body)
    if size > MAX_JOB_BYTES:
        raise InvalidJob(
            f"message is {size} bytes, more than {MAX_JOB_BYTES}",
            code="job_too_large",
            details=[{"field": "job", "message": f"{size} bytes > {MAX_JOB_BYTES}"}],
        )
    text = _decode(body)
    try:
        obj = loads(text)
    except ValueError as exc:
        raise InvalidJob(
            f"message is not valid JSON: {exc}",
            code="invalid_json",
            details=[{"field": "job", "message": str(exc)}],
        ) from None
    return obj


def parse_message(body: str | bytes) -> Job:
    """Decode and validate one message's job (no signature check: see ``shared.jobs.read_message``)."""
    return parse_job(decode_message(body))


def is_job_id(value: object) -> bool:
    """Whether ``value`` is a valid job ``id`` (safe to show in a log line)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The HTTP error body of every route: ``{"error": {"code", "message", "details"}}``."""
    return {"error": {"code": code, "message": message, "details": details or []}}


# --- bulk jobs (issue 9): many records of one table for one actor ---------------------------------
# The job keeps its single-record fields (id, entity, operation, actAs, source); instead of key/data it
# carries "records" (inline, up to 1,000) or "recordsBlob" (a claim-check in the app's storage account,
# for batches that do not fit a 48 KiB queue message).  See docs/bulk.md.

MAX_INLINE_RECORDS = 1000
MAX_BLOB_RECORDS = 10_000
MAX_BLOB_BYTES = 32 * 1024 * 1024
MAX_RECORD_BYTES = 32 * 1024
"""One record of a blob batch: its dead-letter record (the record as a single job) must fit a queue."""
APP_STATE_CONTAINERS = ("reconciliation", "webhook-replay", "dataverse-throttle", "config")
"""The app's own state (roster and snapshots, replay window, throttle, policy): never a job's claim-check,
whatever the sender writes (the infra grants the app these containers for its own use)."""
_BLOB_REF = re.compile(r"([a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62})/([^\x00-\x1f\x7f\\]{1,1024})")


def check_bulk_fields(
    obj: Mapping[str, Any], operation: object, errors: _Errors
) -> tuple[tuple[dict[str, Any], ...] | None, str | None]:
    """Validate a bulk job's own fields; problems go into ``errors`` with paths like records[17].key."""
    bulk_field = "records" if "records" in obj else "recordsBlob"
    if "key" in obj or "data" in obj:
        errors.add("a bulk job has no top-level key or data (each record has its own): give one or the other",
                   bulk_field)
        return None, None
    if "records" in obj and "recordsBlob" in obj:
        errors.add("give records or recordsBlob, not both", "recordsBlob")
        return None, None
    if "recordsBlob" in obj:
        ref = obj["recordsBlob"]
        if not isinstance(ref, str) or _BLOB_REF.fullmatch(ref) is None:
            errors.add("must be '<container>/<blob path>' (container: 3-63 of a-z 0-9 -)", "recordsBlob")
            return None, None
        if ref.startswith("azure-webjobs-"):
            errors.add("must not name the Functions host's own containers (azure-webjobs-*)", "recordsBlob")
            return None, None
        if ref.split("/", 1)[0] in APP_STATE_CONTAINERS:
            errors.add(f"must not name the app's own state containers ({', '.join(APP_STATE_CONTAINERS)}); "
                       "claim-checks go to bulk-records", "recordsBlob")
            return None, None
        return None, ref
    records = obj["records"]
    if not isinstance(records, list):
        errors.add(f"must be an array of records, got {json_type(records)}", "records")
        return None, None
    if not 1 <= len(records) <= MAX_INLINE_RECORDS:
        errors.add(f"must hold 1 to {MAX_INLINE_RECORDS} records (more: use recordsBlob), got {len(records)}",
                   "records")
        return None, None
    return check_records(records, operation, errors, errors.field("records")), None


def check_records(
    records: list[Any], operation: object, errors: _Errors, where: str
) -> tuple[dict[str, Any], ...]:
    """Each record as the single-record job checks key and data for the operation (``where[i].key``)."""
    checked: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        sub = _Errors(f"{where}[{index}]")
        sub.items = errors.items  # one list: every problem of the job at once
        if not isinstance(record, dict):
            sub.add(f"must be an object with {' and '.join(RECORD_FIELDS)}, got {json_type(record)}")
            continue
        for name in record:
            if name not in RECORD_FIELDS:
                sub.add(f"unknown field (allowed: {', '.join(RECORD_FIELDS)})", name)
        key = _check_key(record, operation, sub)
        data = _check_data(record, operation, sub)
        entry: dict[str, Any] = {}
        if key is not None:
            entry["key"] = key
        if data is not None:
            entry["data"] = data
        checked.append(entry)
    return tuple(checked)


def parse_records(text: str, operation: str) -> list[dict[str, Any]]:
    """A ``recordsBlob``'s text: a JSON array of records, each checked like an inline one."""
    where = "recordsBlob"
    try:
        value = loads(text)
    except ValueError as exc:
        raise InvalidJob(f"{where}: the blob is not valid JSON: {exc}", code="invalid_job",
                         details=[{"field": where, "message": f"not valid JSON: {exc}"}]) from None
    errors = _Errors("")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_BLOB_RECORDS:
        errors.add(f"must hold a JSON array of 1 to {MAX_BLOB_RECORDS} records", where)
        raise _invalid(errors)
    records = check_records(value, operation, errors, where)
    for index, record in enumerate(records):
        if not errors.items and text_size(dumps(record)) > MAX_RECORD_BYTES:
            errors.add(f"a record may hold at most {MAX_RECORD_BYTES} bytes", f"{where}[{index}]")
    if errors.items:
        raise _invalid(errors)
    return list(records)
