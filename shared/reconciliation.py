"""User reconciliation: compare Dataverse's users with a roster and with the previous run.

``reconcile`` is pure and deterministic (same users, roster, snapshot and ``now`` give byte-identical
outputs), so a timer that fires twice, or a run that is repeated by hand, changes nothing.  The
snapshot is keyed by ``systemuserid``: emails change, ids do not.

Roster: CSV with a header row naming ``email`` and optionally ``externalId`` (header names are matched
case-insensitively, other columns are ignored, a UTF-8 BOM and blank lines are tolerated, emails are
compared trimmed and case-insensitively).  Anything else — no email column, a row with an empty or
non-email value, more cells than headers — is a ``roster_invalid`` error naming the line, rather than
a report quietly built on half a file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared import deadline
from shared.contract import is_email_address
from shared.errors import SyncError

if TYPE_CHECKING:
    from shared.runtime import Runtime
    from shared.users import SystemUser

log = logging.getLogger("shared.reconciliation")

SNAPSHOT_VERSION = 1
ROSTER_PATH = "reconciliation/roster.csv"
SNAPSHOT_PATH = "reconciliation/users/latest.json"


class ReconciliationError(SyncError):
    """The roster or the previous snapshot cannot be read: ``roster_invalid`` / ``snapshot_invalid``."""

    code = "roster_invalid"


@dataclass(frozen=True)
class RosterEntry:
    email: str  # trimmed, lower case
    external_id: str | None
    line: int


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _norm_email(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    return value or None


def as_text(data: str | bytes | None, path: str) -> str | None:
    """Blob contents as text; a roster saved in a legacy code page gets a message saying so."""
    if data is None or isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReconciliationError(
            f"{path} is not UTF-8 (byte {exc.start}); save it as 'CSV UTF-8'",
            code="snapshot_invalid" if path == SNAPSHOT_PATH else "roster_invalid",
        ) from None


def parse_roster(data: str | bytes | None) -> list[RosterEntry] | None:
    """Entries in file order, one per distinct email (the first wins).  None when there is no roster."""
    text = as_text(data, ROSTER_PATH)
    if text is None:
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ReconciliationError(f"{ROSTER_PATH} is empty: it needs a header row with an email column")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    entries: list[RosterEntry] = []
    seen: set[str] = set()
    try:
        header: list[str] | None = None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                if "email" not in header:
                    raise ReconciliationError(
                        f"{ROSTER_PATH} line {reader.line_num}: the header has no email column "
                        f"(found: {', '.join(header)})"
                    )
                email_col = header.index("email")
                external_col = header.index("externalid") if "externalid" in header else None
                continue
            line = reader.line_num
            if len(row) > len(header):
                raise ReconciliationError(
                    f"{ROSTER_PATH} line {line}: {len(row)} cells but the header has {len(header)} "
                    "(quote values that contain commas)"
                )
            raw = row[email_col] if email_col < len(row) else ""
            email = _norm_email(raw)
            if email is None:
                raise ReconciliationError(f"{ROSTER_PATH} line {line}: the email cell is empty")
            if not is_email_address(email):
                raise ReconciliationError(
                    f"{ROSTER_PATH} line {line}: {raw.strip()!r} is not an email address"
                )
            external = None
            if external_col is not None and external_col < len(row):
                external = row[external_col].strip() or None
            if email not in seen:
                seen.add(email)
                entries.append(RosterEntry(email, external, line))
    except csv.Error as exc:
        raise ReconciliationError(f"{ROSTER_PATH} line {reader.line_num}: {exc}") from None
    if header is None:
        raise ReconciliationError(f"{ROSTER_PATH} has no header row")
    return entries


def _user_record(user: SystemUser) -> dict[str, Any]:
    return {
        "email": user.email,
        "fullName": user.fullname,
        "azureAdObjectId": user.azure_ad_object_id,
        "isDisabled": bool(user.is_disabled),
        "accessMode": user.access_mode,
    }


def parse_snapshot(data: str | bytes | None) -> dict[str, dict[str, Any]] | None:
    """The previous run's users by systemuserid.  None when there was no previous run."""
    text = as_text(data, SNAPSHOT_PATH)
    if text is None:
        return None
    fix = f"delete {SNAPSHOT_PATH} to start from a fresh baseline"
    try:
        document = json.loads(text.removeprefix("\ufeff"))
    except ValueError as exc:
        raise ReconciliationError(
            f"{SNAPSHOT_PATH} is not JSON ({exc}); {fix}", code="snapshot_invalid"
        ) from None
    users = document.get("users") if isinstance(document, dict) else None
    if not isinstance(users, dict) or not all(isinstance(v, dict) for v in users.values()):
        raise ReconciliationError(f"{SNAPSHOT_PATH} has no users object; {fix}", code="snapshot_invalid")
    return {str(k).lower(): v for k, v in users.items()}


def _sort(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))


def _roster_section(
    roster: list[RosterEntry] | None, by_email: Mapping[str, list[SystemUser]]
) -> dict[str, list[dict[str, Any]]]:
    section: dict[str, list[dict[str, Any]]] = {
        "missing": [], "disabled": [], "ambiguous": [], "noEntraId": []
    }
    for entry in roster or ():
        base = {"email": entry.email, "externalId": entry.external_id}
        matches = by_email.get(entry.email, [])
        if not matches:
            section["missing"].append(base)
        elif len(matches) > 1:
            section["ambiguous"].append({**base, "systemUserIds": sorted(u.systemuserid for u in matches)})
        else:
            (user,) = matches
            if user.is_disabled:
                section["disabled"].append({**base, "systemUserId": user.systemuserid})
            if not user.azure_ad_object_id:
                section["noEntraId"].append({**base, "systemUserId": user.systemuserid})
    return {name: _sort(items) for name, items in section.items()}


