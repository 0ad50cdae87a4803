"""One command for the high-latency benchmark: ``python -m benchmarks.run [--short]``.

It installs what the peers need (Debian packages), starts a private sshd on 127.0.0.1, puts
the delay proxy in front of it, writes a deterministic tree, and runs issue 4's scenarios for
lsync and its peers on the same link in the same run, at RTT 0 and RTT 300 ms:

  a. one save -> remote copy identical, p50/p95/max, truncate-and-write and temp-then-rename
     saves (and for lsync save -> acknowledgement);
  b. a burst of 1,000 rewritten files -> all identical;
  c. initial sync into an empty remote (also with a 100 Mbit/s cap at RTT 300 ms);
  e. a one-line edit in a 10 MB file: bytes on the wire (the proxy's counters) and time.

It prints a Markdown table and writes it into benchmarks/README.md with the date, the
machine and the ratios lsync/peer. lsync itself is driven as a subprocess
(``lsync connect -F cfg alias:dir --local dir -v``) by `LsyncWatcher`, the one place where
lsync plugs in; when lsync cannot be imported its column says "not run".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import peers
from benchmarks.peers import Link, PeerError, SaveMode, Watcher
from benchmarks.testbed import trees
from benchmarks.testbed.proxy import ThreadedProxy, self_check
from benchmarks.testbed.sshd import PrivateSshd

README = Path(__file__).with_name("README.md")
RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"
BIG_FILE = "lsync-bench/big-10mb.c"

LSYNC = "lsync"
RSYNC = "rsync"
SCRIPT_CM = "script+CM"
SCRIPT = "script"
LSYNCD = "lsyncd"
SYSTEMS = (LSYNC, RSYNC, SCRIPT_CM, SCRIPT, LSYNCD)
WATCHERS = (LSYNC, SCRIPT_CM, SCRIPT, LSYNCD)


# =============================================================================================
# lsync adapter: the plug-in point for lsync itself.
# It runs `lsync connect -F <cfg> <alias>:<remote dir> --local <dir> -v` with stdout piped and
# follows its log lines (see notes/contract.md):
#   <iso-time> ready files=N bytes=M          once the initial sync is acknowledged
#   <iso-time> ack <path> ms=<latency>        per acknowledged write (with -v)
# Stopping sends SIGINT (lsync drains, says goodbye, exits 0).
# =============================================================================================

_READY_RE = re.compile(r"^\S+ ready files=(\d+) bytes=(\d+)")
_ACK_RE = re.compile(r"^\S+ ack (.+) ms=([0-9.]+)\s*$")


def lsync_command() -> list[str]:
    """argv prefix that runs the lsync CLI with this interpreter."""
    return [sys.executable, "-m", "lsync.client.cli"]


def lsync_available() -> tuple[bool, str]:
    """Whether lsync's CLI imports here (checked in a subprocess: it may be half-written)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import lsync.client.cli"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    if proc.returncode == 0:
        return True, ""
    last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return False, last


