"""Security roles and team memberships of a Dynamics user, read from Dataverse and cached per instance.

The authorization policy needs them for two decisions: is the actor a System Administrator (never acted
for unless the policy names them), and does the actor belong to a team or hold a role the policy lists.
A user holds a role directly (``systemuserroles_association``) or through an owner team that holds it
(``teammembership_association`` -> ``teamroles_association``) — both grant the role's privileges, so
both count.  All of it comes back in ONE request per actor, a single-record retrieve with a nested
``$expand`` (Dataverse allows nested expansion of collection-valued navigation properties as long as
no ``$top``/``$orderby`` is used inside)::

    GET systemusers(<id>)?$select=systemuserid
        &$expand=systemuserroles_association($select=name,roleid,_roletemplateid_value),
                 teammembership_association($select=name,teamid;
                     $expand=teamroles_association($select=name,roleid,_roletemplateid_value))

The answer is cached with the user cache's TTL (``USER_CACHE_TTL_SECONDS``) and concurrent callers for
one actor share one request (single flight), like the user lookups themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.dataverse import DataverseClient, entity_path
from shared.errors import DataverseError
from shared.singleflight import SingleFlight

SYSTEM_ADMINISTRATOR_TEMPLATE = "627090ff-40a3-4053-8790-584edc5be201"
"""``roletemplateid`` of the built-in System Administrator role: the same in every environment and every
business unit's copy of the role (its ``roleid`` differs per business unit, its name may be translated)."""

_ROLE_SELECT = "$select=name,roleid,_roletemplateid_value"
EXPAND = (
    f"systemuserroles_association({_ROLE_SELECT}),"
    f"teammembership_association($select=name,teamid;$expand=teamroles_association({_ROLE_SELECT}))"
)


@dataclass(frozen=True)
class Role:
    roleid: str
    name: str
    template_id: str | None
    via_team: str | None = None
    """The team id the role comes through; None for a role assigned to the user directly."""


@dataclass(frozen=True)
class Team:
    teamid: str
    name: str


@dataclass(frozen=True)
class Membership:
    systemuserid: str
    roles: tuple[Role, ...]
    teams: tuple[Team, ...]

    @property
    def is_system_administrator(self) -> bool:
        return any(role.template_id == SYSTEM_ADMINISTRATOR_TEMPLATE for role in self.roles)

    def role_names(self) -> frozenset[str]:
        """Ids, template ids and case-folded names: what a policy's ``roles`` entry may say."""
        return frozenset(
            value for role in self.roles for value in (role.roleid, role.template_id, role.name.casefold())
            if value
        )

    def team_names(self) -> frozenset[str]:
        return frozenset(value for team in self.teams for value in (team.teamid, team.name.casefold()))


def _lower(value: object) -> str | None:
    return str(value).lower() if value else None


def _rows(record: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    value = record.get(name)
    if not isinstance(value, list):
        raise DataverseError(
            f"the systemuser answer has no {name} collection", status=200,
            code="dataverse_malformed_response", transient=True,
        )
    return [row for row in value if isinstance(row, Mapping)]


def _roles(rows: list[Mapping[str, Any]], via_team: str | None) -> list[Role]:
    return [
        Role(str(row["roleid"]).lower(), str(row.get("name") or ""), _lower(row.get("_roletemplateid_value")),
             via_team)
        for row in rows if row.get("roleid")
    ]


def parse_membership(systemuserid: str, record: Mapping[str, Any]) -> Membership:
    """The expanded systemuser answer -> roles (direct first, then through teams) and teams."""
    roles = _roles(_rows(record, "systemuserroles_association"), None)
    teams: list[Team] = []
    for row in _rows(record, "teammembership_association"):
        if not row.get("teamid"):
            continue
        team = Team(str(row["teamid"]).lower(), str(row.get("name") or ""))
        teams.append(team)
        roles.extend(_roles(_rows(row, "teamroles_association"), team.teamid))
    return Membership(systemuserid, tuple(roles), tuple(teams))


class MembershipDirectory:
    """Per instance: each actor's roles and teams, one request per actor per ``ttl``, single flight."""

    def __init__(
        self, client: DataverseClient, *, ttl: float = 900, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, Membership]] = {}
        self._lock = threading.Lock()
        self._flight: SingleFlight[Membership] = SingleFlight()
        self.queries = 0
        """Requests sent (tests, diagnostics)."""

    def of(self, systemuserid: str, *, correlation_id: str | None = None) -> Membership:
        key = systemuserid.lower()
        cached = self._cached(key)
        if cached is not None:
            return cached

        def query() -> Membership:
            again = self._cached(key)
            return again if again is not None else self._query(key, correlation_id)

        return self._flight.do(key, query)

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cached(self, key: str) -> Membership | None:
        with self._lock:
            entry = self._cache.get(key)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def _query(self, key: str, correlation_id: str | None) -> Membership:
        self.queries += 1
        # entity_path refuses anything but a GUID, so no caller-controlled text reaches the URL unescaped
        record = self._client.get_json(
            entity_path("systemusers", key), {"$select": "systemuserid", "$expand": EXPAND},
            correlation_id=correlation_id,
        )
        membership = parse_membership(key, record)
        with self._lock:
            self._cache[key] = (self._clock() + self._ttl, membership)
        return membership
