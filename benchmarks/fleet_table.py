"""The table benchmarks.fleet prints: one markdown row per figure, the three ways to sync
side by side (one target, three targets in one process, three processes), the goal for three
targets in one process and ✓/✗ against it. `table(results, delay)` only formats what
`Results` holds: a figure not measured is "—". Split from benchmarks/fleet.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.bench import percentile
from benchmarks.fleet_measures import (
    CATCH_UP_TIMEOUT,
    READ_SIZE,
    READ_SPACING,
    Results,
    Saves,
)
from benchmarks.fleet_testbed import FLEET, ONE, THREE


def tick(ok: bool) -> str:
    return "✓" if ok else "✗"


def pp(values: Sequence[float]) -> str:
    if not values:
        return "—"
    return f"{percentile(values, 0.5) * 1000:.0f} / {percentile(values, 0.95) * 1000:.0f}"


def saves_cell(s: Saves | None, hosts: bool = False) -> str:
    if s is None:
        return "—"
    if hosts:
        return "; ".join(f"{n} {pp(v)}" for n, v in s.per_host.items())
    tried = len(s.last) + s.missed
    return pp(s.last) + (f" ({s.missed}/{tried} missed)" if s.missed else "") + f", n={tried}"


def ratio_verdict(mine: float, base: float, limit: float) -> str:
    return f"{tick(mine <= limit * base)} ({mine / base:.2f}x)" if base > 0 else "—"


def table(r: Results, delay: float) -> str:
    d = delay * 1000
    rows: list[tuple[str, ...]] = []
    fleet, fz, idle = r.saves.get(FLEET), r.frozen, r.idle.get(FLEET)
    verdict = "—"
    if fleet is not None and fleet.last:
        verdict = tick(percentile(fleet.last, 0.5) * 1000 <= d + 25
                       and percentile(fleet.last, 0.95) * 1000 <= d + 40 and not fleet.missed)
    rows.append(("1. one save → identical on every host (the last one), p50 / p95 ms",
                 *(saves_cell(r.saves.get(m)) for m in (ONE, FLEET, THREE)),
                 f"p50 ≤ {d + 25:.0f}, p95 ≤ {d + 40:.0f}", verdict))
    rows.append(("1. the same, per host, p50 / p95 ms",
                 *(saves_cell(r.saves.get(m), hosts=True) for m in (ONE, FLEET, THREE)),
                 "—", "—"))
    kb = {m: f"{v / 1000:.0f} KB" for m, v in r.reads.items()}
    verdict = "—"
    if FLEET in r.reads and ONE in r.reads:
        verdict = tick(r.reads[FLEET] <= 1.1 * r.reads[ONE])
    rows.append((f"2. client read bytes (rchar) per save of a {READ_SIZE // 1000} KB file, "
                 f"saves {READ_SPACING:g} s apart", kb.get(ONE, "—"), kb.get(FLEET, "—"),
                 kb.get(THREE, "—") + " (3 processes)", "3 targets ≈ 1 target (≤ 1.1x)",
                 verdict))

    def idle_cell(mode: str, commands: bool) -> str:
        f = r.idle.get(mode)
        if f is None:
            return "—"
        values = f.command_ms if commands else f.request_ms
        return (f"{percentile(values, 0.5):.1f} / {percentile(values, 0.95):.1f}"
                f", n={len(values)}")

    def idle_bytes(mode: str) -> str:
        f = r.idle.get(mode)
        return "—" if f is None else (
            f"{f.request_bytes:,} B (commands: {f.command_bytes:,} B; no flush, as long as "
            f"the commands: {f.idle_bytes:,} B)")

    rows.append(("3. flush, nothing pending: request on the control socket, p50 / p95 ms",
                 idle_cell(ONE, False), idle_cell(FLEET, False), "—", "< 50 ms",
                 "—" if idle is None else tick(percentile(idle.request_ms, 0.5) < 50)))
    rows.append(("3. flush, nothing pending: `lsync flush` command, spawn → exit, "
                 "p50 / p95 ms", idle_cell(ONE, True), idle_cell(FLEET, True), "—", "—", "—"))
    rows.append(("3. bytes through the proxies during those flush requests", idle_bytes(ONE),
                 idle_bytes(FLEET), "—", "none",
                 "—" if idle is None else tick(idle.request_bytes == 0)))

    def burst_cell(mode: str) -> str:
        bs = r.bursts.get(mode, [])
        missing = sum(b.missing for b in bs)
        return "—" if not bs else (
            ", ".join(f"{b.flush_s:.2f}" for b in bs) + " s (client CPU "
            + ", ".join(f"{b.cpu_s:.2f}" for b in bs) + " s)"
            + (f" ({missing} files missing after it!)" if missing else ""))

    verdict = "—"
    if r.bursts.get(FLEET) and r.bursts.get(ONE):
        best = {m: min(r.bursts[m], key=lambda b: b.flush_s) for m in (ONE, FLEET)}
        verdict = (ratio_verdict(best[FLEET].flush_s, best[ONE].flush_s, 1.2)
                   + f"; CPU {best[FLEET].cpu_s / max(best[ONE].cpu_s, 0.01):.2f}x")
    rows.append((f"3. flush right after {r.burst_files:,} new 2 KB files (written → flush "
                 "returns)", burst_cell(ONE), burst_cell(FLEET), "—",
                 "≤ 1.2x 1 target (best runs)", verdict))
    for wall, label in ((True, "wall time, spawn → ready"),
                        (False, "client CPU (user + system) at ready")):
        cells = {m: f"{i.wall if wall else i.cpu:.2f} s" for m, i in r.initial.items()}
        one, many = r.initial.get(ONE), r.initial.get(FLEET)
        verdict = "—" if one is None or many is None else (
            ratio_verdict(many.wall, one.wall, 1.5) if wall
            else ratio_verdict(many.cpu, one.cpu, 1.5))
        rows.append((f"4. initial sync of {r.initial_files:,} files, {label}",
                     cells.get(ONE, "—"), cells.get(FLEET, "—"),
                     cells.get(THREE, "—") + " (3 processes)", "≤ 1.5x 1 target", verdict))
    verdict = "—"
    if fz is not None and fz.saves.last:
        verdict = tick(percentile(fz.saves.last, 0.5) * 1000 <= d + 25 and not fz.saves.missed)
    rows.append(("5. box3 frozen: one save → identical on x86 and arm (the last), p50 / p95 ms",
                 "—", "—" if fz is None else saves_cell(fz.saves) + "; "
                 + saves_cell(fz.saves, hosts=True), "—", f"p50 ≤ {d + 25:.0f}", verdict))
    if fz is not None:
        caught = (f"{fz.caught_up_s:.1f} s" if fz.caught_up_s is not None
                  else f"not within {CATCH_UP_TIMEOUT:g} s (or not waited for)")
        rows.append(("5. box3 frozen: freeze → a flush of every target returns (box3 found "
                     "dead, reconnected, caught up)", "—",
                     caught + ("" if fz.reconnected else "; no `box3: disconnected` line"),
                     "—", "—", "—"))
    head = ("| measured | 1 target | 3 targets, one process | 3 processes, one target each "
            "| goal (3 targets, one process) | met? |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows)
