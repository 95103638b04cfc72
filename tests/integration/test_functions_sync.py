"""sync_job against the emulators with the real runtime: attribution, idempotency, dead-letter, retry."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from azure.functions.queue import QueueMessage

import function_app
from devstack.control import SandboxClient
from shared.contract import deterministic_id
from shared.errors import DataverseError
from shared.messages import strip
from tests.bindings import Out
from tests.signing import SOURCE, signed_for_env

pytestmark = pytest.mark.integration


def user_id(sbx: SandboxClient, email: str) -> str:
    found = [u for u in sbx.users if (u.get("internalemailaddress") or "").lower() == email]
    assert len(found) == 1, email
    return str(found[0]["systemuserid"])


def app_user_id(sbx: SandboxClient) -> str:
    return str(sbx.users[0]["systemuserid"])


def run(payload: dict[str, Any]) -> Out:
    out = Out()
    function_app.sync_job(
        QueueMessage(id=str(uuid.uuid4()), body=signed_for_env(payload).encode(), dequeue_count=1), out
    )
    return out


def job(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"it-{uuid.uuid4().hex[:12]}",
        "entity": "contacts",
        "operation": "upsert",
        "key": {"emailaddress1": "ada@example.com"},
        "data": {"firstname": "Ada", "lastname": "Lovelace"},
        "actAs": {"email": "jane@contoso.com"},
    }
    base.update(overrides)
    return base


def count(sbx: SandboxClient, service: str, key: str) -> int:
    return int(sbx.counters().get(service, {}).get(key, 0))


def test_upsert_is_attributed_to_the_actor(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    out = run(job())
    assert not out.was_set
    (record,) = sbx.records("contacts")
    assert record["emailaddress1"] == "ada@example.com" and record["firstname"] == "Ada"
    assert record["_modifiedby_value"] == user_id(sbx, "jane@contoso.com")
    assert record["_modifiedonbehalfby_value"] == app_user_id(sbx)


def test_warm_instance_reads_the_secret_and_the_token_once(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    for i in range(3):
        assert not run(job(key={"emailaddress1": f"u{i}@example.com"})).was_set
    assert count(sbx, "keyvault", "GET secret") == 2  # the client secret and the queue message key
    assert count(sbx, "entra", "POST token") == 1
    assert count(sbx, "dataverse", "GET systemusers") == 1  # jane looked up once


def test_keyless_create_delivered_twice_creates_one_record(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    payload = job(operation="create", key=None, actAs={"email": "john@contoso.com"})
    del payload["key"]
    assert not run(payload).was_set
    assert not run(payload).was_set  # at-least-once: the same message again
    records = sbx.records("contacts")
    assert len(records) == 1
    assert records[0]["contactid"] == str(deterministic_id("contacts", payload["id"], SOURCE))
    assert records[0]["_createdby_value"] == user_id(sbx, "john@contoso.com")


def test_the_apostrophe_actor(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    assert not run(job(actAs={"email": "o'brien@contoso.com"})).was_set
    assert sbx.records("contacts")[0]["_modifiedby_value"] == user_id(sbx, "o'brien@contoso.com")


@pytest.mark.parametrize(
    ("act_as", "reason"),
    [
        ({"email": "disabled@contoso.com"}, "actor_disabled"),
        ({"email": "nobody@contoso.com"}, "actor_not_found"),
        ({"email": "shared@contoso.com"}, "actor_ambiguous"),
    ],
)
def test_actor_failures_dead_letter_without_writing(
    sandbox_env: SandboxClient, act_as: dict[str, str], reason: str
) -> None:
    sbx = sandbox_env
    payload = job(actAs=act_as)
    out = run(payload)
    (record,) = [json.loads(text) for text in out.value]
    assert record["reason"] == reason and strip(record["job"]) == {**payload, "source": SOURCE}
    assert sbx.records("contacts") == []
    assert count(sbx, "dataverse", "PATCH contacts") == 0


def test_missing_privilege_dead_letters_with_its_code(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_privilege(impersonation=False)
    (record,) = [json.loads(text) for text in run(job()).value]
    assert record["reason"] == "impersonation_privilege_missing"
    assert sbx.records("contacts") == []


def test_silently_ignored_caller_is_dead_lettered(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.add_user("stale@contoso.com", ignore_impersonation=True)
    (record,) = [json.loads(text) for text in run(job(actAs={"email": "stale@contoso.com"})).value]
    assert record["reason"] == "impersonation_not_applied"


def test_update_of_a_missing_record_dead_letters(sandbox_env: SandboxClient) -> None:
    (record,) = [json.loads(text) for text in run(job(operation="update", key=str(uuid.uuid4()))).value]
    assert record["reason"] == "record_not_found"


def test_persistent_503_raises_for_the_host_to_retry(
    sandbox_env: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbx = sandbox_env
    monkeypatch.setenv("DATAVERSE_MAX_RETRIES", "1")
    monkeypatch.setenv("DATAVERSE_MAX_RETRY_SECONDS", "2")
    from shared.runtime import reset_runtime

    reset_runtime()
    sbx.add_fault("dataverse", method="PATCH", path="contacts", status=503, times=10)
    out = Out()
    with pytest.raises(DataverseError) as caught:
        function_app.sync_job(QueueMessage(id="m", body=signed_for_env(job()).encode(), dequeue_count=1), out)
    assert caught.value.transient and caught.value.code == "dataverse_unavailable"
    assert not out.was_set
    assert count(sbx, "dataverse", "PATCH contacts") == 2  # the first try and one bounded retry
