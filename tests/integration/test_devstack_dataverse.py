"""The Dataverse emulator over real HTTPS: the wire behaviours the project's client depends on."""

from __future__ import annotations

import concurrent.futures
import http.cookiejar
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest
import requests

from devstack.control import SandboxClient, Stack
from devstack.dataverse.odata import quote_literal
from devstack.sandboxes import DEFAULT_TENANT_ID

pytestmark = pytest.mark.integration

ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


class Dataverse:
    """A bare `requests` client for one sandbox: the token comes from the sandbox's Entra emulator."""

    def __init__(self, sandbox: SandboxClient, *, keep_cookies: bool = False) -> None:
        self.sandbox = sandbox
        self.url = sandbox.env["DATAVERSE_URL"]
        self.api = f"{self.url}/api/data/v9.2/"
        self.session = requests.Session()
        self.session.verify = sandbox.env["REQUESTS_CA_BUNDLE"]
        if not keep_cookies:
            self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.token = self.fetch_token()
        self.app_user = next(u for u in sandbox.users if u["applicationid"] == sandbox.client_id)

    def fetch_token(self) -> str:
        secret = f"it-{uuid.uuid4().hex}"
        self.sandbox.set_client_secret(secret)
        response = self.session.post(
            f"{self.sandbox.env['AZURE_AUTHORITY_HOST']}/{self.sandbox.tenant_id}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": self.sandbox.client_id,
                "client_secret": secret,
                "scope": f"{self.url}/.default",
            },
            timeout=10,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        merged = dict(ODATA_HEADERS)
        if auth:
            merged["Authorization"] = f"Bearer {self.token}"
        merged.update(headers or {})
        url = path if path.startswith("https://") else self.api + path
        return self.session.request(method, url, headers=merged, timeout=10, **kwargs)

    def user(self, email: str) -> dict[str, Any]:
        return next(u for u in self.sandbox.users if u["internalemailaddress"] == email)


def key_path(entity_set: str, **key: str) -> str:
    """``contacts(emailaddress1='o''b%2Fc')``: literals quoted, then URL-encoded ("/" and "+" too)."""
    inner = ",".join(f"{name}={quote_literal(value)}" for name, value in key.items())
    return quote(f"{entity_set}({inner})", safe="()=,'@")


def error_of(response: requests.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, str] = body["error"]
    return error


@pytest.fixture
def dv(sandbox: SandboxClient) -> Dataverse:
    return Dataverse(sandbox)


@pytest.fixture
def big(stack: Stack) -> Iterator[SandboxClient]:
    sandbox = stack.create_sandbox(users=12)
    yield sandbox
    sandbox.delete()


# --- authentication and the shape of every answer ------------------------------------------------


def test_missing_token_gets_empty_401_with_bearer_challenge(dv: Dataverse) -> None:
    response = dv.call("GET", "WhoAmI", auth=False)
    assert response.status_code == 401
    assert response.content == b""
    assert response.headers["WWW-Authenticate"] == (
        f"Bearer authorization_uri=https://login.microsoftonline.com/{DEFAULT_TENANT_ID}/oauth2/authorize, "
        f"resource_id={dv.url}/"
    )


def test_revoked_and_foreign_tokens_get_401_naming_the_tenant(dv: Dataverse) -> None:
    dv.sandbox.revoke_tokens()
    response = dv.call("GET", "WhoAmI")
    assert response.status_code == 401
    assert response.content == b""
    assert (
        f"login.microsoftonline.com/{dv.sandbox.tenant_id}/oauth2/authorize"
        in response.headers["WWW-Authenticate"]
    )
    counters = dv.sandbox.counters()["dataverse"]
    assert counters["GET WhoAmI"] == 1
    assert counters["status:401"] == 1
    dv.token = dv.fetch_token()
    assert dv.call("GET", "WhoAmI").status_code == 200
    dv.token = dv.token[:-4] + ("AAAA" if not dv.token.endswith("AAAA") else "BBBB")
    assert dv.call("GET", "WhoAmI").status_code == 401


