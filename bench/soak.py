"""``python -m bench.soak`` (``make soak``): many jobs through the local host with random faults.

The local Functions host (``python -m devstack.host``) runs ``function_app`` against Azurite and
the emulators.  While it drains the queue, a fault injector keeps about ``--fault-rate`` of the
Dataverse requests failing (429 with Retry-After, 503, a timeout, a dropped connection), and a
share of the jobs is permanently bad (unknown actor, disabled actor, invalid schema) or targets a
table that is down for the whole run (its jobs must end in ``-poison``).  When the queue is empty,
every job must be in exactly one place: Dataverse, the dead-letter queue with the expected reason,
or the poison queue.  The host's RSS is sampled the whole time and must stay flat.

Not part of CI (minutes, not seconds).  ``--jobs N`` for a shorter run; ``--timeout`` bounds it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import REQUEST_KIND
from bench.stack import ROOT, StackProcess
from devstack.control import SandboxClient
from devstack.processes import spawn

QUEUE = "dynamics-sync"
DEAD_LETTER = f"{QUEUE}-deadletter"
POISON = f"{QUEUE}-poison"
ACTORS = 50
DOWN_TABLE = "leads"  # every request to it answers 503 for the whole run: its jobs end in -poison
CLIENT_TIMEOUT_SECONDS = 2.0  # DATAVERSE_TIMEOUT_SECONDS of the host, so a "timeout" fault costs seconds

# Expected end state of each kind of job.
WRITTEN, DEAD, POISONED = "written", "dead-letter", "poison"


@dataclass(frozen=True)
class Plan:
    """Which job is which: the kind decides where it must end up."""

    jobs: int
    bad_rate: float
    poison_rate: float
    seed: int
    prefix: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:6]}")

    def kinds(self) -> list[str]:
        rng = random.Random(self.seed)
        kinds = []
        for _ in range(self.jobs):
            roll = rng.random()
            if roll < self.poison_rate:
                kinds.append("table_down")
            elif roll < self.poison_rate + self.bad_rate:
                kinds.append(rng.choice(("unknown_actor", "disabled_actor", "invalid_schema")))
            else:
                kinds.append("good")
        return kinds

    def job_id(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}"

    def key(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}@example.com"

    def job(self, i: int, kind: str) -> dict[str, Any]:
        actor = f"actor{i % ACTORS + 1:04d}@contoso.com"
        job: dict[str, Any] = {
            "id": self.job_id(i), "entity": "contacts", "operation": "upsert",
            "key": {"emailaddress1": self.key(i)},
            "data": {"firstname": "Soak", "lastname": f"Job {i}"},
            "actAs": {"email": actor},
        }
        if kind == "unknown_actor":
            job["actAs"] = {"email": f"nobody-{i}@contoso.com"}
        elif kind == "disabled_actor":
            job["actAs"] = {"email": "disabled@contoso.com"}
        elif kind == "invalid_schema":
            del job["key"]  # an upsert needs a key
        elif kind == "table_down":
            job["entity"] = DOWN_TABLE
            job["key"] = str(uuid.uuid5(uuid.NAMESPACE_URL, self.job_id(i)))
            job["data"] = {"subject": f"Soak {i}"}
        return job


EXPECTED = {
    "good": (WRITTEN, None),
    "unknown_actor": (DEAD, "actor_not_found"),
    "disabled_actor": (DEAD, "actor_disabled"),
    "invalid_schema": (DEAD, "invalid_job"),
    "table_down": (POISONED, None),
}


# --- faults ---------------------------------------------------------------------------------------

FAULTS: dict[str, dict[str, Any]] = {
    "429": {"status": 429, "headers": {"Retry-After": "1"},
            "body": {"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of "
                                                                 "6000 over time window of 300 seconds."}}},
    "503": {"status": 503, "body": {"error": {"code": "0x80040216", "message": "Service unavailable"}}},
    "timeout": {"delay": CLIENT_TIMEOUT_SECONDS + 1.0},
    "dropped": {"drop": True},
}


class FaultInjector:
    """Keeps the injected faults at ``rate`` of the Dataverse requests seen so far, in random kinds."""

    def __init__(self, sbx: SandboxClient, rate: float, seed: int) -> None:
        self.sbx = sbx
        self.rate = rate
        self.rng = random.Random(seed + 1)
        self.injected: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                counts = self.sbx.counters().get("dataverse", {})
            except Exception as exc:
                print(f"  fault injector: counters unavailable ({exc})", file=sys.stderr)
                continue
            requests = sum(v for k, v in counts.items() if k.endswith((" contacts", " systemusers")))
            want = int(requests * self.rate) - sum(self.injected.values())
            for _ in range(max(0, min(want, 50))):
                kind = self.rng.choice(sorted(FAULTS))
                # Only the healthy table: the down one answers 503 anyway.
                self.sbx.add_fault("dataverse", path=r"/contacts|/systemusers", **FAULTS[kind])
                self.injected[kind] += 1


# --- memory -----------------------------------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int, origin: float, interval: float = 1.0) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since origin, RSS bytes)
        self._started = origin
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self._started, self.process.memory_info().rss))
            except Exception:
                return
            self._stop.wait(self.interval)


def memory_verdict(samples: list[tuple[float, int]], progress: list[tuple[float, int]],
                   jobs: int) -> dict[str, Any]:
    """Flat = after warm-up, the RSS never grows by more than 10 % (or 16 MiB) of its warm value.

    Warm-up ends when 10 % of the jobs are done (imports, pools and caches are full by then); the
    warm value is the median of the next few samples.
    """
    if len(samples) < 4:
        return {"flat": None, "reason": "too few samples"}
    warm_at = next((t for t, done in progress if done >= jobs * 0.1), samples[0][0])
    after = [rss for t, rss in samples if t >= warm_at] or [samples[-1][1]]
    warm = statistics.median(after[: max(1, min(5, len(after)))])
    peak, end = max(after), after[-1]
    allowed = max(0.10 * warm, 16 * 2**20)
    return {
        "flat": peak - warm <= allowed,
        "start_mib": samples[0][1] / 2**20,
        "after_warmup_mib": warm / 2**20,
        "end_mib": end / 2**20,
        "max_mib": peak / 2**20,
        "growth_mib": (peak - warm) / 2**20,
        "allowed_mib": allowed / 2**20,
        "samples": len(samples),
    }


# --- queues -----------------------------------------------------------------------------------------


def _queue(connection_string: str, name: str) -> Any:
    from azure.storage.queue import QueueClient

    return QueueClient.from_connection_string(connection_string, name)


class Enqueuer:
    """Sends the messages from a few threads while the host already drains them (as producers do)."""

    def __init__(self, connection_string: str, bodies: list[str]) -> None:
        self.connection_string = connection_string
        self.bodies = bodies
        self.sent = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="enqueue", daemon=True)

    def start(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        for name in (QUEUE, DEAD_LETTER, POISON):
            with contextlib.suppress(ResourceExistsError):
                _queue(self.connection_string, name).create_queue()
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        clients = threading.local()

        def send(body: str) -> None:
            client = getattr(clients, "q", None)
            if client is None:
                client = clients.q = _queue(self.connection_string, QUEUE)
            client.send_message(base64.b64encode(body.encode("utf-8")).decode("ascii"))
            with self._lock:
                self.sent += 1

        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(send, self.bodies))
        except BaseException as exc:
            self.error = exc


def queue_length(connection_string: str, name: str) -> int:
    props = _queue(connection_string, name).get_queue_properties()
    return int(props.approximate_message_count or 0)


def drain_messages(connection_string: str, name: str) -> Iterator[str]:
    """Every message of a queue as text (received and deleted: the run is over)."""
    client = _queue(connection_string, name)
    while True:
        batch = list(client.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=300))
        if not batch:
            return
        for message in batch:
            text = str(message.content or "")
            with contextlib.suppress(ValueError):
                text = base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
            yield text
            client.delete_message(message)


# --- the run ----------------------------------------------------------------------------------------


def start_host(stack: StackProcess, sbx: SandboxClient,
               log_path: Path) -> tuple[subprocess.Popen[bytes], Any]:
    ready = Path(tempfile.mkdtemp(prefix="soak-host-")) / "ready.json"
    env = {
        **os.environ, **stack.env(), **sbx.env,
        "AzureWebJobsStorage": stack.stack.azurite["connection_string"],
        "SYNC_QUEUE_NAME": QUEUE,
        "DATAVERSE_TIMEOUT_SECONDS": str(CLIENT_TIMEOUT_SECONDS),
    }
    log = open(log_path, "wb")  # noqa: SIM115 (closed after the host exits)
    process = spawn(  # dies with the soak
        [sys.executable, "-m", "devstack.host", "--port", "0", "--ready-file", str(ready),
         "--settings", str(ready.parent / "none.json")],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            log.close()
            raise RuntimeError(f"the local host did not start; see {log_path}")
        time.sleep(0.1)
    return process, log


def stop_host(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    plan = Plan(args.jobs, args.bad_rate, args.poison_rate, args.seed)
    kinds = plan.kinds()
    bodies = [json.dumps(plan.job(i, k), separators=(",", ":")) for i, k in enumerate(kinds)]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"soak: {plan.jobs} jobs ({Counter(kinds)}), faults on {args.fault_rate:.0%} of Dataverse "
          f"requests, timeout {args.timeout:.0f} s; host log in {log_dir / 'soak-host.log'}", flush=True)
    started = time.monotonic()
    load = os.getloadavg()
    with StackProcess(azurite=True) as stack:
        connection = stack.stack.azurite["connection_string"]
        sbx = stack.stack.create_sandbox(seed="default", users=ACTORS)
        sbx.set_limits(requests=1_000_000, execution_ms=1_000_000_000)  # 429s come from the injector
        sbx.set_latency("dataverse", args.latency)
        sbx.add_fault("dataverse", path=rf"/{DOWN_TABLE}", status=503, times=-1,
                      body={"error": {"code": "0x80040216", "message": "Service unavailable"}})
        host, host_log = start_host(stack, sbx, log_dir / "soak-host.log")
        sampler = RssSampler(host.pid, started)
        injector = FaultInjector(sbx, args.fault_rate, args.seed)
        sampler.start()
        injector.start()
        progress: list[tuple[float, int]] = []
        gave_up = False
        revoked_at: float | None = None
        enqueuer = Enqueuer(connection, bodies)
        try:
            enqueuer.start()
            last_print = 0.0
            while True:
                sent, finished_sending = enqueuer.sent, enqueuer.done
                remaining = queue_length(connection, QUEUE)
                now = time.monotonic() - started
                done = sent - remaining
                progress.append((now, done))
                if enqueuer.error is not None:
                    raise RuntimeError(f"enqueueing failed: {enqueuer.error}")
                if finished_sending and remaining == 0:
                    break
                if revoked_at is None and done >= plan.jobs // 2:
                    # Mid-run, every token issued so far stops working: Dataverse answers 401.
                    sbx.revoke_tokens()
                    revoked_at = now
                if now > args.timeout:
                    gave_up = True
                    break
                if now - last_print >= 15:
                    rss = sampler.samples[-1][1] / 2**20 if sampler.samples else 0
                    print(f"  {now:5.0f} s: {sent} sent, {done} done, {remaining} queued, host RSS "
                          f"{rss:.0f} MiB, faults injected {sum(injector.injected.values())}", flush=True)
                    last_print = now
                time.sleep(1.0)
        finally:
            injector.stop()
            sampler.stop()
            enqueuer.join()
            stop_host(host)
            host_log.close()
        elapsed = time.monotonic() - started
        records = {str(r.get("emailaddress1", "")).lower() for r in sbx.records("contacts")}
        dead = [json.loads(t) for t in drain_messages(connection, DEAD_LETTER)]
        poison = [json.loads(t) for t in drain_messages(connection, POISON)]
        leftover = queue_length(connection, QUEUE)
        counters = sbx.counters()
    sheet = balance(plan, kinds, records, dead, poison)
    memory = memory_verdict(sampler.samples, progress, plan.jobs)
    lines = sheet_lines(plan, sheet, memory, injector.injected, counters, elapsed, gave_up, leftover, args)
    print()
    print("\n".join(lines))
    if not args.no_write:
        print(f"\nwrote {write_results(lines, args, load)}")
    ok = sheet["balanced"] and not gave_up and bool(memory.get("flat"))
    return 0 if ok else 1


def balance(plan: Plan, kinds: list[str], records: set[str], dead: list[dict[str, Any]],
            poison: list[dict[str, Any]]) -> dict[str, Any]:
    """Where each job ended, against where it should have ended."""
    index = {plan.job_id(i): i for i in range(plan.jobs)}
    places: dict[int, list[tuple[str, str | None]]] = {i: [] for i in range(plan.jobs)}
    for n in range(plan.jobs):
        if plan.key(n) in records:
            places[n].append((WRITTEN, None))
    unknown = 0
    reasons: Counter[str] = Counter()
    for record in dead:
        job = record.get("job")
        i = index.get(str(job.get("id"))) if isinstance(job, dict) else None
        if i is None:
            unknown += 1
            continue
        reason = record.get("reason")
        reasons[str(reason)] += 1
        if not (record.get("reason") and record.get("detail") and record.get("failedAt")):
            reason = None  # a dead-letter record must say why and when
        places[i].append((DEAD, reason))
    for job in poison:
        i = index.get(str(job.get("id"))) if isinstance(job, dict) else None
        if i is None:
            unknown += 1
            continue
        places[i].append((POISONED, None))
    counts: Counter[str] = Counter()
    missing, twice, misplaced = [], [], []
    for i, kind in enumerate(kinds):
        found = places[i]
        if not found:
            missing.append(plan.job_id(i))
            continue
        if len(found) > 1:
            twice.append(plan.job_id(i))
        counts[found[0][0]] += 1
        if found[0] != EXPECTED[kind]:
            misplaced.append({"job": plan.job_id(i), "kind": kind, "found": found})
    return {
        "counts": dict(counts),
        "reasons": dict(reasons),
        "expected": dict(Counter(EXPECTED[k][0] for k in kinds)),
        "missing": missing,
        "twice": twice,
        "misplaced": misplaced,
        "unknown_messages": unknown,
        "balanced": not missing and not twice and not misplaced and not unknown
        and sum(counts.values()) == plan.jobs,
    }


def sheet_lines(plan: Plan, sheet: dict[str, Any], memory: dict[str, Any], injected: Counter[str],
                counters: dict[str, dict[str, int]], elapsed: float, gave_up: bool, leftover: int,
                args: argparse.Namespace) -> list[str]:
    counts, expected = sheet["counts"], sheet["expected"]
    dv = counters.get("dataverse", {})
    gave_up_text = (f"  (GAVE UP after {args.timeout:.0f} s, {leftover} messages still queued)"
                    if gave_up else "")
    lines = [
        f"Balance sheet: {plan.jobs} jobs in {elapsed:.0f} s{gave_up_text}",
        f"  {'written to Dataverse':32} {counts.get(WRITTEN, 0):>7}   expected {expected.get(WRITTEN, 0)}",
        *(f"  {'dead-letter: ' + reason:32} {n:>7}" for reason, n in sorted(sheet["reasons"].items())),
        f"  {'dead-letter total':32} {counts.get(DEAD, 0):>7}   expected {expected.get(DEAD, 0)}",
        f"  {'poison':32} {counts.get(POISONED, 0):>7}   expected {expected.get(POISONED, 0)} "
        f"(table '{DOWN_TABLE}' down)",
        f"  {'-' * 50}",
        f"  {'accounted':32} {sum(counts.values()):>7} / {plan.jobs}   "
        f"balanced: {'yes' if sheet['balanced'] else 'NO'}",
        f"  missing {len(sheet['missing'])}, in two places {len(sheet['twice'])}, in the wrong place "
        f"{len(sheet['misplaced'])}, unknown messages {sheet['unknown_messages']}",
        *(f"    {item}" for item in sheet["misplaced"][:5]),
        f"  faults injected: {dict(sorted(injected.items()))} over "
        f"{sum(v for k, v in dv.items() if REQUEST_KIND.fullmatch(k))} Dataverse requests; "
        "statuses answered: "
        + ", ".join(f"{k[7:]}={v}" for k, v in sorted(dv.items()) if k.startswith("status:")),
    ]
    lines.append(
        f"  tokens revoked once mid-run: Dataverse answered 401 {dv.get('status:401', 0)} times; the host "
        f"asked Entra for {counters.get('entra', {}).get('POST token', 0)} tokens in all")
    if memory.get("flat") is None:
        lines.append(f"  host memory: {memory.get('reason')}")
    else:
        lines.append(
            f"  host RSS: start {memory['start_mib']:.0f} MiB, "
            f"after warm-up {memory['after_warmup_mib']:.0f}, end {memory['end_mib']:.0f}, "
            f"max {memory['max_mib']:.0f} ({memory['samples']} samples): "
            f"growth {memory['growth_mib']:+.1f} MiB (allowed {memory['allowed_mib']:.0f}) -> "
            f"{'flat' if memory['flat'] else 'NOT FLAT'}")
    return lines


def write_results(lines: list[str], args: argparse.Namespace, load: tuple[float, float, float]) -> Path:
    from bench import machine

    described = machine.describe()
    described["load_average_at_start"] = [round(x, 2) for x in load]
    path = ROOT / "bench" / "results" / "soak-latest.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        f"`make soak` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {args.jobs} jobs through the "
        f"local host (Azurite + emulators, host.json concurrency), Dataverse latency "
        f"{args.latency * 1000:.0f} ms, faults on {args.fault_rate:.0%} of Dataverse requests (429 with "
        f"Retry-After, 503, timeout, dropped connection), {args.bad_rate:.0%} permanently bad jobs (unknown "
        f"actor, disabled actor, invalid schema), {args.poison_rate:.1%} of jobs to a table that is down for "
        "the whole run.",
        "", "```", *lines, "```", "", "Machine of this run:", "", machine.markdown(described), "",
    ])
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--fault-rate", type=float, default=0.04, help="share of Dataverse requests faulted")
    parser.add_argument("--bad-rate", type=float, default=0.01, help="share of permanently bad jobs")
    parser.add_argument("--poison-rate", type=float, default=0.002, help="share of jobs to the table down")
    parser.add_argument("--latency", type=float, default=0.02, help="Dataverse latency, seconds")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument("--log-dir", default=str(Path(tempfile.gettempdir()) / "bench-logs"))
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/soak-latest.md")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
