"""Dataverse bulk writes for the emulator: ``CreateMultiple`` / ``UpdateMultiple`` / ``UpsertMultiple``,
``sdkmessagefilters`` (which tables support them) and ``$batch`` (independent requests and change sets).

Wire facts, with sources (Learn: "Use bulk operation messages", "Execute batch operations using the
Web API"; [obs] = seen in real answers quoted in public issues; [inferred] = not documented, chosen):

* ``POST <set>/Microsoft.Dynamics.CRM.CreateMultiple`` with ``{"Targets": [...]}``; each target must
  carry ``@odata.type``.  CreateMultiple answers 200 ``{"Ids": [...]}``; UpdateMultiple 204;
  UpsertMultiple 200 ``{"Ids": [...]}`` [inferred: Learn documents only the SDK's Results].
* On standard tables a bulk message is all-or-nothing: any failing record rolls the request back and
  the answer is that record's ordinary error (its code and message, e.g. 412 0x80060892).
* A table supports a message when ``sdkmessagefilters`` has a row for it; the seeded ``leads`` table
  has none (some standard tables lack them), so clients must fall back to ``$batch``.  A bulk message
  on such a table: 400 "The '<message>' method does not support entities of type '<table>'" [inferred
  from the SDK's message for unsupported messages].
* ``UpsertMultiple`` with an alternate-key column both in ``@odata.id`` and in the body answers 400
  0x80040216 "An unexpected error occurred." when the record does not exist yet; the update path
  tolerates it [obs: microsoft/PowerPlatform-DataverseClient-Python#127].
* ``$batch``: multipart/mixed, at most 1000 requests; a change set is atomic (GET not allowed in one);
  without ``Prefer: odata.continue-on-error`` the first failure ends the batch and its status is the
  batch's; with it the batch answers 200 and every request its own status.  A failed change set is
  answered by the failing request alone [inferred from the OData 4.0 protocol, 11.7.4].
* Service protection: one bulk request or one ``$batch`` is ONE request in the window; its execution
  time (measured, so proportional to its records) counts in full (Learn FAQ, "How are API limits
  applied?").

Counters: ``bulk:<Message>`` per bulk request, ``bulk:records`` per target, ``batch:requests`` per
request inside a ``$batch``, ``batch:<METHOD> <resource>`` and ``batch:caller:<header>`` per part.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flask import Response, current_app, request

from devstack.dataverse import odata
from devstack.dataverse.api import (
    _PAYLOAD_HELP,
    CALLER_HEADERS,
    _error_response,
    _json,
    _Request,
    _split_api_path,
)
from devstack.dataverse.state import (
    CODE_KEY_NOT_FOUND,
    CODE_NOT_FOUND,
    CODE_ODATA,
    CODE_PAYLOAD,
    SERVICE,
    DataverseError,
    Org,
    Table,
    _lower_guid,
)

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")
TABLES_WITHOUT_BULK = frozenset({"lead"})
MAX_BATCH_REQUESTS = 1000
CODE_UNEXPECTED = "0x80040216"
_FILTER_RE = re.compile(
    r"\s*sdkmessageid/name eq '((?:[^']|'')*)' and primaryobjecttypecode eq '((?:[^']|'')*)'\s*"
)


def supported(table: Table, message: str) -> bool:
    return message in MESSAGES and table.logical_name not in TABLES_WITHOUT_BULK


# --- transactions ---------------------------------------------------------------------------------


@contextlib.contextmanager
def transaction(org: Org) -> Iterator[None]:
    """All or nothing: under the org's lock, undo every record write if the block raises."""
    with org.lock:
        outer, org.journal = org.journal, []
        try:
            yield
        except BaseException:
            for table, record_id, before in reversed(org.journal):
                current = table.records.get(record_id)
                if current is not None:
                    table.index_remove(current)
                    del table.records[record_id]
                if before is not None:
                    table.records[record_id] = before
                    table.index_add(before)
            raise
        finally:
            done = org.journal
            org.journal = outer
            if outer is not None:
                outer.extend(done)


# --- sdkmessagefilters ----------------------------------------------------------------------------


