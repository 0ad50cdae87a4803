"""The shared state of one benchmark run: settings, links, trees, measured rows.

`Settings` holds what a run does (full or short mode, which scenarios, links, sizes and
timeouts). `Bench` owns the work directory, the private sshd, the trees and everything
measured so far; `Bench.link(spec)` puts a fresh delay proxy (with byte counters) in front of
the sshd for the duration of a `with` block. Trees are generated once into a cache directory
(``~/.cache/lsync-bench/trees`` unless told otherwise) and reused by later runs as long as
the generator's source is unchanged; scenarios that modify files work on copies. In full
mode the `kernel` tree is the real Linux kernel (issue 16): a git work tree of release
6.1.170 checked out from `benchmarks.kernel_material`'s repository (downloaded with
`apt-get download` once), cached beside the generated trees; `--generated-kernel` (and the
short mode, which never uses it) keeps the generated one. The rows measured are the records
of benchmarks/bench_rows.py; copying, emptying, counting and comparing trees (never their
top-level `.git`) is benchmarks/bench_trees.py's. Helpers here poll conditions with
deadlines; nothing sleeps in place of a condition.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import kernel_material, peers
from benchmarks.bench_rows import BytesRow, CpuUse, Goal, Row, WatchRow, goal_order
from benchmarks.bench_trees import COUNT_VERSION, TRASH, VCS_DIR, count_tree, empty_dir, mirror
from benchmarks.lsync_runner import LsyncWatcher, lsync_available
from benchmarks.peers import Link, Watcher
from benchmarks.testbed import remotefs, trees
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from lsync.agent.listing import KeptListing
from lsync.agent.records import DigestRecord
from lsync.agent.rootlock import RootLock
from lsync.protocol import hashing

LSYNC = "lsync"
RSYNC = "rsync"
SCRIPT_CM = "script+CM"
SCRIPT = "script"
LSYNCD = "lsyncd"
SYSTEMS = (LSYNC, RSYNC, SCRIPT_CM, SCRIPT, LSYNCD)
WATCHERS = (LSYNC, SCRIPT_CM, SCRIPT, LSYNCD)
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g", "h", "u", "bytes", "watch")
# What --issue10 runs: every figure of issue 10's target table, lsync next to rsync.
ISSUE10_SCENARIOS = ("a", "b", "c", "d", "f", "g", "h")
ISSUE10_SYSTEMS = (LSYNC, RSYNC)
# What --issue16 runs: the real-kernel table (c, d, f, g, h, u), lsync next to rsync.
ISSUE16_SCENARIOS = ("c", "d", "f", "g", "h", "u")

# Files the benchmark adds to the tree for its own cases (never part of a/b's sample).
EXTRA_DIR = "lsync-bench"
BIG_FILE = f"{EXTRA_DIR}/big-10mb.c"  # one-line edits in 10 MB (scenario e, bytes table)
INSERT_FILE = f"{EXTRA_DIR}/insert-10mb.c"  # insertions at the start of 10 MB
SMALL_FILE = f"{EXTRA_DIR}/edit-20k.c"  # one-line edits in 20 KB
RENAME_PARENT = f"{EXTRA_DIR}/rename"
RENAME_A = f"{RENAME_PARENT}/dir-a"  # the directory of 1,000 files that gets renamed
RENAME_B = f"{RENAME_PARENT}/dir-b"
TEN_MB = 10_000_000


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "lsync-bench"


@dataclass
class Settings:
    short: bool
    tree: str  # for a, b, e, bytes, watch
    rtts_ms: list[float]
    systems: list[str]
    scenarios: list[str]
    saves: int
    burst: int
    cap_mbit: float
    save_timeout: float
    burst_timeout: float
    peer_mode_budget: float  # seconds of saves per peer and kind in a (then report n)
    abort_after_misses: int
    initial_trees: list[str]  # for c, d, f
    contact_trees: list[str]  # for g (first contact with a copy lsync never saw)
    bulk_tree: str  # for h's saves during an initial sync
    bulk_gap: float  # seconds between one save's identical and the next save in h
    bytes_rtts_ms: list[float]  # links of issue 3's bytes table
    idle_seconds: float
    watch_steps: list[int]
    watch_events: int
    watch_idle: float
    rename_files: int
    cache_dir: Path
    write_readme: bool
    keep: bool
    real_kernel: bool = False  # the `kernel` tree is the real Linux kernel (issue 16)
    remote_fs: str = "workdir"  # "image": remote trees on a journaled ext4 (testbed.remotefs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        short = bool(args.short)
        if args.issue10 or args.issue16:
            args.systems = args.systems or ",".join(ISSUE10_SYSTEMS)
            args.scenarios = args.scenarios or ",".join(
                ISSUE16_SCENARIOS if args.issue16 else ISSUE10_SCENARIOS)
        # The short mode leaves out the script without a ControlMaster (the slowest peer,
        # and never better than the script with one) unless asked for by name.
        default_systems = [s for s in SYSTEMS if s != SCRIPT] if short else list(SYSTEMS)
        systems = args.systems.split(",") if args.systems else default_systems
        unknown = sorted(set(systems) - set(SYSTEMS))
        if unknown:
            raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
        scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
        unknown = sorted(set(scenarios) - set(SCENARIOS))
        if unknown:
            raise SystemExit(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
        tree = args.tree or ("tiny" if short else "small")
        rtts = [float(x) for x in args.rtt_ms.split(",")]
        initial = [tree] if short or tree == "kernel" else [tree, "kernel"]
        if args.no_kernel:
            initial = [t for t in initial if t != "kernel"] or [tree]
        bulk = args.bulk_tree or ("kernel" if "kernel" in initial else tree)
        return cls(
            short=short,
            tree=tree,
            rtts_ms=rtts,
            systems=systems,
            scenarios=scenarios,
            saves=args.saves or (2 if short else 20),
            burst=args.burst or (40 if short else 1000),
            cap_mbit=args.cap_mbit,
            save_timeout=4.0 if short else 15.0,
            burst_timeout=args.burst_timeout or (4.0 if short else 90.0),
            peer_mode_budget=10.0 if short else 75.0,
            abort_after_misses=1 if short else 2,
            initial_trees=initial,
            contact_trees=list(initial),
            bulk_tree=bulk,
            bulk_gap=0.1 if short else 0.3,
            bytes_rtts_ms=[min(rtts)] if short else rtts,
            idle_seconds=args.idle_seconds or (2.0 if short else 30.0),
            watch_steps=[1, 5, 50] if short else [1, 5, 20, 50],
            watch_events=3 if short else 30,
            watch_idle=1.0 if short else 10.0,
            rename_files=1000,
            cache_dir=args.cache_dir or default_cache_dir(),
            write_readme=not args.no_readme,
            keep=args.keep,
            real_kernel=not short and not args.generated_kernel,
            remote_fs=args.remote_fs or ("workdir" if short else "image"),
        )


@dataclass(frozen=True)
class LinkSpec:
    rtt_ms: float
    cap_mbit: float | None = None

    @property
    def label(self) -> str:
        text = f"RTT {self.rtt_ms:g} ms"
        return text + (f", {self.cap_mbit:g} Mbit/s" if self.cap_mbit else "")

    @property
    def delay(self) -> float:
        return self.rtt_ms / 2000.0



def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)



def wait_quiet(proxy: ThreadedProxy, quiet: float, limit: float = 30.0) -> bool:
    """Wait until no byte has crossed the proxy for `quiet` seconds; False if it never was."""
    deadline = time.monotonic() + limit
    last = proxy.counters().bytes_total
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now_total = proxy.counters().bytes_total
        if now_total != last:
            last, since = now_total, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.002) -> float | None:
    """Poll `condition` until true; perf_counter() then, or None after `timeout` seconds."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if condition():
            return now
        if now >= deadline:
            return None
        time.sleep(poll)


