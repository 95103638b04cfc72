"""Signed webhooks: check who sent a batch, validate every job, and hand back the queue messages.

The checks run in an order chosen for what an unauthenticated caller can learn and cost us:

1. the ``{source}`` name, the body size (413, from ``Content-Length`` before the body is read, then
   from the body) and the content type (415) — free, and a 1 MiB limit before any HMAC means nobody
   makes us hash a huge body;
2. the signature (401) — before the body is parsed, so the job schema is never explained to a caller
   that cannot sign.  The timestamp window is checked first (no Key Vault read for a stale replay);
   a Key Vault failure is 503 with its code, a missing setting 500 naming it;
3. JSON (400 ``invalid_json``), shape, every job (400 ``invalid_job`` naming ``jobs[i].field``), and
   each job's size as the exact text that will be enqueued (413 ``job_too_large``);
4. the source's authorization policy (403 ``forbidden_by_policy`` naming ``jobs[i].field``): tables,
   operations, columns and who may be acted as (``shared.policy``) — it may ask Dataverse about the
   actors (cached per instance);
5. the replay window (409 ``replayed``; storage unavailable 503 with Retry-After, see
   ``shared.replay``) — last, so only a body that would be accepted is remembered.

Each message is sealed with the app's own message key (``shared.messages``) so ``sync_job`` can tell
it came through here.  Signing keys rotate with a grace period (``shared.keyring``).

All or nothing: ``messages`` is empty unless the status is 202.  Duplicate job ids inside one batch
are refused, because the id is the idempotency key of keyless creates (see ``shared.contract``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.contract import (
    MAX_JOB_BYTES,
    SOURCE,
    Job,
    dumps,
    error_body,
    loads,
    parse_job,
    problems_message,
    text_size,
)
from shared.errors import ConfigurationError, InvalidJob, SyncError
from shared.messages import sign

if TYPE_CHECKING:
    from shared.runtime import Runtime

Keys = str | Sequence[str]
"""A signing-key provider's answer: one key, or every key accepted now (newest first)."""

log = logging.getLogger("shared.webhooks")

MAX_BODY_BYTES = 1024 * 1024
MAX_JOBS = 100
TOLERANCE_SECONDS = 300
SIGNATURE_HEADER = "X-Signature"
_MAX_SIGNATURES = 8
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


