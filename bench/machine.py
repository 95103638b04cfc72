"""The machine a run came from: figures without it cannot be compared or reproduced."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.stack import ROOT

PACKAGES = (
    "azure-functions", "azure-identity", "azure-keyvault-secrets", "azure-core", "msal", "requests",
    "urllib3", "powerplatform-dataverse-client", "flask", "werkzeug", "azure-storage-queue",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.strip() or None


def describe() -> dict[str, Any]:
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": _commit(),
    }


def markdown(machine: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    load = " / ".join(str(x) for x in machine["load_average_at_start"])
    return (
        f"- CPU: {machine['cpu_model']}, {machine['cpus']} cores ({machine['cpus_usable']} usable)\n"
        f"- memory: {machine['memory_gib']} GiB; {machine['os']}; Python {machine['python']}\n"
        f"- load average at start (1/5/15 min): {load}\n"
        f"- packages: {packages}\n"
        f"- commit: {machine['commit']}"
    )
