"""End-to-end fixtures: the local Functions host as a subprocess against Azurite (and the emulators).

Each test starts its own host with its own queue names (``SYNC_QUEUE_NAME``), so tests can run in
parallel against the one Azurite of the session stack.  Tests wait on the host's own log lines
("Executed 'Functions.x' (Succeeded ...)", "Moved message ... to queue ...") — each is written only
after the effect it reports — rather than sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack import host as local_host
from devstack.control import Stack

ROOT = Path(__file__).resolve().parent.parent.parent
FUNCTION_KEY = "e2e-function-key"
MASTER_KEY = "e2e-master-key"
_STARTED = re.compile(r"Host started \(port (\d+)")


class HostProcess:
    """A running ``python -m devstack.host`` and everything it has logged so far."""

    def __init__(self, process: subprocess.Popen[str], env: Mapping[str, str]) -> None:
        self.process = process
        self.env = dict(env)
        self.lines: list[str] = []
        self.port = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<exited>")
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        with self._changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> None:
        """Until ``count`` log lines match ``pattern``; fails with the log if the host exits or time is up."""
        regex = re.compile(pattern)

        def done() -> bool:
            return sum(1 for line in self.lines if regex.search(line)) >= count or "<exited>" in self.lines

        with self._changed:
            self._changed.wait_for(done, timeout=timeout)
            matched = sum(1 for line in self.lines if regex.search(line))
        if matched < count:
            raise AssertionError(
                f"expected {count} log lines matching {pattern!r}, saw {matched}:\n{self.log}"
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(
        self, method: str, path: str, *, key: str | None = FUNCTION_KEY, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if key:
            headers["x-functions-key"] = key
        return requests.request(method, self.url(path), headers=headers, timeout=30, **kwargs)

    def run_function(self, name: str, text: str = "") -> requests.Response:
        return self.call("POST", f"/admin/functions/{name}", key=MASTER_KEY, json={"input": text})

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        return self.process.returncode


@pytest.fixture(scope="session")
def azurite_connection(stack: Stack) -> str:
    connection = stack.azurite.get("connection_string")
    if not connection:
        pytest.skip("the devstack state has no Azurite")
    return connection


@pytest.fixture
def queue_name() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


StartHost = Callable[..., HostProcess]


@pytest.fixture
def start_host(azurite_connection: str, tmp_path: Path) -> Iterator[StartHost]:
    """``start_host(app=..., env={...}, host_json={...}, script_root=...)`` -> a ready HostProcess."""
    started: list[HostProcess] = []

    def start(
        *,
        app: str = "tests.e2e.sample_app",
        env: Mapping[str, str] | None = None,
        host_json: Mapping[str, Any] | None = None,
        script_root: Path | None = None,
    ) -> HostProcess:
        root = script_root
        if root is None:
            root = tmp_path / f"root{len(started)}"
            root.mkdir()
            (root / "host.json").write_text(json.dumps(host_json or {"version": "2.0"}))
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(tmp_path)),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "AzureWebJobsStorage": azurite_connection,
            "LOCAL_FUNCTION_KEY": FUNCTION_KEY,
            "LOCAL_MASTER_KEY": MASTER_KEY,
            **(env or {}),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack.host", "--app", app, "--port", "0", "--script-root", str(root),
             "--settings", str(tmp_path / "no-local-settings.json")],
            cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        running = HostProcess(process, full_env)
        started.append(running)
        running.wait_for(r"Host started \(port \d+|Host failed to start", timeout=60)
        match = next((m for m in map(_STARTED.search, running.lines) if m), None)
        if match is None:
            raise AssertionError(f"the host did not start:\n{running.log}")
        running.port = int(match.group(1))
        return running

    yield start
    for running in started:
        running.stop()


def queue_texts(connection: str, name: str, *, encoded: bool = True) -> list[str]:
    """Every message on a queue (peek, up to 32), base64-decoded unless ``encoded`` is False."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.queue import QueueClient

    client = QueueClient.from_connection_string(connection, name, message_decode_policy=None)
    try:
        wire = [str(m.content) for m in client.peek_messages(max_messages=32)]
    except ResourceNotFoundError:
        return []
    return [local_host.decode_message(w).decode() if encoded else w for w in wire]  # type: ignore[union-attr]


def send_raw(connection: str, name: str, wire_text: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.queue import QueueClient

    client = QueueClient.from_connection_string(connection, name, message_encode_policy=None)
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()
    client.send_message(wire_text)


def blob_text(connection: str, container: str, name: str) -> str | None:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    try:
        data = BlobServiceClient.from_connection_string(connection).get_blob_client(container, name)
        return bytes(data.download_blob().readall()).decode("utf-8")
    except ResourceNotFoundError:
        return None


def blob_names(connection: str, container: str, prefix: str = "") -> list[str]:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(connection).get_container_client(container)
    try:
        return [b.name for b in client.list_blobs(name_starts_with=prefix or None)]
    except ResourceNotFoundError:
        return []


def put_blob(connection: str, container: str, name: str, text: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(connection)
    with contextlib.suppress(ResourceExistsError):
        service.create_container(container)
    service.get_blob_client(container, name).upload_blob(text.encode("utf-8"), overwrite=True)
