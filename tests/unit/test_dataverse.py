"""DataverseClient over mocked HTTP: headers, cookies, retries, errors, writes, paging, escaping."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
import responses
from hypothesis import given
from hypothesis import strategies as st

from devstack.dataverse.odata import decode_path, parse_filter, parse_key, split_resource
from shared.dataverse import Caller, DataverseClient, encode_query, entity_path, odata_literal
from shared.errors import DataverseError, ImpersonationNotApplied
from shared.settings import Settings

ORG = "https://org.crm.dynamics.com"
API = f"{ORG}/api/data/v9.2/"
SETTINGS = Settings(
    dataverse_url=ORG,
    tenant_id="11111111-2222-3333-4444-555555555555",
    client_id="66666666-7777-8888-9999-000000000000",
    key_vault_url="https://kv.local.test",
    timeout_seconds=12.5,
    max_retries=3,
    max_retry_seconds=60,
)
ACTOR = "aaaaaaaa-0000-0000-0000-000000000001"
ACTOR_OID = "bbbbbbbb-0000-0000-0000-000000000001"
APP_USER = "cccccccc-0000-0000-0000-000000000001"
RECORD = "dddddddd-0000-0000-0000-000000000001"


class FakeTokens:
    def __init__(self) -> None:
        self.issued = 1
        self.invalidated: list[str] = []

    def get_token(self) -> str:
        return f"token-{self.issued}"

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if token == f"token-{self.issued}":
            self.issued += 1


class Clock:
    """A monotonic clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as m:
        yield m


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens() -> FakeTokens:
    return FakeTokens()


@pytest.fixture
def client(tokens: FakeTokens, clock: Clock) -> DataverseClient:
    return DataverseClient(SETTINGS, tokens, sleep=clock.sleep, clock=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# --- headers, cookies, timeouts -----------------------------------------------------------------


def test_odata_headers_and_content_type_only_with_a_body(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    mock.get(f"{API}WhoAmI", json={"UserId": APP_USER})
    mock.patch(re.compile(rf"{re.escape(API)}contacts\(.*"), status=204)
    assert client.whoami()["UserId"] == APP_USER
    client.upsert("contacts", RECORD, {"firstname": "Ada"})
    get, patch = (c.request for c in mock.calls)
    for request in (get, patch):
        assert request.headers["Accept"] == "application/json"
        assert request.headers["OData-MaxVersion"] == "4.0"
        assert request.headers["OData-Version"] == "4.0"
        assert request.headers["Authorization"] == "Bearer token-1"
    assert "Content-Type" not in get.headers
    assert patch.headers["Content-Type"].startswith("application/json")
    assert json.loads(patch.body or b"") == {"firstname": "Ada"}


def test_affinity_cookie_is_never_sent_back(client: DataverseClient, mock: responses.RequestsMock) -> None:
    mock.get(
        f"{API}WhoAmI", json={}, headers={"Set-Cookie": "ARRAffinity=0123abcd; Path=/; HttpOnly; Secure"}
    )
    client.whoami()
    client.whoami()
    assert "Cookie" not in mock.calls[1].request.headers
    # control: a plain session does send it back, so the assertion above can fail
    plain = requests.Session()
    plain.get(f"{API}WhoAmI")
    plain.get(f"{API}WhoAmI")
    assert "ARRAffinity=0123abcd" in mock.calls[3].request.headers.get("Cookie", "")


def test_every_call_has_the_timeout_and_pool_is_large(tokens: FakeTokens) -> None:
    seen: list[Any] = []

    class Spy(requests.Session):
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            seen.append(kwargs.get("timeout"))
            response = requests.Response()
            response.status_code = 204
            return response

    client = DataverseClient(SETTINGS, tokens, session=Spy())  # type: ignore[arg-type]
    client.request("GET", "WhoAmI")
    client.delete("contacts", RECORD)
    assert seen == [12.5, 12.5]
    adapter = DataverseClient(SETTINGS, tokens)._session.get_adapter(API)  # type: ignore[arg-type]
    assert adapter._pool_maxsize >= 32  # type: ignore[attr-defined]
    assert adapter.max_retries.total == 0  # type: ignore[attr-defined]


def test_dop_hint_is_exposed(client: DataverseClient, mock: responses.RequestsMock) -> None:
    assert client.dop_hint is None
    mock.get(f"{API}WhoAmI", json={}, headers={"x-ms-dop-hint": "16"})
    client.whoami()
    assert client.dop_hint == 16


# --- 401, retries ---------------------------------------------------------------------------------


def test_401_refreshes_the_token_once_then_succeeds(
    client: DataverseClient, tokens: FakeTokens, mock: responses.RequestsMock
) -> None:
    mock.get(f"{API}WhoAmI", status=401, headers={"WWW-Authenticate": "Bearer authorization_uri=x"})
    mock.get(f"{API}WhoAmI", json={"UserId": APP_USER})
    assert client.whoami()["UserId"] == APP_USER
    assert tokens.invalidated == ["token-1"]
    assert [c.request.headers["Authorization"] for c in mock.calls] == ["Bearer token-1", "Bearer token-2"]


def test_401_twice_is_permanent_unauthorized(
    client: DataverseClient, tokens: FakeTokens, mock: responses.RequestsMock
) -> None:
    mock.post(f"{API}contacts", status=401)
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "x"})
    err = info.value
    assert (err.code, err.transient, err.status) == ("dataverse_unauthorized", False, 401)
    assert "application user" in err.message
    assert len(mock.calls) == 2 and tokens.invalidated == ["token-1"]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(
    client: DataverseClient, clock: Clock, mock: responses.RequestsMock, status: int
) -> None:
    mock.get(
        f"{API}WhoAmI",
        status=status,
        headers={"Retry-After": "7"},
        json=error_body(
            "0x80072322", "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
        ),
    )
    mock.get(f"{API}WhoAmI", json={"UserId": APP_USER})
    assert client.whoami()["UserId"] == APP_USER
    assert clock.sleeps == [7.0]


