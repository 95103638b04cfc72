"""AttributionGuard: WhoAmI with the caller header before an actor's first write, cached per actor."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from shared.attribution import AttributionGuard, check_eligible
from shared.errors import ActorError, ImpersonationNotApplied
from shared.users import SystemUser
from tests.concurrency import in_parallel

JANE = SystemUser("11111111-1111-4111-8111-111111111111", "jane@contoso.com", "Jane", None, False, 0)
JOHN = SystemUser(
    "22222222-2222-4222-8222-222222222222", "john@contoso.com", "John",
    "33333333-3333-4333-8333-333333333333", False, 0,
)
APP = "99999999-9999-4999-8999-999999999999"


class WhoAmIClient:
    """Answers WhoAmI as Dataverse does: the caller header's user, or ``runs_as`` (its silent fallback)."""

    def __init__(self, runs_as: str | None = None, delay: float = 0.0) -> None:
        self.runs_as = runs_as
        self.delay = delay
        self.calls: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def get_json(
        self, path: str, params: Any = None, *, headers: dict[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> dict[str, Any]:
        assert path == "WhoAmI"
        with self.lock:
            self.calls.append(dict(headers or {}))
        time.sleep(self.delay)
        if self.runs_as is not None:
            return {"UserId": self.runs_as}
        headers = headers or {}
        if "MSCRMCallerID" in headers:
            return {"UserId": headers["MSCRMCallerID"].upper()}
        known = headers.get("CallerObjectId") == JOHN.azure_ad_object_id
        return {"UserId": JOHN.systemuserid if known else APP}


def test_first_write_is_preceded_by_whoami_with_the_callers_header() -> None:
    client = WhoAmIClient()
    guard = AttributionGuard(client)  # type: ignore[arg-type]
    guard.verify(JANE)
    guard.verify(JOHN)
    assert client.calls == [{"MSCRMCallerID": JANE.systemuserid}, {"CallerObjectId": JOHN.azure_ad_object_id}]
    assert guard.checks == 2


def test_a_verified_actor_is_not_checked_again_until_the_ttl_ends() -> None:
    now = [0.0]
    client = WhoAmIClient()
    guard = AttributionGuard(client, ttl=60, clock=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(5):
        guard.verify(JANE)
    assert len(client.calls) == 1
    now[0] = 61
    guard.verify(JANE)
    assert len(client.calls) == 2


def test_forget_makes_the_next_write_check_again() -> None:
    client = WhoAmIClient()
    guard = AttributionGuard(client)  # type: ignore[arg-type]
    guard.verify(JANE)
    guard.forget(JANE.systemuserid.upper())
    guard.verify(JANE)
    assert len(client.calls) == 2


def test_silent_fallback_is_refused_before_the_write_and_not_cached() -> None:
    client = WhoAmIClient(runs_as=APP)
    guard = AttributionGuard(client)  # type: ignore[arg-type]
    with pytest.raises(ImpersonationNotApplied) as caught:
        guard.verify(JOHN)
    assert caught.value.code == "impersonation_not_applied"
    assert "nothing was written" in caught.value.message
    assert caught.value.details[0]["whoAmI"] == APP and caught.value.details[0]["header"] == "CallerObjectId"
    with pytest.raises(ImpersonationNotApplied):
        guard.verify(JOHN)  # a failure is not remembered as success
    assert len(client.calls) == 2


def test_concurrent_first_writes_for_one_actor_share_one_check() -> None:
    client = WhoAmIClient(delay=0.3)  # held long enough for every thread to join the flight
    guard = AttributionGuard(client)  # type: ignore[arg-type]
    results = in_parallel(16, lambda: guard.verify(JANE))
    assert results == [None] * 16
    assert len(client.calls) == 1


@pytest.mark.parametrize(
    ("user", "code"),
    [
        (replace(JANE, application_id="44444444-4444-4444-8444-444444444444"), "actor_application_user"),
        (replace(JANE, access_mode=4), "actor_not_interactive"),
        (replace(JANE, access_mode=1), "actor_not_interactive"),
    ],
)
def test_users_that_are_never_acted_for(user: SystemUser, code: str) -> None:
    client = WhoAmIClient()
    guard = AttributionGuard(client)  # type: ignore[arg-type]
    with pytest.raises(ActorError) as caught:
        guard.verify(user)
    assert caught.value.code == code
    assert client.calls == []  # refused without a request
    check_eligible(JANE)  # an ordinary user passes
