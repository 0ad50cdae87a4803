"""The lsync client's memory over one initial sync: ``python -m benchmarks.rss_sync``.

Runs one initial sync of a tree (default: the real kernel's cached work tree, see
benchmarks/bench.py) into an empty remote with a cold hash cache, through the private sshd
and the delay proxy (`--rtt-ms`, default 0), then (`--restart`) a second lsync on the synced
remote with the same cache. It samples the client's VmRSS (and its threads) from
/proc/<pid>/status every `--every` seconds and prints, per run: the wall time from the spawn
to lsync's "ready" line, the client's CPU (user + system), its peak RSS (VmHWM) and when the
RSS was at its highest, and with `--timeline` the samples.

The lsync under test is the one this interpreter imports: run it with another
environment's python (from this directory, so that `benchmarks` is this one) to measure
another version of lsync, e.g. ``/path/to/main/.venv/bin/python -m benchmarks.rss_sync``.

`--tracemalloc N`: the client runs (`--traced`: which runs) under tracemalloc (N frames;
several times slower, and the RSS includes tracemalloc's own tables, so its figures are not
comparable) and writes an allocation snapshot whenever its traced memory has grown by 10%
(checked every 0.5 s) to OUT.<run>.1, .2, ...; the top allocation sites of the last one are
printed at the end (`--show FILE` prints another).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import agent_record_files, default_cache_dir, say
from benchmarks.kernel_material import TAGS
from benchmarks.lsync_runner import LsyncWatcher
from benchmarks.peers import Link
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd

# The client under tracemalloc: a thread writes a snapshot every time the traced memory
# grows by 10% beyond its highest so far (OUT.1, OUT.2, ...; OUT.txt: when, how much).
_TRACED_MAIN = """
import sys, threading, time, tracemalloc
out, frames = sys.argv.pop(1), int(sys.argv.pop(1))
tracemalloc.start(frames)
def follow():
    best = count = 0
    while True:
        time.sleep(0.5)
        now, _ = tracemalloc.get_traced_memory()
        if now > best * 1.1:
            best = now
            count += 1
            tracemalloc.take_snapshot().dump('%s.%d' % (out, count))
            with open(out + '.txt', 'a') as f:
                f.write('%d %.1f %d\\n' % (count, time.monotonic(), now))