def test_whoami_and_the_service_headers(dv: Dataverse) -> None:
    response = dv.call("GET", "WhoAmI")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"@odata.context", "BusinessUnitId", "UserId", "OrganizationId"}
    assert body["@odata.context"] == f"{dv.api}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"
    assert body["UserId"] == dv.app_user["systemuserid"]
    headers = response.headers
    assert headers["OData-Version"] == "4.0"
    assert headers["Content-Type"] == "application/json; odata.metadata=minimal"
    assert uuid.UUID(headers["REQ_ID"]) and headers["x-ms-service-request-id"] == headers["REQ_ID"]
    assert headers["x-ms-dop-hint"] == "4"
    assert int(headers["x-ms-ratelimit-burst-remaining-xrm-requests"]) == 5999
    # Seconds, with a grouping comma, as a real environment writes it ("1,200.00" then "1,199.97").
    assert re.fullmatch(r"1,(200\.00|199\.\d\d)", headers["x-ms-ratelimit-time-remaining-xrm-requests"])
    cookies = {c.name: c for c in response.cookies}
    assert set(cookies) == {"ARRAffinity", "ReqClientId", "orgId"}
    assert cookies["orgId"].value == body["OrganizationId"] and cookies["ARRAffinity"].secure
    again = dv.call("GET", "WhoAmI").cookies
    assert again["ARRAffinity"] == cookies["ARRAffinity"].value  # one web server, one affinity value
    assert dv.sandbox.counters()["dataverse"]["GET WhoAmI"] == 2


def test_affinity_cookie_sent_back_is_counted(sandbox: SandboxClient) -> None:
    careless = Dataverse(sandbox, keep_cookies=True)
    careful = Dataverse(sandbox)
    for client in (careless, careful, careless, careful):
        assert client.call("GET", "WhoAmI").status_code == 200
    assert sandbox.counters()["dataverse"]["cookie:ARRAffinity"] == 1


# --- systemusers --------------------------------------------------------------------------------


def test_filter_select_and_three_pages_by_next_link(big: SandboxClient) -> None:
    dv = Dataverse(big)
    headers = {"Prefer": "odata.maxpagesize=5"}
    response = dv.call(
        "GET",
        "systemusers",
        headers=headers,
        params={
            "$select": "systemuserid,internalemailaddress",
            "$filter": "startswith(internalemailaddress,'actor') and isdisabled eq false",
        },
    )
    pages = [response]
    while "@odata.nextLink" in pages[-1].json():
        pages.append(dv.call("GET", pages[-1].json()["@odata.nextLink"], headers=headers))
    assert [p.status_code for p in pages] == [200, 200, 200]
    assert pages[0].headers["Preference-Applied"] == "odata.maxpagesize=5"
    assert [len(p.json()["value"]) for p in pages] == [5, 5, 2]
    rows = [row for p in pages for row in p.json()["value"]]
    assert sorted(r["internalemailaddress"] for r in rows) == [
        f"actor{n:04d}@contoso.com" for n in range(1, 13)
    ]
    assert all(set(r) == {"@odata.etag", "systemuserid", "internalemailaddress"} for r in rows)
    assert (
        pages[0].json()["@odata.context"]
        == f"{dv.api}$metadata#systemusers(systemuserid,internalemailaddress)"
    )
    assert "$skiptoken=" in pages[0].json()["@odata.nextLink"]
    assert big.counters()["dataverse"]["GET systemusers"] == 3


def test_next_link_has_dataverses_skiptoken_and_must_be_followed_verbatim(big: SandboxClient) -> None:
    dv = Dataverse(big)
    prefer = {"Prefer": "odata.maxpagesize=5"}
    first = dv.call("GET", "systemusers?$select=fullname", headers=prefer).json()
    link = first["@odata.nextLink"]
    # The shape of Learn's example: outer encoding keeps '=' and '/', the paging cookie inside is
    # encoded once more in lower-case hex, ids upper case in braces.
    assert re.fullmatch(
        re.escape(f"{dv.api}systemusers?$select=fullname&$skiptoken=")
        + r"%3Ccookie%20pagenumber=%222%22%20pagingcookie=%22%253ccookie%2520page%253d%25221%2522%253e"
        r"%253csystemuserid%2520last%253d%2522%257b[0-9A-F-]{36}%257d%2522%2520first%253d%2522%257b"
        r"[0-9A-F-]{36}%257d%2522%2520%252f%253e%253c%252fcookie%253e%22%20istracking=%22False%22%20/%3E",
        link,
    )
    assert len(dv.call("GET", link, headers=prefer).json()["value"]) == 5
    # Decoded once, the cookie's two encoding layers collapse into one when the URL is re-encoded.
    assert dv.call("GET", unquote(link), headers=prefer).status_code == 400
    assert dv.call("GET", link.replace("%", "%25"), headers=prefer).status_code == 400
    skip = dv.call("GET", "systemusers", params={"$skip": "5"})
    assert skip.status_code == 400
    assert error_of(skip)["code"] == "0x80060888"