def sdkmessagefilters(handler: _Request) -> Response:
    """GET sdkmessagefilters: only Learn's documented test (message name AND table), as literals."""
    if handler.method != "GET":
        raise handler.not_supported(f"{handler.method} on sdkmessagefilters")
    if handler.resource.key is not None or handler.resource.rest:
        raise handler.not_supported("sdkmessagefilters by key")
    args = request.args
    for name in args:
        if name not in ("$select", "$filter"):
            raise handler.not_supported(f"The query option {name} on sdkmessagefilters")
    select = args.get("$select", "sdkmessagefilterid")
    if select.replace(" ", "") not in ("sdkmessagefilterid",):
        raise handler.not_supported("$select other than sdkmessagefilterid on sdkmessagefilters")
    match = _FILTER_RE.fullmatch(args.get("$filter", ""))
    if match is None:
        raise handler.not_supported(
            "a $filter on sdkmessagefilters other than "
            "\"sdkmessageid/name eq '<message>' and primaryobjecttypecode eq '<table>'\""
        )
    message, logical = (value.replace("''", "'") for value in match.groups())
    rows = []
    for table in handler.org.tables.values():
        if table.logical_name == logical.lower() and supported(table, message):
            row_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{handler.org.organization_id}:{message}:{logical}"))
            rows.append({"@odata.etag": 'W/"1000000"', "sdkmessagefilterid": row_id})
    context = handler.context("sdkmessagefilters(sdkmessagefilterid)")
    return _json(200, {"@odata.context": context, "value": rows})


# --- bulk messages --------------------------------------------------------------------------------


def bulk_message(handler: _Request, table: Table, message: str) -> Response:
    if message not in MESSAGES:
        raise handler.not_supported(f"The action Microsoft.Dynamics.CRM.{message}")
    if handler.method != "POST":
        raise handler.method_not_allowed()
    org = handler.org
    if not supported(table, message):
        raise DataverseError(
            400, CODE_UNEXPECTED,
            f"The '{message}' method does not support entities of type '{table.logical_name}'.",
        )
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise DataverseError(
            400, CODE_PAYLOAD, _PAYLOAD_HELP.format(entity_set=table.entity_set, inner=f"Invalid JSON. {err}")
        ) from err
    targets = body.get("Targets") if isinstance(body, dict) else None
    if not isinstance(targets, list) or not targets:
        raise DataverseError(400, CODE_PAYLOAD, "The parameter 'Targets' must be a non-empty collection.")
    org.sandbox.counters.count(SERVICE, f"bulk:{message}")
    org.sandbox.counters.count(SERVICE, "bulk:records", len(targets))
    ids: list[str] = []
    with transaction(org):
        for target in targets:
            ids.append(_write_target(handler, table, message, target))
    if message == "UpdateMultiple":
        return Response(status=204)
    context = handler.context(f"Microsoft.Dynamics.CRM.{message}Response")
    return _json(200, {"@odata.context": context, "Ids": ids})


def _write_target(handler: _Request, table: Table, message: str, target: object) -> str:
    org = handler.org
    if not isinstance(target, dict):
        handler.payload(table, target)  # raises "A JSON object was expected for an entity."
        raise AssertionError("unreachable")
    kind = target.get("@odata.type")
    if not isinstance(kind, str) or kind.lstrip("#") != f"Microsoft.Dynamics.CRM.{table.logical_name}":
        raise DataverseError(
            400, CODE_PAYLOAD,
            "Each item of Targets must have '@odata.type' set to "
            f"'Microsoft.Dynamics.CRM.{table.logical_name}'.",
        )
    odata_id = target.get("@odata.id")
    data = handler.payload(table, target)  # annotations are dropped, columns checked
    given = data.pop(table.primary_id, None)
    record_id = None
    if given is not None:
        record_id = _lower_guid(given)
        if record_id is None:
            raise DataverseError(400, CODE_PAYLOAD, f"Cannot convert the literal '{given}' to 'Edm.Guid'.")
    key: str | dict[str, odata.Value] | None = record_id
    if isinstance(odata_id, str):
        key = _key_of(handler, table, odata_id)
    if message == "CreateMultiple":
        return str(org.create(table, data, handler.caller, record_id)[table.primary_id])
    if key is None:
        raise DataverseError(
            400, CODE_PAYLOAD,
            f"The {table.primary_id} or '@odata.id' of each item of Targets is required for {message}.",
        )
    record = org.find(table, key)
    if record is not None:
        if isinstance(key, dict):
            data = {name: value for name, value in data.items() if name not in key}
        return str(org.update(table, record, data, handler.caller)[table.primary_id])
    if message == "UpdateMultiple":
        raise handler.missing(table, key)
    if isinstance(key, dict):
        if any(name in data for name in key):
            raise DataverseError(400, CODE_UNEXPECTED, "An unexpected error occurred.")  # [obs] #127
        for name, value in key.items():
            data[name] = value.value if isinstance(value, odata.Guid) else value
        key = None
    return str(org.create(table, data, handler.caller, key)[table.primary_id])


