"""The benchmark's scenarios on the wire and the watcher (see benchmarks/scenarios.py for
the list): e. a one-line edit in a 10 MB file, every system; issue 3's bytes table;
the watcher's step against detection latency and idle CPU. Split from
benchmarks/scenarios.py, whose helpers they use."""

from __future__ import annotations

import importlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import peers, procstat, watch_latency
from benchmarks.bench import (
    BIG_FILE,
    INSERT_FILE,
    LSYNC,
    RENAME_A,
    RENAME_B,
    RENAME_PARENT,
    RSYNC,
    SMALL_FILE,
    WATCHERS,
    Bench,
    LinkSpec,
    percentile,
    quiet_for,
    say,
    wait_quiet,
    wait_until,
)
from benchmarks.bench_rows import BytesRow, Cell, Transfer, WatchRow
from benchmarks.lsync_runner import LsyncWatcher
from benchmarks.peers import Link, PeerError
from benchmarks.scenarios import (
    fmt_transfer,
    mark,
    new_content,
)
from benchmarks.testbed import trees

# ---------------------------------------------------------------------------------------------
# e. one-line edit in a 10 MB file, every system
# ---------------------------------------------------------------------------------------------


def scenario_e_big_edit(bench: Bench, spec: LinkSpec) -> None:
    """e. one-line edit in a 10 MB file: bytes on the wire (both ways) and time."""
    row = bench.row("e. one-line edit, 10 MB file: bytes both ways, time to identical", spec,
                    "≤ 4 KB (issue 3)")
    for system in (RSYNC, *WATCHERS):
        if not bench.runnable(system):
            continue
        bench.reset()
        first = new_content(bench, BIG_FILE, seed=11)
        later = trees.one_line_edit(first, seed=12)
        with bench.link(spec) as (link, proxy):
            if system == RSYNC:
                peers.save_file(bench.local / BIG_FILE, first)
                proxy.reset_counters()
                r = peers.rsync_push(bench.local, link, files=[BIG_FILE], check=False)
                ok = (bench.remote / BIG_FILE).read_bytes() == first
                total = proxy.counters().bytes_total
                row.cells[system] = Cell(
                    fmt_transfer(Transfer(total, 0, r.seconds if ok else None)),
                    value=float(total))
                say(f"e {spec.label} rsync: {row.cells[system].text}")
                continue
            w = bench.watcher(system, link)
            try:
                w.start()
            except PeerError as exc:
                row.cells[system] = Cell(f"failed to start ({exc.code})")
                bench.failed(system, f"e {spec.label}", exc)
                continue
            try:
                results: list[Transfer] = []
                for data in ((first, later) if system == LSYNC else (first,)):
                    wait_quiet(proxy, quiet_for(spec))
                    proxy.reset_counters()
                    t0 = time.perf_counter()
                    seconds = peers.measure_save(bench.local / BIG_FILE,
                                                 bench.remote / BIG_FILE, data, "truncate",
                                                 bench.s.save_timeout * 3)
                    wait_quiet(proxy, quiet_for(spec))
                    c = proxy.counters()
                    writes = w.acks_since(BIG_FILE, t0) if isinstance(w, LsyncWatcher) else 1
                    note = f"{writes} writes acknowledged" if writes > 1 else ""
                    results.append(Transfer(c.bytes_up, c.bytes_down, seconds, note))
                cell = Cell(fmt_transfer(results[0]), value=float(results[0].total))
                if system == LSYNC:
                    mark(cell, results[0].total <= 4000)
                    cell.text = "first edit after start " + cell.text
                    cell.text += f"; again {fmt_transfer(results[1])}"
                    mark(cell, results[1].total <= 4000)
                row.cells[system] = cell
                say(f"e {spec.label} {system}: {cell.text}")
            finally:
                w.stop()


# ---------------------------------------------------------------------------------------------
# bytes: issue 3's table
# ---------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One kind of change: applied to the local tree, it says what the remote must become."""

    case: str
    rel: str  # the file, or the directory whose contents rsync mirrors (with --delete)
    target_text: str
    target_bytes: Callable[[int], float | None]  # limit from the data's size
    apply: Callable[[Path, int], tuple[dict[str, bytes], list[str]]]  # -> (expected, gone)
    is_dir: bool = False


