"""W5's verdicts and its section of docs/bench.md (pure functions; the run itself is `make bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import multihost


def run(hosts: int, shared: bool, rate: float, ratio: float, share: float, lost: int = 0,
        poison: int = 0) -> dict[str, Any]:
    return {"hosts": hosts, "shared": shared, "jobs_per_s": rate, "ratio": ratio, "throttled_share": share,
            "lost": lost, "duplicates": 0, "poison": poison, "dead_letter": 0}


def test_targets_judge_the_largest_n_with_the_shared_throttle_and_losses_everywhere() -> None:
    runs = [run(1, True, 20, 0.9, 0.01), run(16, True, 21, 0.88, 0.015), run(16, False, 5, 0.2, 0.3, lost=7)]
    verdicts = {name: met for name, _, _, met in multihost.targets(runs)}
    assert verdicts == {"W5 N=16 throughput": True, "W5 N=16 429s": True, "W5 throughput vs N": True,
                        "W5 throttle on: jobs poisoned or dead-lettered": True, "W5 lost / duplicates": False}
    # a job the throttle-on runs parked in the poison queue is not lost, but it is not a pass either
    parked = [run(16, True, 21, 0.88, 0.015, poison=2), run(16, False, 5, 0.2, 0.3, poison=900)]
    verdicts = {name: met for name, _, _, met in multihost.targets(parked)}
    assert verdicts["W5 throttle on: jobs poisoned or dead-lettered"] is False
    assert verdicts["W5 lost / duplicates"] is True
    falling = [run(1, True, 20, 0.9, 0.0), run(4, True, 15, 0.7, 0.0)]
    assert {n: m for n, _, _, m in multihost.targets(falling)}["W5 throughput vs N"] is False


def test_the_w5_section_is_replaced_between_its_own_markers(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("intro\n<!-- bench:start -->\nfigures\n<!-- bench:end -->\n", encoding="utf-8")
    assert multihost.replace_between(doc, "first")
    assert multihost.replace_between(doc, "second")
    text = doc.read_text(encoding="utf-8")
    assert "figures" in text and "second" in text and "first" not in text
    assert text.count(multihost.W5_START) == 1
