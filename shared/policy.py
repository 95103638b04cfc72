"""Who may write what, as whom: the authorization policy of each webhook ``{source}``.

Holding the webhook key (or being able to put a message on the queue) must not mean acting as anybody
on any table.  So every job is checked against the policy of its source — at the webhook (403
``forbidden_by_policy``, nothing enqueued) and again in ``sync_job`` before any request for the write
(dead-letter ``forbidden_by_policy``), because the queue is a second way in.

The policy is JSON, not YAML: the standard library reads it, so the deployed app needs no extra
runtime dependency (PyYAML is not one) and the file has one unambiguous meaning (no implicit typing:
YAML 1.1 reads ``no`` as false).  It comes from ``AUTHORIZATION_POLICY`` (the JSON inline, read once per
instance) or ``AUTHORIZATION_POLICY_BLOB`` (``container/path.json`` in the app's own storage account,
re-read every ``POLICY_TTL_SECONDS`` so an edit applies without a restart).  It is validated strictly at
first use: every problem names the setting and the JSON path (``$.sources.crm.entities.contacts...``).

Without a policy the default applies to every source: the entity sets of ``ALLOWED_ENTITY_SETS``, every
operation, every column but ``@odata.bind`` lookups, acting as any ordinary person or as the application
user.  Whatever a policy says, the system tables of ``DENIED_ENTITY_SETS`` are never written and
some users are never acted for: disabled users, application users, non-interactive users
(``shared.attribution.check_eligible``), and System Administrators unless the policy names them one
by one under ``actAs.users``.  The full schema is in docs/authorization.md.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shared.attribution import check_eligible
from shared.contract import is_email_address, is_guid, json_type, loads
from shared.errors import ActorError, ConfigurationError, PolicyViolation, SyncError
from shared.memberships import SYSTEM_ADMINISTRATOR_TEMPLATE, Membership

if TYPE_CHECKING:
    from shared.memberships import MembershipDirectory
    from shared.settings import Settings
    from shared.storage import BlobStore
    from shared.users import SystemUser, UserDirectory

log = logging.getLogger("shared.policy")

POLICY_SETTING = "AUTHORIZATION_POLICY"
BLOB_SETTING = "AUTHORIZATION_POLICY_BLOB"
ALLOWED_SETTING = "ALLOWED_ENTITY_SETS"
WEBHOOK_LOOKUP_CONCURRENCY = 8
"""Distinct actors of one webhook batch looked up at once (users, then roles/teams)."""
POLICY_TTL_SECONDS = 60.0
"""How long a policy read from a blob is used before it is read again (an edit applies within this)."""

OPERATIONS = ("create", "update", "upsert", "delete")
ANY = "*"

DENIED_ENTITY_SETS = frozenset({
    # who is who, and who may do what
    "systemusers", "applicationusers", "roles", "roletemplates", "privileges", "roleprivilegescollection",
    "systemuserroles", "systemuserrolescollection", "teams", "teammemberships", "teamroles",
    "teamrolescollection", "teamprofiles", "teamprofilescollection", "systemuserprofiles",
    "systemuserprofilescollection", "businessunits", "organizations", "positions",
    "fieldsecurityprofiles", "fieldpermissions", "principalobjectaccessset", "usersettingscollection",
    # code that runs inside Dataverse, and where it sends data
    "pluginassemblies", "pluginpackages", "plugintypes", "plugintracelogs", "sdkmessages",
    "sdkmessagefilters", "sdkmessageprocessingsteps", "sdkmessageprocessingstepimages",
    "sdkmessageprocessingstepsecureconfigs", "serviceendpoints", "customapis",
    "customapirequestparameters", "customapiresponseproperties", "workflows", "callbackregistrations",
    "asyncoperations", "bulkdeleteoperations",
    # solutions, configuration and secrets
    "solutions", "solutioncomponents", "publishers", "connectionreferences", "connectors",
    "environmentvariabledefinitions", "environmentvariablevalues", "managedidentities",
    "keyvaultreferences", "credentials", "emailserverprofiles", "mailboxes",
    # metadata and the app's own customizations
    "entities", "attributes", "relationships", "entitykeys", "webresourceset", "systemforms",
    "savedqueries", "appmodules", "sitemaps", "audits", "imports", "importfiles", "importjobs",
})
"""System and metadata tables no job may write, whatever a policy says (a policy naming one is invalid)."""

_ENTITY_SET = re.compile(r"[a-z][a-z0-9_]*")
_SOURCE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_MAX_NAME = 256
_MAX_PROBLEMS_SHOWN = 5


class JobLike(Protocol):
    """What the policy reads of a job (``shared.contract.Job``)."""

    @property
    def entity(self) -> str: ...
    @property
    def operation(self) -> str: ...
    @property
    def key(self) -> str | dict[str, Any] | None: ...
    @property
    def data(self) -> dict[str, Any] | None: ...
    @property
    def act_as(self) -> dict[str, str] | None: ...
    @property
    def source(self) -> str | None: ...


@dataclass(frozen=True)
class EntityRule:
    operations: frozenset[str]
    columns: frozenset[str] | None  # None: any column
    bind: bool  # whether ``<navigation>@odata.bind`` lookups may be set


@dataclass(frozen=True)
class ActAsRule:
    any_person: bool = False
    users: frozenset[str] = frozenset()  # systemuserids and case-folded emails: named, even an administrator
    teams: frozenset[str] = frozenset()  # team ids and case-folded names
    roles: frozenset[str] = frozenset()  # role ids, role template ids and case-folded names
    application: bool = False  # jobs without actAs (written as the application user)

    @property
    def needs_membership(self) -> bool:
        return self.any_person or bool(self.teams or self.roles)


@dataclass(frozen=True)
class SourcePolicy:
    name: str  # the source it applies to, or "default"
    entities: Mapping[str, EntityRule]
    act_as: ActAsRule


@dataclass(frozen=True)
class Policy:
    origin: str  # the setting it came from (named in refusals and errors)
    sources: Mapping[str, SourcePolicy] = field(default_factory=dict)
    default: SourcePolicy | None = None

    def for_source(self, source: str | None) -> SourcePolicy | None:
        """The rules of ``source``; sources the policy does not list, and messages without one, get
        the policy's ``default`` (None: refused)."""
        if source is not None and source in self.sources:
            return self.sources[source]
        return self.default