def _edit(rel: str) -> Callable[[Path, int], tuple[dict[str, bytes], list[str]]]:
    def apply(root: Path, n: int) -> tuple[dict[str, bytes], list[str]]:
        data = trees.one_line_edit((root / rel).read_bytes(), seed=100 + n)
        peers.save_file(root / rel, data)
        return {rel: data}, []

    return apply


def _insert(rel: str) -> Callable[[Path, int], tuple[dict[str, bytes], list[str]]]:
    def apply(root: Path, n: int) -> tuple[dict[str, bytes], list[str]]:
        data = f"#include <linux/inserted{n}.h>\n".encode() + (root / rel).read_bytes()
        peers.save_file(root / rel, data)
        return {rel: data}, []

    return apply


def _rename(root: Path, n: int) -> tuple[dict[str, bytes], list[str]]:
    old, new = (RENAME_A, RENAME_B) if n % 2 == 0 else (RENAME_B, RENAME_A)
    os.rename(root / old, root / new)
    expected = {}
    for dirpath, _dirs, files in os.walk(root / new):
        for name in files:
            path = Path(dirpath, name)
            expected[path.relative_to(root).as_posix()] = path.read_bytes()
    return expected, [old]


CHANGES = (
    Change("one-line edit, 20 KB C file", SMALL_FILE, "≤ rsync", lambda _n: None,
           _edit(SMALL_FILE)),
    Change("one-line edit, 10 MB file", BIG_FILE, "≤ 4 KB", lambda _n: 4000.0,
           _edit(BIG_FILE)),
    Change("insertion at the start, 10 MB file", INSERT_FILE, "≤ 8 KB", lambda _n: 8000.0,
           _insert(INSERT_FILE)),
    Change("directory of 1,000 files renamed", RENAME_PARENT, "≤ 1% of its bytes",
           lambda n: 0.01 * n, _rename, is_dir=True),
)


def _data_bytes(root: Path, change: Change) -> int:
    path = root / change.rel
    if not change.is_dir:
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _wait_remote(bench: Bench, expected: dict[str, bytes], gone: list[str], t0: float,
                 timeout: float) -> float | None:
    res = peers.wait_all_identical([(bench.remote / rel, data) for rel, data in expected.items()],
                                   t0, timeout)
    if res.seconds is None:
        return None
    t1 = wait_until(lambda: not any((bench.remote / g).exists() for g in gone),
                    max(0.0, t0 + timeout - time.perf_counter()))
    return None if t1 is None else max(res.seconds, t1 - t0)


def scenario_bytes(bench: Bench, spec: LinkSpec) -> None:
    """Issue 3's bytes table for one link: lsync (first change, same change again) vs rsync."""
    rows = []
    for change in CHANGES:
        size = _data_bytes(bench.src, change)
        rows.append(BytesRow(change.case, spec.label, spec.rtt_ms, size, change.target_text,
                             change.target_bytes(size)))
    bench.bytes_rows.extend(rows)
    timeout = 60.0
    if bench.runnable(RSYNC):
        for change, row in zip(CHANGES, rows, strict=True):
            bench.reset()
            expected, gone = change.apply(bench.local, 0)
            with bench.link(spec) as (link, proxy):
                if change.is_dir:
                    sub = Link(link.ssh_config, link.alias, bench.remote / change.rel)
                    r = peers.rsync_push(bench.local / change.rel, sub, extra_args=["--delete"],
                                         check=False)
                else:
                    r = peers.rsync_push(bench.local, link, files=[change.rel], check=False)
                c = proxy.counters()
            ok = r.returncode == 0 and _wait_remote(bench, expected, gone, time.perf_counter(),
                                                    0.0) is not None
            row.rsync = Transfer(c.bytes_up, c.bytes_down, r.seconds if ok else None,
                                 "" if ok else f"rsync exit {r.returncode}")
            say(f"bytes {spec.label} {change.case} rsync: {fmt_transfer(row.rsync)}")
    if not bench.runnable(LSYNC):
        return
    bench.reset()
    with bench.link(spec) as (link, proxy):
        w = bench.lsync(link, name="lsync-bytes")
        try:
            w.start()
        except PeerError as exc:
            for row in rows:
                row.lsync_note = f"failed to start ({exc.code})"
            bench.failed(LSYNC, f"bytes {spec.label}", exc)
            return
        try:
            for change, row in zip(CHANGES, rows, strict=True):
                for n in (0, 1):
                    wait_quiet(proxy, quiet_for(spec))
                    proxy.reset_counters()
                    expected, gone = change.apply(bench.local, n)
                    t0 = time.perf_counter()
                    seconds = _wait_remote(bench, expected, gone, t0, timeout)
                    quiet = wait_quiet(proxy, quiet_for(spec))
                    c = proxy.counters()
                    notes = [] if quiet else ["link never went quiet"]
                    writes = w.acks_since(change.rel, t0)
                    if not change.is_dir and writes > 1:
                        notes.append(f"{writes} writes acknowledged")
                    t = Transfer(c.bytes_up, c.bytes_down, seconds, "; ".join(notes))
                    if n == 0:
                        row.lsync_first = t
                    else:
                        row.lsync_later = t
                    say(f"bytes {spec.label} {change.case} lsync #{n + 1}: {fmt_transfer(t)}")
                    if not w.alive():
                        row.lsync_note = "lsync exited"
                        bench.note(f"lsync exited during the bytes table ({spec.label}); "
                                   f"log: {w.tail(400)}")
                        return
        finally:
            w.stop()


