"""Turning raw runs into the table, the targets (met / not met) and the Markdown of the results."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REQUEST_KIND = re.compile(r"[A-Z]+ \S+")  # "PATCH contacts"; not "status:429", "caller:…", "cookie:…"


def dataverse_requests(run: Mapping[str, Any]) -> dict[str, int]:
    """``{"PATCH contacts": 2000, "GET systemusers": 50}``: requests by kind, other counters left out."""
    counts = run["counters"].get("dataverse", {})
    return {k: v for k, v in sorted(counts.items()) if REQUEST_KIND.fullmatch(k)}


def counter(run: Mapping[str, Any], service: str, key: str) -> int:
    return int(run["counters"].get(service, {}).get(key, 0))


def failures(run: Mapping[str, Any]) -> int:
    return int(sum(run["failures"].values()))


def jobs_per_second(run: Mapping[str, Any]) -> float:
    return float(run["jobs"]) / run["wall_s"] if run["wall_s"] else 0.0


def latency_bound_jobs_per_second(jobs: int, lookups: int, latency: float, concurrency: int) -> float:
    """Every strictly needed request (one write per job, one lookup per actor) costs ``latency``,
    ``concurrency`` at a time: the best throughput any client could reach."""
    return jobs / ((jobs + lookups) * latency / concurrency)


def window_minimum_seconds(requests: int, per_window: int, window: float, latency: float) -> float:
    """The k-th request (from 0) cannot be admitted before floor(k / per_window) windows have passed;
    the last one then still takes one round trip."""
    return math.floor((requests - 1) / per_window) * window + latency


@dataclass(frozen=True)
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measured in this run

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.wanted, "measured": self.measured, "met": self.met}


def row(workload: str, name: str, run: Mapping[str, Any], *, limit: float | None = None,
        reference: Mapping[str, Any] | None = None, reference_name: str = "") -> dict[str, Any]:
    rate = jobs_per_second(run)
    return {
        "workload": workload,
        "contender": name,
        "jobs": run["jobs"],
        "jobs_per_s": rate,
        "jobs_per_s_runs": list(run.get("runs_jobs_per_s", [])),
        "vs_limit": rate / limit if limit else None,
        "vs_reference": rate / jobs_per_second(reference) if reference else None,
        "reference": reference_name if reference else None,
        "wall_s": run["wall_s"],
        "dataverse_requests": dataverse_requests(run),
        "tokens": counter(run, "entra", "POST token"),
        "secret_reads": counter(run, "keyvault", "GET secret"),
        "cpu_s_per_job": run["cpu_s"] / run["jobs"],
        "throttled_429": counter(run, "dataverse", "status:429"),
        "failures": failures(run),
        "lost": run["lost"],
        "wrong_actor": run["wrong_actor"],
        "others_cpu_share": run.get("machine_cpu", {}).get("others_share"),
    }


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def _rate_text(r: Mapping[str, Any]) -> str:
    runs = r.get("jobs_per_s_runs") or []
    if len(runs) < 2:
        return f"{r['jobs_per_s']:.1f}"
    return f"{r['jobs_per_s']:.1f} ({min(runs):.0f}-{max(runs):.0f})"


def _requests_text(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in kinds.items()) or "-"


TABLE_HEADER = ("| workload | contender | jobs/s | vs limit | vs baseline | Dataverse requests | tokens | "
                "secret reads | CPU ms/job | 429s | failures | lost | wrong actor | others' CPU |")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for r in rows:
        vs_ref = f"{r['vs_reference']:.2f}x {r['reference']}" if r["vs_reference"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['contender']} | {_rate_text(r)} | "
            f"{_fmt(r['vs_limit'], '{:.0%}')} | "
            f"{vs_ref} | {_requests_text(r['dataverse_requests'])} | {r['tokens']} | {r['secret_reads']} | "
            f"{r['cpu_s_per_job'] * 1000:.2f} | {r['throttled_429']} | {r['failures']} | {r['lost']} | "
            f"{r['wrong_actor']} | {_fmt(r['others_cpu_share'], '{:.0%}')} |"
        )
    return "\n".join(lines)


def text_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The same table for a terminal: fixed-width columns."""
    head = ("workload", "contender", "jobs/s", "vs limit", "vs baseline", "Dataverse requests", "tokens",
            "secrets", "CPU ms/job", "429s", "fail", "lost", "wrong", "others")
    body = []
    for r in rows:
        vs_ref = f"{r['vs_reference']:.2f}x {r['reference']}" if r["vs_reference"] is not None else "-"
        body.append((
            r["workload"], r["contender"], _rate_text(r), _fmt(r["vs_limit"], "{:.0%}"), vs_ref,
            _requests_text(r["dataverse_requests"]), str(r["tokens"]), str(r["secret_reads"]),
            f"{r['cpu_s_per_job'] * 1000:.2f}", str(r["throttled_429"]), str(r["failures"]), str(r["lost"]),
            str(r["wrong_actor"]), _fmt(r["others_cpu_share"], "{:.0%}"),
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def targets_markdown(targets: list[Target]) -> str:
    lines = ["| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in targets:
        met = "not measured" if t.met is None else ("**met**" if t.met else "**NOT met**")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {met} |")
    return "\n".join(lines)


def targets_text(targets: list[Target]) -> str:
    lines = []
    for t in targets:
        met = "not measured" if t.met is None else ("met" if t.met else "NOT MET")
        lines.append(f"  [{met:>12}] {t.name}: wanted {t.wanted}; measured {t.measured}")
    return "\n".join(lines)
