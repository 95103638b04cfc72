"""W5 (``make bench``, or ``python -m bench.multihost``): N host processes, ONE sandbox, ONE budget.

N local Functions hosts (``python -m devstack.host``, N = 1, 4, 16) drain one queue of jobs
against one emulated Dataverse environment whose service-protection limits are on (scaled down so
that a run takes about a minute here), with the deployment's shared throttle on and, side by
side in the same run, off.  Per run: jobs/s, 429s, requests per job, lost, duplicates, and the
ratio to the most the limits allow for that workload.

The limits are scaled, not removed: the window shrinks from 300 s to ``WINDOW`` s and the request
budget from 6,000 to ``REQUESTS`` (so the sustained rate, requests / window, stays close to the
real 20 requests/s of one application user per web server), execution time in proportion,
concurrency 52 unchanged.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.report import REQUEST_KIND, window_minimum_seconds
from bench.stack import ROOT, StackProcess
from devstack.control import SandboxClient
from devstack.sandboxes import MESSAGE_SECRET_NAME
from shared.messages import sign

ACTORS = 10
REQUESTS, WINDOW = 125, 5.0  # 25 requests/s sustained (the real limit: 6,000 per 300 s = 20/s)
EXECUTION_MS = int(1_200_000 * WINDOW / 300)  # 1,200 s per 300 s, scaled to the window
CONCURRENT = 52
DOP_HINT = 16
LATENCY = 0.05
# The throttle's own time constants, scaled with the window (300 s -> 5 s is 60x) only as far as
# Azurite's one node thread allows: blob refresh 1 s -> 0.5 s, heartbeats 15 s -> 2 s (16 hosts at
# 0.1 s / 1 s sent it 160 reads and 32 writes and listings per second on top of the queue, and it
# stalled for two minutes); fallback growth: 5 % per 2 successes instead of per 10 doubles a
# measured pace in about one window, as the default does at 300 s.
REFRESH_SECONDS = 0.5
HEARTBEAT_SECONDS = 2.0
GROW_AFTER = 2
HOSTS = (1, 4, 16)
FULL_JOBS, QUICK_JOBS, CONTROL_JOBS = 20_000, 1_500, 1_500
BACKLOG = 1_000  # messages kept in the queue ahead of the hosts (see Feeder)
CONTROL_TIMEOUT = 300.0
TARGET_RATIO, TARGET_429 = 0.85, 0.02
RESULTS = ROOT / "bench" / "results"
BENCH_DOC = ROOT / "docs" / "bench.md"
W5_START, W5_END = "<!-- bench:w5:start -->", "<!-- bench:w5:end -->"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _queue(connection: str, name: str) -> Any:
    from azure.storage.queue import QueueClient

    return QueueClient.from_connection_string(connection, name)


def create_queues(connection: str, queue: str) -> None:
    from azure.core.exceptions import ResourceExistsError

    for name in (queue, f"{queue}-poison", f"{queue}-deadletter"):
        with contextlib.suppress(ResourceExistsError):
            _queue(connection, name).create_queue()


def enqueue(connection: str, queue: str, bodies: list[str]) -> None:
    clients: dict[int, Any] = {}

    def send(chunk: list[str]) -> None:
        client = _queue(connection, queue)
        clients[id(chunk)] = client
        for body in chunk:
            client.send_message(base64.b64encode(body.encode("utf-8")).decode("ascii"))

    chunks = [bodies[i::8] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, chunks))


class Feeder(threading.Thread):
    """Keeps ONE queue topped up to ``BACKLOG`` messages until every job is in it.

    Why: Azurite keeps a queue in memory and scans it on every dequeue, so 20,000 messages at once
    make it the bottleneck (about 3 jobs/s here, its single node thread at 100 %); Azure Storage has
    no such cost.  All jobs still pass through the one queue; only how far ahead they are enqueued
    changes.
    """

    def __init__(self, connection: str, queue: str, bodies: list[str]) -> None:
        super().__init__(daemon=True)
        self.connection, self.queue, self.pending = connection, queue, list(bodies)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.fed = threading.Event()  # every job is in the queue

    @property
    def done(self) -> bool:
        return self.fed.is_set()

    def run(self) -> None:
        try:
            while self.pending and not self.stop.is_set():
                if queue_length(self.connection, self.queue) < BACKLOG // 2:
                    chunk, self.pending = self.pending[:BACKLOG // 2], self.pending[BACKLOG // 2:]
                    enqueue(self.connection, self.queue, chunk)
                else:
                    self.stop.wait(0.2)
            if not self.pending:
                self.fed.set()
        except BaseException as exc:  # reported by the run, which then gives up
            self.error = exc


def commit() -> str:
    """The commit measured (``+dirty`` when the tree has changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def queue_length(connection: str, name: str) -> int:
    return int(_queue(connection, name).get_queue_properties().approximate_message_count or 0)


def start_hosts(stack: StackProcess, sbx: SandboxClient, queue: str, n: int, shared: bool,
                log_dir: Path) -> list[tuple[subprocess.Popen[bytes], Path, Any]]:
    env = {
        **os.environ, **stack.env(), **sbx.env,
        "AzureWebJobsStorage": stack.stack.azurite["connection_string"],
        "SYNC_QUEUE_NAME": queue,
        "DATAVERSE_SHARED_THROTTLE": "true" if shared else "false",
        # the service asks for a few minutes at most; a job may wait out several windows in process
        "DATAVERSE_MAX_RETRY_SECONDS": "120",
        "DATAVERSE_THROTTLE_REFRESH_SECONDS": str(REFRESH_SECONDS),
        "DATAVERSE_THROTTLE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "DATAVERSE_THROTTLE_GROW_AFTER": str(GROW_AFTER),
    }
    hosts = []
    for i in range(n):
        ready = Path(tempfile.mkdtemp(prefix="w5-host-")) / "ready.json"
        log_file = open(log_dir / f"w5-{queue}-{i}.log", "wb")  # noqa: SIM115 (closed in stop_hosts)
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack.host", "--port", "0", "--ready-file", str(ready),
             "--settings", str(ready.parent / "none.json")],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        hosts.append((process, ready, log_file))
    return hosts


