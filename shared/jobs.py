"""Sync jobs: the queue message contract, and what one delivery of a message does.

The schema is strict on purpose: an unknown field is an error, because a typo such as ``actas``
silently ignored would write a record as the application user instead of the person named.

Delivery is at-least-once, so every write must be safe to replay:

* update / upsert are PATCHes, delete answers 404 when already gone (the core reports a no-op);
* create WITH a key is ``PATCH`` + ``If-None-Match: *`` and answers 412 when the record exists (a no-op);
* create WITHOUT a key would be a ``POST`` and create a second record on a replay.  So a keyless create
  is given a deterministic primary id, ``uuid5(JOB_NAMESPACE, f"{source}:{entity}:{job.id}")``, and
  written as a create-with-key.  This is a deliberate choice: the job ``id`` becomes the idempotency key
  of keyless creates, so two jobs of one source must not share an id.  ``source`` is the webhook route's
  ``{source}``, stamped on each message by the webhook, so two senders cannot collide (or overwrite each
  other's records by guessing ids); a message without it (queued before the field existed) keeps the old
  ``f"{entity}:{job.id}"`` and replays identically.  The core's keyless ``POST`` stays available to
  other callers.

Outcomes (``process_message``): success; a permanent failure that is the job's own fault (invalid job,
forbidden by the source's authorization policy (``shared.policy``), actor not found / disabled /
ambiguous, impersonation not applied, a permanent Dataverse answer) becomes
a dead-letter record; anything else raises so the host retries and finally moves the message to
``-poison``: transient errors, unexpected exceptions (a bug must not be filed as a bad job), and
environment faults that are not the job's fault (missing settings, Entra/Key Vault misconfiguration,
Dataverse refusing the application user itself) — those jobs are fine and are replayed once fixed.

Logs carry ``job=<id>`` on every line and never a data value: field names, entity, operation and ids.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared import deadline

# the one GUID/email check and the actAs names (re-exported: callers have imported them from here)
from shared.contract import ACT_AS_FIELDS as ACT_AS_FIELDS
from shared.contract import is_email_address as is_email_address
from shared.contract import is_guid as is_guid
from shared.errors import (
    ActorError,
    AuthError,
    ConfigurationError,
    DataverseError,
    ImpersonationNotApplied,
    InvalidJob,
    PolicyViolation,
    SyncError,
    UnauthenticatedMessage,
)
from shared.logs import job_logger
from shared.messages import authenticate, sign

if TYPE_CHECKING:
    from shared.bulk import BulkReport
    from shared.dataverse import Caller, WriteResult
    from shared.runtime import Runtime
    from shared.users import SystemUser

log = logging.getLogger("shared.jobs")

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


def _json_type(value: object) -> str:
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
        errors.add(f"must be a JSON object, got {_json_type(obj)}")
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
                errors.add(f"must be a string, number or boolean, got {_json_type(value)}", "key", name)
        return key
    errors.add(
        f"must be a GUID string or an alternate-key object, got {_json_type(key)}"
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
        errors.add(f"must be an object of column values, got {_json_type(data)}", "data")
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
        errors.add(f"must be an object, got {_json_type(act_as)}{hint}", "actAs")
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
    """Decode and validate one message's job (no signature check: see ``read_message``)."""
    return parse_job(decode_message(body))


def read_message(body: str | bytes, runtime: Callable[[], Runtime]) -> tuple[Any, Job]:
    """(the message as decoded, its job): decoded, authenticated (``shared.messages``), validated.

    Authentication comes before the schema, as at the webhook: a message nobody signed is
    ``unauthenticated_message`` whatever it holds.  Only what cannot be decoded at all is reported first.
    """
    message = decode_message(body)
    job = authenticate(message, runtime().message_keys)
    return message, parse_job(job)


def _describe_key(key: str | Mapping[str, Any] | None) -> str:
    if key is None:
        return "none"
    if isinstance(key, str):
        return key
    return "alt(" + ",".join(sorted(key)) + ")"


def resolve_actor(job: Job, runtime: Runtime) -> SystemUser | None:
    """The user the job acts as (None: the application user); a disabled user is refused here."""
    if job.act_as is None:
        return None
    actor: SystemUser = runtime.users.resolve(job.act_as, correlation_id=job.id)
    if actor.is_disabled:
        raise ActorError(
            f"user {actor.systemuserid} is disabled in Dataverse; refusing to write on their behalf",
            code="actor_disabled",
            details=[{"field": "actAs", "systemUserId": actor.systemuserid}],
        )
    return actor


