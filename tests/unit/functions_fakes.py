"""Small in-memory stand-ins for the per-instance runtime, used by the Functions-layer unit tests.

They keep the semantics the jobs rely on (a keyed create answers 412 when the record exists, a
delete of a missing record is a no-op) and record every call, so a test can assert what was
written, on whose behalf, and that nothing was written at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.dataverse import Caller, WriteResult
from shared.errors import ActorError, SyncError
from shared.keyring import KeyRing
from shared.memberships import Membership
from shared.policy import Authorizer
from shared.settings import Settings
from shared.users import SystemUser
from tests.signing import UNIT_MESSAGE_KEY

TENANT = "00000000-0000-4000-8000-00000000d5ac"
CLIENT = "00000000-0000-4000-8000-00000000c11e"
APP_USER = "00000000-0000-4000-8000-0000000000aa"


def settings() -> Settings:
    return Settings(
        dataverse_url="https://contoso.crm4.dynamics.com",
        tenant_id=TENANT,
        client_id=CLIENT,
        key_vault_url="https://kv-test.vault.azure.net",
    )


def user(
    email: str | None,
    *,
    uid: str | None = None,
    oid: str | bool | None = True,
    disabled: bool = False,
    fullname: str | None = None,
    access_mode: int | None = 0,
) -> SystemUser:
    uid = uid or str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{email}"))
    if oid is True:
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"oid:{email}"))
    return SystemUser(
        systemuserid=uid,
        email=email,
        fullname=fullname or (email.split("@")[0].title() if email else None),
        azure_ad_object_id=oid or None,
        is_disabled=disabled,
        access_mode=access_mode,
    )


JANE = user("jane@contoso.com")
JOHN = user("john@contoso.com", oid=None)
DISABLED = user("disabled@contoso.com", disabled=True)
SHARED_A = user("shared@contoso.com", uid="00000000-0000-4000-8000-00000000005a")
SHARED_B = user("shared@contoso.com", uid="00000000-0000-4000-8000-00000000005b")
USERS = [JANE, JOHN, DISABLED, SHARED_A, SHARED_B]


class FakeUsers:
    def __init__(self, users: Iterable[SystemUser] = USERS) -> None:
        self.users = list(users)
        self.resolved: list[dict[str, str]] = []
        self.all_users_calls = 0
        self.primed: list[SystemUser] | None = None

    def by_email(self, email: str, *, correlation_id: str | None = None) -> SystemUser:
        found = [u for u in self.users if (u.email or "").lower() == email.strip().lower()]
        if not found:
            raise ActorError(f"no Dynamics user has the email {email}", code="actor_not_found")
        if len(found) > 1:
            raise ActorError(
                f"{len(found)} users share email {email}",
                code="actor_ambiguous",
                details=[{"systemUserIds": [u.systemuserid for u in found]}],
            )
        return found[0]

    def resolve(self, act_as: Mapping[str, str], *, correlation_id: str | None = None) -> SystemUser:
        self.resolved.append(dict(act_as))
        if "email" in act_as:
            return self.by_email(act_as["email"])
        wanted = act_as.get("systemUserId") or act_as.get("azureAdObjectId")
        for candidate in self.users:
            if wanted in (candidate.systemuserid, candidate.azure_ad_object_id):
                return candidate
        raise ActorError(f"no user {wanted}", code="actor_not_found")

    def all_users(self, *, correlation_id: str | None = None) -> list[SystemUser]:
        self.all_users_calls += 1
        return list(self.users)

    def prime(self, users: Iterable[SystemUser]) -> None:
        self.primed = list(users)


@dataclass
class Call:
    operation: str
    entity: str
    key: Any
    data: Any
    caller: Caller | None
    correlation_id: str | None
    if_match: str | None = None


@dataclass
class FakeDataverse:
    """Records writes; ``fail`` is raised by the next call; ``records`` keyed by (entity, key)."""

    records: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    fail: SyncError | BaseException | None = None
    modified_by: str | None = None
    whoami_answer: dict[str, Any] = field(
        default_factory=lambda: {"UserId": APP_USER, "BusinessUnitId": "bu", "OrganizationId": "org"}
    )
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    pages: list[dict[str, Any]] = field(default_factory=list)
    request_answer: dict[str, Any] | SyncError | None = None

    def _record(
        self, operation: str, entity: str, key: Any, data: Any, caller: Caller | None, cid: str | None,
        if_match: str | None = None,
    ) -> None:
        self.calls.append(Call(operation, entity, key, data, caller, cid, if_match))
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error

    def _result(
        self,
        operation: str,
        entity: str,
        key: Any,
        status: int,
        *,
        created: bool | None,
        noop: bool,
        caller: Caller | None,
    ) -> WriteResult:
        record_id = key if isinstance(key, str) else None
        by = self.modified_by or (caller.systemuserid if caller else None)
        return WriteResult(operation, entity, record_id, status, created, noop, by if caller else None)

    @staticmethod
    def _k(key: Any) -> str:
        return key if isinstance(key, str) else repr(sorted(key.items()))

    def create(
        self,
        entity: str,
        data: Mapping[str, Any],
        *,
        key: Any = None,
        caller: Caller | None = None,
        correlation_id: str | None = None,
    ) -> WriteResult:
        self._record("create", entity, key, data, caller, correlation_id)
        if key is None:
            key = str(uuid.uuid4())
        elif (entity, self._k(key)) in self.records:
            return WriteResult(
                "create", entity, key if isinstance(key, str) else None, 412, False, True, None
            )
        self.records[(entity, self._k(key))] = dict(data)
        return self._result("create", entity, key, 204, created=True, noop=False, caller=caller)

    def update(
        self,
        entity: str,
        key: Any,
        data: Mapping[str, Any],
        *,
        caller: Caller | None = None,
        correlation_id: str | None = None,
        if_match: str | None = None,
    ) -> WriteResult:
        self._record("update", entity, key, data, caller, correlation_id, if_match)
        self.records.setdefault((entity, self._k(key)), {}).update(data)
        return self._result("update", entity, key, 204, created=None, noop=False, caller=caller)

    def upsert(
        self,
        entity: str,
        key: Any,
        data: Mapping[str, Any],
        *,
        caller: Caller | None = None,
        correlation_id: str | None = None,
        if_match: str | None = None,
    ) -> WriteResult:
        self._record("upsert", entity, key, data, caller, correlation_id, if_match)
        created = (entity, self._k(key)) not in self.records
        self.records.setdefault((entity, self._k(key)), {}).update(data)
        return self._result(
            "upsert", entity, key, 201 if created else 200, created=created, noop=False, caller=caller
        )

    def delete(
        self, entity: str, key: Any, *, caller: Caller | None = None, correlation_id: str | None = None,
        if_match: str | None = None,
    ) -> WriteResult:
        self._record("delete", entity, key, None, caller, correlation_id, if_match)
        gone = self.records.pop((entity, self._k(key)), None) is None
        return WriteResult(
            "delete", entity, key if isinstance(key, str) else None, 404 if gone else 204, None, gone, None
        )

    def whoami(self, *, correlation_id: str | None = None) -> dict[str, Any]:
        if isinstance(self.fail, BaseException):
            error, self.fail = self.fail, None
            raise error
        return dict(self.whoami_answer)

    def iter_pages(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        page_size: int = 5000,
        correlation_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        self.requests.append(("GET", path, dict(params or {})))
        yield from self.pages or [{"value": []}]

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        **_: Any,
    ) -> Any:
        self.requests.append((method, path, dict(headers or {})))
        answer = self.request_answer
        if isinstance(answer, BaseException):
            raise answer
        return _Response(answer or {})


class _Response:
    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self.status_code = 200

    def json(self) -> dict[str, Any]:
        return self._body


class FakeSecrets:
    def __init__(self, values: Mapping[str, str] | None = None, fail: Mapping[str, SyncError] | None = None):
        self.values = dict(
            values
            or {
                "dataverse-client-secret": "client-SECRET-value-123",
                "webhook-signing-secret": "webhook-KEY-value-456",
                "queue-message-signing-key": UNIT_MESSAGE_KEY,
            }
        )
        self.fail = dict(fail or {})
        self.reads: list[str] = []

    def get(self, name: str) -> str:
        self.reads.append(name)
        if name in self.fail:
            raise self.fail[name]
        return self.values[name]

    def refresh_if_due(self, name: str, stale: str, *, min_interval: float = 60.0) -> str | None:
        return self.get(name)

    def refresh(self, name: str, stale: str | None = None) -> str:
        return self.get(name)

    def close(self) -> None:
        pass


class FakeTokens:
    def __init__(
        self,
        token: str = "header.eyJhdWQiOiJodHRwczovL2NvbnRvc28uY3JtNC5keW5hbWljcy5jb20ifQ.sig",
        fail: SyncError | None = None,
    ) -> None:
        self.token = token
        self.fail = fail

    def get_token(self) -> str:
        if self.fail is not None:
            raise self.fail
        return self.token


@dataclass
class FakeAttribution:
    """Records which actors were verified before a write; ``fail`` is raised by the next verify."""

    verified: list[str] = field(default_factory=list)
    forgotten: list[str | None] = field(default_factory=list)
    fail: SyncError | None = None

    def verify(self, actor: SystemUser, *, correlation_id: str | None = None) -> None:
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.verified.append(actor.systemuserid)

    def forget(self, systemuserid: str | None = None) -> None:
        self.forgotten.append(systemuserid)


class FakeMemberships:
    """Roles and teams per systemuserid (none unless given); counts lookups like MembershipDirectory."""

    def __init__(self, held: Mapping[str, Membership] | None = None) -> None:
        self.held = dict(held or {})
        self.queries = 0

    def of(self, systemuserid: str, *, correlation_id: str | None = None) -> Membership:
        self.queries += 1
        return self.held.get(systemuserid, Membership(systemuserid, (), ()))


@dataclass
class FakeRuntime:
    settings: Settings = field(default_factory=settings)
    secrets: Any = field(default_factory=FakeSecrets)
    tokens: Any = field(default_factory=FakeTokens)
    dataverse: Any = field(default_factory=FakeDataverse)
    users: Any = field(default_factory=FakeUsers)
    attribution: Any = field(default_factory=FakeAttribution)
    replay: Any = field(default_factory=lambda: FakeReplay())
    memberships: Any = field(default_factory=lambda: FakeMemberships())
    policy: Any = None  # the real Authorizer over the fake users and memberships
    closed: bool = False
    _rings: dict[tuple[int, str], KeyRing] = field(default_factory=dict)

    def _ring(self, name: str) -> KeyRing:
        """A real KeyRing over whatever ``secrets`` is now (tests swap it for a failing one)."""
        key = (id(self.secrets), name)
        if key not in self._rings:
            self._rings[key] = KeyRing(self.secrets, name)
        return self._rings[key]

    @property
    def webhook_keys(self) -> KeyRing:
        return self._ring(self.settings.webhook_secret_name)

    @property
    def message_keys(self) -> KeyRing:
        return self._ring(self.settings.message_secret_name)

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = Authorizer(self.settings, self.users, self.memberships)

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeReplay:
    """The replay window in memory: ``first_use`` is True once per (t, source, body)."""

    seen: set[tuple[int, str, bytes]] = field(default_factory=set)
    fail: SyncError | None = None

    def first_use(self, timestamp: int, source: str, body: bytes) -> bool:
        if self.fail is not None:
            raise self.fail
        key = (timestamp, source, body)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True
