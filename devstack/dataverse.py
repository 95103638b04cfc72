"""Dataverse Web API emulator: one ``Org`` per sandbox, one Flask app for all of them.

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
in ``devstack.bulk`` (dispatched from ``_Request.dispatch``).

Counters (per sandbox, ``dataverse``): ``<METHOD> <resource>`` and ``status:<code>`` per request,
``caller:CallerObjectId`` / ``caller:MSCRMCallerID`` per write that carried that header,
``impersonation:applied`` / ``impersonation:ignored``, ``cookie:ARRAffinity`` when a client sent
the affinity cookie back.  A ``systemusers(<id>)?$expand=`` retrieve (roles and teams,
devstack/security.py) counts as ``GET systemusers $expand``, not as a ``GET systemusers`` lookup.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import jwt
from flask import Flask, Response, request

from devstack import odata, security, web
from devstack.sandboxes import DEFAULT_TENANT_ID, Registry, Sandbox

SERVICE = "dataverse"
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
# Counted per write as received (``caller:<header>``), whatever the emulator then makes of them.
CALLER_HEADERS = ("CallerObjectId", "MSCRMCallerID")
MAX_PAGE_SIZE = 5000
JSON_TYPE = "application/json; odata.metadata=minimal"
APP_USER_FULLNAME = "# dataverse-s2s (application)"
_USER_NAMESPACE = uuid.UUID("6f1c2a0e-5d7b-4c8e-9a4f-3b2d1e0c9f8a")
_VERSION_RE = re.compile(r"v[0-9]+\.[0-9]+")
_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_SAFE = "=,'@"  # left as they are in a key segment written back into a URL
_PAYLOAD_HELP = (
    "Error identified in Payload provided by the user for Entity :'{entity_set}', For more information on "
    "this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ---->  "
    "InnerException : Microsoft.OData.ODataException: {inner}"
)

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

    # --- roles and teams (devstack/security.py) ------------------------------------------------------
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


    # --- transactions (for devstack.bulk: all-or-nothing bulk messages and $batch change sets) ----
    journal: list[tuple[Table, str, dict[str, Any] | None]] | None = None

    def _journal_write(self, table: Table, record_id: str, before: dict[str, Any] | None) -> None:
        """Inside a transaction, remember a record's state before a write (None: it did not exist)."""
        if self.journal is not None:
            self.journal.append((table, record_id, before))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _throttled(code: str, message: str, wait: float) -> DataverseError:
    return DataverseError(429, code, message, {"Retry-After": str(max(1, math.ceil(wait)))})


# =============================================================================================
# The Flask app


@dataclass
class _Query:
    select: list[str] | None
    filter: odata.Expr | None
    top: int | None
    count: bool
    skiptoken: str | None
    raw: dict[str, str]


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False).encode()


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status=status, content_type=JSON_TYPE)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _etag(record: Mapping[str, Any]) -> str:
    return f'W/"{record["versionnumber"]}"'


def _raw_path() -> str:
    """The request path as sent, still percent-encoded (PATH_INFO has %2F decoded already)."""
    raw = request.environ.get("REQUEST_URI") or request.environ.get("RAW_URI")
    if not raw:
        return quote(request.path)
    raw = raw.split("?", 1)[0]
    if "://" in raw:
        raw = urlsplit(raw).path
    return str(raw)


