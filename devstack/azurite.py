"""Azurite (the Azure Storage emulator) as a child process of the stack, in memory, on chosen ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devstack.processes import spawn

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# The emulator's published, well-known development key (not a secret: every Azurite install has it).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
FIXED_PORTS = (10000, 10001, 10002)


def connection_string(blob_port: int, queue_port: int, table_port: int, host: str = "127.0.0.1") -> str:
    """The devstoreaccount1 connection string with explicit endpoints (so non-default ports work)."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{ACCOUNT};"
    )


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS says are free right now (bound together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Azurite:
    process: subprocess.Popen[bytes]
    host: str
    blob_port: int
    queue_port: int
    table_port: int

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port, self.table_port, self.host)

    @property
    def blob_url(self) -> str:
        return f"http://{self.host}:{self.blob_port}/{ACCOUNT}"

    @property
    def queue_url(self) -> str:
        return f"http://{self.host}:{self.queue_port}/{ACCOUNT}"

    @property
    def table_url(self) -> str:
        return f"http://{self.host}:{self.table_port}/{ACCOUNT}"

    def state(self) -> dict[str, str]:
        return {"connection_string": self.connection_string, "blob": self.blob_url,
                "queue": self.queue_url, "table": self.table_url}

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until all three ports accept connections; raises if Azurite exits or the time runs out."""
        deadline = time.monotonic() + timeout
        pending = [self.blob_port, self.queue_port, self.table_port]
        while pending:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"Azurite exited with status {code} before it was ready")
            try:
                with socket.create_connection((self.host, pending[0]), timeout=1):
                    pending.pop(0)
                    continue
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Azurite did not open port {pending[0]} in {timeout:.0f} s") from None
                time.sleep(0.1)  # nothing to wait on: Azurite has no readiness signal

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def start(workspace: str | os.PathLike[str], ports: tuple[int, int, int] | None = None,
          host: str = "127.0.0.1") -> Azurite:
    """Start Azurite from node_modules; ``ports`` None picks free ones."""
    binary = ROOT / "node_modules" / ".bin" / "azurite"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: run `npm ci` (or `make install`)")
    blob, queue, table = ports if ports is not None else tuple(free_ports(3))
    location = Path(workspace)
    location.mkdir(parents=True, exist_ok=True)
    command = [
        str(binary), "--skipApiVersionCheck", "--disableTelemetry", "--inMemoryPersistence", "--silent",
        "--blobHost", host, "--blobPort", str(blob),
        "--queueHost", host, "--queuePort", str(queue),
        "--tableHost", host, "--tablePort", str(table),
    ]
    # dies with the stack even when the stack is killed without cleaning up (no orphaned Azurite)
    process = spawn(
        command, cwd=location, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sys.stderr,
    )
    return Azurite(process, host, int(blob), int(queue), int(table))
