"""Dynamics users (``systemusers``): lookups by email, id or Entra object id, cached per instance.

A warm instance should look each actor up once: 24 concurrent jobs for the same cold actor
share one query (single flight per key), a found user stays cached for ``ttl`` seconds and a
missing or ambiguous one for the short ``negative_ttl`` (so a user added in Dynamics is found
soon).  Email matching is case-insensitive in Dataverse, and so is the cache key.  The email
query asks for ``$top=2``: one row is the user, two mean the address is shared (``internalemailaddress``
is not unique) and the job must not guess.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.contract import ACT_AS_FIELDS
from shared.dataverse import Caller, DataverseClient, odata_literal
from shared.errors import ActorError, InvalidJob
from shared.singleflight import SingleFlight

SELECT = (
    "systemuserid,internalemailaddress,fullname,azureactivedirectoryobjectid,isdisabled,accessmode,"
    "applicationid"
)


@dataclass(frozen=True)
class SystemUser:
    systemuserid: str
    email: str | None
    fullname: str | None
    azure_ad_object_id: str | None
    is_disabled: bool
    access_mode: int | None
    application_id: str | None = None
    """Set for application users (service principals): never a person to act for."""

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SystemUser:
        access_mode = record.get("accessmode")
        oid = record.get("azureactivedirectoryobjectid")
        return cls(
            systemuserid=str(record["systemuserid"]).lower(),
            email=record.get("internalemailaddress") or None,
            fullname=record.get("fullname"),
            azure_ad_object_id=str(oid).lower() if oid else None,
            is_disabled=bool(record.get("isdisabled")),
            access_mode=access_mode if isinstance(access_mode, int) else None,
            application_id=str(record["applicationid"]).lower() if record.get("applicationid") else None,
        )

    def to_api(self) -> dict[str, Any]:
        return {
            "systemUserId": self.systemuserid,
            "email": self.email,
            "fullName": self.fullname,
            "azureAdObjectId": self.azure_ad_object_id,
            "isDisabled": self.is_disabled,
            "accessMode": self.access_mode,
        }

    def caller(self) -> Caller:
        return Caller(self.systemuserid, self.azure_ad_object_id)


@dataclass(frozen=True)
class _Entry:
    expires: float
    user: SystemUser | None
    error_code: str | None = None
    error_message: str | None = None
    error_details: tuple[dict[str, Any], ...] = ()


def _guid(value: str, what: str) -> str:
    try:
        parsed = uuid.UUID(value.strip())
    except (ValueError, AttributeError):
        raise ActorError(f"{what} {value!r} is not a GUID", code="actor_not_found") from None
    return str(parsed)


class UserDirectory:
    def __init__(
        self,
        client: DataverseClient,
        *,
        ttl: float = 900,
        negative_ttl: float = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._flight: SingleFlight[SystemUser] = SingleFlight()
        self.queries = 0

    # -- lookups ----------------------------------------------------------------------------------

    def by_email(self, email: str, *, correlation_id: str | None = None) -> SystemUser:
        address = (email or "").strip()
        if not address:
            raise ActorError("the actor's email is empty", code="actor_not_found")
        return self._lookup(
            ("email", address.lower()),
            f"internalemailaddress eq {odata_literal(address)}",
            f"email {address}",
            correlation_id,
        )

    def by_id(self, systemuserid: str, *, correlation_id: str | None = None) -> SystemUser:
        guid = _guid(systemuserid, "systemUserId")
        return self._lookup(("id", guid), f"systemuserid eq {guid}", f"systemuserid {guid}", correlation_id)

    def by_object_id(self, object_id: str, *, correlation_id: str | None = None) -> SystemUser:
        guid = _guid(object_id, "azureAdObjectId")
        return self._lookup(
            ("oid", guid),
            f"azureactivedirectoryobjectid eq {guid}",
            f"Entra object id {guid}",
            correlation_id,
        )

    def resolve(self, act_as: Mapping[str, str], *, correlation_id: str | None = None) -> SystemUser:
        """``{"email": …}``, ``{"systemUserId": …}`` or ``{"azureAdObjectId": …}`` (exactly one)."""
        given = [k for k in ACT_AS_FIELDS if k in act_as]
        if len(given) != 1 or len(act_as) != 1 or not isinstance(act_as[given[0]], str):
            raise InvalidJob(
                "actAs must have exactly one of email, systemUserId, azureAdObjectId (a string)",
                details=[{"field": "actAs", "message": "exactly one of " + ", ".join(ACT_AS_FIELDS)}],
            )
        key = given[0]
        value = act_as[key]
        if key == "email":
            return self.by_email(value, correlation_id=correlation_id)
        if key == "systemUserId":
            return self.by_id(value, correlation_id=correlation_id)
        return self.by_object_id(value, correlation_id=correlation_id)

    def all_users(self, *, correlation_id: str | None = None) -> list[SystemUser]:
        """Every systemuser, in one paged query with the small ``$select`` (reconciliation)."""
        users: list[SystemUser] = []
        self.queries += 1
        for page in self._client.iter_pages(
            "systemusers", {"$select": SELECT}, correlation_id=correlation_id
        ):
            users.extend(SystemUser.from_record(r) for r in page.get("value", []) if r.get("systemuserid"))
        return users

    def prime(self, users: Iterable[SystemUser]) -> None:
        """Refresh the cache from a full listing: ids and object ids, and emails held by one user only."""
        users = list(users)
        by_email: dict[str, list[SystemUser]] = {}
        for user in users:
            if user.email:
                by_email.setdefault(user.email.strip().lower(), []).append(user)
        expires = self._clock() + self._ttl
        with self._lock:
            for user in users:
                self._store_identities(user, expires)
            for email, holders in by_email.items():
                if len(holders) == 1:
                    self._cache[("email", email)] = _Entry(expires, holders[0])
                else:
                    self._cache.pop(("email", email), None)

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- internals --------------------------------------------------------------------------------

    def _cached(self, key: tuple[str, str]) -> SystemUser | None:
        entry = self._cache.get(key)
        if entry is None or entry.expires <= self._clock():
            return None
        if entry.user is not None:
            return entry.user
        raise ActorError(
            entry.error_message or "not found",
            code=entry.error_code or "actor_not_found",
            details=[dict(d) for d in entry.error_details],
        )

    def _lookup(
        self, key: tuple[str, str], filter_: str, what: str, correlation_id: str | None
    ) -> SystemUser:
        user = self._cached(key)
        if user is not None:
            return user

        def query() -> SystemUser:
            cached = self._cached(key)
            if cached is not None:
                return cached
            return self._query(key, filter_, what, correlation_id)

        return self._flight.do(key, query)

    def _query(self, key: tuple[str, str], filter_: str, what: str, correlation_id: str | None) -> SystemUser:
        self.queries += 1
        page = self._client.get_json(
            "systemusers",
            {"$select": SELECT, "$filter": filter_, "$top": "2"},
            correlation_id=correlation_id,
        )
        rows = [r for r in page.get("value", []) if isinstance(r, dict) and r.get("systemuserid")]
        now = self._clock()
        if not rows:
            message = f"no Dynamics user has the {what}"
            with self._lock:
                self._cache[key] = _Entry(now + self._negative_ttl, None, "actor_not_found", message)
            raise ActorError(message, code="actor_not_found")
        if len(rows) > 1:
            ids = [str(r["systemuserid"]).lower() for r in rows]
            message = f"several Dynamics users have the {what} ({', '.join(ids)}); use systemUserId instead"
            details = tuple({"systemUserId": i} for i in ids)
            with self._lock:
                self._cache[key] = _Entry(now + self._negative_ttl, None, "actor_ambiguous", message, details)
            raise ActorError(message, code="actor_ambiguous", details=[dict(d) for d in details])
        user = SystemUser.from_record(rows[0])
        with self._lock:
            self._cache[key] = _Entry(now + self._ttl, user)
            self._store_identities(user, now + self._ttl)
        return user

    def _store_identities(self, user: SystemUser, expires: float) -> None:
        entry = _Entry(expires, user)
        self._cache[("id", user.systemuserid)] = entry
        if user.azure_ad_object_id:
            self._cache[("oid", user.azure_ad_object_id)] = entry


def is_person(user: SystemUser) -> bool:
    """Enabled, interactive (``accessmode`` 0 or unknown) and not an application user: somebody a job may
    name.  Only these are shown by ``GET /api/users`` to a function-key holder."""
    return not user.is_disabled and user.application_id is None and user.access_mode in (0, None)


def find_user(directory: UserDirectory, email: str, *, everyone: bool = False) -> SystemUser:
    """``GET /api/users?email=``: the user, or ActorError ``actor_not_found`` / ``actor_ambiguous``.

    Without ``everyone`` (the admin-key route ``/api/users/any``) a disabled, application or
    non-interactive user is answered exactly as if there were none, so the function key does not
    reveal who exists but may not be acted for.
    """
    address = (email or "").strip()
    user = directory.by_email(address, correlation_id="lookup_user")
    if not everyone and not is_person(user):
        raise ActorError(f"no Dynamics user has the email {address}", code="actor_not_found")
    return user
