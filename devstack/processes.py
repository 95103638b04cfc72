"""Child processes of the local stack that die with it.

``make run``, ``python -m devstack exec``, Azurite and the soak's host are started as children; if their
parent is killed without cleaning up (SIGKILL, an OOM kill, a crashed test runner), they must not live on
holding the fixed ports, so the next ``make run`` finds them free.  On Linux every child is spawned with
``PR_SET_PDEATHSIG`` (the kernel sends it SIGTERM when its parent goes); elsewhere the callers' own
cleanup is all there is.

The kernel ties the signal to the *thread* that forked: spawn long-lived children from a thread that
lives as long as they should (the main thread, in this project).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> Callable[[], None]:
    def in_child() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **popen)``, and on Linux the child gets SIGTERM when this process dies."""
    if sys.platform.startswith("linux"):
        if "preexec_fn" in popen:
            raise TypeError("spawn() sets preexec_fn itself")
        popen["preexec_fn"] = _die_with(os.getpid())
    return subprocess.Popen(list(argv), **popen)