def quiet_for(spec: LinkSpec) -> float:
    return max(0.15, 2 * spec.rtt_ms / 1000.0)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def fmt_kb(nbytes: float) -> str:
    if nbytes >= 10e6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1000:.1f} KB"


def agent_record_files(root: Path) -> list[Path]:
    """The files in which lsync's agent keeps what it knows of remote root `root`: its
    record (~/.cache/lsync/agent-<hash>.json and .journal), its kept listing (.listing: 9-10 MB
    for the kernel) for every algorithm the agent may choose, and the root's lock; named by
    the agent's own functions (the same home here: the private sshd logs in as this user),
    `root` as the agent resolves it (absolute, normalised, symlinks not followed)."""
    root_text = os.path.normpath(root)
    out = []
    for algorithm in hashing.ALGORITHMS:
        record = DigestRecord(DigestRecord.default_path(root_text, algorithm), algorithm)
        named = (record.cache_path, record.journal_path, KeptListing.beside(record.cache_path))
        out += [Path(path) for path in named if path is not None]
    lock = RootLock.default_path(root_text)
    return out + ([Path(lock)] if lock is not None else [])



class Bench:
    """Owns the work directory, the sshd, the trees and the rows measured so far."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.work = Path(tempfile.mkdtemp(prefix="lsync-bench-"))
        self.sshd = PrivateSshd(self.work / "sshd")
        self.rows: list[Row] = []
        self.bytes_rows: list[BytesRow] = []
        self.watch_rows: list[WatchRow] = []
        self.src = self.work / "src"  # the bench tree plus the extra files
        self.local = self.work / "local"
        self.remote = self.work / "remote"
        self.lsync_ok, self.lsync_reason = (False, "not selected")
        self.tree_files: list[str] = []
        self.tree_info: dict[str, trees.TreeStats] = {}
        self.notes: list[str] = []
        self.save_p50_300: float | None = None  # scenario a, lsync, RTT 300: for the bytes table
        self.goals: list[Goal] = []  # the targets table (issues 10 and 16)
        self.load_text = "not measured"  # how busy the machine was (run.py)
        self._remotes: list[Path] = [self.remote]  # remote roots lsync's agent may remember
        self.remote_base = self.work  # where remote trees go (a journaled image, see setup)
        self.remote_fs_text = "the work directory's file system (this VM's root: ext4 " \
            "without a journal)"
        self._mounts = contextlib.ExitStack()

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        peers.ensure_peer_tools()
        if self.s.remote_fs == "image":
            self._remote_on_image()
        self.sshd.start()
        if LSYNC in self.s.systems:
            self.lsync_ok, self.lsync_reason = lsync_available()
        base = self.tree_dir(self.s.tree)
        if any(self.wants(x) for x in ("a", "b", "e", "h", "bytes", "watch")):
            mirror(base, self.src, checksum=False)
            self._write_extras(self.src)
            self.tree_files = [f for f in trees.walk_files(self.src)
                               if not f.startswith(EXTRA_DIR + "/")]

    def _remote_on_image(self) -> None:
        """Remote trees on a journaled ext4 image (benchmarks.testbed.remotefs), for rsync
        and lsync alike; where none can be made, in the work directory, and the report says
        so."""
        usable, why = remotefs.available()
        if usable:
            try:
                self.remote_base = self._mounts.enter_context(remotefs.journaled_fs(self.work))
            except (OSError, subprocess.CalledProcessError) as exc:
                usable, why = False, f"it could not be made: {exc}"
        if not usable:
            self.remote_fs_text += f"; no journaled image: {why}"
            say(f"remote trees in the work directory: {why}")
            return
        self.remote = self.remote_base / "remote"
        self._remotes = [self.remote]
        self.remote_fs_text = ("a journaled ext4 file system (mkfs.ext4's defaults, a "
                               "loop-mounted sparse image): see benchmarks/testbed/remotefs.py")

    def tree_dir(self, preset: str) -> Path:
        """The cached, pristine copy of a tree (made on first use). Read-only. The `kernel`
        preset is the real kernel's work tree when the settings say so."""
        if preset == "kernel" and self.s.real_kernel:
            return self.real_kernel_dir()
        generator = Path(trees.__file__).read_bytes()
        tag = hashlib.sha256(generator).hexdigest()[:12]
        root = self.s.cache_dir / "trees" / f"{preset}-seed0"
        stamp = root.with_name(root.name + ".stamp")
        if stamp.exists() and root.is_dir():
            lines = stamp.read_text().split()
            if len(lines) == 4 and lines[0] == tag:
                self.tree_info[preset] = trees.TreeStats(preset, 0, int(lines[1]),
                                                         int(lines[2]), int(lines[3]), 0.0)
                return root
        shutil.rmtree(root, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        stats = trees.generate(preset, root)
        stamp.write_text(f"{tag} {stats.files} {stats.dirs} {stats.bytes}\n")
        self.tree_info[preset] = stats
        say(f"tree {preset}: {stats.files} files, {stats.bytes / 1e6:.1f} MB, generated in "
            f"{stats.seconds:.1f} s into {root}")
        return root

    def real_kernel_dir(self) -> Path:
        """A git work tree of the real kernel's first release (`kernel_material.TAGS[0]`),
        cloned (objects shared) from the prepared repository, which is downloaded and built
        on first use; cached with a stamp of its counts, like the generated trees."""
        tag = kernel_material.TAGS[0]
        root = self.s.cache_dir / "trees" / f"kernel-real-{tag}"
        stamp = root.with_name(root.name + ".stamp")
        if stamp.exists() and (root / VCS_DIR).is_dir():
            fields = stamp.read_text().split()
            if len(fields) == 5 and fields[0] == tag and fields[4] == COUNT_VERSION:
                self.tree_info["kernel"] = trees.TreeStats(
                    "kernel", 0, int(fields[1]), int(fields[2]), int(fields[3]), 0.0)
                return root
            if fields and fields[0] == tag:  # complete (the stamp comes last): count again
                stats = count_tree(root, "kernel", 0.0)
                stamp.write_text(f"{tag} {stats.files} {stats.dirs} {stats.bytes} "
                                 f"{COUNT_VERSION}\n")
                self.tree_info["kernel"] = stats
                return root
        started = time.monotonic()
        material = kernel_material.prepare(full=True)
        shutil.rmtree(root, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        kernel_material.checkout_copy(material, root, tag)
        stats = count_tree(root, "kernel", time.monotonic() - started)
        stamp.write_text(f"{tag} {stats.files} {stats.dirs} {stats.bytes} {COUNT_VERSION}\n")
        self.tree_info["kernel"] = stats
        say(f"tree kernel: Linux {tag}, {stats.files} files, {stats.bytes / 1e6:.1f} MB, "
            f"checked out in {stats.seconds:.1f} s into {root}")
        return root

    def _write_extras(self, root: Path) -> None:
        big = root / BIG_FILE
        big.parent.mkdir(parents=True, exist_ok=True)
        big.write_bytes(trees.text_of_size(TEN_MB, seed=1, name=BIG_FILE))
        (root / INSERT_FILE).write_bytes(trees.text_of_size(TEN_MB, seed=2, name=INSERT_FILE))
        (root / SMALL_FILE).write_bytes(trees.text_of_size(20_000, seed=3, name=SMALL_FILE))
        rng = random.Random("rename-dir")
        lo, hi = (200, 4_000) if self.s.short else (1_000, 30_000)
        d = root / RENAME_A
        for i in range(self.s.rename_files):
            sub = d / f"sub{i % 10}"
            sub.mkdir(parents=True, exist_ok=True)
            rel = f"{RENAME_A}/sub{i % 10}/file{i:04d}.c"
            (root / rel).write_bytes(trees.text_of_size(rng.randint(lo, hi), seed=4, name=rel))

    def cleanup(self) -> None:
        self.sshd.stop()
        self._mounts.close()  # (the image: unmounted and deleted, whatever --keep says)
        if not self.s.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        for trash in {self.remote.parent / TRASH, self.local.parent / TRASH}:
            shutil.rmtree(trash, ignore_errors=True)
            self._forget_agent_records()

    def _forget_agent_records(self) -> None:
        """Delete the digest records lsync's agent kept for this run's remote trees (the
        trees are gone, so are their records: about 20 MB for the kernel tree)."""
        for root in self._remotes:
            for path in agent_record_files(root):
                path.unlink(missing_ok=True)

    def fresh_remote(self, name: str) -> Path:
        """A remote root lsync's agent has never seen: a new path (its records are named after
        the path), with no records under that name either way; not created."""
        path = self.remote_base / "remotes" / name
        n = 1
        while path.exists() or path in self._remotes:
            n += 1
            path = self.remote_base / "remotes" / f"{name}-{n}"
        for record in agent_record_files(path):
            record.unlink(missing_ok=True)
        self._remotes.append(path)
        return path

    def reset(self, remote_empty: bool = False) -> None:
        """local := src and remote := src (or empty), by content, without any ssh."""
        mirror(self.src, self.local)
        if remote_empty:
            empty_dir(self.remote)
        else:
            mirror(self.src, self.remote)

    @contextlib.contextmanager
    def link(self, spec: LinkSpec,
             remote: Path | None = None) -> Iterator[tuple[Link, ThreadedProxy]]:
        """A fresh delay proxy in front of the sshd; the Link's tree is `remote` (default
        the bench's remote directory). Every measured step opens one, after the disks
        settled."""
        rate = spec.cap_mbit * 1e6 if spec.cap_mbit else None
        # What the steps before wrote goes to disk first (a kernel tree is 1.3 GB): its
        # writeback would otherwise run during this step and take its CPU.
        os.sync()
        with ThreadedProxy(("127.0.0.1", self.sshd.port), spec.delay, rate_bps=rate) as proxy:
            cfg = self.sshd.write_client_config(port=proxy.port)
            yield Link(cfg, self.sshd.alias, remote or self.remote), proxy

    def lsync(self, link: Link, local: Path | None = None, name: str = "lsync",
              extra_args: Sequence[str] = (), verbose: bool = True,
              cache_home: Path | None = None) -> LsyncWatcher:
        wd = self.work / "peer-work" / name
        return LsyncWatcher(local or self.local, link, wd, extra_args=extra_args,
                            verbose=verbose,
                            cache_home=cache_home or self.work / "lsync-cache" / "shared")

    def watcher(self, system: str, link: Link) -> Watcher:
        wd = self.work / "peer-work" / system.replace("+", "-")
        if system == LSYNC:
            return self.lsync(link)
        if system == SCRIPT_CM:
            return peers.BlogScript(self.local, link, wd, control_master=True)
        if system == SCRIPT:
            return peers.BlogScript(self.local, link, wd, control_master=False)
        if system == LSYNCD:
            return peers.Lsyncd(self.local, link, wd, delay=0)
        raise ValueError(system)

    def runnable(self, system: str) -> bool:
        return system in self.s.systems and (system != LSYNC or self.lsync_ok)

    def wants(self, scenario: str) -> bool:
        return scenario in self.s.scenarios

    def failed(self, system: str, where: str, exc: Exception) -> None:
        """Record why a system failed (its log tail), for the report's notes."""
        text = " ".join(str(exc).split())
        self.notes.append(f"{system} failed in {where}: {text[-400:]}")
        say(f"{system} failed in {where}: {text[-400:]}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"note: {text}")

    def goal(self, figure: str, spec: LinkSpec, target: str, lsync: str, rsync: str = "—",
             ratio: float | None = None, ok: bool | None = None,
             cpu: CpuUse | None = None) -> Goal:
        """Record one row of the targets table (issues 10 and 16)."""
        g = Goal(goal_order(figure), figure, spec.label, target, lsync, rsync,
                 "—" if ratio is None else f"{ratio:.2f}", ok, cpu)
        self.goals.append(g)
        return g

    def row(self, scenario: str, spec: LinkSpec | str, target: str = "—",
            ratios: bool = True) -> Row:
        label = spec if isinstance(spec, str) else spec.label
        r = Row(scenario, label, target, ratios=ratios)
        self.rows.append(r)
        return r
