"""Scenario u (issue 16): an upgrade done by `git checkout` while lsync runs, against
``rsync -az --delete`` of the same change.

The material is two revisions of one git repository (`Upgrade`): in full mode with the real
kernel, the Debian releases 6.1.170 and 6.1.176 of `benchmarks.kernel_material` (1,324 paths
differ); otherwise (the short mode, `--generated-kernel`) a repository made here from the
bench tree and a deterministic second revision of it (files edited, removed and added, a
new directory), so that no download is needed.

One working clone at the old revision serves both systems, at the longest RTT of the run:

- rsync: the remote is a local mirror of the tree (its `.git` left out); `git checkout` of
  the new revision; then ``rsync -az --delete --exclude=/.git`` over the link, timed: the
  remote is up to date when rsync exits, so its wall time is the time from the end of the
  checkout to an identical remote. The checkout back to the old revision follows.
- lsync: the remote is such a mirror again; lsync starts on it (first contact: it hashes
  both sides) and runs until "ready" and a quiet link; then `git checkout` of the new
  revision runs while lsync watches. Measured from the END of the checkout: until every
  changed path is identical remotely (removed ones gone; polled every 20 ms, so that the
  polling does not take the CPU lsync needs), and until lsync's first `in-sync` line as of
  that moment or later. The client's and the agent's CPU from just before the checkout
  until that line, per 1,000 changed paths, and the bytes both ways.

Both remotes are compared with the tree afterwards (same paths and sizes everywhere; the
content of every changed path). Target: in sync ≤ 1 s after the checkout ends.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import kernel_material
from benchmarks.bench import LSYNC, RSYNC, Bench, LinkSpec, fmt_kb, quiet_for, say, wait_quiet
from benchmarks.bench_rows import Cell, CpuUse
from benchmarks.bench_trees import (
    RSYNC_EXCLUDES,
    copy_tree,
    empty_dir,
    mirror,
    same_files,
    tree_files,
)
from benchmarks.peers import PeerError
from benchmarks.scenarios import cpu_now, cpu_since, mark, rsync_measured
from benchmarks.testbed import trees

TARGET_SECONDS = 1.0
POLL = 0.02  # seconds between two looks at the remote while lsync works
SYNTH_OLD, SYNTH_NEW = "rev-old", "rev-new"


@dataclass(frozen=True)
class Upgrade:
    """Two revisions of a repository: the tree before and after the upgrade."""

    repo: Path
    old: str
    new: str
    label: str  # "Linux 6.1.170 -> 6.1.176" or "tiny tree, generated change"
    changed: tuple[str, ...]  # paths that differ (added, removed or changed)


def material(bench: Bench) -> Upgrade:
    """The real kernel's two releases (full mode) or a generated two-revision repository."""
    if bench.s.real_kernel:
        m = kernel_material.prepare(full=True)
        old, new = m.tags
        changed = kernel_material.changed_paths(m.repo, old, new)
        return Upgrade(m.repo, old, new, f"Linux {old[1:]} -> {new[1:]}", tuple(changed))
    tree = bench.s.tree
    repo = bench.work / f"upgrade-repo-{tree}"
    if not (repo / ".git").is_dir():
        synthetic_repo(bench.tree_dir(tree), repo)
    changed = kernel_material.changed_paths(repo, SYNTH_OLD, SYNTH_NEW)
    return Upgrade(repo, SYNTH_OLD, SYNTH_NEW, f"{tree} tree, generated change", tuple(changed))


