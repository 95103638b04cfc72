"""One contender in a fresh process: ``python -m bench.worker SPEC.json`` prints one JSON result line.

The process imports the contender's queue function, then delivers the workload's messages to it
from ``concurrency`` threads, as a Functions host does with ``batchSize + newBatchThreshold``
concurrent invocations.  An invocation that raises is a failure: the message becomes visible
again after ``redelivery_seconds`` (host.json's ``visibilityTimeout``) and after
``max_dequeue`` deliveries it is poisoned.  CPU time is this process's (all threads) over the
delivery phase, import excluded; the import is measured on its own.
"""

from __future__ import annotations

import heapq
import importlib
import json
import os
import resource
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workload import Workload

CONTENDERS = {
    "project": "function_app",
    "naive": "bench.naive",
    "sdk": "bench.sdk",
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Out:
    """``func.Out``: what the function set on its output binding."""

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, val: Any) -> None:
        self.value = val

    def get(self) -> Any:
        return self.value


def failure_code(exc: BaseException) -> str:
    """A short, stable name for a failure: the project's error code, else the HTTP status, else the type."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return f"http_{status}"
    return type(exc).__name__


def load_invoker(contender: str) -> Callable[[Any, int], bool]:
    """``invoke(body, dequeue_count) -> dead_lettered``; raises when the function raises."""
    from azure.functions import queue as function_queue

    module = importlib.import_module(CONTENDERS[contender])
    factory: Any = function_queue.QueueMessage  # what the Python worker builds (it has dequeue_count)

    if contender == "project":
        function = module.sync_job

        def invoke_project(body: Any, count: int) -> bool:
            out = _Out()
            function(factory(id=str(uuid.uuid4()), body=body, dequeue_count=count), out)
            return out.value is not None

        return invoke_project

    main = module.main

    def invoke_baseline(body: Any, count: int) -> bool:
        main(factory(id=str(uuid.uuid4()), body=body, dequeue_count=count))
        return False

    return invoke_baseline


class QueueSim:
    """The queue as the host sees it: visible messages, hidden ones due later, dequeue counts."""

    def __init__(self, bodies: list[bytes], max_dequeue: int, redelivery: float) -> None:
        self._ready: deque[tuple[bytes, int]] = deque((b, 1) for b in bodies)
        self._hidden: list[tuple[float, int, bytes, int]] = []
        self._seq = 0
        self._pending = len(bodies)
        self._max_dequeue = max_dequeue
        self._redelivery = redelivery
        self._cond = threading.Condition()
        self.poisoned = 0
        self.deliveries = 0

    def take(self, deadline: float) -> tuple[bytes, int] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._pending == 0 or now >= deadline:
                    return None
                while self._hidden and self._hidden[0][0] <= now:
                    _, _, body, count = heapq.heappop(self._hidden)
                    self._ready.append((body, count))
                if self._ready:
                    self.deliveries += 1
                    return self._ready.popleft()
                wait = deadline - now
                if self._hidden:
                    wait = min(wait, self._hidden[0][0] - now)
                self._cond.wait(wait)

    def done(self) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def failed(self, body: bytes, count: int) -> None:
        with self._cond:
            if count >= self._max_dequeue:
                self.poisoned += 1
                self._pending -= 1
            else:
                self._seq += 1
                due = time.monotonic() + self._redelivery
                heapq.heappush(self._hidden, (due, self._seq, body, count + 1))
            self._cond.notify_all()

    @property
    def unfinished(self) -> int:
        with self._cond:
            return self._pending


def run(spec: dict[str, Any]) -> dict[str, Any]:
    affinity = spec.get("affinity")
    if affinity:
        os.sched_setaffinity(0, set(affinity))
    os.environ.update(spec.get("env", {}))
    contender = spec["contender"]
    workload = Workload.from_dict(spec["workload"])
    key = spec.get("message_key")
    bodies = [b.encode("utf-8") for b in workload.bodies(key)]

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    invoke = load_invoker(contender)
    import_s, import_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    for name in spec.get("warm_imports", []):  # experiments: what a preload at start-up would save
        importlib.import_module(name)

    queue = QueueSim(bodies, int(spec.get("max_dequeue", 5)), float(spec.get("redelivery_seconds", 30)))
    failures: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    durations: list[float] = []
    completions: list[float] = []  # seconds from the first delivery: the run's timeline
    lock = threading.Lock()
    first: list[float] = []
    concurrency = int(spec.get("concurrency", 24))
    deadline_s = float(spec.get("deadline_seconds", 900))

    def loop() -> None:
        while True:
            item = queue.take(deadline)
            if item is None:
                return
            body, count = item
            started = time.perf_counter()
            try:
                dead_lettered = invoke(body, count)
            except Exception as exc:
                code = failure_code(exc)
                with lock:
                    failures[code] += 1
                    if failures[code] == 1:
                        traceback.print_exc(file=sys.stderr)
                queue.failed(body, count)
                continue
            finished = time.perf_counter()
            elapsed = finished - started
            with lock:
                durations.append(elapsed)
                completions.append(round(finished - t1, 4))
                if not first:
                    first.append(elapsed)
                if dead_lettered:
                    dead["dead_letter"] += 1
            queue.done()

    cpu1, t1 = cpu_seconds(), time.perf_counter()
    deadline = time.monotonic() + deadline_s
    threads = [threading.Thread(target=loop, name=f"invocation-{n}", daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - t1, cpu_seconds() - cpu1
    durations.sort()
    return {
        "contender": contender,
        "jobs": workload.count,
        "completed": len(durations),
        "dead_lettered": sum(dead.values()),
        "failures": dict(failures),
        "poisoned": queue.poisoned,
        "unfinished": queue.unfinished,
        "deliveries": queue.deliveries,
        "wall_s": wall,
        "cpu_s": cpu,
        "import_s": import_s,
        "import_cpu_s": import_cpu,
        "first_invocation_s": first[0] if first else None,
        "p50_s": durations[len(durations) // 2] if durations else None,
        "p99_s": durations[min(len(durations) - 1, int(len(durations) * 0.99))] if durations else None,
        "gave_up": queue.unfinished > 0,
        "completions_s": sorted(completions),
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run(spec)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
