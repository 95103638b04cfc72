"""Fuzz: the signed webhook answers every request with a documented status and never enqueues part of it.

Already covered in tests/unit/test_webhooks.py: random bytes (≤300) with three content types, signed
or not, get one of 202/400/401/413/415, and the signature parser never raises.  These properties add
what a sender can really vary: valid batches with one broken or duplicated job at a random index,
every signature failure (missing, malformed, stale, future, wrong key, rotated keys), content-type
spellings and header-name case, empty and 1 MiB bodies, a Key Vault that fails, and the ``webhook``
function itself with ``func.HttpRequest`` and an ``Out`` binding: on 202 exactly one ``set`` of one
message per job, each the job as received; on anything else, nothing set at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import function_app
from shared import contract
from shared.contract import MAX_JOB_BYTES, parse_job
from shared.errors import AuthError, ConfigurationError, SyncError
from shared.messages import strip, verify
from shared.webhooks import MAX_BODY_BYTES, TOLERANCE_SECONDS, WebhookResult, handle_webhook, signature_header
from tests.bindings import Out
from tests.signing import UNIT_MESSAGE_KEY
from tests.unit.functions_fakes import FakeRuntime, FakeSecrets
from tests.unit.test_fuzz_jobs import broken_jobs, json_values, nested, valid_jobs

FUZZ = settings(
    max_examples=250, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
KEY = "webhook-KEY-value-456"
NOW = 1_700_000_000
DOCUMENTED = {202, 400, 401, 403, 413, 415, 503}
# Refused before the signing key is read: an unauthenticated caller must not cost a Key Vault read.
BEFORE_THE_KEY = {
    "invalid_source", "payload_too_large", "unsupported_media_type",
    "signature_missing", "signature_malformed", "signature_expired",
}


# --- what a sender controls ------------------------------------------------------------------------


def _padded(n: int) -> bytes:
    """A valid single job padded with whitespace to exactly ``n`` bytes (still valid JSON)."""
    job = contract.dumps({"id": "big", "entity": "contacts", "operation": "delete", "key": {"a": 1}})
    return (job + " " * (n - len(job))).encode()


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Any], int | None]:
    """(jobs, index of the bad job or None): unique ids, one broken or duplicated job at a random index."""
    good = draw(st.lists(valid_jobs(), min_size=1, max_size=8, unique_by=lambda j: j["id"]))
    bad_at: int | None = None
    if draw(st.booleans()):
        bad_at = draw(st.integers(0, len(good)))
        if bad_at > 0 and draw(st.booleans()):
            twin = dict(draw(valid_jobs()))
            twin["id"] = good[draw(st.integers(0, bad_at - 1))]["id"]  # repeats an earlier job's id
            bad: Any = twin
        else:
            bad = draw(broken_jobs().map(lambda broken: broken[0]).filter(_is_invalid) | json_values)
            assume(_is_invalid(bad))
        good.insert(bad_at, bad)
    return good, bad_at


def _is_invalid(obj: object) -> bool:
    try:
        parse_job(obj)
    except SyncError:
        return True
    return False


bodies = st.one_of(
    batches().map(lambda b: json.dumps({"jobs": b[0]}).encode()),
    valid_jobs().map(lambda j: json.dumps(j).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    nested.map(str.encode),
    st.binary(max_size=300),
    st.sampled_from([b"", b"{}", b"[]", b'{"jobs": []}', b"\xef\xbb\xbf{}", b"null"]),
    st.sampled_from([MAX_BODY_BYTES, MAX_BODY_BYTES + 1]).map(_padded),
)
content_types = st.sampled_from([
    None, "", "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF8",
    "application/json; charset=latin-1", "text/plain", "application/x-www-form-urlencoded", "json",
])
header_names = st.sampled_from(["Content-Type", "content-type", "CONTENT-TYPE"])
signature_names = st.sampled_from(["X-Signature", "x-signature", "X-SIGNATURE"])
signature_kinds = st.sampled_from(
    ["valid", "rotated", "none", "empty", "malformed", "stale", "future", "wrong-key", "other-body",
     "other-source", "random"]
)
sources = st.sampled_from(["crm", "erp.v2", "a" * 64]) | st.text(max_size=70)


@dataclass
class KeySource:
    """The signing key reader: returns ``KEY``, or fails like Key Vault or a missing setting."""

    mode: str
    calls: int = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.mode == "transient":
            raise AuthError("Key Vault did not answer", code="keyvault_unavailable", transient=True)
        if self.mode == "forbidden":
            raise AuthError("Key Vault refused", code="keyvault_forbidden")
        if self.mode == "setting":
            raise ConfigurationError("KEY_VAULT_URL", "is required", code="setting_missing")
        return "" if self.mode == "empty" else KEY


key_modes = st.sampled_from(["ok", "ok", "ok", "transient", "forbidden", "setting", "empty"])


def signature(kind: str, body: bytes, now: int, draw_text: str, source: str = "crm") -> str | None:
    def sign(key: bytes, signed_body: bytes, t: int, signed_source: str = source) -> str:
        return signature_header(key, signed_body, t, source=signed_source)

    return {
        "valid": sign(KEY.encode(), body, now),
        "rotated": f"t={now},v1={'0' * 64},v1={sign(KEY.encode(), body, now).split('v1=')[1]}",
        "none": None,
        "empty": "",
        "malformed": f"t={now},v2=abc",
        "stale": sign(KEY.encode(), body, now - TOLERANCE_SECONDS - 5),
        "future": sign(KEY.encode(), body, now + TOLERANCE_SECONDS + 5),
        "wrong-key": sign(b"not-the-key", body, now),
        "other-body": sign(KEY.encode(), body + b" ", now),
        "other-source": sign(KEY.encode(), body, now, source + "x"),
        "random": draw_text,
    }[kind]


@st.composite
def requests_(draw: st.DrawFn, now: int = NOW) -> tuple[str, dict[str, str], bytes, str]:
    """(source, headers, body, signature kind) as a sender might send them."""
    source = draw(st.sampled_from(["crm"]) | sources)
    body = draw(bodies)
    headers: dict[str, str] = {}
    content_type = draw(content_types)
    if content_type is not None:
        headers[draw(header_names)] = content_type
    kind = draw(signature_kinds)
    value = signature(kind, body, now, draw(st.text(max_size=80)), source)
    if value is not None:
        headers[draw(signature_names)] = value
    if draw(st.booleans()):
        headers[draw(st.from_regex(r"X-[A-Za-z]{1,10}", fullmatch=True))] = draw(st.text(max_size=20))
    return source, headers, body, kind


# --- the answer's contract -------------------------------------------------------------------------


def assert_documented(result: WebhookResult, key: KeySource, body: bytes, source: str = "crm") -> None:
    """Documented status and body; all or nothing; the key read only after the cheap checks pass."""
    assert result.status in DOCUMENTED | ({500} if key.mode == "setting" else set())
    assert KEY not in json.dumps(result.body)
    if result.status == 202:
        assert set(result.body) == {"accepted", "ids"}
        payload = contract.loads(body.decode("utf-8-sig"))
        received = payload["jobs"] if isinstance(payload, dict) and "jobs" in payload else [payload]
        assert result.body["accepted"] == len(received) == len(result.messages)
        assert result.body["ids"] == [job["id"] for job in received]
        stamped = [{**job, "source": source} for job in received]  # each job as received + its source
        decoded = [json.loads(m) for m in result.messages]
        assert [strip(m) for m in decoded] == stamped
        # sealed by the function (never by handle_webhook without a seal): all of them, with the app's key
        sealed = [m for m in decoded if "_auth" in m]
        assert sealed in ([], decoded) and all(verify(m, [UNIT_MESSAGE_KEY]) for m in sealed)
        assert result.messages == [contract.dumps(m) for m in decoded]
        assert all(contract.text_size(m) <= MAX_JOB_BYTES for m in result.messages)
        assert key.calls == 1 and key.mode == "ok"
        return
    assert result.messages == []
    assert set(result.body) == {"error"}
    error = result.body["error"]
    assert set(error) == {"code", "message", "details"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list) and all(isinstance(d, dict) for d in error["details"])
    assert key.calls == (0 if error["code"] in BEFORE_THE_KEY else 1), error["code"]
    if result.status == 503:
        assert error["code"] == "signing_key_unavailable" and key.mode in ("transient", "forbidden", "empty")
    if result.status == 403:  # the authorization policy, applied only to a signed, valid batch
        assert error["code"] == "forbidden_by_policy" and key.mode == "ok" and error["details"]
    if result.status == 500:
        assert error["details"] == [{"setting": "KEY_VAULT_URL"}]


# --- handle_webhook --------------------------------------------------------------------------------


def _refresher(mode: str) -> Any:
    """What re-reading a rotated key may do: nothing (rate-limited), same key, fail, or another key."""
    if mode == "absent":
        return None

    def refresh(stale: str) -> str | None:
        if mode == "raise":
            raise AuthError("Key Vault did not answer", code="keyvault_unavailable", transient=True)
        return {"limited": None, "same": stale, "other": "another-key"}[mode]

    return refresh


@FUZZ
@given(requests_(), key_modes, st.sampled_from(["absent", "limited", "same", "raise", "other"]))
def test_any_request_gets_a_documented_answer_and_enqueues_all_or_nothing(
    request: tuple[str, dict[str, str], bytes, str], mode: str, refresh: str
) -> None:
    source, headers, body, kind = request
    key = KeySource(mode)
    result = handle_webhook(source, headers, body, key, now=NOW, refresh_key=_refresher(refresh))
    assert_documented(result, key, body, source)
    if result.status in (202, 400) and result.body.get("error", {}).get("code") != "invalid_source":
        assert kind in ("valid", "rotated")  # past the signature only when signed for this source + body


@settings(FUZZ, max_examples=150)
@given(batches(), st.booleans())
def test_a_signed_batch_is_all_or_nothing(batch: tuple[list[Any], int | None], single: bool) -> None:
    jobs_sent, bad_at = batch
    if single:
        jobs_sent, bad_at = jobs_sent[:1], (0 if bad_at == 0 else None)
    payload: Any = jobs_sent[0] if single else {"jobs": jobs_sent}
    body = json.dumps(payload).encode()
    signature = signature_header(KEY.encode(), body, NOW, source="crm")
    headers = {"Content-Type": "application/json", "X-Signature": signature}
    key = KeySource("ok")
    result = handle_webhook("crm", headers, body, key, now=NOW)
    assert_documented(result, key, body)
    enqueued = [{**j, "source": "crm"} if isinstance(j, dict) else j for j in jobs_sent]
    too_large = any(contract.text_size(contract.dumps(j)) > MAX_JOB_BYTES for j in enqueued)
    if bad_at is None:
        assert result.status == (413 if too_large else 202)
        return
    assert result.status == 400
    error = result.body["error"]
    assert error["code"] == "invalid_job"
    where = "" if single else f"jobs[{bad_at}]"
    assert any(d["field"].startswith(where) for d in error["details"]), (where, error["details"])
    if not single:
        assert all(d["field"].startswith("jobs") for d in error["details"])


# --- the webhook function (func.HttpRequest in, Out binding) ---------------------------------------


def _secrets(mode: str) -> FakeSecrets:
    failures: dict[str, SyncError] = {
        "transient": AuthError("Key Vault did not answer", code="keyvault_unavailable", transient=True),
        "forbidden": AuthError("Key Vault refused", code="keyvault_forbidden"),
    }
    name = "webhook-signing-secret"
    fail = {name: failures[mode]} if mode in failures else None
    return FakeSecrets(values={name: "" if mode == "empty" else KEY,
                               "queue-message-signing-key": UNIT_MESSAGE_KEY}, fail=fail)


@FUZZ
@given(st.data(), st.sampled_from(["ok", "ok", "transient", "forbidden", "empty"]))
def test_the_function_sets_the_queue_output_once_or_never(data: st.DataObject, mode: str) -> None:
    now = int(time.time())
    source, headers, body, _ = data.draw(requests_(now=now))
    runtime = FakeRuntime(secrets=_secrets(mode))
    request = func.HttpRequest(
        "POST", f"/api/webhooks/{source}", headers=headers, route_params={"source": source}, body=body
    )
    out = Out()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("shared.runtime.get_runtime", lambda: runtime)
        response = function_app.webhook(request, out)
    # a bad signature may add one rate-limited re-read (key rotation): count "read at all"
    key = KeySource(mode, calls=min(len(runtime.secrets.reads), 1))
    answer = json.loads(response.get_body())
    assert response.mimetype == "application/json"
    assert_documented(WebhookResult(response.status_code, answer, out.sets[0] if out.sets else []), key, body,
                      source)
    if response.status_code == 202:
        (messages,) = out.sets  # exactly one set(): the whole batch at once
        assert isinstance(messages, list) and len(messages) == answer["accepted"]
    else:
        assert out.sets == []

