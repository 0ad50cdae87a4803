"""One command for the high-latency benchmark: ``python -m benchmarks.run [--short]``.

It installs what the peers need (Debian packages), starts a private sshd on 127.0.0.1, puts
the delay proxy in front of it, takes deterministic trees from a cache (generating them the
first time), and runs issue 4's scenarios (a-f, see benchmarks/scenarios.py) for lsync and
its peers on the same link in the same run, at RTT 0 and RTT 300 ms (initial syncs also
with a 100 Mbit/s cap), issue 10's (g: first contact with a remote copy lsync never saw, h: a
save during bulk work; both at the longest RTT) and issue 16's u (an upgrade by `git
checkout` while lsync runs, benchmarks/scenario_upgrade.py), then issue 3's bytes-on-the-wire
table and the watcher's step/latency/CPU trade-off. `--issue10` runs only what issue 10's
target table needs (lsync and rsync; a, b, c, d, f, g, h), `--issue16` the real-kernel table
(lsync and rsync; c, d, f, g, h, u). In full mode the `kernel` tree is the real Linux kernel
(benchmarks/bench.py says how it is fetched; `--generated-kernel` for the generated one).

It prints the Markdown tables (issue 10's first) and writes them into benchmarks/README.md
between the results markers, with the date, the machine, each row's target and lsync's ✓/✗
against it, and the ratios lsync/peer. lsync is driven as a subprocess (benchmarks/lsync_runner.py);
when it cannot be imported its column says "not run". The short mode (tiny tree, few
samples, short timeouts) takes about three minutes; the full mode about 40.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import (
    kernel_material,
    procstat,
    scenario_bulk,
    scenario_upgrade,
    scenario_wire,
    scenarios,
)
from benchmarks.bench import (
    ISSUE10_SCENARIOS,
    ISSUE10_SYSTEMS,
    ISSUE16_SCENARIOS,
    LSYNC,
    SCENARIOS,
    SYSTEMS,
    Bench,
    LinkSpec,
    Settings,
    fmt_kb,
    percentile,
    say,
)
from benchmarks.bench_rows import GOAL_FIGURES, BytesRow, Transfer, WatchRow
from benchmarks.provenance import installed_lsync, lsync_commit, machine_description
from benchmarks.testbed import trees
from benchmarks.testbed.proxy import self_check

README = Path(__file__).with_name("README.md")
RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"


# =============================================================================================
# Tables
# =============================================================================================


def render_main(bench: Bench) -> str:
    columns = [s for s in SYSTEMS if s in bench.s.systems or s == LSYNC]
    header = "| scenario | link | target (lsync) | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    first_seen: dict[str, int] = {}
    for i, row in enumerate(bench.rows):
        first_seen.setdefault(row.scenario, i)
    ordered = sorted(enumerate(bench.rows),
                     key=lambda ir: (ir[1].letter, first_seen[ir[1].scenario], ir[0]))
    for _, row in ordered:
        if not row.cells and not (LSYNC in columns and not bench.lsync_ok):
            continue
        lsync_value = row.cells[LSYNC].value if LSYNC in row.cells else None
        out = []
        for system in columns:
            cell = row.cells.get(system)
            if system == LSYNC and not bench.lsync_ok:
                out.append("not run")
            elif cell is None:
                out.append("—")
            else:
                text = cell.text
                if system != LSYNC and row.ratios and lsync_value and cell.value:
                    text += f" (lsync/peer {lsync_value / cell.value:.2f})"
                out.append(text)
        lines.append(f"| {row.scenario} | {row.link} | {row.target} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _bytes_cell(t: Transfer | None, row: BytesRow) -> str:
    if t is None:
        return row.lsync_note or "—"
    text = scenarios.fmt_transfer(t)
    ok = t.seconds is not None
    if row.target_bytes is not None:
        ok = ok and t.total <= row.target_bytes
    if row.rsync is not None:
        ok = ok and t.total <= row.rsync.total
    return text + (" ✓" if ok else " ✗")


def _ratio(a: Transfer | None, b: Transfer | None) -> str:
    if a is None or b is None or not b.total:
        return "—"
    return f"{a.total / b.total:.3f}"


def _round_trip(row: BytesRow, t: Transfer | None) -> str:
    if row.rtt_ms < 100 or t is None or t.seconds is None:
        return "—"
    rtt = row.rtt_ms / 1000
    if t.seconds < rtt:
        return f"none ({t.seconds * 1000:.0f} ms < 1 RTT)"
    return f"yes? ({t.seconds * 1000:.0f} ms ≥ 1 RTT)"


def render_bytes(bench: Bench) -> str:
    lines = [
        "| case | link | data | target (lsync) | lsync: first change after start | "
        "lsync: same change again | rsync -az | lsync/rsync bytes (first, again) | "
        "extra round trip (again)? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in bench.bytes_rows:
        target = row.target_text if row.target_text == "≤ rsync" else f"{row.target_text}, ≤ rsync"
        lines.append(
            f"| {row.case} | {row.link} | {fmt_kb(row.data_bytes)} | {target} | "
            f"{_bytes_cell(row.lsync_first, row)} | {_bytes_cell(row.lsync_later, row)} | "
            f"{scenarios.fmt_transfer(row.rsync)} | {_ratio(row.lsync_first, row.rsync)}, "
            f"{_ratio(row.lsync_later, row.rsync)} | {_round_trip(row, row.lsync_later)} |")
    return "\n".join(lines)


def _latency(values: list[float], missed: int) -> str:
    if not values:
        return "—" if not missed else f"never ({missed} missed)"
    p50, p95, worst = (percentile(values, q) * 1000 for q in (0.5, 0.95, 1.0))
    text = f"{p50:.1f} / {p95:.1f} / {worst:.1f}"
    return text + (f" ({missed} missed)" if missed else "")


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def render_watch(rows: list[WatchRow]) -> str:
    lines = [
        "| step ms | debounce ms | watchfiles alone: write -> event, p50 / p95 / max ms | "
        "watchfiles alone: idle CPU | lsync, RTT 0: save -> identical, p50 / p95 / max ms | "
        "lsync: idle CPU |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.step_ms} | {r.debounce_ms} | {_latency(r.detect, r.detect_missed)} | "
                     f"{_share(r.watch_cpu)} | {_latency(r.lsync_saves, r.lsync_missed)} | "
                     f"{_share(r.lsync_cpu)}{note} |")
    return "\n".join(lines)


def render_goals(bench: Bench) -> str:
    """The targets table (issues 10 and 16): each figure measured in this run, lsync next to
    rsync, with lsync's client and agent CPU per 1,000 files where measured."""
    lines = ["| figure | link | target (lsync) | lsync | client CPU / 1,000 files | "
             "agent CPU / 1,000 files | rsync | lsync/rsync | met? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in sorted(bench.goals, key=lambda g: g.order):
        verdict = "—" if g.ok is None else ("✓" if g.ok else "✗")
        client = agent = "—"
        if g.cpu is not None:
            client, agent = g.cpu.per_thousand(g.cpu.client), g.cpu.per_thousand(g.cpu.agent)
            if g.cpu.unit != "files":
                client, agent = (f"{x} (per 1,000 {g.cpu.unit})" for x in (client, agent))
        lines.append(f"| {g.figure} | {g.link} | {g.target} | {g.lsync} | {client} | {agent} "
                     f"| {g.rsync} | {g.ratio} | {verdict} |")
    seen = {(g.figure, g.link) for g in bench.goals}
    missing = [f"{figure} ({link})" for figure, link in GOAL_FIGURES
               if (figure, link) not in seen]
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
    return "\n".join(lines)


def report(bench: Bench, proxy_check: str, started: dt.datetime, minutes: float,
           installed: str) -> str:
    mode = "short" if bench.s.short else "full"
    lsync_note = "" if bench.lsync_ok else f" lsync not run: {bench.lsync_reason}."
    tree_text = ", ".join(f"`{name}` {info.files:,} files / {fmt_kb(info.bytes)}"
                          + (f" (Linux {kernel_material.TAGS[0][1:]}, Debian's "
                             f"{kernel_material.PACKAGE} {kernel_material.RELEASES[0]}, a git "
                             f"work tree)" if name == "kernel" and bench.s.real_kernel else "")
                          for name, info in sorted(bench.tree_info.items()))
    parts = [
        f"Run {started:%Y-%m-%d %H:%M} UTC, {mode} mode, {minutes:.0f} min; lsync at "
        f"{lsync_commit()}. Trees: {tree_text}; scenarios a, b, e on `{bench.s.tree}` "
        f"({bench.s.saves} saves per kind, burst {bench.s.burst}).{lsync_note}",
        "",
        f"Installed lsync (what ran): {installed}",
        "",
        f"Machine: {machine_description()}",
        "",
        f"Delay proxy self-check: {proxy_check}",
        "",
        f"Remote trees (rsync's and lsync's): {bench.remote_fs_text}",
        "",
        f"Load: {bench.load_text}",
        "",
        *(["### Targets (issues 10 and 16)", "", render_goals(bench), "",
           "Ratios are lsync's value divided by rsync's (time; for the first contact also "
           "bytes, in the lsync column). A save during bulk work: from the end of the save "
           "until the remote copy is byte-identical (polled every ~1 ms); `n=` says how many "
           "saves were made before the initial sync was done. \"No worse\" rows: the "
           "earlier figures (162 ms p50, 0.78 s) with 2% of noise allowed. CPU: user + "
           "system seconds of lsync's client and of its agent (the `python3 -c` process "
           "below the sshd, found by its command line) from /proc, over the measured span "
           "(the initial sync: spawn to `ready`; the restart: spawn to a quiet link; the "
           "upgrade: from just before the checkout to the in-sync line), per 1,000 files of "
           "the tree (per 1,000 changed paths for the upgrade). The rows come from the "
           "tables below.", ""] if bench.goals else []),
        "### Issues 4 and 10: lsync and its peers",
        "",
        render_main(bench),
        "",
        "Latencies: from the end of the save until the remote copy is byte-identical (polled "
        "every ~1 ms). `script+CM` is the write-up's inotifywait+rsync loop over an open "
        "OpenSSH ControlMaster, `script` the same without one; `lsyncd` is default.rsyncssh "
        "with delay = 0. `(n=k)`: a slow peer was stopped after k saves. Ratios are lsync's "
        "value divided by the peer's (`lsync/peer`, < 1: lsync is faster or smaller). ✓/✗ "
        "mark lsync against the target in the third column.",
    ]
    if bench.bytes_rows:
        parts += ["", "### Issue 3: bytes on the wire (both directions, proxy counters)", "",
                  render_bytes(bench), "",
                  "lsync runs connected and in sync; each change is made, the remote polled "
                  "until identical, then the link until quiet: the bytes are all that crossed "
                  "meanwhile. \"First change after start\" is the first change of that file "
                  "since lsync started on the already-synced tree; \"same change again\" "
                  "repeats it (another line, another insertion, the rename back). rsync -az "
                  "is one run for the changed file (or `--delete` on the renamed directory's "
                  "parent), starting from the in-sync state, ssh connection included."]
        if bench.save_p50_300 is not None:
            parts.append(f"For comparison: one small whole-file save at RTT 300 ms (scenario "
                         f"a) is identical at p50 {bench.save_p50_300 * 1000:.0f} ms.")
    if bench.watch_rows:
        parts += ["", "### The watcher's step: detection latency against idle CPU", "",
                  render_watch(bench.watch_rows), "",
                  "watchfiles alone: a probe process runs `watchfiles.awatch` as lsync does "
                  "on the bench tree; time from a file's close after rewriting to the probe "
                  "printing it, then its CPU over a quiet window. lsync: `lsync connect "
                  "--step-ms N` at RTT 0, save -> identical, then its idle CPU. CPU from "
                  "/proc (10 ms ticks)."]
    if bench.notes:
        parts += [""] + [f"Note: {n}" for n in bench.notes]
    return "\n".join(parts)


_README_HEAD = """# lsync benchmarks

`python -m benchmarks.run` runs lsync and its peers over the same simulated long link; see
the sections below. The results section is rewritten by each run.

"""


def write_readme(text: str) -> None:
    block = f"{RESULTS_START}\n{text}\n{RESULTS_END}"
    if README.exists():
        current = README.read_text()
        if RESULTS_START in current and RESULTS_END in current:
            head, rest = current.split(RESULTS_START, 1)
            _, tail = rest.split(RESULTS_END, 1)
            README.write_text(head + block + tail)
            return
        README.write_text(current.rstrip("\n") + "\n\n## Results\n\n" + block + "\n")
        return
    README.write_text(_README_HEAD + "## Results\n\n" + block + "\n")


# =============================================================================================
# Main
# =============================================================================================


def plan_steps(bench: Bench) -> list[tuple[str, Callable[[], None]]]:
    s = bench.s
    specs = [LinkSpec(rtt) for rtt in s.rtts_ms]
    steps: list[tuple[str, Callable[[], None]]] = []
    for spec in specs:
        for letter, fn in (("a", scenarios.scenario_a_one_save),
                           ("b", scenarios.scenario_b_burst),
                           ("e", scenario_wire.scenario_e_big_edit),
                           ("bytes", scenario_wire.scenario_bytes)):
            if letter == "bytes" and spec.rtt_ms not in s.bytes_rtts_ms:
                continue
            if bench.wants(letter):
                steps.append((f"{letter} {spec.label}", functools.partial(fn, bench, spec)))
    if bench.wants("watch"):
        steps.append(("watch", functools.partial(scenario_wire.scenario_watch, bench)))
    cdf_specs = list(specs)
    if not s.short and s.cap_mbit and bench.wants("c"):
        cdf_specs += [LinkSpec(rtt, s.cap_mbit) for rtt in s.rtts_ms if rtt > 0]
    f_spec = max((sp for sp in specs), key=lambda sp: sp.rtt_ms, default=None)
    if bench.wants("g") and f_spec is not None:
        for tree in s.contact_trees:
            steps.append((f"g {f_spec.label} {tree}",
                          functools.partial(scenario_bulk.scenario_g_first_contact, bench, tree,
                                            f_spec)))
    if bench.wants("h") and f_spec is not None:
        steps.append((f"h {f_spec.label}",
                      functools.partial(scenario_bulk.scenario_h_save_during_bulk, bench, f_spec)))
    if bench.wants("u") and f_spec is not None:
        steps.append((f"u {f_spec.label}",
                      functools.partial(scenario_upgrade.scenario_u_upgrade, bench, f_spec)))
    for tree in s.initial_trees:
        for spec in cdf_specs:
            do_c = bench.wants("c")
            do_d = bench.wants("d") and not spec.cap_mbit
            do_f = bench.wants("f") and spec == f_spec
            if do_c or do_d or do_f:
                steps.append((f"c/d/f {spec.label} {tree}",
                              functools.partial(scenarios.scenario_cdf, bench, tree, spec,
                                                do_c, do_d, do_f)))
    return steps


def run(settings: Settings) -> str:
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    check = asyncio.run(self_check(0.150, rounds=3))
    proxy_check = ("OK " if check.ok() else "FAILED ") + (
        f"echo at d = 150 ms: {check.median_rtt * 1000:.1f} ms round trip "
        f"(worst error {check.worst_error * 1000:.1f} ms; first echo with handshake "
        f"{check.first_echo * 1000:.0f} ms)")
    say(f"proxy self-check: {proxy_check}")
    bench = Bench(settings)
    busy = procstat.machine_busy(3.0)
    loads: list[float] = []
    installed_at_start = installed_lsync()
    say(f"installed lsync: {installed_at_start}")
    try:
        bench.setup()
        if LSYNC in settings.systems and not bench.lsync_ok:
            say(f"lsync not run: {bench.lsync_reason}")
        for name, step in plan_steps(bench):
            loads.append(procstat.load_average())
            say(f"-- {name} (load average {loads[-1]:.2f})")
            try:
                step()
            except Exception as exc:  # recorded in the report; the other steps still run
                bench.note(f"step {name} stopped by {type(exc).__name__}: {exc}")
                bench.notes.append(traceback.format_exc(limit=3).replace("\n", " | "))
        loads.append(procstat.load_average())
        bench.load_text = (f"before the run the machine's CPUs were {100 * busy:.0f}% busy "
                           f"(others' work; {os.cpu_count()} CPUs); 1-minute load average "
                           f"before each step {min(loads):.2f} to {max(loads):.2f}")
        at_end = installed_lsync()
        if at_end != installed_at_start:
            installed_at_start += f" at the start, {at_end} at the end: reinstalled meanwhile"
        text = report(bench, proxy_check, started, (time.monotonic() - t_start) / 60,
                      installed_at_start)
    finally:
        bench.cleanup()
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="quick look: tiny tree, few saves")
    parser.add_argument("--tree", choices=sorted(trees.PRESETS), help="tree for a, b, e")
    parser.add_argument("--rtt-ms", default="0,300", help="round-trip times (default 0,300)")
    parser.add_argument("--systems", help=f"comma list from {','.join(SYSTEMS)} (default all)")
    parser.add_argument("--scenarios",
                        help=f"comma list from {','.join(SCENARIOS)} (default all)")
    parser.add_argument("--issue10", action="store_true",
                        help=f"issue 10's target table only: --systems "
                             f"{','.join(ISSUE10_SYSTEMS)} --scenarios "
                             f"{','.join(ISSUE10_SCENARIOS)} unless given")
    parser.add_argument("--issue16", action="store_true",
                        help=f"issue 16's real-kernel table: --systems "
                             f"{','.join(ISSUE10_SYSTEMS)} --scenarios "
                             f"{','.join(ISSUE16_SCENARIOS)} unless given")
    parser.add_argument("--generated-kernel", action="store_true",
                        help="full mode: the generated `kernel` tree instead of the real "
                             "Linux kernel (whose two releases are downloaded once with "
                             "apt-get download)")
    parser.add_argument("--saves", type=int, help="saves per kind in scenario a (and h)")
    parser.add_argument("--burst", type=int, help="files in the burst of scenario b")
    parser.add_argument("--burst-timeout", type=float,
                        help="seconds before a burst is reported as not done")
    parser.add_argument("--idle-seconds", type=float, help="idle window of scenario f")
    parser.add_argument("--cap-mbit", type=float, default=100.0,
                        help="bandwidth cap for the capped initial sync (0: skip)")
    parser.add_argument("--no-kernel", action="store_true",
                        help="skip the kernel tree (c, d, f, g, h) in full mode")
    parser.add_argument("--bulk-tree", choices=sorted(trees.PRESETS),
                        help="tree of h's initial sync (default kernel; the bench tree with "
                             "--no-kernel or --short)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where generated trees are kept (default ~/.cache/lsync-bench)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--remote-fs", choices=("image", "workdir"),
                        help="where the remote trees go: a journaled ext4 image (default in "
                             "full mode, needs root) or the work directory (short mode)")
    settings = Settings.from_args(parser.parse_args(argv))
    text = run(settings)
    print()
    print(text)
    if settings.write_readme:
        write_readme(text)
        say(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
