"""``make run`` end to end: the demo as a subprocess on free ports, its accounting, and no orphans.

The demo starts its own stack (emulators + Azurite) and local host, so it never touches a developer's
running stack or the session stack of ``make test``.  The pure parts (the job plan and the outcome
checker) are tested without any process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from devstack import demo

ROOT = Path(__file__).resolve().parent.parent.parent
JOBS = 30
EXPECTED_REASONS = {"actor_ambiguous": 1, "actor_disabled": 2, "actor_not_found": 1, "record_not_found": 1}
ANSI = re.compile(r"\x1b\[")


@pytest.mark.e2e
def test_make_run_accounts_for_every_job_and_stops_everything(tmp_path: Path) -> None:
    report = tmp_path / "demo.json"
    completed = subprocess.run(
        [sys.executable, "-m", "devstack.demo", "--ports", "auto", "--jobs", str(JOBS),
         "--json", str(report)],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=110,
    )
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    result = json.loads(report.read_text(encoding="utf-8"))

    dead = sum(EXPECTED_REASONS.values())
    assert result["ok"] is True
    assert result["written"] == JOBS - dead
    assert result["writtenAsWrongUser"] == []
    assert result["deadLetterReasons"] == EXPECTED_REASONS
    assert (result["poison"], result["queued"], result["unexpected"]) == (0, 0, [])
    counters = result["counters"]
    assert counters["entra"]["POST token"] == 1
    assert counters["keyvault"]["GET secret"] == 3  # client secret, webhook key, message key: once each
    assert counters["dataverse"]["GET systemusers"] == result["lookupsExpected"] == 7
    assert counters["dataverse"].get("impersonation:ignored", 0) == 0
    roster = result["reconciliation"]
    assert (roster["rosterEntries"], roster["rosterMissing"], roster["rosterDisabled"],
            roster["rosterAmbiguous"], roster["rosterNoEntraId"]) == (7, 1, 1, 1, 1)
    assert result["reportBlob"].startswith("reconciliation/reports/")

    accounting = f"Accounting: {JOBS} jobs = {JOBS - dead} written as the right user + {dead} dead-lettered"
    assert accounting in output
    assert "→ OK" in output
    assert re.search(r"Noentra <noentra@contoso.com>\s+MSCRMCallerID", output)
    assert re.search(r"Jane Doe <jane@contoso.com>\s+CallerObjectId", output)
    assert re.search(r"Entra token requests\s+1 ", output)
    assert not ANSI.search(output), "colour codes on a pipe"
    assert len(output.splitlines()) <= 60

    # Everything it started is gone: its children, Azurite (cwd inside its directory), the directory.
    assert len(result["pids"]) == 2
    assert not any(psutil.pid_exists(pid) for pid in result["pids"])
    assert _processes_using(result["stateDir"]) == []
    assert not Path(result["stateDir"]).exists()


@pytest.mark.e2e
def test_make_run_federated_has_no_client_secret_anywhere(tmp_path: Path) -> None:
    """`make run ARGS=--credential federated`: the whole demo with the managed identity as the credential."""
    report = tmp_path / "demo.json"
    completed = subprocess.run(
        [sys.executable, "-m", "devstack.demo", "--ports", "auto", "--jobs", str(JOBS),
         "--credential", "federated", "--json", str(report)],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=110,
    )
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    result = json.loads(report.read_text(encoding="utf-8"))
    assert result["ok"] is True and result["credential"] == "federated"
    assert result["written"] == JOBS - sum(EXPECTED_REASONS.values())
    assert result["clientSecretsFound"] == []
    counters = result["counters"]
    assert counters["entra"]["POST token"] == 1
    assert counters["identity"]["token-exchange"] == 1  # one client assertion for the one token
    assert counters["keyvault"]["GET secret"] == 2  # the webhook key and the queue message key only
    assert re.search(r"DATAVERSE_CREDENTIAL=federated: client secrets .*: none → OK", output)
    assert len(output.splitlines()) <= 60


def _processes_using(directory: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        text = " ".join(process.info["cmdline"] or []) + " " + str(process.info["cwd"] or "")
        if directory in text:
            found.append(process.info["pid"])
    return found


def test_the_plan_targets_each_contact_once_per_phase_and_updates_by_someone_else() -> None:
    plan = demo.plan_jobs(60)
    assert len(plan) == 60
    assert len({p.id for p in plan}) == 60
    for phase in (1, 2):
        contacts = [p.contact for p in plan if p.phase == phase]
        assert len(contacts) == len(set(contacts))
    assert Counter(p.expect for p in plan if p.expect != demo.WRITTEN) == Counter(EXPECTED_REASONS)
    creators = {p.contact: p.actor for p in plan if p.phase == 1}
    for update in (p for p in plan if p.phase == 2 and p.expect == demo.WRITTEN):
        assert update.job["operation"] == "update"
        assert update.actor != creators[update.contact]
    assert all(p.phase == 1 for p in plan[:54]) and all(p.phase == 2 for p in plan[54:])
    assert {p.actor for p in plan} >= {"jane@contoso.com", "noentra@contoso.com", None}
    assert all(len(json.dumps({"jobs": [p.job for p in plan[i:i + 100]]})) < 1024 * 1024
               for i in range(0, len(plan), 100))


def _planned(job_id: str, actor: str | None, expect: str) -> demo.Planned:
    return demo.Planned({"id": job_id}, 1, actor, expect, f"{job_id}@example.com", ("description", job_id))


def _users() -> demo.Users:
    rows = [
        {"systemuserid": "A", "internalemailaddress": "app@x", "fullname": "app", "applicationid": "c"},
        {"systemuserid": "J", "internalemailaddress": "jane@contoso.com", "fullname": "Jane",
         "azureactivedirectoryobjectid": "oid"},
    ]
    return demo.Users(rows, "a")


def test_a_write_recorded_as_the_application_user_is_not_counted_as_written() -> None:
    """Dataverse's silent fallback (an ignored caller id) must fail the accounting, not pass it."""
    job = _planned("j1", "jane@contoso.com", demo.WRITTEN)
    records = [{"emailaddress1": "j1@example.com", "description": "j1", "_createdby_value": "a"}]
    outcome = demo.Outcome()
    demo.check_records([job], records, _users(), outcome)
    assert outcome.written == []
    assert outcome.wrong_user == [(job, "a")]

    records[0]["_createdby_value"] = "J"
    demo.check_records([job], records, _users(), outcome)
    assert outcome.written == [job] and outcome.wrong_user == []


def test_unexpected_outcomes_name_every_mismatch() -> None:
    written = _planned("w", None, demo.WRITTEN)
    disabled = _planned("d", "disabled@contoso.com", "actor_disabled")
    missing = _planned("m", "nobody@contoso.com", "actor_not_found")
    outcome = demo.Outcome(dead={
        "w": {"reason": "dataverse_bad_request", "detail": "boom"},
        "d": {"reason": "actor_not_found", "detail": "?"},
        "zz": {"reason": "invalid_job"},
    })
    problems = demo.unexpected_outcomes([written, disabled, missing], outcome)
    assert problems == [
        "w: dead-lettered (dataverse_bad_request: boom), expected written",
        "d: dead-lettered as actor_not_found, expected actor_disabled",
        "m: neither written nor dead-lettered, expected dead-letter actor_not_found",
        "dead-letter for a job the demo did not send: zz",
    ]
    assert demo.unexpected_outcomes([written], demo.Outcome(written=[written])) == []
