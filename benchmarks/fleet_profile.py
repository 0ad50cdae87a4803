"""Where one `lsync connect` spends its CPU with one target and with three (issue 17):

    python -m benchmarks.fleet_profile [--rtt-ms 300] [--tree small] [--modes one,fleet]
                                       [--burst 1000] [--top 25]

On the testbed of benchmarks.fleet (one sshd behind three delay proxies), per mode: the
initial sync of a copy of the generated tree into empty remotes, then a burst of new 2 KB
files and a flush, each under py-spy (`record --nonblocking --threads --format raw`, as
benchmarks.profile_sync). Printed per mode and phase: the client's CPU (/proc), its
threads, and the functions with the most CPU (self and inclusive, each thread's CPU shared
out over its samples). What grows with the targets is what is repeated per target.
Sampling costs CPU too: the syncs are slower than without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import default_cache_dir, say
from benchmarks.fleet import cached_tree
from benchmarks.fleet_measures import FLUSH_TIMEOUT, flush, wait_quiet, write_files
from benchmarks.fleet_testbed import FLEET, NAMES, ONE, READY_TIMEOUT, Client, testbed
from benchmarks.profile_sync import Profile, cpu_table, spy, stop_spy, table
from benchmarks.testbed import trees


def _report(name: str, out: Path, cpu: float, threads: dict[int, float], files: int,
            top: int) -> None:
    prof = Profile.read(out)
    print(f"\n## {name}: client CPU {cpu:.2f} s (/proc); {prof.samples} samples")
    if not prof.samples:
        return
    print()
    print(table(prof.thread_counts(), files, 12, "thread (samples)"))
    print()
    print(cpu_table(prof.cpu_weighted("self", threads), files, top,
                    "self (innermost Python frame), CPU-weighted"))
    print()
    print(cpu_table(prof.cpu_weighted("inclusive", threads), files, top,
                    "inclusive, CPU-weighted"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_profile",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=300.0)
    parser.add_argument("--tree", choices=("tiny", "small"), default="small")
    parser.add_argument("--modes", default=f"{ONE},{FLEET}")
    parser.add_argument("--burst", type=int, default=1000, help="new files in the burst")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the raw stacks here")
    args = parser.parse_args(argv)
    source = cached_tree(args.tree, default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="lsync-fleetprof-"))
    out = args.out or work / "stacks"
    out.mkdir(parents=True, exist_ok=True)
    files = sum(1 for _ in trees.walk_files(source))
    try:
        with testbed(work, args.rtt_ms / 2000) as bed:
            for mode in args.modes.split(","):
                local = work / f"local-{mode}"
                shutil.copytree(source, local, symlinks=True)
                remotes = bed.remotes(f"prof-{mode}")
                hosts = [NAMES[0]] if mode == ONE else list(NAMES)
                base = work / "clients" / mode
                client = Client([f"{h}:{remotes[h]}" for h in hosts], bed.config, local,
                                base / "cache", base.with_suffix(".log"))
                spies: list[subprocess.Popen[bytes]] = []
                try:
                    spies.append(spy(client.proc.pid, out / f"{mode}-initial.txt"))
                    t0 = client.started
                    ready = client.wait_line(" ready files=", READY_TIMEOUT)
                    cpu = procstat.cpu_seconds(client.proc.pid)
                    threads = procstat.thread_cpu_seconds(client.proc.pid)
                    stop_spy(spies.pop())
                    say(f"{mode}: initial sync {ready - t0:.2f} s, CPU {cpu:.2f} s")
                    _report(f"{mode}: initial sync of {files} files ({ready - t0:.2f} s)",
                            out / f"{mode}-initial.txt", cpu, threads, files, args.top)
                    wait_quiet(bed, 2.0)  # (the initial sync's last answers and pings)
                    rels = [f"burst/d{i // 100:02d}/f{i:04d}.c" for i in range(args.burst)]
                    contents = [(r, trees.text_of_size(2_000, name=r)) for r in rels]
                    socket = client.socket()
                    cpu0 = procstat.cpu_seconds(client.proc.pid)
                    threads0 = procstat.thread_cpu_seconds(client.proc.pid)
                    spies.append(spy(client.proc.pid, out / f"{mode}-burst.txt"))
                    time.sleep(0.5)
                    t1 = time.perf_counter()
                    write_files(local, contents)
                    t2 = time.perf_counter()
                    asyncio.run(flush(socket, FLUSH_TIMEOUT))
                    t3 = time.perf_counter()
                    cpu = procstat.cpu_seconds(client.proc.pid) - cpu0
                    after = procstat.thread_cpu_seconds(client.proc.pid)
                    threads = {t: s - threads0.get(t, 0.0) for t, s in after.items()}
                    stop_spy(spies.pop())
                    say(f"{mode}: burst written in {t2 - t1:.2f} s, flush {t3 - t2:.2f} s, "
                        f"CPU {cpu:.2f} s")
                    _report(f"{mode}: burst of {args.burst} files (flush {t3 - t2:.2f} s)",
                            out / f"{mode}-burst.txt", cpu, threads, args.burst, args.top)
                finally:
                    for proc in spies:
                        with contextlib.suppress(Exception):
                            stop_spy(proc)
                    client.stop()
    finally:
        if args.out is None:
            print(f"\n(raw stacks were in {out}, now deleted: give --out to keep them)")
        shutil.rmtree(work, ignore_errors=True)  # (the local copies and remotes: ~100 MB each)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