# --- parsing ---------------------------------------------------------------------------------------


class _Problems:
    def __init__(self, setting: str) -> None:
        self.setting = setting
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "; ".join(self.items[:_MAX_PROBLEMS_SHOWN])
        more = len(self.items) - _MAX_PROBLEMS_SHOWN
        suffix = f" (and {more} more)" if more > 0 else ""
        raise ConfigurationError(self.setting, f"invalid authorization policy: {shown}{suffix}")


def _member(path: str, name: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return f"{path}.{name}"
    return f"{path}[{json.dumps(name, ensure_ascii=False)}]"


def _object(value: object, path: str, problems: _Problems, allowed: Iterable[str] | None = None,
            required: Iterable[str] = ()) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        problems.add(path, f"must be an object, got {json_type(value)}")
        return None
    if allowed is not None:
        names = tuple(allowed)
        for name in value:
            if name not in names:
                problems.add(_member(path, name), f"unknown field (allowed: {', '.join(names)})")
    for name in required:
        if name not in value:
            problems.add(_member(path, name), "is required")
    return value


def _bool(obj: Mapping[str, Any], name: str, path: str, problems: _Problems) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        problems.add(_member(path, name), f"must be true or false, got {json_type(value)}")
        return False
    return value


def _strings(obj: Mapping[str, Any], name: str, path: str, problems: _Problems,
             check: Callable[[str], str | None], *, star: bool = False) -> list[str] | None:
    """A list of unique strings each passing ``check`` (None when fine, else the problem); ``"*"`` -> None."""
    value = obj.get(name, [])
    where = _member(path, name)
    if star and value == ANY:
        return None
    if not isinstance(value, list):
        expected = 'an array of strings or "*"' if star else "an array of strings"
        problems.add(where, f"must be {expected}, got {json_type(value)}")
        return []
    seen: set[str] = set()
    out: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            problems.add(f"{where}[{index}]", f"must be a string, got {json_type(item)}")
            continue
        problem = check(item)
        if problem is not None:
            problems.add(f"{where}[{index}]", problem)
        elif item.casefold() in seen:
            problems.add(f"{where}[{index}]", f"{item!r} is listed twice")
        else:
            seen.add(item.casefold())
            out.append(item)
    return out


def _check_operation(item: str) -> str | None:
    return None if item in OPERATIONS else f"must be one of {', '.join(OPERATIONS)}"


def _check_column(item: str) -> str | None:
    if _COLUMN.fullmatch(item) is None:
        return "must be a column or navigation property name (letters, digits, _), without @odata.bind"
    return None


def _check_user(item: str) -> str | None:
    if is_guid(item) or is_email_address(item):
        return None
    return "must be an email address or a systemuserid (GUID)"


def _check_name(item: str) -> str | None:
    if not item.strip() or len(item) > _MAX_NAME:
        return f"must be a GUID or a name of 1-{_MAX_NAME} characters"
    return None


def _check_role(item: str) -> str | None:
    problem = _check_name(item)
    if problem is not None:
        return problem
    if item.lower() == SYSTEM_ADMINISTRATOR_TEMPLATE or item.casefold() == "system administrator":
        return ("System Administrator may not be allowed as a role; name each administrator who may be "
                "acted for under actAs.users")
    return None


def check_entity_set(name: str) -> str | None:
    """Why ``name`` can never be an allowed entity set (None: it can)."""
    if _ENTITY_SET.fullmatch(name) is None:
        return "must be a plain entity set name matching ^[a-z][a-z0-9_]*$ (e.g. contacts)"
    if name in DENIED_ENTITY_SETS:
        return f"{name} is a system table that no job may write (see the deny list in docs/authorization.md)"
    return None


def _entity_rule(value: object, path: str, problems: _Problems) -> EntityRule | None:
    obj = _object(value, path, problems, ("operations", "columns", "bind", "description"),
                  ("operations", "columns"))
    if obj is None:
        return None
    operations = _strings(obj, "operations", path, problems, _check_operation, star=True)
    if operations == []:
        problems.add(_member(path, "operations"), 'must list at least one operation (or be "*")')
    columns = _strings(obj, "columns", path, problems, _check_column, star=True)
    return EntityRule(
        operations=frozenset(OPERATIONS if operations is None else operations),
        columns=None if columns is None else frozenset(columns),
        bind=_bool(obj, "bind", path, problems),
    )


def _act_as_rule(value: object, path: str, problems: _Problems) -> ActAsRule:
    fields = ("anyPerson", "users", "teams", "roles", "application", "description")
    obj = _object(value, path, problems, fields)
    if obj is None:
        return ActAsRule()
    users = _strings(obj, "users", path, problems, _check_user) or []
    teams = _strings(obj, "teams", path, problems, _check_name) or []
    roles = _strings(obj, "roles", path, problems, _check_role) or []
    return ActAsRule(
        any_person=_bool(obj, "anyPerson", path, problems),
        users=frozenset(u.lower() if is_guid(u) else u.casefold() for u in users),
        teams=frozenset(t.lower() if is_guid(t) else t.casefold() for t in teams),
        roles=frozenset(r.lower() if is_guid(r) else r.casefold() for r in roles),
        application=_bool(obj, "application", path, problems),
    )


def _source_policy(name: str, value: object, path: str, problems: _Problems) -> SourcePolicy | None:
    obj = _object(value, path, problems, ("entities", "actAs", "description"), ("entities", "actAs"))
    if obj is None:
        return None
    entities: dict[str, EntityRule] = {}
    raw_entities = _object(obj.get("entities", {}), _member(path, "entities"), problems)
    for entity, rule_value in (raw_entities or {}).items():
        where = _member(_member(path, "entities"), entity)
        problem = check_entity_set(entity)
        if problem is not None:
            problems.add(where, problem)
            continue
        rule = _entity_rule(rule_value, where, problems)
        if rule is not None:
            entities[entity] = rule
    act_as = _act_as_rule(obj.get("actAs", {}), _member(path, "actAs"), problems)
    return SourcePolicy(name, entities, act_as)


def parse_policy(text: str | bytes, *, setting: str = POLICY_SETTING) -> Policy:
    """Strictly validated policy; ConfigurationError naming ``setting`` and the JSON path of each problem."""
    problems = _Problems(setting)
    try:
        raw = loads(text.decode("utf-8") if isinstance(text, bytes) else text)  # the jobs' strict codec
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(setting, f"the authorization policy is not valid JSON: {exc}") from None
    obj = _object(raw, "$", problems, ("version", "description", "sources", "default"))
    if obj is None:
        problems.raise_if_any()
        raise AssertionError("unreachable")
    if "version" in obj and (obj["version"] != 1 or isinstance(obj["version"], bool)):
        problems.add("$.version", "must be 1 (the only version so far)")
    if "sources" not in obj and "default" not in obj:
        problems.add("$", "must have sources, default or both (an empty policy would refuse every job)")
    sources: dict[str, SourcePolicy] = {}
    raw_sources = _object(obj.get("sources", {}), "$.sources", problems)
    for name, value in (raw_sources or {}).items():
        where = _member("$.sources", name)
        if _SOURCE.fullmatch(name) is None:
            problems.add(where, "a source is 1-64 characters of A-Z a-z 0-9 . _ - (the webhook's {source})")
            continue
        rule = _source_policy(name, value, where, problems)
        if rule is not None:
            sources[name] = rule
    default = _source_policy("default", obj["default"], "$.default", problems) if "default" in obj else None
    problems.raise_if_any()
    return Policy(setting, sources, default)


def default_policy(allowed_entity_sets: str) -> Policy:
    """No policy configured: ``ALLOWED_ENTITY_SETS``, any operation and column (no binds), any ordinary
    person or the application user, for every source."""
    names = [n.strip() for n in allowed_entity_sets.split(",") if n.strip()]
    if not names:
        raise ConfigurationError(ALLOWED_SETTING, "must list at least one entity set, e.g. contacts,accounts")
    for name in names:
        problem = check_entity_set(name)
        if problem is not None:
            raise ConfigurationError(ALLOWED_SETTING, f"{name!r}: {problem}")
    rule = EntityRule(frozenset(OPERATIONS), None, bind=False)
    anyone = ActAsRule(any_person=True, application=True)
    default = SourcePolicy("default", dict.fromkeys(names, rule), anyone)
    return Policy(ALLOWED_SETTING, {}, default)


# --- evaluation ------------------------------------------------------------------------------------


Problem = tuple[str, str]  # (field path inside the job, message)


def _source_label(source: str | None) -> str:
    return f"source {source!r}" if source is not None else "messages without a source"


def job_problems(
    policy: Policy, job: JobLike, source: str | None, records: Sequence[Mapping[str, Any]] | None = None
) -> list[Problem]:
    """What the policy refuses in the job itself (no request needed): table, operation, columns, actAs.

    A bulk job's records are checked one by one (``records[i].data.<column>``): its inline ``records``,
    or ``records`` read from its claim-check blob (``recordsBlob[i]...``), which only ``sync_job`` has.
    """
    problem = check_entity_set(job.entity)
    if problem is not None:
        return [("entity", problem)]
    rule = policy.for_source(source)
    label = _source_label(source)
    if rule is None:
        return [("source", f"{label} is not in the authorization policy ({policy.origin}), which has no "
                           "default")]
    entity = rule.entities.get(job.entity)
    if entity is None:
        allowed = ", ".join(sorted(rule.entities)) or "none"
        return [("entity", f"{label} may not write {job.entity} (allowed: {allowed})")]
    found: list[Problem] = []
    if job.operation not in entity.operations:
        allowed = ", ".join(o for o in OPERATIONS if o in entity.operations)
        found.append(("operation", f"{label} may not {job.operation} {job.entity} (allowed: {allowed})"))
    for prefix, key, data in _writes(job, records):
        found.extend(_record_problems(entity, job, label, prefix, key, data))
    if job.act_as is None and not rule.act_as.application:
        found.append(("actAs", f"is required: {label} may not write as the application user"))
    return found


def _writes(
    job: JobLike, records: Sequence[Mapping[str, Any]] | None
) -> list[tuple[str, object, object]]:
    """(field prefix, key, data) of every record the job writes."""
    inline = getattr(job, "records", None)
    if records is None and inline is not None:
        records, where = inline, "records"
    else:
        where = "recordsBlob" if getattr(job, "records_blob", None) else "records"
    if records is None:
        return [("", job.key, job.data)]
    return [(f"{where}[{index}].", record.get("key"), record.get("data"))
            for index, record in enumerate(records)]


def _record_problems(
    entity: EntityRule, job: JobLike, label: str, prefix: str, key: object, data: object
) -> list[Problem]:
    found: list[Problem] = []
    for name, value in (data.items() if isinstance(data, dict) else ()):
        column, at, annotation = name.partition("@")
        if isinstance(value, dict | list):
            # a deep insert: Dataverse creates (or links) records in the navigation property's table, which
            # would reach tables this policy — or the deny list — never allowed
            found.append((f"{prefix}data.{name}", "an object or array value is a deep insert of related "
                                                  "records, which no job may do: write each record with its "
                                                  "own job and link existing ones with @odata.bind"))
        elif at and annotation == "odata.bind" and not entity.bind:
            refusal = f"{label} may not set @odata.bind lookups on {job.entity}"
            found.append((f"{prefix}data.{name}", refusal))
        elif entity.columns is not None and column not in entity.columns:
            shown = column or name
            refusal = f"{label} may not write the column {shown} of {job.entity}"
            found.append((f"{prefix}data.{name}", refusal))
    if isinstance(key, dict) and job.operation in ("create", "upsert") and entity.columns is not None:
        # a keyed create/upsert writes the key's values into the new record
        found.extend(
            (f"{prefix}key.{name}", f"{label} may not write the column {name} of {job.entity}")
            for name in key if name not in entity.columns
        )
    return found


def actor_problem(policy: Policy, source: str | None, actor: SystemUser,
                  membership: Callable[[], Membership]) -> str | None:
    """Why the policy refuses to act as ``actor`` (None: allowed).  Eligibility is checked before this."""
    rule = policy.for_source(source)
    label = _source_label(source)
    if rule is None:
        return f"{label} is not in the authorization policy ({policy.origin})"
    who = rule.act_as
    if actor.systemuserid in who.users or (actor.email is not None and actor.email.casefold() in who.users):
        return None  # named one by one: allowed, even a System Administrator
    if not who.needs_membership:
        return f"{label} may act only as the users its policy lists; {actor.systemuserid} is not one of them"
    held = membership()
    if held.is_system_administrator:
        return (f"user {actor.systemuserid} holds the System Administrator role; {label} may act as an "
                "administrator only if the policy names that user under actAs.users")
    if who.any_person or who.teams & held.team_names() or who.roles & held.role_names():
        return None
    return (f"user {actor.systemuserid} is not a member of a team nor a holder of a role that the policy of "
            f"{label} allows to act as")


def _fields(problems: Sequence[Problem], where: str) -> list[dict[str, Any]]:
    return [{"field": f"{where}.{path}" if where else path, "message": message} for path, message in problems]


def _order(field: str) -> tuple[int, str]:
    """``jobs[10].x`` after ``jobs[9].y``: refusals in the batch's order."""
    match = re.match(r"jobs\[(\d+)\]", field)
    return (int(match.group(1)) if match else -1, "")


def violation(problems: Sequence[Problem], where: str = "") -> PolicyViolation:
    details = _fields(problems, where)
    first = details[0]
    more = len(details) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return PolicyViolation(f"{first['field']}: {first['message']}{suffix}", details=details)


# --- per instance ----------------------------------------------------------------------------------


class Authorizer:
    """The instance's policy (loaded at first use, re-read from its blob every ``ttl``) and its checks."""

    def __init__(
        self,
        settings: Settings,
        users: UserDirectory,
        memberships: MembershipDirectory,
        *,
        blobs: BlobStore | None = None,
        ttl: float = POLICY_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._users = users
        self._memberships = memberships
        self._blobs = blobs
        self._ttl = ttl
        self._clock = clock
        self._policy: Policy | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self.loads = 0
        """Times the policy was read and parsed (tests)."""

    # --- the policy ---
    def policy(self) -> Policy:
        policy = self._policy
        if policy is not None and self._clock() < self._expires:
            return policy
        with self._lock:  # one reader; the others wait for its answer
            if self._policy is not None and self._clock() < self._expires:
                return self._policy
            self._policy, self._expires = self._load(self._policy)
            return self._policy

    def _load(self, stale: Policy | None) -> tuple[Policy, float]:
        inline = self._settings.authorization_policy
        blob = self._settings.authorization_policy_blob
        if inline and blob:
            raise ConfigurationError(POLICY_SETTING, f"set {POLICY_SETTING} or {BLOB_SETTING}, not both")
        self.loads += 1
        if inline:
            return parse_policy(inline, setting=POLICY_SETTING), float("inf")
        if not blob:
            return default_policy(self._settings.allowed_entity_sets), float("inf")
        try:
            text = self._read_blob(blob)
        except SyncError as exc:
            if exc.transient and stale is not None:
                log.warning("authorization policy blob unreadable (%s); keeping the last one read", exc.code)
                return stale, self._clock() + min(self._ttl, 10.0)
            raise
        policy = parse_policy(text, setting=BLOB_SETTING)
        if stale is None:
            log.info("authorization policy read from blob %s (%d sources)", blob, len(policy.sources))
        return policy, self._clock() + self._ttl

    def _read_blob(self, path: str) -> bytes:
        container, _, name = path.strip("/").partition("/")
        if _CONTAINER.fullmatch(container) is None or not name:
            raise ConfigurationError(BLOB_SETTING, f"must be <container>/<blob path>, got {path!r}")
        from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError

        if self._blobs is None:
            from shared.storage import BlobStore

            self._blobs = BlobStore()
        try:
            data: bytes = self._blobs.container(container).get_blob_client(name).download_blob().readall()
        except ResourceNotFoundError:
            raise ConfigurationError(BLOB_SETTING, f"the blob {path} does not exist") from None
        except HttpResponseError as exc:
            if exc.status_code is not None and exc.status_code < 500 and exc.status_code != 429:
                raise ConfigurationError(
                    BLOB_SETTING, f"the blob {path} could not be read: HTTP {exc.status_code}") from None
            raise SyncError(f"the policy blob {path} could not be read: HTTP {exc.status_code}",
                            code="policy_unavailable", transient=True) from None
        except AzureError as exc:
            raise SyncError(f"the policy blob {path} could not be read: {type(exc).__name__}",
                            code="policy_unavailable", transient=True) from None
        return data

    # --- the checks ---
    def check_job(self, job: JobLike, records: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Before anything is asked of Dataverse for the job: PolicyViolation if its shape is refused.
        ``records``: a bulk job's records read from its claim-check blob."""
        problems = job_problems(self.policy(), job, job.source, records)
        if problems:
            raise violation(problems)

    def check_actor(
        self, job: JobLike, actor: SystemUser | None, *, correlation_id: str | None = None
    ) -> None:
        """Before the write: ActorError for users never acted for, PolicyViolation for a policy refusal."""
        if actor is None:
            return  # acting as the application user was checked by check_job
        check_eligible(actor)
        problem = actor_problem(
            self.policy(), job.source, actor, self._membership_of(actor.systemuserid, correlation_id)
        )
        if problem is not None:
            raise violation([("actAs", problem)])

    def check_batch(self, source: str, jobs: Sequence[tuple[str, JobLike]]) -> list[dict[str, Any]]:
        """The webhook's check of a validated batch: every refusal as ``{"field", "message"}`` (empty: ok).

        The policy's refusals only.  The actor's own state — not found, ambiguous, disabled, an
        application or non-interactive user — is left to ``sync_job``, which dead-letters the job with
        that reason as before: it can change between now and the write, and one such job must not
        block the rest of a batch.  Nothing is ever written for them either way.
        """
        policy = self.policy()
        details: list[dict[str, Any]] = []
        acting: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        for where, job in jobs:
            problems = job_problems(policy, job, source)
            details.extend(_fields(problems, where))
            if not problems and job.act_as is not None:
                acting.append((where, tuple(sorted(job.act_as.items()))))
        # each distinct actor once, a few at a time: a batch of 100 cold actors must not cost 200
        # sequential round trips inside an HTTP request (the caches make a warm batch free anyway)
        distinct = list(dict.fromkeys(actor for _, actor in acting))
        if len(distinct) > 1:
            with ThreadPoolExecutor(max_workers=min(WEBHOOK_LOOKUP_CONCURRENCY, len(distinct))) as pool:
                # each task in a copy of this thread's context: the HTTP wait limit (shared.deadline)
                # travels in a context variable, which pool threads would not otherwise see
                futures = [pool.submit(contextvars.copy_context().run, self._refusal, policy, source, dict(a))
                           for a in distinct]
                verdicts = {actor: future.result() for actor, future in zip(distinct, futures, strict=True)}
        else:
            verdicts = {actor: self._refusal(policy, source, dict(actor)) for actor in distinct}
        for where, actor in acting:
            problem = verdicts[actor]
            if problem is not None:
                details.extend(_fields([("actAs", problem)], where))
        return sorted(details, key=lambda d: _order(d["field"]))

    def _refusal(self, policy: Policy, source: str, act_as: dict[str, str]) -> str | None:
        try:
            actor = self._users.resolve(act_as, correlation_id="webhook")
            if actor.is_disabled:
                return None
            check_eligible(actor)
        except ActorError:
            return None  # left to sync_job, which dead-letters it with its own reason
        return actor_problem(policy, source, actor, self._membership_of(actor.systemuserid, "webhook"))

    def _membership_of(self, systemuserid: str, correlation_id: str | None) -> Callable[[], Membership]:
        """Deferred: a user the policy names one by one is allowed without asking Dataverse."""
        return lambda: self._memberships.of(systemuserid, correlation_id=correlation_id)
