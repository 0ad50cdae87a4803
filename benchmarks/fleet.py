"""Several targets from one process (issue 17): one `lsync connect` to three build hosts.

    python -m benchmarks.fleet [--rtt-ms 300] [--quick] [--saves 30] [--tree small] [--keep]

The testbed: one private sshd on 127.0.0.1 behind three delay proxies (one-way delay RTT/2
each, new connections pay the handshake), one ssh config with three aliases (`x86`, `arm`,
`box3`), a remote directory per host and per run. Three ways to sync one local tree:

- `one`: ``lsync connect -F cfg x86:R`` (one target: the reference);
- `fleet`: ``lsync connect -F cfg x86:R1 arm:R2 box3:R3`` (one process, three targets);
- `three`: three ``lsync connect`` processes, one per host (the baseline), each with its own
  XDG_CACHE_HOME (control socket, lock, hash cache), all on the same local tree.

Measured, in this order (each once; the machine is shared, so expect noise):

1. one save (a one-line edit of a 20 KB C file, truncate-and-write, ~300 ms apart) -> the
   remote copy byte-identical, polled every ~1 ms on every host: the time until the LAST
   host has it, and per host;
2. the client's read bytes per save (`rchar` of /proc/PID/io: every read(2), sockets
   included) over saves of a 512 KB file 1 s apart: one read of the save for three targets
   should cost about what one target costs (the in-process count of the reads for sending
   is tested in tests/test_fleet_properties.py; the check of the saved file's directory
   after the save is made by each target, and hashes a file changed in the last 2 s again);
3. a flush with nothing pending (a request on the control socket, and the `lsync flush`
   command, spawn to exit) and the bytes through the proxies meanwhile; a flush right after
   1,000 new 2 KB C files are written at once (then every file is checked on every host);
4. the initial sync of the `small` generated tree (5,000 files, ~87 MB) into empty remotes:
   spawn -> the `ready` line, and the client's user + system CPU (/proc) at that line;
5. one host frozen (its proxy's connections stop dead, no RST): saves measured on the two
   live hosts; then how long until the frozen host has caught up (a flush of every target).

Printed: a markdown table (goal and ✓/✗ per row), the date, the commit, the machine.

This module makes the local trees, runs the steps in order (a failed step is noted, the
others still run) and prints; the testbed is benchmarks/fleet_testbed.py, the measurements
benchmarks/fleet_measures.py, the table benchmarks/fleet_table.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import default_cache_dir, say
from benchmarks.fleet_measures import (
    EDIT_FILES,
    EDIT_SIZE,
    READ_FILE,
    READ_SIZE,
    Results,
    flush_request,
    measure_burst,
    measure_frozen,
    measure_idle_flush,
    measure_initial,
    measure_reads,
    measure_saves,
)
from benchmarks.fleet_table import table
from benchmarks.fleet_testbed import FLEET, ONE, THREE, Testbed, session, testbed
from benchmarks.provenance import lsync_commit, machine_description
from benchmarks.testbed import trees


def edit_tree(root: Path) -> list[str]:
    """The local tree of the save sessions: `tiny`, 40 files of 20 KB, one of 512 KB."""
    trees.generate("tiny", root)
    files = [f"edit/e{i:02d}.c" for i in range(EDIT_FILES)]
    (root / "edit").mkdir()
    for rel in files:
        (root / rel).write_bytes(trees.text_of_size(EDIT_SIZE, name=rel))
    (root / "big").mkdir()
    (root / READ_FILE).write_bytes(trees.text_of_size(READ_SIZE, name=READ_FILE))
    return files


def cached_tree(preset: str, cache_dir: Path) -> Path:
    """The generated tree the other benchmarks keep (benchmarks.bench.Bench.tree_dir's
    cache: same place, same stamp), generated here if missing."""
    import hashlib

    tag = hashlib.sha256(Path(trees.__file__).read_bytes()).hexdigest()[:12]
    root = cache_dir / "trees" / f"{preset}-seed0"
    stamp = root.with_name(root.name + ".stamp")
    if stamp.exists() and root.is_dir() and stamp.read_text().split()[:1] == [tag]:
        return root
    shutil.rmtree(root, ignore_errors=True)
    stats = trees.generate(preset, root)
    stamp.write_text(f"{tag} {stats.files} {stats.dirs} {stats.bytes}\n")
    return root


def step(results: Results, name: str, fn: object) -> None:
    results.loads.append(procstat.load_average())
    say(f"{name} (load average {results.loads[-1]:.2f})")
    try:
        fn()  # type: ignore[operator]
    except Exception as exc:  # noted in the report; the other steps still run
        results.notes.append(f"{name}: {type(exc).__name__}: {exc}")
        say(f"  failed: {exc}")


def run(bed: Testbed, args: argparse.Namespace) -> Results:
    r = Results()
    local = bed.work / "local"
    files = edit_tree(local)
    saves, reads = args.saves, max(3, args.saves // 3)
    burst_files, bursts = (200, 1) if args.quick else (1_000, 2)
    r.burst_files = burst_files

    def fleet_session() -> None:
        with session(bed, FLEET, local, "fleet") as (clients, remotes):
            r.saves[FLEET] = measure_saves(local, files, remotes, saves, seed=1_000)
            r.reads[FLEET] = measure_reads(bed, clients, local, remotes, reads)
            r.idle[FLEET] = measure_idle_flush(bed, clients[0], 20)
            r.bursts[FLEET] = [measure_burst(clients[0], local, remotes, burst_files,
                                             f"fleet{i}") for i in range(bursts)]
            flush_request(clients[0])
            r.frozen = measure_frozen(bed, clients[0], local, files, remotes, saves,
                                      catch_up=not args.quick)

    def one_session() -> None:
        with session(bed, ONE, local, "one") as (clients, remotes):
            r.saves[ONE] = measure_saves(local, files, remotes, saves, seed=2_000)
            r.reads[ONE] = measure_reads(bed, clients, local, remotes, reads)
            r.idle[ONE] = measure_idle_flush(bed, clients[0], 20)
            r.bursts[ONE] = [measure_burst(clients[0], local, remotes, burst_files,
                                           f"one{i}") for i in range(bursts)]

    def three_session() -> None:
        with session(bed, THREE, local, "three") as (clients, remotes):
            r.saves[THREE] = measure_saves(local, files, remotes, saves, seed=3_000)
            r.reads[THREE] = measure_reads(bed, clients, local, remotes, reads)

    if not args.initial_only:
        step(r, "one process, three targets: saves, reads, flushes, a frozen host",
             fleet_session)
        step(r, "one target: saves, reads, flushes", one_session)
        step(r, "three processes: saves, reads", three_session)
    tree = args.tree_dir or cached_tree("tiny" if args.quick else args.tree, args.cache_dir)
    r.initial_files = sum(1 for f in trees.walk_files(tree) if not f.startswith(".git/"))
    for mode in args.initial_modes.split(","):
        def initial(mode: str = mode) -> None:
            r.initial[mode] = measure_initial(bed, mode, tree)
        step(r, f"initial sync of {tree.name}: {mode}", initial)
    return r


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=300.0,
                        help="round trip to each host (default 300: one-way 150 ms)")
    parser.add_argument("--quick", action="store_true",
                        help="a quick look: 10 saves, a burst of 200 files, the tiny tree, "
                             "no wait for the frozen host")
    parser.add_argument("--saves", type=int, help="saves per measurement (default 30)")
    parser.add_argument("--tree", choices=("tiny", "small", "kernel"), default="small",
                        help="generated tree of the initial sync (default small)")
    parser.add_argument("--tree-dir", type=Path,
                        help="sync this tree instead in the initial-sync step (say the real "
                             "kernel's work tree under ~/.cache/lsync-bench/trees/)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where generated trees are kept (default ~/.cache/lsync-bench)")
    parser.add_argument("--initial-only", action="store_true",
                        help="only the initial syncs (step 4), say of a big --tree-dir")
    parser.add_argument("--initial-modes", default=f"{ONE},{FLEET},{THREE}",
                        help=f"which initial syncs (default {ONE},{FLEET},{THREE})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not set(args.initial_modes.split(",")) <= {ONE, FLEET, THREE}:
        parser.error(f"--initial-modes: a comma list of {ONE}, {FLEET}, {THREE}")
    if args.saves is None:
        args.saves = 10 if args.quick else 30
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    load_before = procstat.load_average()
    work = Path(tempfile.mkdtemp(prefix="lsync-fleet-"))
    try:
        with testbed(work, args.rtt_ms / 2000) as bed:
            results = run(bed, args)
        minutes = (time.monotonic() - t0) / 60
        print()
        print(f"Run {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min, lsync at {lsync_commit()}; "
              f"RTT {args.rtt_ms:g} ms to each host (one-way {args.rtt_ms / 2:g} ms); "
              f"load average (2 CPUs) {load_before:.2f} at the start, "
              f"{min(results.loads):.2f} to {max(results.loads):.2f} before each step, "
              f"{procstat.load_average():.2f} at the end.")
        print(f"Machine: {machine_description()}")
        print(f"Command: python -m benchmarks.fleet {' '.join(sys.argv[1:])}".rstrip())
        print()
        print(table(results, args.rtt_ms / 2000))
        for note in results.notes:
            print(f"\nNote: {note}")
        sys.stdout.flush()
    finally:  # (after the table: deleting the remote trees of a big tree takes minutes)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if results.notes else 0


if __name__ == "__main__":
    raise SystemExit(main())
