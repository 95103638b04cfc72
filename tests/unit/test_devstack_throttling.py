"""The Dataverse emulator's service-protection window in-process, on a fake clock."""

from __future__ import annotations

import pytest

from devstack.dataverse.state import DataverseError, Org
from devstack.sandboxes import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def org(clock: Clock) -> Org:
    sandbox = Registry(org_factory=Org).create(seed="empty")
    assert isinstance(sandbox.org, Org)
    sandbox.org.clock = clock
    return sandbox.org


def refused(org: Org, concurrent: int = 1) -> DataverseError:
    with pytest.raises(DataverseError) as info:
        org.admit(concurrent)
    assert info.value.status == 429
    return info.value


def test_retry_after_grows_while_the_client_keeps_sending(org: Org, clock: Clock) -> None:
    org.set_limits(requests=2, window_seconds=10)
    org.admit(1)
    org.admit(1)
    clock.now += 1
    first = refused(org)
    assert (first.code, first.headers["Retry-After"]) == ("0x80072322", "9")
    clock.now += 4
    # Without counting the refused request this would be 5: sending while throttled extends the wait.
    second = refused(org)
    assert second.headers["Retry-After"] == "6"
    clock.now += 1
    assert refused(org).headers["Retry-After"] == "9"


def test_a_client_that_waits_as_told_is_admitted(org: Org, clock: Clock) -> None:
    org.set_limits(requests=2, window_seconds=10)
    org.admit(1)
    clock.now += 3
    org.admit(1)
    wait = int(refused(org).headers["Retry-After"])
    assert wait == 10  # the refused request itself holds a place until then
    clock.now += wait
    org.admit(1)
    assert org.remaining()[0] == 1


def test_refused_for_concurrency_still_counts_as_a_request(org: Org, clock: Clock) -> None:
    org.set_limits(requests=5, concurrent=2)
    error = refused(org, concurrent=3)
    assert (error.code, error.headers["Retry-After"]) == ("0x80072326", "1")
    assert org.remaining()[0] == 4
