"""Logging that cannot leak credentials, and job-scoped log lines.

The Azure SDKs, MSAL and urllib3 all log at DEBUG, and an exception raised from a request can
carry a URL or a body.  Rather than trust each of them, one filter rewrites every record that
reaches our handlers: bearer tokens, JWTs, ``Authorization`` headers, ``client_secret`` form
fields, token fields of JSON bodies, and every value registered with :func:`register_secret`
(the secret store registers each secret it reads) become ``***``.

A filter attached to a *logger* only sees records created by that very logger, not by its
children (``azure.identity._internal…``), so :func:`install` also attaches it to the handlers of
those loggers and of the root logger, which is where the Functions worker and pytest listen.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
_MIN_SECRET_LENGTH = 4

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer x / 'Authorization': 'Basic y' / authorization=...
    (
        re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+|basic\s+)?[^\s'\",}]+"),
        r"\1" + MASK,
    ),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*"), r"\1" + MASK),
    # a JWT (header.payload[.signature]) or the start of one
    (re.compile(r"eyJ[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]*){0,2}"), MASK),
    # form fields and JSON members that carry credentials
    (
        re.compile(
            r"(?i)((?:client_secret|client_assertion|access_token|refresh_token|id_token|password)"
            r"['\"]?\s*[:=]\s*['\"]?)[^&\s'\",}]+"
        ),
        r"\1" + MASK,
    ),
    (re.compile(r"(?i)(x-identity-header['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"), r"\1" + MASK),
)

_secrets_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secret(value: str | None) -> None:
    """Mask ``value`` (and its URL-encoded forms) wherever it appears in a log record from now on."""
    global _secrets
    if not value or len(value) < _MIN_SECRET_LENGTH:
        return
    forms = {value, quote(value, safe=""), quote_plus(value)}
    with _secrets_lock:
        _secrets = _secrets | forms


def redact(text: str) -> str:
    """``text`` with every known secret and credential-looking token replaced by ``***``."""
    # longest first, so a secret that contains another registered one is masked whole
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites message, arguments, exception and stack text of each record; never drops one."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not hide the record (nor leak its args)
            message = f"{record.msg!s} (unformattable arguments dropped)"
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            exc_text = record.exc_text or self._formatter.formatException(record.exc_info)
            record.exc_text = redact(exc_text)
            record.exc_info = None  # handlers would otherwise format the raw exception again
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._redacted = True
        return True


INSTALLED_LOGGERS = ("shared", "azure", "msal", "urllib3")
_FILTER = RedactingFilter()
_install_lock = threading.Lock()


def _attach(target: logging.Logger | logging.Handler) -> None:
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(_FILTER)


def install(extra_handlers: Iterable[logging.Handler] = ()) -> None:
    """Attach the redaction filter to our loggers, their handlers and the root handlers (idempotent).

    Call it again after adding a handler (the local host, a test capturing logs) to cover it.
    """
    with _install_lock:
        loggers = [logging.getLogger(name) for name in INSTALLED_LOGGERS]
        root = logging.getLogger()
        for logger in loggers:
            _attach(logger)
        for logger in [*loggers, root]:
            for handler in logger.handlers:
                _attach(handler)
        for handler in extra_handlers:
            _attach(handler)


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with ``job=<id>`` and adds ``job_id`` to the record for structured sinks."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        job_id = (self.extra or {}).get("job_id")
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("job_id", job_id)
        kwargs["extra"] = extra
        return f"job={job_id} {msg}", kwargs


def job_logger(logger: logging.Logger, job_id: str | None) -> JobLogger:
    return JobLogger(logger, {"job_id": job_id or "-"})
