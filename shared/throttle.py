"""One Dataverse throttle for the whole deployment: a shared "throttled until" and adaptive concurrency.

Why: service protection counts requests, execution time and concurrency per application user per
web server, not per Functions instance.  With 40-100 instances each discovering 429s on its own,
every instance keeps sending into a window another one has already been told to leave, and each
refused request extends the penalty (Learn: "the duration will be extended").  So:

* **Shared window.**  After a 429 the instance writes "throttled until T" into one blob that all
  instances of the deployment can read (the host's own storage account, ``AzureWebJobsStorage``),
  with a conditional write (ETag) that only ever extends T.  Every instance re-reads that blob at
  most every ``DATAVERSE_THROTTLE_REFRESH_SECONDS`` (a conditional GET, ``If-None-Match``: mostly a
  304), from one thread at a time (single flight: the others go on with what they know, a request
  never waits for storage).  Before each send an instance waits until T has passed.
* **Adaptive concurrency.**  Each instance's in-flight Dataverse requests take a slot of a local
  limiter (AIMD).  Its ceiling is ``x-ms-dop-hint`` (the service's recommended parallelism for the
  environment) divided by the number of live instances (heartbeats: one small blob per instance,
  written unconditionally and listed, so that heartbeats never contend with each other or with the
  window).  A 429 halves
  the limit, once per throttling episode, on every instance (the episode counter ``cut`` in the
  blob); ``DATAVERSE_THROTTLE_GROW_AFTER`` successes in a row add one slot back, up to the ceiling.
* **Pacing at the stated budget.**  Concurrency alone cannot hold many instances under a request
  budget (every live instance keeps at least one request in flight).  A service-protection 429
  states its limit ("Number of requests exceeded the limit of 6000 over time window of 300
  seconds", "Combined execution time … exceeded limit of 1,200,000 milliseconds over time window
  of 300 seconds"; Learn, Service protection API limit errors).  The instance that receives one
  writes that budget into the blob; from then on every instance spaces its sends at
  ``BUDGET_SHARE`` of the budget divided by the live instances (for execution time: by this
  instance's mean request duration, so a 30 s bulk request costs its 30 s), each with a random
  phase after a window so that instances resuming together do not send in step.  A 429 while
  paced (other clients of the same application user, an instance count not yet seen) lowers
  ``share`` for every instance; it recovers a step per window without one.  A budget older than
  ``BUDGET_TTL_SECONDS`` is forgotten and learned again (limits can change).  A 429 whose message
  states no budget falls back to the rate the service granted over the last cycle (successes ÷
  time since the previous episode began), growing 5 % per ``DATAVERSE_THROTTLE_GROW_AFTER``
  successes.
* **Bounded waits.**  A wait (window or slot) never exceeds the budget the caller passes (what is
  left of ``DATAVERSE_MAX_RETRY_SECONDS``); beyond it the request fails as ``dataverse_throttled``
  (transient) WITHOUT being sent, and the queue redelivers the job later.  No message is held
  past its visibility.
* **Degrades, never blocks.**  Storage unreachable: the throttle logs it once and works per
  instance (local window + local limiter) until storage answers again.

Blob (contract): container ``dataverse-throttle``, blob ``<dataverse host>/<client id>.json`` (one
per Dataverse environment and application user: the unit service protection counts), JSON
``{"version": 1, "throttledUntil": <unix s>, "cut": <int>, "reason": <code>, "dopHint": <int>,
"budget": {"requests" | "executionMs": {"limit": <number>, "windowSeconds": <number>,
"learnedAt": <unix s>}}, "joined": <instances announced>}``; heartbeats: empty blobs
``<dataverse host>/<client id>/instances/<instance id>`` whose metadata ``seen`` is <unix s> (now, or
later: the end of the window the instance waits out or of the send slots it has reserved).
Times are wall-clock Unix seconds: instances of one deployment share a clock to within NTP's precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast
from urllib.parse import urlsplit

from shared.deadline import current as current_deadline
from shared.errors import DataverseError

if TYPE_CHECKING:
    from shared.storage import BlobStore

logger = logging.getLogger("shared.throttle")

CONTAINER = "dataverse-throttle"
STATE_VERSION = 1
DEGRADED_RETRY_SECONDS = 30.0  # how long to work per instance after storage failed, before trying again
STALE_HEARTBEATS = 3  # an instance whose heartbeat is older than this many periods no longer counts
FORGET_HEARTBEATS = 20  # ... and its heartbeat blob is deleted by the next instance that counts
WRITE_ATTEMPTS = 5  # conditional-write conflicts tolerated before giving up on one update
DEFAULT_RETRY_AFTER = 1.0
PACE_GROWTH = 1.05  # paced rate x this per ``grow_after`` successes in a row
PACE_FLOOR = 0.2  # requests/s: pacing never goes below this per instance
BUDGET_SHARE = 0.95  # of a stated budget the deployment uses (the rest absorbs jitter between instances)
BUDGET_TTL_SECONDS = 3600.0  # a learned budget older than this is forgotten (limits can change)
SHARE_CUT, SHARE_FLOOR, SHARE_STEP = 0.85, 0.3, 0.05  # share of the budget after a 429 while paced
DURATION_EWMA = 0.2  # weight of the newest request in the mean duration (execution-time pacing)

# Service-protection error codes (Learn, "Service protection API limit errors returned").
CODE_REQUESTS, CODE_EXECUTION, CODE_CONCURRENCY = "0x80072322", "0x80072321", "0x80072326"
BUDGET_KINDS = {CODE_REQUESTS: "requests", CODE_EXECUTION: "executionMs"}
_STATED_LIMIT = re.compile(r"limit of ([\d,]+(?:\.\d+)?)(?: milliseconds)? over time window of "
                           r"(\d+(?:\.\d+)?) seconds", re.IGNORECASE)


@dataclass(frozen=True)
class Limit:
    """One budget a 429 stated: ``limit`` requests (or milliseconds of execution) per ``window`` seconds."""

    limit: float
    window: float
    learned_at: float

    def to_json(self) -> dict[str, float]:
        return {"limit": self.limit, "windowSeconds": self.window, "learnedAt": round(self.learned_at, 3)}

    @classmethod
    def from_json(cls, value: object) -> Limit | None:
        if not isinstance(value, dict):
            return None
        limit, window, at = (_number(value.get(k)) for k in ("limit", "windowSeconds", "learnedAt"))
        return cls(limit, window, at) if limit > 0 and window > 0 else None


def stated_limit(code: str | None, message: str | None, now: float) -> tuple[str, Limit] | None:
    """(``requests`` | ``executionMs``, the budget) a service-protection 429 states, or None.

    Only the two budget codes are read, and only a message in Learn's documented form: anything
    else leaves the throttle on its measured fallback rather than on a guessed number.
    """
    kind = BUDGET_KINDS.get((code or "").lower())
    match = _STATED_LIMIT.search(message or "") if kind else None
    if kind is None or match is None:
        return None
    limit, window = float(match.group(1).replace(",", "")), float(match.group(2))
    if limit <= 0 or window <= 0:
        return None
    return kind, Limit(limit, window, now)


def blob_name(dataverse_url: str, client_id: str) -> str:
    """``contoso.crm4.dynamics.com/<client id>.json``: one budget per environment and application user."""
    host = (urlsplit(dataverse_url).netloc or dataverse_url).lower().replace(":", "_")
    return f"{host}/{client_id.lower()}.json"


# --- the local limiter ------------------------------------------------------------------------------


class AdaptiveLimiter:
    """AIMD concurrency limit for one instance: threads wait (bounded) for a slot.

    ``limit`` starts at ``initial`` and follows the ceiling once the first dop hint is known;
    :meth:`throttled` halves it (floor 1), :meth:`succeeded` adds one slot per ``grow_after``
    successes in a row, never above the ceiling.  ``history`` keeps each change (for tests and
    diagnostics), bounded.
    """

    def __init__(self, *, initial: int = 1, ceiling: int = 1, grow_after: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._clock = clock
        self.ceiling = max(1, ceiling)
        self.limit = max(1, min(initial, self.ceiling))
        self.grow_after = max(1, grow_after)
        self.in_flight = 0
        self.peak_in_flight = 0
        self._streak = 0
        self.history: list[tuple[float, str, int]] = [(clock(), "start", self.limit)]

    def _note(self, why: str) -> None:
        self.history.append((self._clock(), why, self.limit))
        del self.history[:-200]

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds; False when none came free in time."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self.in_flight >= self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return True

    def release(self) -> None:
        with self._cond:
            self.in_flight = max(0, self.in_flight - 1)
            self._cond.notify()

    def succeeded(self) -> None:
        with self._cond:
            self._streak += 1
            if self._streak >= self.grow_after and self.limit < self.ceiling:
                self._streak = 0
                self.limit += 1
                self._note("grow")
                self._cond.notify()

    def throttled(self) -> None:
        with self._cond:
            self._streak = 0
            self.limit = max(1, self.limit // 2)
            self._note("halve")

    def set_ceiling(self, ceiling: int, *, jump: bool = False) -> None:
        """New ceiling (dop hint / instances); ``jump`` starts from it (the first hint of this instance)."""
        with self._cond:
            self.ceiling = max(1, ceiling)
            before = self.limit
            self.limit = self.ceiling if jump else min(self.limit, self.ceiling)
            if self.limit != before:
                self._note("ceiling")
                self._cond.notify_all()


# --- the shared state ---------------------------------------------------------------------------------

NOT_MODIFIED = object()


class StateStore(Protocol):
    """Where the shared state lives: a blob in production, a dict in unit tests."""

    def read(self, etag: str | None) -> tuple[dict[str, Any] | None, str | None] | object:
        """(state or None when absent, etag), or NOT_MODIFIED when ``etag`` is still current."""

    def write(self, state: dict[str, Any], etag: str | None) -> str | None:
        """New etag, or None when someone else wrote first (``etag`` None: create only if absent)."""

    def beat(self, instance_id: str, seen: float) -> None:
        """Record that ``instance_id`` has work until at least ``seen`` (its own record: no contention)."""

    def beats(self) -> dict[str, float]:
        """Every recorded instance and its last ``seen``."""

    def forget(self, instance_id: str) -> None:
        """Remove a departed instance's record (best effort)."""


