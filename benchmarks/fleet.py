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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import agent_record_files, default_cache_dir, percentile, say
from benchmarks.lsync_runner import lsync_command
from benchmarks.peers import RemoteFile, save_file
from benchmarks.run import machine_description
from benchmarks.testbed import trees
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.buildloop.control import request
from lsync.client.buildloop.controlpath import find_socket

NAMES = ("x86", "arm", "box3")
ONE, FLEET, THREE = "one", "fleet", "three"
EDIT_FILES = 40  # 20 KB files edited in turn by the saves
EDIT_SIZE = 20_000
READ_FILE = "big/read-512k.c"  # edited by the rchar saves
READ_SIZE = 512_000
SPACING = 0.3  # seconds from one save to the next (at least)
READ_SPACING = 1.0  # the same for the saves whose reads are counted
SAVE_TIMEOUT = 20.0
READY_TIMEOUT = 600.0
FLUSH_TIMEOUT = 120.0
CATCH_UP_TIMEOUT = 90.0


class BenchError(RuntimeError):
    """A session did not start, a save never landed, a flush failed."""


# -- the testbed ------------------------------------------------------------------------------


@dataclass
class Testbed:
    work: Path
    delay: float
    proxies: dict[str, ThreadedProxy]
    config: Path
    remotes_made: list[Path] = field(default_factory=list)
    runs: int = 0

    def remotes(self, tag: str) -> dict[str, Path]:
        """A fresh (not yet existing) remote directory per host."""
        self.runs += 1
        out = {name: self.work / "remote" / f"{self.runs:02d}-{tag}-{name}" for name in NAMES}
        self.remotes_made += out.values()
        return out

    def bytes_total(self) -> int:
        return sum(p.counters().bytes_total for p in self.proxies.values())


@contextlib.contextmanager
def testbed(work: Path, delay: float) -> Iterator[Testbed]:
    with contextlib.ExitStack() as stack:
        sshd = stack.enter_context(PrivateSshd(work / "sshd"))
        proxies = {name: stack.enter_context(
            ThreadedProxy(("127.0.0.1", sshd.port), delay, handshake=True)) for name in NAMES}
        parts = [sshd.write_client_config(work / "sshd" / f"ssh_config.{name}", port=p.port,
                                          alias=name).read_text()
                 for name, p in proxies.items()]
        config = work / "ssh_config"
        config.write_text("\n".join(parts))
        bed = Testbed(work, delay, proxies, config)
        try:
            yield bed
        finally:
            for remote in bed.remotes_made:  # the agent's records of each remote tree
                for path in agent_record_files(remote):
                    path.unlink(missing_ok=True)


