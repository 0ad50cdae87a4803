"""The benchmark's bulk scenarios (see benchmarks/scenarios.py for the list): g. first
contact with a remote copy lsync never saw; h. a save while lsync is busy (during its
initial sync, right after a burst). Split from benchmarks/scenarios.py, whose helpers
they use."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from benchmarks import peers
from benchmarks.bench import (
    LSYNC,
    RSYNC,
    Bench,
    LinkSpec,
    fmt_kb,
    percentile,
    quiet_for,
    say,
    wait_quiet,
)
from benchmarks.bench_rows import Cell, CpuUse
from benchmarks.bench_trees import copy_tree, differing_content, empty_dir, tree_files
from benchmarks.peers import PeerError
from benchmarks.scenarios import (
    cpu_now,
    fmt_ms,
    is_rtt300,
    mark,
    new_content,
    plain,
    rsync_measured,
)
from benchmarks.testbed import trees

# ---------------------------------------------------------------------------------------------
# g. first contact with a remote copy lsync never saw
# ---------------------------------------------------------------------------------------------


def g_target(spec: LinkSpec) -> str:
    return "≤ 0.5x rsync's time, ≤ rsync's bytes" if is_rtt300(spec) else "—"


def scenario_g_first_contact(bench: Bench, tree: str, spec: LinkSpec) -> None:
    """g. The remote already holds the tree (same content, other mtimes: a `cp -r` of it) and
    nothing remembers it: a new remote path (the agent's records are named after it) and a
    cold client hash cache. lsync: spawn -> "ready", and the bytes both ways on the proxy
    until the link is quiet; rsync -az on its own such copy: wall time and bytes. Each remote
    is compared with the tree (paths and content) afterwards."""
    source = bench.tree_dir(tree)
    row = bench.row(f"g. first contact, {tree} tree, same content, other mtimes: until in "
                    f"sync, bytes both ways", spec, g_target(spec), ratios=False)
    rsync_cell: Cell | None = None
    if bench.runnable(RSYNC):
        remote = bench.fresh_remote(f"contact-{tree}-rsync")
        copy_tree(source, remote, vcs=False)
        with bench.link(spec, remote) as (link, proxy):
            run = rsync_measured(bench, source, link, bench.tree_info[tree].files)
            r = run.result
            c = proxy.counters()
        problem = (differing_content(source, remote) if r.returncode == 0
                   else f"rsync exit {r.returncode}")
        rsync_cell = Cell(f"{r.seconds:.2f} s, {fmt_kb(c.bytes_total)} "
                          f"({fmt_kb(c.bytes_up)} up, {fmt_kb(c.bytes_down)} down)"
                          + (f" (remote differs: {problem})" if problem else "")
                          + f" ({run.cpu_text()})",
                          value=None if problem else r.seconds,
                          extra={"bytes": float(c.bytes_total)})
        row.cells[RSYNC] = rsync_cell
        say(f"g {spec.label} {tree} rsync: {rsync_cell.text}")
        if not bench.s.keep:
            shutil.rmtree(remote, ignore_errors=True)
    if not bench.runnable(LSYNC):
        return
    remote = bench.fresh_remote(f"contact-{tree}-lsync")
    copy_tree(source, remote, vcs=False)
    cache = bench.work / "lsync-cache" / f"contact-{tree}-{spec.label.replace(' ', '_')}"
    empty_dir(cache)  # a cold hash cache: the client has never seen this tree either
    cpu: CpuUse | None = None
    files = bench.tree_info[tree].files
    with bench.link(spec, remote) as (link, proxy):
        w = bench.lsync(link, local=source, name=f"lsync-contact-{tree}", verbose=False,
                        cache_home=cache)
        try:
            w.start()
            quiet = wait_quiet(proxy, quiet_for(spec), limit=60.0)
            c = proxy.counters()
            cpu = cpu_now(bench, w, files)
        except PeerError as exc:
            row.cells[LSYNC] = Cell(f"failed ({exc.code})")
            bench.goal(f"first contact with a copy lsync never saw, {tree} tree", spec,
                       row.target, f"failed ({exc.code})",
                       "—" if rsync_cell is None else rsync_cell.text)
            bench.failed(LSYNC, f"g {spec.label} {tree}", exc)
            return
        finally:
            w.stop()
    if w.exit_status != 0:
        bench.note(f"lsync first contact ({tree}, {spec.label}) exited with status "
                   f"{w.exit_status} after SIGINT; log: {w.log}")
    seconds = w.startup_seconds
    assert seconds is not None
    problem = differing_content(source, remote)
    total = c.bytes_total
    text = (f"{seconds:.2f} s, {fmt_kb(total)} ({fmt_kb(c.bytes_up)} up, "
            f"{fmt_kb(c.bytes_down)} down)")
    notes = [] if quiet else ["link never went quiet"]
    if problem:
        notes.append(f"remote differs: {problem}")
    cell = Cell(text, value=seconds, extra={"bytes": float(total)})
    ratio_t = ratio_b = None
    if rsync_cell is not None and rsync_cell.value:
        ratio_t = seconds / rsync_cell.value
        ratio_b = total / max(1.0, rsync_cell.extra["bytes"])
        cell.text += f"; lsync/rsync time {ratio_t:.2f}, bytes {ratio_b:.2f}"
        if is_rtt300(spec):
            mark(cell, not problem and ratio_t <= 0.5 and ratio_b <= 1.0)
    if notes:
        cell.text += f" ({'; '.join(notes)})"
    row.cells[LSYNC] = cell
    goal_text = text + ("" if ratio_b is None else f"; bytes {ratio_b:.2f}x rsync's")
    goal_text += f" ({'; '.join(notes)})" if notes else ""
    bench.goal(f"first contact with a copy lsync never saw, {tree} tree", spec, row.target,
               goal_text, "—" if rsync_cell is None else rsync_cell.text, ratio_t,
               cell.target_ok, cpu)
    say(f"g {spec.label} {tree} lsync: {cell.text}" + (f" ({cpu.text})" if cpu else ""))
    if not bench.s.keep:
        shutil.rmtree(remote, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# h. a save during bulk work: an initial sync, a burst
# ---------------------------------------------------------------------------------------------


def h_target(spec: LinkSpec) -> tuple[str, float]:
    limit = spec.delay + 0.050
    return f"p95 ≤ {limit * 1000:.0f} (one-way delay + 50 ms)", limit


def _holds(path: Path, data: bytes) -> bool:
    try:
        if os.stat(path).st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except FileNotFoundError:
        return False


def _unshare(path: Path) -> bytes:
    """Give a file of a hard-linked copy its own inode (same bytes), so that saving it in
    place leaves the tree it was linked from alone; its bytes."""
    data = path.read_bytes()
    tmp = path.with_name(f".{path.name}.unshare")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def _h_cell(latencies: list[float], missed: int, tried: int, wanted: int, timeout: float,
            limit: float) -> Cell:
    cell = fmt_ms(latencies, missed, tried, wanted, timeout)
    if cell.p95 is not None:
        mark(cell, not missed and cell.p95 <= limit)
    return cell


def scenario_h_save_during_bulk(bench: Bench, spec: LinkSpec) -> None:
    """h. One save made while lsync is busy: during its initial sync, and right after a burst
    of files; save -> remote identical, p50/p95/max."""
    if not bench.runnable(LSYNC):
        return
    _h_during_initial_sync(bench, spec)
    _h_during_burst(bench, spec)


def _h_during_initial_sync(bench: Bench, spec: LinkSpec) -> None:
    """lsync starts on a copy of the bulk tree (hard links, the files to save unshared) into an
    empty remote that nothing remembers; while the initial sync runs, small files it has
    already written remotely (their directories exist there) are rewritten (one line changed),
    one every `bulk_gap` seconds whether the previous one is done or not, and each is timed
    from the end of its save until the remote copy is identical (all polled every ~1 ms).
    Saves stop at the "ready" line: only saves made before it count."""
    tree = bench.s.bulk_tree
    target, limit = h_target(spec)
    row = bench.row(f"h. a save during the initial sync of the {tree} tree -> identical "
                    f"(p50 / p95 / max ms)", spec, target, ratios=False)
    source = bench.tree_dir(tree)
    local = bench.work / "bulk-local"
    copy_tree(source, local, hardlinks=True)
    rng = random.Random(f"h:{tree}")
    small = [rel for rel in tree_files(local) if (local / rel).stat().st_size <= 20_000]
    pool = rng.sample(small, min(len(small), max(20 * bench.s.saves, 400)))
    originals = {rel: _unshare(local / rel) for rel in pool}
    remote = bench.fresh_remote(f"bulk-{tree}")
    remote.mkdir(parents=True)
    cache = bench.work / "lsync-cache" / f"bulk-{tree}-{spec.label.replace(' ', '_')}"
    empty_dir(cache)
    wanted = bench.s.saves
    timeout = bench.s.save_timeout if bench.s.short else 120.0
    latencies: list[float] = []
    saved_at: list[float] = []  # perf_counter() at the end of each counted save
    landed_at: list[float] = []  # ... and when its remote copy was identical
    missed = made = 0
    initial: float | None = None
    with bench.link(spec, remote) as (link, proxy):
        w = bench.lsync(link, local=local, name=f"lsync-bulk-{tree}", verbose=False,
                        cache_home=cache)
        try:
            w.spawn()
            unused = list(pool)  # not saved yet; checked a few at a time for presence
            synced: list[str] = []  # written remotely by lsync (identical to the original)
            pending: list[tuple[float, peers.RemoteFile]] = []  # (end of save, remote copy)
            next_at = 0.0
            scan = 0
            while True:
                now = time.perf_counter()
                for item in list(pending):
                    t0, rf = item
                    if rf.identical(now):
                        latencies.append(now - t0)
                        landed_at.append(now)
                        pending.remove(item)
                    elif now - t0 > timeout:
                        missed += 1
                        pending.remove(item)
                busy = made < wanted and not w.is_ready() and w.alive()
                if not busy and not pending:
                    break
                if busy and unused:
                    for _ in range(min(10, len(unused))):  # a few stats per turn
                        scan %= len(unused)
                        rel = unused[scan]
                        if _holds(remote / rel, originals[rel]):
                            synced.append(rel)
                            unused.pop(scan)
                        else:
                            scan += 1
                        if not unused:
                            break
                if busy and synced and now >= next_at:
                    rel = synced.pop(0)
                    data = trees.one_line_edit(originals[rel], seed=300 + made)
                    t0 = peers.save_file(local / rel, data)
                    if w.is_ready():
                        # the initial sync ended as the save was made: not counted, and no
                        # more saves
                        made = wanted
                    else:
                        made += 1
                        saved_at.append(t0)
                        pending.append((t0, peers.RemoteFile(remote / rel, data)))
                        next_at = t0 + bench.s.bulk_gap
                time.sleep(peers.POLL_SECONDS)
            w.wait_ready(timeout=900.0)
            initial = w.startup_seconds
            wait_quiet(proxy, quiet_for(spec), limit=60.0)
        except PeerError as exc:
            row.cells[LSYNC] = Cell(f"failed ({exc.code})")
            bench.failed(LSYNC, f"h initial sync {spec.label} {tree}", exc)
            return
        finally:
            w.stop()
    if w.exit_status != 0:
        bench.note(f"lsync (h, initial sync of {tree}, {spec.label}) exited with status "
                   f"{w.exit_status} after SIGINT; log: {w.log}")
    problem = differing_content(local, remote)
    when = "?" if initial is None else f"{initial:.1f} s"
    tried = len(latencies) + missed
    if tried:
        cell = _h_cell(latencies, missed, tried, wanted, timeout, limit)
        spawn = w.started_at
        cell.text += (f" (saved {min(saved_at) - spawn:.1f} to {max(saved_at) - spawn:.1f} s "
                      f"after the spawn")
        if landed_at:
            cell.text += (f", identical {min(landed_at) - spawn:.1f} to "
                          f"{max(landed_at) - spawn:.1f} s")
        cell.text += f"; ready at {when})"
    else:
        cell = Cell(f"no save made: the initial sync was done first ({when})")
    if problem:
        cell.text += f" (remote differs afterwards: {problem})"
        if cell.target_ok:
            mark(cell, False)
    row.cells[LSYNC] = cell
    bench.goal("a save during an initial sync", spec, target,
               f"{plain(cell.text)}, {tree} tree", ok=cell.target_ok)
    say(f"h {spec.label} during the initial sync of {tree}: {cell.text}")
    if not bench.s.keep:
        shutil.rmtree(remote, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)


def _h_during_burst(bench: Bench, spec: LinkSpec) -> None:
    """lsync runs on the in-sync bench tree; `burst` files are rewritten at once (as in b),
    then one other file is saved: its save -> identical; then the burst is waited for and the
    link for quiet before the next repetition."""
    n = min(bench.s.burst, len(bench.tree_files) - 1)
    target, limit = h_target(spec)
    row = bench.row(f"h. a save right after a burst of {n} files -> identical "
                    f"(p50 / p95 / max ms)", spec, target, ratios=False)
    wanted = bench.s.saves
    timeout = bench.s.save_timeout
    rng = random.Random(f"h-burst:{spec.label}")
    bench.reset()
    latencies: list[float] = []
    bursts: list[float] = []
    missed = tried = 0
    with bench.link(spec) as (link, proxy):
        w = bench.lsync(link, name="lsync-h-burst")
        try:
            w.start()
        except PeerError as exc:
            row.cells[LSYNC] = Cell(f"failed to start ({exc.code})")
            bench.failed(LSYNC, f"h burst {spec.label}", exc)
            return
        try:
            for i in range(wanted):
                picked = rng.sample(bench.tree_files, n + 1)
                rel, burst = picked[0], picked[1:]
                contents = [(b, new_content(bench, b, seed=400 + i)) for b in burst]
                data = new_content(bench, rel, seed=500 + i)
                wait_quiet(proxy, quiet_for(spec))
                for b, content in contents:
                    peers.save_file(bench.local / b, content)
                t0 = peers.save_file(bench.local / rel, data)
                t1 = peers.wait_identical(bench.remote / rel, data, timeout)
                tried += 1
                if t1 is None:
                    missed += 1
                else:
                    latencies.append(t1 - t0)
                res = peers.wait_all_identical(
                    [(bench.remote / b, content) for b, content in contents], t0,
                    bench.s.burst_timeout)
                if res.seconds is not None:
                    bursts.append(res.seconds)
                if not w.alive():
                    bench.note(f"lsync exited during h ({spec.label}); log: {w.tail(400)}")
                    break
        finally:
            w.stop()
    cell = _h_cell(latencies, missed, tried, wanted, timeout, limit)
    if bursts:
        cell.text += f" (burst all identical: p50 {percentile(bursts, 0.5):.2f} s)"
    if len(bursts) < tried:
        cell.text += f" ({tried - len(bursts)} bursts not done within {bench.s.burst_timeout:g} s)"
    row.cells[LSYNC] = cell
    bench.goal(f"a save during a burst of {n} files", spec, target, plain(cell.text),
               ok=cell.target_ok)
    say(f"h {spec.label} after a burst of {n}: {cell.text}")