def test_retry_after_beyond_the_budget_gives_up_at_once(
    client: DataverseClient, clock: Clock, mock: responses.RequestsMock
) -> None:
    mock.get(
        f"{API}WhoAmI", status=429, headers={"Retry-After": "300"}, json=error_body("0x80072321", "busy")
    )
    with pytest.raises(DataverseError) as info:
        client.whoami()
    err = info.value
    assert (err.code, err.transient, err.retry_after, err.dataverse_code) == (
        "dataverse_throttled",
        True,
        300.0,
        "0x80072321",
    )
    assert clock.sleeps == []
    assert len(mock.calls) == 1


@pytest.mark.parametrize("status", [502, 503, 504])
def test_5xx_backs_off_exponentially_and_is_bounded(
    client: DataverseClient, clock: Clock, mock: responses.RequestsMock, status: int
) -> None:
    mock.get(f"{API}WhoAmI", status=status, body="")
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert (info.value.code, info.value.transient, info.value.status) == (
        "dataverse_unavailable",
        True,
        status,
    )
    assert len(mock.calls) == SETTINGS.max_retries + 1
    assert clock.sleeps == [0.5, 1.0, 2.0]  # jitter pinned at its maximum: base * 2^n


def test_backoff_has_full_jitter(tokens: FakeTokens, clock: Clock, mock: responses.RequestsMock) -> None:
    draws = iter([0.0, 0.5, 0.25, 0.9])
    client = DataverseClient(SETTINGS, tokens, sleep=clock.sleep, clock=clock, jitter=lambda: next(draws))  # type: ignore[arg-type]
    mock.get(f"{API}WhoAmI", status=502)
    with pytest.raises(DataverseError):
        client.whoami()
    assert clock.sleeps == [0.0, 0.5, 0.5]


