"""The authorization policy against the emulators: roles and teams read from Dataverse in one request per
actor, sync_job refusing before any request for the write, the policy read from a blob in Azurite, and
``/api/users`` hiding the users nobody may act as.

Before the policy each refused job here was written (or, for the lookups, shown).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import azure.functions as func
import pytest
from azure.functions.queue import QueueMessage

import function_app
from devstack.control import SandboxClient, Stack
from shared.errors import DataverseError
from shared.memberships import SYSTEM_ADMINISTRATOR_TEMPLATE, MembershipDirectory
from shared.runtime import get_runtime, reset_runtime
from tests.bindings import Out
from tests.signing import signed_for_env

pytestmark = pytest.mark.integration


def run(payload: dict[str, Any]) -> Out:
    out = Out()
    function_app.sync_job(
        QueueMessage(id=str(uuid.uuid4()), body=signed_for_env(payload).encode(), dequeue_count=1), out
    )
    return out


def job(actor: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"pol-{uuid.uuid4().hex[:12]}", "entity": "contacts", "operation": "create",
        "data": {"firstname": "Ada", "lastname": "Lovelace"}, "actAs": {"email": actor}, "source": "crm",
    }
    base.update(overrides)
    return base


def reason(out: Out) -> str:
    assert out.was_set, "expected a dead-letter record"
    (text,) = out.value  # one record per job (a bulk job refused by the policy is one record too)
    return str(json.loads(text)["reason"])


def uid(sbx: SandboxClient, email: str) -> str:
    return next(str(u["systemuserid"]) for u in sbx.list_users() if u.get("internalemailaddress") == email)


def count(sbx: SandboxClient, key: str) -> int:
    return int(sbx.counters().get("dataverse", {}).get(key, 0))


def use_policy(monkeypatch: pytest.MonkeyPatch, policy: dict[str, Any]) -> None:
    monkeypatch.setenv("AUTHORIZATION_POLICY", json.dumps(policy))
    reset_runtime()


ANYTHING = {"operations": "*", "columns": "*"}


def test_roles_and_teams_come_in_one_request_per_actor(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    admin = sbx.role_id("System Administrator")
    sales = sbx.add_role("Salesperson")["roleid"]
    emails = ("jane@contoso.com", "john@contoso.com", "o'brien@contoso.com")
    jane, john, obrien = (uid(sbx, e) for e in emails)
    sbx.set_user_roles(jane, [admin])
    team = sbx.add_team("Sales EU", members=[john], roles=[sales])
    sbx.add_team("Admins", members=[obrien], roles=[admin])
    directory = MembershipDirectory(get_runtime().dataverse)

    held = directory.of(jane)
    assert held.is_system_administrator and held.teams == ()
    assert [(r.name, r.template_id) for r in held.roles] == [
        ("System Administrator", SYSTEM_ADMINISTRATOR_TEMPLATE)]
    johns = directory.of(john)
    assert not johns.is_system_administrator
    assert [(t.teamid, t.name) for t in johns.teams] == [(team["teamid"], "Sales EU")]
    assert [(r.roleid, r.via_team) for r in johns.roles] == [(sales, team["teamid"])]
    assert {"sales eu", "salesperson", sales} <= johns.team_names() | johns.role_names()
    assert directory.of(obrien).is_system_administrator  # through the Admins team's role
    assert count(sbx, "GET systemusers $expand") == 3

    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(directory.of(jane).is_system_administrator))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [True] * 8 and count(sbx, "GET systemusers $expand") == 3  # cached
    assert directory.queries == 3


def test_the_emulator_answers_a_wrong_expand_like_dataverse(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    client = get_runtime().dataverse
    jane = uid(sbx, "jane@contoso.com")
    with pytest.raises(DataverseError) as info:
        client.get_json(f"systemusers({jane})", {"$expand": "roles_association($select=name)"})
    assert info.value.status == 400 and info.value.dataverse_code == "0x80060888"
    assert "Could not find a property named 'roles_association'" in info.value.message
    with pytest.raises(DataverseError) as info:
        client.get_json(f"systemusers({jane})", {"$expand": "systemuserroles_association($select=nope)"})
    assert info.value.status == 400 and "on type 'Microsoft.Dynamics.CRM.role'" in info.value.message
    with pytest.raises(DataverseError) as info:
        client.get_json(f"systemusers({jane})", {"$expand": "systemuserroles_association($top=1)"})
    assert info.value.status == 501


def test_sync_job_never_acts_as_an_administrator_the_policy_does_not_name(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbx = sandbox_env
    sbx.set_user_roles(uid(sbx, "jane@contoso.com"), [sbx.role_id("System Administrator")])
    assert reason(run(job("jane@contoso.com"))) == "forbidden_by_policy"
    assert sbx.records("contacts") == []
    assert count(sbx, "GET WhoAmI") == 0  # refused before the attribution check, let alone the write

    use_policy(monkeypatch, {"default": {"entities": {"contacts": ANYTHING},
                                         "actAs": {"users": ["jane@contoso.com"]}}})
    assert not run(job("jane@contoso.com")).was_set
    assert len(sbx.records("contacts")) == 1


def test_a_team_policy_admits_members_only(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbx = sandbox_env
    sbx.add_team("Sales EU", members=[uid(sbx, "john@contoso.com")])
    use_policy(monkeypatch, {"sources": {"crm": {
        "entities": {"contacts": {"operations": ["create"], "columns": ["firstname", "lastname"]}},
        "actAs": {"teams": ["sales eu"]}}}})
    assert not run(job("john@contoso.com")).was_set
    assert reason(run(job("o'brien@contoso.com"))) == "forbidden_by_policy"
    extra_column = job("john@contoso.com", data={"firstname": "A", "description": "x"})
    assert reason(run(extra_column)) == "forbidden_by_policy"
    assert reason(run(job("john@contoso.com", source="erp"))) == "forbidden_by_policy"  # no default
    as_application = {k: v for k, v in job("john@contoso.com").items() if k != "actAs"}
    assert reason(run(as_application)) == "forbidden_by_policy"
    assert len(sbx.records("contacts")) == 1


def test_the_policy_is_read_from_a_blob_in_the_apps_storage(
    sandbox_env: SandboxClient, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.storage.blob import BlobServiceClient

    connection = stack.azurite.get("connection_string")
    if not connection:
        pytest.skip("the devstack state has no Azurite")
    container = f"policy{uuid.uuid4().hex[:10]}"
    service = BlobServiceClient.from_connection_string(connection)
    service.create_container(container)
    policy = {"default": {"entities": {"leads": ANYTHING}, "actAs": {"anyPerson": True}}}
    service.get_blob_client(container, "config/policy.json").upload_blob(json.dumps(policy).encode())
    monkeypatch.setenv("AzureWebJobsStorage", connection)
    monkeypatch.setenv("AUTHORIZATION_POLICY_BLOB", f"{container}/config/policy.json")
    reset_runtime()
    try:
        assert not run(job("jane@contoso.com", entity="leads", data={"subject": "hello"})).was_set
        assert reason(run(job("jane@contoso.com"))) == "forbidden_by_policy"  # contacts: not in the blob
        assert len(sandbox_env.records("leads")) == 1 and sandbox_env.records("contacts") == []
    finally:
        service.delete_container(container)


def test_a_bulk_job_is_refused_whole_when_one_record_breaks_the_policy(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbx = sandbox_env
    use_policy(monkeypatch, {"default": {
        "entities": {"contacts": {"operations": "*", "columns": ["firstname", "lastname", "emailaddress1"]}},
        "actAs": {"anyPerson": True}}})
    records = [{"key": {"emailaddress1": f"r{n}@example.com"}, "data": {"firstname": f"R{n}"}}
               for n in range(3)]
    records[2]["data"]["description"] = "not allowed"
    payload = {"id": "pol-bulk", "entity": "contacts", "operation": "upsert", "records": records,
               "actAs": {"email": "jane@contoso.com"}, "source": "crm"}
    out = run(payload)
    assert reason(out) == "forbidden_by_policy"
    (text,) = out.value
    assert "records[2].data.description" in json.loads(text)["detail"]
    assert sbx.records("contacts") == [] and count(sbx, "GET WhoAmI") == 0
    del records[2]["data"]["description"]
    assert not run({**payload, "id": "pol-bulk-2"}).was_set
    assert len(sbx.records("contacts")) == 3


def lookup(email: str, *, admin: bool = False) -> func.HttpResponse:
    handler = function_app.lookup_user_any if admin else function_app.lookup_user
    request = func.HttpRequest("GET", "/api/users", params={"email": email}, body=b"")
    response: func.HttpResponse = handler(request)
    return response


def test_lookup_hides_users_nobody_may_act_as_unless_asked_with_the_admin_key(
    sandbox_env: SandboxClient,
) -> None:
    sbx = sandbox_env
    app_user = next(u for u in sbx.list_users() if u.get("applicationid"))
    nobody = json.loads(lookup("nobody@contoso.com").get_body())
    for email in ("disabled@contoso.com", str(app_user["internalemailaddress"])):
        hidden = lookup(email)
        assert hidden.status_code == 404
        assert json.loads(hidden.get_body())["error"]["message"] == nobody["error"]["message"].replace(
            "nobody@contoso.com", email)
        shown = lookup(email, admin=True)
        assert shown.status_code == 200 and json.loads(shown.get_body())["email"] == email
    assert lookup("jane@contoso.com").status_code == 200
