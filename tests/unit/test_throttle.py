"""The deployment throttle without network: AIMD limiter, shared window, degradation (injected clock)."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest

from shared.errors import DataverseError
from shared.throttle import (
    BUDGET_SHARE,
    BUDGET_TTL_SECONDS,
    NOT_MODIFIED,
    AdaptiveLimiter,
    DeploymentThrottle,
    Limit,
    blob_name,
    stated_limit,
)


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
        self.heartbeats: dict[str, float] = {}

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

    def beat(self, instance_id: str, seen: float) -> None:
        if self.fail:
            raise ConnectionError("storage down")
        with self.lock:
            self.heartbeats[instance_id] = seen

    def beats(self) -> dict[str, float]:
        if self.fail:
            raise ConnectionError("storage down")
        with self.lock:
            return dict(self.heartbeats)

    def forget(self, instance_id: str) -> None:
        with self.lock:
            self.heartbeats.pop(instance_id, None)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.data or b"{}")


def throttle(store: MemoryStore | None, clock: Clock, name: str, **kwargs: Any) -> DeploymentThrottle:
    kwargs.setdefault("jitter", lambda: 0.0)
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
    store.write({"version": 1}, None)  # another instance published a window once
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
    a = throttle(store, clock, "a", refresh_seconds=0, heartbeat_seconds=1)
    b = throttle(store, clock, "b", refresh_seconds=0, heartbeat_seconds=1)
    for t in (a, b):
        with t.slot(10):
            t.observe(200, None, 16)
    clock.now += 1
    with a.slot(10):  # a beats again and counts: b's heartbeat is there now
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
    assert a.shared and "a" in store.heartbeats


def test_concurrent_conditional_writes_lose_no_update() -> None:
    clock, store = Clock(), MemoryStore()
    instances = [throttle(store, clock, f"i{n}", refresh_seconds=0) for n in range(8)]
    threads = [threading.Thread(target=t.observe, args=(429, 10.0 + n, 4)) for n, t in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.state["throttledUntil"] == pytest.approx(clock.now + 17.0)
    assert store.state["cut"] == 1  # eight 429s at once: one episode


def test_heartbeats_count_live_instances_and_forget_departed_ones() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=0, heartbeat_seconds=1)
    store.heartbeats.update({"b": clock.now, "c": clock.now - 2.5, "gone": clock.now - 60.0})
    with a.slot(10):
        a.observe(200, None, 16)
    # b and c beat within three periods; "gone" did not beat for twenty: its blob is removed
    assert a.active_instances == 3 and a.limiter.ceiling == 16 // 3
    assert set(store.heartbeats) == {"a", "b", "c"}
    # heartbeats never write the window's blob; joining once does, so the others count it at once
    assert store.state == {"version": 1, "joined": 1}
    d = throttle(store, clock, "d", refresh_seconds=0, heartbeat_seconds=1)
    with d.slot(10):
        pass
    with a.slot(10):  # a's next heartbeat is a period away, but it read "joined" and counted again
        pass
    assert store.state["joined"] == 2 and a.active_instances == 4


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


# --- pacing at the budget a 429 states ------------------------------------------------------------

REQUESTS_429 = ("0x80072322",
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.")
EXECUTION_429 = ("0x80072321", "Combined execution time of incoming requests exceeded limit of 1,200,000 "
                 "milliseconds over time window of 300 seconds. Decrease number of concurrent requests or "
                 "reduce the duration of requests and try again later.")


def test_the_budget_is_read_from_learns_documented_messages_and_nothing_else() -> None:
    assert stated_limit(*REQUESTS_429, 5.0) == ("requests", Limit(6000, 300, 5.0))
    assert stated_limit(*EXECUTION_429, 5.0) == ("executionMs", Limit(1_200_000, 300, 5.0))
    assert stated_limit("0x80072322", "Number of requests exceeded the limit of 125 over time window of 2.5 "
                        "seconds.", 0) == ("requests", Limit(125, 2.5, 0))
    # the concurrency limit is no rate; an unknown code or an unparsable message states nothing
    assert stated_limit("0x80072326", "Number of concurrent requests exceeded the limit of 52.", 0) is None
    assert stated_limit("0x80040216", REQUESTS_429[1], 0) is None
    assert stated_limit("0x80072322", "Too many requests.", 0) is None
    assert stated_limit(None, None, 0) is None


def test_a_stated_budget_is_shared_and_every_instance_paces_at_its_part_of_it() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=0, heartbeat_seconds=10)
    b = throttle(store, clock, "b", refresh_seconds=0, heartbeat_seconds=10)
    for t in (a, b):  # both heartbeat: two live instances
        with t.slot(60):
            t.observe(204, None, 8)
    with a.slot(60):
        a.observe(429, 2.0, 8, *REQUESTS_429)
    assert store.state["budget"]["requests"] == {"limit": 6000, "windowSeconds": 300,
                                                 "learnedAt": pytest.approx(clock.now)}
    clock.slept.clear()
    for _ in range(3):
        with b.slot(60):  # b never got a 429: it learns the budget (and the window) from the blob
            b.observe(204, None, 8)
    interval = 2 / (BUDGET_SHARE * 6000 / 300)  # half of 95 % of 20 requests/s each
    assert b.budget["requests"].limit == 6000
    assert clock.slept == [pytest.approx(2.0), pytest.approx(interval), pytest.approx(interval)]


def test_execution_time_pacing_charges_each_send_its_duration() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=100)
    a.observe(429, 1.0, 8, "0x80072321", "Combined execution time of incoming requests exceeded limit of "
              "2,000 milliseconds over time window of 10 seconds.")
    clock.now += 1.0
    clock.slept.clear()
    for _ in range(5):  # each send takes 2 s (a bulk request)
        with a.slot(600):
            clock.now += 2.0
            a.observe(204, None, 8)
    # 95 % of 200 ms of execution per second: a 2 s request every 2000 / 190 s; the first send had
    # no duration to charge yet, the second is due when the first ends
    spacing = 2000 / (BUDGET_SHARE * 200)
    assert a.duration == pytest.approx(2.0)
    assert clock.slept == [pytest.approx(spacing - 2.0)] * 3
    a.duration = 10.0  # requests got slower: the pace slows with them
    assert a._interval(clock.now) == pytest.approx(10_000 / (BUDGET_SHARE * 200))


def test_a_429_while_paced_uses_less_of_the_budget_then_recovers_window_by_window() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=100)
    a.observe(429, 1.0, 8, *REQUESTS_429)  # learns the budget: no cut for the first episode
    assert a.share == 1.0
    clock.now += 2.0
    a.observe(429, 1.0, 8, *REQUESTS_429)  # paced and still throttled: share cut
    assert a.share == pytest.approx(0.85)
    assert a._interval(clock.now) == pytest.approx(1 / (0.85 * BUDGET_SHARE * 20))
    clock.now += 299.0  # not yet a whole window without a 429
    a._interval(clock.now)
    assert a.share == pytest.approx(0.85)
    clock.now += 1.0
    a._interval(clock.now)
    assert a.share == pytest.approx(0.90)
    clock.now += 3 * 300.0
    assert a._interval(clock.now) == pytest.approx(1 / (BUDGET_SHARE * 20))
    assert a.share == 1.0


def test_a_concurrency_429_halves_the_slots_but_sets_no_pace() -> None:
    clock = Clock()
    a = throttle(None, clock, "a")
    a.observe(204, None, 8)
    a.observe(429, 1.0, 8, "0x80072326", "Number of concurrent requests exceeded the limit of 52.")
    assert a.limiter.limit == 4 and a.rate is None and a._interval(clock.now) is None


def test_instances_resume_after_a_window_at_different_phases() -> None:
    clock, store = Clock(), MemoryStore()
    phase = [0.1]
    a = throttle(store, clock, "a", refresh_seconds=0, jitter=lambda: phase[0])
    a.observe(429, 3.0, 8, *REQUESTS_429)
    first = a._next_send
    assert first == pytest.approx(clock.now + 3.0 + 0.1 * a._interval(clock.now))
    phase[0] = 0.7
    a.observe(429, 3.0, 8, *REQUESTS_429)
    assert a._next_send == pytest.approx(clock.now + 3.0 + 0.7 * a._interval(clock.now))


def test_a_budget_is_forgotten_after_its_ttl_and_then_learned_again() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=0)
    a.observe(429, 1.0, 8, *REQUESTS_429)
    assert a._interval(clock.now) is not None
    clock.now += BUDGET_TTL_SECONDS + 1
    assert a._interval(clock.now) is None and a.budget == {}
    b = throttle(store, clock, "b", refresh_seconds=0)
    with b.slot(60):  # the blob still holds the old budget: a newcomer does not adopt it
        b.observe(204, None, 8)
    assert b.budget == {}


def test_an_instance_waiting_out_a_window_still_counts_so_no_one_takes_its_share() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=0, heartbeat_seconds=1)
    b = throttle(store, clock, "b", refresh_seconds=0, heartbeat_seconds=1)
    for t in (a, b):
        with t.slot(60):
            t.observe(204, None, 16)
    a.observe(429, 10.0, 16, *REQUESTS_429)  # a beats at once: present until the window ends
    assert store.heartbeats["a"] == pytest.approx(clock.now + 10.0)
    clock.now += 6.0  # six periods without a beat from a (its threads sleep through the window)
    b._heartbeat()
    assert b.active_instances == 2
    clock.now += 10.0  # the window is over and a still says nothing: gone
    b._heartbeat()
    assert b.active_instances == 1


def test_an_instance_whose_threads_sleep_on_reserved_send_slots_still_counts() -> None:
    clock, store = Clock(), MemoryStore()
    a = throttle(store, clock, "a", refresh_seconds=0, heartbeat_seconds=1)
    a.observe(429, 1.0, 16, *REQUESTS_429)
    clock.now += 2.0
    a._next_send = clock.now + 16.0  # 24 sends reserved ahead at its pace: no thread enters slot()
    a._heartbeat()
    assert store.heartbeats["a"] == pytest.approx(clock.now + 16.0)