def _key_of(handler: _Request, table: Table, odata_id: str) -> str | dict[str, odata.Value]:
    """The record an ``@odata.id`` names: ``contacts(<guid>)`` or ``contacts(emailaddress1='…')``."""
    path = urlsplit(odata_id).path
    split = _split_api_path(path)
    text = split[1] if split is not None else path.lstrip("/")
    try:
        resource = odata.split_resource(odata.decode_path(text))
    except odata.ODataSyntaxError as err:
        raise DataverseError(400, CODE_PAYLOAD, f"The '@odata.id' value is not valid: {err.message}") from err
    if resource.name != table.entity_set or resource.key is None or resource.rest:
        raise DataverseError(
            400, CODE_PAYLOAD, f"The '@odata.id' value '{odata_id}' does not name a {table.logical_name}."
        )
    return handler.target(table, resource.key)


# --- $batch ---------------------------------------------------------------------------------------


class _Part:
    def __init__(self, headers: dict[str, str], body: bytes) -> None:
        self.headers = headers
        self.body = body


def _split(body: bytes, boundary: str) -> list[_Part]:
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise DataverseError(
            400, CODE_ODATA, "The batch request body is not a valid multipart/mixed message."
        )
    parts = []
    for chunk in chunks[1:-1]:
        chunk = chunk.removeprefix(b"\r\n").removeprefix(b"\n")
        head, payload = _head_body(chunk)
        parts.append(_Part(_headers(head), payload))
    return parts


def _head_body(chunk: bytes) -> tuple[bytes, bytes]:
    for separator in (b"\r\n\r\n", b"\n\n"):
        at = chunk.find(separator)
        if at >= 0:
            payload = chunk[at + len(separator):]
            if payload.endswith(b"\r\n"):
                payload = payload[:-2]
            elif payload.endswith(b"\n"):
                payload = payload[:-1]
            return chunk[:at], payload
    return chunk, b""


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _boundary(content_type: str | None) -> str:
    match = re.search(r'boundary="?([^";]+)"?', content_type or "", re.IGNORECASE)
    if match is None or not (content_type or "").lower().startswith("multipart/mixed"):
        raise DataverseError(
            400, CODE_ODATA,
            "The batch request must have a 'Content-Type' of multipart/mixed with a boundary.",
        )
    return match.group(1).strip()


class _Answer:
    def __init__(self, response: Response, content_id: str | None) -> None:
        self.response = response
        self.content_id = content_id

    @property
    def failed(self) -> bool:
        return self.response.status_code >= 400

    def text(self) -> list[str]:
        r = self.response
        lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
        if self.content_id is not None:
            lines.append(f"Content-ID: {self.content_id}")
        lines += ["", f"HTTP/1.1 {r.status_code} {HTTPStatus(r.status_code).phrase}"]
        for name, value in r.headers.items():
            if name.lower() in ("content-length", "set-cookie"):
                continue
            lines.append(f"{name}: {value}")
        lines.append("")
        lines.append(r.get_data(as_text=True))
        return lines


def batch(handler: _Request) -> Response:
    """POST $batch: each part run as its own request against the same org, in order."""
    if handler.method != "POST" or handler.resource.key is not None or handler.resource.rest:
        raise handler.method_not_allowed()
    parts = _split(request.get_data(cache=True), _boundary(request.headers.get("Content-Type")))
    groups: list[tuple[bool, list[_Part]]] = []
    count = 0
    for part in parts:
        kind = part.headers.get("content-type", "").lower()
        if kind.startswith("multipart/mixed"):
            inner = _split(part.body, _boundary(part.headers["content-type"]))
            groups.append((True, inner))
            count += len(inner)
        elif kind.startswith("application/http"):
            groups.append((False, [part]))
            count += 1
        else:
            raise DataverseError(400, CODE_ODATA, f"A batch part has the unsupported Content-Type '{kind}'.")
    if count > MAX_BATCH_REQUESTS:
        raise DataverseError(
            400, CODE_ODATA,
            f"The number of requests in the batch ({count}) exceeds the limit of {MAX_BATCH_REQUESTS}.",
        )
    continue_on_error = "continue-on-error" in (request.headers.get("Prefer") or "").lower()
    outer_headers = request.headers
    blocks: list[tuple[bool, list[_Answer]]] = []
    failure_status: int | None = None
    for is_change_set, members in groups:
        if is_change_set:
            answers = _change_set(handler, members, outer_headers)
            blocks.append((len(answers) > 1 or not answers[0].failed, answers))
        else:
            answers = [_run(handler, members[0], outer_headers)]
            blocks.append((False, answers))
        if any(a.failed for a in answers) and not continue_on_error:
            failure_status = next(a.response.status_code for a in answers if a.failed)
            break
    boundary = f"batchresponse_{uuid.uuid4()}"
    lines: list[str] = []
    for nested, answers in blocks:
        if nested:
            inner_boundary = f"changesetresponse_{uuid.uuid4()}"
            lines += [f"--{boundary}", f"Content-Type: multipart/mixed; boundary={inner_boundary}", ""]
            for answer in answers:
                lines += [f"--{inner_boundary}", *answer.text()]
            lines += [f"--{inner_boundary}--"]
        else:
            for answer in answers:
                lines += [f"--{boundary}", *answer.text()]
    lines += [f"--{boundary}--", ""]
    response = Response("\r\n".join(lines).encode("utf-8"), status=failure_status or 200,
                        content_type=f"multipart/mixed; boundary={boundary}")
    if continue_on_error:
        handler.applied.append("odata.continue-on-error")
    return response