class LsyncWatcher:
    """lsync as a `Watcher`: start() returns at its "ready" line; acks are recorded."""

    name = LSYNC

    def __init__(self, local_dir: Path, link: Link, workdir: Path,
                 extra_args: Sequence[str] = ()) -> None:
        self.local_dir = local_dir
        self.link = link
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.log = workdir / "lsync.log"
        self.ready_at: float | None = None
        self.started_at = 0.0
        self.ready_files = 0
        self.ready_bytes = 0
        self._acks: list[tuple[float, str, float]] = []  # (perf_counter, path, lsync's ms)
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def argv(self) -> list[str]:
        return [*lsync_command(), "connect", "-F", str(self.link.ssh_config),
                f"{self.link.alias}:{self.link.remote_dir}", "--local", str(self.local_dir),
                "-v", *self.extra_args]

    def start(self, timeout: float = 600.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.perf_counter()
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.ready_at is None:
                if self._proc.poll() is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
        if self.ready_at is None:
            self.stop()
            tail = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
            raise PeerError("start-timeout", f"lsync not ready: {tail}")

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log, "a") as log:
            for line in self._proc.stdout:
                now = time.perf_counter()
                log.write(line)
                log.flush()
                if m := _ACK_RE.match(line):
                    with self._cond:
                        self._acks.append((now, m.group(1), float(m.group(2))))
                        self._cond.notify_all()
                elif m := _READY_RE.match(line):
                    with self._cond:
                        self.ready_at = now
                        self.ready_files, self.ready_bytes = int(m.group(1)), int(m.group(2))
                        self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ack(self, rel: str, after: float, timeout: float) -> float | None:
        """perf_counter() of the first ack line for `rel` read after `after`, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, path, _ms in self._acks:
                    if t >= after and path == rel:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.05))

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 2)  # SIGINT: drain, goodbye, exit 0
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)


# =============================================================================================
# Settings, links and the shared state of one run
# =============================================================================================


@dataclass
class Settings:
    short: bool
    tree: str
    rtts_ms: list[float]
    systems: list[str]
    saves: int
    burst: int
    cap_mbit: float
    save_timeout: float
    burst_timeout: float
    abort_after_misses: int
    initial_trees: list[str]
    write_readme: bool
    keep: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        short = bool(args.short)
        systems = args.systems.split(",") if args.systems else list(SYSTEMS)
        unknown = sorted(set(systems) - set(SYSTEMS))
        if unknown:
            raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
        tree = args.tree or ("tiny" if short else "small")
        initial = [tree] if short or tree == "kernel" else [tree, "kernel"]
        if args.no_kernel:
            initial = [t for t in initial if t != "kernel"] or [tree]
        return cls(
            short=short,
            tree=tree,
            rtts_ms=[float(x) for x in args.rtt_ms.split(",")],
            systems=systems,
            saves=args.saves or (4 if short else 20),
            burst=args.burst or (50 if short else 1000),
            cap_mbit=args.cap_mbit,
            save_timeout=10.0 if short else 20.0,
            burst_timeout=10.0 if short else 180.0,
            abort_after_misses=1 if short else 3,
            initial_trees=initial,
            write_readme=not args.no_readme,
            keep=args.keep,
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


@dataclass
class Cell:
    """One measured value for one system in one row (display text plus a number to compare)."""

    text: str
    value: float | None = None  # seconds or bytes (p50 for latencies): ratios and targets
    p95: float | None = None
    target_ok: bool | None = None


@dataclass
class Row:
    scenario: str
    link: str
    unit: str
    cells: dict[str, Cell] = field(default_factory=dict)


class Bench:
    """Owns the work directory, the sshd, the trees and the rows measured so far."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.work = Path(tempfile.mkdtemp(prefix="lsync-bench-"))
        self.sshd = PrivateSshd(self.work / "sshd")
        self.rows: list[Row] = []
        self.src = self.work / "src"
        self.local = self.work / "local"
        self.remote = self.work / "remote"
        self.lsync_ok, self.lsync_reason = (False, "not selected")
        self.tree_files: list[str] = []
        self.notes: list[str] = []

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        peers.ensure_peer_tools()
        self.sshd.start()
        if LSYNC in self.s.systems:
            self.lsync_ok, self.lsync_reason = lsync_available()
        stats = trees.generate(self.s.tree, self.src)
        big = self.src / BIG_FILE
        big.parent.mkdir(parents=True, exist_ok=True)
        big.write_bytes(trees.text_of_size(10_000_000, seed=1, name=BIG_FILE))
        self.tree_files = [f for f in trees.walk_files(self.src) if f != BIG_FILE]
        say(f"tree {stats.preset}: {stats.files} files, {stats.bytes / 1e6:.1f} MB "
            f"(+ 10 MB file) in {stats.seconds:.1f} s; work dir {self.work}")

    def cleanup(self) -> None:
        self.sshd.stop()
        if not self.s.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def reset(self, remote_empty: bool = False) -> None:
        """local := src and remote := src (or empty), by content, without any ssh."""
        mirror(self.src, self.local)
        if remote_empty:
            shutil.rmtree(self.remote, ignore_errors=True)
            self.remote.mkdir()
        else:
            mirror(self.src, self.remote)

    @contextlib.contextmanager
    def link(self, spec: LinkSpec) -> Iterator[tuple[Link, ThreadedProxy]]:
        rate = spec.cap_mbit * 1e6 if spec.cap_mbit else None
        with ThreadedProxy(("127.0.0.1", self.sshd.port), spec.delay, rate_bps=rate) as proxy:
            cfg = self.sshd.write_client_config(port=proxy.port)
            yield Link(cfg, self.sshd.alias, self.remote), proxy

    def watcher(self, system: str, link: Link) -> Watcher:
        wd = self.work / "peer-work" / system.replace("+", "-")
        if system == LSYNC:
            return LsyncWatcher(self.local, link, wd)
        if system == SCRIPT_CM:
            return peers.BlogScript(self.local, link, wd, control_master=True)
        if system == SCRIPT:
            return peers.BlogScript(self.local, link, wd, control_master=False)
        if system == LSYNCD:
            return peers.Lsyncd(self.local, link, wd, delay=0)
        raise ValueError(system)

    def runnable(self, system: str) -> bool:
        return system in self.s.systems and (system != LSYNC or self.lsync_ok)

    def failed(self, system: str, where: str, exc: Exception) -> None:
        """Record why a system failed (its log tail), for the report's notes."""
        text = " ".join(str(exc).split())
        self.notes.append(f"{system} failed in {where}: {text[-400:]}")
        say(f"{system} failed in {where}: {text[-400:]}")

    def row(self, scenario: str, spec: LinkSpec, unit: str) -> Row:
        r = Row(scenario, spec.label, unit)
        self.rows.append(r)
        return r


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def mirror(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` by content (local rsync, checksums: same-second edits too)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rsync", "-a", "--delete", "--checksum", f"{src}/", f"{dst}/"], check=True)


def wait_quiet(proxy: ThreadedProxy, quiet: float, limit: float = 30.0) -> None:
    """Wait until no byte has crossed the proxy for `quiet` seconds (peers settled)."""
    deadline = time.monotonic() + limit
    last = proxy.counters().bytes_total
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now_total = proxy.counters().bytes_total
        if now_total != last:
            last, since = now_total, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def quiet_for(spec: LinkSpec) -> float:
    return max(0.15, 2 * spec.rtt_ms / 1000.0)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def fmt_ms(values: Sequence[float], missed: int, total: int) -> Cell:
    if not values:
        return Cell(f"never ({missed}/{total} missed)")
    p50, p95, worst = (percentile(values, q) * 1000 for q in (0.5, 0.95, 1.0))
    text = f"{p50:.0f} / {p95:.0f} / {worst:.0f}"
    if missed:
        text += f" ({missed}/{total} missed)"
    return Cell(text, value=p50 / 1000, p95=p95 / 1000)


def fmt_seconds(seconds: float | None, note: str = "") -> Cell:
    if seconds is None:
        return Cell(note or "failed")
    return Cell(f"{seconds:.2f}" + (f" {note}" if note else ""), value=seconds)


def fmt_bytes(nbytes: int, seconds: float | None) -> Cell:
    t = "never" if seconds is None else f"{seconds:.2f} s"
    return Cell(f"{nbytes / 1000:.1f} KB, {t}", value=float(nbytes))


# =============================================================================================
# Scenarios
# =============================================================================================


def new_content(bench: Bench, rel: str, seed: int) -> bytes:
    return trees.one_line_edit((bench.local / rel).read_bytes(), seed=seed)


def scenario_a_one_save(bench: Bench, spec: LinkSpec) -> None:
    """a. one save -> identical (p50/p95/max) for each kind of save; lsync also -> ack."""
    modes: tuple[SaveMode, ...] = peers.SAVE_MODES
    rows = {m: bench.row(f"a. one save, {m} (p50/p95/max ms)", spec, "ms") for m in modes}
    ack_row = bench.row("a. lsync save -> ack (p50/p95/max ms)", spec, "ms")
    for system in WATCHERS:
        if not bench.runnable(system):
            continue
        bench.reset()
        rng = random.Random(f"a:{system}:{spec.label}")
        files = rng.sample(bench.tree_files, min(len(bench.tree_files), 2 * bench.s.saves))
        with bench.link(spec) as (link, proxy):
            w = bench.watcher(system, link)
            try:
                w.start()
            except PeerError as exc:
                for m in modes:
                    rows[m].cells[system] = Cell(f"failed to start ({exc.code})")
                bench.failed(system, f"a {spec.label}", exc)
                continue
            try:
                acks: list[float] = []
                for mi, mode in enumerate(modes):
                    latencies: list[float] = []
                    missed = tried = 0
                    for i in range(bench.s.saves):
                        rel = files[(mi * bench.s.saves + i) % len(files)]
                        data = new_content(bench, rel, seed=i)
                        wait_quiet(proxy, quiet_for(spec))
                        t0 = peers.save_file(bench.local / rel, data, mode)
                        t1 = peers.wait_identical(bench.remote / rel, data, bench.s.save_timeout)
                        tried += 1
                        if t1 is None:
                            missed += 1
                        else:
                            latencies.append(t1 - t0)
                        if isinstance(w, LsyncWatcher):
                            ta = w.wait_ack(rel, t0, bench.s.save_timeout)
                            if ta is not None:
                                acks.append(ta - t0)
                        if not latencies and missed >= bench.s.abort_after_misses:
                            break
                        if not w.alive():
                            break
                    rows[mode].cells[system] = fmt_ms(latencies, missed, tried)
                    if not w.alive():
                        rows[mode].cells[system].text += " (exited)"
                        bench.notes.append(f"{system} exited during scenario a; see its log")
                        break
                    say(f"a {spec.label} {system} {mode}: {rows[mode].cells[system].text}")
                if isinstance(w, LsyncWatcher):
                    ack_row.cells[system] = fmt_ms(acks, 2 * bench.s.saves - len(acks),
                                                   2 * bench.s.saves)
            finally:
                w.stop()


def scenario_b_burst(bench: Bench, spec: LinkSpec) -> None:
    """b. N files rewritten at once (like a branch switch) -> all identical."""
    n = min(bench.s.burst, len(bench.tree_files))
    row = bench.row(f"b. burst of {n} files -> all identical (s)", spec, "s")
    rng = random.Random(f"b:{spec.label}")
    chosen = sorted(rng.sample(bench.tree_files, n))
    for system in (RSYNC, *WATCHERS):
        if not bench.runnable(system):
            continue
        bench.reset()
        with bench.link(spec) as (link, proxy):
            contents = [(rel, new_content(bench, rel, seed=7)) for rel in chosen]
            if system == RSYNC:
                for rel, data in contents:
                    peers.save_file(bench.local / rel, data)
                r = peers.rsync_push(bench.local, link, files=chosen, check=False)
                ok = all((bench.remote / rel).read_bytes() == data for rel, data in contents)
                row.cells[system] = fmt_seconds(r.seconds if ok else None,
                                                "" if ok else f"rsync exit {r.returncode}")
                say(f"b {spec.label} rsync: {row.cells[system].text}")
                continue
            w = bench.watcher(system, link)
            try:
                w.start()
            except PeerError as exc:
                row.cells[system] = Cell(f"failed to start ({exc.code})")
                bench.failed(system, f"{row.scenario[:2]} {spec.label}", exc)
                continue
            try:
                wait_quiet(proxy, quiet_for(spec))
                for rel, data in contents:
                    peers.save_file(bench.local / rel, data)
                t0 = time.perf_counter()
                res = peers.wait_all_identical(
                    [(bench.remote / rel, data) for rel, data in contents], t0,
                    bench.s.burst_timeout)
                if res.seconds is None:
                    row.cells[system] = Cell(
                        f"> {bench.s.burst_timeout:g} ({res.done}/{res.total} done)")
                else:
                    row.cells[system] = fmt_seconds(res.seconds)
                say(f"b {spec.label} {system}: {row.cells[system].text}")
            finally:
                w.stop()


def scenario_c_initial(bench: Bench, spec: LinkSpec, tree: str) -> None:
    """c. initial sync of the tree into an empty remote."""
    row = bench.row(f"c. initial sync, {tree} tree (s)", spec, "s")
    if tree == bench.s.tree:
        source = bench.src
    else:
        source = bench.work / f"src-{tree}"
        if not source.exists():
            stats = trees.generate(tree, source)
            say(f"tree {tree}: {stats.files} files, {stats.bytes / 1e6:.0f} MB "
                f"in {stats.seconds:.1f} s")
    for system in (LSYNC, RSYNC):
        if not bench.runnable(system):
            continue
        shutil.rmtree(bench.remote, ignore_errors=True)
        bench.remote.mkdir()
        with bench.link(spec) as (link, proxy):
            if system == RSYNC:
                r = peers.rsync_push(source, link, check=False)
                note = "" if r.returncode == 0 else f"(rsync exit {r.returncode})"
                row.cells[system] = fmt_seconds(r.seconds, note)
            else:
                w = LsyncWatcher(source, link, bench.work / "peer-work" / "lsync-initial")
                try:
                    w.start()
                    assert w.ready_at is not None
                    row.cells[system] = fmt_seconds(w.ready_at - w.started_at)
                except PeerError as exc:
                    row.cells[system] = Cell(f"failed ({exc.code})")
                    bench.failed(system, f"c {spec.label}", exc)
                finally:
                    w.stop()
            sent = proxy.counters()
            say(f"c {spec.label} {tree} {system}: {row.cells[system].text} "
                f"({sent.bytes_up / 1e6:.1f} MB up)")


def scenario_e_big_edit(bench: Bench, spec: LinkSpec) -> None:
    """e. one-line edit in a 10 MB file: bytes on the wire (both ways) and time."""
    row = bench.row("e. one-line edit, 10 MB file: bytes on wire, time", spec, "bytes")
    for system in (RSYNC, *WATCHERS):
        if not bench.runnable(system):
            continue
        bench.reset()
        data = new_content(bench, BIG_FILE, seed=11)
        with bench.link(spec) as (link, proxy):
            if system == RSYNC:
                peers.save_file(bench.local / BIG_FILE, data)
                proxy.reset_counters()
                r = peers.rsync_push(bench.local, link, files=[BIG_FILE], check=False)
                ok = (bench.remote / BIG_FILE).read_bytes() == data
                row.cells[system] = fmt_bytes(proxy.counters().bytes_total,
                                              r.seconds if ok else None)
                say(f"e {spec.label} rsync: {row.cells[system].text}")
                continue
            w = bench.watcher(system, link)
            try:
                w.start()
            except PeerError as exc:
                row.cells[system] = Cell(f"failed to start ({exc.code})")
                bench.failed(system, f"{row.scenario[:2]} {spec.label}", exc)
                continue
            try:
                wait_quiet(proxy, quiet_for(spec))
                proxy.reset_counters()
                seconds = peers.measure_save(bench.local / BIG_FILE, bench.remote / BIG_FILE,
                                             data, "truncate", bench.s.save_timeout * 3)
                wait_quiet(proxy, quiet_for(spec))
                row.cells[system] = fmt_bytes(proxy.counters().bytes_total, seconds)
                say(f"e {spec.label} {system}: {row.cells[system].text}")
            finally:
                w.stop()


# =============================================================================================
# Targets, ratios and the table
# =============================================================================================


def apply_targets(bench: Bench) -> None:
    """Mark lsync's cells against issue 4's targets (only where the issue sets one)."""
    for row in bench.rows:
        cell = row.cells.get(LSYNC)
        if cell is None or cell.value is None:
            continue
        rtt300 = row.link.startswith("RTT 300")
        rsync = row.cells.get(RSYNC)
        if row.scenario.startswith("a. one save") and rtt300 and cell.p95 is not None:
            cell.target_ok = cell.value <= 0.165 and cell.p95 <= 0.185
        elif row.scenario.startswith("a. lsync save -> ack") and rtt300:
            cell.target_ok = cell.value <= 0.320
        elif row.scenario.startswith("b. burst") and rtt300:
            cell.target_ok = cell.value <= 1.5
        elif row.scenario.startswith("c. initial") and rsync is not None and rsync.value:
            limit = 1.0 if not rtt300 else 0.5 if "Mbit" in row.link else 0.4
            cell.target_ok = cell.value <= limit * rsync.value
        if cell.target_ok is not None:
            cell.text += " ✓" if cell.target_ok else " ✗ target missed"


def render(bench: Bench) -> str:
    columns = [s for s in SYSTEMS if s in bench.s.systems or s == LSYNC]
    header = "| scenario | link | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    # Group by scenario (a, b, c, e); links stay in the order they ran (sort is stable).
    for row in sorted(bench.rows, key=lambda r: r.scenario):
        if not row.cells:
            continue
        lsync_value = row.cells[LSYNC].value if LSYNC in row.cells else None
        out = []
        for system in columns:
            cell = row.cells.get(system)
            if system == LSYNC and not bench.lsync_ok:
                out.append("not run")
            elif cell is None:
                out.append("—")
            else:
                text = cell.text
                if system != LSYNC and lsync_value and cell.value:
                    text += f" (lsync/peer {lsync_value / cell.value:.2f})"
                out.append(text)
        lines.append(f"| {row.scenario} | {row.link} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "missing"
    return ((proc.stdout + proc.stderr).strip().splitlines() or ["?"])[0]


def machine_description() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}; {_first_line(['ssh', '-V'])}; "
            f"{_first_line(['rsync', '--version'])}; lsyncd {_first_line(['lsyncd', '--version'])}")


def report(bench: Bench, proxy_check: str, started: dt.datetime) -> str:
    mode = "short" if bench.s.short else "full"
    lsync_note = "" if bench.lsync_ok else f" lsync not run: {bench.lsync_reason}."
    return "\n".join([
        f"Run {started:%Y-%m-%d %H:%M} UTC ({mode} mode, tree `{bench.s.tree}`, "
        f"{bench.s.saves} saves per kind, burst {bench.s.burst}).{lsync_note}",
        "",
        f"Machine: {machine_description()}",
        "",
        f"Delay proxy self-check: {proxy_check}",
        "",
        render(bench),
        "",
        "Times from the end of the save until the remote copy is byte-identical (polled every "
        "~1 ms). `script+CM` is the write-up's inotifywait+rsync loop over an open OpenSSH "
        "ControlMaster, `script` the same without one; `lsyncd` is default.rsyncssh with "
        "delay = 0. \"missed\" saves never became identical within the timeout. Ratios are "
        "lsync's value divided by the peer's (`lsync/peer`). ✓/✗ mark lsync against issue 4's "
        "targets.",
        *([""] + [f"Note: {n}" for n in bench.notes] if bench.notes else []),
    ])


_README_HEAD = """# lsync benchmarks

`python -m benchmarks.run` runs lsync and its peers (rsync -az, the original inotifywait+rsync
script with and without an OpenSSH ControlMaster, lsyncd) over the same simulated long link:
a private sshd on 127.0.0.1 behind a userspace delay proxy (`benchmarks/testbed/`). Use
`--short` for a quick look; `--help` lists the knobs. The section below is rewritten by each
full or short run.

"""


def write_readme(text: str) -> None:
    block = f"{RESULTS_START}\n{text}\n{RESULTS_END}"
    if README.exists():
        current = README.read_text()
        if RESULTS_START in current and RESULTS_END in current:
            head, rest = current.split(RESULTS_START, 1)
            _, tail = rest.split(RESULTS_END, 1)
            README.write_text(head + block + tail)
            return
        README.write_text(current.rstrip("\n") + "\n\n## Results\n\n" + block + "\n")
        return
    README.write_text(_README_HEAD + "## Results\n\n" + block + "\n")


# =============================================================================================
# Main
# =============================================================================================


def run(settings: Settings) -> str:
    import asyncio

    started = dt.datetime.now(dt.timezone.utc)
    check = asyncio.run(self_check(0.150, rounds=3))
    proxy_check = ("OK " if check.ok() else "FAILED ") + (
        f"echo at d = 150 ms: {check.median_rtt * 1000:.1f} ms round trip "
        f"(worst error {check.worst_error * 1000:.1f} ms; first echo with handshake "
        f"{check.first_echo * 1000:.0f} ms)")
    say(f"proxy self-check: {proxy_check}")
    bench = Bench(settings)
    try:
        bench.setup()
        if LSYNC in settings.systems and not bench.lsync_ok:
            say(f"lsync not run: {bench.lsync_reason}")
        specs = [LinkSpec(rtt) for rtt in settings.rtts_ms]
        steps: list[tuple[str, Callable[[], None]]] = []
        for spec in specs:
            steps.append((f"a {spec.label}", functools.partial(scenario_a_one_save, bench, spec)))
            steps.append((f"b {spec.label}", functools.partial(scenario_b_burst, bench, spec)))
            steps.append((f"e {spec.label}", functools.partial(scenario_e_big_edit, bench, spec)))
        initial_specs = list(specs)
        if not settings.short and settings.cap_mbit:
            initial_specs += [LinkSpec(rtt, settings.cap_mbit) for rtt in settings.rtts_ms
                              if rtt > 0]
        for tree in settings.initial_trees:
            for spec in initial_specs:
                steps.append((f"c {spec.label} {tree}",
                              functools.partial(scenario_c_initial, bench, spec, tree)))
        for name, step in steps:
            say(f"-- {name}")
            step()
        apply_targets(bench)
        text = report(bench, proxy_check, started)
    finally:
        bench.cleanup()
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="quick look: tiny tree, few saves")
    parser.add_argument("--tree", choices=sorted(trees.PRESETS), help="tree for a, b, c, e")
    parser.add_argument("--rtt-ms", default="0,300", help="round-trip times (default 0,300)")
    parser.add_argument("--systems", help=f"comma list from {','.join(SYSTEMS)} (default all)")
    parser.add_argument("--saves", type=int, help="saves per kind in scenario a")
    parser.add_argument("--burst", type=int, help="files in the burst of scenario b")
    parser.add_argument("--cap-mbit", type=float, default=100.0,
                        help="bandwidth cap for the capped initial sync (0: skip)")
    parser.add_argument("--no-kernel", action="store_true",
                        help="skip the kernel tree's initial sync in full mode")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    settings = Settings.from_args(parser.parse_args(argv))
    text = run(settings)
    print()
    print(text)
    if settings.write_readme:
        write_readme(text)
        say(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
