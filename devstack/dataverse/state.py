"""Dataverse Web API emulator, the state: one ``Org`` per sandbox (tables, records, users, limits).

It exists so the project's client can be proven against the behaviours that break naive
integrations, faithfully enough that passing here means working there: the 401 with an empty
body, quoted-literal filters, paging by opaque ``$skiptoken``, alternate keys, conditional
writes, impersonation that is *silently ignored* for an unknown caller, and service protection
(429 + ``Retry-After``) counted per calling user over a sliding window.  Error bodies carry the
real codes and messages (sources: Microsoft Learn "Troubleshoot Dataverse Web API client
errors", "Service protection API limits", the Web service error codes list; [obs] marks what
was seen in real responses quoted in public issues rather than documented).

Anything outside what is emulated answers 501 with a message that says so, rather than a guess.
Bulk messages (CreateMultiple/UpdateMultiple/UpsertMultiple), ``sdkmessagefilters`` and ``$batch`` are
in ``devstack.dataverse.bulk``; the HTTP side is ``devstack.dataverse.api``.

Counters (per sandbox, ``dataverse``): ``<METHOD> <resource>`` and ``status:<code>`` per request,
``caller:CallerObjectId`` / ``caller:MSCRMCallerID`` per write that carried that header,
``impersonation:applied`` / ``impersonation:ignored``, ``cookie:ARRAffinity`` when a client sent
the affinity cookie back.  A ``systemusers(<id>)?$expand=`` retrieve (roles and teams,
devstack/dataverse/security.py) counts as ``GET systemusers $expand``, not as a ``GET systemusers`` lookup.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from devstack.dataverse import odata, security
from devstack.sandboxes import Sandbox

SERVICE = "dataverse"
APP_USER_FULLNAME = "# dataverse-s2s (application)"
_USER_NAMESPACE = uuid.UUID("6f1c2a0e-5d7b-4c8e-9a4f-3b2d1e0c9f8a")
_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Real codes (see the module docstring for sources).
CODE_NOT_FOUND = "0x80040217"  # ObjectDoesNotExist
CODE_KEY_NOT_FOUND = "0x80060891"  # RecordNotFoundByEntityKey
CODE_DUPLICATE_KEY = "0x80060892"  # DuplicateRecordEntityKey
CODE_DUPLICATE = "0x80040237"  # DuplicateRecord
CODE_VERSION_MISMATCH = "0x80060882"  # ConcurrencyVersionMismatch
# Resource not found for the segment: 404 0x80060888 in Learn's 2024 PowerShell walkthrough and in
# captured answers; the 2022 troubleshooting article shows 0x8006088a (CrmHttpError), an older value.
CODE_SEGMENT = "0x80060888"
CODE_ODATA = odata.SYNTAX_ERROR_CODE  # 0x80060888: query syntax, unknown property
CODE_PAYLOAD = "0x80048d19"  # error identified in payload
CODE_NO_DELEGATE = "0x8004A110"  # CannotActOnBehalfOfAnotherUser
CODE_USER_DISABLED = "0x80040225"  # [obs] answered for a disabled (calling or impersonated) user
CODE_NOT_MEMBER = "0x80072560"  # UserNotMemberOfOrg
CODE_LIMIT_REQUESTS = "0x80072322"
CODE_LIMIT_TIME = "0x80072321"
CODE_LIMIT_CONCURRENCY = "0x80072326"

SYSTEMUSER_FIELDS = (
    "systemuserid",
    "internalemailaddress",
    "fullname",
    "firstname",
    "lastname",
    "domainname",
    "azureactivedirectoryobjectid",
    "isdisabled",
    "accessmode",
    "applicationid",
    "_businessunitid_value",
    "createdon",
    "modifiedon",
)
SYSTEMUSER_TYPES = {
    "systemuserid": "Edm.Guid",
    "azureactivedirectoryobjectid": "Edm.Guid",
    "applicationid": "Edm.Guid",
    "_businessunitid_value": "Edm.Guid",
    "isdisabled": "Edm.Boolean",
    "accessmode": "Edm.Int32",
    "createdon": "Edm.DateTimeOffset",
    "modifiedon": "Edm.DateTimeOffset",
    **dict.fromkeys(
        ("internalemailaddress", "fullname", "firstname", "lastname", "domainname"), "Edm.String"
    ),
}


class DataverseError(Exception):
    """An answer in Dataverse's error shape; raised anywhere below the request handler."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _norm_key(value: object) -> object:
    """Key values compare like SQL Server's case-insensitive collation does."""
    if isinstance(value, odata.Guid):
        return value.value
    if isinstance(value, str):
        return value.rstrip(" ").lower()
    return value


