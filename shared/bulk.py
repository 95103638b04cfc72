"""Bulk writes: many records of one table, for one actor, in few requests, with an outcome per record.

How a batch is written, and why:

* ``CreateMultiple`` / ``UpdateMultiple`` / ``UpsertMultiple`` when the table supports them (Learn's
  test: an ``sdkmessagefilters`` row for the message and the table; cached per instance).  One request
  per chunk counts ONCE against the 6,000-requests window (Learn, "Use bulk operation messages").
* On standard tables these messages are all-or-nothing: one bad record rolls the whole request back.
  So a request refused for a record's fault (400/404/412, or 413 too large) is split in halves and
  each half sent again (bisect); a single record left over is written on its own with the ordinary
  single-record request, whose answer is that record's own outcome (a replayed create then answers
  412 "already exists" and counts as done, exactly as a single job does).  One bad record among n
  costs about 2·log2(n) extra requests; the others are written, the bad one is reported.
* Otherwise (the table lacks the message, a delete, a key with lookup columns) ``$batch`` with
  INDEPENDENT requests and ``Prefer: odata.continue-on-error`` — not change sets.  The records of a
  bulk job do not depend on each other, so atomicity buys nothing and would cost a bisect per bad
  record; independent requests give every record its own status in the same single round trip, and
  each request is the single-record write (same conditional headers, same no-op rules).
* Alternate-key columns are never repeated in an update/upsert body: the record is named by
  ``@odata.id``, and ``UpsertMultiple`` answers 400 when the key column is in the body too and the
  record does not exist yet (Microsoft's own Python SDK fix, PowerPlatform-DataverseClient-Python#127).
* Errors that are not a record's fault — throttling and 5xx after the client's retries, 401, 403 —
  raise for the whole job: the queue retries it, and every write here is safe to replay.

Impersonation: the caller header goes on every bulk request and on every ``$batch`` part; the job
runner proves the attribution (``WhoAmI`` as the actor) before the first write, and ``$batch`` answers
are checked record by record through ``_modifiedby_value``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.dataverse import (
    DUPLICATE_RECORD_CODE,
    GONE_CODES,
    MODIFIED_BY,
    Caller,
    DataverseClient,
    TableInfo,
    WriteResult,
    entity_path,
    verify_impersonation,
)
from shared.errors import DataverseError, InvalidJob, SyncError
from shared.logs import job_logger
from shared.odatabatch import MAX_BATCH_REQUESTS, BatchOperation, BatchPart

if TYPE_CHECKING:
    from shared.storage import BlobStore

log = logging.getLogger("shared.bulk")

MAX_RECORDS_PER_JOB = 1000
"""Records inline in one job (and the most one bulk request or one ``$batch`` carries)."""
DEFAULT_BATCH_SIZE = 500
"""Records per request.  Learn: "1,000 records per request is a reasonable place to start if the size
of the record data is small and there are no plug-ins"; half that leaves room for plug-ins and for the
client's 30 s timeout, and one bisect of a bad record costs one level less."""
MESSAGES = {"create": "CreateMultiple", "update": "UpdateMultiple", "upsert": "UpsertMultiple"}
_SPLITTABLE = frozenset({400, 404, 412, 413})


@dataclass(frozen=True)
class BulkRecord:
    """One record of a bulk job: its position in the job, the key it is written under, its columns."""

    index: int
    key: str | Mapping[str, Any] | None
    data: Mapping[str, Any] | None


@dataclass(frozen=True)
class RecordOutcome:
    index: int
    result: WriteResult | None  # written (or a no-op: already there / already gone)
    error: SyncError | None  # this record's own permanent failure


@dataclass
class BulkReport:
    entity_set: str
    operation: str
    via: str  # the message used, or "$batch"
    requests: int = 0  # write requests sent (bulk messages, $batch, single-record fallbacks)
    outcomes: list[RecordOutcome] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(1 for o in self.outcomes if o.error is None)

    @property
    def failed(self) -> list[RecordOutcome]:
        return sorted((o for o in self.outcomes if o.error is not None), key=lambda o: o.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entitySet": self.entity_set,
            "operation": self.operation,
            "via": self.via,
            "requests": self.requests,
            "written": self.written,
            "failed": [{"index": o.index, "reason": o.error.code if o.error else None} for o in self.failed],
        }


def is_record_fault(error: BaseException) -> bool:
    """A refusal that one record (or the request's size) may have caused: halves can still succeed."""
    return (
        isinstance(error, DataverseError)
        and not error.transient
        and error.status in _SPLITTABLE
        and error.code != "impersonation_privilege_missing"
    )