def test_top_is_ignored_when_a_page_size_is_asked_for(big: SandboxClient) -> None:
    dv = Dataverse(big)
    top_only = dv.call("GET", "systemusers", params={"$top": "3"})
    assert len(top_only.json()["value"]) == 3 and "@odata.nextLink" not in top_only.json()
    both = dv.call("GET", "systemusers", params={"$top": "3"}, headers={"Prefer": "odata.maxpagesize=5"})
    assert len(both.json()["value"]) == 5 and "@odata.nextLink" in both.json()
    assert both.headers["Preference-Applied"] == "odata.maxpagesize=5"


def test_apostrophe_lookup_needs_doubled_quotes(dv: Dataverse) -> None:
    found = dv.call(
        "GET", "systemusers", params={"$filter": "internalemailaddress eq 'O''BRIEN@contoso.com'"}
    )
    assert found.status_code == 200
    assert [u["fullname"] for u in found.json()["value"]] == ["Siobhan O'Brien"]
    broken = dv.call(
        "GET", "systemusers", params={"$filter": "internalemailaddress eq 'o'brien@contoso.com'"}
    )
    assert broken.status_code == 400
    assert error_of(broken)["code"] == "0x80060888"
    shared = dv.call("GET", "systemusers", params={"$filter": "internalemailaddress eq 'shared@contoso.com'"})
    assert len(shared.json()["value"]) == 2


def test_user_by_id_and_unknown_properties(dv: Dataverse) -> None:
    jane = dv.user("jane@contoso.com")
    one = dv.call("GET", f"systemusers({jane['systemuserid']})", params={"$select": "fullname"})
    assert one.status_code == 200
    assert one.json()["fullname"] == "Jane Doe"
    assert one.json()["systemuserid"] == jane["systemuserid"]
    missing_id = str(uuid.uuid4())
    missing = dv.call("GET", f"systemusers({missing_id})")
    assert missing.status_code == 404
    assert error_of(missing) == {
        "code": "0x80040217",
        "message": f"systemuser With Id = {missing_id} Does Not Exist",
    }
    bad = dv.call("GET", "systemusers", params={"$select": "emailaddress"})
    assert bad.status_code == 400
    assert error_of(bad)["message"] == (
        "Could not find a property named 'emailaddress' on type 'Microsoft.Dynamics.CRM.systemuser'."
    )
    quoted_guid = dv.call(
        "GET", "systemusers", params={"$filter": f"systemuserid eq '{jane['systemuserid']}'"}
    )
    assert quoted_guid.status_code == 400
    assert "incompatible types" in error_of(quoted_guid)["message"]
    segment = dv.call("GET", "Contacts")
    assert segment.status_code == 404
    assert error_of(segment) == {
        "code": "0x80060888",
        "message": "Resource not found for the segment 'Contacts'.",
    }


# --- writes ---------------------------------------------------------------------------------------


def test_alternate_key_upsert_with_awkward_characters(dv: Dataverse) -> None:
    email = "o'brien+tag/x#1&y?z%20 é@contoso.com"
    path = key_path("contacts", emailaddress1=email)
    created = dv.call("PATCH", path, json={"firstname": "Ada"})
    assert created.status_code == 204
    # Addressed by alternate key, the 204 names the record by that key, not by its GUID (Learn).
    assert created.headers["OData-EntityId"] == f"{dv.api}{path}"
    contact_id = dv.call("GET", created.headers["OData-EntityId"]).json()["contactid"]
    updated = dv.call("PATCH", path, json={"lastname": "Lovelace", "emailaddress1": "changed@contoso.com"})
    assert updated.status_code == 204
    got = dv.call("GET", path, params={"$select": "firstname,lastname,emailaddress1"})
    assert got.json()["emailaddress1"] == email
    assert (got.json()["firstname"], got.json()["lastname"]) == ("Ada", "Lovelace")
    records = dv.sandbox.records("contacts")
    assert len(records) == 1 and records[0]["contactid"] == contact_id
    assert dv.sandbox.counters()["dataverse"]["PATCH contacts"] == 2


