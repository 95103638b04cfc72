"""UserDirectory: escaped lookups, ambiguity, per-instance cache with single flight, paging."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses

from devstack.dataverse.odata import Comparison, parse_filter
from shared.dataverse import Caller, DataverseClient
from shared.errors import ActorError, InvalidJob
from shared.settings import Settings
from shared.users import SELECT, SystemUser, UserDirectory
from tests.concurrency import gate_single_flight, in_parallel

ORG = "https://org.crm.dynamics.com"
API = f"{ORG}/api/data/v9.2/"
SETTINGS = Settings(
    dataverse_url=ORG,
    tenant_id="11111111-2222-3333-4444-555555555555",
    client_id="66666666-7777-8888-9999-000000000000",
    key_vault_url="https://kv.local.test",
)
USERS_URL = re.compile(rf"{re.escape(API)}systemusers(\?.*)?$")


def user(n: int, email: str | None, oid: str | None = "auto", disabled: bool = False) -> dict[str, Any]:
    return {
        "systemuserid": f"00000000-0000-0000-0000-{n:012d}",
        "internalemailaddress": email,
        "fullname": f"User {n}",
        "azureactivedirectoryobjectid": f"10000000-0000-0000-0000-{n:012d}" if oid == "auto" else oid,
        "isdisabled": disabled,
        "accessmode": 0,
    }


DIRECTORY = [
    user(1, "jane@contoso.com"),
    user(2, "o'brien@contoso.com"),
    user(3, "shared@contoso.com"),
    user(4, "shared@contoso.com"),
    user(5, "noentra@contoso.com", oid=None),
    user(6, "disabled@contoso.com", disabled=True),
]


class FakeDataverse:
    """Answers systemusers queries by evaluating the $filter with the emulator's own parser."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.users = list(DIRECTORY)
        self.queries: list[dict[str, str]] = []
        self.before_answer: threading.Event | None = None
        mock.add_callback("GET", USERS_URL, callback=self._answer)

    def _answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        import json

        from devstack.dataverse.odata import evaluate

        query = dict(parse_qsl(urlsplit(request.url or "").query, keep_blank_values=True))
        self.queries.append(query)
        if self.before_answer is not None:
            assert self.before_answer.wait(10)
        rows = self.users
        if "$filter" in query:
            expr = parse_filter(query["$filter"])
            rows = [u for u in rows if evaluate(expr, u)]
        if "$top" in query:
            rows = rows[: int(query["$top"])]
        return 200, {"Content-Type": "application/json"}, json.dumps({"value": rows})


