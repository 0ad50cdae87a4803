"""Where an initial sync spends its CPU: ``python -m benchmarks.profile_sync [--local DIR]``.

Runs one initial sync of a tree (default: the real kernel's cached work tree, made by a full
benchmark run, see benchmarks/bench.py) into an empty remote, through the private sshd and
the delay proxy (RTT 0 unless `--rtt-ms`), with py-spy (`pip install py-spy`) sampling the
lsync client and, once it exists, its agent (`py-spy record --nonblocking --threads --format
raw`: the target is not paused; idle threads are not sampled). At lsync's "ready" line both
recordings stop. It prints, per process, the CPU seconds /proc says it used (and per 1,000
files), then the functions with the most samples where the CPU was spent (self: the
innermost Python frame, so time in C code called from Python counts for the caller) and
the most inclusive ones, in CPU seconds per 1,000 files: each thread's CPU (/proc) shared
out over that thread's samples. The raw stacks and the threads' CPU stay in `--out`.
Sampling costs CPU too: the sync is slower than without it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import agent_record_files, default_cache_dir, say
from benchmarks.bench_trees import count_tree
from benchmarks.kernel_material import TAGS
from benchmarks.lsync_runner import AGENT_CMDLINE_NEEDLE, LsyncWatcher
from benchmarks.peers import Link
from benchmarks.testbed import remotefs
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd

RATE = 100  # samples per second
_FRAME_LINE = re.compile(r":\d+\)$")
_THREAD_ID = re.compile(r"^thread \((\d+)\)")


@dataclass
class Profile:
    """Samples of one process: stacks (outermost first) and how often each was seen."""

    stacks: dict[tuple[str, ...], int]

    @classmethod
    def read(cls, path: Path) -> Profile:
        stacks: dict[tuple[str, ...], int] = collections.Counter()
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    frames = tuple(_FRAME_LINE.sub(")", f) for f in stack.split(";"))
                    stacks[frames] += int(count)
        return cls(dict(stacks))

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    def self_counts(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for frames, n in self.stacks.items():
            out[frames[-1]] += n
        return out

    def inclusive_counts(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for frames, n in self.stacks.items():
            for frame in set(frames):
                out[frame] += n
        return out

    def cpu_weighted(self, counts_of: str,
                     thread_cpu: dict[int, float]) -> dict[str, float]:
        """CPU seconds per function ("self" or "inclusive"): each thread's CPU from /proc
        shared out over that thread's samples (py-spy also samples threads that wait for the
        interpreter lock or in a system call, so raw samples overstate CPU)."""
        per_thread: dict[int, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        totals: collections.Counter[int] = collections.Counter()
        for frames, n in self.stacks.items():
            m = _THREAD_ID.search(frames[0])
            tid = int(m.group(1)) if m else -1  # (py-spy names a thread once it has a name)
            totals[tid] += n
            chosen = [frames[-1]] if counts_of == "self" else list(set(frames[1:]))
            for frame in chosen:
                per_thread[tid][frame] += n
        out: dict[str, float] = collections.defaultdict(float)
        for tid, counts in per_thread.items():
            seconds = thread_cpu.get(tid, 0.0)
            for frame, n in counts.items():
                out[frame] += seconds * n / totals[tid]
        return out

    def thread_counts(self) -> collections.Counter[str]:
        """Samples per thread (py-spy --threads puts the thread first in each stack)."""
        out: collections.Counter[str] = collections.Counter()
        for frames, n in self.stacks.items():
            out[frames[0]] += n
        return out


def table(counts: collections.Counter[str], files: int, top: int, title: str) -> str:
    lines = [f"| {title} | s per 1,000 files | samples |", "|---|---|---|"]
    for frame, n in counts.most_common(top):
        lines.append(f"| `{frame}` | {1000 * n / RATE / files:.3f} | {n} |")
    return "\n".join(lines)


def cpu_table(seconds: dict[str, float], files: int, top: int, title: str) -> str:
    lines = [f"| {title} | CPU s per 1,000 files | CPU s |", "|---|---|---|"]
    for frame, value in sorted(seconds.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{frame}` | {1000 * value / files:.3f} | {value:.1f} |")
    return "\n".join(lines)


def thread_table(named: dict[int, tuple[float, float]], files: int) -> str:
    """Each thread's user and system CPU (/proc), busiest first, by thread id (py-spy's
    tables name the ids; the kernel knows every Python thread by the interpreter's name)."""
    lines = ["| thread id (/proc) | user s | system s | CPU s per 1,000 files |",
             "|---|---|---|---|"]
    for tid, (user, system) in sorted(named.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {tid} | {user:.1f} | {system:.1f} | "
                     f"{1000 * (user + system) / files:.3f} |")
    return "\n".join(lines)