def test_total_wait_never_exceeds_the_budget(
    tokens: FakeTokens, clock: Clock, mock: responses.RequestsMock
) -> None:
    settings = Settings(**{**SETTINGS.__dict__, "max_retries": 50, "max_retry_seconds": 10.0})
    client = DataverseClient(settings, tokens, sleep=clock.sleep, clock=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    mock.get(f"{API}WhoAmI", status=503)
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert info.value.transient
    assert sum(clock.sleeps) <= 10.0
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]  # the next (8 s) would have passed the 10 s budget


def test_each_backoff_is_capped(tokens: FakeTokens, clock: Clock, mock: responses.RequestsMock) -> None:
    settings = Settings(**{**SETTINGS.__dict__, "max_retries": 8, "max_retry_seconds": 600.0})
    client = DataverseClient(settings, tokens, sleep=clock.sleep, clock=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    mock.get(f"{API}WhoAmI", status=502)
    with pytest.raises(DataverseError):
        client.whoami()
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_500_and_4xx_are_not_retried(
    client: DataverseClient, clock: Clock, mock: responses.RequestsMock
) -> None:
    mock.get(f"{API}WhoAmI", status=500, json=error_body("0x80040216", "An unexpected error occurred."))
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert (info.value.code, info.value.transient) == ("dataverse_unavailable", True)
    mock.get(f"{API}accounts", status=400, json=error_body("0x80048d19", "Invalid property 'x'"))
    with pytest.raises(DataverseError) as info:
        client.get_json("accounts")
    assert (info.value.code, info.value.transient) == ("dataverse_bad_request", False)
    assert "Invalid property 'x'" in info.value.message
    assert clock.sleeps == []


def test_every_retry_is_logged_with_the_correlation_id(
    client: DataverseClient, mock: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    mock.get(
        f"{API}WhoAmI", status=429, headers={"Retry-After": "2"}, json=error_body("0x80072326", "concurrency")
    )
    mock.get(f"{API}WhoAmI", json={})
    with caplog.at_level(logging.WARNING, logger="shared.dataverse"):
        client.get_json("WhoAmI", correlation_id="crm-evt-42")
    [line] = [r.getMessage() for r in caplog.records if r.name == "shared.dataverse"]
    assert "job=crm-evt-42" in line and "429" in line and "0x80072326" in line and "2.00s" in line


# --- timeouts and what may be resent -----------------------------------------------------------


def test_keyless_post_is_not_resent_after_a_read_timeout(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    mock.post(f"{API}contacts", body=requests.exceptions.ReadTimeout("read timed out"))
    mock.post(f"{API}contacts", status=204, headers={"OData-EntityId": f"{API}contacts({RECORD})"})
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "Lovelace"})
    assert (info.value.code, info.value.transient) == ("dataverse_unreachable", True)
    assert len(mock.calls) == 1


def test_patch_is_resent_after_a_read_timeout(client: DataverseClient, mock: responses.RequestsMock) -> None:
    url = re.compile(rf"{re.escape(API)}contacts\(.*")
    mock.patch(url, body=requests.exceptions.ReadTimeout("read timed out"))
    mock.patch(url, status=204)
    result = client.upsert("contacts", {"emailaddress1": "ada@example.com"}, {"lastname": "Lovelace"})
    assert result.status == 204
    assert len(mock.calls) == 2


def test_post_is_resent_when_the_connection_was_never_made(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    mock.post(f"{API}contacts", body=requests.exceptions.ConnectTimeout("connect timed out"))
    mock.post(f"{API}contacts", status=204, headers={"OData-EntityId": f"{API}contacts({RECORD})"})
    result = client.create("contacts", {"lastname": "Lovelace"})
    assert (result.record_id, result.created) == (RECORD, True)
    assert len(mock.calls) == 2


@pytest.mark.parametrize("status", [502, 503, 504])
def test_keyless_post_is_not_resent_after_a_gateway_5xx(
    client: DataverseClient, clock: Clock, mock: responses.RequestsMock, status: int
) -> None:
    """A gateway may answer 5xx after the server created the record: resending could create a second."""
    mock.post(f"{API}contacts", status=status, headers={"Retry-After": "1"})
    mock.post(f"{API}contacts", status=204, headers={"OData-EntityId": f"{API}contacts({RECORD})"})
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "Lovelace"})
    assert (info.value.status, info.value.transient) == (status, True)
    assert len(mock.calls) == 1 and clock.sleeps == []


