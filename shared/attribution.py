"""Attribution before the write: prove that Dataverse will run a write as the actor before sending it.

Dataverse ignores a caller header it cannot map (a stale Entra object id, a user it does not find) and
silently runs the request as the application user.  Reading ``_modifiedby_value`` back catches that
only after the record has been saved under the wrong name — and a delete has nothing to read back.
So the first write for each actor on an instance is preceded by ``WhoAmI`` sent with the same caller
header: it must answer the actor's ``systemuserid``.  The answer is cached per actor per instance (one
extra request per actor per ``ttl``, single flight), and dropped when Dataverse refuses a write on that
caller (403/400), so the next write checks again.  The ``_modifiedby_value`` check stays as the second
guard.

Some users are never acted for, whatever a job says: application users (``applicationid`` set — a
service principal is nobody's author) and users whose ``accessmode`` is not 0 (Read-Write): a
non-interactive, support or administrative-only user is not a person writing records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.errors import ActorError, DataverseError, ImpersonationNotApplied
from shared.singleflight import SingleFlight

if TYPE_CHECKING:
    from shared.dataverse import DataverseClient
    from shared.users import SystemUser

log = logging.getLogger("shared.attribution")

READ_WRITE = 0
"""``systemuser.accessmode`` of an ordinary (interactive, read-write) user."""


def check_eligible(actor: SystemUser) -> None:
    """Refuse, before any request, the users a job may never act as."""
    if actor.application_id is not None:
        raise ActorError(
            f"user {actor.systemuserid} is an application user (applicationid {actor.application_id}); "
            "refusing to write on behalf of a service principal",
            code="actor_application_user",
            details=[{"field": "actAs", "systemUserId": actor.systemuserid}],
        )
    if actor.access_mode is not None and actor.access_mode != READ_WRITE:
        raise ActorError(
            f"user {actor.systemuserid} has accessmode {actor.access_mode} (only 0, Read-Write, is a "
            "person who writes records); refusing to write on their behalf",
            code="actor_not_interactive",
            details=[{"field": "actAs", "systemUserId": actor.systemuserid, "accessMode": actor.access_mode}],
        )


class AttributionGuard:
    """Per instance: which actors Dataverse has been seen to run as, checked with ``WhoAmI``."""

    def __init__(
        self, client: DataverseClient, *, ttl: float = 900, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._verified: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flight: SingleFlight[None] = SingleFlight()
        self.checks = 0
        """``WhoAmI`` requests sent on behalf of an actor (tests, diagnostics)."""

    def verify(self, actor: SystemUser, *, correlation_id: str | None = None) -> None:
        """Return only when Dataverse runs requests with the actor's caller header as the actor."""
        check_eligible(actor)
        key = actor.systemuserid
        with self._lock:
            expires = self._verified.get(key)
            if expires is not None and expires > self._clock():
                return
        self._flight.do(key, lambda: self._check(actor, correlation_id))

    def forget(self, systemuserid: str | None = None) -> None:
        """After Dataverse refused a write on a caller: its next write is checked again."""
        with self._lock:
            if systemuserid is None:
                self._verified.clear()
            else:
                self._verified.pop(systemuserid.lower(), None)

    def _check(self, actor: SystemUser, correlation_id: str | None) -> None:
        caller = actor.caller()
        headers = caller.headers()
        self.checks += 1
        answer = self._client.get_json("WhoAmI", headers=headers, correlation_id=correlation_id)
        user_id = answer.get("UserId")
        if not isinstance(user_id, str):
            raise DataverseError(
                "WhoAmI answered without a UserId", status=200, code="dataverse_malformed_response",
                transient=True,
            )
        if user_id.lower() != actor.systemuserid:
            header = next(iter(headers))
            raise ImpersonationNotApplied(
                f"Dataverse runs requests sent with {header}={headers[header]} as {user_id.lower()}, not as "
                f"the actor {actor.systemuserid}; nothing was written (check the user's Entra object id "
                "and that the user exists in this environment)",
                details=[{"field": "actAs", "systemUserId": actor.systemuserid, "whoAmI": user_id.lower(),
                          "header": header}],
            )
        with self._lock:
            self._verified[actor.systemuserid] = self._clock() + self._ttl
        log.info("attribution verified for %s via %s", actor.systemuserid, next(iter(headers)))
