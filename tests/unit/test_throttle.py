"""The deployment throttle without network: AIMD limiter, shared window, degradation (injected clock)."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest

from shared.errors import DataverseError
from shared.throttle import NOT_MODIFIED, AdaptiveLimiter, DeploymentThrottle, blob_name


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class MemoryStore:
    """A blob with ETags: conditional reads (304) and writes (lost races return None)."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.version = 0
        self.reads = self.not_modified = self.writes = 0
        self.fail = False
        self.lock = threading.Lock()

    def read(self, etag: str | None) -> Any:
        if self.fail:
            raise ConnectionError("storage down")
        with self.lock:
            self.reads += 1
            if self.data is None:
                return None, None
            if etag == str(self.version):
                self.not_modified += 1
                return NOT_MODIFIED
            return json.loads(self.data), str(self.version)

    def write(self, state: dict[str, Any], etag: str | None) -> str | None:
        if self.fail:
            raise ConnectionError("storage down")
        with self.lock:
            if (etag is None and self.data is not None) or (etag is not None and etag != str(self.version)):
                return None
            self.version += 1
            self.writes += 1
            self.data = json.dumps(state).encode()
            return str(self.version)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.data or b"{}")


def throttle(store: MemoryStore | None, clock: Clock, name: str, **kwargs: Any) -> DeploymentThrottle:
    return DeploymentThrottle(store, instance_id=name, clock=clock, sleep=clock.sleep, **kwargs)


# --- limiter -----------------------------------------------------------------------------------------


def test_limiter_halves_on_429_and_grows_one_slot_per_n_successes_up_to_the_ceiling() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(initial=8, ceiling=8, grow_after=3, clock=clock)
    limiter.throttled()
    assert limiter.limit == 4
    limiter.throttled()
    limiter.throttled()
    limiter.throttled()
    assert limiter.limit == 1  # floor
    for _ in range(2):
        limiter.succeeded()
    assert limiter.limit == 1  # not yet N successes
    limiter.succeeded()
    assert limiter.limit == 2
    limiter.succeeded()
    limiter.throttled()  # a 429 resets the streak
    limiter.succeeded()
    limiter.succeeded()
    assert limiter.limit == 1
    for _ in range(100):
        limiter.succeeded()
    assert limiter.limit == 8  # capped by the ceiling
    assert [why for _, why, _ in limiter.history].count("grow") == 7 + 1


def test_limiter_blocks_at_the_limit_and_times_out_without_a_slot() -> None:
    limiter = AdaptiveLimiter(initial=2, ceiling=2)
    assert limiter.acquire(0) and limiter.acquire(0)
    assert not limiter.acquire(0)
    assert limiter.peak_in_flight == 2
    limiter.release()
    assert limiter.acquire(0)


def test_limiter_ceiling_follows_the_hint() -> None:
    limiter = AdaptiveLimiter(initial=1, ceiling=1)
    limiter.set_ceiling(12, jump=True)
    assert limiter.limit == 12
    limiter.set_ceiling(3)
    assert limiter.limit == 3
    limiter.set_ceiling(6)
    assert limiter.limit == 3  # a higher ceiling is grown into, not jumped to


# --- the shared window -----------------------------------------------------------------------------


def test_blob_name_is_per_environment_and_application_user() -> None:
    assert blob_name("https://Contoso.crm4.dynamics.com", "ABC") == "contoso.crm4.dynamics.com/abc.json"
    assert blob_name("https://127.0.0.1:7075", "x") == "127.0.0.1_7075/x.json"


def test_one_429_holds_back_the_other_instance_until_the_window_is_over() -> None:
    clock, store = Clock(), MemoryStore()
    a, b = throttle(store, clock, "a", refresh_seconds=1), throttle(store, clock, "b", refresh_seconds=1)
    with b.slot(60):  # b has read the state once (nothing throttled)
        pass
    with a.slot(60):
        a.observe(429, 7.0, 8, "0x80072322")
    assert store.state["throttledUntil"] == pytest.approx(clock.now + 7.0)
    clock.now += 1.0  # b's refresh period passed: it re-reads before its next send
    with b.slot(60):
        sent_at = clock.now
    assert sent_at >= store.state["throttledUntil"]
    assert b.stats.waits == 1 and b.stats.learned == 1
    assert clock.slept == [pytest.approx(6.0)]


def test_the_state_is_reread_at_most_once_per_period_and_conditionally() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=1, heartbeat_seconds=100)
    for _ in range(50):
        with a.slot(10):
            a.observe(204, None, 4)
    assert store.reads == 1  # 50 sends, one read (clock did not move)
    clock.now += 1.5
    with a.slot(10):
        pass
    assert store.reads == 2 and store.not_modified == 1  # If-None-Match: nothing changed


def test_the_window_only_ever_extends() -> None:
    clock, store = Clock(), MemoryStore()
    a, b = throttle(store, clock, "a"), throttle(store, clock, "b")
    a.observe(429, 30.0, 4)
    b.observe(429, 5.0, 4)  # a shorter Retry-After must not shorten the shared window
    assert store.state["throttledUntil"] == pytest.approx(clock.now + 30.0)
    assert store.state["cut"] == 1  # one episode, one cut