def spy(pid: int, out: Path, tries: int = 20) -> subprocess.Popen[bytes]:
    """py-spy recording `pid`; retried while it fails at once (a process found right after
    its exec has no interpreter state to find yet)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking",
            "--threads", "--format", "raw", "--output", str(out)]
    for _ in range(tries):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return proc  # recording
        time.sleep(0.1)
    return proc


def _agent_interpreter(sshd_pid: int) -> int | None:
    """The agent's process once it runs Python: the remote command's `sh` and a launcher
    (a pyenv shim is a bash script that forks) carry the same command line before the
    interpreter replaces them, and py-spy can attach to none of those."""
    for pid in reversed(procstat.find_descendants(sshd_pid, AGENT_CMDLINE_NEEDLE)):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python"):
                return pid
    return None


def stop_spy(proc: subprocess.Popen[bytes]) -> str:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace").strip()[-300:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_sync",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tree = default_cache_dir() / "trees" / f"kernel-real-{TAGS[0]}"
    parser.add_argument("--local", type=Path, default=default_tree, help="the tree to sync")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="where the raw stacks go (default: a temp dir)")
    parser.add_argument("--trash", type=Path,
                        help="with --remote-fs workdir: move the synced remote into this "
                             "directory instead of deleting it (deleting 78,667 files makes "
                             "ext4 without a journal skip the freed inodes for minutes: the "
                             "next run's agent pays for it in system time)")
    parser.add_argument("--remote-fs", choices=("image", "workdir"), default="image",
                        help="the remote on a fresh journaled ext4 image (default, needs root; "
                             "benchmarks.testbed.remotefs) or in the work directory")
    parser.add_argument("--no-spy", action="store_true",
                        help="no sampling: only each thread's user and system CPU from /proc "
                             "(without the sampler's own cost)")
    args = parser.parse_args(argv)
    if not args.local.is_dir():
        raise SystemExit(f"{args.local} does not exist: run `python -m benchmarks.run "
                         f"--issue16` once, or give --local")
    files = count_tree(args.local, "profiled", 0.0).files
    work = Path(tempfile.mkdtemp(prefix="lsync-profile-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    sshd = PrivateSshd(work / "sshd")
    sshd.start()
    mounts = contextlib.ExitStack()
    remote_base = work
    if args.remote_fs == "image":
        usable, why = remotefs.available()
        if not usable:
            raise SystemExit(f"no journaled image for the remote ({why}): --remote-fs workdir")
        remote_base = mounts.enter_context(remotefs.journaled_fs(work))
    spies: dict[str, subprocess.Popen[bytes]] = {}
    cpu: dict[str, float] = {}
    split: dict[str, tuple[float, float]] = {}
    threads: dict[str, dict[int, float]] = {}
    named: dict[str, dict[int, tuple[float, float]]] = {}
    try:
        with ThreadedProxy(("127.0.0.1", sshd.port), args.rtt_ms / 2000.0) as proxy:
            cfg = sshd.write_client_config(port=proxy.port)
            remote = remote_base / "remote"
            remote.mkdir()
            w = LsyncWatcher(args.local, Link(cfg, sshd.alias, remote), work / "lsync",
                             verbose=False, cache_home=work / "cache")
            w.spawn()
            assert w.pid is not None and sshd.pid is not None
            if not args.no_spy:
                spies["client"] = spy(w.pid, out / "client.txt")
            agent = None
            deadline = time.monotonic() + 60
            while agent is None and time.monotonic() < deadline and not w.is_ready():
                agent = _agent_interpreter(sshd.pid)
                time.sleep(0.005)
            if agent is not None and not args.no_spy:
                spies["agent"] = spy(agent, out / "agent.txt")
            w.wait_ready(timeout=1800)
            for name, pid in (("client", w.pid), ("agent", agent)):
                if pid is not None:
                    with contextlib.suppress(procstat.ProcessGone):
                        cpu[name] = procstat.cpu_seconds(pid)
                        split[name] = procstat.cpu_split(pid)
                        named[name] = procstat.thread_cpu_split(pid)
                        threads[name] = {tid: user + system
                                         for tid, (user, system) in named[name].items()}
            errors = {name: stop_spy(p) for name, p in spies.items()}
            w.stop()
    finally:
        for p in spies.values():
            if p.poll() is None:
                p.kill()
        sshd.stop()
        if args.trash is not None and remote_base == work:
            args.trash.mkdir(parents=True, exist_ok=True)
            (work / "remote").rename(args.trash / work.name)
        mounts.close()  # (an image: unmounted and deleted, its files with it)
        shutil.rmtree(work / "remote", ignore_errors=True)  # 1.3 GB for the kernel
        for record in agent_record_files(remote_base / "remote"):  # and the agent's records
            record.unlink(missing_ok=True)
        if args.out is not None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = w.startup_seconds or 0.0
    say(f"initial sync of {files:,} files at RTT {args.rtt_ms:g} ms"
        f"{'' if args.no_spy else ' under py-spy'}: ready after {seconds:.1f} s"
        f"{'' if args.no_spy else f'; raw stacks in {out}'}")
    (out / "threads.json").write_text(json.dumps(
        {name: {str(tid): sec for tid, sec in per.items()} for name, per in threads.items()}))
    for name in ("client", "agent"):
        prof = Profile.read(out / f"{name}.txt") if not args.no_spy else Profile({})
        used = cpu.get(name)
        print(f"\n## {name}: CPU {used if used is not None else float('nan'):.1f} s "
              f"(/proc) = {1000 * (used or 0) / files:.3f} s per 1,000 files; "
              f"{prof.samples} samples = {prof.samples / RATE:.1f} s of running threads")
        if name in split:
            user, system = split[name]
            print(f"user {user:.1f} s, system {system:.1f} s")
        print()
        print(thread_table(named.get(name, {}), files))
        if args.no_spy:
            continue
        if not prof.samples:
            print(f"(no samples: {errors.get(name, 'py-spy did not run')})")
            continue
        print()
        print(table(prof.thread_counts(), files, 12, "thread (samples)"))
        per_thread = threads.get(name, {})
        print()
        print(cpu_table(prof.cpu_weighted("self", per_thread), files, args.top,
                        "self (innermost Python frame), CPU-weighted"))
        print()
        print(cpu_table(prof.cpu_weighted("inclusive", per_thread), files, args.top,
                        "inclusive, CPU-weighted"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
