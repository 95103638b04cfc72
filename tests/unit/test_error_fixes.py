"""One fix text per error code (shared.errors.FIXES): every code shared/ raises has one, and the error
messages and /api/diagnostics say the same thing with the same portal path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import responses

from shared import diagnostics
from shared.dataverse import DataverseClient
from shared.errors import (
    _DATAVERSE_CODE_NAMES,
    _PERMANENT_STATUS_CODES,
    FIXES,
    PORTAL_APP_USERS,
    AuthError,
    ConfigurationError,
    DataverseError,
    fix_for,
)
from shared.settings import Settings

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETTINGS = Settings(
    dataverse_url="https://org.crm.dynamics.com",
    tenant_id="11111111-2222-3333-4444-555555555555",
    client_id="66666666-7777-8888-9999-000000000000",
    key_vault_url="https://kv.vault.azure.net",
)


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def codes_raised_in_shared() -> set[str]:
    """Every machine code written in shared/: ``code=...`` arguments, ``code = ...`` class defaults,
    the webhook's ``_fail(status, code, ...)`` answers and DataverseError's status/Dataverse-code maps."""
    codes: set[str] = set(_PERMANENT_STATUS_CODES.values()) | set(_DATAVERSE_CODE_NAMES.values())
    for path in sorted(SHARED.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "code":
                        codes |= _strings(keyword.value)
                name = node.func.id if isinstance(node.func, ast.Name) else None
                if name == "_fail" and len(node.args) >= 2:
                    codes |= _strings(node.args[1])
            elif isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, ast.Assign):
                        targets = statement.targets
                    elif isinstance(statement, ast.AnnAssign):
                        targets = [statement.target]
                    else:
                        continue
                    named_code = any(isinstance(t, ast.Name) and t.id == "code" for t in targets)
                    if named_code and statement.value is not None:
                        codes |= _strings(statement.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "code_for":
                for returned in ast.walk(node):
                    if isinstance(returned, ast.Return) and returned.value is not None:
                        codes |= _strings(returned.value)
    return codes


def test_the_scan_finds_the_codes_it_should() -> None:
    """Guards the scan itself: if it found nothing, the next test would prove nothing."""
    found = codes_raised_in_shared()
    for code in ("entity_not_found", "invalid_column", "record_not_found", "entra_invalid_client",
                 "keyvault_forbidden", "signature_invalid", "actor_disabled", "snapshot_invalid",
                 "roster_invalid", "dataverse_unreachable", "setting_missing"):
        assert code in found
    assert len(found) > 40


def test_every_code_raised_in_shared_has_a_fix_text() -> None:
    missing = sorted(codes_raised_in_shared() - set(FIXES))
    assert missing == [], f"add a fix text to shared.errors.FIXES for: {missing}"


def test_every_fix_text_fills_its_fields() -> None:
    for code in FIXES:
        text = fix_for(code, client_id="C", tenant_id="T", secret="S", vault="V", url="U", setting="X")
        assert text and "{" not in text.replace("{source}", ""), (code, text)


@pytest.mark.parametrize("code", sorted(FIXES))
def test_diagnostics_shows_the_same_fix_text(code: str) -> None:
    error = (ConfigurationError("DATAVERSE_URL", "is required", code=code) if code.startswith("setting_")
             else AuthError("x", code=code))
    expected = fix_for(code, client_id=SETTINGS.client_id, tenant_id=SETTINGS.tenant_id,
                       secret=SETTINGS.client_secret_name, vault=SETTINGS.key_vault_url,
                       url=SETTINGS.dataverse_url, setting=getattr(error, "setting", None))
    assert diagnostics._fix(error, SETTINGS) == expected


def test_one_portal_path_for_the_application_user() -> None:
    """The 401 a job gets and the diagnostics step say the same thing, with the same portal path."""
    mentions = [code for code, text in FIXES.items() if "Application users" in text]
    assert mentions and all(PORTAL_APP_USERS in FIXES[code] for code in mentions)
    for path in SHARED.glob("*.py"):
        if path.name != "errors.py":
            assert "Application users" not in path.read_text(encoding="utf-8"), path.name

    class Tokens:
        def get_token(self) -> str:
            return "t"

        def invalidate(self, token: str) -> None:
            return None

    client = DataverseClient(SETTINGS, Tokens(), sleep=lambda s: None)  # type: ignore[arg-type]
    api = f"{SETTINGS.dataverse_url}/api/data/v9.2/"
    with responses.RequestsMock() as mock:
        mock.get(f"{api}WhoAmI", status=401)
        mock.get(f"{api}WhoAmI", status=401)
        with pytest.raises(DataverseError) as info:
            client.whoami()
        mock.get(f"{api}WhoAmI", status=403, json={"error": {"code": "0x8004A110", "message": "no"}})
        with pytest.raises(DataverseError) as privilege:
            client.whoami()
    for error in (info.value, privilege.value):
        assert diagnostics._fix(error, SETTINGS) in error.message, error.message