class Client:
    """One `lsync connect` process; its output lines are read (with their time) by a thread,
    and its CPU is read at its first `ready` line."""

    def __init__(self, targets: Sequence[str], config: Path, local: Path, cache: Path,
                 log: Path) -> None:
        self.local = local
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        self.env["XDG_CACHE_HOME"] = str(cache)
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self.ready_cpu: float | None = None
        self._cond = threading.Condition()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*lsync_command(), "connect", "-F", str(config), *targets, "--local", str(local)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "a") as log:
            for line in self.proc.stdout:
                now = time.perf_counter()
                if self.ready_cpu is None and " ready files=" in line:
                    with contextlib.suppress(procstat.ProcessGone):
                        self.ready_cpu = procstat.cpu_seconds(self.proc.pid)
                log.write(line)
                log.flush()
                with self._cond:
                    self.lines.append((now, line.rstrip("\n")))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, needle: str, timeout: float) -> float:
        """perf_counter() at the first output line containing `needle`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, line in self.lines:
                    if needle in line:
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise BenchError(f"no line with {needle!r} (exit {self.proc.poll()}): "
                                     + " | ".join(line for _, line in self.lines[-8:]))
                self._cond.wait(min(left, 0.1))

    def saw(self, needle: str) -> bool:
        with self._cond:
            return any(needle in line for _, line in self.lines)

    def rchar(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise BenchError("no rchar in /proc/PID/io")

    def socket(self) -> Path:
        saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XDG_RUNTIME_DIR")}
        os.environ["XDG_CACHE_HOME"] = str(self.cache)  # where find_socket looks
        os.environ.pop("XDG_RUNTIME_DIR", None)
        try:
            found = find_socket(self.local)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if found is None:
            raise BenchError("the session has no control socket")
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: drain, goodbye, exit 0
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def session(bed: Testbed, mode: str, local: Path, tag: str
            ) -> Iterator[tuple[list[Client], dict[str, Path]]]:
    """Start `mode`'s clients on `local` (fresh remotes, cold hash caches); yield them once
    each said `ready`, with the remote directory of every host they sync."""
    remotes = bed.remotes(tag)
    hosts = [NAMES[0]] if mode == ONE else list(NAMES)
    groups = [hosts] if mode != THREE else [[name] for name in hosts]
    base = bed.work / "clients" / f"{bed.runs:02d}-{tag}"
    base.mkdir(parents=True)
    clients: list[Client] = []
    try:
        for i, group in enumerate(groups):
            clients.append(Client([f"{name}:{remotes[name]}" for name in group], bed.config,
                                  local, base / f"cache{i}", base / f"lsync{i}.log"))
        for client in clients:
            client.wait_line(" ready files=", READY_TIMEOUT)
        yield clients, {name: remotes[name] for name in hosts}
    finally:
        for client in clients:
            code = client.stop()
            if code != 0:
                say(f"{tag}: lsync exited {code}; see {client.log}")


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Saves:
    last: list[float] = field(default_factory=list)  # seconds until the last host had it
    per_host: dict[str, list[float]] = field(default_factory=dict)
    missed: int = 0


def one_save(local: Path, rel: str, data: bytes, remotes: dict[str, Path],
             timeout: float = SAVE_TIMEOUT) -> tuple[float, dict[str, float]]:
    """Save `data`; (perf_counter() of the save, seconds until each host had it)."""
    waiting = {name: RemoteFile(root / rel, data) for name, root in remotes.items()}
    t0 = save_file(local / rel, data)
    got: dict[str, float] = {}
    while waiting:
        now = time.perf_counter()
        for name in [n for n, r in waiting.items() if r.identical(now)]:
            got[name] = now - t0
            del waiting[name]
        if now - t0 > timeout:
            break
        time.sleep(0.001)
    return t0, got


def measure_saves(local: Path, files: Sequence[str], remotes: dict[str, Path], count: int,
                  seed: int) -> Saves:
    out = Saves(per_host={name: [] for name in remotes})
    next_at = 0.0
    for i in range(count):
        rel = files[i % len(files)]
        data = trees.one_line_edit((local / rel).read_bytes(), seed=seed + i)
        with contextlib.suppress(ValueError):
            time.sleep(max(0.0, next_at - time.perf_counter()))
        t0, got = one_save(local, rel, data, remotes)
        for name, seconds in got.items():
            out.per_host[name].append(seconds)
        if len(got) == len(remotes):
            out.last.append(max(got.values()))
        else:
            out.missed += 1
        next_at = max(t0 + SPACING, t0 + max(got.values(), default=0.0) + 0.05)
    return out


def wait_quiet(bed: Testbed, quiet: float, limit: float = 30.0) -> None:
    """Until no byte has crossed any proxy for `quiet` seconds (acks home, pings done)."""
    deadline = time.monotonic() + limit
    last, since = bed.bytes_total(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        total = bed.bytes_total()
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def measure_reads(bed: Testbed, clients: Sequence[Client], local: Path,
                  remotes: dict[str, Path], count: int) -> float:
    """The clients' read bytes (summed) per save of the 512 KB file, acks included: saves
    READ_SPACING apart (each one followed by the quiet in which lsync checks the directory
    it touched), the last one's check waited for (the proxies quiet, then a flush)."""
    wait_quiet(bed, 2 * bed.delay + 0.1)
    before = sum(c.rchar() for c in clients)
    next_at = 0.0
    for i in range(count):
        data = trees.one_line_edit((local / READ_FILE).read_bytes(), seed=7_000 + i)
        with contextlib.suppress(ValueError):
            time.sleep(max(0.0, next_at - time.perf_counter()))
        t0, got = one_save(local, READ_FILE, data, remotes)
        if len(got) != len(remotes):
            raise BenchError(f"save {i} of {READ_FILE} reached only {sorted(got)}")
        next_at = t0 + READ_SPACING
    with contextlib.suppress(ValueError):
        time.sleep(max(0.0, next_at - time.perf_counter()))
    wait_quiet(bed, 2 * bed.delay + 0.1)
    return (sum(c.rchar() for c in clients) - before) / count


async def _flush(socket: Path, timeout: float) -> None:
    await request(socket, {"v": 1, "op": "flush", "timeout": timeout}, timeout + 10)


def flush_request(client: Client, timeout: float = FLUSH_TIMEOUT) -> float:
    """Seconds a flush request on the control socket took."""
    socket = client.socket()
    t0 = time.perf_counter()
    asyncio.run(_flush(socket, timeout))
    return time.perf_counter() - t0


@dataclass
class IdleFlush:
    request_ms: list[float]
    command_ms: list[float]
    request_bytes: int  # through every proxy while a request was open (summed)
    command_bytes: int  # the same while a command ran (each ~0.5 s: Python's start-up)
    idle_bytes: int  # in a window as long as the commands took, right after, no flush