def _change_set(handler: _Request, members: list[_Part], outer: Headers) -> list[_Answer]:
    answers: list[_Answer] = []
    failed: _Answer | None = None

    class _Rollback(Exception):
        pass

    with contextlib.suppress(_Rollback), transaction(handler.org):
        for number, part in enumerate(members, start=1):
            answer = _run(handler, part, outer, in_change_set=True, default_id=str(number))
            answers.append(answer)
            if answer.failed:
                failed = answer
                raise _Rollback
    return [failed] if failed is not None else answers


def _run(
    handler: _Request, part: _Part, outer: Headers, *, in_change_set: bool = False,
    default_id: str | None = None,
) -> _Answer:
    """One request of the batch, run through the same request handler as a request of its own."""
    org = handler.org
    content_id = part.headers.get("content-id", default_id if in_change_set else None)
    head, body = _head_body(part.body)
    lines = head.decode("latin-1").splitlines()
    request_line = lines[0].split(" ") if lines else []
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/"):
        error = DataverseError(400, CODE_ODATA, "A batch part has no valid request line.")
        return _Answer(_error_response(error), content_id)
    method, target, _ = request_line
    method = method.upper()
    headers = _headers("\n".join(lines[1:]).encode("latin-1"))
    org.sandbox.counters.count(SERVICE, "batch:requests")
    url = urlsplit(target)
    split = _split_api_path(url.path)
    try:
        if in_change_set and method == "GET":
            raise DataverseError(400, CODE_ODATA, "GET requests are not allowed in a change set.")
        if target.startswith("$"):
            raise handler.not_supported("Content-ID references in $batch")
        if split is None:
            raise DataverseError(
                404, "", f"No HTTP resource was found that matches the request URI '{target}'."
            )
        resource = odata.split_resource(odata.decode_path(split[1]))
        org.sandbox.counters.count(SERVICE, f"batch:{method} {resource.name}")
        if resource.name in ("$batch",):
            raise DataverseError(400, CODE_ODATA, "A batch request cannot contain another batch request.")
        caller = handler.caller
        part_caller = {h: headers[h.lower()] for h in CALLER_HEADERS if h.lower() in headers}
        for header in part_caller:
            org.sandbox.counters.count(SERVICE, f"batch:caller:{header}")
        if part_caller:
            caller = org.resolve_caller(
                handler.appid, part_caller.get("CallerObjectId", outer.get("CallerObjectId")),
                part_caller.get("MSCRMCallerID", outer.get("MSCRMCallerID")),
            )
        environ = {"REQUEST_URI": url.path + (f"?{url.query}" if url.query else "")}
        with current_app.test_request_context(
            url.path, method=method, query_string=url.query, headers=list(headers.items()), data=body,
            base_url=handler.base, environ_overrides=environ,
        ):
            inner = _Request(org, handler.base, split[0], resource, caller, handler.appid)
            response = inner.dispatch()
            if inner.applied:
                response.headers["Preference-Applied"] = ",".join(inner.applied)
    except odata.ODataSyntaxError as err:
        response = _error_response(DataverseError(400, err.code, err.message))
    except DataverseError as err:
        response = _error_response(err)
    response.headers["OData-Version"] = "4.0"
    return _Answer(response, content_id)


__all__ = ["CODE_KEY_NOT_FOUND", "CODE_NOT_FOUND", "batch", "bulk_message", "sdkmessagefilters", "supported"]
