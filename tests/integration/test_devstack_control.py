"""The stack itself: state file, control API, the fixed `default` sandbox, Azurite, `devstack exec`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from devstack.control import ControlError, Stack
from devstack.sandboxes import DEFAULT_CLIENT_ID, DEFAULT_IDENTITY_HEADER, DEFAULT_TENANT_ID

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_state_file_names_every_service(stack: Stack) -> None:
    state = stack.state
    assert {"pid", "ca_bundle", "control_url", "urls", "azurite"} <= state.keys()
    assert set(state["urls"]) == {"identity", "entra", "keyvault", "dataverse"}
    assert Path(state["ca_bundle"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    for name in ("entra", "keyvault", "dataverse"):
        assert state["urls"][name].startswith("https://127.0.0.1:")
    assert stack.health()["ok"] is True


def test_default_sandbox_has_fixed_ids_and_cannot_be_deleted(stack: Stack) -> None:
    default = stack.sandbox("default")
    assert default.tenant_id == DEFAULT_TENANT_ID
    assert default.client_id == DEFAULT_CLIENT_ID
    assert default.identity_header == DEFAULT_IDENTITY_HEADER
    assert default.env["DATAVERSE_CLIENT_SECRET_NAME"] == "dataverse-client-secret"
    with pytest.raises(ControlError) as caught:
        default.delete()
    assert caught.value.status == 400


def test_sandbox_env_points_at_the_stack(stack: Stack) -> None:
    sbx = stack.create_sandbox(seed="empty")
    try:
        env = sbx.env
        assert env["DATAVERSE_URL"] == stack.urls["dataverse"]
        assert env["KEY_VAULT_URL"] == stack.urls["keyvault"]
        assert env["AZURE_AUTHORITY_HOST"] == stack.urls["entra"]
        assert env["IDENTITY_ENDPOINT"] == stack.urls["identity"] + "/msi/token"
        assert env["REQUESTS_CA_BUNDLE"] == stack.ca_bundle
        assert env["DATAVERSE_TENANT_ID"] == sbx.tenant_id != DEFAULT_TENANT_ID
    finally:
        sbx.delete()
    with pytest.raises(ControlError) as caught:
        sbx.counters()
    assert caught.value.status == 404


def test_named_sandbox_ids_are_unique(stack: Stack) -> None:
    name = f"it-{uuid.uuid4().hex[:8]}"
    sbx = stack.create_sandbox(seed="empty", sandbox_id=name)
    try:
        assert sbx.id == name
        with pytest.raises(ControlError) as caught:
            stack.create_sandbox(seed="empty", sandbox_id=name)
        assert caught.value.status == 400
    finally:
        sbx.delete()


def test_azurite_queue_works_with_the_connection_string(stack: Stack) -> None:
    if not stack.azurite:
        pytest.skip("stack started without Azurite")
    from azure.storage.queue import QueueClient

    name = f"it-{uuid.uuid4().hex[:12]}"
    queue = QueueClient.from_connection_string(stack.azurite["connection_string"], name)
    queue.create_queue()
    try:
        queue.send_message("hello")
        assert [m.content for m in queue.receive_messages()] == ["hello"]
    finally:
        queue.delete_queue()


def test_exec_runs_the_command_against_a_fresh_stack_and_returns_its_status(tmp_path: Path) -> None:
    probe = (
        "import json, os, sys; state = json.load(open(os.environ['DEVSTACK_STATE'])); "
        "assert os.environ['REQUESTS_CA_BUNDLE'] == state['ca_bundle']; "
        f"open({str(tmp_path / 'seen.json')!r}, 'w').write(json.dumps(state)); sys.exit(7)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEVSTACK_STATE"}
    result = subprocess.run([sys.executable, "-m", "devstack", "exec", "--no-azurite", "--",
                             sys.executable, "-c", probe], cwd=ROOT, env=env, timeout=60, check=False)

    assert result.returncode == 7
    seen = json.loads((tmp_path / "seen.json").read_text())
    # Torn down: its state file is gone with its temporary directory.
    assert not Path(seen["ca_bundle"]).parent.exists()
