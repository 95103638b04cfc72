"""The OData ``$batch`` wire format (multipart/mixed), written and read without any network.

Kept apart from the client so it can be tested byte for byte: the format is plain text with strict
rules (CRLF line ends, ``--boundary`` delimiters, an ``application/http`` part per request holding a
whole HTTP/1.1 message), and Dataverse answers in the same shape — one part per request, or a nested
``multipart/mixed`` part per change set — each with its own status line, headers and JSON body
(Learn, "Execute batch operations using the Web API").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CRLF = "\r\n"
MAX_BATCH_REQUESTS = 1000
"""Learn: "Batch requests can contain up to 1000 individual requests"."""

_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_STATUS_RE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")


class BatchFormatError(ValueError):
    """A ``$batch`` answer that does not follow the multipart format."""


@dataclass(frozen=True)
class BatchOperation:
    """One request inside a batch; ``url`` is absolute or relative to the API base."""

    method: str
    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchPart:
    """One answer inside a batch: its status, headers (lower-case names) and body text."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    content_id: str | None = None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body.strip() else None


def build(
    operations: Sequence[BatchOperation], *, change_set: bool = False, boundary: str | None = None
) -> tuple[str, bytes]:
    """The ``Content-Type`` header and body of one ``$batch`` request.

    ``change_set=True`` puts every operation into ONE change set (atomic, each with a Content-ID);
    otherwise each is an independent request, answered on its own.
    """
    if not operations:
        raise ValueError("a batch needs at least one operation")
    if len(operations) > MAX_BATCH_REQUESTS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_REQUESTS} requests, got {len(operations)}")
    batch = boundary or f"batch_{uuid.uuid4()}"
    lines: list[str] = []
    if change_set:
        changeset = f"changeset_{uuid.uuid4()}"
        lines += [f"--{batch}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
        for number, op in enumerate(operations, start=1):
            lines += [f"--{changeset}", *_request_lines(op, content_id=str(number))]
        lines += [f"--{changeset}--", ""]
    else:
        for op in operations:
            lines += [f"--{batch}", *_request_lines(op, content_id=None)]
    lines += [f"--{batch}--", ""]
    return f"multipart/mixed; boundary={batch}", CRLF.join(lines).encode("utf-8")


def _request_lines(op: BatchOperation, *, content_id: str | None) -> list[str]:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{op.method.upper()} {op.url} HTTP/1.1"]
    for name, value in op.headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    if op.body is not None:
        lines += ["Content-Type: application/json; type=entry", "",
                  json.dumps(op.body, ensure_ascii=False, separators=(",", ":"))]
    else:
        lines += [""]
    return lines


def boundary_of(content_type: str | None) -> str:
    match = _BOUNDARY_RE.search(content_type or "")
    if match is None or "multipart/mixed" not in (content_type or "").lower():
        raise BatchFormatError(f"not a multipart/mixed content type: {content_type!r}")
    return match.group(1).strip()


def parse(content_type: str | None, body: bytes) -> list[BatchPart]:
    """Every answer of a ``$batch`` response in order, change-set answers flattened in place."""
    parts: list[BatchPart] = []
    for headers, payload in _split(body, boundary_of(content_type)):
        kind = headers.get("content-type", "")
        if kind.lower().startswith("multipart/mixed"):
            parts.extend(parse(kind, payload))
        elif kind.lower().startswith("application/http"):
            parts.append(_response(payload, headers.get("content-id")))
        else:
            raise BatchFormatError(f"a batch part of type {kind!r}")
    return parts


def _split(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 2:
        raise BatchFormatError("the batch body holds no part")
    out: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return out  # the closing delimiter
        chunk = chunk.removeprefix(b"\r\n").removeprefix(b"\n")
        head, payload = _head_and_body(chunk)
        out.append((_headers(head), payload))
    raise BatchFormatError("the batch body has no closing delimiter")


def _head_and_body(chunk: bytes) -> tuple[bytes, bytes]:
    for separator in (b"\r\n\r\n", b"\n\n"):
        at = chunk.find(separator)
        if at >= 0:
            payload = chunk[at + len(separator):]
            # the CRLF before the next delimiter belongs to the delimiter (RFC 2046)
            if payload.endswith(b"\r\n"):
                payload = payload[:-2]
            elif payload.endswith(b"\n"):
                payload = payload[:-1]
            return chunk[:at], payload
    return chunk, b""


def _headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _response(payload: bytes, content_id: str | None) -> BatchPart:
    head, body = _head_and_body(payload)
    lines = head.decode("latin-1").splitlines()
    if not lines:
        raise BatchFormatError("an application/http part without a status line")
    match = _STATUS_RE.fullmatch(lines[0].strip())
    if match is None:
        raise BatchFormatError(f"not an HTTP status line: {lines[0][:80]!r}")
    headers = _headers("\n".join(lines[1:]).encode("latin-1"))
    return BatchPart(int(match.group(1)), match.group(2) or "", headers, body.strip(b"\r\n"), content_id)
