"""checkov over infra/ (Bicep, offline): zero failed checks, every file scanned, every skip reasoned and used.

checkov lives in its own venv (it pins older pycep/packaging): `make install` builds .venv-checkov and
`make test` passes its path in CHECKOV. A missing checkov is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra.conftest import INFRA, ROOT

# One worker runs checkov once for all the tests here (`make test` uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("checkov")

_SKIP = re.compile(r"//\s*checkov:skip=(CKV2?_[A-Z]+_\d+)(?::(.*))?$", re.MULTILINE)


def _checkov() -> str:
    path = os.environ.get("CHECKOV") or str(ROOT / ".venv-checkov" / "bin" / "checkov")
    assert Path(path).is_file(), f"checkov not found at {path}: run `make install` (or set CHECKOV)"
    return path


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    completed = subprocess.run(
        # graph/ holds the Microsoft Graph extension module: checkov's pycep (0.5) cannot parse the
        # `extension` keyword and has no Graph checks; test_templates checks it (newer pycep) instead.
        [_checkov(), "--framework", "bicep", "--skip-download", "--output", "json", "-d", str(INFRA),
         "--skip-path", "graph/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.stdout.strip(), (
        f"checkov printed nothing (exit {completed.returncode}): {completed.stderr}"
    )
    data = json.loads(completed.stdout)
    result: dict[str, Any] = data[0] if isinstance(data, list) else data
    assert result.get("check_type") == "bicep", result
    return result


def _file(check: dict[str, Any]) -> str:
    return str(check["file_path"]).lstrip("/")


def test_checkov_finds_no_failed_check(report: dict[str, Any]) -> None:
    failed = [
        f"{c['check_id']} {c['resource']} ({_file(c)}): {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert report["summary"]["failed"] == 0 and not failed, "checkov failed:\n" + "\n".join(failed)


def test_checkov_parsed_and_scanned_every_template(report: dict[str, Any]) -> None:
    """An unparsable file is silently not scanned: that would hide failures, so it fails here."""
    assert report["summary"]["parsing_errors"] == 0, report["results"].get("parsing_errors")
    results = report["results"]
    scanned = {_file(c) for kind in ("passed_checks", "skipped_checks") for c in results[kind]}
    with_checked_resources = {
        "modules/storage.bicep",
        "modules/keyvault.bicep",
        "modules/functionapp.bicep",
        "modules/network.bicep",
    }
    assert with_checked_resources <= scanned, f"not scanned: {with_checked_resources - scanned}"


def test_every_skip_has_a_reason_and_is_used(report: dict[str, Any]) -> None:
    skipped = {(c["check_id"], _file(c)) for c in report["results"]["skipped_checks"]}
    declared = set()
    for path in INFRA.rglob("*.bicep"):
        relative = path.relative_to(INFRA).as_posix()
        for check_id, reason in _SKIP.findall(path.read_text()):
            assert len(reason.strip()) > 15, f"{relative}: skip of {check_id} needs a one-line reason"
            declared.add((check_id, relative))
    assert declared == skipped, f"stale skips: {declared - skipped}; unexplained skips: {skipped - declared}"


def test_checkov_evaluates_the_security_properties(report: dict[str, Any]) -> None:
    """The checks that matter ran and passed (not merely 'not failed' because nothing was read)."""
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    expected = {
        "CKV_AZURE_3",
        "CKV_AZURE_44",
        "CKV_AZURE_34",  # storage: HTTPS, TLS 1.2, private containers
        "CKV_AZURE_42",
        "CKV_AZURE_109",
        "CKV_AZURE_110",
        "CKV_AZURE_111",  # vault: recoverable, firewall
        "CKV_AZURE_14",
        "CKV_AZURE_15",
        "CKV_AZURE_18",
        "CKV_AZURE_70",  # app: HTTPS, TLS, HTTP/2
        "CKV_AZURE_72",
        "CKV_AZURE_71",  # app: no debug, identity
    }
    assert expected <= passed, f"did not pass: {sorted(expected - passed)}"
    # Flex Consumption has no FTP endpoint and rejects siteConfig.ftpsState, so "FTP disabled" is skipped.
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert "CKV_AZURE_78" in skipped and "CKV_AZURE_78" not in passed
