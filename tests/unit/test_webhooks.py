"""POST /api/webhooks/{source}: signature, limits, content type, all-or-nothing validation."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.contract import MAX_JOB_BYTES
from shared.errors import AuthError, ConfigurationError
from shared.webhooks import (
    MAX_BODY_BYTES,
    TOLERANCE_SECONDS,
    WebhookResult,
    declared_too_large,
    handle_webhook,
    parse_signature,
    signature_header,
)

KEY = "webhook-KEY-value-456"
NOW = 1_700_000_000


def job(i: int = 0, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"evt-{i}",
        "entity": "contacts",
        "operation": "upsert",
        "key": {"emailaddress1": f"user{i}@example.com"},
        "data": {"firstname": "Ada"},
        "actAs": {"email": "jane@contoso.com"},
    }
    base.update(overrides)
    return base


class KeySource:
    def __init__(self, value: str = KEY, error: Exception | None = None) -> None:
        self.value = value
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def send(
    payload: object | bytes,
    *,
    key: str = KEY,
    t: int = NOW,
    now: float = NOW,
    headers: dict[str, str] | None = None,
    signing_key: Callable[[], str] | None = None,
    source: str = "crm",
) -> WebhookResult:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = signature_header(key.encode(), body, t, source=source)
    sent = {"Content-Type": "application/json", "X-Signature": signature}
    sent.update(headers or {})
    return handle_webhook(source, sent, body, signing_key or KeySource(), now=now)


def error_of(result: WebhookResult) -> dict[str, Any]:
    assert set(result.body) == {"error"}
    error: dict[str, Any] = result.body["error"]
    assert set(error) == {"code", "message", "details"}
    assert result.messages == []
    return error


# --- signature helper -------------------------------------------------------------------------------


def test_signature_header_is_hmac_sha256_of_t_dot_source_dot_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(KEY.encode(), b"1700000000.crm." + body, hashlib.sha256).hexdigest()
    assert signature_header(KEY.encode(), body, NOW, source="crm") == f"t=1700000000,v1={expected}"


# --- 202 -----------------------------------------------------------------------------------------


def test_single_job_is_accepted_as_one_message() -> None:
    result = send(job())
    assert result.status == 202
    assert result.body == {"accepted": 1, "ids": ["evt-0"]}
    assert [json.loads(m) for m in result.messages] == [{**job(), "source": "crm"}]


def test_batch_is_accepted_in_order_with_each_job_exactly_as_received() -> None:
    jobs = [job(i) for i in range(100)]
    jobs[5] = job(5, data={"description": "naïve ☃", "n": 1.25, "flag": False, "x": None})
    result = send({"jobs": jobs})
    assert result.status == 202
    assert result.body["accepted"] == 100 and result.body["ids"] == [f"evt-{i}" for i in range(100)]
    assert [json.loads(m) for m in result.messages] == [{**j, "source": "crm"} for j in jobs]
    assert "naïve ☃" in result.messages[5]


def test_the_source_is_logged_with_each_job_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="shared.webhooks"):
        assert send({"jobs": [job(0), job(1)]}, source="erp-eu").status == 202
    lines = [r.getMessage() for r in caplog.records if r.name == "shared.webhooks"]
    for job_id in ("evt-0", "evt-1"):
        assert any("source=erp-eu" in line and f"job={job_id}" in line for line in lines), lines


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        'application/json;  charset="utf-8"',
    ],
)
def test_json_content_types_accepted(content_type: str) -> None:
    assert send(job(), headers={"Content-Type": content_type}).status == 202


def test_header_names_are_case_insensitive() -> None:
    body = json.dumps(job()).encode()
    signature = signature_header(KEY.encode(), body, NOW, source="crm")
    headers = {"content-type": "application/json", "x-signature": signature}
    assert handle_webhook("crm", headers, body, KeySource(), now=NOW).status == 202


@pytest.mark.parametrize("skew", [-TOLERANCE_SECONDS, TOLERANCE_SECONDS])
def test_timestamp_window_edges_are_accepted(skew: int) -> None:
    assert send(job(), t=NOW + skew).status == 202


def test_rotated_keys_any_v1_may_match() -> None:
    body = json.dumps(job()).encode()
    old = signature_header(b"old-key", body, NOW, source="crm").split(",")[1]
    new = signature_header(KEY.encode(), body, NOW, source="crm").split(",")[1]
    header = f"t={NOW},{old},{new}"
    assert send(body, headers={"X-Signature": header}).status == 202
    header = f"t={NOW},{new},{old}"
    assert send(body, headers={"X-Signature": header}).status == 202


def test_unknown_signature_schemes_are_ignored() -> None:
    body = json.dumps(job()).encode()
    header = signature_header(KEY.encode(), body, NOW, source="crm") + ",v0=abc"
    assert send(body, headers={"X-Signature": header}).status == 202


# --- 401 -----------------------------------------------------------------------------------------


def test_missing_signature() -> None:
    body = json.dumps(job()).encode()
    result = handle_webhook("crm", {"Content-Type": "application/json"}, body, KeySource(), now=NOW)
    assert result.status == 401 and error_of(result)["code"] == "signature_missing"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "t=1700000000",
        "v1=" + "a" * 64,
        "t=abc,v1=" + "a" * 64,
        "t=-5,v1=" + "a" * 64,
        "t=1700000000,v1=xyz",
        "t=1700000000,v1=" + "a" * 63,
        "t=1700000000,t=1700000000,v1=" + "a" * 64,
        "t=1700000000,v1=" + ",v1=".join(["a" * 64] * 9),
        "t=1700000000;v1=" + "a" * 64,
    ],
)
def test_malformed_signature(header: str) -> None:
    result = send(job(), headers={"X-Signature": header})
    assert result.status == 401
    assert error_of(result)["code"] in ("signature_malformed", "signature_missing")


def test_wrong_key() -> None:
    result = send(job(), key="another-key")
    assert result.status == 401 and error_of(result)["code"] == "signature_invalid"


def test_signature_over_a_different_body() -> None:
    body = json.dumps(job()).encode()
    header = signature_header(KEY.encode(), body + b" ", NOW, source="crm")
    result = send(body, headers={"X-Signature": header})
    assert result.status == 401 and error_of(result)["code"] == "signature_invalid"


def test_signature_with_a_different_timestamp_than_signed() -> None:
    body = json.dumps(job()).encode()
    digest = signature_header(KEY.encode(), body, NOW, source="crm").split(",")[1]
    result = send(body, headers={"X-Signature": f"t={NOW + 1},{digest}"})
    assert result.status == 401 and error_of(result)["code"] == "signature_invalid"


@pytest.mark.parametrize("skew", [-TOLERANCE_SECONDS - 1, TOLERANCE_SECONDS + 1, -86_400])
def test_stale_or_future_timestamp(skew: int) -> None:
    keys = KeySource()
    result = send(job(), t=NOW + skew, signing_key=keys)
    assert result.status == 401 and error_of(result)["code"] == "signature_expired"
    assert keys.calls == 0  # no Key Vault read for a replay outside the window


def test_signature_is_checked_before_the_body_is_explained() -> None:
    result = send(b"{not json", key="wrong")
    assert result.status == 401
    result = send({"jobs": [{"id": "x"}]}, key="wrong")
    assert result.status == 401 and "jobs[0]" not in json.dumps(result.body)


# --- 413 / 415 ---------------------------------------------------------------------------------


def test_body_over_one_mib_is_refused_before_any_hmac() -> None:
    keys = KeySource()
    body = b"{" + b" " * MAX_BODY_BYTES + b"}"
    result = send(body, signing_key=keys)
    assert result.status == 413 and error_of(result)["code"] == "payload_too_large"
    assert keys.calls == 0


def test_body_of_exactly_one_mib_passes_the_size_check() -> None:
    body = json.dumps({"jobs": [job()]}).encode()
    body = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"}"
    assert len(body) == MAX_BODY_BYTES
    assert send(body).status == 202


def test_job_over_48_kib_is_413_and_names_it() -> None:
    big = job(1, data={"description": "x" * MAX_JOB_BYTES})
    result = send({"jobs": [job(0), big]})
    assert result.status == 413
    error = error_of(result)
    assert error["code"] == "job_too_large" and error["details"][0]["field"] == "jobs[1]"


def test_job_size_is_measured_on_the_enqueued_text() -> None:
    # pretty-printed input is bigger than the compact text we enqueue: this one fits
    base = job(data={"description": ""}, source="crm")
    compact = len(json.dumps(base, separators=(",", ":")).encode())
    fits = job(data={"description": "x" * (MAX_JOB_BYTES - compact)})
    body = json.dumps(fits, indent=8).encode()
    assert len(body) > MAX_JOB_BYTES
    result = send(body)
    assert result.status == 202 and len(result.messages[0].encode()) == MAX_JOB_BYTES


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/xml",
        "application/jsonx",
        "application/json; charset=latin-1",
        "multipart/form-data",
    ],
)
def test_not_json_is_415(content_type: str | None) -> None:
    body = json.dumps(job()).encode()
    headers = {"X-Signature": signature_header(KEY.encode(), body, NOW, source="crm")}
    if content_type is not None:
        headers["Content-Type"] = content_type
    keys = KeySource()
    result = handle_webhook("crm", headers, body, keys, now=NOW)
    assert result.status == 415 and error_of(result)["code"] == "unsupported_media_type"
    assert keys.calls == 0


# --- 400 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe", b'{"id": NaN}', b'{"id":"a","id":"b"}'])
def test_invalid_json(body: bytes) -> None:
    result = send(body)
    assert result.status == 400 and error_of(result)["code"] == "invalid_json"


def test_invalid_job_in_a_batch_names_index_and_field_and_nothing_is_enqueued() -> None:
    jobs = [job(i) for i in range(5)]
    jobs[3] = job(3, actAs={"email": "not-an-email"})
    result = send({"jobs": jobs})
    assert result.status == 400
    error = error_of(result)
    assert error["code"] == "invalid_job"
    assert error["details"] == [{"field": "jobs[3].actAs.email", "message": "must be an email address"}]
    assert "jobs[3].actAs.email" in error["message"]


def test_single_invalid_job_names_the_field_without_index() -> None:
    result = send(job(operation="merge"))
    assert result.status == 400 and error_of(result)["details"][0]["field"] == "operation"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"jobs": []}, "jobs"),
        ({"jobs": [job(i) for i in range(101)]}, "jobs"),
        ({"jobs": "x"}, "jobs"),
        ({"jobs": [job()], "source": "crm"}, "source"),
        ([job()], "job"),
        ("job", "job"),
    ],
)
def test_batch_shape(payload: object, field: str) -> None:
    result = send(payload)
    assert result.status == 400
    error = error_of(result)
    assert error["code"] == "invalid_job" and error["details"][0]["field"] == field


def test_duplicate_ids_in_a_batch_are_refused() -> None:
    result = send({"jobs": [job(1), job(2), job(1)]})
    assert result.status == 400
    assert error_of(result)["details"][0]["field"] == "jobs[2].id"


def test_invalid_source() -> None:
    result = send(job(), source="bad source/..")
    assert result.status == 400 and error_of(result)["code"] == "invalid_source"


# --- 5xx from the key source ------------------------------------------------------------------------


def test_key_vault_failure_is_503_with_its_code() -> None:
    keys = KeySource(error=AuthError("vault says no", code="keyvault_forbidden", status=403))
    result = send(job(), signing_key=keys)
    assert result.status == 503
    error = error_of(result)
    assert error["code"] == "signing_key_unavailable"
    assert error["details"] == [{"cause": "keyvault_forbidden", "transient": False}]


def test_missing_setting_is_500_naming_it() -> None:
    keys = KeySource(error=ConfigurationError("KEY_VAULT_URL", "is required", code="setting_missing"))
    result = send(job(), signing_key=keys)
    assert result.status == 500
    error = error_of(result)
    assert error["code"] == "setting_missing" and "KEY_VAULT_URL" in error["message"]


def test_empty_key_is_503() -> None:
    result = send(job(), signing_key=KeySource(value=""))
    assert result.status == 503 and error_of(result)["code"] == "signing_key_unavailable"


def test_key_is_never_echoed() -> None:
    for result in (send(job(), key="wrong"), send(job()), send(b"{bad")):
        assert KEY not in json.dumps(result.body)


# --- fuzz ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, "application/json", "text/plain"]), st.booleans())
def test_fuzz_any_body_gets_a_documented_answer(body: bytes, content_type: str | None, signed: bool) -> None:
    headers: dict[str, str] = {}
    if content_type:
        headers["Content-Type"] = content_type
    if signed:
        headers["X-Signature"] = signature_header(KEY.encode(), body, NOW, source="crm")
    result = handle_webhook("crm", headers, body, KeySource(), now=NOW)
    assert result.status in (202, 400, 401, 413, 415)
    if result.status == 202:
        assert result.messages and len(result.messages) == result.body["accepted"]
    else:
        assert result.messages == [] and set(result.body["error"]) == {"code", "message", "details"}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_signature_parser_never_raises(value: str) -> None:
    parsed = parse_signature(value)
    assert parsed is None or (parsed[0] >= 0 and 1 <= len(parsed[1]) <= 8)


# --- key rotation ----------------------------------------------------------------------------------


def _signed(body: bytes, key: str) -> dict[str, str]:
    signature = signature_header(key.encode(), body, NOW, source="crm")
    return {"Content-Type": "application/json", "X-Signature": signature}


def test_a_rotated_key_is_reread_once_and_accepted() -> None:
    body = json.dumps(job()).encode()
    rereads: list[str] = []

    def refresh(stale: str) -> str:
        rereads.append(stale)
        return "the-new-key"

    headers = _signed(body, "the-new-key")
    result = handle_webhook("crm", headers, body, KeySource(), now=NOW, refresh_key=refresh)
    assert result.status == 202
    assert rereads == [KEY]


def test_a_bad_signature_is_refused_even_after_a_reread() -> None:
    body = json.dumps(job()).encode()
    result = handle_webhook(
        "crm", _signed(body, "attacker"), body, KeySource(), now=NOW, refresh_key=lambda stale: "the-new-key"
    )
    assert result.status == 401
    assert result.body["error"]["code"] == "signature_invalid"
    assert result.messages == []


def test_a_failing_reread_is_still_a_401_not_a_500() -> None:
    body = json.dumps(job()).encode()

    def refresh(stale: str) -> str:
        raise AuthError("vault down", code="keyvault_unavailable", transient=True)

    result = handle_webhook("crm", _signed(body, "other"), body, KeySource(), now=NOW, refresh_key=refresh)
    assert result.status == 401


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"evt-1","entity":"contacts","operation":"create","data":{"firstname":"\\ud800"}}',
        b'{"jobs":[{"id":"evt-1","entity":"contacts","operation":"create","data":{"\\udfff":"x"}}]}',
        b'{"id":"evt-1","entity":"contacts","operation":"create","data":{"a":1},"actAs":{"email":"\\ud800@x.com"}}',
    ],
)
def test_a_lone_surrogate_escape_is_400_invalid_json_not_500(body: bytes) -> None:
    result = send(body)
    assert result.status == 400
    error = error_of(result)
    assert error["code"] == "invalid_json"
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("name", ["Content-Length", "content-length"])
def test_a_declared_content_length_over_the_limit_is_413_before_anything_else(name: str) -> None:
    keys = KeySource()
    result = handle_webhook("crm", {name: str(MAX_BODY_BYTES + 1), "Content-Type": "text/plain"}, b"{}",
                            keys, now=NOW)
    assert result.status == 413
    assert error_of(result)["code"] == "payload_too_large"
    assert keys.calls == 0


@pytest.mark.parametrize("value", [str(MAX_BODY_BYTES), "12", "", "abc", "-5", "١٢"])
def test_a_content_length_within_the_limit_or_unparsable_is_left_to_the_body_check(value: str) -> None:
    assert declared_too_large({"Content-Length": value}) is None
    assert send(job(), headers={"Content-Length": value}).status == 202


# --- the source scopes the idempotency key -----------------------------------------------------------


def test_every_message_is_stamped_with_the_routes_source() -> None:
    result = send({"jobs": [job(0), job(1)]}, source="erp.eu-1")
    assert result.status == 202
    assert [json.loads(m)["source"] for m in result.messages] == ["erp.eu-1", "erp.eu-1"]


def test_a_job_naming_its_own_source_must_name_the_route_source() -> None:
    assert send(job(source="crm"), source="crm").status == 202
    result = send({"jobs": [job(0), job(1, source="erp")]}, source="crm")
    assert result.status == 400
    error = error_of(result)
    assert error["code"] == "invalid_job"
    assert [d["field"] for d in error["details"]] == ["jobs[1].source"]


def test_keyless_creates_from_two_sources_with_the_same_job_id_get_two_records() -> None:
    from shared.contract import parse_message

    create = job(0, operation="create")
    del create["key"]
    ids = {}
    for source in ("crm", "erp", "crm"):
        (message,) = send(create, source=source).messages
        ids.setdefault(source, set()).add(parse_message(message).write_key())
    assert len(ids["crm"]) == 1  # the same source twice: the same record id (a replay is a no-op)
    assert ids["crm"] != ids["erp"]


# --- the signature covers the route's {source} -------------------------------------------------------


def test_a_body_signed_for_one_source_is_refused_at_another() -> None:
    body = json.dumps(job()).encode()
    signed_for_a = {"Content-Type": "application/json",
                    "X-Signature": signature_header(KEY.encode(), body, NOW, source="crm")}
    assert handle_webhook("crm", signed_for_a, body, KeySource(), now=NOW).status == 202
    refused = handle_webhook("erp", signed_for_a, body, KeySource(), now=NOW)
    assert refused.status == 401
    assert error_of(refused)["code"] == "signature_invalid"


def test_the_signed_string_is_t_dot_source_dot_body() -> None:
    body = b'{"id":"x"}'
    expected = hmac.new(KEY.encode(), b"1700000000.erp.v2." + body, hashlib.sha256).hexdigest()
    assert signature_header(KEY.encode(), body, NOW, source="erp.v2") == f"t=1700000000,v1={expected}"
    old_style = hmac.new(KEY.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert send(job(), headers={"X-Signature": f"t={NOW},v1={old_style}"}).status == 401