def measure_idle_flush(bed: Testbed, client: Client, count: int) -> IdleFlush:
    """Flushes with nothing pending, and the bytes through the proxies meanwhile. The links
    ping when nothing moved for 5 s (lsync.client.transport.link.PING_EVERY), so a window of
    the same length without a flush is measured too: bytes there are pings, not flushes."""
    flush_request(client)  # everything is on the remote: from here, nothing pends
    wait_quiet(bed, 2 * bed.delay + 0.1)
    requests, commands = [], []
    request_bytes = command_bytes = 0
    for _ in range(count):
        before = bed.bytes_total()
        requests.append(flush_request(client) * 1000)
        request_bytes += bed.bytes_total() - before
    began = time.perf_counter()
    for _ in range(max(3, count // 3)):
        before = bed.bytes_total()
        t0 = time.perf_counter()
        done = subprocess.run([*lsync_command(), "flush", "--timeout", "30"], cwd=client.local,
                              env=client.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=False, timeout=60)
        commands.append((time.perf_counter() - t0) * 1000)
        command_bytes += bed.bytes_total() - before
        if done.returncode != 0:
            raise BenchError(f"lsync flush exited {done.returncode}: {done.stderr[-300:]}")
    took = time.perf_counter() - began
    before = bed.bytes_total()
    time.sleep(took)  # a window of idle time, measured; not a wait for a condition
    return IdleFlush(requests, commands, request_bytes, command_bytes,
                     bed.bytes_total() - before)


@dataclass
class Burst:
    flush_s: float  # from the last file written to the flush's return
    write_s: float  # writing the files
    missing: int  # files not identical on some host after the flush
    cpu_s: float = 0.0  # the client's CPU from the first file written to the flush's return


def measure_burst(client: Client, local: Path, remotes: dict[str, Path], files: int,
                  tag: str) -> Burst:
    """`files` new 2 KB C files written at once, then a flush; every file then checked."""
    # (One seed: the text generator builds a pool of lines per seed.)
    rels = [f"burst-{tag}/d{i // 100:02d}/f{i:04d}.c" for i in range(files)]
    contents = [(rel, trees.text_of_size(2_000, name=rel)) for rel in rels]
    socket = client.socket()
    cpu = procstat.cpu_seconds(client.proc.pid)
    t0 = time.perf_counter()
    for rel, data in contents:
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    t1 = time.perf_counter()
    asyncio.run(_flush(socket, FLUSH_TIMEOUT))
    t2 = time.perf_counter()
    cpu = procstat.cpu_seconds(client.proc.pid) - cpu
    missing = sum(1 for root in remotes.values() for rel, data in contents
                  if not (root / rel).is_file() or (root / rel).read_bytes() != data)
    return Burst(t2 - t1, t1 - t0, missing, cpu)


@dataclass
class Initial:
    wall: float  # spawn -> every client's ready line (the last one)
    cpu: float  # the clients' CPU at their ready lines, summed


def measure_initial(bed: Testbed, mode: str, tree: Path) -> Initial:
    with session(bed, mode, tree, f"initial-{mode}") as (clients, _remotes):
        wall = max(c.wait_line(" ready files=", 1) - c.started for c in clients)
        cpu = sum(c.ready_cpu or 0.0 for c in clients)
    return Initial(wall, cpu)


@dataclass
class Frozen:
    saves: Saves
    caught_up_s: float | None  # freeze -> a flush of every target returned
    reconnected: bool


def measure_frozen(bed: Testbed, client: Client, local: Path, files: Sequence[str],
                   remotes: dict[str, Path], count: int, catch_up: bool) -> Frozen:
    frozen = NAMES[-1]
    live = {name: root for name, root in remotes.items() if name != frozen}
    t0 = time.perf_counter()
    if bed.proxies[frozen].freeze() == 0:
        raise BenchError(f"{frozen}'s proxy had no connection to freeze")
    saves = measure_saves(local, files, live, count, seed=5_000)
    caught: float | None = None
    if catch_up:
        with contextlib.suppress(Exception):
            flush_request(client, CATCH_UP_TIMEOUT)
            caught = time.perf_counter() - t0
    return Frozen(saves, caught, client.saw(f"{frozen}: disconnected"))


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    saves: dict[str, Saves] = field(default_factory=dict)
    reads: dict[str, float] = field(default_factory=dict)
    idle: dict[str, IdleFlush] = field(default_factory=dict)
    bursts: dict[str, list[Burst]] = field(default_factory=dict)
    initial: dict[str, Initial] = field(default_factory=dict)
    initial_files: int = 0
    burst_files: int = 0
    loads: list[float] = field(default_factory=list)  # load average before each step
    frozen: Frozen | None = None
    notes: list[str] = field(default_factory=list)


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


# -- the table --------------------------------------------------------------------------------


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


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "client",
                            "agent", "protocol"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return (head or "?") + (" + uncommitted changes in client/agent/protocol" if dirty else "")


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
        print(f"Run {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min, lsync at {commit()}; "
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