class Tokens:
    def get_token(self) -> str:
        return "token"

    def invalidate(self, token: str) -> None:
        pass


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dataverse() -> Iterator[FakeDataverse]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeDataverse(mock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def directory(clock: Clock) -> UserDirectory:
    client = DataverseClient(SETTINGS, Tokens())  # type: ignore[arg-type]
    return UserDirectory(client, ttl=900, negative_ttl=60, clock=clock)


def test_email_lookup_escapes_the_apostrophe(directory: UserDirectory, dataverse: FakeDataverse) -> None:
    found = directory.by_email("o'brien@contoso.com")
    assert found.systemuserid == "00000000-0000-0000-0000-000000000002"
    [query] = dataverse.queries
    assert query["$filter"] == "internalemailaddress eq 'o''brien@contoso.com'"
    assert query["$select"] == SELECT
    assert query["$top"] == "2"
    expr = parse_filter(query["$filter"])
    assert isinstance(expr, Comparison) and expr.value == "o'brien@contoso.com"


def test_the_raw_url_is_percent_encoded(directory: UserDirectory) -> None:
    with responses.RequestsMock() as mock:
        mock.get(USERS_URL, json={"value": [user(9, "a+b@x.com")]})
        directory.by_email("a+b@x.com")
        url = mock.calls[0].request.url or ""
    assert "%27a%2Bb%40x.com%27" in url and "+" not in url.split("?", 1)[1]


def test_email_cache_is_case_insensitive(directory: UserDirectory, dataverse: FakeDataverse) -> None:
    a = directory.by_email("Jane@Contoso.com")
    b = directory.by_email("jane@contoso.com ")
    assert a == b
    assert len(dataverse.queries) == 1


def test_found_users_are_cached_under_id_and_object_id(
    directory: UserDirectory, dataverse: FakeDataverse
) -> None:
    jane = directory.by_email("jane@contoso.com")
    assert directory.by_id(jane.systemuserid.upper()) == jane
    assert directory.by_object_id(str(jane.azure_ad_object_id)) == jane
    assert len(dataverse.queries) == 1


def test_positive_entries_expire(directory: UserDirectory, dataverse: FakeDataverse, clock: Clock) -> None:
    directory.by_email("jane@contoso.com")
    clock.now = 899
    directory.by_email("jane@contoso.com")
    assert len(dataverse.queries) == 1
    clock.now = 901
    directory.by_email("jane@contoso.com")
    assert len(dataverse.queries) == 2


def test_not_found_is_cached_briefly(
    directory: UserDirectory, dataverse: FakeDataverse, clock: Clock
) -> None:
    for _ in range(2):
        with pytest.raises(ActorError) as info:
            directory.by_email("nobody@contoso.com")
        assert (info.value.code, info.value.transient) == ("actor_not_found", False)
        assert "nobody@contoso.com" in info.value.message
    assert len(dataverse.queries) == 1
    dataverse.users.append(user(7, "nobody@contoso.com"))
    clock.now = 61
    assert directory.by_email("nobody@contoso.com").systemuserid.endswith("7")
    assert len(dataverse.queries) == 2


def test_shared_email_is_ambiguous_and_lists_the_ids(
    directory: UserDirectory, dataverse: FakeDataverse
) -> None:
    with pytest.raises(ActorError) as info:
        directory.by_email("shared@contoso.com")
    err = info.value
    assert (err.code, err.transient) == ("actor_ambiguous", False)
    ids = {d["systemUserId"] for d in err.details}
    assert ids == {"00000000-0000-0000-0000-000000000003", "00000000-0000-0000-0000-000000000004"}
    with pytest.raises(ActorError) as again:
        directory.by_email("SHARED@contoso.com")
    assert again.value.code == "actor_ambiguous" and again.value.details == err.details
    assert len(dataverse.queries) == 1


def test_24_concurrent_jobs_of_one_cold_actor_cause_one_lookup(
    directory: UserDirectory, dataverse: FakeDataverse
) -> None:
    n = 24
    dataverse.before_answer = gate_single_flight(directory, n)
    found = in_parallel(n, lambda: directory.by_email("jane@contoso.com").systemuserid)
    assert found == ["00000000-0000-0000-0000-000000000001"] * n
    assert len(dataverse.queries) == 1


def test_a_caller_that_missed_the_cache_while_the_leader_finished_does_not_query_again(
    directory: UserDirectory, dataverse: FakeDataverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race single flight alone leaves open: the cache was empty when this caller looked, and
    the leader stored the user before it entered the flight; it must take that, not query again."""
    directory.by_email("jane@contoso.com")
    real = directory._cached
    looks = 0

    def cached(key: tuple[str, str]) -> SystemUser | None:
        nonlocal looks
        looks += 1
        return None if looks == 1 else real(key)  # the first look, before the flight, sees nothing

    monkeypatch.setattr(directory, "_cached", cached)
    assert directory.by_email("jane@contoso.com").systemuserid.endswith("1")
    assert looks == 2 and len(dataverse.queries) == 1


def test_lookup_by_id_and_object_id_use_bare_guids(
    directory: UserDirectory, dataverse: FakeDataverse
) -> None:
    by_oid = directory.by_object_id("10000000-0000-0000-0000-000000000001")
    assert by_oid.email == "jane@contoso.com"
    by_id = directory.by_id("00000000-0000-0000-0000-000000000005")
    assert by_id.azure_ad_object_id is None and by_id.caller() == Caller(by_id.systemuserid, None)
    filters = [q["$filter"] for q in dataverse.queries]
    assert filters == [
        "azureactivedirectoryobjectid eq 10000000-0000-0000-0000-000000000001",
        "systemuserid eq 00000000-0000-0000-0000-000000000005",
    ]
    with pytest.raises(ActorError):
        directory.by_id("jane@contoso.com")  # not a GUID: refused before any query
    assert len(dataverse.queries) == 2


def test_resolve_takes_exactly_one_key(directory: UserDirectory, dataverse: FakeDataverse) -> None:
    assert directory.resolve({"email": "jane@contoso.com"}).fullname == "User 1"
    assert (
        directory.resolve({"systemUserId": "00000000-0000-0000-0000-000000000002"}).email
        == "o'brien@contoso.com"
    )
    assert directory.resolve({"azureAdObjectId": "10000000-0000-0000-0000-000000000006"}).is_disabled
    for bad in ({}, {"email": "a@b.c", "systemUserId": "x"}, {"upn": "a@b.c"}):
        with pytest.raises(InvalidJob):
            directory.resolve(bad)


def test_all_users_pages_through_everything_once(clock: Clock) -> None:
    client = DataverseClient(SETTINGS, Tokens())  # type: ignore[arg-type]
    directory = UserDirectory(client, clock=clock)
    rows = [user(n, f"u{n}@contoso.com") for n in range(1, 8)]
    link2, link3 = f"{API}systemusers?$skiptoken=2", f"{API}systemusers?$skiptoken=3"
    with responses.RequestsMock() as mock:
        mock.get(link2, json={"value": rows[3:6], "@odata.nextLink": link3})
        mock.get(link3, json={"value": rows[6:]})
        mock.get(f"{API}systemusers", json={"value": rows[:3], "@odata.nextLink": link2})
        users = directory.all_users()
        first = mock.calls[0].request
        assert len(mock.calls) == 3
        assert dict(parse_qsl(urlsplit(first.url or "").query)) == {"$select": SELECT}
        assert first.headers["Prefer"].startswith("odata.maxpagesize=")
    assert [u.email for u in users] == [f"u{n}@contoso.com" for n in range(1, 8)]


def test_prime_fills_the_cache_but_not_for_shared_emails(
    directory: UserDirectory, dataverse: FakeDataverse
) -> None:
    directory.prime(SystemUser.from_record(r) for r in DIRECTORY)
    assert directory.by_email("JANE@contoso.com").systemuserid.endswith("1")
    assert directory.by_id("00000000-0000-0000-0000-000000000006").is_disabled
    assert dataverse.queries == []
    with pytest.raises(ActorError) as info:
        directory.by_email("shared@contoso.com")
    assert info.value.code == "actor_ambiguous"
    assert len(dataverse.queries) == 1


def test_to_api_shape() -> None:
    u = SystemUser.from_record(user(5, "noentra@contoso.com", oid=None))
    assert u.to_api() == {
        "systemUserId": "00000000-0000-0000-0000-000000000005",
        "email": "noentra@contoso.com",
        "fullName": "User 5",
        "azureAdObjectId": None,
        "isDisabled": False,
        "accessMode": 0,
    }