threading.Thread(target=follow, daemon=True).start()
from lsync.client.cli import main
sys.exit(main())
"""


class _TracedWatcher(LsyncWatcher):
    def __init__(self, *args: object, snapshot: Path, frames: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.snapshot = snapshot
        self.frames = frames

    def argv(self) -> list[str]:
        base = super().argv()
        return [sys.executable, "-c", _TRACED_MAIN, str(self.snapshot), str(self.frames),
                *base[3:]]


@dataclass
class Run:
    name: str
    seconds: float | None = None
    cpu: float | None = None
    peak: int | None = None
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, rss, threads)


def _status(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = threads = 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def measure(w: LsyncWatcher, name: str, every: float, settle: float) -> Run:
    """Spawn `w`, sample it until its "ready" line (and `settle` seconds after), stop it."""
    run = Run(name)
    w.spawn()
    assert w.pid is not None
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            got = _status(w.pid) if w.pid is not None else None
            if got is not None:
                run.samples.append((time.perf_counter() - t0, *got))
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        w.wait_ready(timeout=1800)
        run.seconds = w.startup_seconds
        run.cpu = procstat.cpu_seconds(w.pid)
        time.sleep(settle)
        run.peak = procstat.memory(w.pid).peak
    finally:
        done.set()
        sampler.join()
        w.stop()
    return run


def report(run: Run, timeline: bool) -> None:
    top = max(run.samples, key=lambda s: s[1], default=(0.0, 0, 0))
    peak = "?" if run.peak is None else f"{run.peak / 1e6:.0f}"
    secs = "?" if run.seconds is None else f"{run.seconds:.1f}"
    cpu = "?" if run.cpu is None else f"{run.cpu:.1f}"
    print(f"{run.name}: ready {secs} s, client CPU {cpu} s, peak RSS (VmHWM) {peak} MB; "
          f"highest sample {top[1] / 1e6:.0f} MB at {top[0]:.1f} s ({top[2]} threads)",
          flush=True)
    if timeline:
        step = max(1, len(run.samples) // 60)
        for t, rss, threads in run.samples[::step]:
            print(f"  {t:6.1f} s {rss / 1e6:6.0f} MB {threads:3d} threads")


def print_snapshot(path: Path, top: int) -> None:
    import tracemalloc

    snap = tracemalloc.Snapshot.load(str(path))
    total = sum(s.size for s in snap.statistics("filename"))
    print(f"\ntraced at the peak: {total / 1e6:.1f} MB")
    for key in ("lineno", "filename"):
        print(f"\n-- by {key}")
        for stat in snap.statistics(key)[:top]:
            frame = stat.traceback[0]
            print(f"{stat.size / 1e6:8.1f} MB {stat.count:9,d}  {frame.filename}:{frame.lineno}")
    print("\n-- by traceback (top 12)")
    for stat in snap.statistics("traceback")[:12]:
        print(f"{stat.size / 1e6:8.1f} MB {stat.count:9,d}")
        for line in stat.traceback.format()[-12:]:
            print("    " + line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss_sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tree = default_cache_dir() / "trees" / f"kernel-real-{TAGS[0]}"
    parser.add_argument("--local", type=Path, default=default_tree, help="the tree to sync")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--restart", action="store_true", help="then a restart, same cache")
    parser.add_argument("--every", type=float, default=0.2, help="sampling period (s)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after ready before the peak is read")
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    parser.add_argument("--traced", default="initial,restart",
                        help="which runs --tracemalloc applies to")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lsync-rss.snapshot"))
    parser.add_argument("--label", default="", help="a name for the printed lines")
    parser.add_argument("--show", type=Path, help="only print this tracemalloc snapshot")
    args = parser.parse_args(argv)
    if args.show is not None:
        print_snapshot(args.show, 40)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lsync-rss-"))
    sshd = PrivateSshd(work / "sshd")
    sshd.start()
    label = args.label or sys.prefix
    try:
        with ThreadedProxy(("127.0.0.1", sshd.port), args.rtt_ms / 2000.0) as proxy:
            cfg = sshd.write_client_config(port=proxy.port)
            remote = work / "remote"
            remote.mkdir()
            link = Link(cfg, sshd.alias, remote)
            kw = dict(verbose=False, cache_home=work / "cache")
            runs = [("initial", 0)] + ([("restart", 1)] if args.restart else [])
            for name, _ in runs:
                traced = bool(args.tracemalloc) and name in args.traced.split(",")
                if traced:
                    snap = args.out.with_name(f"{args.out.name}.{name}")
                    for old in snap.parent.glob(f"{snap.name}.*"):
                        old.unlink()
                    w: LsyncWatcher = _TracedWatcher(args.local, link, work / "lsync",
                                                     snapshot=snap,
                                                     frames=args.tracemalloc, **kw)
                else:
                    w = LsyncWatcher(args.local, link, work / "lsync", **kw)  # type: ignore[arg-type]
                run = measure(w, f"{label} RTT {args.rtt_ms:g} {name}", args.every,
                              args.settle)
                report(run, args.timeline)
                if w.exit_status not in (0, None):
                    say(f"lsync exited with {w.exit_status}: {w.tail()}")
                if traced:
                    taken = sorted(snap.parent.glob(f"{snap.name}.[0-9]*"),
                                   key=lambda p: int(p.suffix[1:]))
                    if taken:
                        print_snapshot(taken[-1], 25)
    finally:
        sshd.stop()
        shutil.rmtree(work / "remote", ignore_errors=True)
        for record in agent_record_files(work / "remote"):
            record.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
