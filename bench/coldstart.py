"""W3: what importing the app costs, against importing only what it cannot do without.

``python -X importtime -c "import function_app"`` and ``-c "import azure.functions, requests"``
alternate in fresh processes; each run's figure is the summed cumulative time of the modules the
statement imported at top level (the interpreter's own start-up imports, found from a run of
``-c pass``, are left out).  The medians are compared.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from typing import Any

from bench.stack import ROOT

APP = "import function_app"
BASELINE = "import azure.functions, requests"
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def parse_importtime(stderr: str) -> list[tuple[int, str, int]]:
    """``(depth, module, cumulative µs)`` for every line of ``-X importtime`` output."""
    rows = []
    for line in stderr.splitlines():
        match = _LINE.match(line)
        if match:
            depth = (len(match.group(3)) - 1) // 2
            rows.append((depth, match.group(4), int(match.group(2))))
    return rows


def _run(statement: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": ""}
    completed = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return completed.stderr


def import_seconds(statement: str, startup: set[str]) -> float:
    rows = parse_importtime(_run(statement))
    return sum(cum for depth, name, cum in rows if depth == 0 and name not in startup) / 1e6


def heaviest(top: int = 6) -> list[tuple[str, float]]:
    """What ``import function_app`` spends its time on: its direct imports, largest first (seconds)."""
    rows = parse_importtime(_run(APP))
    end = max(n for n, (depth, name, _) in enumerate(rows) if depth == 0 and name == "function_app")
    children = []
    for depth, name, cumulative in reversed(rows[:end]):
        if depth == 0:
            break
        if depth == 1:
            children.append((name, cumulative / 1e6))
    children.append(("function_app itself", rows[end][2] / 1e6 - sum(s for _, s in children)))
    return sorted(children, key=lambda item: -item[1])[:top]


def measure_imports(repetitions: int) -> dict[str, Any]:
    startup = {name for depth, name, _ in parse_importtime(_run("pass")) if depth == 0}
    _run(APP)  # compile bytecode once, outside the measurement
    app: list[float] = []
    base: list[float] = []
    for _ in range(repetitions):
        app.append(import_seconds(APP, startup))
        base.append(import_seconds(BASELINE, startup))
    app_median, base_median = statistics.median(app), statistics.median(base)
    return {
        "repetitions": repetitions,
        "function_app_s": app_median,
        "baseline_s": base_median,
        "ratio": app_median / base_median if base_median else None,
        "function_app_runs_s": app,
        "baseline_runs_s": base,
        "function_app_parts": heaviest(),
        "heavy_sdks_at_import": heavy_sdks_loaded(),
    }


def heavy_sdks_loaded() -> list[str]:
    """Heavy SDKs that ``import function_app`` pulls in (they should load only when first needed)."""
    code = ("import sys, function_app; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('msal',) "
            "or m.startswith(('azure.identity', 'azure.keyvault', 'azure.storage', 'azure.core')))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                               text=True, check=True)
    roots = sorted({".".join(m.split(".")[:2]) for m in completed.stdout.split()})
    return roots
