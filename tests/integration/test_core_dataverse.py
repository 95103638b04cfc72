"""The Dataverse client and user directory against the emulator over HTTPS, with real auth."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from devstack.control import SandboxClient, Stack
from shared.dataverse import Caller, DataverseClient
from shared.errors import ActorError, DataverseError, ImpersonationNotApplied
from shared.runtime import Runtime, get_runtime, reset_runtime
from shared.settings import Settings

pytestmark = pytest.mark.integration


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def client_with(runtime: Runtime, sleep: Sleeps | None = None, **overrides: str) -> DataverseClient:
    settings = Settings.from_env({**os.environ, **overrides})
    return DataverseClient(settings, runtime.tokens, sleep=sleep or Sleeps())


def email_of(sbx: SandboxClient, email: str) -> dict[str, object]:
    return next(u for u in sbx.users if u.get("internalemailaddress") == email)


# --- users --------------------------------------------------------------------------------------


def test_lookup_of_an_email_with_an_apostrophe(sandbox_env: SandboxClient) -> None:
    users = get_runtime().users
    found = users.by_email("O'Brien@Contoso.com")
    expected = email_of(sandbox_env, "o'brien@contoso.com")
    assert found.systemuserid == expected["systemuserid"]
    assert users.by_email("o'brien@contoso.com") is found
    assert sandbox_env.counters()["dataverse"]["GET systemusers"] == 1


def test_shared_email_is_ambiguous_and_unknown_is_not_found(sandbox_env: SandboxClient) -> None:
    users = get_runtime().users
    with pytest.raises(ActorError) as info:
        users.by_email("shared@contoso.com")
    assert info.value.code == "actor_ambiguous"
    shared_ids = {
        u["systemuserid"] for u in sandbox_env.users if u.get("internalemailaddress") == "shared@contoso.com"
    }
    assert {d["systemUserId"] for d in info.value.details} == shared_ids
    with pytest.raises(ActorError) as missing:
        users.by_email("nobody@contoso.com")
    assert missing.value.code == "actor_not_found"


def test_lookup_by_id_and_object_id(sandbox_env: SandboxClient) -> None:
    users = get_runtime().users
    jane = email_of(sandbox_env, "jane@contoso.com")
    by_oid = users.by_object_id(str(jane["azureactivedirectoryobjectid"]))
    assert by_oid.systemuserid == jane["systemuserid"]
    noentra = email_of(sandbox_env, "noentra@contoso.com")
    by_id = users.by_id(str(noentra["systemuserid"]))
    assert by_id.azure_ad_object_id is None and by_id.email == "noentra@contoso.com"


@pytest.fixture
def crowded(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxClient]:
    sbx = stack.create_sandbox(users=11)
    for name, value in sbx.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AZURE_CLIENT_ID", raising=False)
    reset_runtime()
    try:
        yield sbx
    finally:
        reset_runtime()
        sbx.delete()


def test_three_pages_of_users_follow_next_link(crowded: SandboxClient) -> None:
    runtime = get_runtime()
    total = len(crowded.users)
    page_size = -(-total // 3)  # three pages exactly
    pages = list(
        runtime.dataverse.iter_pages("systemusers", {"$select": "systemuserid"}, page_size=page_size)
    )
    assert len(pages) == 3
    ids = [row["systemuserid"] for page in pages for row in page["value"]]
    assert sorted(ids) == sorted(u["systemuserid"] for u in crowded.users)
    everyone = runtime.users.all_users()
    assert {u.systemuserid for u in everyone} == set(ids)
    runtime.users.prime(everyone)
    crowded.reset_counters()
    runtime.users.by_email("actor0007@contoso.com")
    assert "GET systemusers" not in crowded.counters()["dataverse"]


# --- writes and impersonation --------------------------------------------------------------------


def test_impersonated_upsert_is_written_as_the_actor(sandbox_env: SandboxClient) -> None:
    runtime = get_runtime()
    jane = runtime.users.by_email("jane@contoso.com")
    result = runtime.dataverse.upsert(
        "contacts", {"emailaddress1": "ada+1@example.com"}, {"lastname": "Lovelace"}, caller=jane.caller()
    )
    assert (result.created, result.modified_by) == (True, jane.systemuserid)
    [record] = sandbox_env.records("contacts")
    assert record["_modifiedby_value"] == jane.systemuserid
    assert record["emailaddress1"] == "ada+1@example.com"
    again = runtime.dataverse.upsert(
        "contacts", {"emailaddress1": "ada+1@example.com"}, {"firstname": "Ada"}, caller=jane.caller()
    )
    assert again.created is False and again.record_id == result.record_id
    assert len(sandbox_env.records("contacts")) == 1


def test_silent_fallback_is_caught(sandbox_env: SandboxClient) -> None:
    stale = sandbox_env.add_user("stale@contoso.com", ignore_impersonation=True)
    runtime = get_runtime()
    actor = runtime.users.by_email("stale@contoso.com")
    assert actor.systemuserid == stale["systemuserid"]
    with pytest.raises(ImpersonationNotApplied) as info:
        runtime.dataverse.upsert(
            "contacts", {"emailaddress1": "x@example.com"}, {"lastname": "X"}, caller=actor.caller()
        )
    assert info.value.code == "impersonation_not_applied" and not info.value.transient
    unknown = Caller(str(uuid.uuid4()), None)  # MSCRMCallerID Dataverse does not know
    with pytest.raises(ImpersonationNotApplied):
        runtime.dataverse.create("contacts", {"lastname": "Y"}, caller=unknown)


def test_missing_impersonation_privilege_says_what_to_add(sandbox_env: SandboxClient) -> None:
    sandbox_env.set_privilege(impersonation=False)
    runtime = get_runtime()
    jane = runtime.users.by_email("jane@contoso.com")
    with pytest.raises(DataverseError) as info:
        runtime.dataverse.upsert(
            "contacts", {"emailaddress1": "a@example.com"}, {"lastname": "A"}, caller=jane.caller()
        )
    assert (info.value.code, info.value.status, info.value.transient) == (
        "impersonation_privilege_missing",
        403,
        False,
    )
    assert "prvActOnBehalfOfAnotherUser" in info.value.message
    assert sandbox_env.records("contacts") == []


def test_conditional_writes(sandbox_env: SandboxClient) -> None:
    dataverse = get_runtime().dataverse
    record_id = str(uuid.uuid4())
    first = dataverse.create("contacts", {"lastname": "Once"}, key=record_id)
    assert (first.created, first.noop) == (True, False)
    replay = dataverse.create("contacts", {"lastname": "Twice"}, key=record_id)
    assert (replay.status, replay.noop) == (412, True)
    [record] = sandbox_env.records("contacts")
    assert record["lastname"] == "Once"
    with pytest.raises(DataverseError) as info:
        dataverse.update("contacts", str(uuid.uuid4()), {"lastname": "Ghost"})
    assert (info.value.code, info.value.transient) == ("record_not_found", False)
    assert len(sandbox_env.records("contacts")) == 1
    assert dataverse.delete("contacts", record_id).noop is False
    assert dataverse.delete("contacts", record_id).noop is True
    assert sandbox_env.records("contacts") == []


def test_errors_name_the_cause_entity_and_column(sandbox_env: SandboxClient) -> None:
    """A table that does not exist and a column that does not exist each get their own reason."""
    dataverse = get_runtime().dataverse
    with pytest.raises(DataverseError) as info:
        dataverse.upsert("contactz", str(uuid.uuid4()), {"firstname": "Ada"})
    assert (info.value.code, info.value.status, info.value.transient) == ("entity_not_found", 404, False)
    assert "no entity set 'contactz'" in info.value.message
    with pytest.raises(DataverseError) as info:
        dataverse.upsert("contacts", {"emailaddress1": "ada@example.com"},
                         {"firstname": "Ada", "colour": "x"})
    assert (info.value.code, info.value.status, info.value.transient) == ("invalid_column", 400, False)
    assert info.value.details[0]["field"] == "data.colour"
    assert sandbox_env.records("contacts") == []


def test_affinity_cookie_is_not_sent_back(sandbox_env: SandboxClient) -> None:
    dataverse = get_runtime().dataverse
    for _ in range(3):
        dataverse.whoami()
    counters = sandbox_env.counters()["dataverse"]
    assert counters["GET WhoAmI"] == 3
    assert "cookie:ARRAffinity" not in counters
    assert dataverse.dop_hint is not None and dataverse.dop_hint > 0


# --- retries ---------------------------------------------------------------------------------------


def test_429_retry_after_is_honoured(sandbox_env: SandboxClient) -> None:
    sleeps = Sleeps()
    client = client_with(get_runtime(), sleeps)
    client.whoami()
    sandbox_env.add_fault(
        "dataverse",
        path="WhoAmI",
        status=429,
        headers={"Retry-After": "3"},
        body={"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit"}},
    )
    assert client.whoami()["UserId"]
    assert sleeps.waits == [3.0]
    assert sandbox_env.counters()["dataverse"]["status:429"] == 1


def test_service_protection_limit_is_survived(sandbox_env: SandboxClient) -> None:
    """The emulator's own limiter (not a scripted fault): every call eventually succeeds."""
    sandbox_env.set_limits(requests=3, window_seconds=1)
    dataverse = get_runtime().dataverse
    for _ in range(6):
        assert dataverse.whoami()["UserId"]
    counters = sandbox_env.counters()["dataverse"]
    assert counters["status:429"] >= 1
    assert counters["status:200"] == 6