def _lower_guid(value: object) -> str | None:
    return value.lower() if isinstance(value, str) and _GUID_RE.fullmatch(value) else None


_ADDRESS = tuple(
    f"address{n}_{part}" for n in (1, 2)
    for part in ("name", "line1", "line2", "line3", "city", "stateorprovince", "postalcode", "country",
                 "county", "telephone1", "latitude", "longitude", "addresstypecode")
)
# Writable columns of the stock tables (a subset of Learn's Web API EntityType reference): a write body
# naming any other column is refused as Dataverse refuses it, so a typo in a job fails here as in Azure.
# The emulator knows only these; a test adds a customer column (cr123_externalid) with add_entity(columns=).
STOCK_COLUMNS: dict[str, frozenset[str]] = {
    "contacts": frozenset((
        "contactid", "firstname", "lastname", "middlename", "nickname", "salutation", "suffix", "jobtitle",
        "department", "emailaddress1", "emailaddress2", "emailaddress3", "telephone1", "telephone2",
        "telephone3", "mobilephone", "fax", "websiteurl", "description", "gendercode", "familystatuscode",
        "birthdate", "anniversary", "spousesname", "numberofchildren", "preferredcontactmethodcode",
        "donotemail", "donotphone", "donotbulkemail", "statecode", "statuscode", "accountrolecode",
        "creditlimit", "governmentid", "employeeid", "externaluseridentifier", "assistantname",
        "managername", "company", "overriddencreatedon", "importsequencenumber", *_ADDRESS,
    )),
    "accounts": frozenset((
        "accountid", "name", "accountnumber", "description", "telephone1", "telephone2", "fax",
        "websiteurl", "emailaddress1", "emailaddress2", "revenue", "numberofemployees", "industrycode",
        "accountcategorycode", "customertypecode", "tickersymbol", "creditlimit", "donotemail",
        "donotphone", "statecode", "statuscode", "overriddencreatedon", "importsequencenumber", *_ADDRESS,
    )),
    "leads": frozenset((
        "leadid", "subject", "firstname", "lastname", "middlename", "companyname", "jobtitle",
        "emailaddress1", "telephone1", "mobilephone", "websiteurl", "description", "leadsourcecode",
        "leadqualitycode", "revenue", "numberofemployees", "statecode", "statuscode",
        "overriddencreatedon", "importsequencenumber", *_ADDRESS,
    )),
}


