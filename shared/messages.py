"""Queue messages are signed: the queue is a way in that does not pass the webhook's signature check.

Anyone who can put a message on the sync queue (a leaked storage key, a too-broad role assignment, a
tool run against the wrong account) could otherwise write as any user.  So every message carries an
HMAC made with a key only the app (and operators with Key Vault access) can read — the Key Vault secret
``MESSAGE_SIGNING_SECRET_NAME``, never the webhook key, which senders hold — and ``sync_job`` refuses
what it cannot verify (dead-letter ``unauthenticated_message``, the message kept in the record).

The message stays a job: its own fields plus one reserved member, so the job schema remains the public
contract (a peeked message reads as a job, ``queuectl replay`` puts the very same text back)::

    {"id": "...", "entity": "contacts", ..., "source": "crm",
     "_auth": {"source": "crm", "t": 1767225600, "sig": "<64 hex>"}}

``sig`` = hex HMAC-SHA256, keyed by the message key, of ``queue.v1.<t>.<source>.<canonical job>`` where
the canonical job is the message without ``_auth``, re-serialised compactly in its own field order
(``shared.contract.dumps``).  The job's ``source`` must equal ``_auth.source``: the source is what the
authorization policy and keyless-create ids are scoped by, so it is signed, not trusted.  ``t`` says
when it was signed and is not checked against a clock: a message may legitimately wait in a queue or be
replayed from ``-deadletter``/``-poison`` days later.  Replays are safe for other reasons (idempotent
writes, ``ifMatch``), not because of this signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from shared.errors import UnauthenticatedMessage

AUTH_FIELD = "_auth"
_PREFIX = b"queue.v1."
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_SOURCE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _canonical(job: Mapping[str, Any]) -> bytes:
    body = {name: value for name, value in job.items() if name != AUTH_FIELD}
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _signature(key: str, job: Mapping[str, Any], source: str, timestamp: int) -> str:
    signed = _PREFIX + str(timestamp).encode("ascii") + b"." + source.encode("utf-8") + b"." + _canonical(job)
    return hmac.new(key.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign(job: Mapping[str, Any], source: str, key: str, *, now: float | None = None) -> dict[str, Any]:
    """The message for ``job`` sent on behalf of ``source``: ``source`` stamped, ``_auth`` appended.

    A job naming another ``source`` is refused (ValueError): a signer must not re-scope a job.
    """
    if _SOURCE.fullmatch(source) is None:
        raise ValueError("source must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if job.get("source", source) != source:
        raise ValueError(f"the job names source {job.get('source')!r}, not {source!r}")
    body = {name: value for name, value in job.items() if name != AUTH_FIELD}
    body["source"] = source
    timestamp = int(time.time() if now is None else now)
    body[AUTH_FIELD] = {"source": source, "t": timestamp, "sig": _signature(key, body, source, timestamp)}
    return body


def auth_of(message: object) -> tuple[str, int, str]:
    """``(source, t, sig)`` of a decoded message, or UnauthenticatedMessage saying what is wrong."""
    if not isinstance(message, dict):
        raise _refused("the message is not a JSON object, so it carries no _auth")
    auth = message.get(AUTH_FIELD)
    if auth is None:
        raise _refused("the message is not signed (no _auth); only the webhook and queuectl send may enqueue")
    if not isinstance(auth, dict) or set(auth) != {"source", "t", "sig"}:
        raise _refused("_auth must be an object with exactly source, t and sig")
    source, timestamp, sig = auth["source"], auth["t"], auth["sig"]
    if not isinstance(source, str) or _SOURCE.fullmatch(source) is None:
        raise _refused("_auth.source must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp < 10**12:
        raise _refused("_auth.t must be a Unix time in seconds")
    if not isinstance(sig, str) or _HEX_DIGEST.fullmatch(sig) is None:
        raise _refused("_auth.sig must be 64 lowercase hex digits")
    if message.get("source") != source:
        raise _refused("the job's source differs from _auth.source: the message was re-scoped after signing")
    return source, timestamp, sig


def verify(message: object, keys: Sequence[str]) -> bool:
    """Whether ``message`` (decoded, with ``_auth``) is signed with one of ``keys``.

    Raises UnauthenticatedMessage when ``_auth`` is absent or malformed (no key can help then).
    """
    source, timestamp, sig = auth_of(message)
    assert isinstance(message, dict)
    expected = sig.encode("ascii")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(_signature(key, message, source, timestamp).encode("ascii"), expected)
    return matched


def strip(message: Mapping[str, Any]) -> dict[str, Any]:
    """The job without its ``_auth`` (what the job schema validates)."""
    return {name: value for name, value in message.items() if name != AUTH_FIELD}


def _refused(reason: str) -> UnauthenticatedMessage:
    return UnauthenticatedMessage(reason, details=[{"field": AUTH_FIELD, "message": reason}])


def refused_signature() -> UnauthenticatedMessage:
    return _refused("_auth.sig does not verify with the message signing key (tampered, or another key)")


class _Ring(Protocol):
    def keys(self) -> list[str]: ...

    def reread(self) -> list[str] | None: ...


def authenticate(message: object, ring: _Ring) -> dict[str, Any]:
    """The job of a verified message (``_auth`` removed), else UnauthenticatedMessage.

    Every key the ring accepts is tried (a replaced key during its grace period); a mismatch re-reads
    Key Vault once (rate limited) in case the key was rotated since.  Signers switch to a new key only
    once every instance has read it (``KeyRing.signing_key``), so a good message is not refused for
    carrying a key this instance has not read yet.
    """
    auth_of(message)
    assert isinstance(message, dict)
    if verify(message, ring.keys()):
        return strip(message)
    newer = ring.reread()
    if newer is not None and verify(message, newer):
        return strip(message)
    raise refused_signature()
