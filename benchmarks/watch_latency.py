"""The watcher's trade-off: watchfiles' `step` against detection latency and idle CPU.

lsync watches with ``watchfiles.awatch(root, step=..., debounce=...)`` (client/local/watcher.py).
`step` is how long watchfiles sleeps between looks at the queue of inotify events, and how
long a batch must stay quiet before it is delivered; `debounce` bounds a batch's length. A
short step means early detection and more wake-ups while idle. This module measures both
sides with watchfiles alone, outside lsync: a probe process (this module with ``--probe``)
runs awatch exactly as lsync does (asyncio, recursive, no filter, a stop event) on a
directory tree and prints ``<time.monotonic()> <path>`` for every changed path; the caller
rewrites files and reads how long each took to be reported (CLOCK_MONOTONIC is shared by
processes on Linux), then leaves the tree alone and reads the probe's CPU time from /proc.

    python -m benchmarks.watch_latency DIR [--steps 1,5,20,50] [--debounce 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procstat


class ProbeError(RuntimeError):
    """The probe process did not start, did not report a change in time, or died."""


@dataclass(frozen=True)
class ProbeResult:
    step_ms: int
    debounce_ms: int
    latencies: list[float]  # seconds from the end of each write to its report
    missed: int  # writes never reported within the timeout
    idle_cpu: float  # share of one core while nothing changed
    idle_seconds: float


async def _probe(root: str, step: int, debounce: int) -> None:
    import watchfiles

    stop = asyncio.Event()
    out = sys.stdout
    out.write("started\n")
    out.flush()
    async for changes in watchfiles.awatch(
            root, watch_filter=None, step=step, debounce=debounce, stop_event=stop,
            recursive=True, ignore_permission_denied=True):
        now = time.monotonic()
        out.write("".join(f"{now:.6f} {path}\n" for _change, path in changes))
        out.flush()


class _Probe:
    """The probe subprocess and a thread turning its lines into (time, path) on a queue."""

    def __init__(self, root: Path, step: int, debounce: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.watch_latency", "--probe", str(root),
             "--steps", str(step), "--debounce", str(debounce)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
        )
        self.lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp, _, path = line.rstrip("\n").partition(" ")
            if stamp == "started":
                continue
            with contextlib.suppress(ValueError):
                self.lines.put((float(stamp), path))
        self.lines.put(None)

    def wait_for(self, path: str, timeout: float) -> float | None:
        """monotonic() at which the probe reported `path`, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if item is None:
                raise ProbeError(f"probe exited with {self.proc.wait()}")
            if item[1] == path:
                return item[0]
        return None

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.lines.get_nowait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)


def _rewrite(path: Path, counter: int) -> float:
    """Append-free rewrite of `path` (truncate and write); monotonic() when closed."""
    data = path.read_bytes()
    tag = f"/* probe {counter:08d} */\n".encode()
    with open(path, "wb") as f:
        f.write(tag + data[len(tag):] if len(data) > len(tag) else tag)
    return time.monotonic()


def measure_step(root: Path, files: Sequence[Path], step: int, debounce: int,
                 events: int = 20, idle_seconds: float = 10.0,
                 timeout: float = 5.0) -> ProbeResult:
    """Detection latency over `events` rewrites of `files` (in turn), then idle CPU."""
    probe = _Probe(root, step, debounce)
    try:
        # Watching has begun once a write is reported: rewrite a file until one is.
        sentinel = files[0]
        deadline = time.monotonic() + 30.0
        while True:
            _rewrite(sentinel, 0)
            if probe.wait_for(str(sentinel), 0.2) is not None:
                break
            if probe.proc.poll() is not None or time.monotonic() > deadline:
                raise ProbeError("the probe never reported a change")
        quiet = (step + debounce) / 1000.0 + 0.05
        latencies: list[float] = []
        missed = 0
        for i in range(events):
            # Let the previous batch go out, so each write starts a batch of its own.
            time.sleep(quiet)  # a fixed gap between writes, not a wait for a condition
            probe.drain()
            target = files[(i + 1) % len(files)]
            t0 = _rewrite(target, i + 1)
            t1 = probe.wait_for(str(target), timeout)
            if t1 is None:
                missed += 1
            else:
                latencies.append(t1 - t0)
        time.sleep(quiet)  # the last batch's tail: not part of the idle window
        cpu = procstat.idle_cpu(probe.proc.pid, idle_seconds)
        return ProbeResult(step, debounce, latencies, missed, cpu, idle_seconds)
    finally:
        probe.stop()


def pick_files(root: Path, count: int) -> list[Path]:
    """`count` regular files spread over the tree under `root` (sorted walk, evenly sampled)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found.extend(Path(dirpath, n) for n in sorted(filenames))
    if not found:
        raise ProbeError(f"no files under {root}")
    stride = max(1, len(found) // count)
    return found[::stride][:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watch_latency",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, help="tree to watch (files get rewritten)")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", default="1,5,20,50")
    parser.add_argument("--debounce", type=int, default=50)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--idle", type=float, default=10.0, help="idle window in seconds")
    args = parser.parse_args(argv)
    if args.probe is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_probe(str(args.probe), int(args.steps), args.debounce))
        return 0
    if args.root is None:
        parser.error("give the tree to watch")
    files = pick_files(args.root, 20)
    print("| step ms | debounce ms | detect p50 / p95 / max ms | idle CPU (% of one core) |")
    print("|---|---|---|---|")
    for step in (int(s) for s in args.steps.split(",")):
        r = measure_step(args.root, files, step, args.debounce, args.events, args.idle)
        lat = sorted(r.latencies)
        p50, p95, worst = (lat[max(0, int(q * len(lat) + 0.999) - 1)] * 1000
                           for q in (0.5, 0.95, 1.0))
        print(f"| {step} | {args.debounce} | {p50:.1f} / {p95:.1f} / {worst:.1f} | "
              f"{r.idle_cpu * 100:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
