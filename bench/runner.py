"""One measurement: a fresh sandbox, one contender in a fresh process, counters and records read back."""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import ROOT, StackProcess
from bench.workload import ENTITY_SET, KEY_FIELD, Workload
from devstack.control import SandboxClient
from devstack.sandboxes import MESSAGE_SECRET_NAME

CLIENT_SECRET_NAME = "dataverse-client-secret"


@dataclass
class Conditions:
    """What the emulators do during a run: latency per service, service-protection limits."""

    dataverse_latency: float = 0.0
    auth_latency: float = 0.0  # Entra, Key Vault and the managed identity endpoint
    limits: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        text = (f"Dataverse {self.dataverse_latency * 1000:.0f} ms, "
                f"Entra/Key Vault/MI {self.auth_latency * 1000:.0f} ms")
        if self.limits:
            text += ", limits " + ", ".join(f"{k}={v}" for k, v in self.limits.items())
        return text


def prepare_sandbox(stack: StackProcess, actors: int, conditions: Conditions) -> tuple[SandboxClient, str]:
    """A fresh tenant with ``actors`` users; returns it and a known client secret (for the baselines)."""
    sbx = stack.stack.create_sandbox(seed="empty", users=actors)
    client_secret = secrets.token_urlsafe(30)
    sbx.set_client_secret(client_secret)
    sbx.set_secret(CLIENT_SECRET_NAME, client_secret)
    sbx.set_latency("dataverse", conditions.dataverse_latency)
    for service in ("entra", "keyvault", "identity"):
        sbx.set_latency(service, conditions.auth_latency)
    if conditions.limits:
        sbx.set_limits(**conditions.limits)
    sbx.reset_counters()
    return sbx, client_secret


def worker_env(sbx: SandboxClient, client_secret: str, contender: str,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(sbx.env)
    if contender != "project":
        env["DATAVERSE_CLIENT_SECRET"] = client_secret  # the baselines read it from the environment
    if extra:
        env.update(extra)
    return env


def run_worker(spec: Mapping[str, Any], stack: StackProcess, log_dir: Path,
               profile: Path | None = None, warm_imports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs ``python -m bench.worker`` and returns its JSON line; its stderr goes to ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{spec['label']}-{spec['contender']}"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as handle:
        json.dump(spec, handle)
        spec_path = handle.name
    env = {**os.environ, **stack.env(), "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "bench.worker", spec_path]
    if profile is not None:
        py_spy = Path(sys.executable).parent / "py-spy"
        command = [str(py_spy), "record", "--threads", "--rate", "200", "-f", "raw", "-o", str(profile),
                   "--", *command]
    try:
        with open(log_dir / f"{name}.stderr.txt", "w", encoding="utf-8") as stderr:
            completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                       text=True, timeout=float(spec.get("deadline_seconds", 900)) + 120,
                                       check=False)
    finally:
        Path(spec_path).unlink(missing_ok=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed (exit {completed.returncode}); "
                           f"see {log_dir / name}.stderr.txt")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _cpu_snapshot(stack_pid: int) -> dict[str, float]:
    import psutil

    times = psutil.cpu_times()
    busy = sum(getattr(times, name) for name in times._fields if name not in ("idle", "iowait"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    stack_times = psutil.Process(stack_pid).cpu_times()
    return {
        "at": time.monotonic(),
        "busy": busy,
        "children": children.ru_utime + children.ru_stime,
        "stack": stack_times.user + stack_times.system,
        "load1": os.getloadavg()[0],
    }


def _cpu_usage(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds of the worker, of the stack, and of everything else on the machine meanwhile."""
    wall = after["at"] - before["at"]
    worker = after["children"] - before["children"]
    stack = after["stack"] - before["stack"]
    busy = after["busy"] - before["busy"]
    others = max(0.0, busy - worker - stack)
    cpus = len(os.sched_getaffinity(0)) or 1
    return {
        "wall_s": wall,
        "worker_cpu_s": worker,
        "stack_cpu_s": stack,
        "others_cpu_s": others,
        "others_share": others / (wall * cpus) if wall > 0 else 0.0,
        "load1_before": before["load1"],
    }


def verify(sbx: SandboxClient, workload: Workload) -> dict[str, int]:
    """Ground truth from Dataverse: how many jobs are written, and how many as someone else than the actor."""
    by_email = {u["internalemailaddress"].lower(): u["systemuserid"] for u in sbx.users
                if u.get("internalemailaddress")}
    wanted = {workload.key(i): i for i in range(workload.count)}
    written = wrong_actor = 0
    for record in sbx.records(ENTITY_SET):
        i = wanted.get(str(record.get(KEY_FIELD, "")).lower())
        if i is None:
            continue
        written += 1
        actor = workload.actor(i)
        if actor is not None and record.get("_modifiedby_value") != by_email.get(actor):
            wrong_actor += 1
    return {"written": written, "lost": workload.count - written, "wrong_actor": wrong_actor}


def measure(stack: StackProcess, *, label: str, contender: str, workload: Workload, conditions: Conditions,
            concurrency: int = 24, redelivery_seconds: float = 30.0, affinity: list[int] | None = None,
            log_dir: Path, deadline_seconds: float = 900, extra_env: Mapping[str, str] | None = None,
            profile: Path | None = None, warm_imports: tuple[str, ...] = ()) -> dict[str, Any]:
    sbx, client_secret = prepare_sandbox(stack, workload.actors, conditions)
    try:
        spec = {
            "label": label,
            "contender": contender,
            "workload": workload.to_dict(),
            "env": worker_env(sbx, client_secret, contender, extra_env),
            "concurrency": concurrency,
            "redelivery_seconds": redelivery_seconds,
            "max_dequeue": 5,
            "affinity": affinity,
            "deadline_seconds": deadline_seconds,
            "warm_imports": list(warm_imports),
            # the project's sync_job refuses unsigned messages; the baselines get the plain jobs
            "message_key": sbx.secret(MESSAGE_SECRET_NAME) if contender == "project" else None,
        }
        before = _cpu_snapshot(stack.pid)
        result = run_worker(spec, stack, log_dir, profile)
        result["machine_cpu"] = _cpu_usage(before, _cpu_snapshot(stack.pid))
        result["counters"] = sbx.counters()
        result.update(verify(sbx, workload))
        result["label"] = label
        result["conditions"] = conditions.describe()
        return result
    finally:
        sbx.delete()


__all__ = ["Conditions", "measure", "prepare_sandbox", "run_worker", "verify"]