def synthetic_repo(source: Path, repo: Path) -> None:
    """A repository at `repo` whose revision `rev-old` is `source` and `rev-new` the same with
    about a tenth of its files edited (one line), a twentieth removed, and new files added
    (some beside existing ones, some in a new directory); deterministic."""
    copy_tree(source, repo, vcs=False)
    git = kernel_material.git
    git("init", "-q", "-b", "main", cwd=repo)
    git("config", "gc.auto", "0", cwd=repo)
    git("add", "-A", "-f", ".", cwd=repo)
    git("commit", "-q", "-m", SYNTH_OLD, cwd=repo)
    git("tag", SYNTH_OLD, cwd=repo)
    rng = random.Random("upgrade")
    files = tree_files(repo)
    picked = rng.sample(files, max(3, len(files) // 7))
    edited, removed = picked[: max(2, len(files) // 10)], picked[max(2, len(files) // 10):]
    for i, rel in enumerate(edited):
        path = repo / rel
        path.write_bytes(trees.one_line_edit(path.read_bytes(), seed=600 + i))
    for rel in removed:
        (repo / rel).unlink()
    added = [f"{os.path.dirname(rel) or '.'}/upgrade-added-{i}.c"
             for i, rel in enumerate(rng.sample(files, max(2, len(files) // 20)))]
    added += [f"upgrade-new-dir/sub{i % 3}/file{i}.c" for i in range(max(3, len(files) // 40))]
    for i, rel in enumerate(added):
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(trees.text_of_size(rng.randint(200, 20_000), seed=700 + i, name=rel))
    git("add", "-A", "-f", ".", cwd=repo)
    git("commit", "-q", "-m", SYNTH_NEW, cwd=repo)
    git("tag", SYNTH_NEW, cwd=repo)
    git("checkout", "-q", SYNTH_OLD, cwd=repo)


def checkout(tree: Path, revision: str) -> tuple[float, int]:
    """`git checkout -q revision` in `tree`; (perf_counter, time_ns) at its end, after the
    seconds it took are said."""
    t0 = time.perf_counter()
    kernel_material.git("checkout", "-q", revision, cwd=tree)
    end, end_ns = time.perf_counter(), time.time_ns()
    say(f"u: git checkout {revision}: {end - t0:.2f} s")
    return end, end_ns


@dataclass
class Expected:
    """What the remote must hold after the upgrade: changed paths' bytes, and paths gone."""

    present: dict[str, bytes]
    gone: list[str]

    @classmethod
    def of(cls, local: Path, changed: tuple[str, ...]) -> Expected:
        present: dict[str, bytes] = {}
        gone: list[str] = []
        for rel in changed:
            path = local / rel
            if path.is_symlink():
                present[rel] = os.readlink(path).encode()
            elif path.is_file():
                present[rel] = path.read_bytes()
            else:
                gone.append(rel)
        return cls(present, gone)

    def problem(self, remote: Path) -> str:
        """"" when the remote holds every changed path as expected, else what differs."""
        wrong = [rel for rel, data in self.present.items() if not _holds(remote / rel, data)]
        stayed = [rel for rel in self.gone if os.path.lexists(remote / rel)]
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} changed paths differ (e.g. {wrong[0]})")
        if stayed:
            parts.append(f"{len(stayed)} removed paths remain (e.g. {stayed[0]})")
        return "; ".join(parts)


def _holds(path: Path, data: bytes) -> bool:
    try:
        if path.is_symlink():
            return os.readlink(path).encode() == data
        if os.stat(path).st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except (FileNotFoundError, NotADirectoryError):
        return False


def wait_remote(remote: Path, expected: Expected, t0: float, timeout: float) -> float | None:
    """perf_counter() once every changed path is as expected remotely (checked every POLL
    seconds: a path found right is not read again), or None after `timeout`."""
    present = dict(expected.present)
    gone = list(expected.gone)
    deadline = t0 + timeout
    while True:
        now = time.perf_counter()
        present = {rel: data for rel, data in present.items() if not _holds(remote / rel, data)}
        gone = [rel for rel in gone if os.path.lexists(remote / rel)]
        if not present and not gone:
            return now
        if now >= deadline:
            return None
        time.sleep(POLL)


def scenario_u_upgrade(bench: Bench, spec: LinkSpec) -> None:
    """u. The upgrade by `git checkout` while lsync runs, against rsync -az --delete."""
    up = material(bench)
    n = len(up.changed)
    row = bench.row(f"u. upgrade by git checkout while running ({up.label}, {n:,} paths): "
                    f"from the checkout's end until in sync (s)", spec,
                    f"in sync ≤ {TARGET_SECONDS:g} s after the checkout ends")
    local = bench.work / "upgrade-local"
    if local.exists():
        shutil.rmtree(local)
    kernel_material.checkout_copy(kernel_material.Material(up.repo, (up.old, up.new), 0.0),
                                  local, up.old)
    if bench.runnable(RSYNC):
        _rsync_side(bench, spec, up, local, row.cells)
        checkout(local, up.old)
    if bench.runnable(LSYNC):
        _lsync_side(bench, spec, up, local, row.cells, row.target)
    if not bench.s.keep:
        shutil.rmtree(local, ignore_errors=True)


def _rsync_side(bench: Bench, spec: LinkSpec, up: Upgrade, local: Path,
                cells: dict[str, Cell]) -> None:
    remote = bench.fresh_remote("upgrade-rsync")
    mirror(local, remote, checksum=False, vcs=False)
    checkout(local, up.new)
    with bench.link(spec, remote) as (link, proxy):
        run = rsync_measured(bench, local, link, len(up.changed),
                             ["--delete", *RSYNC_EXCLUDES], "changed paths")
        r = run.result
        c = proxy.counters()
    problem = (f"rsync exit {r.returncode}" if r.returncode != 0
               else Expected.of(local, up.changed).problem(remote) or same_files(local, remote))
    text = f"{r.seconds:.2f} s (`--delete`), {fmt_kb(c.bytes_total)} both ways"
    cells[RSYNC] = Cell(text + (f" (remote differs: {problem})" if problem else "")
                        + f" ({run.cpu_text()})", value=None if problem else r.seconds)
    say(f"u {spec.label} rsync: {cells[RSYNC].text}")
    if not bench.s.keep:
        shutil.rmtree(remote, ignore_errors=True)


def _lsync_side(bench: Bench, spec: LinkSpec, up: Upgrade, local: Path,
                cells: dict[str, Cell], target: str) -> None:
    remote = bench.fresh_remote("upgrade-lsync")
    mirror(local, remote, checksum=False, vcs=False)
    cache = bench.work / "lsync-cache" / f"upgrade-{spec.label.replace(' ', '_')}"
    empty_dir(cache)
    n = len(up.changed)
    timeout = 30.0 if bench.s.short else 300.0
    figure = "upgrade by git checkout while running, kernel tree"
    with bench.link(spec, remote) as (link, proxy):
        w = bench.lsync(link, local=local, name="lsync-upgrade", verbose=False,
                        cache_home=cache)
        try:
            w.start(timeout=900.0)
            wait_quiet(proxy, quiet_for(spec), limit=120.0)
            before = cpu_now(bench, w, n, "changed paths")
            proxy.reset_counters()
            began = time.perf_counter()
            end, end_ns = checkout(local, up.new)
            expected = Expected.of(local, up.changed)
            identical_at = wait_remote(remote, expected, end, timeout)
            in_sync_at = w.wait_in_sync(end_ns, max(1.0, end + timeout - time.perf_counter()))
            cpu = cpu_since(before, cpu_now(bench, w, n, "changed paths"))
            wait_quiet(proxy, quiet_for(spec), limit=60.0)
            c = proxy.counters()
        except (PeerError, kernel_material.MaterialError) as exc:
            cells[LSYNC] = Cell(f"failed ({type(exc).__name__}: {str(exc)[:200]})")
            bench.failed(LSYNC, f"u {spec.label}", exc)
            return
        finally:
            w.stop()
    if w.exit_status != 0:
        bench.note(f"lsync (u, {spec.label}) exited with status {w.exit_status} after "
                   f"SIGINT; log: {w.log}")
    problem = expected.problem(remote) or same_files(local, remote)
    cell, core = _lsync_cell(end - began, identical_at, in_sync_at, end, c.bytes_total,
                             problem, cpu)
    cells[LSYNC] = cell
    peer = cells.get(RSYNC)
    ratio = None if cell.value is None or peer is None or not peer.value else (
        cell.value / peer.value)
    bench.goal(figure if bench.s.real_kernel else figure.replace("kernel", bench.s.tree), spec,
               target, core, "—" if peer is None else peer.text, ratio, cell.target_ok, cpu)
    say(f"u {spec.label} lsync: {cell.text}")
    if not bench.s.keep:
        shutil.rmtree(remote, ignore_errors=True)


def _lsync_cell(checkout_seconds: float, identical_at: float | None, in_sync_at: float | None,
                end: float, nbytes: int, problem: str, cpu: CpuUse) -> tuple[Cell, str]:
    """"in-sync line 0.62 s; identical 0.55 s after the checkout's end (checkout 1.90 s);
    12.3 MB both ways ✓ (CPU ...)", and that text without the mark and the CPU. The value
    is the later of the two times (lsync's claim and the fact)."""
    parts = []
    in_sync = None if in_sync_at is None else in_sync_at - end
    identical = None if identical_at is None else identical_at - end
    parts.append("no in-sync line" if in_sync is None else f"in-sync line {in_sync:.2f} s")
    parts.append("never identical" if identical is None else f"identical {identical:.2f} s")
    text = (f"{'; '.join(parts)} after the checkout's end (checkout {checkout_seconds:.2f} s); "
            f"{fmt_kb(nbytes)} both ways")
    value = None if in_sync is None or identical is None else max(in_sync, identical)
    if problem:
        text += f" (remote differs afterwards: {problem})"
    cell = Cell(text, value=value)
    if value is not None:
        mark(cell, not problem and value <= TARGET_SECONDS)
    cell.text += f" ({cpu.text})"
    return cell, text
