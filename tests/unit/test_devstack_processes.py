"""devstack.processes.spawn: a child of the local stack dies with its parent, even on SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.processes import spawn

ROOT = Path(__file__).resolve().parents[2]

# The middle process spawns a long sleeper with devstack.processes.spawn and prints its pid.
MIDDLE = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from devstack.processes import spawn
child = spawn([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_spawned_child_dies_when_its_parent_is_killed() -> None:
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        grandchild = int(middle.stdout.readline())
        assert _alive(grandchild)
        middle.kill()  # SIGKILL: no cleanup code runs in the parent
        middle.wait(timeout=30)
        deadline = time.monotonic() + 30  # a bound against hanging, not a timing assertion
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild), f"the child {grandchild} outlived its killed parent"
    finally:
        if middle.poll() is None:
            middle.kill()


def test_spawn_owns_preexec_fn() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    with pytest.raises(TypeError):
        spawn([sys.executable, "-c", "pass"], preexec_fn=os.getpid)
    done = spawn([sys.executable, "-c", "print('ok')"], stdout=subprocess.PIPE, text=True)
    assert done.communicate(timeout=60)[0].strip() == "ok"
