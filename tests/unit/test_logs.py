"""The redaction filter: no secret, token or Authorization header survives into a log line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from shared import logs
from shared.logs import RedactingFilter, install, job_logger, redact, register_secret

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0aWQiOiJ0IiwiYXVkIjoiaHR0cHM6Ly94In0."
    "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
)
SECRET = "Zx8Q~s3cr3t+with/odd=chars&more"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    install()
    try:
        yield root, stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {JWT}",
        f"{{'Authorization': 'Bearer {JWT}', 'Accept': 'application/json'}}",
        "headers={'authorization': 'opaque-token-value'}",
        "sent with Bearer opaque-token-value to https://org.crm.dynamics.com",
        f"token {JWT} issued",
        f"grant_type=client_credentials&client_id=abc&client_secret={SECRET}&scope=x",
        f'{{"access_token": "{JWT}", "expires_in": 3599}}',
        '{"access_token": "not-a-jwt-but-secret", "token_type": "Bearer"}',
        "X-IDENTITY-HEADER: 5c1e0b2a-identity-header",
    ],
)
def test_patterns_are_masked(text: str) -> None:
    out = redact(text)
    for needle in (JWT, SECRET, "opaque-token-value", "not-a-jwt-but-secret", "5c1e0b2a-identity-header"):
        assert needle not in out
    assert logs.MASK in out


def test_registered_secret_is_masked_raw_and_url_encoded() -> None:
    secret = "reg1stered/secret+value=="
    assert secret in redact(f"value {secret}")  # not yet known: nothing special about it
    register_secret(secret)
    from urllib.parse import quote, quote_plus

    for form in (secret, quote(secret, safe=""), quote_plus(secret)):
        assert form not in redact(f"body=x{form}y")


def test_short_values_are_not_registered() -> None:
    register_secret("ab")
    assert redact("abc ab") == "abc ab"


def test_message_args_and_exception_text_are_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    register_secret(SECRET)
    log = logging.getLogger("azure.identity._internal.msal_client")  # a child: the logger filter misses it
    try:
        raise RuntimeError(f"request failed: client_secret={SECRET} Authorization: Bearer {JWT}")
    except RuntimeError:
        log.debug("sending %s with %r", f"Bearer {JWT}", {"secret": SECRET}, exc_info=True)
    text = stream.getvalue()
    assert "sending" in text and "RuntimeError" in text and "Traceback" in text
    assert SECRET not in text
    assert JWT not in text
    assert JWT[:20] not in text


def test_without_the_filter_the_same_record_would_leak() -> None:
    """Control for the test above: the handler really receives the secret when nothing filters."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("tests.unfiltered")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("client_secret=%s", SECRET)
    finally:
        log.removeHandler(handler)
    assert SECRET in stream.getvalue()


def test_install_is_idempotent_and_covers_named_loggers_and_their_handlers() -> None:
    handler = logging.StreamHandler(io.StringIO())
    urllib3_logger = logging.getLogger("urllib3")
    urllib3_logger.addHandler(handler)
    try:
        install()
        install()
        for name in logs.INSTALLED_LOGGERS:
            filters = [f for f in logging.getLogger(name).filters if isinstance(f, RedactingFilter)]
            assert len(filters) == 1, name
        assert len([f for f in handler.filters if isinstance(f, RedactingFilter)]) == 1
        for root_handler in logging.getLogger().handlers:
            assert any(isinstance(f, RedactingFilter) for f in root_handler.filters)
    finally:
        urllib3_logger.removeHandler(handler)


def test_a_broken_format_string_neither_raises_nor_leaks() -> None:
    record = logging.LogRecord("shared.x", logging.INFO, __file__, 1, "value %d", (SECRET,), None)
    register_secret(SECRET)
    assert RedactingFilter().filter(record)
    assert SECRET not in record.getMessage()


def test_job_logger_prefixes_the_correlation_id(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        job_logger(logging.getLogger("shared.jobs"), "crm-evt-000123").info("written %s", "contacts")
    finally:
        logging.getLogger().removeHandler(keep)
    assert "job=crm-evt-000123 written contacts" in stream.getvalue()
    assert records[-1].job_id == "crm-evt-000123"  # type: ignore[attr-defined]