def test_keyless_post_is_resent_after_a_429(
    client: DataverseClient, clock: Clock, mock: responses.RequestsMock
) -> None:
    """Service protection refuses before running the request, so a 429 is safe to resend."""
    mock.post(f"{API}contacts", status=429, headers={"Retry-After": "3"}, json=error_body("0x80072322", "x"))
    mock.post(f"{API}contacts", status=204, headers={"OData-EntityId": f"{API}contacts({RECORD})"})
    assert client.create("contacts", {"lastname": "Lovelace"}).record_id == RECORD
    assert len(mock.calls) == 2 and clock.sleeps == [3.0]


def test_post_is_not_resent_after_a_dropped_connection(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    mock.post(
        f"{API}contacts", body=requests.exceptions.ConnectionError("Connection aborted. RemoteDisconnected")
    )
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "x"})
    assert info.value.code == "dataverse_unreachable"
    assert len(mock.calls) == 1


# --- errors ---------------------------------------------------------------------------------------


def test_impersonation_privilege_missing_says_what_to_add(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    mock.patch(
        re.compile(rf"{re.escape(API)}contacts\(.*"),
        status=403,
        json=error_body("0x8004A110", "User does not have the privilege to act on behalf another user."),
    )
    with pytest.raises(DataverseError) as info:
        client.upsert("contacts", RECORD, {"a": 1}, caller=Caller(ACTOR, ACTOR_OID))
    err = info.value
    assert (err.code, err.transient, err.status, err.dataverse_code) == (
        "impersonation_privilege_missing",
        False,
        403,
        "0x8004A110",
    )
    assert "prvActOnBehalfOfAnotherUser" in err.message and "security role" in err.message


@pytest.mark.parametrize(
    ("body", "fragment"), [(b"", "empty body"), (b"<html>IIS</html>", "not a Dataverse error")]
)
def test_unreadable_error_bodies_still_give_a_clear_message(
    client: DataverseClient, mock: responses.RequestsMock, body: bytes, fragment: str
) -> None:
    mock.get(f"{API}accounts", status=404, body=body)
    with pytest.raises(DataverseError) as info:
        client.get_json("accounts")
    assert info.value.code == "record_not_found"
    assert fragment in info.value.message and "GET accounts" in info.value.message


def test_malformed_2xx_body_is_transient(client: DataverseClient, mock: responses.RequestsMock) -> None:
    mock.get(f"{API}WhoAmI", body="<html>gateway</html>", content_type="text/html")
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert (info.value.code, info.value.transient) == ("dataverse_malformed_response", True)


def test_next_link_to_another_host_is_refused(client: DataverseClient, mock: responses.RequestsMock) -> None:
    mock.get(f"{API}systemusers", json={"value": [], "@odata.nextLink": "https://evil.example/steal"})
    with pytest.raises(DataverseError) as info:
        list(client.iter_pages("systemusers"))
    assert info.value.code == "dataverse_malformed_response"
    assert len(mock.calls) == 1  # the token never went to the other host


def test_a_next_link_that_repeats_stops_the_paging(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    """A server that hands the same link back would otherwise be paged until the function times out."""
    link = f"{API}systemusers?$skiptoken=2"
    mock.get(link, json={"value": [{"systemuserid": "2"}], "@odata.nextLink": link})
    mock.get(f"{API}systemusers", json={"value": [{"systemuserid": "1"}], "@odata.nextLink": link})
    with pytest.raises(DataverseError) as info:
        list(client.iter_pages("systemusers"))
    assert (info.value.code, info.value.transient) == ("dataverse_malformed_response", True)
    assert len(mock.calls) == 2


# --- writes ---------------------------------------------------------------------------------------


def _patch(mock: responses.RequestsMock, status: int, body: Any = None, **kw: Any) -> None:
    mock.patch(re.compile(rf"{re.escape(API)}contacts\(.*"), status=status, json=body, **kw)


def test_upsert_is_a_plain_patch(client: DataverseClient, mock: responses.RequestsMock) -> None:
    _patch(mock, 204, headers={"OData-EntityId": f"{API}contacts({RECORD})"})
    result = client.upsert("contacts", {"emailaddress1": "ada@example.com"}, {"lastname": "Lovelace"})
    request = mock.calls[0].request
    assert "If-Match" not in request.headers and "If-None-Match" not in request.headers
    assert unquote(urlsplit(request.url).path).endswith("contacts(emailaddress1='ada@example.com')")
    assert (result.operation, result.record_id, result.status, result.created, result.noop) == (
        "upsert",
        RECORD,
        204,
        None,
        False,
    )


def test_update_requires_the_record_and_404_is_permanent(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    _patch(mock, 404, error_body("0x80040217", f"contact With Id = {RECORD} Does Not Exist"))
    with pytest.raises(DataverseError) as info:
        client.update("contacts", RECORD, {"lastname": "x"})
    assert mock.calls[0].request.headers["If-Match"] == "*"
    assert (info.value.code, info.value.transient) == ("record_not_found", False)


def test_keyed_create_is_patch_if_none_match_and_412_is_a_noop(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    _patch(mock, 412, error_body("0x80040237", "A record with matching key values already exists."))
    result = client.create("contacts", {"lastname": "x"}, key=RECORD)
    assert mock.calls[0].request.method == "PATCH"
    assert mock.calls[0].request.headers["If-None-Match"] == "*"
    assert (result.status, result.noop, result.created, result.record_id) == (412, True, False, RECORD)


def test_keyed_create_blocked_by_another_records_alternate_key_is_not_a_noop(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    _patch(
        mock,
        412,
        error_body("0x80060892", "Entity Key contact_email violated. A record with the same value exists."),
    )
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"emailaddress1": "taken@example.com"}, key=RECORD)
    assert (info.value.code, info.value.transient, info.value.status) == ("precondition_failed", False, 412)


def test_a_tls_stream_cut_short_is_a_dropped_connection_but_a_bad_certificate_is_not_retried(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    import ssl

    import urllib3.exceptions

    url = re.compile(rf"{re.escape(API)}contacts\(.*")
    eof = requests.exceptions.SSLError(urllib3.exceptions.SSLError(ssl.SSLEOFError(8, "EOF occurred")))
    mock.patch(url, body=eof)
    mock.patch(url, status=204)
    assert client.upsert("contacts", RECORD, {"a": 1}).status == 204
    assert len(mock.calls) == 2
    bad = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    mock.get(
        f"{API}WhoAmI", body=requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(None, "u", bad))
    )
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert info.value.code == "dataverse_unreachable" and "not trusted" in info.value.message
    assert len(mock.calls) == 3


def test_keyless_create_is_a_post(client: DataverseClient, mock: responses.RequestsMock) -> None:
    mock.post(f"{API}contacts", status=204, headers={"OData-EntityId": f"{API}contacts({RECORD.upper()})"})
    result = client.create("contacts", {"lastname": "x"})
    assert (result.operation, result.record_id, result.created, result.status) == (
        "create",
        RECORD,
        True,
        204,
    )


def test_delete_of_a_missing_record_is_a_noop(client: DataverseClient, mock: responses.RequestsMock) -> None:
    mock.delete(f"{API}contacts({RECORD})", status=404, json=error_body("0x80040217", "Does Not Exist"))
    result = client.delete("contacts", RECORD)
    assert (result.operation, result.status, result.noop) == ("delete", 404, True)
    mock.delete(
        f"{API}contacts(emailaddress1='gone%40example.com')",
        status=404,
        json=error_body("0x80060891", "A record with the specified key values does not exist in contact"),
    )
    assert client.delete("contacts", {"emailaddress1": "gone@example.com"}).noop
    mock.delete(
        f"{API}nosuchset({RECORD})",
        status=404,
        json=error_body("0x8006088a", "Resource not found for the segment"),
    )
    with pytest.raises(DataverseError):
        client.delete("nosuchset", RECORD)  # a wrong entity set is not "already gone"


@pytest.mark.parametrize("body", [b"", b"<html>404 - File or directory not found.</html>"])
def test_a_404_or_412_without_a_dataverse_code_is_not_taken_as_done(
    client: DataverseClient, mock: responses.RequestsMock, body: bytes
) -> None:
    """Only Dataverse's own codes prove 'already gone' / 'already there'; a proxy's page proves nothing."""
    mock.delete(f"{API}contacts({RECORD})", status=404, body=body)
    with pytest.raises(DataverseError) as info:
        client.delete("contacts", RECORD)
    assert (info.value.code, info.value.transient) == ("record_not_found", False)
    mock.patch(re.compile(rf"{re.escape(API)}contacts\(.*"), status=412, body=body)
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "x"}, key=RECORD)
    assert (info.value.code, info.value.status) == ("precondition_failed", 412)


# --- impersonation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "header", "value"),
    [(Caller(ACTOR, ACTOR_OID), "CallerObjectId", ACTOR_OID), (Caller(ACTOR, None), "MSCRMCallerID", ACTOR)],
)
def test_impersonated_write_sends_the_caller_and_verifies_it(
    client: DataverseClient, mock: responses.RequestsMock, caller: Caller, header: str, value: str
) -> None:
    _patch(mock, 201, {"@odata.etag": 'W/"1"', "contactid": RECORD, "_modifiedby_value": ACTOR})
    result = client.upsert("contacts", {"emailaddress1": "a@example.com"}, {"lastname": "x"}, caller=caller)
    request = mock.calls[0].request
    assert request.headers[header] == value
    other = "MSCRMCallerID" if header == "CallerObjectId" else "CallerObjectId"
    assert other not in request.headers
    assert request.headers["Prefer"] == "return=representation"
    assert "$select=_modifiedby_value" in (request.url or "")
    assert (result.modified_by, result.created, result.record_id, result.status) == (ACTOR, True, RECORD, 201)


