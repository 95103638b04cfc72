"""Helpers for single-flight tests: many callers released at once, and a gate that proves they overlapped."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def in_parallel(n: int, fn: Callable[[], Any], *, timeout: float = 20) -> list[Any]:
    """Call ``fn`` from ``n`` threads released together; each result or exception, in thread order."""
    start = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def gate_single_flight(owner: Any, n: int) -> threading.Event:
    """An event set once ``n`` callers have entered ``owner._flight``.

    A fake backend that waits on it before answering keeps the first request in flight until every
    caller has arrived, so "one request" cannot pass just because the callers happened not to overlap.
    """
    entered = 0
    lock = threading.Lock()
    everyone = threading.Event()
    inner = owner._flight.do

    def counting(key: Any, fn: Any) -> Any:
        nonlocal entered
        with lock:
            entered += 1
            if entered == n:
                everyone.set()
        return inner(key, fn)

    owner._flight.do = counting
    return everyone