def write_bulk(
    client: DataverseClient,
    entity_set: str,
    operation: str,
    records: Sequence[BulkRecord],
    *,
    caller: Caller | None = None,
    correlation_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> BulkReport:
    """Write every record; return each one's outcome.  Raises only for what is not a record's fault."""
    if not 1 <= batch_size <= MAX_BATCH_REQUESTS:
        raise ValueError(f"batch_size must be 1..{MAX_BATCH_REQUESTS}")
    writer = _Writer(client, entity_set, operation, caller, correlation_id)
    writer.report.via = writer.choose(records)
    for start in range(0, len(records), batch_size):
        writer.chunk(list(records[start:start + batch_size]))
    job_logger(log, correlation_id).info(
        "bulk %s entity=%s via=%s records=%d written=%d failed=%d requests=%d",
        operation, entity_set, writer.report.via, len(records), writer.report.written,
        len(writer.report.failed), writer.report.requests,
    )
    return writer.report


class _Writer:
    def __init__(
        self, client: DataverseClient, entity_set: str, operation: str, caller: Caller | None,
        correlation_id: str | None,
    ) -> None:
        self.client = client
        self.entity_set = entity_set
        self.operation = operation
        self.caller = caller
        self.cid = correlation_id
        self.report = BulkReport(entity_set, operation, "$batch")
        self.table: TableInfo | None = None

    def choose(self, records: Sequence[BulkRecord]) -> str:
        message = MESSAGES.get(self.operation)
        if message is None:
            return "$batch"  # DeleteMultiple exists for elastic tables only
        if any(isinstance(r.key, Mapping) and any(n.startswith("_") for n in r.key) for r in records):
            return "$batch"  # a lookup in a key cannot be written as a body column
        if not self.client.supports_message(self.entity_set, message, correlation_id=self.cid):
            return "$batch"
        self.table = self.client.table_info(self.entity_set, correlation_id=self.cid)
        return message

    def chunk(self, records: list[BulkRecord]) -> None:
        if self.report.via == "$batch":
            self.batch(records)
        elif len(records) == 1:
            self.single(records[0])
        else:
            self.bulk(records)

    # -- bulk messages ----------------------------------------------------------------------------

    def bulk(self, records: list[BulkRecord]) -> None:
        assert self.table is not None
        targets = [self.target(r) for r in records]
        self.report.requests += 1
        try:
            body = self.client.bulk_message(
                self.report.via, self.entity_set, targets, caller=self.caller, correlation_id=self.cid
            )
        except DataverseError as exc:
            if not is_record_fault(exc):
                raise
            job_logger(log, self.cid).info(
                "%s of %d records refused (%s %s): splitting in halves",
                self.report.via, len(records), exc.status, exc.dataverse_code,
            )
            middle = len(records) // 2
            self.chunk(records[:middle])
            self.chunk(records[middle:])
            return
        ids = body.get("Ids") if isinstance(body, dict) else None
        status = 200 if body is not None else 204
        for position, record in enumerate(records):
            record_id = _id_of(record.key)
            if record_id is None and isinstance(ids, list) and position < len(ids):
                record_id = ids[position].lower() if isinstance(ids[position], str) else None
            created = True if self.operation == "create" else None
            result = WriteResult(self.operation, self.entity_set, record_id, status, created, False, None)
            self.report.outcomes.append(RecordOutcome(record.index, result, None))

    def target(self, record: BulkRecord) -> dict[str, Any]:
        """One item of ``Targets``: ``@odata.type``, the record's name, its columns (key columns once)."""
        assert self.table is not None
        data = dict(record.data or {})
        body: dict[str, Any] = {"@odata.type": f"Microsoft.Dynamics.CRM.{self.table.logical_name}"}
        key = record.key
        if isinstance(key, str):
            data.pop(self.table.primary_id, None)
            body[self.table.primary_id] = key
            body.update(data)
        elif isinstance(key, Mapping):
            if self.operation == "create":
                body.update({**key, **data})  # a new record needs its key columns (body values win)
            else:
                # named by @odata.id; repeating the key columns in the body is the known 400
                body["@odata.id"] = entity_path(self.entity_set, key)
                body.update({n: v for n, v in data.items() if n not in key})
        else:
            body.update(data)
        return body

    def single(self, record: BulkRecord) -> None:
        """The ordinary single-record write: the record's own answer, with the single-job no-op rules."""
        client, caller, cid = self.client, self.caller, self.cid
        self.report.requests += 1
        try:
            if self.operation == "create":
                assert record.data is not None
                result = client.create(self.entity_set, record.data, key=record.key, caller=caller,
                                       correlation_id=cid)
            elif self.operation == "update":
                assert record.key is not None and record.data is not None
                result = client.update(self.entity_set, record.key, record.data, caller=caller,
                                       correlation_id=cid)
            elif self.operation == "upsert":
                assert record.key is not None and record.data is not None
                result = client.upsert(self.entity_set, record.key, record.data, caller=caller,
                                       correlation_id=cid)
            else:
                assert record.key is not None
                result = client.delete(self.entity_set, record.key, caller=caller, correlation_id=cid)
        except SyncError as exc:
            if not _own_fault(exc):
                raise
            self.report.outcomes.append(RecordOutcome(record.index, None, exc))
            return
        self.report.outcomes.append(RecordOutcome(record.index, result, None))

    # -- $batch -----------------------------------------------------------------------------------

    def batch(self, records: list[BulkRecord]) -> None:
        operations = [self.operation_for(r) for r in records]
        self.report.requests += 1
        parts = self.client.batch(operations, caller=self.caller, correlation_id=self.cid)
        if len(parts) != len(records):
            raise DataverseError(
                f"POST $batch answered {len(parts)} parts for {len(records)} requests",
                code="dataverse_malformed_response", transient=True,
            )
        for record, part in zip(records, parts, strict=True):
            self.report.outcomes.append(self.outcome(record, part))

    def operation_for(self, record: BulkRecord) -> BatchOperation:
        assert record.key is not None
        path = entity_path(self.entity_set, record.key)
        headers: dict[str, str] = dict(self.caller.headers()) if self.caller else {}
        params = None
        if self.caller is not None and self.operation != "delete":
            headers["Prefer"] = "return=representation"
            params = {"$select": MODIFIED_BY}
        url = self.client.url(path, params)
        if self.operation == "delete":
            return BatchOperation("DELETE", url, None, headers)
        if self.operation == "create":
            headers["If-None-Match"] = "*"
        elif self.operation == "update":
            headers["If-Match"] = "*"
        return BatchOperation("PATCH", url, dict(record.data or {}), headers)

    def outcome(self, record: BulkRecord, part: BatchPart) -> RecordOutcome:
        assert record.key is not None
        path = entity_path(self.entity_set, record.key)
        label = f"{self.operation} {path} (in $batch)"
        record_id = _id_of(record.key)
        if 200 <= part.status < 300:
            try:
                body = part.json()
            except ValueError:
                body = None
            modified_by = body.get(MODIFIED_BY) if isinstance(body, dict) else None
            if record_id is None and isinstance(body, dict):
                value = body.get(self.table.primary_id) if self.table else None
                record_id = value.lower() if isinstance(value, str) else None
            created: bool | None = None
            if self.operation == "create":
                created = True
            elif self.operation == "upsert":
                created = part.status == 201
            result = WriteResult(self.operation, self.entity_set, record_id, part.status, created, False,
                                 modified_by if isinstance(modified_by, str) else None)
            if self.caller is not None and self.operation != "delete":
                try:
                    verify_impersonation(result, self.caller, path)
                except SyncError as exc:
                    return RecordOutcome(record.index, None, exc)
            return RecordOutcome(record.index, result, None)
        error = self.client.part_error(part, label)
        code = (error.dataverse_code or "").lower()
        if self.operation == "create" and part.status == 412 and code == DUPLICATE_RECORD_CODE:
            return RecordOutcome(record.index, WriteResult("create", self.entity_set, record_id, 412, False,
                                                           True, None), None)
        if self.operation == "delete" and part.status == 404 and code in GONE_CODES:
            return RecordOutcome(record.index, WriteResult("delete", self.entity_set, record_id, 404, None,
                                                           True, None), None)
        if not _own_fault(error):
            raise error
        return RecordOutcome(record.index, None, error)


def _own_fault(error: SyncError) -> bool:
    """Permanent and not the environment's (a 401 means the application itself is refused)."""
    if error.transient:
        return False
    if isinstance(error, DataverseError):
        return error.code not in ("dataverse_unauthorized", "impersonation_privilege_missing")
    return True


def _id_of(key: str | Mapping[str, Any] | None) -> str | None:
    return key.lower() if isinstance(key, str) else None


def read_blob(store: BlobStore, ref: str, *, max_bytes: int) -> str:
    """The text of a claim-check blob ``<container>/<path>`` in the app's storage account.

    A missing blob is the job's fault (dead-lettered); an unreachable account is not (retried).
    The blob is never deleted here: a retried delivery reads it again (its sender owns its lifetime).
    """
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    container, _, name = ref.partition("/")
    try:
        downloader = store.container(container).get_blob_client(name).download_blob()
        if downloader.size > max_bytes:
            raise InvalidJob(
                f"recordsBlob: the blob is {downloader.size} bytes, more than {max_bytes}",
                code="invalid_job",
                details=[{"field": "recordsBlob", "message": f"{downloader.size} bytes > {max_bytes}"}],
            )
        data = downloader.readall()
    except ResourceNotFoundError:
        raise InvalidJob(
            f"recordsBlob: no blob {name!r} in container {container!r}",
            code="invalid_job",
            details=[{"field": "recordsBlob", "message": "no such blob"}],
        ) from None
    except AzureError as exc:
        raise SyncError(f"recordsBlob: the storage account did not answer ({type(exc).__name__})",
                        code="storage_unavailable", transient=True) from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidJob(
            f"recordsBlob: the blob is not UTF-8 text (byte {exc.start})",
            code="invalid_job",
            details=[{"field": "recordsBlob", "message": "not UTF-8"}],
        ) from None
