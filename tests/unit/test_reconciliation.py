"""User reconciliation: roster parsing, the report's categories and changes, determinism."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.reconciliation import (
    ReconciliationError,
    parse_roster,
    parse_snapshot,
    reconcile,
    run_reconciliation,
    summary,
)
from tests.unit.functions_fakes import (
    DISABLED,
    JANE,
    JOHN,
    SHARED_A,
    SHARED_B,
    USERS,
    FakeRuntime,
    FakeUsers,
    user,
)

NOW = datetime(2024, 5, 1, 6, 0, 0, tzinfo=UTC)
LATER = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

ROSTER = (
    "email,externalId\n"
    "jane@contoso.com,E1\n"
    "JOHN@Contoso.com ,E2\n"
    "disabled@contoso.com,E3\n"
    "shared@contoso.com,E4\n"
    "ghost@contoso.com,E5\n"
)


# --- roster parsing ----------------------------------------------------------------------------------


def test_roster_tolerates_bom_blank_lines_case_spaces_and_extra_columns() -> None:
    text = (
        "\ufeff Email , Department, EXTERNALID\r\n\r\n  Jane@Contoso.COM ,Sales, E1 \r\n,,\r\nbob@x.org,,\r\n"
    )
    entries = parse_roster(text)
    assert entries is not None
    assert [(e.email, e.external_id) for e in entries] == [("jane@contoso.com", "E1"), ("bob@x.org", None)]


def test_roster_without_external_id_and_as_bytes() -> None:
    entries = parse_roster(b"\xef\xbb\xbfemail\njane@contoso.com\njane@contoso.com\n")
    assert entries is not None and [(e.email, e.external_id) for e in entries] == [("jane@contoso.com", None)]


def test_roster_quoted_cells() -> None:
    entries = parse_roster('email,externalId\n"o\'brien@contoso.com","A, B"\n')
    assert (
        entries is not None and entries[0].email == "o'brien@contoso.com" and entries[0].external_id == "A, B"
    )


def test_no_roster_is_none() -> None:
    assert parse_roster(None) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("\n\n", "empty"),
        ("name,externalId\nx,1\n", "no email column"),
        ("email\nnot-an-email\n", "line 2"),
        ("email,externalId\n,E1\n", "line 2: the email cell is empty"),
        ("email\njane@contoso.com,extra\n", "line 2"),
        ('email\n"unterminated\n', "line"),
        (b"email\nj\xe9r\xf4me@contoso.com\n", "not UTF-8"),
    ],
)
def test_malformed_roster_is_a_clear_error(text: str | bytes, needle: str) -> None:
    with pytest.raises(ReconciliationError) as caught:
        parse_roster(text)
    assert caught.value.code == "roster_invalid"
    assert "reconciliation/roster.csv" in caught.value.message and needle in caught.value.message


@pytest.mark.parametrize("text", ["{", "[]", '{"users": []}', '{"users": {"a": 1}}'])
def test_malformed_snapshot_is_a_clear_error(text: str) -> None:
    with pytest.raises(ReconciliationError) as caught:
        parse_snapshot(text)
    assert caught.value.code == "snapshot_invalid" and "delete" in caught.value.message


# --- report ----------------------------------------------------------------------------------------


def test_roster_categories() -> None:
    _, report = reconcile(USERS, ROSTER, None, now=NOW)
    roster = report["roster"]
    assert roster["missing"] == [{"email": "ghost@contoso.com", "externalId": "E5"}]
    assert roster["disabled"] == [
        {"email": "disabled@contoso.com", "externalId": "E3", "systemUserId": DISABLED.systemuserid}
    ]
    assert roster["ambiguous"] == [
        {
            "email": "shared@contoso.com",
            "externalId": "E4",
            "systemUserIds": sorted([SHARED_A.systemuserid, SHARED_B.systemuserid]),
        }
    ]
    assert roster["noEntraId"] == [
        {"email": "john@contoso.com", "externalId": "E2", "systemUserId": JOHN.systemuserid}
    ]
    counts = report["counts"]
    assert (counts["rosterEntries"], counts["rosterMissing"], counts["rosterDisabled"]) == (5, 1, 1)
    assert (counts["rosterAmbiguous"], counts["rosterNoEntraId"]) == (1, 1)
    assert (counts["users"], counts["usersDisabled"], counts["usersNoEntraId"]) == (5, 1, 1)
    assert set(report) == {"generatedAt", "counts", "roster", "changes"}
    assert report["generatedAt"] == "2024-05-01T06:00:00Z"


def test_without_roster_the_roster_section_is_empty() -> None:
    _, report = reconcile(USERS, None, None, now=NOW)
    assert report["roster"] == {"missing": [], "disabled": [], "ambiguous": [], "noEntraId": []}
    assert report["counts"]["rosterEntries"] == 0


def test_first_run_lists_everyone_as_added() -> None:
    _, report = reconcile(USERS, None, None, now=NOW)
    assert [c["systemUserId"] for c in report["changes"]["added"]] == sorted(u.systemuserid for u in USERS)
    assert report["counts"]["previousUsers"] == 0


def test_changes_since_the_previous_snapshot() -> None:
    previous, _ = reconcile(USERS, None, None, now=NOW)
    newcomer = user("new@contoso.com")
    jane_disabled = user("jane@contoso.com", uid=JANE.systemuserid, disabled=True)
    disabled_enabled = user("disabled@contoso.com", uid=DISABLED.systemuserid)
    john_moved = user("john.smith@contoso.com", uid=JOHN.systemuserid, oid=None)
    now_users = [jane_disabled, john_moved, disabled_enabled, SHARED_A, newcomer]  # SHARED_B removed
    _, report = reconcile(now_users, None, previous, now=LATER)
    changes = report["changes"]
    assert changes["added"] == [{"systemUserId": newcomer.systemuserid, "email": "new@contoso.com"}]
    assert changes["removed"] == [{"systemUserId": SHARED_B.systemuserid, "email": "shared@contoso.com"}]
    assert changes["disabled"] == [{"systemUserId": JANE.systemuserid, "email": "jane@contoso.com"}]
    assert changes["enabled"] == [{"systemUserId": DISABLED.systemuserid, "email": "disabled@contoso.com"}]
    assert changes["emailChanged"] == [
        {"systemUserId": JOHN.systemuserid, "from": "john@contoso.com", "to": "john.smith@contoso.com"}
    ]
    counts = report["counts"]
    assert [counts[k] for k in ("added", "removed", "disabled", "enabled", "emailChanged")] == [1, 1, 1, 1, 1]


def test_email_case_change_is_not_an_email_change() -> None:
    previous, _ = reconcile([JANE], None, None, now=NOW)
    recased = user("JANE@contoso.com", uid=JANE.systemuserid)
    _, report = reconcile([recased], None, previous, now=LATER)
    assert report["changes"]["emailChanged"] == []


def test_safe_to_run_twice_and_deterministic() -> None:
    first_snapshot, first_report = reconcile(USERS, ROSTER, None, now=NOW)
    shuffled = list(USERS)
    random.Random(7).shuffle(shuffled)
    again_snapshot, again_report = reconcile(shuffled, ROSTER, None, now=NOW)
    assert again_snapshot == first_snapshot and again_report == first_report
    # second run over the first run's snapshot: nothing changed
    second_snapshot, second_report = reconcile(USERS, ROSTER, first_snapshot, now=NOW)
    assert second_snapshot == first_snapshot
    assert all(items == [] for items in second_report["changes"].values())
    assert second_report["roster"] == first_report["roster"]


def test_snapshot_is_keyed_by_systemuserid() -> None:
    snapshot, _ = reconcile([JANE, JOHN], None, None, now=NOW)
    document = json.loads(snapshot)
    assert document["version"] == 1 and document["generatedAt"] == "2024-05-01T06:00:00Z"
    assert document["users"][JANE.systemuserid] == {
        "email": "jane@contoso.com",
        "fullName": JANE.fullname,
        "azureAdObjectId": JANE.azure_ad_object_id,
        "isDisabled": False,
        "accessMode": 0,
    }
    assert parse_snapshot(snapshot) == document["users"]


def test_summary_is_one_line() -> None:
    _, report = reconcile(USERS, ROSTER, None, now=NOW)
    line = summary(report)
    assert "\n" not in line and "users=5" in line and "missing=1" in line and "ambiguous=1" in line


# --- run_reconciliation ---------------------------------------------------------------------------------


def test_run_pages_users_once_and_primes_the_cache() -> None:
    runtime = FakeRuntime()
    snapshot, report = run_reconciliation(runtime, ROSTER, None, now=NOW)  # type: ignore[arg-type]
    assert runtime.users.all_users_calls == 1
    assert runtime.users.primed == USERS
    assert report["counts"]["users"] == len(USERS) and json.loads(snapshot)["users"]


def test_bad_roster_costs_no_dataverse_call() -> None:
    runtime = FakeRuntime(users=FakeUsers())
    with pytest.raises(ReconciliationError):
        run_reconciliation(runtime, "name\nx\n", None, now=NOW)  # type: ignore[arg-type]
    assert runtime.users.all_users_calls == 0 and runtime.users.primed is None


def test_the_user_paging_stops_at_the_job_deadline() -> None:
    """Throttled paging would otherwise run past functionTimeout: the host abandons the timer mid-run."""
    from shared import deadline
    from shared.deadline import DeadlineExceeded

    seen: list[deadline.Deadline | None] = []

    class ThrottledUsers(FakeUsers):  # type: ignore[misc]
        def all_users(self, *, correlation_id: str | None = None) -> list[Any]:
            current = deadline.current()
            seen.append(current)
            assert current is not None
            current.check_wait(10_000, "GET systemusers answered 429")  # what DataverseClient does
            raise AssertionError("not reached")

    runtime = FakeRuntime(users=ThrottledUsers())
    with pytest.raises(DeadlineExceeded) as raised:
        run_reconciliation(runtime, ROSTER, None, now=NOW)  # type: ignore[arg-type]
    assert (raised.value.code, raised.value.transient) == ("job_deadline_exceeded", True)
    (used,) = seen
    assert used is not None and used.kind == deadline.JOB
    assert used.seconds == runtime.settings.job_deadline_seconds
    assert deadline.current() is None