@dataclass
class Table:
    """An entity set with its primary id and alternate keys (each key a tuple of attributes)."""

    entity_set: str
    logical_name: str
    primary_id: str
    alternate_keys: list[tuple[str, ...]]
    columns: frozenset[str] | None = None  # None: a table added through the control API takes any column
    metadata_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    # alternate key -> normalised key values -> record id (Dataverse backs each key with a unique index)
    indexes: dict[tuple[str, ...], dict[tuple[object, ...], str]] = field(default_factory=dict)

    def key_values(self, key: tuple[str, ...], record: Mapping[str, Any]) -> tuple[object, ...] | None:
        values = tuple(_norm_key(record.get(a)) for a in key)
        return None if any(v is None for v in values) else values

    def holder(self, key: tuple[str, ...], values: tuple[object, ...]) -> str | None:
        return self.indexes.get(key, {}).get(values)

    def index_add(self, record: Mapping[str, Any]) -> None:
        for key in self.alternate_keys:
            values = self.key_values(key, record)
            if values is not None:
                self.indexes.setdefault(key, {}).setdefault(values, record[self.primary_id])

    def index_remove(self, record: Mapping[str, Any]) -> None:
        for key in self.alternate_keys:
            values = self.key_values(key, record)
            index = self.indexes.get(key, {})
            if values is not None and index.get(values) == record[self.primary_id]:
                del index[values]

    def reindex(self) -> None:
        self.indexes = {key: {} for key in self.alternate_keys}
        for record in self.records.values():
            self.index_add(record)

    def definition(self) -> dict[str, Any]:
        return {
            "MetadataId": self.metadata_id,
            "LogicalName": self.logical_name,
            "SchemaName": self.logical_name.capitalize(),
            "EntitySetName": self.entity_set,
            "PrimaryIdAttribute": self.primary_id,
            "PrimaryNameAttribute": "fullname" if self.logical_name == "contact" else "name",
            "LogicalCollectionName": self.entity_set,
        }

    def type_of(self, name: str) -> str | None:
        """Edm types the emulator knows for sure: ids, lookups, system fields (the rest is open)."""
        if name == self.primary_id or (name.startswith("_") and name.endswith("_value")):
            return "Edm.Guid"
        if name in ("createdon", "modifiedon"):
            return "Edm.DateTimeOffset"
        if name == "versionnumber":
            return "Edm.Int64"
        return None

    def key_for(self, attributes: set[str]) -> tuple[str, ...] | None:
        return next((k for k in self.alternate_keys if set(k) == attributes), None)

    def key_name(self, key: tuple[str, ...]) -> str:
        return f"{self.logical_name}_{'_'.join(key)}_key"


@dataclass
class Limits:
    requests: int = 6000
    window_seconds: float = 300.0
    execution_ms: int = 1_200_000
    concurrent: int = 52


@dataclass
class _Entry:
    at: float
    ms: float = 0.0
    trimmed: bool = False


@dataclass
class Caller:
    """Who a request runs as: ``user`` (effective) and ``on_behalf_of`` (the app user, when impersonating)."""

    user: dict[str, Any]
    on_behalf_of: dict[str, Any] | None