def wait_ready(hosts: list[tuple[subprocess.Popen[bytes], Path, Any]], timeout: float = 180) -> list[float]:
    """Wall-clock time each host became ready."""
    deadline = time.monotonic() + timeout
    ready_at: dict[int, float] = {}
    while len(ready_at) < len(hosts):
        for i, (process, ready, _) in enumerate(hosts):
            if i not in ready_at and ready.exists():
                ready_at[i] = time.time()
            elif process.poll() is not None:
                raise RuntimeError(f"host {i} exited ({process.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError("hosts did not start in time")
        time.sleep(0.05)
    return [ready_at[i] for i in range(len(hosts))]


def stop_hosts(hosts: list[tuple[subprocess.Popen[bytes], Path, Any]]) -> None:
    for process, _, _ in hosts:
        if process.poll() is None:
            process.terminate()
    for process, _, log_file in hosts:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


def one_run(stack: StackProcess, n: int, shared: bool, jobs: int, timeout: float,
            log_dir: Path, *, limited: bool = True) -> dict[str, Any]:
    connection = stack.stack.azurite["connection_string"]
    sbx = stack.stack.create_sandbox(seed="default", users=ACTORS)
    prefix = f"w5{n}{'s' if shared else 'i'}{uuid.uuid4().hex[:6]}"
    queue = prefix.lower()
    try:
        if limited:
            sbx.set_limits(requests=REQUESTS, window_seconds=WINDOW, execution_ms=EXECUTION_MS,
                           concurrent=CONCURRENT, dop_hint=DOP_HINT)
        else:  # the machine's own ceiling: the same hosts and workload, no service protection
            sbx.set_limits(requests=10**7, execution_ms=10**10, concurrent=10**4, dop_hint=DOP_HINT)
        sbx.set_latency("dataverse", LATENCY)
        key = sbx.secret(MESSAGE_SECRET_NAME)  # signed as the webhook signs: sync_job refuses unsigned ones
        bodies = [json.dumps(sign({
            "id": f"{prefix}-{i:06d}", "entity": "contacts", "operation": "upsert",
            "key": {"emailaddress1": f"{prefix}-{i:06d}@example.com"},
            "data": {"lastname": f"W5 {i}"}, "actAs": {"email": f"actor{i % ACTORS + 1:04d}@contoso.com"},
        }, "bench", key), separators=(",", ":")) for i in range(jobs)]
        create_queues(connection, queue)
        enqueue(connection, queue, bodies[:BACKLOG])
        feeder = Feeder(connection, queue, bodies[BACKLOG:])
        sbx.reset_counters()
        load = os.getloadavg()[0]
        cpu_before = os.times()
        hosts = start_hosts(stack, sbx, queue, n, shared, log_dir)
        gave_up = False
        try:
            ready = wait_ready(hosts)
            started = min(ready)
            feeder.start()
            while True:
                remaining = queue_length(connection, queue)
                if remaining == 0 and feeder.done:
                    finished = time.time()
                    break
                if feeder.error is not None:
                    raise RuntimeError(f"feeding the queue failed: {feeder.error!r}")
                if time.time() - started > timeout:
                    gave_up, finished = True, time.time()
                    break
                time.sleep(0.25)
        finally:
            feeder.stop.set()
            stop_hosts(hosts)
        cpu_after = os.times()
        unfinished = queue_length(connection, queue) + len(feeder.pending)
        counters = sbx.counters().get("dataverse", {})
        records = [str(r.get("emailaddress1", "")) for r in sbx.records("contacts")
                   if str(r.get("emailaddress1", "")).startswith(prefix)]
        poison = queue_length(connection, f"{queue}-poison")
        dead = queue_length(connection, f"{queue}-deadletter")
    finally:
        with contextlib.suppress(Exception):
            sbx.delete()
    copies = Counter(records)
    requests = sum(v for k, v in counters.items() if REQUEST_KIND.fullmatch(k))
    throttled = counters.get("status:429", 0)
    wall = max(finished - started, 1e-9)
    written = len(copies)
    # the fewest requests this workload needs: one write per job + per host, for each actor, one
    # systemusers lookup and one WhoAmI (the attribution check; both caches are per instance)
    needed = jobs + n * 2 * ACTORS
    minimum = window_minimum_seconds(needed, REQUESTS, WINDOW, LATENCY)
    return {
        "hosts": n, "shared": shared, "limited": limited, "jobs": jobs, "written": written,
        # lost: neither written nor in any queue (a poisoned or dead-lettered job is kept, with its reason)
        "lost": max(0, jobs - written - unfinished - poison - dead), "unfinished": unfinished,
        "duplicates": sum(c - 1 for c in copies.values()),
        "poison": poison, "dead_letter": dead, "gave_up": gave_up,
        "wall_s": round(wall, 2), "jobs_per_s": round(written / wall, 2),
        "requests": requests, "requests_per_job": round(requests / max(jobs, 1), 3),
        "throttled": throttled, "throttled_share": round(throttled / max(requests, 1), 4),
        "limit_jobs_per_s": round(jobs / minimum, 2), "ratio": round(minimum / wall, 3),
        "hosts_ready_spread_s": round(max(ready) - min(ready), 2),
        "children_cpu_s": round((cpu_after.children_user + cpu_after.children_system)
                                - (cpu_before.children_user + cpu_before.children_system), 1),
        "load_at_start": round(load, 2),
        "statuses": {k: v for k, v in sorted(counters.items()) if k.startswith("status:")},
    }


def run(quick: bool, hosts: tuple[int, ...] = HOSTS, jobs: int | None = None, timeout: float | None = None,
        write: bool = True, log_dir: Path | None = None, capacity: bool = True,
        modes: tuple[bool, ...] = (True, False), merge: bool = False) -> dict[str, Any]:
    """The throttle-on runs get the full queue; the controls (off, and the machine's ceiling) get
    ``CONTROL_JOBS``: with the throttle off, 16 hosts would spend hours refusing each other, and the
    ceiling needs no more to show whether this machine could reach the limit at all.

    ``merge``: re-measure some runs only; the results keep the other runs of the last written file
    (each run says when it was measured and at which commit).
    """
    jobs = jobs or (QUICK_JOBS if quick else FULL_JOBS)
    control = min(jobs, CONTROL_JOBS)
    log_dir = log_dir or Path(tempfile.gettempdir()) / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    plan = [(n, shared, True, jobs if shared else control) for n in hosts for shared in modes]
    if capacity:
        plan.append((max(hosts), True, False, control))
    with StackProcess(azurite=True) as stack:
        for n, shared, limited, count in plan:
            log(f"W5 {n} host(s), shared throttle {'on' if shared else 'off'}"
                f"{'' if limited else ', NO service protection (machine ceiling)'}: {count} jobs ...")
            # throttle on: long enough for 30 % of the limit (at least 900 s); a control that has
            # not finished after CONTROL_TIMEOUT has shown what it shows (reported as "gave up")
            limit = timeout or (max(900.0, count / (REQUESTS / WINDOW) / 0.3) if shared and limited
                                else CONTROL_TIMEOUT)
            try:
                result = one_run(stack, n, shared, count, limit, log_dir, limited=limited)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log(f"  not measured: {exc}")
                continue
            result["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            result["commit"] = commit()
            runs.append(result)
            log(f"  {result['jobs_per_s']:.1f} jobs/s ({result['ratio']:.0%} of the limit), "
                f"{result['throttled']} 429s ({result['throttled_share']:.1%}), "
                f"{result['requests_per_job']:.2f} requests/job, lost {result['lost']}, "
                f"duplicates {result['duplicates']}, hosts' CPU {result['children_cpu_s']} s")
    latest = RESULTS / "w5-latest.json"
    if merge and latest.is_file():
        remeasured = {(r["hosts"], r["shared"], r.get("limited", True)) for r in runs}
        kept = [r for r in json.loads(latest.read_text(encoding="utf-8"))["runs"]
                if (r["hosts"], r["shared"], r.get("limited", True)) not in remeasured]
        runs = sorted(kept + runs, key=lambda r: (not r.get("limited", True), r["hosts"], not r["shared"]))
    results = {
        "quick": quick, "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "jobs": jobs, "control_jobs": control,
        "limits": {"requests": REQUESTS, "window_seconds": WINDOW, "execution_ms": EXECUTION_MS,
                                 "concurrent": CONCURRENT, "dop_hint": DOP_HINT, "latency_s": LATENCY},
        "cpus": os.cpu_count(), "runs": runs,
    }
    text = render(results)
    print()
    print(text)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "w5-latest.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        if replace_between(BENCH_DOC, text):
            print(f"\nwrote {BENCH_DOC} (W5 section) and {RESULTS / 'w5-latest.json'}")
    return results


def targets(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    shared = {r["hosts"]: r for r in runs if r["shared"] and r.get("limited", True)}
    out: list[tuple[str, str, str, bool | None]] = []
    top = shared.get(max(shared)) if shared else None
    if top:
        out.append((f"W5 N={top['hosts']} throughput", f"≥ {TARGET_RATIO:.0%} of the service limit",
                    f"{top['ratio']:.0%}", top["ratio"] >= TARGET_RATIO))
        out.append((f"W5 N={top['hosts']} 429s", f"≤ {TARGET_429:.0%} of requests",
                    f"{top['throttled_share']:.1%}", top["throttled_share"] <= TARGET_429))
    ordered = [shared[n] for n in sorted(shared)]
    if len(ordered) > 1:
        rates = [r["jobs_per_s"] for r in ordered]
        # "does not fall": within 5 % of the best smaller N (run-to-run noise on a shared machine)
        holds = all(rates[i] >= 0.95 * max(rates[:i]) for i in range(1, len(rates)))
        out.append(("W5 throughput vs N", "does not fall as N grows",
                    " → ".join(f"{r:.1f}" for r in rates) + " jobs/s", holds))
    ceiling = next((r for r in runs if not r.get("limited", True)), None)
    if ceiling and top:
        # Not a target: it says whether this machine could reach the service limit at all.
        out.append((f"W5 machine ceiling, N={ceiling['hosts']}, no limits", "(context) above the limit",
                    f"{ceiling['jobs_per_s']:.1f} vs limit {top['limit_jobs_per_s']:.1f} jobs/s", None))
    parked = sum(r["poison"] + r["dead_letter"] for r in shared.values())
    out.append(("W5 throttle on: jobs poisoned or dead-lettered", "0", str(parked), parked == 0))
    lost = sum(r["lost"] for r in runs)
    dups = sum(r["duplicates"] for r in runs)
    out.append(("W5 lost / duplicates", "0 / 0 in every run", f"{lost} / {dups}", lost == 0 and dups == 0))
    return out


def render(results: dict[str, Any]) -> str:
    limits = results["limits"]
    lines = [
        "### W5: N hosts, one Dataverse budget (shared throttle on vs off)",
        "",
        f"`make bench` W5 ({'quick run' if results['quick'] else 'full run'}, {results['finished_at']}, "
        f"{results['cpus']} CPUs): {results['jobs']} jobs in one queue (the controls — throttle off, and "
        f"no limits — {results.get('control_jobs', results['jobs'])}), N local host processes "
        f"(`devstack.host`, host.json concurrency 24 each; the queue fed {BACKLOG:,} ahead, since Azurite "
        "scans its in-memory queue on every dequeue) against ONE sandbox; a control still running after "
        f"{CONTROL_TIMEOUT:.0f} s gives up. Limits scaled from "
        f"6,000 requests / 1,200 s execution per 300 s to {limits['requests']} requests / "
        f"{limits['execution_ms'] / 1000:g} s per {limits['window_seconds']:g} s "
        f"({limits['requests'] / limits['window_seconds']:g} requests/s sustained; the real limit is 20/s), "
        f"{limits['concurrent']} concurrent, `x-ms-dop-hint` {limits['dop_hint']}, "
        f"{limits['latency_s'] * 1000:g} ms per request. *limit* = the most the window allows for the "
        "requests the workload needs (one write per job + per host and actor one lookup and one WhoAmI): "
        "floor((R - 1) ÷ per window) windows + one round trip; *vs limit* = that ÷ the time taken.",
        "",
        "| hosts | shared throttle | jobs | jobs/s | limit jobs/s | vs limit | 429s | 429 share | "
        "requests/job | lost | duplicates | poison | hosts' CPU s | measured (commit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if not r.get("limited", True):
            lines.append(
                f"| {r['hosts']} | on, **no limits** (machine ceiling) | {r['jobs']} | {r['jobs_per_s']:.1f} "
                "| — | — | "
                f"{r['throttled']} | — | {r['requests_per_job']:.2f} | {r['lost']} | {r['duplicates']} | "
                f"{r['poison']} | {r['children_cpu_s']} | {provenance(r)} |")
            continue
        lines.append(
            f"| {r['hosts']} | {'on' if r['shared'] else 'off'} | {r['jobs']} | {r['jobs_per_s']:.1f} | "
            f"{r['limit_jobs_per_s']:.1f} | {r['ratio']:.0%} | {r['throttled']} | "
            f"{r['throttled_share']:.1%} | "
            f"{r['requests_per_job']:.2f} | {r['lost']} | {r['duplicates']} | {r['poison']} | "
            f"{r['children_cpu_s']} | {provenance(r)}"
            + (f"; gave up after {r['wall_s']:.0f} s, {r['unfinished']} still queued" if r["gave_up"] else "")
            + " |")
    lines += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for name, wanted, measured, met in targets(results["runs"]):
        verdict = "yes" if met else "NO" if met is False else "—"
        lines.append(f"| {name} | {wanted} | {measured} | {verdict} |")
    return "\n".join(lines)


def provenance(run: dict[str, Any]) -> str:
    return f"{run.get('measured_at', '—')} ({run.get('commit', '?')})"


def replace_between(path: Path, section: str) -> bool:
    """Put the W5 section between its own markers in docs/bench.md (added after the bench figures once)."""
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    start, end = text.find(W5_START), text.find(W5_END)
    if not 0 <= start < end:
        text = text.rstrip("\n") + f"\n\n{W5_START}\n{W5_END}\n"
        start, end = text.find(W5_START), text.find(W5_END)
    path.write_text(f"{text[:start + len(W5_START)]}\n{section}\n{text[end:]}", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multihost", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,500 jobs instead of 20,000")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--hosts", default=",".join(map(str, HOSTS)), help="comma-separated N")
    parser.add_argument("--timeout", type=float, default=None,
                        help="per run, seconds (default: enough for 30 %% of the limit, at least 900)")
    parser.add_argument("--throttle", choices=("both", "on", "off"), default="both",
                        help="which runs per N: shared throttle on, off, or both side by side")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the no-limits run (machine ceiling)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other runs of bench/results/w5-latest.json (re-measure a subset)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    # SIGTERM (a timeout, an impatient operator) still stops the hosts and the stack (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    hosts = tuple(int(x) for x in args.hosts.split(",") if x.strip())
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.throttle]
    results = run(args.quick, hosts, args.jobs, args.timeout, not args.no_write,
                  capacity=not args.no_ceiling, modes=modes, merge=args.merge)
    return 0 if all(r["lost"] == 0 and r["duplicates"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
