"""HMAC keys kept in Key Vault, rotated without a restart and without a window where both keys work forever.

A :class:`KeyRing` holds the current value of one Key Vault secret and the values it replaced.  Why each
rule exists:

* **Periodic re-read** (``refresh_seconds``, at most one Key Vault read per period, single flight): an
  instance must notice a rotation on its own.  Re-reading only on a signature mismatch would keep an old
  key working forever on an instance that nobody sends the new key to — exactly what rotation after a
  leak must end.
* **Grace** (``grace_seconds``): once a new value is read, the previous one is still accepted for the
  grace period — senders (and other instances that still sign with it) switch over within it — and then
  refused, whether or not any request used the new key.  An old key therefore stops working at most
  ``refresh_seconds + grace_seconds`` after the rotation.
* **Re-read on a mismatch** (:meth:`reread`), rate limited to one read per ``min_reread_seconds``:
  anybody can send a bad signature, so it must not turn into Key Vault traffic; a real sender signing
  with a brand-new key is served after at most that long.

A Key Vault failure during a periodic re-read keeps the keys already known (and is retried next period):
a vault outage must not take the webhook down.  Only the first read, with nothing known yet, fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from shared.errors import SyncError
from shared.singleflight import SingleFlight

log = logging.getLogger("shared.keyring")


class SecretSource(Protocol):
    def get(self, name: str) -> str: ...

    def refresh(self, name: str, stale: str | None = None) -> str: ...


class KeyRing:
    """The accepted values of one secret: the current one first, then those still in their grace period."""

    def __init__(
        self,
        secrets: SecretSource | Callable[[], SecretSource],
        name: str,
        *,
        refresh_seconds: float = 300.0,
        grace_seconds: float = 600.0,
        min_reread_seconds: float = 60.0,
        settle_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secrets = secrets
        self.name = name
        self.refresh_seconds = refresh_seconds
        self.grace_seconds = grace_seconds
        self.min_reread_seconds = min_reread_seconds
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._known_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flight: SingleFlight[None] = SingleFlight()
        self._current: str | None = None
        self._retired: dict[str, float] = {}  # value -> when it stops being accepted
        self._last_attempt: float | None = None  # any read: paces the periodic re-read
        self._last_mismatch: float | None = None  # re-reads a bad signature asked for: rate limited

    def _store(self) -> SecretSource:
        store = self._secrets
        if callable(store) and not hasattr(store, "get"):
            return store()
        return store  # type: ignore[return-value]

    def current(self) -> str:
        """The newest value read."""
        return self.keys()[0]

    def signing_key(self) -> str:
        """The value to sign with: the newest one once it has been known for ``settle_seconds``.

        For a key the app both signs and verifies with (the queue message key): an instance that has
        just read a new value keeps signing with the previous one until every other instance has read
        the new one too (each re-reads within ``refresh_seconds``), so no verifier meets a key it does
        not know yet.  With ``settle_seconds`` 0 it is simply the newest.
        """
        accepted = self.keys()
        with self._lock:
            since = self._known_since.get(accepted[0])
            settled = since is None or self._clock() - since >= self.settle_seconds
        return accepted[0] if settled or len(accepted) == 1 else accepted[1]

    def keys(self) -> list[str]:
        """Values that verify now, newest first; re-reads Key Vault when the period is over."""
        if self._current is None:
            self._flight.do("first", self._first_read)
        elif self._due(self.refresh_seconds):
            self._flight.do("periodic", lambda: self._reread(quiet=True))
        return self._accepted()

    def reread(self) -> list[str] | None:
        """After a signature mismatch: read again unless a read happened within ``min_reread_seconds``.

        Returns the accepted values when a read was made, None when it was refused (rate limit or a Key
        Vault failure: the caller answers with what it already knows).
        """
        if self._current is None:
            return self.keys()
        with self._lock:
            last = self._last_mismatch
            if last is not None and self._clock() - last < self.min_reread_seconds:
                return None
            self._last_mismatch = self._last_attempt = self._clock()
        try:
            self._flight.do("mismatch", lambda: self._reread(quiet=False))
        except SyncError as exc:
            log.warning("secret %s could not be re-read after a mismatch: %s", self.name, exc.code)
            return None
        return self._accepted()

    # --- internals ----------------------------------------------------------------------------

    def _due(self, interval: float) -> bool:
        with self._lock:
            last = self._last_attempt
            if last is not None and self._clock() - last < interval:
                return False
            self._last_attempt = self._clock()  # claimed: concurrent callers see it as done
            return True

    def _first_read(self) -> None:
        if self._current is not None:
            return
        value = self._store().get(self.name)
        with self._lock:
            self._last_attempt = self._clock()
        self._install(value)

    def _reread(self, *, quiet: bool) -> None:
        try:
            value = self._store().refresh(self.name)
        except SyncError as exc:
            if not quiet:
                raise
            log.warning("secret %s could not be re-read; keeping the known value(s): %s", self.name, exc.code)
            return
        self._install(value)

    def _install(self, value: str) -> None:
        with self._lock:
            now = self._clock()
            old = self._current
            if old == value:
                return
            self._known_since[value] = now
            if old is not None:
                self._retired[old] = now + self.grace_seconds
                log.info("secret %s changed; the previous value is accepted for %.0f s more",
                         self.name, self.grace_seconds)
            self._retired.pop(value, None)
            self._current = value

    def _accepted(self) -> list[str]:
        with self._lock:
            now = self._clock()
            for value, until in list(self._retired.items()):
                if until <= now:
                    del self._retired[value]
                    self._known_since.pop(value, None)
                    log.info("secret %s: a previous value's grace period ended; it is refused now", self.name)
            assert self._current is not None
            newest_first = sorted(self._retired, key=lambda v: self._retired[v], reverse=True)
            return [self._current, *newest_first]