def _changes(
    current: Mapping[str, dict[str, Any]], previous: Mapping[str, dict[str, Any]] | None
) -> dict[str, list[dict[str, Any]]]:
    before = previous or {}
    changes: dict[str, list[dict[str, Any]]] = {
        "added": [], "removed": [], "disabled": [], "enabled": [], "emailChanged": []
    }
    for uid in sorted(current.keys() - before.keys()):
        changes["added"].append({"systemUserId": uid, "email": current[uid]["email"]})
    for uid in sorted(before.keys() - current.keys()):
        changes["removed"].append({"systemUserId": uid, "email": before[uid].get("email")})
    for uid in sorted(current.keys() & before.keys()):
        now, then = current[uid], before[uid]
        was_disabled = bool(then.get("isDisabled"))
        if now["isDisabled"] and not was_disabled:
            changes["disabled"].append({"systemUserId": uid, "email": now["email"]})
        elif was_disabled and not now["isDisabled"]:
            changes["enabled"].append({"systemUserId": uid, "email": now["email"]})
        if _norm_email(now["email"]) != _norm_email(then.get("email")):
            changes["emailChanged"].append(
                {"systemUserId": uid, "from": then.get("email"), "to": now["email"]}
            )
    return changes


def reconcile(
    users: Iterable[SystemUser],
    roster_csv: str | bytes | None,
    previous_snapshot: str | bytes | None,
    *,
    now: datetime,
) -> tuple[str, dict[str, Any]]:
    """(new snapshot JSON text, report dict).  Raises ``ReconciliationError`` for a bad roster/snapshot."""
    roster = parse_roster(roster_csv)
    previous = parse_snapshot(previous_snapshot)

    by_id: dict[str, SystemUser] = {}
    for user in users:
        by_id[user.systemuserid.lower()] = user
    current = {uid: _user_record(by_id[uid]) for uid in sorted(by_id)}
    by_email: dict[str, list[SystemUser]] = {}
    for uid in sorted(by_id):
        email = _norm_email(by_id[uid].email)
        if email:
            by_email.setdefault(email, []).append(by_id[uid])

    generated_at = _iso(now)
    roster_section = _roster_section(roster, by_email)
    changes = _changes(current, previous)
    counts = {
        "users": len(current),
        "usersDisabled": sum(1 for u in current.values() if u["isDisabled"]),
        "usersNoEntraId": sum(1 for u in current.values() if not u["azureAdObjectId"]),
        "previousUsers": len(previous or {}),
        "rosterEntries": len(roster or ()),
        "rosterMissing": len(roster_section["missing"]),
        "rosterDisabled": len(roster_section["disabled"]),
        "rosterAmbiguous": len(roster_section["ambiguous"]),
        "rosterNoEntraId": len(roster_section["noEntraId"]),
        **{name: len(items) for name, items in changes.items()},
    }
    report = {"generatedAt": generated_at, "counts": counts, "roster": roster_section, "changes": changes}
    snapshot = {"version": SNAPSHOT_VERSION, "generatedAt": generated_at, "users": current}
    return json.dumps(snapshot, indent=1, sort_keys=True, ensure_ascii=False) + "\n", report


def summary(report: Mapping[str, Any]) -> str:
    """The one log line an operator reads."""
    c = report["counts"]
    return (
        f"reconciliation users={c['users']} disabled={c['usersDisabled']} noEntraId={c['usersNoEntraId']} "
        f"roster={c['rosterEntries']} missing={c['rosterMissing']} rosterDisabled={c['rosterDisabled']} "
        f"ambiguous={c['rosterAmbiguous']} rosterNoEntraId={c['rosterNoEntraId']} added={c['added']} "
        f"removed={c['removed']} newlyDisabled={c['disabled']} newlyEnabled={c['enabled']} "
        f"emailChanged={c['emailChanged']}"
    )


def run_reconciliation(
    runtime: Runtime,
    roster_csv: str | bytes | None,
    previous_snapshot: str | bytes | None,
    *,
    now: datetime,
) -> tuple[str, dict[str, Any]]:
    """Page all users once, refresh the instance's user cache with them, and reconcile.

    The inputs are validated first so a broken roster costs no Dataverse call.  The paging runs under
    the job deadline (JOB_DEADLINE_SECONDS, validated against functionTimeout): a throttled run stops
    waiting with the transient ``job_deadline_exceeded`` before the host abandons the timer invocation,
    and the next schedule runs it again.
    """
    parse_roster(roster_csv)
    parse_snapshot(previous_snapshot)
    correlation_id = f"reconcile-{_iso(now)}"
    limit = runtime.settings.job_deadline_seconds
    with deadline.within(limit, kind=deadline.JOB, setting="JOB_DEADLINE_SECONDS"):
        users = list(runtime.users.all_users(correlation_id=correlation_id))
    runtime.users.prime(users)
    snapshot, report = reconcile(users, roster_csv, previous_snapshot, now=now)
    log.info("%s rosterFile=%s previousSnapshot=%s", summary(report),
             "none" if roster_csv is None else "read", "none" if previous_snapshot is None else "read")
    return snapshot, report