def test_silent_fallback_to_the_application_user_is_caught(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    _patch(mock, 200, {"contactid": RECORD, "_modifiedby_value": APP_USER})
    with pytest.raises(ImpersonationNotApplied) as info:
        client.update("contacts", RECORD, {"lastname": "x"}, caller=Caller(ACTOR, ACTOR_OID))
    err = info.value
    assert (err.code, err.transient) == ("impersonation_not_applied", False)
    assert err.details[0]["expected"] == ACTOR and err.details[0]["actual"] == APP_USER
    assert f"as {APP_USER}" in err.message and f"CallerObjectId {ACTOR_OID}" in err.message


def test_the_actor_check_ignores_the_case_of_the_guid(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    _patch(mock, 200, {"contactid": RECORD, "_modifiedby_value": ACTOR.upper()})
    result = client.update("contacts", RECORD, {"lastname": "x"}, caller=Caller(ACTOR, ACTOR_OID))
    assert result.modified_by == ACTOR.upper()


def test_unverifiable_impersonation_is_refused(client: DataverseClient, mock: responses.RequestsMock) -> None:
    mock.post(f"{API}contacts", status=204, headers={"OData-EntityId": f"{API}contacts({RECORD})"})
    with pytest.raises(ImpersonationNotApplied) as info:
        client.create("contacts", {"lastname": "x"}, caller=Caller(ACTOR))
    assert "cannot be confirmed" in info.value.message
    assert "as the application user" not in info.value.message  # nothing says who it ran as


def test_unimpersonated_writes_ask_for_nothing_back(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    _patch(mock, 204)
    client.upsert("contacts", RECORD, {"lastname": "x"})
    request = mock.calls[0].request
    assert "Prefer" not in request.headers and "?" not in (request.url or "")


# --- paging ---------------------------------------------------------------------------------------


def test_iter_pages_follows_next_link_verbatim(client: DataverseClient, mock: responses.RequestsMock) -> None:
    link2 = f"{API}systemusers?$select=systemuserid&$skiptoken=%3Ccookie%20pagenumber=%222%22/%3E"
    link3 = f"{API}systemusers?$select=systemuserid&$skiptoken=%3Ccookie%20pagenumber=%223%22/%3E"
    mock.get(link2, json={"value": [{"systemuserid": "2"}], "@odata.nextLink": link3})
    mock.get(link3, json={"value": [{"systemuserid": "3"}]})
    mock.get(
        f"{API}systemusers?$select=systemuserid",
        json={"value": [{"systemuserid": "1"}], "@odata.nextLink": link2},
    )
    pages = list(client.iter_pages("systemusers", {"$select": "systemuserid"}, page_size=1))
    assert [p["value"][0]["systemuserid"] for p in pages] == ["1", "2", "3"]
    urls = [c.request.url or "" for c in mock.calls]
    assert urls[1:] == [link2, link3]
    assert all("$skip=" not in u for u in urls)
    assert all(c.request.headers["Prefer"] == "odata.maxpagesize=1" for c in mock.calls)


# --- literals and paths ---------------------------------------------------------------------------


def test_literals() -> None:
    assert odata_literal("O'Brien") == "'O''Brien'"
    assert odata_literal("") == "''"
    assert odata_literal(None) == "null"
    assert odata_literal(True) == "true"
    assert odata_literal(42) == "42"
    assert odata_literal(1.5) == "1.5"
    assert odata_literal(uuid.UUID(RECORD)) == RECORD
    with pytest.raises(DataverseError):
        odata_literal(float("nan"))


def test_query_encoding_never_writes_plus_for_space() -> None:
    query = encode_query({"$filter": "internalemailaddress eq 'a+b c&d#e%f/g'"})
    assert query == "$filter=internalemailaddress%20eq%20%27a%2Bb%20c%26d%23e%25f%2Fg%27"


def test_entity_paths() -> None:
    assert entity_path("contacts", RECORD.upper()) == f"contacts({RECORD})"
    assert entity_path("contacts", {"emailaddress1": "o'brien+x@example.com"}) == (
        "contacts(emailaddress1='o%27%27brien%2Bx%40example.com')"
    )
    assert entity_path("accounts", {"accountnumber": "A/1 #2", "statecode": 0}) == (
        "accounts(accountnumber='A%2F1%20%232',statecode=0)"
    )
    for bad in ("not-a-guid", "{" + RECORD + "}", RECORD.replace("-", ""), f"{RECORD}) or (1"):
        with pytest.raises(DataverseError) as info:
            entity_path("contacts", bad)
        assert (info.value.code, info.value.transient) == ("dataverse_bad_request", False)
    for bad_set in ("contacts(x)", "con tacts", ""):
        with pytest.raises(DataverseError):
            entity_path(bad_set, RECORD)
    with pytest.raises(DataverseError):
        entity_path("contacts", {})
    with pytest.raises(DataverseError):
        entity_path("contacts", {"x') or ('": "y"})


@given(st.text(min_size=1, max_size=40))
def test_key_values_round_trip_through_the_emulators_parser(value: str) -> None:
    path = entity_path("contacts", {"emailaddress1": value})
    resource = split_resource(decode_path(path))
    assert resource.name == "contacts" and resource.key is not None
    assert parse_key(resource.key) == {"emailaddress1": value}


@given(st.text(min_size=1, max_size=40))
def test_filter_literals_round_trip_through_the_emulators_parser(value: str) -> None:
    query = encode_query({"$filter": f"internalemailaddress eq {odata_literal(value)}"})
    decoded = unquote(query.split("=", 1)[1], errors="strict")
    expr = parse_filter(decoded)
    assert expr.value == value  # type: ignore[union-attr]


# --- errors that name the cause (issue 11) --------------------------------------------------------

PAYLOAD_UNKNOWN_COLUMN = (
    "Error identified in Payload provided by the user for Entity :'contacts', For more information on this "
    "error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ---->  "
    "InnerException : Microsoft.OData.ODataException: The property 'colour' does not exist on type "
    "'Microsoft.Dynamics.CRM.contact'. Make sure to only use property names that are defined by the type "
    "or mark the type as open type."
)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("0x80048d19", PAYLOAD_UNKNOWN_COLUMN),  # today's answers: the OData reader's text, wrapped
        ("0x80060888", "The property 'colour' does not exist on type 'Microsoft.Dynamics.CRM.contact'. "
                       "Make sure to only use property names that are defined by the type."),
    ],
)
def test_an_unknown_column_is_invalid_column_naming_it(
    client: DataverseClient, mock: responses.RequestsMock, code: str, message: str
) -> None:
    mock.patch(f"{API}contacts({RECORD})", status=400, json=error_body(code, message))
    with pytest.raises(DataverseError) as info:
        client.upsert("contacts", RECORD, {"firstname": "Ada", "colour": "red"})
    err = info.value
    assert (err.code, err.transient, err.status) == ("invalid_column", False, 400)
    assert err.message.startswith("data.colour: ")
    assert "has no column 'colour'" in err.message
    assert err.details[0] == {"field": "data.colour", "message": "Microsoft.Dynamics.CRM.contact has no "
                                                                 "column 'colour'"}


def test_other_payload_errors_stay_bad_requests(
    client: DataverseClient, mock: responses.RequestsMock
) -> None:
    mock.patch(f"{API}contacts({RECORD})", status=400, json=error_body(
        "0x80048d19", "Error identified in Payload ... Cannot convert the literal 'x' to the expected type "
        "'Edm.Int32'."))
    with pytest.raises(DataverseError) as info:
        client.upsert("contacts", RECORD, {"numberofchildren": "x"})
    assert info.value.code == "dataverse_bad_request"


@pytest.mark.parametrize("code", ["0x80060888", "0x8006088a"])
def test_an_unknown_entity_set_is_entity_not_found(
    client: DataverseClient, mock: responses.RequestsMock, code: str
) -> None:
    mock.patch(f"{API}contactz({RECORD})", status=404,
               json=error_body(code, "Resource not found for the segment 'contactz'."))
    with pytest.raises(DataverseError) as info:
        client.upsert("contactz", RECORD, {"firstname": "Ada"})
    err = info.value
    assert (err.code, err.transient) == ("entity_not_found", False)
    assert "no entity set 'contactz'" in err.message
    # a missing RECORD keeps its own reason
    mock.patch(f"{API}contacts({RECORD})", status=404,
               json=error_body("0x80040217", f"contact With Id = {RECORD} Does Not Exist"))
    with pytest.raises(DataverseError) as info:
        client.update("contacts", RECORD, {"firstname": "Ada"})
    assert info.value.code == "record_not_found"


def test_no_request_starts_when_the_token_fetch_ran_past_the_job_deadline(
    clock: Clock, mock: responses.RequestsMock
) -> None:
    """The deadline is checked before the token fetch and again after it: Entra or Key Vault may be slow."""
    from shared import deadline
    from shared.deadline import DeadlineExceeded

    class SlowTokens(FakeTokens):
        def get_token(self) -> str:
            clock.now += 20.0  # a slow Entra / Key Vault round trip
            return super().get_token()

    client = DataverseClient(SETTINGS, SlowTokens(), sleep=clock.sleep, clock=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    mock.get(API + "WhoAmI", json={})
    job = deadline.within(10, kind=deadline.JOB, setting="JOB_DEADLINE_SECONDS", clock=clock)
    with job, pytest.raises(DeadlineExceeded) as caught:
        client.request("GET", "WhoAmI")
    assert caught.value.code == "job_deadline_exceeded"
    assert len(mock.calls) == 0