def test_alternate_key_errors(dv: Dataverse) -> None:
    missing = dv.call("GET", key_path("contacts", emailaddress1="nobody@contoso.com"))
    assert missing.status_code == 404
    assert error_of(missing) == {
        "code": "0x80060891",
        "message": "A record with the specified key values does not exist in contact entity",
    }
    undefined = dv.call("GET", key_path("contacts", firstname="Ada"))
    assert undefined.status_code == 400
    assert "not a defined key for the contact entity" in error_of(undefined)["message"]
    assert dv.call("POST", "accounts", json={"name": "A", "accountnumber": "001"}).status_code == 204
    duplicate = dv.call("POST", "accounts", json={"name": "B", "accountnumber": "001"})
    assert duplicate.status_code == 412
    assert error_of(duplicate) == {
        "code": "0x80060892",
        "message": "Entity Key account_accountnumber_key violated. A record with the same value for "
        "accountnumber already exists. A duplicate record cannot be created. Select one or more unique "
        "values and try again.",
    }
    assert len(dv.sandbox.records("accounts")) == 1
    account_id = dv.sandbox.records("accounts")[0]["accountid"]
    same_id = dv.call("POST", "accounts", json={"name": "C", "accountid": account_id})
    assert same_id.status_code == 412
    assert error_of(same_id) == {"code": "0x80040237", "message": "Cannot insert duplicate key."}


def test_alternate_key_values_in_the_body_win_on_create(dv: Dataverse) -> None:
    path = key_path("accounts", accountnumber="URL-1")
    assert dv.call("PATCH", path, json={"name": "A", "accountnumber": "BODY-1"}).status_code == 204
    assert [r["accountnumber"] for r in dv.sandbox.records("accounts")] == ["BODY-1"]
    assert dv.call("GET", path).status_code == 404


