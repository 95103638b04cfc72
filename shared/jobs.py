"""Sync jobs: what one delivery of a queue message does (the job itself is ``shared.contract``).

Delivery is at-least-once, so every write must be safe to replay:

* update / upsert are PATCHes, delete answers 404 when already gone (the core reports a no-op);
* create WITH a key is ``PATCH`` + ``If-None-Match: *`` and answers 412 when the record exists (a no-op);
* create WITHOUT a key would be a ``POST`` and create a second record on a replay.  So a keyless create
  is written as a create-with-key with its deterministic primary id (``Job.write_key``,
  ``shared.contract.deterministic_id``).  This is a deliberate choice: the job ``id`` becomes the
  idempotency key of keyless creates, so two jobs of one source must not share an id; ``source`` keeps
  two senders apart.  The core's keyless ``POST`` stays available to other callers.

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

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared import deadline
from shared.contract import (
    MAX_BLOB_BYTES,
    MAX_JOB_BYTES,
    Job,
    decode_message,
    deterministic_id,
    dumps,
    is_job_id,
    loads,
    parse_job,
    parse_records,
    text_size,
)
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
        shown = job_id if isinstance(job_id, str) and is_job_id(job_id) else None
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


# --- bulk jobs (issue 9; their schema is shared.contract's): one actor, many records of one table -----


def bulk_records(job: Job, runtime: Runtime) -> list[dict[str, Any]]:
    """The job's records: inline, or read from its claim-check blob and validated like inline ones."""
    if job.records is not None:
        return list(job.records)
    assert job.records_blob is not None
    from shared.bulk import read_blob

    return parse_records(read_blob(runtime.blobs, job.records_blob, max_bytes=MAX_BLOB_BYTES), job.operation)


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