def run_job(job: Job, runtime: Runtime) -> WriteResult:
    """Resolve the actor, refuse a disabled one, prove Dataverse runs as them, then write once.

    The proof (``WhoAmI`` with the caller header, cached per actor) comes before the first write, so an
    update, upsert or delete never runs under a caller Dataverse would silently ignore.
    """
    runtime.policy.check_job(job)  # before any request: the queue is a way in that skips the webhook
    actor = resolve_actor(job, runtime)
    runtime.policy.check_actor(job, actor, correlation_id=job.id)
    caller = actor.caller() if actor is not None else None
    if actor is not None:
        runtime.attribution.verify(actor, correlation_id=job.id)
    try:
        result = _write(job, runtime, caller)
    except DataverseError as exc:
        if actor is not None and exc.status in (400, 403):
            runtime.attribution.forget(actor.systemuserid)  # the caller may have changed: check again
        raise
    # The core checks _modifiedby_value itself; this second look costs nothing and guards the contract.
    if actor is not None and result.modified_by and result.modified_by.lower() != actor.systemuserid.lower():
        runtime.attribution.forget(actor.systemuserid)
        raise ImpersonationNotApplied(
            f"Dataverse recorded the write as {result.modified_by}, not as the actor {actor.systemuserid}",
            details=[{"field": "actAs", "systemUserId": actor.systemuserid,
                      "modifiedBy": result.modified_by}],
        )
    job_logger(log, job.id).info(
        "outcome=written operation=%s entity=%s key=%s record=%s status=%s noop=%s actor=%s",
        job.operation, job.entity, _describe_key(job.key), result.record_id, result.status,
        result.noop, actor.systemuserid if actor is not None else "application",
    )
    return result


def _write(job: Job, runtime: Runtime, caller: Caller | None) -> WriteResult:
    dataverse = runtime.dataverse
    cid = job.id
    result: WriteResult
    if job.operation == "create":
        assert job.data is not None
        key = job.write_key()
        result = dataverse.create(job.entity, job.data, key=key, caller=caller, correlation_id=cid)
    elif job.operation == "update":
        assert job.data is not None and job.key is not None
        result = dataverse.update(job.entity, job.key, job.data, caller=caller, correlation_id=cid,
                                  **_if_match(job))
    elif job.operation == "upsert":
        assert job.data is not None and job.key is not None
        result = dataverse.upsert(job.entity, job.key, job.data, caller=caller, correlation_id=cid,
                                  **_if_match(job))
    else:
        assert job.key is not None
        result = dataverse.delete(job.entity, job.key, caller=caller, correlation_id=cid, **_if_match(job))
    return result


def _if_match(job: Job) -> dict[str, str]:
    """Only passed when set, so a job without ``ifMatch`` makes exactly the calls it always made."""
    return {"if_match": job.if_match} if job.if_match is not None else {}