def _unverified_tenant(token: str | None) -> str | None:
    """The ``tid`` of any JWT, only to attribute counters of a request that will get a 401."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    tid = claims.get("tid") if isinstance(claims, dict) else None
    return tid if isinstance(tid, str) else None


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _prefer() -> dict[str, str]:
    prefs: dict[str, str] = {}
    for header in request.headers.getlist("Prefer"):
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name:
                prefs[name.strip().lower()] = value.strip().strip('"')
    return prefs


class _Request:
    """One request against one sandbox's org; methods raise DataverseError for error answers."""

    def __init__(
        self, org: Org, base: str, version: str, resource: odata.ResourcePath, caller: Caller,
        appid: str = "",
    ) -> None:
        self.appid = appid  # the calling application: $batch resolves each part's own caller header
        self.org = org
        self.base = base
        self.version = version
        self.resource = resource
        self.caller = caller
        self.method = request.method.upper()
        self.prefer = _prefer()
        self.applied: list[str] = []

    # --- shared helpers -------------------------------------------------------------------------
    @property
    def api(self) -> str:
        return f"{self.base}/api/data/{self.version}"

    def context(self, tail: str) -> str:
        return f"{self.api}/$metadata#{tail}"

    def not_supported(self, what: str) -> DataverseError:
        return DataverseError(
            501, CODE_ODATA, f"{what} is not implemented by the devstack Dataverse emulator."
        )

    def method_not_allowed(self) -> DataverseError:
        return DataverseError(
            405, CODE_ODATA, f"The requested resource does not support http method '{self.method}'."
        )

    def query(
        self, known: set[str] | None, type_name: str, type_of: Callable[[str], str | None] | None = None,
        *, expand: bool = False,
    ) -> _Query:
        args = request.args
        for name in args:
            if expand and name == "$expand":
                continue  # the caller handles it (devstack/security.py)
            if name in (
                "$orderby",
                "$expand",
                "$apply",
                "$search",
                "$compute",
                "fetchXml",
                "savedQuery",
                "userQuery",
            ):
                raise self.not_supported(f"The query option {name}")
            if name == "$skip":
                raise DataverseError(400, CODE_ODATA, "The query parameter $skip is not supported")
            if name.startswith("$") and name not in ("$select", "$filter", "$top", "$count", "$skiptoken"):
                raise DataverseError(400, CODE_ODATA, f"The query parameter '{name}' is not supported.")
        try:
            select = odata.parse_select(args["$select"]) if "$select" in args else None
            expr = odata.parse_filter(args["$filter"]) if "$filter" in args else None
            if expr is not None and type_of is not None:
                odata.check_types(expr, type_of)
        except odata.ODataSyntaxError as err:
            raise DataverseError(400, err.code, err.message) from err
        if known is not None:
            for prop in [*(select or []), *(odata.properties(expr) if expr else [])]:
                if prop not in known:
                    raise DataverseError(
                        400, CODE_ODATA, f"Could not find a property named '{prop}' on type '{type_name}'."
                    )
        top: int | None = None
        if "$top" in args:
            text = args["$top"]
            if not text.isdigit():
                raise DataverseError(400, CODE_ODATA, f"Invalid value '{text}' for $top query option found.")
            top = int(text)
        count_text = args.get("$count", "false").lower()
        if count_text not in ("true", "false"):
            raise DataverseError(400, CODE_ODATA, f"'{args['$count']}' is not a valid count option.")
        return _Query(select, expr, top, count_text == "true", args.get("$skiptoken"), dict(args))

    def page_size(self) -> int:
        text = self.prefer.get("odata.maxpagesize")
        if text is None:
            return MAX_PAGE_SIZE
        if not text.isdigit() or int(text) <= 0:
            raise DataverseError(400, CODE_ODATA, f"The value '{text}' is not valid for odata.maxpagesize.")
        size = min(int(text), MAX_PAGE_SIZE)
        self.applied.append(f"odata.maxpagesize={size}")
        return size

    def shape(self, record: Mapping[str, Any], select: list[str] | None, primary: str) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": _etag(record)}
        fields = select if select is not None else list(record)
        for name in fields:
            out[name] = record.get(name)
        if primary not in out:
            out[primary] = record.get(primary)
        return out

    def collection(self, rows: list[dict[str, Any]], q: _Query, primary: str, set_name: str) -> Response:
        """Filter, page by an opaque paging cookie over the primary id, shape: one GET answer.

        ``$top`` limits the answer unless ``Prefer: odata.maxpagesize`` is sent too: then, as Learn
        ("Page results using OData") says, ``$top`` is ignored and the answer is paged.
        """
        matches = [r for r in rows if q.filter is None or odata.evaluate(q.filter, r)]
        matches.sort(key=lambda r: str(r[primary]))
        total = len(matches)
        next_link = None
        if q.top is not None and "odata.maxpagesize" not in self.prefer:
            page = matches[: q.top]
        else:
            size = self.page_size()
            page_number = 1
            if q.skiptoken is not None:
                page_number, last = _read_skiptoken(q.skiptoken, primary)
                matches = [r for r in matches if str(r[primary]) > last]
            page = matches[:size]
            if len(matches) > size:
                token = _make_skiptoken(
                    page_number + 1, primary, str(page[-1][primary]), str(page[0][primary])
                )
                next_link = f"{self.api}/{set_name}?{_query_without_skiptoken()}$skiptoken={token}"
        cols = f"({','.join(q.select)})" if q.select else ""
        body: dict[str, Any] = {"@odata.context": self.context(f"{set_name}{cols}")}
        if q.count:
            body["@odata.count"] = min(total, MAX_PAGE_SIZE)
        body["value"] = [self.shape(r, q.select, primary) for r in page]
        if next_link:
            body["@odata.nextLink"] = next_link
        return _json(200, body)

    def single(
        self,
        record: Mapping[str, Any],
        select: list[str] | None,
        primary: str,
        set_name: str,
        status: int = 200,
    ) -> Response:
        cols = f"({','.join(select)})" if select else ""
        body = {
            "@odata.context": self.context(f"{set_name}{cols}/$entity"),
            **self.shape(record, select, primary),
        }
        return _json(status, body, {"ETag": _etag(record)})

    # --- resources ------------------------------------------------------------------------------
    def whoami(self) -> Response:
        if self.method != "GET" or self.resource.key is not None or self.resource.rest:
            raise DataverseError(
                404, "", f"No HTTP resource was found that matches the request URI '{request.url}'."
            )
        return _json(
            200,
            {
                "@odata.context": self.context("Microsoft.Dynamics.CRM.WhoAmIResponse"),
                "BusinessUnitId": self.org.business_unit_id,
                "UserId": self.caller.user["systemuserid"],
                "OrganizationId": self.org.organization_id,
            },
        )

    def systemusers(self) -> Response:
        if self.method != "GET":
            raise self.not_supported(f"{self.method} on systemusers")
        if self.resource.rest:
            raise DataverseError(
                404, CODE_SEGMENT, f"Resource not found for the segment '{self.resource.rest}'."
            )
        q = self.query(set(SYSTEMUSER_FIELDS), "Microsoft.Dynamics.CRM.systemuser", SYSTEMUSER_TYPES.get,
                       expand=self.resource.key is not None)
        rows = self.org.user_rows()
        if self.resource.key is None:
            return self.collection(rows, q, "systemuserid", "systemusers")
        key = self.parse_key(self.resource.key)
        if isinstance(key, dict):
            if set(key) != {"systemuserid"}:
                raise DataverseError(
                    400,
                    CODE_ODATA,
                    "The specified key attributes are not a defined key for the systemuser entity",
                )
            key = str(_norm_key(key["systemuserid"]))
        user = next((u for u in rows if u["systemuserid"] == key), None)
        if user is None:
            raise DataverseError(404, CODE_NOT_FOUND, f"systemuser With Id = {key} Does Not Exist")
        if "$expand" in request.args:
            return self.expanded_user(user, q.select, request.args["$expand"])
        return self.single(user, q.select, "systemuserid", "systemusers")

    def expanded_user(self, user: Mapping[str, Any], select: list[str] | None, text: str) -> Response:
        """A user with its roles / teams (``devstack/security.py``): the one ``$expand`` the app sends."""
        try:
            items = security.parse_expand(text)
        except security.ExpandError as err:
            if err.status == 501:
                raise self.not_supported(err.message) from None
            raise DataverseError(err.status, CODE_ODATA, err.message) from None
        body = {
            "@odata.context": self.context(f"systemusers{security.context_columns(select, items)}/$entity"),
            **self.shape(user, select, "systemuserid"),
            **self.org.security.expand("systemuser", str(user["systemuserid"]), items),
        }
        return _json(200, body, {"ETag": _etag(user)})

    def parse_key(self, text: str) -> str | dict[str, odata.Value]:
        try:
            return odata.parse_key(text)
        except odata.ODataSyntaxError as err:
            raise DataverseError(400, err.code, err.message) from err

    def entity_definitions(self) -> Response:
        if self.method != "GET":
            raise self.not_supported(f"{self.method} on EntityDefinitions")
        definitions = [t.definition() for t in self.org.tables.values()]
        known = set(definitions[0]) if definitions else set()
        if self.resource.key is None:
            if self.resource.rest:
                raise DataverseError(
                    404, CODE_SEGMENT, f"Resource not found for the segment '{self.resource.rest}'."
                )
            q = self.query(known, "Microsoft.Dynamics.CRM.EntityMetadata")
            matches = [d for d in definitions if q.filter is None or odata.evaluate(q.filter, d)]
            cols = f"({','.join(q.select)})" if q.select else ""
            value = [
                {k: d[k] for k in (q.select or list(d))} | {"MetadataId": d["MetadataId"]} for d in matches
            ]
            return _json(200, {"@odata.context": self.context(f"EntityDefinitions{cols}"), "value": value})
        key = self.parse_key(self.resource.key)
        table = next(
            (
                t
                for t in self.org.tables.values()
                if (isinstance(key, str) and t.metadata_id == key)
                or (
                    isinstance(key, dict)
                    and set(key) == {"LogicalName"}
                    and _norm_key(key["LogicalName"]) == t.logical_name
                )
            ),
            None,
        )
        if table is None:
            raise DataverseError(
                404, CODE_NOT_FOUND, f"Could not find entity with key '{self.resource.key}'."
            )
        rest = self.resource.rest
        if rest == "":
            return _json(
                200, {"@odata.context": self.context("EntityDefinitions/$entity"), **table.definition()}
            )
        if rest in (
            "Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
            "Attributes/Microsoft.Dynamics.CRM.StatusAttributeMetadata",
            "Attributes/Microsoft.Dynamics.CRM.StateAttributeMetadata",
        ):
            # The emulator's tables have no option sets: an empty list is the true answer.
            kind = rest.rsplit(".", 1)[1]
            return _json(
                200,
                {
                    "@odata.context": self.context(
                        f"EntityDefinitions('{table.metadata_id}')/Attributes/Microsoft.Dynamics.CRM.{kind}"
                    ),
                    "value": [],
                },
            )
        if rest == "Keys":
            keys = [
                {
                    "LogicalName": table.key_name(k),
                    "SchemaName": table.key_name(k),
                    "KeyAttributes": list(k),
                    "EntityKeyIndexStatus": "Active",
                    "EntityLogicalName": table.logical_name,
                }
                for k in table.alternate_keys
            ]
            return _json(
                200,
                {
                    "@odata.context": self.context(f"EntityDefinitions('{table.metadata_id}')/Keys"),
                    "value": keys,
                },
            )
        raise self.not_supported(f"EntityDefinitions/{rest}")

    # --- entity sets ----------------------------------------------------------------------------
    def entity_set(self, table: Table) -> Response:
        if self.resource.rest:
            raise self.not_supported(f"The path segment '{self.resource.rest}'")
        if self.resource.key is None:
            if self.method == "GET":
                return self.collection(
                    self.org.records(table.entity_set),
                    self.query(None, "", table.type_of),
                    table.primary_id,
                    table.entity_set,
                )
            if self.method == "POST":
                return self.post(table)
            raise self.method_not_allowed()
        target = self.target(table, self.resource.key)
        if self.method == "GET":
            return self.get_one(table, target)
        if self.method == "PATCH":
            return self.patch(table, target)
        if self.method == "DELETE":
            return self.delete(table, target)
        raise self.method_not_allowed()

    def target(self, table: Table, text: str) -> str | dict[str, odata.Value]:
        key = self.parse_key(text)
        if isinstance(key, str):
            return key
        if set(key) == {table.primary_id}:
            value = key[table.primary_id]
            if isinstance(value, odata.Guid):
                return value.value
            raise DataverseError(400, CODE_ODATA, f"Invalid value for the primary key '{table.primary_id}'.")
        if table.key_for(set(key)) is None:
            raise DataverseError(
                400,
                CODE_ODATA,
                f"The specified key attributes are not a defined key for the {table.logical_name} entity",
            )
        return key

    def missing(self, table: Table, target: str | dict[str, odata.Value]) -> DataverseError:
        if isinstance(target, str):
            return DataverseError(
                404, CODE_NOT_FOUND, f"{table.logical_name} With Id = {target} Does Not Exist"
            )
        return DataverseError(
            404,
            CODE_KEY_NOT_FOUND,
            f"A record with the specified key values does not exist in {table.logical_name} entity",
        )

    def get_one(self, table: Table, target: str | dict[str, odata.Value]) -> Response:
        q = self.query(None, "")
        record = self.org.find(table, target)
        if record is None:
            raise self.missing(table, target)
        record = dict(record)
        if request.headers.get("If-None-Match") == _etag(record):
            return Response(status=304, headers={"ETag": _etag(record)})
        return self.single(record, q.select, table.primary_id, table.entity_set)

    def body(self, table: Table) -> dict[str, Any]:
        """The JSON object of a write, validated like Dataverse's payload reader."""

        def bad(inner: str) -> DataverseError:
            return DataverseError(
                400, CODE_PAYLOAD, _PAYLOAD_HELP.format(entity_set=table.entity_set, inner=inner)
            )

        try:
            data = json.loads(request.get_data(cache=True) or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise bad(f"Invalid JSON. {err}") from err
        return self.payload(table, data)

    def payload(self, table: Table, data: object) -> dict[str, Any]:
        """An entity's JSON object validated like Dataverse's payload reader (also each bulk target)."""

        def bad(inner: str) -> DataverseError:
            return DataverseError(
                400, CODE_PAYLOAD, _PAYLOAD_HELP.format(entity_set=table.entity_set, inner=inner)
            )

        if not isinstance(data, dict):
            raise bad("A JSON object was expected for an entity.")
        out: dict[str, Any] = {}
        for name, value in data.items():
            if name.endswith("@odata.bind"):
                nav = name[: -len("@odata.bind")]
                guid = _GUID_RE.search(value) if isinstance(value, str) else None
                if not _IDENT_RE.fullmatch(nav) or guid is None:
                    raise bad(f"The value of the annotation '{name}' is not a valid entity reference.")
                out[f"_{nav.lower()}_value"] = guid.group(0).lower()
                continue
            if "@" in name:
                continue  # other instance annotations are ignored, as Dataverse does
            if name in ("createdon", "modifiedon"):
                continue  # system-managed columns every table has: Dataverse ignores them
            if (
                not _IDENT_RE.fullmatch(name)
                or name == "versionnumber"
                or (name.startswith("_") and name.endswith("_value"))
                or (table.columns is not None and name not in table.columns)
            ):
                raise bad(
                    f"The property '{name}' does not exist on type "
                    f"'Microsoft.Dynamics.CRM.{table.logical_name}'. Make sure to only use property names "
                    "that are defined by the type or mark the type as open type."
                )
            if isinstance(value, dict | list):
                raise bad(f"The property '{name}' has a value of an unexpected kind.")
            out[name] = value
        return out

    def representation(self, table: Table, record: Mapping[str, Any], status: int) -> Response:
        """201/200 with the record, ETag and Preference-Applied, and no OData-EntityId (Learn's
        upsert and update-with-data-returned examples): the id is in the body."""
        q = self.query(None, "")
        self.applied.append("return=representation")
        return self.single(record, q.select, table.primary_id, table.entity_set, status=status)

    def entity_id(self, table: Table, record: Mapping[str, Any]) -> str:
        """The OData-EntityId of a 204: the record as the request addressed it, so an upsert by
        alternate key answers ``example_records(example_key1=2,example_key2=2)``, not the GUID
        (Learn, "Use Upsert to create or update a record")."""
        target = self.resource.key
        if target is not None:
            key = self.parse_key(target)
            if isinstance(key, dict) and set(key) != {table.primary_id}:
                inner = ",".join(f"{name}={odata.key_value_text(value)}" for name, value in key.items())
                return f"{self.api}/{table.entity_set}({quote(inner, safe=_KEY_SAFE)})"
        return f"{self.api}/{table.entity_set}({record[table.primary_id]})"

    def written(self, table: Table, record: Mapping[str, Any], status_with_body: int) -> Response:
        if self.prefer.get("return") == "representation":
            return self.representation(table, record, status_with_body)
        return Response(
            status=204,
            headers={"OData-EntityId": self.entity_id(table, record), "ETag": _etag(record)},
        )

    def post(self, table: Table) -> Response:
        data = self.body(table)
        given = data.pop(table.primary_id, None)
        record_id = None
        if given is not None:
            record_id = _lower_guid(given)
            if record_id is None:
                raise DataverseError(
                    400,
                    CODE_PAYLOAD,
                    _PAYLOAD_HELP.format(
                        entity_set=table.entity_set,
                        inner=f"Cannot convert the literal '{given}' to the expected type 'Edm.Guid'.",
                    ),
                )
        record = self.org.create(table, data, self.caller, record_id)
        return self.written(table, record, 201)

    def check_if_match(
        self, table: Table, target: str | dict[str, odata.Value], record: Mapping[str, Any] | None
    ) -> None:
        if_match = request.headers.get("If-Match")
        if if_match is None:
            return
        if record is None:
            raise self.missing(table, target)
        if if_match.strip() != "*" and _etag(record) not in [t.strip() for t in if_match.split(",")]:
            raise DataverseError(
                412,
                CODE_VERSION_MISMATCH,
                "The version of the existing record doesn't match the RowVersion property provided.",
            )

    def patch(self, table: Table, target: str | dict[str, odata.Value]) -> Response:
        data = self.body(table)
        given = data.pop(table.primary_id, None)
        with self.org.lock:
            record = self.org.find(table, target)
            self.check_if_match(table, target, record)
            if record is not None:
                if request.headers.get("If-None-Match", "").strip() == "*":
                    raise DataverseError(
                        412, CODE_DUPLICATE, "A record with matching key values already exists."
                    )
                if given is not None and _lower_guid(given) != record[table.primary_id]:
                    raise DataverseError(
                        400,
                        CODE_PAYLOAD,
                        _PAYLOAD_HELP.format(
                            entity_set=table.entity_set,
                            inner="The primary key in the payload does not match the URL.",
                        ),
                    )
                if isinstance(target, dict):
                    # Key values in the body are dropped: a record's alternate key cannot be changed
                    # through that same key (Learn, "Use Upsert to create or update a record").
                    data = {name: value for name, value in data.items() if name not in target}
                updated = self.org.update(table, record, data, self.caller)
                return self.written(table, updated, 200)
            if isinstance(target, str):
                record_id: str | None = target
            else:
                record_id = _lower_guid(given) if given is not None else None
                # The URL's key values fill in only what the body lacks: body values win, even
                # when they differ (same source).
                for name, value in target.items():
                    data.setdefault(name, value.value if isinstance(value, odata.Guid) else value)
            created = self.org.create(table, data, self.caller, record_id)
            return self.written(table, created, 201)

    def delete(self, table: Table, target: str | dict[str, odata.Value]) -> Response:
        with self.org.lock:
            record = self.org.find(table, target)
            if record is None:
                raise self.missing(table, target)
            self.check_if_match(table, target, record)
            self.org.delete(table, record)
        return Response(status=204)

    def dispatch(self) -> Response:
        name = self.resource.name
        if name == "WhoAmI":
            return self.whoami()
        if name == "systemusers":
            return self.systemusers()
        if name == "EntityDefinitions":
            return self.entity_definitions()
        if name in ("$batch", "sdkmessagefilters"):
            from devstack import bulk  # bulk messages and $batch live in their own module

            return bulk.batch(self) if name == "$batch" else bulk.sdkmessagefilters(self)
        table = self.org.tables.get(name)
        if table is None:
            raise DataverseError(404, CODE_SEGMENT, f"Resource not found for the segment '{name}'.")
        if self.resource.key is None and self.resource.rest.startswith("Microsoft.Dynamics.CRM."):
            from devstack import bulk

            return bulk.bulk_message(self, table, self.resource.rest.removeprefix("Microsoft.Dynamics.CRM."))
        return self.entity_set(table)


# --- paging cookies ----------------------------------------------------------------------------


def _query_without_skiptoken() -> str:
    """The query as the client sent it (still encoded), less any $skiptoken, ending in ``&`` if any."""
    raw = request.query_string.decode("latin-1")
    kept = [part for part in raw.split("&") if part and unquote(part.partition("=")[0]) != "$skiptoken"]
    return "".join(f"{part}&" for part in kept)


def _quote_lower(text: str) -> str:
    """Percent-encode everything but letters, digits and ``_.-~``, with lower-case hex digits."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(text, safe=""))


def _make_skiptoken(page_number: int, primary: str, last: str, first: str) -> str:
    """A $skiptoken exactly as Dataverse writes one (Learn, "Page results using OData"): an encoded
    ``<cookie>`` whose ``pagingcookie`` attribute holds the previous page's cookie, encoded once more
    with lower-case hex, the ids upper case in braces.  The server decodes the query once, so a link
    decoded (its two layers then collapse when re-encoded) or encoded again on the way no longer
    parses: the link must be followed verbatim."""
    inner = (
        f'<cookie page="{page_number - 1}"><{primary} last="{{{last.upper()}}}" '
        f'first="{{{first.upper()}}}" /></cookie>'
    )
    cookie = f'<cookie pagenumber="{page_number}" pagingcookie="{_quote_lower(inner)}" istracking="False" />'
    return quote(cookie, safe="=/")


def _read_skiptoken(token: str, primary: str) -> tuple[int, str]:
    bad = DataverseError(400, CODE_ODATA, "The $skiptoken value is not valid.")
    m = re.fullmatch(r'<cookie pagenumber="([0-9]+)" pagingcookie="([^"<>]*)" istracking="False" />', token)
    if not m:
        raise bad
    inner = unquote(m.group(2))
    last = re.search(rf'<{re.escape(primary)} last="\{{({_GUID_RE.pattern})\}}"', inner)
    if not last:
        raise bad
    return int(m.group(1)), last.group(1).lower()


# --- the WSGI side -----------------------------------------------------------------------------


# One emulated web server: its affinity cookie has one value, as a real server's does.
_AFFINITY = uuid.uuid4().hex + uuid.uuid4().hex
_COOKIE_TAIL = "path=/; secure; HttpOnly"


def _common_headers(response: Response, org: Org | None) -> Response:
    """Headers every Dataverse answer carries (a real capture: Learn, "Use PowerShell and Visual Studio
    Code with the Dataverse Web API", Fiddler section): request ids, the dop hint, the debugging
    ``x-ms-ratelimit-*`` pair (time in SECONDS, formatted ``1,199.46``) and three cookies."""
    request_id = str(uuid.uuid4())
    response.headers["OData-Version"] = "4.0"
    response.headers["REQ_ID"] = request_id
    response.headers["x-ms-service-request-id"] = request_id
    if org is not None:
        requests_left, ms_left = org.remaining()
        response.headers["x-ms-dop-hint"] = str(org.dop_hint)
        response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(requests_left)
        response.headers["x-ms-ratelimit-time-remaining-xrm-requests"] = f"{ms_left / 1000.0:,.2f}"
    # Server affinity, as Azure's front end sets it; clients that want throughput drop it.
    response.headers.add("Set-Cookie", f"ARRAffinity={_AFFINITY}; {_COOKIE_TAIL}")
    expires = (datetime.now(UTC) + timedelta(days=365 * 50)).strftime("%a, %d-%b-%Y %H:%M:%S GMT")
    response.headers.add("Set-Cookie", f"ReqClientId={uuid.uuid4()}; expires={expires}; {_COOKIE_TAIL}")
    if org is not None:
        response.headers.add("Set-Cookie", f"orgId={org.organization_id}; expires={expires}; {_COOKIE_TAIL}")
    return response


def _error_response(err: DataverseError) -> Response:
    response = Response(_error_body(err.code, err.message), status=err.status, content_type=JSON_TYPE)
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def _unauthorized(tenant_id: str | None, resource: str) -> Response:
    """Empty 401 naming the environment's tenant: clients (ServiceClient, XrmToolBox) discover the
    tenant from it, so it is never ``common``.  A request with no token names no sandbox, so the
    `default` sandbox's tenant stands in (as for the Key Vault challenge)."""
    response = Response(b"", status=401)
    response.headers["WWW-Authenticate"] = (
        f"Bearer authorization_uri=https://login.microsoftonline.com/{tenant_id or DEFAULT_TENANT_ID}"
        "/oauth2/authorize, "
        f"resource_id={resource.rstrip('/')}/"
    )
    return response


def _split_api_path(raw_path: str) -> tuple[str, str] | None:
    m = re.fullmatch(r"/api/data/([^/]+)/?(.*)", raw_path)
    if not m or not _VERSION_RE.fullmatch(m.group(1)):
        return None
    return m.group(1), m.group(2)


def create_app(registry: Registry) -> Flask:
    """The Dataverse Web API of every sandbox; the bearer token's ``tid`` picks the sandbox."""
    app = web.create_app("dataverse")
    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]

    def audience() -> str:
        return registry.urls.get(SERVICE) or request.host_url.rstrip("/")

    @app.route("/", defaults={"_path": ""}, methods=methods)
    @app.route("/<path:_path>", methods=methods)
    def handle(_path: str) -> Response:
        started = time.monotonic()
        token = _bearer()
        tenant = _unverified_tenant(token)
        sandbox = registry.by_tenant(tenant) if tenant else None
        split = _split_api_path(_raw_path())
        resource_name = "?"
        resource: odata.ResourcePath | None = None
        path_error: DataverseError | None = None
        if split is None:
            path_error = DataverseError(
                404, "", f"No HTTP resource was found that matches the request URI '{request.url}'."
            )
        else:
            try:
                resource = odata.split_resource(odata.decode_path(split[1]))
                resource_name = resource.name
            except odata.ODataSyntaxError as err:
                resource_name = split[1].split("(", 1)[0].split("/", 1)[0] or "?"
                status = 404 if err.message.startswith("Resource not found") else 400
                path_error = DataverseError(status, CODE_SEGMENT if status == 404 else err.code, err.message)
        if sandbox is None:
            return _common_headers(_unauthorized(tenant if tenant else None, audience()), None)
        web.bind(sandbox, SERVICE)
        org: Org = sandbox.org
        expanded = resource_name == "systemusers" and "$expand" in request.args
        # a user's roles/teams read is counted apart, so "GET systemusers" stays "user lookups"
        sandbox.counters.count(SERVICE, f"{request.method} {resource_name}{' $expand' if expanded else ''}")
        if request.method in WRITE_METHODS:
            for header in CALLER_HEADERS:
                if header in request.headers:
                    sandbox.counters.count(SERVICE, f"caller:{header}")
        if "ARRAffinity" in request.cookies:
            sandbox.counters.count(SERVICE, "cookie:ARRAffinity")
        with org.in_flight() as concurrent:
            web.apply_latency(sandbox, SERVICE)
            faulted = web.fault_response(sandbox.take_fault(SERVICE, request.method, request.path))
            if faulted is not None:
                return faulted
            claims = registry.verify_token(token or "", audience())
            if claims is None:
                return _common_headers(_unauthorized(sandbox.tenant_id, audience()), org)
            try:
                entry = org.admit(concurrent)
            except DataverseError as err:
                return _common_headers(_error_response(err), org)
            try:
                if path_error is not None:
                    raise path_error
                assert resource is not None and split is not None
                caller = org.resolve_caller(
                    str(claims.get("appid", "")),
                    request.headers.get("CallerObjectId"),
                    request.headers.get("MSCRMCallerID"),
                )
                appid = str(claims.get("appid", ""))
                handler = _Request(org, request.host_url.rstrip("/"), split[0], resource, caller, appid)
                response = handler.dispatch()
                if handler.applied:
                    response.headers["Preference-Applied"] = ",".join(handler.applied)
            except DataverseError as err:
                response = _error_response(err)
            finally:
                org.finish(entry, started)
            return _common_headers(response, org)

    return app