Authorize = Callable[[str, Sequence[tuple[str, Job]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class WebhookResult:
    status: int
    body: dict[str, Any]
    messages: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


def _fail(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> WebhookResult:
    return WebhookResult(status, error_body(code, message, details))


def compute_signature(key: bytes, body: bytes, timestamp: int, *, source: str) -> str:
    """HMAC-SHA256 of ``<t>.<source>.<body>``.

    The route's ``{source}`` is signed so a body signed for one source cannot be replayed at another
    (the source scopes keyless-create ids).  The split is unambiguous for what is accepted: ``t`` is
    digits, ``source`` has no ``{``, and an accepted body is a JSON object, whose text can neither
    start with ``<source chars>.`` nor be preceded by them.
    """
    signed = str(timestamp).encode("ascii") + b"." + source.encode("utf-8") + b"." + body
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def signature_header(key: bytes, body: bytes, timestamp: int, *, source: str) -> str:
    """The ``X-Signature`` value a sender puts on ``body`` posted to ``/api/webhooks/{source}``:
    ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<source>.<body>">``."""
    return f"t={timestamp},v1={compute_signature(key, body, timestamp, source=source)}"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that also works on a plain dict."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def declared_too_large(headers: Mapping[str, str]) -> WebhookResult | None:
    """413 from the ``Content-Length`` header alone, so an oversized body need never be read.

    A missing or unparsable header is not an error here: the read body's length is checked anyway.
    """
    value = (header(headers, "Content-Length") or "").strip()
    if value.isascii() and value.isdigit() and int(value) > MAX_BODY_BYTES:
        return _too_large()
    return None


def _too_large() -> WebhookResult:
    return _fail(413, "payload_too_large", f"the body may be at most {MAX_BODY_BYTES} bytes")


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media, *params = (part.strip() for part in content_type.split(";"))
    if media.lower() != "application/json":
        return False
    for param in params:
        if not param:
            continue
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def parse_signature(value: str) -> tuple[int, list[str]] | None:
    """``t=<digits>`` once and one or more ``v1=<64 hex>``; unknown schemes are ignored.  None: malformed."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in value.split(","):
        name, sep, item = part.strip().partition("=")
        if not sep:
            return None
        if name == "t":
            if timestamp is not None or _TIMESTAMP.fullmatch(item) is None:
                return None
            timestamp = int(item)
        elif name == "v1":
            if _HEX_DIGEST.fullmatch(item) is None:
                return None
            signatures.append(item.lower())
    if timestamp is None or not signatures or len(signatures) > _MAX_SIGNATURES:
        return None
    return timestamp, signatures


def check_signature(
    headers: Mapping[str, str],
    body: bytes,
    signing_key: Callable[[], Keys],
    now: float,
    refresh_key: Callable[[str], Keys | None] | None = None,
    *,
    source: str,
) -> WebhookResult | None:
    """None when ``source`` + body are signed with an accepted key within the time window, else the failure.

    ``signing_key()`` gives the current key or every accepted one (a rotated-out key during its grace
    period).  On a mismatch ``refresh_key(stale)`` may hand back newer keys (rotated in Key Vault since
    this instance read them); it returns None when it will not re-read, which it must rate-limit because
    anybody can send a bad signature.
    """
    value = header(headers, SIGNATURE_HEADER)
    if not value:
        return _fail(401, "signature_missing", f"the {SIGNATURE_HEADER} header is required")
    parsed = parse_signature(value)
    if parsed is None:
        return _fail(
            401, "signature_malformed", f"{SIGNATURE_HEADER} must look like t=<unix seconds>,v1=<hex sha256>"
        )
    timestamp, signatures = parsed
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        return _fail(
            401,
            "signature_expired",
            f"the signature timestamp is more than {TOLERANCE_SECONDS} s from the server's clock",
            [{"serverTime": int(now)}],
        )
    try:
        keys = _as_list(signing_key())
    except ConfigurationError as exc:
        log.error("webhook signing key: %s", exc)
        return WebhookResult(500, {"error": exc.to_dict()})
    except SyncError as exc:
        log.error("webhook signing key unavailable: %s", exc)
        return _fail(
            503,
            "signing_key_unavailable",
            f"the webhook signing key could not be read ({exc.code}): {exc.message}",
            [{"cause": exc.code, "transient": exc.transient}],
        )
    if not keys or not all(keys):
        log.error("webhook signing key is empty")
        return _fail(503, "signing_key_unavailable", "the webhook signing key is empty")
    if any(_matches(key, body, timestamp, signatures, source) for key in keys):
        return None
    newer = [key for key in _as_list(_refreshed(refresh_key, keys[0])) if key and key not in keys]
    if any(_matches(key, body, timestamp, signatures, source) for key in newer):
        return None
    return _fail(401, "signature_invalid", "the signature does not match t.source.body")


def _as_list(keys: Keys | None) -> list[str]:
    if keys is None:
        return []
    return [keys] if isinstance(keys, str) else list(keys)


def _matches(key: str, body: bytes, timestamp: int, signatures: list[str], source: str) -> bool:
    expected = compute_signature(key.encode("utf-8"), body, timestamp, source=source).encode("ascii")
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate.encode("ascii"))
    return matched


def _refreshed(refresh_key: Callable[[str], Keys | None] | None, stale: str) -> Keys | None:
    if refresh_key is None:
        return None
    try:
        return refresh_key(stale)
    except SyncError as exc:
        log.warning("webhook signing key could not be re-read: %s", exc.code)
        return None


def _jobs_of(payload: object) -> tuple[list[object], bool] | WebhookResult:
    """(jobs, batched) from ``{"jobs": [...]}`` or a single job object."""
    if isinstance(payload, dict) and "jobs" in payload:
        extra = sorted(name for name in payload if name != "jobs")
        if extra:
            return _fail(400, "invalid_job", "a batch has only the field jobs",
                         [{"field": name, "message": "unknown field"} for name in extra])
        jobs = payload["jobs"]
        if not isinstance(jobs, list) or not 1 <= len(jobs) <= MAX_JOBS:
            return _fail(400, "invalid_job", f"jobs must be an array of 1 to {MAX_JOBS} jobs",
                         [{"field": "jobs", "message": f"must be an array of 1 to {MAX_JOBS} jobs"}])
        return list(jobs), True
    return [payload], False


Seal = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns a stamped job into the queue message (``shared.messages.sign`` with the message key)."""

Checked = tuple[list[str], list[str], list[tuple[str, Job]]]
"""(job ids, queue messages, (where, job) pairs for the authorization policy)."""


def _validate(jobs: list[object], batched: bool, source: str, seal: Seal | None) -> Checked | WebhookResult:
    """Every job checked, then stamped with the route's ``source`` (the scope of its idempotency key)
    and sealed; the size limit applies to the sealed text that is enqueued."""
    details: list[dict[str, Any]] = []
    ids: list[str] = []
    parsed: list[tuple[str, Job]] = []
    first_index: dict[str, int] = {}
    for index, obj in enumerate(jobs):
        where = f"jobs[{index}]" if batched else ""
        try:
            job = parse_job(obj, where=where)
        except InvalidJob as exc:
            details.extend(exc.details)
            continue
        if job.source is not None and job.source != source:
            # a sender must not pick another source's scope and so reach its keyless-create ids
            details.append({"field": f"{where}.source" if where else "source",
                            "message": "must be absent or equal to {source} in the URL"})
        if job.id in first_index:
            details.append({"field": f"{where}.id",
                            "message": f"duplicates jobs[{first_index[job.id]}].id; ids must be unique"})
        first_index.setdefault(job.id, index)
        ids.append(job.id)
        parsed.append((where, job))
    if details:
        return _fail(400, "invalid_job", problems_message(details), details)

    stamped = [{**obj, "source": source} for obj in jobs if isinstance(obj, dict)]
    messages = [dumps(seal(job) if seal is not None else job) for job in stamped]
    too_large = [
        {"field": f"jobs[{i}]" if batched else "job", "message": f"{text_size(m)} bytes > {MAX_JOB_BYTES}"}
        for i, m in enumerate(messages)
        if text_size(m) > MAX_JOB_BYTES
    ]
    if too_large:
        return _fail(413, "job_too_large", f"a job may be at most {MAX_JOB_BYTES} bytes of JSON", too_large)
    return ids, messages, parsed


def handle_webhook(
    source: str,
    headers: Mapping[str, str],
    body: bytes,
    signing_key: Callable[[], Keys],
    *,
    now: float | None = None,
    refresh_key: Callable[[str], Keys | None] | None = None,
    authorize: Authorize | None = None,
    seal: Seal | None = None,
    first_use: Callable[[int, str, bytes], bool] | None = None,
) -> WebhookResult:
    """``POST /api/webhooks/{source}``: 202 with one queue message per job, or an error and nothing.

    ``authorize(source, [(where, job)])`` applies the source's authorization policy to the valid batch
    and returns its refusals (``shared.policy.Authorizer.check_batch``): any -> 403 ``forbidden_by_policy``.
    ``seal`` signs each message for the queue (None: unsigned, for tests of the checks alone);
    ``first_use(t, source, body)`` is the replay window (None: no replay check).
    """
    if SOURCE.fullmatch(source or "") is None:
        return _fail(400, "invalid_source", "{source} in the URL must be 1-64 of A-Z a-z 0-9 . _ -")
    declared = declared_too_large(headers)
    if declared is not None:
        return declared
    if len(body) > MAX_BODY_BYTES:
        return _too_large()
    if not _is_json(header(headers, "Content-Type")):
        return _fail(415, "unsupported_media_type", "Content-Type must be application/json (UTF-8)")

    clock = time.time() if now is None else now
    failure = check_signature(headers, body, signing_key, clock, refresh_key, source=source)
    if failure is not None:
        log.warning("source=%s webhook refused status=%d code=%s", source, failure.status,
                    failure.body["error"]["code"])
        return failure

    try:
        payload = loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("source=%s webhook refused status=400 code=invalid_json", source)
        return _fail(400, "invalid_json", f"the body is not valid JSON: {exc}")

    shaped = _jobs_of(payload)
    if isinstance(shaped, WebhookResult):
        return shaped
    jobs, batched = shaped
    try:
        checked = _validate(jobs, batched, source, seal)
    except ConfigurationError as exc:
        log.error("queue message signing key: %s", exc)
        return WebhookResult(500, {"error": exc.to_dict()})
    except SyncError as exc:
        log.error("queue message signing key unavailable: %s", exc)
        return _fail(503, "signing_key_unavailable",
                     f"the queue message signing key could not be read ({exc.code}): {exc.message}",
                     [{"cause": exc.code, "transient": exc.transient}])
    if isinstance(checked, WebhookResult):
        log.warning("source=%s webhook refused status=%d code=%s", source, checked.status,
                    checked.body["error"]["code"])
        return checked
    ids, messages, parsed = checked
    if authorize is not None:
        refused = authorize(source, parsed)
        if refused:
            log.warning("source=%s webhook refused status=403 code=forbidden_by_policy", source)
            return _fail(403, "forbidden_by_policy", problems_message(refused), refused)
    if first_use is not None:
        replayed = _replayed(first_use, headers, source, body)
        if replayed is not None:
            return replayed
    for job_id in ids:
        log.info("source=%s job=%s accepted", source, job_id)
    return WebhookResult(202, {"accepted": len(ids), "ids": ids}, messages)


def _replayed(
    first_use: Callable[[int, str, bytes], bool], headers: Mapping[str, str], source: str, body: bytes
) -> WebhookResult | None:
    """409 when this signed body was accepted before (within the window), 503 when that is unknowable."""
    parsed = parse_signature(header(headers, SIGNATURE_HEADER) or "")
    assert parsed is not None  # the signature was checked already
    timestamp = parsed[0]
    try:
        first = first_use(timestamp, source, body)
    except ConfigurationError as exc:
        log.error("webhook replay window: %s", exc)
        return WebhookResult(500, {"error": exc.to_dict()})
    except SyncError as exc:
        log.error("source=%s webhook refused status=503 code=%s", source, exc.code)
        return WebhookResult(503, {"error": exc.to_dict()}, headers={"Retry-After": "5"})
    if first:
        return None
    log.warning("source=%s webhook refused status=409 code=replayed", source)
    return _fail(409, "replayed",
                 "this signed body was accepted before; a new request needs a new signature (new t)",
                 [{"t": timestamp}])


def receive_webhook(
    source: str, headers: Mapping[str, str], body: bytes, runtime: Callable[[], Runtime],
    *, now: float | None = None, authorize: Authorize | None = None,
) -> WebhookResult:
    """``handle_webhook`` wired to the instance: rotating webhook keys, the source's policy (``authorize``),
    message sealing, replay window.

    ``runtime`` is called only once a check needs it, so a request refused for free (size, type,
    missing signature) costs no Key Vault read and needs no settings.
    """
    return handle_webhook(
        source,
        headers,
        body,
        lambda: runtime().webhook_keys.keys(),
        now=now,
        refresh_key=lambda stale: runtime().webhook_keys.reread(),
        authorize=authorize,
        seal=lambda job: sign(job, source, runtime().message_keys.signing_key(), now=now),
        first_use=lambda t, src, data: runtime().replay.first_use(t, src, data),
    )
