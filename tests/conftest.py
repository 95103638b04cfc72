"""Shared fixtures: one local stack per test session, one fresh sandbox per test.

Under ``python -m devstack exec -- pytest`` (``make test``) the stack already runs and
``DEVSTACK_STATE`` names it.  Otherwise the first test that asks for ``stack`` starts
``python -m devstack up --ports auto`` for the session, so ``pytest tests/integration/...`` just
works.  Unit tests never touch these fixtures.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.control import SandboxClient, Stack

ROOT = Path(__file__).resolve().parent.parent


def _start_stack(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    state = tmp / "state.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "up", "--ports", "auto", "--state", str(state)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    # `up` prints one line once every service answers; EOF means it died (its stderr says why).
    line = process.stdout.readline()
    if not line.startswith("devstack ready"):
        process.kill()
        process.wait()
        raise RuntimeError(f"devstack did not start (exit {process.returncode}); see its stderr above")
    return process, state


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = os.environ.get("DEVSTACK_STATE")
    process: subprocess.Popen[str] | None = None
    if not state:
        process, state_path = _start_stack(tmp_path_factory.mktemp("devstack"))
        state = str(state_path)
    saved = {name: os.environ.get(name) for name in ("DEVSTACK_STATE", "REQUESTS_CA_BUNDLE")}
    try:
        stack = Stack.from_state(state)
        # Like `devstack exec`: whatever the tests build (SDK clients, sessions) trusts the stack's CA.
        os.environ["DEVSTACK_STATE"] = state
        os.environ["REQUESTS_CA_BUNDLE"] = stack.ca_bundle
        yield stack
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def sandbox(stack: Stack) -> Iterator[SandboxClient]:
    """A fresh, isolated tenant (default seed) deleted after the test."""
    sbx = stack.create_sandbox()
    try:
        yield sbx
    finally:
        with contextlib.suppress(Exception):
            sbx.delete()


def _reset_app_state() -> None:
    from shared.settings import reset_settings

    reset_settings()
    with contextlib.suppress(ImportError):
        runtime = importlib.import_module("shared.runtime")
        runtime.reset_runtime()


@pytest.fixture
def sandbox_env(
    sandbox: SandboxClient, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SandboxClient]:
    """``sandbox`` with its settings in os.environ and the app's cached settings/runtime dropped.

    ``AzureWebJobsStorage`` points at the stack's Azurite: the app keeps shared state (the webhook
    replay window) in its storage account, as the host keeps its queues there.
    """
    for name, value in sandbox.env.items():
        monkeypatch.setenv(name, value)
    if stack.azurite.get("connection_string"):
        monkeypatch.setenv("AzureWebJobsStorage", stack.azurite["connection_string"])
    # A test runner's own Azure settings must not leak into the app under test.
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE",
                 "MSI_ENDPOINT", "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT"):
        monkeypatch.delenv(name, raising=False)
    _reset_app_state()
    from tests import signing

    signing.CURRENT.append(sandbox)
    try:
        yield sandbox
    finally:
        signing.CURRENT.remove(sandbox)
        _reset_app_state()
