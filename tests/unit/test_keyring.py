"""Key rotation with a grace period, on an injected clock: the old key works for the grace, then never."""

from __future__ import annotations

import threading

import pytest

from shared.errors import AuthError
from shared.keyring import KeyRing


class Vault:
    """Key Vault as the ring sees it: the current value, and every read counted."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.reads = 0
        self.fail: AuthError | None = None

    def get(self, name: str) -> str:
        return self.refresh(name)

    def refresh(self, name: str, stale: str | None = None) -> str:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return self.value


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


def make(vault: Vault, clock: list[float]) -> KeyRing:
    return KeyRing(vault, "webhook-signing-secret", refresh_seconds=300, grace_seconds=600,
                   min_reread_seconds=60, clock=lambda: clock[0])


def test_old_key_is_accepted_for_the_grace_then_refused_without_any_request_using_the_new_one(
    clock: list[float],
) -> None:
    vault = Vault("old")
    ring = make(vault, clock)
    assert ring.keys() == ["old"]
    vault.value = "new"  # rotated in Key Vault; nobody sends the new key
    clock[0] += 299
    assert ring.keys() == ["old"] and vault.reads == 1  # not due yet: no Key Vault read
    clock[0] += 1
    assert ring.keys() == ["new", "old"] and vault.reads == 2  # periodic re-read: grace starts now
    clock[0] += 599
    assert ring.keys() == ["new", "old"]
    clock[0] += 1
    assert ring.keys() == ["new"]  # grace over
    assert ring.current() == "new"


def test_at_most_one_read_per_period(clock: list[float]) -> None:
    vault = Vault("k")
    ring = make(vault, clock)
    for _ in range(50):
        ring.keys()
        clock[0] += 10  # 500 s in all: the first read and one periodic re-read
    assert vault.reads == 2


def test_mismatch_rereads_are_rate_limited(clock: list[float]) -> None:
    vault = Vault("k1")
    ring = make(vault, clock)
    ring.keys()
    vault.value = "k2"
    assert ring.reread() == ["k2", "k1"] and vault.reads == 2  # a sender already on the new key
    vault.value = "k3"
    assert ring.reread() is None and vault.reads == 2  # a flood of bad signatures: no Key Vault traffic
    clock[0] += 59
    assert ring.reread() is None and vault.reads == 2
    clock[0] += 1
    assert ring.reread() == ["k3", "k2", "k1"] and vault.reads == 3


def test_a_vault_outage_keeps_the_known_key(clock: list[float]) -> None:
    vault = Vault("k1")
    ring = make(vault, clock)
    ring.keys()
    vault.fail = AuthError("down", code="keyvault_unavailable", transient=True)
    clock[0] += 301
    assert ring.keys() == ["k1"]
    clock[0] += 10
    assert ring.keys() == ["k1"] and vault.reads == 2  # the failed attempt counts: retried next period
    assert ring.reread() is None and vault.reads == 3  # a mismatch may try once; it fails: known keys


def test_the_first_read_fails_loudly(clock: list[float]) -> None:
    vault = Vault("k1")
    vault.fail = AuthError("no", code="keyvault_forbidden")
    with pytest.raises(AuthError):
        make(vault, clock).keys()


def test_a_key_that_comes_back_is_current_again(clock: list[float]) -> None:
    vault = Vault("a")
    ring = make(vault, clock)
    ring.keys()
    vault.value = "b"
    clock[0] += 300
    assert ring.keys() == ["b", "a"]
    vault.value = "a"  # rolled back
    clock[0] += 300
    assert ring.keys() == ["a", "b"]


def test_concurrent_first_use_reads_once(clock: list[float]) -> None:
    gate = threading.Event()

    class Slow(Vault):
        def refresh(self, name: str, stale: str | None = None) -> str:
            gate.wait(5)
            return super().refresh(name, stale)

    vault = Slow("k")
    ring = make(vault, clock)
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(ring.keys())) for _ in range(16)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join()
    assert vault.reads == 1 and results == [["k"]] * 16


def test_a_new_signing_key_is_used_only_once_every_instance_has_read_it(clock: list[float]) -> None:
    vault = Vault("old")
    ring = KeyRing(vault, "queue-message-signing-key", refresh_seconds=300, grace_seconds=1200,
                   settle_seconds=300, clock=lambda: clock[0])
    assert ring.signing_key() == "old"  # the first value read: nothing to wait for
    vault.value = "new"
    clock[0] += 300
    assert ring.keys() == ["new", "old"]
    assert ring.signing_key() == "old"  # other instances may not know "new" yet
    clock[0] += 299
    assert ring.signing_key() == "old"
    clock[0] += 1
    assert ring.signing_key() == "new"  # every instance has re-read by now
