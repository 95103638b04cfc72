"""The benchmark's own arithmetic: limits, the queue model, importtime parsing, the soak's balance sheet."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bench import coldstart, soak
from bench.__main__ import BENCH_DOC, BENCH_END, BENCH_START, replace_between_markers
from bench.report import latency_bound_jobs_per_second, window_minimum_seconds
from bench.worker import QueueSim, failure_code
from bench.workload import Workload
from shared.errors import DataverseError


def test_latency_bound_counts_one_write_per_job_and_one_lookup_per_actor() -> None:
    # (2000 + 50) requests x 100 ms / 24 in flight = 8.54 s for 2000 jobs
    assert latency_bound_jobs_per_second(2000, 50, 0.1, 24) == pytest.approx(2000 / 8.541666, rel=1e-5)


@pytest.mark.parametrize(
    ("requests", "expected"),
    [(1, 0.025), (200, 0.025), (201, 5.025), (600, 10.025), (650, 15.025)],
)
def test_window_minimum(requests: int, expected: float) -> None:
    assert window_minimum_seconds(requests, 200, 5, 0.025) == pytest.approx(expected)


def test_queue_redelivers_a_failed_message_and_poisons_it_after_max_dequeue() -> None:
    queue = QueueSim([b"a", b"b"], max_dequeue=3, redelivery=0.0)
    deadline = time.monotonic() + 5
    seen: list[tuple[bytes, int]] = []
    while (item := queue.take(deadline)) is not None:
        seen.append(item)
        body, count = item
        if body == b"a":
            queue.done()
        else:
            queue.failed(body, count)
    assert (b"a", 1) in seen
    assert [c for b, c in seen if b == b"b"] == [1, 2, 3]
    assert queue.poisoned == 1
    assert queue.unfinished == 0


def test_queue_hides_a_failed_message_for_the_visibility_timeout() -> None:
    queue = QueueSim([b"x"], max_dequeue=5, redelivery=0.2)
    deadline = time.monotonic() + 5
    item = queue.take(deadline)
    assert item == (b"x", 1)
    failed_at = time.monotonic()
    queue.failed(b"x", 1)
    again = queue.take(deadline)
    assert again == (b"x", 2)
    assert time.monotonic() - failed_at >= 0.2
    queue.done()
    assert queue.take(deadline) is None


def test_queue_take_returns_none_at_the_deadline_with_messages_hidden() -> None:
    queue = QueueSim([b"x"], max_dequeue=5, redelivery=60)
    item = queue.take(time.monotonic() + 5)
    assert item is not None
    queue.failed(*item)
    assert queue.take(time.monotonic() + 0.05) is None
    assert queue.unfinished == 1


def test_waiting_takers_wake_when_the_last_message_finishes() -> None:
    queue = QueueSim([b"x"], max_dequeue=5, redelivery=60)
    item = queue.take(time.monotonic() + 5)
    assert item is not None
    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(queue.take(time.monotonic() + 5)))
    waiter.start()
    queue.done()
    waiter.join(timeout=5)
    assert results == [None]


def test_failure_code_prefers_the_project_code_then_the_http_status() -> None:
    assert failure_code(DataverseError("throttled", code="dataverse_throttled", transient=True)) == \
        "dataverse_throttled"

    class HttpError(Exception):
        status_code = 429

    assert failure_code(HttpError()) == "http_429"
    assert failure_code(KeyError("x")) == "KeyError"


def test_workload_jobs_cycle_through_the_actors() -> None:
    workload = Workload("w", 4, 2)
    jobs = [workload.job(i) for i in range(4)]
    assert [j["actAs"]["email"] for j in jobs] == [
        "actor0001@contoso.com", "actor0002@contoso.com", "actor0001@contoso.com", "actor0002@contoso.com"]
    assert len({j["key"]["emailaddress1"] for j in jobs}) == 4
    assert "actAs" not in Workload("w", 1, 0).job(0)


def test_parse_importtime_reads_depth_and_cumulative_time() -> None:
    text = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   shared.errors\n"
        "import time:       200 |        300 | shared\n"
    )
    assert coldstart.parse_importtime(text) == [(1, "shared.errors", 100), (0, "shared", 300)]


def _plan() -> tuple[soak.Plan, list[str]]:
    plan = soak.Plan(jobs=5, bad_rate=0.0, poison_rate=0.0, seed=1, prefix="t")
    return plan, ["good", "good", "unknown_actor", "table_down", "good"]


def test_balance_sheet_balances_when_every_job_is_where_it_belongs() -> None:
    plan, kinds = _plan()
    dead = [{"job": plan.job(2, "unknown_actor"), "reason": "actor_not_found", "detail": "no user",
             "failedAt": "2026-01-01T00:00:00.000Z"}]
    written = {plan.key(0), plan.key(1), plan.key(4)}
    sheet = soak.balance(plan, kinds, written, dead, [plan.job(3, "table_down")])
    assert sheet["balanced"]
    assert sheet["counts"] == {"written": 3, "dead-letter": 1, "poison": 1}


def test_balance_sheet_reports_missing_twice_and_misplaced_jobs() -> None:
    plan, kinds = _plan()
    dead = [{"job": plan.job(2, "unknown_actor"), "reason": "invalid_job", "detail": "x",
             "failedAt": "2026-01-01T00:00:00.000Z"}]
    poison = [plan.job(3, "table_down"), plan.job(0, "good")]
    sheet = soak.balance(plan, kinds, {plan.key(0), plan.key(1)}, dead, poison)
    assert not sheet["balanced"]
    assert sheet["missing"] == [plan.job_id(4)]
    assert sheet["twice"] == [plan.job_id(0)]
    assert [m["job"] for m in sheet["misplaced"]] == [plan.job_id(2)]


def test_dead_letter_without_a_reason_does_not_count_as_expected() -> None:
    plan, kinds = _plan()
    dead = [{"job": plan.job(2, "unknown_actor"), "reason": "actor_not_found"}]  # no detail / failedAt
    written = {plan.key(0), plan.key(1), plan.key(4)}
    sheet = soak.balance(plan, kinds, written, dead, [plan.job(3, "table_down")])
    assert not sheet["balanced"]


def test_memory_verdict_flags_growth_after_warm_up() -> None:
    mib = 2**20
    progress = [(float(t), t * 100) for t in range(100)]
    flat = [(float(t), 60 * mib + (t % 3) * mib) for t in range(100)]
    leaking = [(float(t), 60 * mib + t * mib) for t in range(100)]
    assert soak.memory_verdict(flat, progress, 10_000)["flat"] is True
    assert soak.memory_verdict(leaking, progress, 10_000)["flat"] is False


def test_bench_figures_replace_only_the_marked_section_of_docs_bench(tmp_path: Path) -> None:
    """A full run rewrites the figures between the markers and keeps the prose around them."""
    doc = tmp_path / "bench.md"
    doc.write_text(f"intro\n{BENCH_START}\nold figures\n{BENCH_END}\nfooter\n", encoding="utf-8")
    assert replace_between_markers(doc, "# Benchmarks\nnew figures")
    assert doc.read_text(encoding="utf-8") == (
        f"intro\n{BENCH_START}\n# Benchmarks\nnew figures\n{BENCH_END}\nfooter\n"
    )


def test_bench_figures_leave_a_document_without_markers_alone(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("hand-written, no markers\n", encoding="utf-8")
    assert not replace_between_markers(doc, "figures")
    assert doc.read_text(encoding="utf-8") == "hand-written, no markers\n"
    assert not replace_between_markers(tmp_path / "missing.md", "figures")


def test_the_committed_bench_doc_has_the_markers_a_full_run_writes_between() -> None:
    text = BENCH_DOC.read_text(encoding="utf-8")
    assert 0 <= text.find(BENCH_START) < text.find(BENCH_END)


def test_w6_bulk_workload_covers_the_same_records_in_jobs_that_fit_a_queue_message() -> None:
    import json as _json

    from bench.workload import Workload
    from shared.contract import MAX_JOB_BYTES, parse_message

    single, bulk = Workload("w6s", 1000, 1), Workload("w6b", 1000, 1, 250)
    bodies = list(bulk.bodies())
    assert len(bodies) == 4 and all(len(b.encode()) <= MAX_JOB_BYTES for b in bodies)
    records = [r for b in bodies for r in parse_message(b).records or ()]
    assert [r["key"] for r in records] == [{"emailaddress1": bulk.key(i)} for i in range(1000)]
    assert [r["data"] for r in records] == [_json.loads(b)["data"] for b in single.bodies()]
    assert Workload.from_dict(bulk.to_dict()) == bulk


def test_w6_summary_reports_requests_and_wall_time_side_by_side() -> None:
    from bench import w6

    def run(writes: int, wall: float) -> dict[str, object]:
        return {"counters": {"dataverse": {"PATCH contacts": writes, "GET WhoAmI": 1, "status:204": writes}},
                "wall_s": wall, "lost": 0, "wrong_actor": 0, "failures": {}, "dead_lettered": 0}

    summary = w6.summarize(1000, run(1000, 10.0), run(4, 1.0), quick=False)
    assert [r["requests"] for r in summary["rows"]] == [1001, 5]
    assert summary["ratios"] == {"requests": 1001 / 5, "wall_time": 10.0, "under_limits": 10.0}
    many = w6.summarize(20_000, run(20_000, 180.0), run(80, 5.0), quick=False)
    assert many["rows"][0]["least_under_limits_s"] == pytest.approx(900.1)  # 3 full windows of 6,000
    assert many["rows"][1]["least_under_limits_s"] == 5.0
    assert "200x fewer requests" in w6.markdown(summary)
    assert all(met for *_, met in w6.targets(summary))