class Org:
    """One sandbox's Dataverse: users, tables, records, privileges, limits. Thread-safe (one lock).

    The control API calls the public methods; the Flask app calls the ``_``-free helpers
    documented as "for the app" too, always under the same lock.
    """

    def __init__(self, sandbox: Sandbox, seed: str = "default", users: int = 0) -> None:
        if seed not in ("default", "empty"):
            raise ValueError(f"unknown seed {seed!r}; 'default' or 'empty'")
        self.sandbox = sandbox
        self.lock = threading.RLock()
        self.organization_id = str(uuid.uuid5(_USER_NAMESPACE, f"{sandbox.tenant_id}:organization"))
        self.business_unit_id = str(uuid.uuid5(_USER_NAMESPACE, f"{sandbox.tenant_id}:businessunit"))
        self.impersonation_privilege = True
        self.dop_hint = 4
        self.limits = Limits()
        self.clock: Callable[[], float] = time.monotonic  # the window's clock (tests replace it)
        self._window: deque[_Entry] = deque()
        self._used_ms = 0.0  # running sum of the window's execution times
        self._in_flight = 0
        self._version = 1_000_000
        self._users: dict[str, dict[str, Any]] = {}
        self._ignore_impersonation: set[str] = set()
        self.tables: dict[str, Table] = {}
        self.security = security.Security(self.business_unit_id, self._stable_id, version=self._next_version)
        self.add_entity("contacts", "contactid", [["emailaddress1"]])
        self.add_entity("accounts", "accountid", [["accountnumber"]])
        self.add_entity("leads", "leadid", [])
        self.app_user_id = self._seed_user(
            f"{sandbox.client_id}@devstack.onmicrosoft.com",
            APP_USER_FULLNAME,
            object_id=sandbox.app_object_id,
            application_id=sandbox.client_id,
            access_mode=4,
        )["systemuserid"]
        if seed == "default":
            self._seed_user("jane@contoso.com", "Jane Doe")
            self._seed_user("john@contoso.com", "John Smith")
            self._seed_user("o'brien@contoso.com", "Siobhan O'Brien")
            self._seed_user("disabled@contoso.com", "Dana Disabled", disabled=True)
            self._seed_user("noentra@contoso.com", "Nora Noentra", object_id=None)
            self._seed_user("shared@contoso.com", "Sam Shared", tag="1")
            self._seed_user("shared@contoso.com", "Sasha Shared", tag="2")
        for n in range(1, users + 1):
            self._seed_user(f"actor{n:04d}@contoso.com", f"Actor {n:04d}")

    # --- ids and versions -----------------------------------------------------------------------
    def _stable_id(self, *parts: str) -> str:
        """Deterministic per tenant, so the fixed `default` sandbox has stable, documentable ids."""
        return str(uuid.uuid5(_USER_NAMESPACE, ":".join((self.sandbox.tenant_id, *parts))))

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    # --- users ----------------------------------------------------------------------------------
    def _seed_user(
        self,
        email: str,
        fullname: str,
        *,
        object_id: str | None = "auto",
        disabled: bool = False,
        application_id: str | None = None,
        access_mode: int = 0,
        tag: str = "",
    ) -> dict[str, Any]:
        user_id = self._stable_id("user", email, tag)
        if object_id == "auto":
            object_id = self._stable_id("object", email, tag)
        return self._insert_user(user_id, email, fullname, object_id, disabled, application_id, access_mode)

    def _insert_user(
        self,
        user_id: str,
        email: str | None,
        fullname: str | None,
        object_id: str | None,
        disabled: bool,
        application_id: str | None,
        access_mode: int,
    ) -> dict[str, Any]:
        first, _, last = (fullname or "").partition(" ")
        now = _now_text()
        user = {
            "systemuserid": user_id,
            "internalemailaddress": email,
            "fullname": fullname,
            "firstname": first or None,
            "lastname": last or None,
            "domainname": email,
            "azureactivedirectoryobjectid": object_id,
            "isdisabled": disabled,
            "accessmode": access_mode,
            "applicationid": application_id,
            "_businessunitid_value": self.business_unit_id,
            "createdon": now,
            "modifiedon": now,
            "versionnumber": self._next_version(),
        }
        with self.lock:
            self._users[user_id] = user
        return user

    def add_user(
        self,
        email: str,
        fullname: str | None = None,
        object_id: str | None = "auto",
        disabled: bool = False,
        ignore_impersonation: bool = False,
    ) -> dict[str, Any]:
        """A new user (wire shape). ``ignore_impersonation`` simulates a stale Entra object id."""
        if object_id == "auto":
            object_id = str(uuid.uuid4())
        elif object_id is not None and not _GUID_RE.fullmatch(object_id):
            raise ValueError("object_id must be a GUID, None or 'auto'")
        with self.lock:
            user = self._insert_user(
                str(uuid.uuid4()), email, fullname or email.partition("@")[0], object_id, disabled, None, 0
            )
            if ignore_impersonation:
                self._ignore_impersonation.add(user["systemuserid"])
            return self._wire_user(user)

    def update_user(self, systemuserid: str, **fields: Any) -> dict[str, Any]:
        """Change wire fields (and ``ignore_impersonation``); bumps modifiedon and the version."""
        allowed = set(SYSTEMUSER_FIELDS) - {
            "systemuserid",
            "createdon",
            "modifiedon",
            "_businessunitid_value",
        }
        unknown = set(fields) - allowed - {"ignore_impersonation"}
        if unknown:
            raise ValueError(f"unknown systemuser field(s): {', '.join(sorted(unknown))}")
        with self.lock:
            user = self._users.get(systemuserid.lower())
            if user is None:
                raise KeyError(systemuserid)
            ignore = fields.pop("ignore_impersonation", None)
            if ignore is True:
                self._ignore_impersonation.add(user["systemuserid"])
            elif ignore is False:
                self._ignore_impersonation.discard(user["systemuserid"])
            user.update(fields)
            user["modifiedon"] = _now_text()
            user["versionnumber"] = self._next_version()
            return self._wire_user(user)

    def remove_user(self, systemuserid: str) -> None:
        """Delete a user; KeyError if there is none (the control API answers 404)."""
        with self.lock:
            if self._users.pop(systemuserid.lower(), None) is None:
                raise KeyError(systemuserid)
            self._ignore_impersonation.discard(systemuserid.lower())

    def users_wire(self) -> list[dict[str, Any]]:
        """Every user in the ``systemusers`` wire shape (the application user first)."""
        with self.lock:
            return [self._wire_user(u) for u in self._users.values()]

    @staticmethod
    def _wire_user(user: Mapping[str, Any]) -> dict[str, Any]:
        return {k: user.get(k) for k in SYSTEMUSER_FIELDS}

    # --- roles and teams (devstack/dataverse/security.py) --------------------------------------------
    def roles_wire(self) -> list[dict[str, Any]]:
        return self.security.roles_wire()

    def add_role(self, name: str, roletemplateid: str | None = None) -> dict[str, Any]:
        return self.security.add_role(name, roletemplateid)

    def set_user_roles(self, systemuserid: str, roles: list[str]) -> list[str]:
        """The user's directly assigned roles (role ids) become exactly ``roles``."""
        with self.lock:
            if systemuserid.lower() not in self._users:
                raise KeyError(systemuserid)
        return self.security.set_user_roles(systemuserid, roles)

    def add_team(self, name: str, members: list[str] | None = None, roles: list[str] | None = None,
                 teamtype: int = 0) -> dict[str, Any]:
        with self.lock:
            unknown = [m for m in members or [] if m.lower() not in self._users]
        if unknown:
            raise KeyError(unknown[0])
        return self.security.add_team(name, list(members or []), list(roles or []), teamtype)

    # --- tables ---------------------------------------------------------------------------------
    def add_entity(
        self, entity_set: str, primary_id: str, alternate_keys: list[list[str]] | None = None,
        columns: list[str] | None = None,
    ) -> None:
        """A table with its primary id and alternate keys; its logical name is the id less "id".

        A stock table (STOCK_COLUMNS) knows only the listed columns; ``columns`` and the alternate keys'
        attributes add the customer's own (e.g. ``cr123_externalid``), as a maker adds them to a table.
        """
        extra = frozenset(columns or ())
        if not all(isinstance(c, str) and _IDENT_RE.fullmatch(c) for c in extra):
            raise ValueError("columns must be plain identifiers")
        if not _IDENT_RE.fullmatch(entity_set) or not _IDENT_RE.fullmatch(primary_id):
            raise ValueError("entity_set and primary_id must be plain identifiers")
        if not primary_id.endswith("id") or len(primary_id) < 3:
            raise ValueError("primary_id must be '<logicalname>id'")
        keys = [tuple(k) for k in (alternate_keys or [])]
        for key in keys:
            if not key or not all(_IDENT_RE.fullmatch(a) for a in key) or len(set(key)) != len(key):
                raise ValueError(f"bad alternate key {list(key)!r}")
        with self.lock:
            existing = self.tables.get(entity_set)
            added = extra.union(*keys)
            if existing is not None:
                existing.alternate_keys = keys
                if existing.columns is not None:
                    existing.columns = existing.columns | added
                existing.reindex()
                return
            stock = STOCK_COLUMNS.get(entity_set)
            self.tables[entity_set] = Table(entity_set, primary_id[:-2], primary_id, keys,
                                            columns=None if stock is None else stock | added)

    def records(self, entity_set: str) -> list[dict[str, Any]]:
        """Every record of a table with its system fields (copies)."""
        with self.lock:
            table = self.tables.get(entity_set)
            if table is None:
                raise KeyError(entity_set)
            return [dict(r) for r in table.records.values()]

    # --- settings -------------------------------------------------------------------------------
    def set_limits(
        self,
        requests: int | None = None,
        window_seconds: float | None = None,
        execution_ms: int | None = None,
        concurrent: int | None = None,
        dop_hint: int | None = None,
    ) -> dict[str, Any]:
        """Service-protection limits of the application user (None keeps a value); clears the window."""
        for name, value in (
            ("requests", requests),
            ("window_seconds", window_seconds),
            ("execution_ms", execution_ms),
            ("concurrent", concurrent),
            ("dop_hint", dop_hint),
        ):
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be positive")
        with self.lock:
            if requests is not None:
                self.limits.requests = int(requests)
            if window_seconds is not None:
                self.limits.window_seconds = float(window_seconds)
            if execution_ms is not None:
                self.limits.execution_ms = int(execution_ms)
            if concurrent is not None:
                self.limits.concurrent = int(concurrent)
            if dop_hint is not None:
                self.dop_hint = int(dop_hint)
            for entry in self._window:
                entry.trimmed = True
            self._window.clear()
            self._used_ms = 0.0
            return {**self.limits.__dict__, "dop_hint": self.dop_hint}

    def set_privilege(self, impersonation: bool) -> None:
        """Grant or remove prvActOnBehalfOfAnotherUser on the application user."""
        with self.lock:
            self.impersonation_privilege = bool(impersonation)

    # --- service protection (for the app) ------------------------------------------------------
    @contextlib.contextmanager
    def in_flight(self) -> Iterator[int]:
        """Count a request as concurrent from arrival (injected latency included) to its answer."""
        with self.lock:
            self._in_flight += 1
            current = self._in_flight
        try:
            yield current
        finally:
            with self.lock:
                self._in_flight -= 1

    def _trim(self, now: float) -> None:
        horizon = now - self.limits.window_seconds
        while self._window and self._window[0].at <= horizon:
            entry = self._window.popleft()
            entry.trimmed = True
            self._used_ms -= entry.ms

    def admit(self, concurrent_at_arrival: int) -> _Entry:
        """Admit a request into the window or raise the 429 Dataverse would answer (not executed).

        A refused request still counts as one the user sent: a client that keeps sending while
        throttled sees ``Retry-After`` grow ("If the application continues to send such demanding
        requests, the duration will be extended" — Learn, Service protection API limits), while one
        that waits as told is admitted when the wait is over.
        """
        now = self.clock()
        limits = self.limits
        with self.lock:
            self._trim(now)
            entry = _Entry(now)
            self._window.append(entry)
            if concurrent_at_arrival > limits.concurrent:
                raise _throttled(
                    CODE_LIMIT_CONCURRENCY,
                    f"Number of concurrent requests exceeded the limit of {limits.concurrent}.",
                    1.0,
                )
            if len(self._window) > limits.requests:
                # Admitted again once enough of the window (this request included) has aged out.
                leaving = self._window[len(self._window) - limits.requests]
                raise _throttled(
                    CODE_LIMIT_REQUESTS,
                    f"Number of requests exceeded the limit of {limits.requests} over time window of "
                    f"{_seconds(limits.window_seconds)} seconds.",
                    leaving.at + limits.window_seconds - now,
                )
            used = self._used_ms
            if used >= limits.execution_ms:
                wait = self._window[-1].at + limits.window_seconds - now
                for old in self._window:
                    used -= old.ms
                    if used < limits.execution_ms:
                        wait = old.at + limits.window_seconds - now
                        break
                raise _throttled(
                    CODE_LIMIT_TIME,
                    f"Combined execution time of incoming requests exceeded limit of {limits.execution_ms:,} "
                    f"milliseconds over time window of {_seconds(limits.window_seconds)} seconds. Decrease "
                    "number of concurrent requests or reduce the duration of requests and try again later.",
                    wait,
                )
            return entry

    def finish(self, entry: _Entry, started: float) -> None:
        with self.lock:
            entry.ms = (time.monotonic() - started) * 1000.0
            if not entry.trimmed:
                self._used_ms += entry.ms

    def remaining(self) -> tuple[int, float]:
        """(requests, execution ms) left in the window: the x-ms-ratelimit-* debugging headers."""
        with self.lock:
            self._trim(self.clock())
            used = self._used_ms
            return max(self.limits.requests - len(self._window), 0), max(self.limits.execution_ms - used, 0.0)

    # --- callers (for the app) ------------------------------------------------------------------
    def resolve_caller(self, appid: str, caller_object_id: str | None, caller_id: str | None) -> Caller:
        """The effective user of a request, applying Dataverse's impersonation rules.

        When a request carries both headers, ``MSCRMCallerID`` is used.  Dataverse documents no
        precedence; this follows the only public statement of one, Microsoft's own ServiceClient,
        which "prefers the Caller ID over the AADObjectID" and then sends ``MSCRMCallerID`` alone
        [inferred].  A client should never send both: the ``caller:*`` counters show when it does.
        """
        if caller_id is not None and caller_id.strip():
            caller_object_id = None
        with self.lock:
            app_user = next(
                (u for u in self._users.values() if (u.get("applicationid") or "").lower() == appid.lower()),
                None,
            )
            if app_user is None:
                raise DataverseError(403, CODE_NOT_MEMBER, "The user is not a member of the organization.")
            if app_user["isdisabled"]:
                raise DataverseError(400, CODE_USER_DISABLED, self._disabled_message(app_user))
            requested = caller_object_id if caller_object_id is not None else caller_id
            if requested is None or not requested.strip():
                return Caller(dict(app_user), None)
            wanted = requested.strip().lower()
            field_name = "azureactivedirectoryobjectid" if caller_object_id is not None else "systemuserid"
            if (app_user.get(field_name) or "").lower() == wanted:
                return Caller(dict(app_user), None)  # impersonating yourself: no on-behalf-of
            if not self.impersonation_privilege:
                raise DataverseError(
                    403, CODE_NO_DELEGATE, "User does not have the privilege to act on behalf another user."
                )
            target = next(
                (u for u in self._users.values() if (u.get(field_name) or "").lower() == wanted), None
            )
            if target is None or target["systemuserid"] in self._ignore_impersonation:
                self.sandbox.counters.count(SERVICE, "impersonation:ignored")
                return Caller(dict(app_user), None)  # silently runs as the caller [obs]
            if target["isdisabled"]:
                raise DataverseError(400, CODE_USER_DISABLED, self._disabled_message(target))
            self.sandbox.counters.count(SERVICE, "impersonation:applied")
            return Caller(dict(target), dict(app_user))

    def _disabled_message(self, user: Mapping[str, Any]) -> str:
        return (
            f"The user with SystemUserId={user['systemuserid']} in "
            f"OrganizationContext={self.organization_id} "
            "is disabled. Disabled users cannot access the system. Consider enabling this user. Also, users "
            "are disabled if they don't have a license assigned to them."
        )

    def user_rows(self) -> list[dict[str, Any]]:
        """For the app: users with their version, ordered by id (the paging order)."""
        with self.lock:
            return sorted((dict(u) for u in self._users.values()), key=lambda u: u["systemuserid"])

    # --- record writes (for the app) -------------------------------------------------------------
    def find(self, table: Table, key: str | dict[str, odata.Value]) -> dict[str, Any] | None:
        with self.lock:
            if isinstance(key, str):
                return table.records.get(key)
            defined = table.key_for(set(key))
            if defined is None:
                return None
            rid = table.holder(defined, tuple(_norm_key(key[a]) for a in defined))
            return table.records.get(rid) if rid is not None else None

    def _check_unique(self, table: Table, record: Mapping[str, Any]) -> None:
        for key in table.alternate_keys:
            values = table.key_values(key, record)
            holder = table.holder(key, values) if values is not None else None
            if holder is not None and holder != record[table.primary_id]:
                raise DataverseError(
                    412,
                    CODE_DUPLICATE_KEY,
                    f"Entity Key {table.key_name(key)} violated. A record with the same value for "
                    f"{','.join(key)} already exists. A duplicate record cannot be created. Select one or "
                    "more unique values and try again.",
                )

    def create(
        self, table: Table, data: Mapping[str, Any], caller: Caller, record_id: str | None
    ) -> dict[str, Any]:
        with self.lock:
            rid = record_id or str(uuid.uuid4())
            if rid in table.records:
                # A create naming an id that exists ([obs] in SDK faults; the If-None-Match: * upsert
                # guard answers "A record with matching key values already exists." instead).
                raise DataverseError(412, CODE_DUPLICATE, "Cannot insert duplicate key.")
            now = _now_text()
            on_behalf = caller.on_behalf_of["systemuserid"] if caller.on_behalf_of else None
            record: dict[str, Any] = {table.primary_id: rid, **data}
            record.update(
                {
                    table.primary_id: rid,
                    "createdon": now,
                    "modifiedon": now,
                    "_createdby_value": caller.user["systemuserid"],
                    "_modifiedby_value": caller.user["systemuserid"],
                    "_createdonbehalfby_value": on_behalf,
                    "_modifiedonbehalfby_value": on_behalf,
                    "_ownerid_value": caller.user["systemuserid"],
                    "versionnumber": self._next_version(),
                }
            )
            self._check_unique(table, record)
            table.records[rid] = record
            table.index_add(record)
            self._journal_write(table, rid, None)
            return dict(record)

    def update(
        self, table: Table, record: dict[str, Any], data: Mapping[str, Any], caller: Caller
    ) -> dict[str, Any]:
        with self.lock:
            candidate = {**record, **data}
            candidate.update(
                {
                    table.primary_id: record[table.primary_id],
                    "modifiedon": _now_text(),
                    "_modifiedby_value": caller.user["systemuserid"],
                    "_modifiedonbehalfby_value": (
                        caller.on_behalf_of["systemuserid"] if caller.on_behalf_of else None
                    ),
                    "versionnumber": self._next_version(),
                }
            )
            self._check_unique(table, candidate)
            self._journal_write(table, record[table.primary_id], dict(record))
            table.index_remove(record)
            record.clear()
            record.update(candidate)
            table.index_add(record)
            return dict(record)

    def delete(self, table: Table, record: Mapping[str, Any]) -> None:
        with self.lock:
            self._journal_write(table, record[table.primary_id], dict(record))
            table.index_remove(record)
            table.records.pop(record[table.primary_id], None)


    # --- transactions (for devstack.dataverse.bulk: all-or-nothing bulk messages and $batch change sets) ----
    journal: list[tuple[Table, str, dict[str, Any] | None]] | None = None

    def _journal_write(self, table: Table, record_id: str, before: dict[str, Any] | None) -> None:
        """Inside a transaction, remember a record's state before a write (None: it did not exist)."""
        if self.journal is not None:
            self.journal.append((table, record_id, before))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _throttled(code: str, message: str, wait: float) -> DataverseError:
    return DataverseError(429, code, message, {"Retry-After": str(max(1, math.ceil(wait)))})
