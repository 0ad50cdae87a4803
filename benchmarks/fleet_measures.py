"""The measurements of benchmarks.fleet, each on a running session of benchmarks.fleet_testbed.

`measure_saves`: one-line saves, each polled every ~1 ms until byte-identical on every host
(`Saves`: until the last host, and per host); `measure_reads`: the clients' read bytes
(`rchar`) per save of a 512 KB file; `measure_idle_flush`: flushes with nothing pending
(control-socket requests and `lsync flush` commands) and the bytes through the proxies
meanwhile; `measure_burst`: a flush right after many new files, every file checked after;
`measure_initial`: spawn -> `ready` and the clients' CPU there; `measure_frozen`: saves
while one host's proxy is frozen, and how long until that host caught up. `Results` holds
what one run measured, for the table (benchmarks.fleet_table). A measurement that cannot
go on raises `BenchError`. Split from benchmarks/fleet.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procstat
from benchmarks.fleet_testbed import NAMES, BenchError, Client, Testbed, session
from benchmarks.lsync_runner import lsync_command
from benchmarks.peers import RemoteFile, save_file
from benchmarks.testbed import trees
from lsync.client.buildloop.control import request

EDIT_FILES = 40  # 20 KB files edited in turn by the saves
EDIT_SIZE = 20_000
READ_FILE = "big/read-512k.c"  # edited by the rchar saves
READ_SIZE = 512_000
SPACING = 0.3  # seconds from one save to the next (at least)
READ_SPACING = 1.0  # the same for the saves whose reads are counted
SAVE_TIMEOUT = 20.0
FLUSH_TIMEOUT = 120.0
CATCH_UP_TIMEOUT = 90.0


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


async def flush(socket: Path, timeout: float) -> None:
    """One flush request on the control socket at `socket`."""
    await request(socket, {"v": 1, "op": "flush", "timeout": timeout}, timeout + 10)


def write_files(local: Path, contents: Sequence[tuple[str, bytes]]) -> None:
    """A burst: every (path, content) written at once below `local`."""
    for rel, data in contents:
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def flush_request(client: Client, timeout: float = FLUSH_TIMEOUT) -> float:
    """Seconds a flush request on the control socket took."""
    socket = client.socket()
    t0 = time.perf_counter()
    asyncio.run(flush(socket, timeout))
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
    write_files(local, contents)
    t1 = time.perf_counter()
    asyncio.run(flush(socket, FLUSH_TIMEOUT))
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