def test_a_window_beyond_the_budget_fails_transient_without_sending() -> None:
    clock, store = Clock(), MemoryStore()
    a, b = throttle(store, clock, "a", refresh_seconds=0), throttle(store, clock, "b", refresh_seconds=0)
    a.observe(429, 120.0, 4)
    sent = []
    with pytest.raises(DataverseError) as info, b.slot(30):
        sent.append(1)
    assert not sent
    assert info.value.code == "dataverse_throttled" and info.value.transient
    assert info.value.retry_after == pytest.approx(120.0)
    assert clock.slept == []  # it did not sit on the message for a wait it could not finish


def test_an_episode_halves_every_instance_once_and_the_dop_hint_is_split_among_live_instances() -> None:
    clock, store = Clock(), MemoryStore()
    a, b = throttle(store, clock, "a", refresh_seconds=0), throttle(store, clock, "b", refresh_seconds=0)
    for t in (a, b):
        with t.slot(10):
            t.observe(200, None, 16)
    with a.slot(10):  # a re-reads: b's heartbeat is there now
        pass
    assert a.active_instances == 2 and b.active_instances == 2
    assert a.limiter.limit == 8 and b.limiter.limit == 8
    a.observe(429, 2.0, 16)
    a.observe(429, 2.0, 16)  # same episode: no second halving
    assert a.limiter.limit == 4
    with b.slot(10):
        pass
    assert b.limiter.limit == 4 and b.stats.waits == 1  # learned the episode: halved once, waited


def test_storage_down_degrades_to_per_instance_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    clock, store = Clock(), MemoryStore()
    store.fail = True
    a = throttle(store, clock, "a", refresh_seconds=0)
    for _ in range(5):
        with a.slot(60):
            a.observe(200, None, 4)
    a.observe(429, 3.0, 4)
    with a.slot(60):  # its own window still holds locally
        pass
    assert clock.slept == [pytest.approx(3.0)]
    assert a.stats.storage_errors == 1 and not a.shared  # no retry storm against storage
    assert sum("storage unavailable" in r.getMessage() for r in caplog.records) == 1
    store.fail = False
    clock.now += 31
    with a.slot(60):
        pass
    assert a.shared and store.writes >= 1


def test_concurrent_conditional_writes_lose_no_update() -> None:
    clock, store = Clock(), MemoryStore()
    instances = [throttle(store, clock, f"i{n}", refresh_seconds=0) for n in range(8)]
    threads = [threading.Thread(target=t.observe, args=(429, 10.0 + n, 4)) for n, t in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.state["throttledUntil"] == pytest.approx(clock.now + 17.0)
    assert set(store.state["instances"]) == {f"i{n}" for n in range(8)}


def test_after_an_episode_sends_are_paced_at_the_rate_the_service_granted() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=100, grow_after=4)
    for _ in range(20):  # 20 granted over 10 s: 2 requests/s
        with a.slot(60):
            a.observe(204, None, 8)
        clock.now += 0.5
    a.observe(429, 1.0, 8)
    assert a.rate == pytest.approx(2.0)
    clock.slept.clear()
    for _ in range(3):
        with a.slot(60):
            a.observe(204, None, 8)
    # first send waits out the window (1 s), the next two are 0.5 s apart
    assert clock.slept == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(0.5)]
    with a.slot(60):
        a.observe(204, None, 8)
    assert a.rate == pytest.approx(2.0 * 1.05)  # grows slowly: x1.05 per 4 successes


def test_the_runtime_builds_the_shared_throttle_only_where_storage_is_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.runtime import build_throttle
    from shared.settings import Settings
    from shared.storage import BlobStore
    from shared.throttle import NoThrottle

    base = {"DATAVERSE_URL": "https://org.crm.dynamics.com", "DATAVERSE_TENANT_ID": str(uuid.uuid4()),
            "DATAVERSE_CLIENT_ID": str(uuid.uuid4()), "KEY_VAULT_URL": "https://kv.vault.azure.net"}
    for name in ("AzureWebJobsStorage", "AzureWebJobsStorage__blobServiceUri",
                 "AzureWebJobsStorage__accountName"):
        monkeypatch.delenv(name, raising=False)
    blobs = BlobStore()
    throttle_ = build_throttle(Settings.from_env(base), blobs)
    assert isinstance(throttle_, NoThrottle)  # auto, no storage: as before
    forced = build_throttle(Settings.from_env({**base, "DATAVERSE_SHARED_THROTTLE": "true"}), blobs)
    assert isinstance(forced, DeploymentThrottle) and forced.store is None  # per instance
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    shared_ = build_throttle(Settings.from_env(base), blobs)
    assert isinstance(shared_, DeploymentThrottle) and shared_.store is not None
    off = build_throttle(Settings.from_env({**base, "DATAVERSE_SHARED_THROTTLE": "false"}), blobs)
    assert isinstance(off, NoThrottle)


def test_a_window_past_the_jobs_deadline_fails_as_the_deadline_not_as_throttling() -> None:
    from shared import deadline

    clock, store = Clock(), MemoryStore()
    a, b = throttle(store, clock, "a", refresh_seconds=0), throttle(store, clock, "b", refresh_seconds=0)
    a.observe(429, 30.0, 4)
    job = deadline.within(3.0, kind=deadline.JOB, setting="JOB_DEADLINE_SECONDS", clock=clock)
    with job, pytest.raises(deadline.DeadlineExceeded) as info, b.slot(deadline.budget(300)):  # as the client
        pass
    assert info.value.code == "job_deadline_exceeded" and info.value.transient
    with pytest.raises(DataverseError) as plain, b.slot(10):  # no deadline: the retry budget refuses
        pass
    assert plain.value.code == "dataverse_throttled"
