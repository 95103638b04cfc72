"""Single flight: concurrent callers asking for the same key share one call and its outcome.

A warm instance runs up to 24 jobs at once; on a cold start they all want the same secret,
token and actor.  Without this they would all go to Key Vault, Entra and Dataverse together
(and, on failure, all fail one after the other, each paying the full timeout).  Followers
wait for the leader and receive its value or its exception — no longer than their own deadline
(``shared.deadline``): an HTTP lookup never hangs behind a job's lookup that waits out a throttle.

A leader's error that only says *its* deadline ran out (``shared.deadline.limited_by_deadline``: an HTTP
leader that would not wait out a Retry-After, a job near its end) is not the follower's answer: a follower
with more time left than the leader had makes the call itself, as the leader of a new flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, NoReturn, TypeVar

from shared.deadline import Deadline, DeadlineExceeded, limited_by_deadline, wait_event
from shared.deadline import current as current_deadline

V = TypeVar("V")


class _Call(Generic[V]):
    __slots__ = ("deadline", "done", "error", "value")

    def __init__(self, deadline: Deadline | None) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None
        self.deadline = deadline  # the leader's


def _has_more_time(error: BaseException, leader: Deadline | None) -> bool:
    """Whether this thread's own deadline allows what the leader's did not.

    The wait the leader refused (``retry_after`` of the error) when known, else more time than the
    leader has left.
    """
    own = current_deadline()
    if own is None:
        return True
    needed = getattr(error, "retry_after", None)
    if isinstance(needed, (int, float)):
        return needed <= own.remaining()
    return leader is None or own.remaining() > max(leader.remaining(), 0.0)


def _raise_own(error: BaseException, key: Hashable) -> NoReturn:
    """The follower's deadline refuses the wait too: raise what it would have raised (its kind's error)."""
    own = current_deadline()
    needed = getattr(error, "retry_after", None)
    if own is not None and isinstance(needed, (int, float)):
        cause = error.__cause__ if isinstance(error, DeadlineExceeded) else error
        own.check_wait(needed, f"the call for {key!r} asked to wait", cause)
    raise error


class SingleFlight(Generic[V]):
    """Deduplicates concurrent calls per key.  Callers re-check their cache inside ``fn``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call[V]] = {}

    def do(self, key: Hashable, fn: Callable[[], V]) -> V:
        while True:
            with self._lock:
                call = self._calls.get(key)
                leader = call is None
                if call is None:
                    call = _Call(current_deadline())
                    self._calls[key] = call
            if leader:
                return self._lead(key, call, fn)
            # bounded by the follower's own deadline: the leader may be a job that waits much longer
            wait_event(call.done.wait, f"waiting for another thread's call for {key!r}")
            if call.error is None:
                return call.value  # type: ignore[return-value]
            if not limited_by_deadline(call.error):
                raise call.error
            if not _has_more_time(call.error, call.deadline):
                _raise_own(call.error, key)
            # the leader ran out of its own time; this caller has more: its own call, in a new flight

    def _lead(self, key: Hashable, call: _Call[V], fn: Callable[[], V]) -> V:
        try:
            call.value = fn()
            return call.value
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)