def test_if_match_and_if_none_match(dv: Dataverse) -> None:
    path = key_path("contacts", emailaddress1="cond@contoso.com")
    update_only = dv.call("PATCH", path, json={"firstname": "X"}, headers={"If-Match": "*"})
    assert update_only.status_code == 404
    assert error_of(update_only)["code"] == "0x80060891"
    assert dv.sandbox.records("contacts") == []
    create_only = dv.call("PATCH", path, json={"firstname": "X"}, headers={"If-None-Match": "*"})
    assert create_only.status_code == 204
    again = dv.call("PATCH", path, json={"firstname": "Y"}, headers={"If-None-Match": "*"})
    assert again.status_code == 412
    assert error_of(again) == {
        "code": "0x80040237",
        "message": "A record with matching key values already exists.",
    }
    etag = dv.call("GET", path).json()["@odata.etag"]
    stale = dv.call("PATCH", path, json={"firstname": "Z"}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    fresh = dv.call("PATCH", path, json={"firstname": "Z"}, headers={"If-Match": etag})
    assert fresh.status_code == 204
    assert [r["firstname"] for r in dv.sandbox.records("contacts")] == ["Z"]
    by_id = dv.call("PATCH", f"contacts({uuid.uuid4()})", json={"firstname": "Q"}, headers={"If-Match": "*"})
    assert by_id.status_code == 404
    assert error_of(by_id)["code"] == "0x80040217"


def test_return_representation_honours_select(dv: Dataverse) -> None:
    prefer = {"Prefer": "return=representation"}
    created = dv.call(
        "POST", "contacts?$select=firstname,_createdby_value", json={"firstname": "Rep"}, headers=prefer
    )
    assert created.status_code == 201
    body = created.json()
    assert body["firstname"] == "Rep"
    assert body["_createdby_value"] == dv.app_user["systemuserid"]
    assert set(body) == {"@odata.context", "@odata.etag", "firstname", "_createdby_value", "contactid"}
    assert created.headers["Preference-Applied"] == "return=representation"
    assert "OData-EntityId" not in created.headers and created.headers["ETag"] == body["@odata.etag"]
    path = f"contacts({body['contactid']})?$select=firstname"
    assert dv.call("PATCH", path, json={"firstname": "Rep2"}, headers=prefer).status_code == 200
    upsert = dv.call("PATCH", key_path("contacts", emailaddress1="rep@contoso.com"), json={}, headers=prefer)
    assert upsert.status_code == 201
    assert upsert.json()["emailaddress1"] == "rep@contoso.com"
    every_system_field = set(upsert.json())
    for name in (
        "contactid",
        "createdon",
        "modifiedon",
        "_createdby_value",
        "_modifiedby_value",
        "_createdonbehalfby_value",
        "_modifiedonbehalfby_value",
        "_ownerid_value",
        "versionnumber",
    ):
        assert name in every_system_field


def test_delete_then_delete_again(dv: Dataverse) -> None:
    created = dv.call("POST", "leads", json={"subject": "x"})
    lead_path = created.headers["OData-EntityId"]
    assert dv.call("DELETE", lead_path).status_code == 204
    gone = dv.call("DELETE", lead_path)
    assert gone.status_code == 404
    assert error_of(gone)["code"] == "0x80040217"
    assert dv.sandbox.records("leads") == []


def test_invalid_payload_property(dv: Dataverse) -> None:
    response = dv.call("POST", "contacts", json={"_ownerid_value": str(uuid.uuid4())})
    assert response.status_code == 400
    assert error_of(response)["code"] == "0x80048d19"


# --- impersonation ----------------------------------------------------------------------------------


def test_impersonation_is_attributed(dv: Dataverse) -> None:
    jane = dv.user("jane@contoso.com")
    noentra = dv.user("noentra@contoso.com")
    app_id = dv.app_user["systemuserid"]
    prefer = {"Prefer": "return=representation"}
    select = "?$select=_createdby_value,_modifiedby_value,_createdonbehalfby_value,_modifiedonbehalfby_value"
    as_jane = dv.call(
        "POST",
        "contacts" + select,
        json={},
        headers={**prefer, "CallerObjectId": jane["azureactivedirectoryobjectid"]},
    ).json()
    assert (as_jane["_createdby_value"], as_jane["_createdonbehalfby_value"]) == (
        jane["systemuserid"],
        app_id,
    )
    as_noentra = dv.call(
        "POST", "contacts" + select, json={}, headers={**prefer, "MSCRMCallerID": noentra["systemuserid"]}
    ).json()
    assert as_noentra["_modifiedby_value"] == noentra["systemuserid"]
    assert as_noentra["_modifiedonbehalfby_value"] == app_id
    as_app = dv.call("POST", "contacts" + select, json={}, headers=prefer).json()
    assert (as_app["_createdby_value"], as_app["_createdonbehalfby_value"]) == (app_id, None)
    whoami = dv.call("GET", "WhoAmI", headers={"CallerObjectId": jane["azureactivedirectoryobjectid"]})
    assert whoami.json()["UserId"] == jane["systemuserid"]


def test_caller_headers_received_are_counted_per_write(dv: Dataverse) -> None:
    jane, john = dv.user("jane@contoso.com"), dv.user("john@contoso.com")
    prefer = {"Prefer": "return=representation"}
    as_jane = {"CallerObjectId": jane["azureactivedirectoryobjectid"]}
    as_john = {"MSCRMCallerID": john["systemuserid"]}
    created = dv.call("POST", "contacts?$select=contactid", json={}, headers={**prefer, **as_jane}).json()
    path = f"contacts({created['contactid']})"
    assert dv.call("PATCH", path, json={"firstname": "J"}, headers=as_john).status_code == 204
    assert dv.call("GET", "WhoAmI", headers=as_jane).status_code == 200  # a read: not counted
    assert dv.call("DELETE", path).status_code == 204  # no header: nothing to count
    counters = dv.sandbox.counters()["dataverse"]
    assert (counters["caller:CallerObjectId"], counters["caller:MSCRMCallerID"]) == (1, 1)
    assert counters["POST contacts"] == 1 and counters["impersonation:applied"] == 3


def test_both_caller_headers_mscrmcallerid_is_used(dv: Dataverse) -> None:
    jane, john = dv.user("jane@contoso.com"), dv.user("john@contoso.com")
    both = {"CallerObjectId": jane["azureactivedirectoryobjectid"], "MSCRMCallerID": john["systemuserid"]}
    prefer = {"Prefer": "return=representation"}
    body = dv.call("POST", "contacts?$select=_createdby_value", json={}, headers={**prefer, **both}).json()
    assert body["_createdby_value"] == john["systemuserid"]
    counters = dv.sandbox.counters()["dataverse"]
    assert (counters["caller:CallerObjectId"], counters["caller:MSCRMCallerID"]) == (1, 1)


def test_missing_delegate_privilege_is_403(dv: Dataverse) -> None:
    dv.sandbox.set_privilege(impersonation=False)
    jane = dv.user("jane@contoso.com")
    response = dv.call(
        "POST", "contacts", json={}, headers={"CallerObjectId": jane["azureactivedirectoryobjectid"]}
    )
    assert response.status_code == 403
    assert error_of(response) == {
        "code": "0x8004A110",
        "message": "User does not have the privilege to act on behalf another user.",
    }
    assert dv.sandbox.records("contacts") == []
    assert dv.call("POST", "contacts", json={}).status_code == 204


def test_unknown_or_stale_caller_is_silently_ignored(dv: Dataverse) -> None:
    stale = dv.sandbox.add_user("stale@contoso.com", ignore_impersonation=True)
    app_id = dv.app_user["systemuserid"]
    prefer = {"Prefer": "return=representation"}
    for caller in (str(uuid.uuid4()), stale["azureactivedirectoryobjectid"]):
        body = dv.call("POST", "contacts", json={}, headers={**prefer, "CallerObjectId": caller}).json()
        assert body["_createdby_value"] == app_id
        assert body["_createdonbehalfby_value"] is None
    assert dv.sandbox.counters()["dataverse"]["impersonation:ignored"] == 2


def test_disabled_user_is_refused(dv: Dataverse) -> None:
    disabled = dv.user("disabled@contoso.com")
    response = dv.call(
        "POST", "contacts", json={}, headers={"CallerObjectId": disabled["azureactivedirectoryobjectid"]}
    )
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert message.startswith(
        f"The user with SystemUserId={disabled['systemuserid']} in OrganizationContext="
    )
    assert "is disabled. Disabled users cannot access the system." in message
    assert dv.sandbox.records("contacts") == []


# --- service protection -------------------------------------------------------------------------------


def test_request_limit_answers_429_with_retry_after_and_does_not_execute(dv: Dataverse) -> None:
    dv.sandbox.set_limits(requests=3, window_seconds=20)
    started = time.monotonic()
    for n in range(3):
        assert dv.call("POST", "leads", json={"subject": str(n)}).status_code == 204
    throttled = dv.call("POST", "leads", json={"subject": "over"})
    assert throttled.status_code == 429
    assert error_of(throttled) == {
        "code": "0x80072322",
        "message": "Number of requests exceeded the limit of 3 over time window of 20 seconds.",
    }
    # Accurate: the oldest counted request leaves the window 20 s after it was admitted.
    expected = 20 - (time.monotonic() - started)
    assert abs(int(throttled.headers["Retry-After"]) - expected) <= 1.5
    assert len(dv.sandbox.records("leads")) == 3
    assert dv.sandbox.counters()["dataverse"]["status:429"] == 1


def test_execution_time_limit(dv: Dataverse) -> None:
    dv.sandbox.set_limits(execution_ms=1, window_seconds=30)
    dv.sandbox.set_latency("dataverse", 0.01)
    assert dv.call("GET", "WhoAmI").status_code == 200
    throttled = dv.call("GET", "WhoAmI")
    assert throttled.status_code == 429
    assert error_of(throttled)["code"] == "0x80072321"
    assert error_of(throttled)["message"].startswith(
        "Combined execution time of incoming requests exceeded limit of 1 milliseconds over time window of 30"
    )
    assert 1 <= int(throttled.headers["Retry-After"]) <= 30


def test_concurrency_limit_counts_requests_in_flight(dv: Dataverse) -> None:
    dv.sandbox.set_limits(concurrent=1)
    dv.sandbox.set_latency("dataverse", 1.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(dv.call, "GET", "WhoAmI")
        # The request is counted on arrival, before its latency: from then on it is in flight.
        while dv.sandbox.counters()["dataverse"].get("GET WhoAmI", 0) < 1:
            assert not first.done()
        second = dv.call("GET", "WhoAmI")
        assert first.result().status_code == 200
    assert second.status_code == 429
    assert error_of(second) == {
        "code": "0x80072326",
        "message": "Number of concurrent requests exceeded the limit of 1.",
    }
    assert second.headers["Retry-After"] == "1"


# --- faults -------------------------------------------------------------------------------------------


def test_scripted_faults(dv: Dataverse) -> None:
    dv.sandbox.add_fault(
        "dataverse",
        method="PATCH",
        path="contacts",
        status=503,
        body={"error": {"code": "0x80040216", "message": "boom"}},
    )
    failed = dv.call("PATCH", key_path("contacts", emailaddress1="f@contoso.com"), json={})
    assert failed.status_code == 503
    assert error_of(failed)["message"] == "boom"
    assert dv.sandbox.records("contacts") == []
    dv.sandbox.add_fault("dataverse", path="WhoAmI", status=200, raw_body="{not json")
    assert dv.call("GET", "WhoAmI").text == "{not json"
    dv.sandbox.add_fault("dataverse", path="WhoAmI", drop=True)
    with pytest.raises(requests.ConnectionError):
        dv.call("GET", "WhoAmI")
    assert dv.call("GET", "WhoAmI").status_code == 200
    assert dv.sandbox.counters()["dataverse"]["GET WhoAmI"] == 3


# --- metadata Microsoft's Python SDK asks for ---------------------------------------------------------


def test_entity_definitions_for_the_python_sdk(dv: Dataverse) -> None:
    found = dv.call(
        "GET",
        "EntityDefinitions",
        params={
            "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
            "$filter": "LogicalName eq 'contact'",
        },
    )
    assert found.status_code == 200
    [contact] = found.json()["value"]
    assert (contact["EntitySetName"], contact["PrimaryIdAttribute"]) == ("contacts", "contactid")
    picklists = dv.call(
        "GET",
        "EntityDefinitions(LogicalName='contact')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        "?$select=LogicalName&$expand=OptionSet($select=Options)",
    )
    assert picklists.status_code == 200
    assert picklists.json()["value"] == []
    keys = dv.call("GET", "EntityDefinitions(LogicalName='account')/Keys").json()["value"]
    assert [k["KeyAttributes"] for k in keys] == [["accountnumber"]]


def test_a_write_naming_an_unknown_column_is_refused_as_dataverse_does(dv: Dataverse) -> None:
    """Dataverse's OData payload reader refuses a column the table does not have (no record is written):
    the emulator must too, or a typo in a job would pass every local test and fail in Azure."""
    for method, path in (("POST", "contacts"), ("PATCH", f"contacts({uuid.uuid4()})")):
        refused = dv.call(method, path, json={"firstname": "Ada", "colour": "red"})
        assert refused.status_code == 400
        error = error_of(refused)
        assert error["code"] == "0x80048d19"
        assert error["message"].startswith(
            "Error identified in Payload provided by the user for Entity :'contacts'")
        assert error["message"].endswith(
            "The property 'colour' does not exist on type 'Microsoft.Dynamics.CRM.contact'. Make sure to "
            "only use property names that are defined by the type or mark the type as open type.")
    assert dv.sandbox.records("contacts") == []
    assert dv.call("POST", "contacts", json={"firstname": "Ada", "jobtitle": "Countess"}).status_code == 204
    assert dv.call("POST", "accounts", json={"name": "A", "colour": "red"}).status_code == 400


def test_stock_tables_take_system_and_customer_added_columns(dv: Dataverse) -> None:
    """createdon/modifiedon are ignored as Dataverse ignores them; a column a maker added to a stock table
    (publisher prefix) is written once the test adds it through the control API."""
    assert dv.call("POST", "contacts", json={"firstname": "Ada", "createdon": "2020-01-01T00:00:00Z",
                                             "modifiedon": "2020-01-01T00:00:00Z"}).status_code == 204
    (ada,) = dv.sandbox.records("contacts")
    assert not ada["createdon"].startswith("2020")
    assert dv.call("POST", "contacts", json={"cr123_externalid": "X-1"}).status_code == 400
    dv.sandbox.add_entity("contacts", "contactid", alternate_keys=[["emailaddress1"]],
                          columns=["cr123_externalid"])
    assert dv.call("POST", "contacts", json={"cr123_externalid": "X-1"}).status_code == 204
    dv.sandbox.add_entity("accounts", "accountid", alternate_keys=[["cr123_accountcode"]])
    assert dv.call("POST", "accounts", json={"name": "A", "cr123_accountcode": "A-1"}).status_code == 204
