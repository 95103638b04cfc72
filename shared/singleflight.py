"""Single flight: concurrent callers asking for the same key share one call and its outcome.

A warm instance runs up to 24 jobs at once; on a cold start they all want the same secret,
token and actor.  Without this they would all go to Key Vault, Entra and Dataverse together
(and, on failure, all fail one after the other, each paying the full timeout).  Followers
wait for the leader and receive its value or its exception — no longer than their own deadline
(``shared.deadline``): an HTTP lookup never hangs behind a job's lookup that waits out a throttle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from shared.deadline import wait_event

V = TypeVar("V")


class _Call(Generic[V]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[V]):
    """Deduplicates concurrent calls per key.  Callers re-check their cache inside ``fn``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call[V]] = {}

    def do(self, key: Hashable, fn: Callable[[], V]) -> V:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = _Call()
                self._calls[key] = call
        if not leader:
            # bounded by the follower's own deadline: the leader may be a job that waits much longer
            wait_event(call.done.wait, f"waiting for another thread's call for {key!r}")
            if call.error is not None:
                raise call.error
            return call.value  # type: ignore[return-value]
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