class BlobStateStore:
    """The state as one JSON blob, read with If-None-Match and written with If-Match / If-None-Match: *."""

    def __init__(self, blobs: BlobStore, name: str, container: str = CONTAINER) -> None:
        self._blobs = blobs
        self._container = container
        self.name = name
        # ``<host>/<client id>.json`` -> heartbeats under ``<host>/<client id>/instances/``
        self.instances_prefix = f"{name.removesuffix('.json')}/instances/"
        self._container_ready = False

    def _client(self) -> Any:
        return self._blobs.container(self._container).get_blob_client(self.name)

    def read(self, etag: str | None) -> tuple[dict[str, Any] | None, str | None] | object:
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceModifiedError,
            ResourceNotFoundError,
            ResourceNotModifiedError,
        )

        kwargs: dict[str, Any] = {}
        if etag:
            kwargs = {"etag": etag, "match_condition": MatchConditions.IfModified}
        try:
            downloader = self._client().download_blob(**kwargs)
            data = downloader.readall()
        except (ResourceNotModifiedError, ResourceModifiedError):
            # Azure answers a GET whose If-None-Match still matches with 304; Azurite with 412
            # ConditionNotMet. Both mean: nothing changed since ``etag``.
            return NOT_MODIFIED
        except ResourceNotFoundError:
            return None, None
        try:
            state = json.loads(data)
        except ValueError:
            state = None
        return (state if isinstance(state, dict) else None), downloader.properties.etag

    def write(self, state: dict[str, Any], etag: str | None) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        data = json.dumps(state, separators=(",", ":")).encode("utf-8")
        if etag:
            kwargs: dict[str, Any] = {"overwrite": True, "etag": etag,
                                      "match_condition": MatchConditions.IfNotModified}
        else:
            kwargs = {"overwrite": False}
        for _ in range(2):
            try:
                result = self._client().upload_blob(data, **kwargs)
                return str(result.get("etag"))
            except (ResourceModifiedError, ResourceExistsError):
                return None
            except ResourceNotFoundError:
                self._create_container()
        return None

    def _create_container(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        if self._container_ready:
            raise RuntimeError(f"container {self._container!r} vanished after it was created")
        with contextlib.suppress(ResourceExistsError):
            self._blobs.container(self._container).create_container()
        self._container_ready = True

    def beat(self, instance_id: str, seen: float) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        blob = self._blobs.container(self._container).get_blob_client(self.instances_prefix + instance_id)
        for _ in range(2):
            try:
                blob.upload_blob(b"", overwrite=True, metadata={"seen": f"{seen:.3f}"})
                return
            except ResourceNotFoundError:
                self._create_container()

    def beats(self) -> dict[str, float]:
        from azure.core.exceptions import ResourceNotFoundError

        container = self._blobs.container(self._container)
        try:
            listed = list(container.list_blobs(name_starts_with=self.instances_prefix, include=["metadata"]))
        except ResourceNotFoundError:
            return {}
        out: dict[str, float] = {}
        for blob in listed:
            try:
                out[blob.name[len(self.instances_prefix):]] = float((blob.metadata or {}).get("seen", "0"))
            except ValueError:
                out[blob.name[len(self.instances_prefix):]] = 0.0
        return out

    def forget(self, instance_id: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self._blobs.container(self._container).delete_blob(self.instances_prefix + instance_id)


# --- the deployment throttle -------------------------------------------------------------------------


@dataclass
class ThrottleStats:
    """What this instance did (diagnostics, tests and the bench read them)."""

    waits: int = 0  # sends held back because the (shared or local) window was not over
    refused: int = 0  # requests failed unsent: the window or a slot was beyond the budget
    throttled: int = 0  # 429s this instance received
    reads: int = 0  # state GETs sent (304s included)
    writes: int = 0  # window writes that landed, and heartbeats
    conflicts: int = 0  # conditional writes that lost a race (re-read and retried)
    storage_errors: int = 0
    learned: int = 0  # windows learned from another instance through the blob
    history: list[str] = field(default_factory=list)


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class DeploymentThrottle:
    """Shared window + adaptive concurrency for one Dataverse environment and application user.

    ``store`` None: per-instance only (no storage configured, or the shared throttle switched off).
    ``clock`` is wall-clock time (shared across instances); ``sleep`` and ``clock`` are injectable.
    """

    def __init__(
        self,
        store: StateStore | None,
        *,
        instance_id: str | None = None,
        refresh_seconds: float = 1.0,
        heartbeat_seconds: float = 15.0,
        grow_after: int = 10,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.instance_id = instance_id or default_instance_id()
        self.refresh_seconds = max(0.0, refresh_seconds)
        self.heartbeat_seconds = max(0.1, heartbeat_seconds)
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self.limiter = AdaptiveLimiter(initial=1, ceiling=1, grow_after=grow_after, clock=clock)
        self.stats = ThrottleStats()
        self._lock = threading.Lock()  # guards the fields below
        self._refreshing = threading.Lock()  # single flight of storage calls
        self.until = 0.0  # the window this instance honours (its own 429s and the shared blob's)
        self._cut = 0  # last throttling episode applied here
        self._etag: str | None = None
        self._state: dict[str, Any] = {}
        self._refreshed_at = float("-inf")
        self._heartbeat_due = float("-inf")
        self._joined = False  # this instance has announced itself (``joined`` in the blob)
        self._joins = 0  # the blob's ``joined`` counter last seen: a change means a newcomer to count
        self._degraded_until = float("-inf")
        self._degraded_logged = False
        self.dop_hint: int | None = None
        self.active_instances = 1
        # Pacing: after the first throttling episode, sends are spaced at the rate the service
        # actually granted this instance over the last episode's cycle (successes / time), growing
        # by PACE_GROWTH every ``grow_after`` successes.  None: not paced (no episode seen yet).
        self.rate: float | None = None
        self._granted = 0
        self._episode_at: float | None = None  # cycle start: the first success, then each episode
        self._next_send = 0.0
        self._paced_streak = 0
        self._grow_after = max(1, grow_after)
        # Budgets a 429 stated (here or, through the blob, on another instance), the share of them
        # this deployment uses, and this instance's mean request duration (execution-time pacing).
        self.budget: dict[str, Limit] = {}
        self.share = 1.0
        self._share_at = clock()
        self.duration: float | None = None

    @property
    def shared(self) -> bool:
        """True while the blob is in use (configured and reachable)."""
        return self.store is not None and self._clock() >= self._degraded_until

    # -- the hook around one send ----------------------------------------------------------------

    @contextlib.contextmanager
    def slot(self, budget: float, label: str = "request") -> Iterator[None]:
        """Wait for the window to pass and for a concurrency slot, at most ``budget`` seconds in all.

        Raises ``dataverse_throttled`` (transient, nothing sent) when that is not possible in time.
        """
        started = self._clock()
        self._maybe_refresh()
        while True:
            self._wait_window(started, budget, label)
            self._pace(started, budget, label)
            if self.until > self._clock():
                continue  # a window opened while this thread waited for its pace
            left = max(0.0, budget - (self._clock() - started))
            if not self.limiter.acquire(left):
                self._refuse(1.0, f"{label}: no Dataverse concurrency slot came free within {left:.1f} s "
                             f"(limit {self.limiter.limit}); not sent", label)
            if self.until <= self._clock():
                break
            # A window opened while this thread waited for its slot: never send into it.
            self.limiter.release()
        sent_at = self._clock()
        try:
            yield
        finally:
            self.limiter.release()
            took = max(0.0, self._clock() - sent_at)
            with self._lock:
                self.duration = took if self.duration is None else (
                    (1 - DURATION_EWMA) * self.duration + DURATION_EWMA * took)

    def _refuse(self, wait: float, message: str, label: str) -> NoReturn:
        """Not sent: ``dataverse_throttled`` (transient), or the invocation's deadline error when the
        deadline, not the retry budget, is what the wait would pass (``shared.deadline``)."""
        self.stats.refused += 1
        error = DataverseError(message, status=None, code="dataverse_throttled", transient=True,
                               retry_after=wait)
        deadline = current_deadline()
        if deadline is not None:
            deadline.check_wait(wait, f"{label} (shared Dataverse throttle)", error)
        raise error

    def _wait_window(self, started: float, budget: float, label: str) -> None:
        while True:
            wait = self.until - self._clock()
            if wait <= 0:
                return
            spent = self._clock() - started
            if spent + wait > budget:
                self._refuse(wait, f"{label}: Dataverse throttles this application user for {wait:.1f} s "
                             "more (shared window), beyond this request's wait budget; not sent", label)
            self.stats.waits += 1
            self._sleep(wait)
            self._maybe_refresh()  # another instance may have extended the window meanwhile

    def observe(self, status: int, retry_after: float | None, dop_hint: int | None,
                code: str | None = None, message: str | None = None) -> None:
        """What Dataverse answered to one send: a 429 (Retry-After, code, message), or anything else."""
        if dop_hint is not None and dop_hint > 0 and dop_hint != self.dop_hint:
            first = self.dop_hint is None
            self.dop_hint = dop_hint
            self.limiter.set_ceiling(self._ceiling(), jump=first)
        if status != 429:
            self.limiter.succeeded()
            with self._lock:
                self._granted += 1
                if self._episode_at is None:
                    self._episode_at = self._clock()
                if self.rate is not None:
                    self._paced_streak += 1
                    if self._paced_streak >= self._grow_after:
                        self._paced_streak = 0
                        self.rate *= PACE_GROWTH
            return
        self.stats.throttled += 1
        now = self._clock()
        until = now + (retry_after if retry_after is not None else DEFAULT_RETRY_AFTER)
        stated = stated_limit(code, message, now)
        with self._lock:
            new_episode = now >= self.until
            self.until = max(self.until, until)
        if new_episode:
            self._new_episode(now, code, stated is not None and stated[0] not in self._known_budget(now))
            self.limiter.throttled()
            self._record(f"429 {code or ''}: halve to {self.limiter.limit}, until +{until - now:.1f}s")
        if stated is not None:
            self._learn(*stated)
        self._rephase()
        if self.store is not None:
            self._heartbeat_due = now  # present through the window (see _heartbeat)
            self._publish(until, code, new_episode)

    def _learn(self, kind: str, limit: Limit) -> None:
        with self._lock:
            known = self.budget.get(kind)
            if known is None or limit.learned_at > known.learned_at:
                self.budget[kind] = limit
        if known is None or (known.limit, known.window) != (limit.limit, limit.window):
            logger.info("Dataverse states a %s budget of %g per %g s for this application user: pacing the "
                        "deployment at %.0f%% of it", kind, limit.limit, limit.window, BUDGET_SHARE * 100)

    def _rephase(self) -> None:
        """Restart the pace after the window at a random phase, so instances do not resume in step.

        Never earlier than sends already reserved: threads sleeping on those would send as well.
        """
        interval = self._interval(self._clock())
        with self._lock:
            if interval is not None and self.until > self._clock():
                self._next_send = max(self._next_send, self.until + self._jitter() * interval)

    def _new_episode(self, now: float, code: str | None, learning: bool) -> None:
        """A throttling episode began (here or elsewhere): use less of a known budget, else pace at
        what the service granted since the last episode began (waits included).

        ``learning``: the episode states a budget not known before; pacing at it is the answer.
        """
        if code == CODE_CONCURRENCY or learning:
            return  # a concurrency 429: too many in flight, not too many sent (the limiter halves)
        if self._known_budget(now):
            with self._lock:
                self.share = max(SHARE_FLOOR, self.share * SHARE_CUT)
                self._share_at = now
            self._record(f"429 while paced at the stated budget: share {self.share:.2f}")
            return
        with self._lock:
            span = now - (self._episode_at if self._episode_at is not None else now)
            granted, self._granted, self._episode_at = self._granted, 0, now
            self._paced_streak = 0
            if granted > 0 and span > 0:
                self.rate = max(PACE_FLOOR, granted / span)
            elif self.rate is not None:
                self.rate = max(PACE_FLOOR, self.rate / 2)
            rate = self.rate
        if rate is not None:
            logger.info("Dataverse throttling episode: %d requests granted in %.1f s; pacing at %.2f "
                        "requests/s", granted, span, rate)

    def _known_budget(self, now: float) -> dict[str, Limit]:
        """The stated budgets still believed (younger than ``BUDGET_TTL_SECONDS``), as a copy."""
        with self._lock:
            stale = [k for k, v in self.budget.items() if now - v.learned_at > BUDGET_TTL_SECONDS]
            for kind in stale:
                del self.budget[kind]
            if stale and not self.budget:
                self.rate, self.share = None, 1.0  # start afresh: unpaced until a 429 states it again
            return dict(self.budget)

    def _interval(self, now: float) -> float | None:
        """Seconds between this instance's sends, or None (not paced: no budget and no episode yet)."""
        budget = self._known_budget(now)
        if not budget:
            return 1.0 / self.rate if self.rate else None
        window = min(v.window for v in budget.values())
        with self._lock:
            steps = int((now - self._share_at) // window)
            if steps > 0 and self.share < 1.0:
                self.share = min(1.0, self.share + SHARE_STEP * steps)
                self._share_at = now
            elif self.share >= 1.0:
                self._share_at = now
            portion = BUDGET_SHARE * self.share / max(1, self.active_instances)
            duration = self.duration
        interval = 0.0
        requests = budget.get("requests")
        if requests is not None:
            interval = 1.0 / max(PACE_FLOOR, portion * requests.limit / requests.window)
        execution = budget.get("executionMs")
        if execution is not None and duration is not None:
            ms_per_second = portion * execution.limit / execution.window
            interval = max(interval, duration * 1000.0 / ms_per_second)
        return interval

    def _pace(self, started: float, budget: float, label: str) -> None:
        """Space this instance's sends at its interval (a reservation per send; bounded by ``budget``)."""
        now = self._clock()
        interval = self._interval(now)
        if interval is None:
            return
        with self._lock:
            at = max(now, self._next_send)
            wait = at - now
            if (now - started) + wait > budget:
                rate = 1 / interval if interval else 0.0
                self._refuse(wait, f"{label}: paced at {rate:.2f} requests/s to stay inside Dataverse's "
                             f"budget, the next send slot is {wait:.1f} s away, beyond this request's "
                             "wait budget; not sent", label)
            self._next_send = at + interval
        if wait > 0:
            self._sleep(wait)

    # -- storage -----------------------------------------------------------------------------------

    def _ceiling(self) -> int:
        hint = self.dop_hint or 1
        return max(1, hint // max(1, self.active_instances))

    def _record(self, text: str) -> None:
        self.stats.history.append(text)
        del self.stats.history[:-200]

    def _storage_failed(self, exc: BaseException) -> None:
        self.stats.storage_errors += 1
        self._degraded_until = self._clock() + DEGRADED_RETRY_SECONDS
        if not self._degraded_logged:
            self._degraded_logged = True
            logger.warning(
                "shared Dataverse throttle: storage unavailable (%s: %s); throttling per instance, "
                "retrying storage every %.0f s", type(exc).__name__, str(exc)[:200], DEGRADED_RETRY_SECONDS)

    def _storage_ok(self) -> None:
        if self._degraded_logged:
            self._degraded_logged = False
            logger.info("shared Dataverse throttle: storage reachable again")

    def _maybe_refresh(self) -> None:
        """Re-read the blob when the last read is older than the refresh period; one thread at a time."""
        if not self.shared or self._clock() - self._refreshed_at < self.refresh_seconds:
            return
        if not self._refreshing.acquire(blocking=False):
            return  # another thread is reading: go on with what is known
        try:
            if self._clock() - self._refreshed_at < self.refresh_seconds:
                return
            self._read()
            if self._clock() >= self._heartbeat_due:
                self._heartbeat()
        except Exception as exc:  # any storage failure: degrade, never fail the write
            self._storage_failed(exc)
        finally:
            self._refreshing.release()

    def _read(self) -> None:
        assert self.store is not None
        result = self.store.read(self._etag)
        self.stats.reads += 1
        self._refreshed_at = self._clock()
        self._storage_ok()
        if result is NOT_MODIFIED:
            return
        state, etag = cast("tuple[dict[str, Any] | None, str | None]", result)
        self._apply(state or {}, etag)

    def _apply(self, state: dict[str, Any], etag: str | None) -> None:
        """Adopt a state read from (or written to) the blob."""
        now = self._clock()
        self._state, self._etag = state, etag
        until = _number(state.get("throttledUntil"))
        cut = int(_number(state.get("cut")))
        with self._lock:
            learned = until > self.until and until > now
            if learned:
                self.until = until
            newer_cut = cut > self._cut
            self._cut = max(self._cut, cut)
        if learned:
            self.stats.learned += 1
        budget = state.get("budget")
        budget = budget if isinstance(budget, dict) else {}
        stated = {kind: limit for kind in BUDGET_KINDS.values()
                  if (limit := Limit.from_json(budget.get(kind))) is not None
                  and now - limit.learned_at <= BUDGET_TTL_SECONDS}
        if newer_cut and learned:
            # Another instance opened a throttling episode: back off here too, once.
            reason = state.get("reason")
            self._new_episode(now, reason if isinstance(reason, str) else None,
                              learning=bool(stated.keys() - self._known_budget(now).keys()))
            self.limiter.throttled()
            self._record(f"learned window until +{until - now:.1f}s: halve to {self.limiter.limit}")
        for kind, limit in stated.items():
            self._learn(kind, limit)
        if learned:
            self._rephase()
            self._heartbeat_due = now  # present through the window (see _heartbeat)
        hint = state.get("dopHint")
        if self.dop_hint is None and isinstance(hint, int) and hint > 0:
            self.dop_hint = hint
            self.limiter.set_ceiling(self._ceiling(), jump=True)
        joins = int(_number(state.get("joined")))
        if joins != self._joins:
            self._joins = joins
            self._heartbeat_due = now  # a newcomer: count again at once, not a heartbeat later

    def _heartbeat(self) -> None:
        """Beat (this instance's own blob) and count the live instances that share the budget."""
        assert self.store is not None
        now = self._clock()
        # An instance waiting out a window, or whose threads all sleep on paced send slots reserved
        # ahead, still has work but calls nothing that would beat: it declares itself present through
        # the window and the reserved slots, else the others would count it gone and each take a
        # larger share of the budget.
        with self._lock:
            present = max(now, self.until, self._next_send)
        self.store.beat(self.instance_id, present)
        if not self._joined:
            # Announce this instance once, in the blob every instance re-reads each refresh period,
            # so that the others count it now (listing heartbeats is a heavier call, made per period).
            def join(state: dict[str, Any], _: float) -> None:
                state["joined"] = int(_number(state.get("joined"))) + 1
                self._joins = state["joined"]
            self._update(join)
            self._joined = True
        beats = self.store.beats()
        self.stats.writes += 1
        # jittered: instances started together must not all list in the same instant
        self._heartbeat_due = now + self.heartbeat_seconds * (0.5 + 0.5 * self._jitter())
        horizon = now - STALE_HEARTBEATS * self.heartbeat_seconds
        forget = now - FORGET_HEARTBEATS * self.heartbeat_seconds
        for instance, seen in beats.items():
            if seen < forget and instance != self.instance_id:
                self.store.forget(instance)
        active = 1 + sum(1 for k, seen in beats.items() if k != self.instance_id and seen >= horizon)
        if active != self.active_instances:
            if self.budget:
                logger.info("shared Dataverse throttle: %d live instances share the budget (was %d)",
                            active, self.active_instances)
            self.active_instances = active
            self.limiter.set_ceiling(self._ceiling())

    def _publish(self, until: float, code: str | None, new_episode: bool) -> None:
        """Extend the shared window to ``until`` (never shorten it); a new episode bumps ``cut``."""
        if not self.shared:
            return
        # The thread that got the 429 is about to sleep anyway: waiting for the lock costs nothing.
        with self._refreshing:
            def extend(state: dict[str, Any], now: float) -> None:
                current = _number(state.get("throttledUntil"))
                if until > current:
                    if current <= now and new_episode:
                        state["cut"] = int(_number(state.get("cut"))) + 1
                        self._cut = state["cut"]
                    state["throttledUntil"] = round(until, 3)
                    state["reason"] = code
            try:
                self._update(extend)
                if self._clock() >= self._heartbeat_due:
                    self._heartbeat()
            except Exception as exc:
                self._storage_failed(exc)

    def _update(self, mutate: Callable[[dict[str, Any], float], None]) -> None:
        """Read-modify-write with the ETag; on a lost race, re-read and apply again."""
        assert self.store is not None
        for attempt in range(WRITE_ATTEMPTS):
            if attempt:
                time.sleep(0.02 * attempt * self._jitter())  # lost a race: do not rejoin it in step
            now = self._clock()
            before = self._state
            state = json.loads(json.dumps(before)) if before else {}
            state["version"] = STATE_VERSION
            mutate(state, now)
            if self.dop_hint:
                state["dopHint"] = self.dop_hint
            stored: dict[str, Any] = state["budget"] if isinstance(state.get("budget"), dict) else {}
            for kind, limit in self._known_budget(now).items():
                other = Limit.from_json(stored.get(kind))
                if other is None or other.learned_at < limit.learned_at:
                    stored[kind] = limit.to_json()
            if stored:
                state["budget"] = stored
            state.pop("instances", None)  # heartbeats have their own blobs (an older layout kept them here)
            if state == before and self._etag is not None:
                return  # the blob already says it (another instance published the same window)
            etag = self.store.write(state, self._etag)
            if etag is not None:
                self.stats.writes += 1
                self._storage_ok()
                self._apply(state, etag)
                return
            self.stats.conflicts += 1
            self._etag = None
            result = self.store.read(None)
            self.stats.reads += 1
            if result is not NOT_MODIFIED:
                fresh, fresh_etag = cast("tuple[dict[str, Any] | None, str | None]", result)
                self._apply(fresh or {}, fresh_etag)
        logger.info("shared Dataverse throttle: %d write conflicts in a row; update skipped", WRITE_ATTEMPTS)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


class NoThrottle:
    """The throttle when it is switched off: no waiting, no slots (the client's own retries only)."""

    stats = ThrottleStats()

    @contextlib.contextmanager
    def slot(self, budget: float, label: str = "request") -> Iterator[None]:
        yield

    def observe(self, status: int, retry_after: float | None, dop_hint: int | None,
                code: str | None = None, message: str | None = None) -> None:
        return None
