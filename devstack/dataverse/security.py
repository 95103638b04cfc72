"""Security roles and teams of one sandbox's Dataverse, and the ``$expand`` that reads them for a user.

Emulated exactly as far as the app reads them: a single-record ``systemusers(<id>)`` retrieve with
``$expand`` of ``systemuserroles_association`` (the user's own roles) and ``teammembership_association``
(the teams the user is in), each with ``$select`` and, on the teams, a nested ``$expand`` of
``teamroles_association`` (the roles a team holds).  Learn, "Join tables using OData": nested
``$expand`` of collection-valued navigation properties is supported; ``$top``/``$orderby`` inside
are not — the emulator answers 501 for any inner option other than ``$select``/``$expand``.

Every org is seeded with the built-in System Administrator role (its ``roletemplateid`` is the same
in every environment) and System Customizer; tests add roles, assign them and build teams through
the control API.  No user holds a role unless a test gives it one.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SYSTEM_ADMINISTRATOR_TEMPLATE = "627090ff-40a3-4053-8790-584edc5be201"
SYSTEM_CUSTOMIZER_TEMPLATE = "119f245c-3cc8-4b62-b31c-d1a046ced15d"
ROLE_FIELDS = ("name", "roleid", "_roletemplateid_value", "_businessunitid_value")
TEAM_FIELDS = ("name", "teamid", "teamtype", "_businessunitid_value")
NAVIGATION = {
    "systemuser": {"systemuserroles_association": "role", "teammembership_association": "team"},
    "team": {"teamroles_association": "role"},
    "role": {},
}
FIELDS = {"role": ROLE_FIELDS, "team": TEAM_FIELDS}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OTHER_OPTIONS = ("$filter", "$top", "$orderby", "$skip", "$count", "$levels", "$search", "$compute")


class ExpandError(Exception):
    """``status`` 400 (a wrong name: Dataverse's answer) or 501 (valid OData the emulator does not do)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Expand:
    name: str
    select: tuple[str, ...] | None
    expand: tuple[Expand, ...] = ()


def parse_expand(text: str, entity: str = "systemuser") -> tuple[Expand, ...]:
    """``a($select=x,y;$expand=b($select=z)),c`` for ``entity`` -> items; ExpandError when refused."""
    items, rest = _items(text, 0, entity)
    if rest != len(text):
        raise ExpandError(400, f"Syntax error at position {rest} in '{text}'.")
    return items


def _items(text: str, at: int, entity: str) -> tuple[tuple[Expand, ...], int]:
    items: list[Expand] = []
    while True:
        match = _NAME.match(text, at)
        if match is None:
            raise ExpandError(400, f"Syntax error at position {at} in '{text}'.")
        name = match.group()
        target = NAVIGATION[entity].get(name)
        if target is None:
            raise ExpandError(
                400, f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{entity}'."
            )
        at = match.end()
        select: tuple[str, ...] | None = None
        inner: tuple[Expand, ...] = ()
        if at < len(text) and text[at] == "(":
            at += 1
            while True:
                option, _, _ = text[at:].partition("=")
                if option == "$select":
                    end = _option_end(text, at + len("$select="))
                    select = tuple(s.strip() for s in text[at + len("$select="):end].split(","))
                    for column in select:
                        if column not in FIELDS[target]:
                            raise ExpandError(400, f"Could not find a property named '{column}' on type "
                                                   f"'Microsoft.Dynamics.CRM.{target}'.")
                    at = end
                elif option == "$expand":
                    inner, at = _items(text, at + len("$expand="), target)
                elif option in _OTHER_OPTIONS:
                    raise ExpandError(501, f"The $expand option {option} is not implemented by the "
                                           "devstack Dataverse emulator.")
                else:
                    raise ExpandError(400, f"Syntax error at position {at} in '{text}'.")
                if at < len(text) and text[at] == ";":
                    at += 1
                    continue
                if at < len(text) and text[at] == ")":
                    at += 1
                    break
                raise ExpandError(400, f"Syntax error at position {at} in '{text}'.")
        items.append(Expand(name, select, inner))
        if at < len(text) and text[at] == ",":
            at += 1
            continue
        return tuple(items), at


def _option_end(text: str, at: int) -> int:
    """Where a ``$select`` list ends: at ``;`` or the ``)`` closing its item."""
    end = at
    while end < len(text) and text[end] not in ";)":
        end += 1
    return end


@dataclass
class Security:
    """Roles, teams and who holds / is in them, for one org (thread-safe)."""

    business_unit_id: str
    stable_id: Callable[..., str]
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_roles: dict[str, set[str]] = field(default_factory=dict)
    team_roles: dict[str, set[str]] = field(default_factory=dict)
    team_members: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    version: Callable[[], int] = field(default=lambda: 1)

    def __post_init__(self) -> None:
        self.add_role("System Administrator", SYSTEM_ADMINISTRATOR_TEMPLATE, stable=True)
        self.add_role("System Customizer", SYSTEM_CUSTOMIZER_TEMPLATE, stable=True)

    def add_role(self, name: str, template_id: str | None = None, *, stable: bool = False) -> dict[str, Any]:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a role needs a name")
        role_id = self.stable_id("role", name) if stable else str(uuid.uuid4())
        role = {"name": name, "roleid": role_id,
                "_roletemplateid_value": str(uuid.UUID(template_id)) if template_id else None,
                "_businessunitid_value": self.business_unit_id, "versionnumber": self.version()}
        with self.lock:
            self.roles[role_id] = role
        return _wire(role, ROLE_FIELDS)

    def roles_wire(self) -> list[dict[str, Any]]:
        with self.lock:
            return [_wire(r, ROLE_FIELDS) for r in self.roles.values()]

    def set_user_roles(self, systemuserid: str, role_ids: list[str]) -> list[str]:
        wanted = self._known_roles(role_ids)
        with self.lock:
            self.user_roles[systemuserid.lower()] = wanted
        return sorted(wanted)

    def add_team(
        self, name: str, members: list[str], role_ids: list[str], team_type: int = 0
    ) -> dict[str, Any]:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a team needs a name")
        team_id = str(uuid.uuid4())
        team = {"name": name, "teamid": team_id, "teamtype": team_type,
                "_businessunitid_value": self.business_unit_id, "versionnumber": self.version()}
        with self.lock:
            self.teams[team_id] = team
            self.team_roles[team_id] = self._known_roles(role_ids)
            self.team_members[team_id] = {m.lower() for m in members}
        return {**_wire(team, TEAM_FIELDS), "members": sorted(self.team_members[team_id]),
                "roles": sorted(self.team_roles[team_id])}

    def _known_roles(self, role_ids: list[str]) -> set[str]:
        wanted = {str(r).lower() for r in role_ids}
        unknown = wanted - set(self.roles)
        if unknown:
            raise KeyError(f"role {sorted(unknown)[0]}")
        return wanted

    def expand(self, entity: str, key: str, items: tuple[Expand, ...]) -> dict[str, Any]:
        """The expanded navigation properties of one systemuser or team, in Dataverse's shape."""
        out: dict[str, Any] = {}
        with self.lock:
            for item in items:
                rows = self._related(entity, key, item.name)
                target = NAVIGATION[entity][item.name]
                shaped = []
                for row in rows:
                    primary = f"{target}id"
                    record: dict[str, Any] = {"@odata.etag": f'W/"{row["versionnumber"]}"'}
                    for column in item.select or FIELDS[target]:
                        record[column] = row.get(column)
                    record[primary] = row[primary]
                    if item.expand:
                        record.update(self.expand(target, row[primary], item.expand))
                    shaped.append(record)
                out[item.name] = shaped
        return out

    def _related(self, entity: str, key: str, name: str) -> list[dict[str, Any]]:
        if name == "systemuserroles_association":
            ids = self.user_roles.get(key, set())
            return [self.roles[r] for r in sorted(ids) if r in self.roles]
        if name == "teammembership_association":
            return [self.teams[t] for t in sorted(self.teams) if key in self.team_members.get(t, set())]
        ids = self.team_roles.get(key, set())
        return [self.roles[r] for r in sorted(ids) if r in self.roles]


def context_columns(select: list[str] | None, items: tuple[Expand, ...]) -> str:
    """``(systemuserid,systemuserroles_association(name,roleid))`` for the ``@odata.context`` URL."""
    parts = list(select or [])
    for item in items:
        inner = context_columns(list(item.select) if item.select else None, item.expand)
        parts.append(f"{item.name}{inner}" if inner else f"{item.name}()")
    return f"({','.join(parts)})" if parts else ""


def _wire(row: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: row.get(k) for k in fields}
