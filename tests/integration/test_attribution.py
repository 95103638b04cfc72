"""Attribution is verified before the write: a caller Dataverse would silently ignore never gets a write.

Each test failed before the WhoAmI check: the update was saved as the application user and only then
dead-lettered, the delete ran with no check at all.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from devstack.control import SandboxClient
from tests.bindings import Out
from tests.integration.test_functions_sync import job, run  # one way to run a signed job

pytestmark = pytest.mark.integration


def dead_letter(out: Out) -> dict[str, Any]:
    assert out.was_set, "expected a dead-letter record"
    (text,) = out.value  # sync_job writes a list: one dead-letter record per job (or per failed bulk record)
    record: dict[str, Any] = json.loads(text)
    return record


def stale(sbx: SandboxClient) -> str:
    """A user whose Entra object id Dataverse no longer maps: the caller header is silently ignored."""
    user = sbx.add_user("stale@contoso.com", ignore_impersonation=True)
    return str(user["systemuserid"])


def test_update_under_an_ignored_caller_writes_nothing(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    assert not run(job()).was_set
    (before,) = sbx.records("contacts")
    stale(sbx)
    out = run(job(operation="update", data={"firstname": "Mallory"}, actAs={"email": "stale@contoso.com"}))
    assert dead_letter(out)["reason"] == "impersonation_not_applied"
    (after,) = sbx.records("contacts")
    assert after["firstname"] == "Ada"
    assert after["_modifiedby_value"] == before["_modifiedby_value"]


def test_delete_under_an_ignored_caller_deletes_nothing(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    assert not run(job()).was_set
    stale(sbx)
    payload = job(operation="delete", actAs={"email": "stale@contoso.com"})
    del payload["data"]
    out = run(payload)
    assert dead_letter(out)["reason"] == "impersonation_not_applied"
    assert len(sbx.records("contacts")) == 1


def test_keyless_create_under_an_ignored_caller_leaves_no_record_to_replay_into(
    sandbox_env: SandboxClient,
) -> None:
    sbx = sandbox_env
    stale(sbx)
    payload = job(operation="create", actAs={"email": "stale@contoso.com"})
    del payload["key"]
    assert dead_letter(run(payload))["reason"] == "impersonation_not_applied"
    assert sbx.records("contacts") == []  # nothing owned by the application user for a replay to hit


def test_one_whoami_per_actor_per_instance(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    for i in range(4):
        assert not run(job(key={"emailaddress1": f"u{i}@example.com"})).was_set
    assert sbx.counters()["dataverse"].get("GET WhoAmI", 0) == 1


def test_application_users_are_never_acted_for(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    app_user = sbx.users[0]
    out = run(job(actAs={"systemUserId": app_user["systemuserid"]}))
    assert dead_letter(out)["reason"] == "actor_application_user"
    assert sbx.records("contacts") == []
