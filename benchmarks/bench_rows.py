"""The rows of the benchmark's tables: what `benchmarks.run` measured, before it is printed.

`Cell` and `Row` are the main table's entries (one measured value per system, display text
plus a number for the lsync/peer ratio); `Transfer` is what one change cost on the wire;
`BytesRow` and `WatchRow` are the rows of the bytes-on-the-wire table (issue 3) and of the
watcher trade-off table; `Goal` is a row of the issue 10 table (one figure of its target
table, lsync and rsync side by side, ✓/✗), placed by `goal_order` in `GOAL_FIGURES`' order;
`CpuUse` is lsync's client and agent CPU over one measured span. Plain records: nothing here
measures, reads a clock or touches a file. Split from benchmarks/bench.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cell:
    """One measured value for one system in one row (display text plus a number to compare)."""

    text: str
    value: float | None = None  # seconds, bytes or a share (p50 for latencies): ratios
    p95: float | None = None
    target_ok: bool | None = None
    extra: dict[str, float] = field(default_factory=dict)  # more numbers for targets


@dataclass
class Row:
    scenario: str
    link: str
    target: str = "—"
    cells: dict[str, Cell] = field(default_factory=dict)
    ratios: bool = True  # print lsync/peer ratios in the peers' cells

    @property
    def letter(self) -> str:
        return self.scenario[0]


@dataclass
class Transfer:
    """What one change cost on the wire, and how long until the remote was identical."""

    bytes_up: int
    bytes_down: int
    seconds: float | None  # None: never identical within the timeout
    note: str = ""

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass
class BytesRow:
    case: str
    link: str
    rtt_ms: float
    data_bytes: int  # bytes of the file or directory involved
    target_text: str
    target_bytes: float | None  # limit on lsync's bytes both ways
    lsync_first: Transfer | None = None  # the first such change after lsync started
    lsync_later: Transfer | None = None  # the same kind of change again, same session
    rsync: Transfer | None = None
    lsync_note: str = ""


@dataclass
class Goal:
    """One figure of issue 10's target table as measured in this run."""

    order: int  # position in issue 10's table (GOAL_FIGURES)
    figure: str
    link: str
    target: str
    lsync: str
    rsync: str = "—"
    ratio: str = "—"  # lsync/rsync
    ok: bool | None = None  # None: no verdict (lsync failed, or the row has no target here)
    cpu: CpuUse | None = None  # lsync's client and agent CPU over the measured span


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds lsync's client and its agent used over one measured span (None: not
    read), and how many files (or changed paths: `unit`) the span handled."""

    client: float | None
    agent: float | None
    items: int
    unit: str = "files"

    def per_thousand(self, seconds: float | None) -> str:
        if seconds is None or self.items <= 0:
            return "?"
        return f"{1000 * seconds / self.items:.2f} s"

    @property
    def text(self) -> str:
        """"CPU per 1,000 files: client 0.31 s, agent 0.14 s (24.5 s, 11.2 s)"."""
        totals = ", ".join("?" if v is None else f"{v:.1f} s" for v in (self.client, self.agent))
        return (f"CPU per 1,000 {self.unit}: client {self.per_thousand(self.client)}, agent "
                f"{self.per_thousand(self.agent)} ({totals})")


# Issue 10's target table, in its order: (figure, link) as `Goal` rows name them. Rows a run
# did not measure are listed under the table.
GOAL_FIGURES: tuple[tuple[str, str], ...] = (
    ("initial sync, kernel tree", "RTT 0 ms"),
    ("initial sync, kernel tree", "RTT 300 ms"),
    ("initial sync, kernel tree", "RTT 300 ms, 100 Mbit/s"),
    ("upgrade by git checkout while running, kernel tree", "RTT 300 ms"),
    ("initial sync, small tree", "RTT 0 ms"),
    ("initial sync, small tree", "RTT 300 ms"),
    ("initial sync, small tree", "RTT 300 ms, 100 Mbit/s"),
    ("first contact with a copy lsync never saw, kernel tree", "RTT 300 ms"),
    ("restart, kernel tree unchanged", "RTT 300 ms"),
    ("a save during an initial sync", "RTT 300 ms"),
    ("a save during a burst of 1000 files", "RTT 300 ms"),
    ("client peak RSS, kernel tree", "RTT 300 ms"),
    ("one save", "RTT 300 ms"),
    ("burst of 1000 files", "RTT 300 ms"),
)


def goal_order(figure: str) -> int:
    """The position of `figure` in issue 10's table (trees and links it does not name come
    after the rows of the same figure)."""
    stem = figure.split(",")[0]
    for i, (name, _link) in enumerate(GOAL_FIGURES):
        if name == figure:
            return i
    for i, (name, _link) in enumerate(GOAL_FIGURES):
        if name.split(",")[0] == stem:
            return i
    return len(GOAL_FIGURES)


@dataclass
class WatchRow:
    step_ms: int
    debounce_ms: int
    detect: list[float] = field(default_factory=list)  # watchfiles alone: write -> event
    detect_missed: int = 0
    watch_cpu: float | None = None
    lsync_saves: list[float] = field(default_factory=list)  # lsync, RTT 0: save -> identical
    lsync_missed: int = 0
    lsync_cpu: float | None = None
    note: str = ""
