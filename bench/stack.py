"""The local stack as a child process of the benchmark, and CPU pinning of whole processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from devstack.control import Stack

ROOT = Path(__file__).resolve().parent.parent


class StackProcess:
    """``python -m devstack up --ports auto`` on free ports, stopped by ``close()``."""

    def __init__(self, *, azurite: bool) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-devstack-")
        self.state_path = Path(self._tmp.name) / "state.json"
        command = [sys.executable, "-m", "devstack", "up", "--ports", "auto", "--state", str(self.state_path)]
        if not azurite:
            command.append("--no-azurite")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("devstack ready"):
            self.close()
            raise RuntimeError(f"devstack did not start (exit {self.process.returncode})")
        self.stack = Stack.from_state(self.state_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self) -> dict[str, str]:
        """What a child needs to talk to this stack (the CA bundle and the state file)."""
        return {"DEVSTACK_STATE": str(self.state_path), "REQUESTS_CA_BUNDLE": self.stack.ca_bundle}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._tmp.cleanup()

    def __enter__(self) -> StackProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_process_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (``sched_setaffinity`` on a pid moves only its main thread)."""
    tasks = Path(f"/proc/{pid}/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def pinned(pid: int, cpus: set[int]) -> Iterator[None]:
    before = os.sched_getaffinity(pid)
    set_process_affinity(pid, cpus)
    try:
        yield
    finally:
        set_process_affinity(pid, before)