@dataclass(frozen=True)
class JobOutcome:
    job_id: str | None
    result: WriteResult | None
    dead_letter: dict[str, Any] | None
    bulk: BulkReport | None = None  # a bulk job's per-record outcomes
    record_dead_letters: tuple[dict[str, Any], ...] = ()  # a bulk job: one per failed record

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead-letter record to write for this delivery (the job's, or one per failed record)."""
        return ([self.dead_letter] if self.dead_letter is not None else []) + list(self.record_dead_letters)


def is_job_fault(error: SyncError) -> bool:
    """Permanent AND caused by this job, so replaying it unchanged can never succeed: dead-letter it.

    Environment faults (settings, Entra, Key Vault, Dataverse refusing the application user) are
    permanent too, but every job would fail the same way; they raise and end in ``-poison``.
    """
    if error.transient:
        return False
    if isinstance(error, ConfigurationError | AuthError):
        return False
    if isinstance(error, DataverseError):
        return error.code != "dataverse_unauthorized"
    return isinstance(error, InvalidJob | ActorError | ImpersonationNotApplied | PolicyViolation
                      | UnauthenticatedMessage)


def dead_letter_record(job: object, error: SyncError, *, now: datetime | None = None) -> dict[str, Any]:
    failed_at = (now or datetime.now(UTC)).astimezone(UTC)
    return {
        "job": job,
        "reason": error.code,
        "detail": error.message,
        "failedAt": failed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def _original(body: str | bytes) -> object:
    """The job as it arrived: the JSON value if it parses, else the raw text."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        return loads(text.removeprefix("\ufeff"))
    except ValueError:
        # a str message may hold raw lone surrogates; escape them so the record itself is UTF-8 text
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def process_message(body: str | bytes, runtime: Callable[[], Runtime]) -> JobOutcome:
    """One delivery of one message.  Returns success or a dead-letter record; raises to have it retried.

    The caller hands in the runtime, as it does to ``run_reconciliation``; as a factory, called only once
    the message decodes as JSON (its signature is checked with the app's message key, before its schema),
    so text that is not JSON is dead-lettered even when settings are missing.

    A dead-letter record that would not fit on a queue (a near-limit job full of characters JSON must
    escape) is not truncated: the function raises, and the host keeps the original in ``-poison``.
    """
    started = time.monotonic()  # the job's deadline counts from its delivery
    try:
        message, job = read_message(body, runtime)
    except (InvalidJob, UnauthenticatedMessage) as exc:
        if exc.transient:
            job_logger(log, None).warning("outcome=retry reason=%s detail=%s", exc.code, exc.message)
            raise
        original = _original(body)
        job_id = original.get("id") if isinstance(original, dict) else None
        shown = job_id if isinstance(job_id, str) and _ID.fullmatch(job_id) else None
        job_logger(log, shown).warning("outcome=dead-letter reason=%s detail=%s", exc.code, exc.message)
        return JobOutcome(shown, None, _fit(dead_letter_record(original, exc), shown))

    jlog = job_logger(log, job.id)
    jlog.info(
        "received operation=%s entity=%s key=%s actAs=%s fields=%s",
        job.operation, job.entity, _describe_key(job.key),
        ",".join(job.act_as) if job.act_as else "application", ",".join(job.data or ()),
    )
    try:
        current = runtime()
        # Waits end by JOB_DEADLINE_SECONDS, well inside functionTimeout: a job whose invocation the
        # host gave up on would be redelivered and run twice at once (shared.deadline).
        with deadline.within(current.settings.job_deadline_seconds, kind=deadline.JOB,
                             setting="JOB_DEADLINE_SECONDS", started=started):
            if job.is_bulk:
                report, letters = run_bulk_job(job, current)
                sealed = [_sealed(x, job, current) for x in letters]
                return JobOutcome(job.id, None, None, report, tuple(_fit(x, job.id) for x in sealed))
            result = run_job(job, current)
    except SyncError as exc:
        if exc.transient:
            jlog.warning("outcome=retry reason=%s detail=%s", exc.code, exc.message)
            raise
        if not is_job_fault(exc):
            jlog.error("outcome=retry reason=%s (environment, not the job) detail=%s", exc.code, exc.message)
            raise
        jlog.warning("outcome=dead-letter reason=%s detail=%s", exc.code, exc.message)
        # the message as it came (with its _auth): a replay from -deadletter still verifies
        return JobOutcome(job.id, None, _fit(dead_letter_record(message, exc), job.id))
    except Exception:
        jlog.exception("outcome=retry reason=unexpected_error")
        raise
    return JobOutcome(job.id, result, None)


def _sealed(letter: dict[str, Any], job: Job, runtime: Runtime) -> dict[str, Any]:
    """A failed record of a verified bulk job, signed for the job's source: replayable as is (the record
    is a new message the app derived from an authenticated one, so the app vouches for it)."""
    assert job.source is not None  # an authenticated message always names its source
    return {**letter, "job": sign(letter["job"], job.source, runtime.message_keys.signing_key())}


def _fit(record: dict[str, Any], job_id: str | None) -> dict[str, Any]:
    size = text_size(dumps(record))
    if size > MAX_JOB_BYTES:
        job_logger(log, job_id).error(
            "dead-letter record is %d bytes, too large for a queue message; "
            "raising so the host keeps the original message in -poison", size,
        )
        raise SyncError(
            f"dead-letter record of {size} bytes exceeds {MAX_JOB_BYTES}", code="dead_letter_too_large"
        )
    return record


# --- bulk jobs (issue 9): many records of one table for one actor --------------------------------
# The job keeps its single-record fields (id, entity, operation, actAs, source); instead of key/data it
# carries "records" (inline, up to 1,000) or "recordsBlob" (a claim-check in the app's storage account,
# for batches that do not fit a 48 KiB queue message).  See docs/bulk.md.

MAX_INLINE_RECORDS = 1000
MAX_BLOB_RECORDS = 10_000
MAX_BLOB_BYTES = 32 * 1024 * 1024
MAX_RECORD_BYTES = 32 * 1024
"""One record of a blob batch: its dead-letter record (the record as a single job) must fit a queue."""
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
        return None, ref
    records = obj["records"]
    if not isinstance(records, list):
        errors.add(f"must be an array of records, got {_json_type(records)}", "records")
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
            sub.add(f"must be an object with {' and '.join(RECORD_FIELDS)}, got {_json_type(record)}")
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


def bulk_records(job: Job, runtime: Runtime) -> list[dict[str, Any]]:
    """The job's records: inline, or read from its claim-check blob and validated like inline ones."""
    if job.records is not None:
        return list(job.records)
    assert job.records_blob is not None
    from shared.bulk import read_blob

    text = read_blob(runtime.blobs, job.records_blob, max_bytes=MAX_BLOB_BYTES)
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
    records = check_records(value, job.operation, errors, where)
    for index, record in enumerate(records):
        if not errors.items and text_size(dumps(record)) > MAX_RECORD_BYTES:
            errors.add(f"a record may hold at most {MAX_RECORD_BYTES} bytes", f"{where}[{index}]")
    if errors.items:
        raise _invalid(errors)
    return list(records)


def record_job(job: Job, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
    """One record of a bulk job as a single-record job: its dead-letter record can be replayed as is.

    A keyless create gets its deterministic id as an explicit key, so a replay writes the same record.
    """
    suffix = f".{index}"
    single: dict[str, Any] = {"id": job.id[: 128 - len(suffix)] + suffix, "entity": job.entity,
                              "operation": job.operation}
    key = record.get("key")
    if key is None and job.operation == "create":
        key = str(deterministic_id(job.entity, f"{job.id}/{index}", job.source))
    if key is not None:
        single["key"] = key
    if "data" in record:
        single["data"] = record["data"]
    if job.act_as is not None:
        single["actAs"] = job.raw.get("actAs", job.act_as)
    if job.source is not None:
        single["source"] = job.source
    return single


def run_bulk_job(job: Job, runtime: Runtime) -> tuple[BulkReport, list[dict[str, Any]]]:
    """Resolve and verify the actor once, write every record, dead-letter each failed record.

    Returns the report and one dead-letter record per failed record (``job`` is that record as a
    replayable single-record job; ``bulk`` names the bulk job and the record's index).  Raises like
    ``run_job`` for what is not one record's fault, so the whole job is retried.
    """
    from shared.bulk import BulkRecord, write_bulk

    runtime.policy.check_job(job)  # the table, operation and inline records, before the blob is read
    records = bulk_records(job, runtime)
    runtime.policy.check_job(job, records)  # every record, before any Dataverse request
    actor = resolve_actor(job, runtime)
    runtime.policy.check_actor(job, actor, correlation_id=job.id)
    caller = actor.caller() if actor is not None else None
    if actor is not None:
        runtime.attribution.verify(actor, correlation_id=job.id)
    items = []
    for index, record in enumerate(records):
        key = record.get("key")
        if key is None and job.operation == "create":
            key = str(deterministic_id(job.entity, f"{job.id}/{index}", job.source))
        items.append(BulkRecord(index, key, record.get("data")))
    try:
        report = write_bulk(runtime.dataverse, job.entity, job.operation, items, caller=caller,
                            correlation_id=job.id)
    except DataverseError as exc:
        if actor is not None and exc.status in (400, 403):
            runtime.attribution.forget(actor.systemuserid)
        raise
    now = datetime.now(UTC)
    letters = []
    for outcome in report.failed:
        assert outcome.error is not None
        letter = dead_letter_record(record_job(job, outcome.index, records[outcome.index]), outcome.error,
                                    now=now)
        letter["bulk"] = {"job": job.id, "index": outcome.index, "records": len(records)}
        letters.append(letter)
    job_logger(log, job.id).info(
        "outcome=%s operation=%s entity=%s records=%d written=%d dead-lettered=%d via=%s requests=%d "
        "actor=%s",
        "written" if not letters else "partial", job.operation, job.entity, len(records), report.written,
        len(letters), report.via, report.requests, actor.systemuserid if actor is not None else "application",
    )
    return report, letters