# ---------------------------------------------------------------------------------------------
# watch: the watcher's step
# ---------------------------------------------------------------------------------------------


def lsync_debounce_ms() -> int:
    """lsync's default watcher debounce (looked up at run time: lsync may not import)."""
    try:
        watcher = importlib.import_module("lsync.client.local.watcher")
    except ImportError:
        return 50
    return int(getattr(watcher, "DEFAULT_DEBOUNCE_MS", 50))


def scenario_watch(bench: Bench) -> None:
    """watchfiles alone, then lsync at RTT 0, for each watcher step."""
    debounce = lsync_debounce_ms()
    rng = random.Random("watch")
    rels = rng.sample(bench.tree_files, min(20, len(bench.tree_files)))
    rows = [WatchRow(step, debounce) for step in bench.s.watch_steps]
    bench.watch_rows.extend(rows)
    bench.reset()
    for row in rows:
        try:
            r = watch_latency.measure_step(bench.local, [bench.local / rel for rel in rels],
                                           row.step_ms, debounce, bench.s.watch_events,
                                           bench.s.watch_idle)
        except (watch_latency.ProbeError, procstat.ProcessGone) as exc:
            row.note = f"watchfiles probe failed: {exc}"
            say(row.note)
            continue
        row.detect, row.detect_missed, row.watch_cpu = r.latencies, r.missed, r.idle_cpu
        say(f"watch step {row.step_ms}: watchfiles detect p50 "
            f"{percentile(r.latencies, 0.5) * 1000:.1f} ms, idle {100 * r.idle_cpu:.2f}%")
    if not bench.runnable(LSYNC):
        return
    spec = LinkSpec(0.0)
    for row in rows:
        bench.reset()
        with bench.link(spec) as (link, proxy):
            w = bench.lsync(link, name=f"lsync-step{row.step_ms}",
                            extra_args=["--step-ms", str(row.step_ms)])
            try:
                w.start()
            except PeerError as exc:
                row.note = f"lsync failed to start ({exc.code})"
                bench.failed(LSYNC, f"watch step {row.step_ms}", exc)
                continue
            try:
                for i in range(bench.s.watch_events):
                    rel = rels[i % len(rels)]
                    data = new_content(bench, rel, seed=200 + i)
                    wait_quiet(proxy, quiet_for(spec))
                    seconds = peers.measure_save(bench.local / rel, bench.remote / rel, data,
                                                 "truncate", bench.s.save_timeout)
                    if seconds is None:
                        row.lsync_missed += 1
                    else:
                        row.lsync_saves.append(seconds)
                wait_quiet(proxy, quiet_for(spec))
                assert w.pid is not None
                row.lsync_cpu = procstat.idle_cpu(w.pid, bench.s.watch_idle)
            except procstat.ProcessGone as exc:
                row.note = f"lsync exited: {exc}"
            finally:
                w.stop()
        if row.lsync_saves:
            say(f"watch step {row.step_ms}: lsync save p50 "
                f"{percentile(row.lsync_saves, 0.5) * 1000:.1f} ms, idle "
                f"{100 * (row.lsync_cpu or 0):.2f}%")

