"""Signed queue messages: what sync_job accepts, and every way a message it must refuse can look."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.errors import UnauthenticatedMessage
from shared.jobs import process_message
from shared.keyring import KeyRing
from shared.messages import AUTH_FIELD, authenticate, sign, strip, verify
from tests.signing import SOURCE, UNIT_MESSAGE_KEY, sign_job, signed_text
from tests.unit.functions_fakes import FakeRuntime, FakeSecrets

JOB: dict[str, Any] = {
    "id": "evt-1",
    "entity": "contacts",
    "operation": "upsert",
    "key": {"emailaddress1": "ada@example.com"},
    "data": {"firstname": "Ada"},
    "actAs": {"email": "jane@contoso.com"},
}


def ring(*values: str, clock: list[float] | None = None) -> KeyRing:
    """A KeyRing whose Key Vault answers ``values`` in turn (the last one forever)."""
    answers = list(values)

    class Store:
        reads = 0

        def get(self, name: str) -> str:
            return self.refresh(name)

        def refresh(self, name: str, stale: str | None = None) -> str:
            Store.reads += 1
            return answers.pop(0) if len(answers) > 1 else answers[0]

    now = clock if clock is not None else [0.0]
    return KeyRing(Store(), "k", refresh_seconds=300, grace_seconds=600, min_reread_seconds=60,
                   clock=lambda: now[0])


def test_a_signed_message_is_the_job_plus_auth_and_verifies() -> None:
    message = sign(JOB, "crm", "key-1", now=1_700_000_000)
    assert list(message)[-1] == AUTH_FIELD
    assert strip(message) == {**JOB, "source": "crm"}
    assert message[AUTH_FIELD]["source"] == "crm" and message[AUTH_FIELD]["t"] == 1_700_000_000
    assert verify(message, ["key-1"])
    assert verify(json.loads(json.dumps(message)), ["other", "key-1"])  # survives the queue's round trip


def tampered(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "actAs": {"email": "ceo@contoso.com"}}


def resourced(message: dict[str, Any]) -> dict[str, Any]:
    """Signed for crm, presented as billing's (both the job's source and _auth.source changed)."""
    return {**message, "source": "billing", AUTH_FIELD: {**message[AUTH_FIELD], "source": "billing"}}


def job_source_only(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "source": "billing"}


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda m: strip(m), "not signed"),
        (lambda m: {**m, AUTH_FIELD: "yes"}, "exactly source, t and sig"),
        (lambda m: {**m, AUTH_FIELD: {**m[AUTH_FIELD], "sig": "zz"}}, "64 lowercase hex"),
        (lambda m: {**m, AUTH_FIELD: {**m[AUTH_FIELD], "t": True}}, "Unix time"),
        (tampered, "does not verify"),
        (resourced, "does not verify"),
        (job_source_only, "differs from _auth.source"),
    ],
    ids=["unsigned", "auth-not-object", "sig-not-hex", "t-not-int", "tampered", "another-source",
         "job-source-changed"],
)
def test_refused_messages(build: Any, why: str) -> None:
    message = build(sign(JOB, "crm", "key-1"))
    with pytest.raises(UnauthenticatedMessage) as caught:
        authenticate(message, ring("key-1"))
    assert caught.value.code == "unauthenticated_message" and not caught.value.transient
    assert why in caught.value.message


def test_a_message_signed_with_another_key_is_refused() -> None:
    message = sign(JOB, "crm", "webhook-key-held-by-senders", now=0)
    with pytest.raises(UnauthenticatedMessage) as caught:
        authenticate(message, ring("key-1"))
    assert caught.value.code == "unauthenticated_message"


def test_a_signer_cannot_rescope_a_job() -> None:
    with pytest.raises(ValueError, match="names source"):
        sign({**JOB, "source": "billing"}, "crm", "key-1")


def test_a_key_rotated_in_elsewhere_is_picked_up_on_a_mismatch() -> None:
    clock = [0.0]
    keys = ring("key-1", "key-2", clock=clock)
    assert keys.keys() == ["key-1"]
    clock[0] = 61  # past the re-read rate limit
    message = sign(JOB, "crm", "key-2")
    assert authenticate(message, keys) == {**JOB, "source": "crm"}


def test_process_message_dead_letters_unauthenticated_messages_keeping_the_body() -> None:
    runtime = FakeRuntime()
    for text in (json.dumps(JOB), signed_text(JOB, "wrong-key"),
                 json.dumps(tampered(sign_job(JOB, UNIT_MESSAGE_KEY)))):
        outcome = process_message(text, lambda: runtime)  # type: ignore[arg-type, return-value]
        assert outcome.dead_letter is not None
        assert outcome.dead_letter["reason"] == "unauthenticated_message"
        assert outcome.dead_letter["job"] == json.loads(text)  # nothing lost: resend it signed
        assert outcome.job_id == "evt-1"
    assert runtime.dataverse.calls == []


def test_process_message_accepts_a_signed_job() -> None:
    runtime = FakeRuntime()
    outcome = process_message(signed_text(JOB), lambda: runtime)  # type: ignore[arg-type, return-value]
    assert outcome.dead_letter is None and outcome.result is not None
    assert runtime.secrets.reads == ["queue-message-signing-key"]
    assert SOURCE == "tests"


def test_unsigned_message_is_refused_before_its_schema_is_read() -> None:
    outcome = process_message(json.dumps({"id": "x", "bogus": 1}),
                              lambda: FakeRuntime())  # type: ignore[arg-type, return-value]
    assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == "unauthenticated_message"


def test_message_key_unavailable_raises_for_a_retry() -> None:
    from shared.errors import AuthError

    runtime = FakeRuntime(secrets=FakeSecrets(
        fail={"queue-message-signing-key": AuthError("kv", code="keyvault_unavailable", transient=True)}))
    with pytest.raises(AuthError):
        process_message(signed_text(JOB), lambda: runtime)  # type: ignore[arg-type, return-value]
