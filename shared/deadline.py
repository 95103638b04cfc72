"""How long the current invocation may still wait: a deadline carried in a context variable.

Why a context variable and not a ``deadline=`` argument: the waits that matter sit deep below the
trigger (a Retry-After sleep inside ``DataverseClient.request``, a follower of a single-flight token
or user lookup), several modules away from the trigger that knows the limit.  The variable is set
and reset by the invocation's own thread (the Functions worker runs each sync invocation on one
pool thread), so concurrent invocations never see each other's deadline; a thread that set none
(the timer, tests, tools) waits as before.

Two kinds:

* **job** (``JOB_DEADLINE_SECONDS``, hard): the queue trigger must end well before the host's
  ``functionTimeout``, or the host abandons the invocation while it still runs and, after the
  visibility timeout, a second copy of the job runs next to it.  A wait that would end after the
  deadline is not started: :class:`DeadlineExceeded` (``job_deadline_exceeded``, transient) gives
  the message back to the queue at once.  No new request starts once the deadline has passed.
* **http** (``HTTP_MAX_WAIT_SECONDS``, soft): an HTTP caller is better served by ``503`` with
  ``Retry-After`` than by a response held for minutes; the Dataverse error that asked for the wait
  is raised as it is (its ``retry_after`` becomes the header).  Requests themselves still run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from shared.errors import SyncError

JOB = "job"
HTTP = "http"


class DeadlineExceeded(SyncError):
    """The invocation would outlive its deadline by waiting; transient, so the message is retried later."""

    code = "job_deadline_exceeded"
    transient = True

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Deadline:
    at: float  # on ``clock``
    kind: str  # JOB | HTTP
    setting: str  # the setting that fixed it, for the messages
    seconds: float
    clock: Callable[[], float] = time.monotonic

    @property
    def hard(self) -> bool:
        return self.kind == JOB

    def remaining(self) -> float:
        return self.at - self.clock()

    def check_wait(self, wait: float, what: str, cause: BaseException | None = None) -> None:
        """Return when a wait of ``wait`` seconds ends before the deadline; raise otherwise.

        ``cause`` is the error that asked for the wait: a soft deadline raises it as it is.
        """
        left = self.remaining()
        if wait <= left:
            return
        if not self.hard and isinstance(cause, SyncError):
            cause.deadline_limited = True
            raise cause
        raise self.exceeded(
            f"{what}: waiting {wait:.1f}s would pass the deadline ({self.setting}={self.seconds:g}, "
            f"{max(left, 0.0):.1f}s left); not waiting",
            wait,
        ) from cause

    def check_start(self, what: str) -> None:
        """A hard deadline that has passed lets no new request start."""
        if self.hard and self.remaining() <= 0:
            raise self.exceeded(f"{what}: the deadline ({self.setting}={self.seconds:g}) has passed", None)

    def exceeded(self, message: str, wait: float | None) -> DeadlineExceeded:
        if self.hard:
            return DeadlineExceeded(message + "; the message goes back to the queue", retry_after=wait)
        return DeadlineExceeded(message, code="wait_limit_exceeded", retry_after=wait)


def limited_by_deadline(exc: BaseException) -> bool:
    """Whether ``exc`` says only that the raising invocation ran out of time (its deadline, not the call).

    Another caller with more time left would not have failed that way: a single-flight follower retries.
    """
    return isinstance(exc, DeadlineExceeded) or (isinstance(exc, SyncError) and exc.deadline_limited)


_current: ContextVar[Deadline | None] = ContextVar("shared_deadline", default=None)


def current() -> Deadline | None:
    return _current.get()


@contextlib.contextmanager
def within(
    seconds: float,
    *,
    kind: str,
    setting: str,
    started: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Deadline]:
    """Waits inside the block end by ``started + seconds`` (an outer, earlier deadline still wins)."""
    begin = clock() if started is None else started
    deadline = Deadline(begin + seconds, kind, setting, seconds, clock)
    outer = _current.get()
    if outer is not None and outer.remaining() < deadline.remaining():
        deadline = outer
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


def budget(limit: float) -> float:
    """``limit`` seconds of waiting, cut to what the current deadline leaves (a wait given as a budget)."""
    deadline = _current.get()
    return limit if deadline is None else min(limit, max(deadline.remaining(), 0.0))


def wait_event(wait: Callable[[float | None], bool], what: str) -> None:
    """Block on ``wait(timeout)`` (e.g. ``threading.Event.wait``) no longer than the current deadline."""
    deadline = _current.get()
    if deadline is None:
        wait(None)
        return
    if wait(max(deadline.remaining(), 0.0)):
        return
    raise deadline.exceeded(
        f"{what}: still not done at the deadline ({deadline.setting}={deadline.seconds:g}); "
        "not waiting longer",
        None,
    )
