"""``python -m devstack up|exec``: the whole local Azure stack in one process (plus Azurite).

``up`` runs until SIGTERM/SIGINT and prints ``devstack ready <state file>`` once every service
answers (so a parent can wait on that line instead of polling).  ``exec -- CMD`` brings the stack
up on free ports, runs CMD with ``DEVSTACK_STATE`` and ``REQUESTS_CA_BUNDLE`` set, tears down and
exits with CMD's status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from devstack import azurite
from devstack.processes import spawn
from devstack.stack import FIXED_PORTS, HOST, RunningStack

log = logging.getLogger("devstack")

def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) == 0


def _check_fixed_ports() -> None:
    busy = [p for p in (*FIXED_PORTS.values(), *azurite.FIXED_PORTS) if _port_in_use(p)]
    if busy:
        raise SystemExit(f"devstack: ports already in use: {busy} (another stack running? try --ports auto)")


class _Stop:
    """SIGTERM/SIGINT set an event; the main thread waits on it and tears down in order."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum
        self.event.set()


def cmd_up(args: argparse.Namespace) -> int:
    stop = _Stop()
    stop.install()
    if args.ports == "fixed":
        _check_fixed_ports()
    stack = RunningStack(Path(args.state).resolve(), fixed_ports=args.ports == "fixed",
                         with_azurite=not args.no_azurite)
    stack.start()
    try:
        print(f"devstack ready {stack.state_path}", flush=True)
        for name, url in sorted(stack.registry.urls.items()):
            log.info("%-9s %s", name, url)
        while not stop.event.wait(3600):
            pass
    finally:
        stack.stop()
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("devstack exec: nothing to run (usage: python -m devstack exec -- CMD ...)")
    stop = _Stop()
    stop.install()
    with tempfile.TemporaryDirectory(prefix="devstack-") as tmp:
        stack = RunningStack(Path(tmp) / "state.json", fixed_ports=False, with_azurite=not args.no_azurite)
        stack.start()
        try:
            env = dict(os.environ)
            env["DEVSTACK_STATE"] = str(stack.state_path)
            env["REQUESTS_CA_BUNDLE"] = str(stack.registry.ca_bundle)
            child = spawn(command, env=env)  # a killed `devstack exec` takes its command with it
            def wait_child() -> None:
                child.wait()
                stop.event.set()

            threading.Thread(target=wait_child, daemon=True).start()
            stop.event.wait()
            if child.poll() is None and stop.signal is not None:
                child.send_signal(stop.signal)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
            code = child.wait()
        finally:
            stack.stop()
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging of the emulators")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run the stack until SIGTERM/SIGINT")
    up.add_argument("--state", default=".devstack/state.json", help="where to write the state file")
    up.add_argument("--ports", choices=("fixed", "auto"), default="fixed")
    up.add_argument("--no-azurite", action="store_true", help="emulators only")
    ex = sub.add_parser("exec", help="run a command against a fresh stack on free ports")
    ex.add_argument("--no-azurite", action="store_true", help="emulators only")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        if args.cmd == "up":
            return cmd_up(args)
        return cmd_exec(args)
    finally:
        log.debug("devstack %s ran %.1f s", args.cmd, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