def test_5xx_backoff_is_bounded(sandbox_env: SandboxClient) -> None:
    sleeps = Sleeps()
    client = client_with(get_runtime(), sleeps, DATAVERSE_MAX_RETRIES="4")
    client.whoami()
    sandbox_env.reset_counters()
    sandbox_env.add_fault("dataverse", path="WhoAmI", status=503, times=-1)
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert (info.value.code, info.value.transient) == ("dataverse_unavailable", True)
    assert sandbox_env.counters()["dataverse"]["status:503"] == 5
    assert len(sleeps.waits) == 4
    assert all(0 <= w <= 0.5 * 2**i for i, w in enumerate(sleeps.waits))


def test_keyless_post_is_not_resent_after_a_timeout_but_patch_is(sandbox_env: SandboxClient) -> None:
    client = client_with(get_runtime(), DATAVERSE_TIMEOUT_SECONDS="0.5")
    client.whoami()
    sandbox_env.add_fault("dataverse", method="POST", path="contacts", delay=1.0)
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "Maybe"})
    assert (info.value.code, info.value.transient) == ("dataverse_unreachable", True)
    sandbox_env.add_fault("dataverse", method="PATCH", path="contacts", delay=1.0)
    result = client.upsert("contacts", {"emailaddress1": "patch@example.com"}, {"lastname": "Sure"})
    assert result.status in (200, 201, 204)
    counters = sandbox_env.counters()["dataverse"]
    assert counters["POST contacts"] == 1  # the server did create it, after we stopped waiting
    assert counters["PATCH contacts"] == 2
    names = sorted(r["lastname"] for r in sandbox_env.records("contacts"))
    assert names == ["Maybe", "Sure"]  # nothing twice


def test_dropped_connection_resends_only_idempotent_requests(sandbox_env: SandboxClient) -> None:
    client = client_with(get_runtime())
    client.whoami()
    sandbox_env.add_fault("dataverse", method="POST", path="contacts", drop=True)
    with pytest.raises(DataverseError) as info:
        client.create("contacts", {"lastname": "Lost"})
    assert info.value.code == "dataverse_unreachable"
    sandbox_env.add_fault("dataverse", method="PATCH", path="contacts", drop=True)
    client.upsert("contacts", {"emailaddress1": "drop@example.com"}, {"lastname": "Kept"})
    assert [r["lastname"] for r in sandbox_env.records("contacts")] == ["Kept"]


def test_malformed_success_body_is_transient(sandbox_env: SandboxClient) -> None:
    client = client_with(get_runtime())
    sandbox_env.add_fault("dataverse", path="WhoAmI", status=200, raw_body="<html>proxy</html>")
    with pytest.raises(DataverseError) as info:
        client.whoami()
    assert (info.value.code, info.value.transient) == ("dataverse_malformed_response", True)
