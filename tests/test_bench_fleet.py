"""benchmarks/fleet.py's verdicts: each goal row marks ✓ only when the figure meets it."""

from __future__ import annotations

from benchmarks.fleet_measures import Burst, Results, Saves
from benchmarks.fleet_table import table
from benchmarks.fleet_testbed import FLEET, ONE

DELAY = 0.150


def row(text: str, start: str) -> list[str]:
    found = [line for line in text.splitlines() if line.startswith(f"| {start}")]
    assert len(found) == 1, text
    return [cell.strip() for cell in found[0].strip("|").split("|")]


def saves(seconds: list[float]) -> Saves:
    return Saves(last=seconds, per_host={"x86": seconds})


def test_the_save_row_needs_p50_and_p95_within_the_delay_plus_25_and_40_ms() -> None:
    met = Results(saves={FLEET: saves([0.170] * 19 + [0.189])})
    assert row(table(met, DELAY), "1. one save")[-1] == "✓"
    slow_tail = Results(saves={FLEET: saves([0.170] * 18 + [0.200] * 2)})
    assert row(table(slow_tail, DELAY), "1. one save")[-1] == "✗"
    missed = Results(saves={FLEET: Saves(last=[0.170] * 20, per_host={}, missed=1)})
    assert row(table(missed, DELAY), "1. one save")[-1] == "✗"


def test_the_read_row_compares_three_targets_with_one() -> None:
    same = Results(reads={ONE: 1_000_000.0, FLEET: 1_050_000.0})
    assert row(table(same, DELAY), "2. client read bytes")[-1] == "✓"
    double = Results(reads={ONE: 1_000_000.0, FLEET: 2_000_000.0})
    assert row(table(double, DELAY), "2. client read bytes")[-1] == "✗"


def test_a_burst_flush_is_compared_and_missing_files_are_shown() -> None:
    r = Results(bursts={ONE: [Burst(1.0, 0.1, 0), Burst(1.1, 0.1, 0)],
                        FLEET: [Burst(1.3, 0.1, 0), Burst(1.25, 0.1, 2)]})
    cells = row(table(r, DELAY), "3. flush right after")
    assert cells[-1].startswith("✗ (1.25x)")
    assert "2 files missing" in cells[2]
