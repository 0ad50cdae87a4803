"""The torture test: real `lsync connect` sessions on the real kernel, through faults.

    python -m benchmarks.torture [--seed N] [--short | --minutes M] [--workdir DIR]

Material: two Linux point releases as two revisions of one git repository
(`benchmarks.kernel_material`; `--short` uses a slice of ~4,500 files, the long mode the
whole tree, ~78,700). A local clone is synced by `lsync connect` (the real command, a
subprocess) to a remote tree on its own small tmpfs, over the testbed: the private OpenSSH
sshd behind the delay/bandwidth proxy. The remote starts with a copy of one directory
(first contact: files lsync verifies but did not write) and, once lsync is ready, files
planted by the harness. The run is a seeded schedule of rounds; each round injects one
fault (`FAULTS`: every kind once in a seeded order, then again; the short mode starts no
round after `SHORT_ROUNDS_UNTIL` once each kind had its turn, the long mode none after its
minutes), does a few workload actions meanwhile (`torture_workload`: checkouts between the
releases, a switch "far back" that brings back thousands of files and the root's
`.gitignore`, editor saves, creates, deletes, directory moves, symlink changes, big files on
a capped link; the crash faults are in `torture_crashes`), heals the fault and checks.
Meanwhile another thread runs `lsync flush`, `lsync run` and `lsync status` at random times
(`torture_sessions.Commander`).

Invariants (`torture_checks.Tally` counts every check and keeps every violation with its
round, step and seed):

- no-crash: lsync connect exits only when the harness stops it (SIGKILL, or Ctrl-C then
  status 0); no status 70, no `Traceback` in any output; checked after every step;
- flush-truth: a `flush` (or the flush inside `run`) that returns 0 while the harness keeps
  the local tree still leaves the remote equal to the local tree (a `run` also prints a
  marker written just before it was called);
- run-on-target: `lsync run -- sh -c 'echo ${SSH_CONNECTION:-none}'` never prints `none`;
  while the link is down it waits, or exits 125 (124: its flush timed out);
- convergence: after the fault is healed, a marker file is written, and within the bound
  (10 s, plus the documented detection time of a frozen link (20 s) and 5 s to reconnect,
  the reconnect's comparison after a broken link (3 s, 10 s on the whole tree), the retry
  backoff a refused write may be in (at most the fault's length), the round's work at a
  modest bulk rate (20 MB/s, 2,000 paths/s) and the transfer time of a big file on the
  capped link) an `in-sync as-of=N` line covers it, and
  right then the trees are equal (ignored paths and planted files aside); not a single
  `disconnected` state in a round whose fault does not break the link (a false stall);
  also `cli-answers` (no command hangs) and `cli-status` (documented exit statuses only);
- nothing-lost: every file planted on the remote (build outputs `*.o` in ignored paths, a
  remote-only file) still exists (by name and content);
- bounded-cost: bytes up through the proxy in a round <= 1.5 x the bytes written locally
  (2.5 x when the fault broke the link: what was in flight is sent again) + 4 KiB a
  changed path + 1 MiB + 600 KiB a new connection; a 10-byte edit of a big file <= 64 KiB;
- bounded-memory: the client's RSS <= 400 MB + 3 x the biggest file.

The table of steps, faults, checks and violations is printed at the end; the exit status is
1 when any invariant was violated. Needs root (mounts, sysctl).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import lsync.client
from benchmarks.bench import agent_record_files
from benchmarks.kernel_material import Material, checkout_copy, git, prepare
from benchmarks.testbed.sshd import PrivateSshd
from benchmarks.torture_checks import Planted, Tally, TreeComparer, shown
from benchmarks.torture_crashes import client_kill, client_kill_frozen, kill_agents
from benchmarks.torture_faults import (
    RemoteDisk,
    TortureProxy,
    has_inotify,
    remote_disk,
    require_root,
    small_inotify_queue,
)
from benchmarks.torture_sessions import Client, Commander, cli
from benchmarks.torture_workload import Workload
from tests.conftest import wait_until

FAULTS = ("none", "cut", "freeze", "cap", "agent-kill", "client-kill", "client-kill-frozen",
          "disk-full", "read-only", "inotify-overflow")
BREAKS_LINK = {"cut", "freeze", "agent-kill", "client-kill", "client-kill-frozen",
               "inotify-overflow"}
CONVERGE = 10.0  # seconds after the faults stop
# Documented: a frozen link is noticed within about 20 s; then the reconnect (1 s backoff,
# the handshake and the comparison) on a loaded machine.
FREEZE_DETECTION = 25.0
MARKER = "torture-marker.txt"
CAP_BPS = 10e6
INOTIFY_LIMIT = 16
# The convergence bound's allowances beyond CONVERGE: bulk work at these rates (the round's
# bytes written, counted whole, and paths), and after a broken link the reconnect's
# comparison of the tree (the agent's manifest of 78,000 entries on the whole tree).
BULK_BYTES_PER_S = 20e6
BULK_PATHS_PER_S = 2000.0
RESYNC_SHORT, RESYNC_LONG = 3.0, 10.0
FIRST_CONTACT = "fs/ext4"  # on the remote before lsync first starts (a copy)
SHORT_ROUNDS_UNTIL = 170.0  # s: the short mode starts no round after this (each kind once first)


class Torture:
    """One run: set-up, rounds, checks, clean-up (`run()` returns the exit status)."""

    def __init__(self, args: argparse.Namespace, material: Material, workdir: Path) -> None:
        self.args = args
        self.short = args.minutes is None
        self.rng = random.Random(args.seed)
        self.material = material
        self.workdir = workdir
        self.tally = Tally(args.seed)
        self.planted = Planted()
        self.comparer = TreeComparer(self.planted)
        self.local = workdir / "local"
        self.remote = workdir / "remote-fs" / "tree"
        self.big_size = (40 if self.short else 120) << 20
        self.started = time.monotonic()
        self.deadline = self.started + (SHORT_ROUNDS_UNTIL if self.short
                                         else 60 * args.minutes)
        self.round_mark = 0
        self.round_delay = 0.05
        self.first_contact = FIRST_CONTACT
        self.sshd: PrivateSshd
        self.proxy: TortureProxy
        self.config: Path
        self.disk: RemoteDisk
        self.workload: Workload
        self.commander: Commander
        self.client: Client

    # -- plumbing --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def step(self, what: str) -> None:
        """One step done: say it, and check that lsync is still alive and well."""
        self.tally.step()
        self.say(f"  step {self.tally.steps}: {what}")
        self.client.check_alive(self.tally)

    def compare(self) -> list[str]:
        return self.comparer.differences(self.local, self.remote)

    def flush_truth(self, how: str, extra_ok: bool = True) -> None:
        differences = self.compare() if extra_ok else ["the marker was not in its output"]
        self.tally.check("flush-truth", not differences,
                         f"{how} returned 0 but {len(differences)} paths differ right "
                         f"after: {shown(differences)}")

    def checked_flush(self, timeout: float, must_answer: bool) -> None:
        """A flush while the harness keeps the tree still: if it says 0, it is true."""
        done = cli(["flush", "--timeout", str(timeout)], self.local, timeout + 60)
        self.client.check_output(self.tally, "lsync flush", done.output)
        if done.status == 0:
            self.flush_truth("lsync flush")
        elif must_answer:
            self.tally.check("flush-answers", False,
                             f"lsync flush exited {done.status} after an in-sync line "
                             f"(timeout {timeout} s): {done.output[-600:]}; session: "
                             f"{self.client.tail(6)}; client.log: {self.client.client_log()}")
        self.step(f"checked flush: exit {done.status}")

    def checked_run(self, timeout: float, must_answer: bool, marker: bool = True) -> None:
        """A run while the tree is kept still; with `marker`, a marker written just before
        must be what the remote command reads (else nothing is pending: the run's flush
        passes at once, and only where the command runs is in question)."""
        token = f"token-{self.rng.getrandbits(64):x}"
        if marker:
            (self.local / MARKER).write_text(token + "\n")
        done = cli(["run", "--timeout", str(timeout), "--", "sh", "-c",
                    f"echo SSH=${{SSH_CONNECTION:-none}}; cat {MARKER}"],
                   self.local, timeout + 60)
        self.client.check_output(self.tally, "lsync run", done.output)
        self.tally.check("run-on-target", "SSH=none" not in done.output and (
            done.status != 0 or "SSH=127.0.0.1" in done.output),
            f"lsync run exited {done.status}: {done.output[-600:]}")
        if done.status == 0:
            self.flush_truth("lsync run", token in done.output or not marker)
        elif must_answer:
            self.tally.check("flush-answers", False,
                             f"lsync run exited {done.status} after an in-sync line: "
                             f"{done.output[-600:]}; session: {self.client.tail(6)}; "
                             f"client.log: {self.client.client_log()}")
        elif done.status not in (124, 125):
            self.tally.check("run-on-target", False,
                             f"lsync run exited {done.status} (not 0, 124 or 125) while "
                             f"a fault was on: {done.output[-600:]}")
        self.step(f"checked run: exit {done.status}")

    # -- convergence and the other end-of-round checks -----------------------------------

    def bulk_allowance(self) -> float:
        """Seconds to move the round's work at a modest bulk rate (a far switch on the whole
        tree writes ~700 MB in 25,000 paths; 10 s do not cover that on any link)."""
        work = self.workload
        return work.changed_bytes / BULK_BYTES_PER_S + work.changed_paths / BULK_PATHS_PER_S

    def converge(self, bound: float) -> None:
        (self.local / MARKER).write_text(f"converge {self.rng.getrandbits(64):x}\n")
        mark = time.time_ns()
        began = time.monotonic()
        client = self.client
        reached = wait_until(lambda: (client.in_sync_as_of() or 0) >= mark
                             or not client.alive(), bound)
        took = time.monotonic() - began
        client.check_alive(self.tally)
        if (reached and client.alive()) or (client.in_sync_as_of() or 0) >= mark:
            differences = self.compare()
            self.tally.check("convergence", not differences,
                             f"in-sync line after {took:.1f} s but {len(differences)} paths "
                             f"differ right then: {shown(differences)}")
            self.say(f"  in sync after {took:.1f} s (bound {bound:.0f} s)")
            return
        differences = self.compare()
        status = cli(["status"], self.local, 30).output
        self.tally.check("convergence", False,
                         f"no in-sync line within {bound:.0f} s after the faults stopped; "
                         f"{len(differences)} paths differ: {shown(differences)}; "
                         f"lsync status: {status[-800:]}; last lines: "
                         f"{client.tail(8)}")
        self.say("  recovering: every fault off (RTT 0, no cap), a fresh lsync connect")
        self.proxy.set_rate(None)
        self.proxy.set_delay(0.0)
        self.proxy.set_accepting(True)
        self.restart_client()

    def restart_client(self, ctrl_c: bool = True) -> None:
        self.commander.transition()
        if self.client.alive() and ctrl_c:
            self.client.interrupt(self.tally)
        elif self.client.alive():
            self.client.kill()
        self.new_client()

    def new_client(self) -> None:
        """Start `lsync connect` (it is `self.client` at once, so that clean-up finds it)
        and wait for its ready line."""
        self.client = Client(self.connect_args(), self.local, self.workdir, self.tally)
        self.commander.transition()
        self.client.wait_ready(120 if self.short else 300)
        self.commander.client = self.client
        self.commander.transition()

    def connect_args(self) -> list[str]:
        return ["connect", "-F", str(self.config), f"{self.sshd.alias}:{self.remote}"]

    def end_checks(self, fault: str, up_before: int, conns_before: int) -> None:
        counters = self.proxy.counters()
        up = counters.bytes_up - up_before
        connections = counters.connections_total - conns_before
        factor = 2.5 if fault in BREAKS_LINK else 1.5
        work = self.workload
        bound = int(factor * work.changed_bytes + 4096 * work.changed_paths + (1 << 20)
                    + 600_000 * connections)
        self.say(f"  round cost: {up} B up for {work.changed_bytes} B written in "
                 f"{work.changed_paths} paths, {connections} new connections (bound {bound} B)")
        self.tally.check("bounded-cost", up <= bound,
                         f"{up} B up in a round that wrote {work.changed_bytes} B in "
                         f"{work.changed_paths} paths over {connections} connections "
                         f"(fault {fault}; bound {bound} B)")
        lost = self.comparer.lost(self.remote)
        self.tally.check("nothing-lost", not lost,
                         f"planted remote files gone: {', '.join(lost)}")
        peak = self.commander.peak_rss
        limit = (400 << 20) + 3 * self.big_size
        self.tally.check("bounded-memory", peak <= limit,
                         f"client RSS reached {peak >> 20} MiB (bound {limit >> 20} MiB)")
        if fault not in BREAKS_LINK:
            stalls = self.client.disconnects_since(self.round_mark)
            self.tally.check("convergence", not stalls,
                             f"the link was declared dead in a round without a link fault "
                             f"({fault}): {shown(stalls)}")

    # -- rounds ----------------------------------------------------------------------------

    def workload_steps(self, count: int) -> None:
        for _ in range(count):
            self.step(self.workload.random_action())

    def round(self, fault: str) -> None:
        self.tally.round_no += 1
        self.tally.rounds += 1
        delay = 0.15 if fault == "cap" else (
            0.05 if self.short else self.rng.choice((0.0, 0.05, 0.15)))
        self.proxy.set_delay(delay)
        self.round_delay = delay
        self.say(f"round {self.tally.round_no}: fault {fault}, RTT {2000 * delay:.0f} ms")
        self.workload.reset_accounting()
        counters = self.proxy.counters()
        self.round_mark = len(self.client.lines)
        extra = 0.0
        if fault != "none":
            self.tally.fault(fault)
        if fault == "none":
            self.far_switch()
            self.workload_steps(self.rng.randint(1, 3))
        elif fault == "cut":
            extra = self.fault_cut()
        elif fault == "freeze":
            self.proxy.freeze()
            self.commander.probe_run(self.rng.uniform(0.05, 1.0))
            self.step("froze the link")
            self.workload_steps(self.rng.randint(1, 3))
            extra = FREEZE_DETECTION
        elif fault == "cap":
            self.fault_cap()
            return self.end_checks(fault, counters.bytes_up, counters.connections_total)
        elif fault == "agent-kill":
            self.workload_steps(1)
            self.step(f"killed {kill_agents(self)} agent processes")
            self.workload_steps(self.rng.randint(1, 2))
        elif fault == "client-kill":
            client_kill(self)
        elif fault == "client-kill-frozen":
            client_kill_frozen(self)
        elif fault in ("disk-full", "read-only"):
            extra = self.fault_disk(fault)
        elif fault == "inotify-overflow":
            self.fault_inotify()
        if fault in BREAKS_LINK:
            extra += RESYNC_SHORT if self.short else RESYNC_LONG
        self.converge(CONVERGE + extra + self.bulk_allowance())
        self.checked_flush(10, must_answer=True)
        self.checked_run(10, must_answer=True)
        self.end_checks(fault, counters.bytes_up, counters.connections_total)
        if fault == "inotify-overflow":
            self.restart_client()  # back to a normal event queue
            self.step("lsync restarted with the normal inotify queue")

    def far_switch(self) -> None:
        """Big directories and the root-level files removed and synced, then a checkout
        that brings them back: thousands of new files, the root's listing among them."""
        self.step(self.workload.vacate(2000 if self.short else 8000))
        (self.local / MARKER).write_text(f"vacated {self.rng.getrandbits(64):x}\n")
        mark = time.time_ns()
        client = self.client
        wait_until(lambda: (client.in_sync_as_of() or 0) >= mark or not client.alive(),
                   CONVERGE * 3 + self.bulk_allowance())  # not a check: the next step is
        self.step(self.workload.checkout())
        # An editor save of the root's rules while thousands of new files wait: the root's
        # listing is queued ahead of them (a save is urgent).
        rules = self.local / ".gitignore"
        self.workload.save(rules, rules.read_bytes(), "truncate")
        self.step("saved the root .gitignore during the switch")

    def fault_cut(self) -> float:
        """A cut while idle, a `run` probe 0.05-0.5 s later (nothing pending: its flush
        passes at once, so where the command runs shows), edits and a flush while the link
        stays down, then, once reconnected, deletes in flight at a second cut."""
        self.proxy.set_accepting(False)
        dropped = self.proxy.cut()
        down = self.rng.uniform(2, 6)
        began = time.monotonic()
        time.sleep(self.rng.uniform(0.05, 0.5))  # when the probe runs after the cut
        self.checked_run(2, must_answer=False, marker=False)
        self.step(f"cut {dropped} connections, refusing new ones for {down:.1f} s")
        self.workload_steps(self.rng.randint(1, 3))
        self.checked_flush(2, must_answer=False)
        time.sleep(max(0.0, down - (time.monotonic() - began)))  # the outage's planned length
        readies = self.client.process.count(" ready ")
        self.proxy.set_accepting(True)
        self.step("link back")
        if wait_until(lambda: self.client.process.count(" ready ") > readies, CONVERGE + 4):
            # Deletes really in flight: sent (bytes went up), unanswered (a slow link back).
            self.proxy.set_delay(0.3)
            before = self.proxy.counters().bytes_up
            self.workload.delete(self.rng.randint(3, 10))
            self.workload.delete(self.rng.randint(3, 10), under=self.first_contact)
            sent = wait_until(lambda: self.proxy.counters().bytes_up > before, 5)
            self.proxy.cut()
            self.proxy.set_delay(self.round_delay)
            self.step(f"deletes in flight at a second cut ({'sent' if sent else 'not sent'})")
        return 2.0  # lsync's reconnect backoff: 1 s, then 2 s

    def fault_cap(self) -> None:
        self.proxy.set_rate(CAP_BPS)
        self.step(f"bandwidth capped at {CAP_BPS / 1e6:.0f} Mbit/s")
        if self.workload.big_files:
            self.step(self.workload.drop_big_files())
        self.step(self.workload.big_file(self.big_size))
        self.step(self.workload.edit(self.rng.randint(1, 10)))  # saves during the transfer
        transfer = self.big_size * 8 / CAP_BPS
        self.converge(CONVERGE + 1.5 * transfer)
        self.checked_flush(10, must_answer=True)
        before = self.proxy.counters().bytes_up
        self.step(self.workload.poke(self.workload.big_files[-1]))
        self.converge(CONVERGE + transfer)  # a whole resend would fit: the cost check says
        up = self.proxy.counters().bytes_up - before
        self.tally.check("bounded-cost", up <= 64 << 10,
                         f"a 10-byte edit of a {self.big_size >> 20} MiB file sent {up} B up")
        self.proxy.set_rate(None)
        self.step("cap lifted")

    def fault_disk(self, fault: str) -> float:
        began = time.monotonic()
        injected = self.disk.fill() if fault == "disk-full" else self.disk.read_only()
        if not injected:
            self.tally.notes.append(f"round {self.tally.round_no}: {fault} not injected "
                                    "(remount refused)")
        self.step(f"remote filesystem {fault}")
        self.workload.delete(self.rng.randint(2, 8))  # deletes refused while read-only
        self.workload_steps(self.rng.randint(1, 3))
        self.checked_flush(3, must_answer=False)
        time.sleep(max(0.0, 4 - (time.monotonic() - began)))  # the fault's planned length
        self.disk.restore()
        self.step("remote filesystem writable again")
        return min(60.0, time.monotonic() - began + 2)

    def fault_inotify(self) -> None:
        self.commander.transition()
        self.client.interrupt(self.tally)
        with small_inotify_queue(INOTIFY_LIMIT):
            self.client = Client(self.connect_args(), self.local, self.workdir, self.tally)
            wait_until(lambda: has_inotify(self.client.pid) or not self.client.alive(), 30)
        self.client.wait_ready(120 if self.short else 900)
        self.commander.client = self.client
        self.commander.transition()
        self.step(f"lsync restarted with an inotify queue of {INOTIFY_LIMIT} events")
        self.step(self.workload.checkout())
        self.workload_steps(self.rng.randint(1, 2))
        client = self.client
        if not wait_until(lambda: client.process.saw("checking the whole tree"), CONVERGE):
            self.tally.notes.append(f"round {self.tally.round_no}: no inotify overflow "
                                    "reported by lsync")

    # -- the run ---------------------------------------------------------------------------

    def schedule(self) -> Iterator[tuple[str, bool]]:
        """Fault kinds, each kind once in a seeded order, and again; with whether the round
        must run whatever the time (the first of each kind in the short mode)."""
        first = True
        while True:
            kinds = list(FAULTS)
            self.rng.shuffle(kinds)
            for kind in kinds:
                yield kind, first and self.short
            first = False

    def plant(self) -> None:
        self.planted.plant(self.remote, "REMOTE-ONLY-1.txt", b"notes kept on the build box\n")
        for n in range(1, 9):
            rel = self.workload.directory()
            self.planted.plant(self.remote, f"{rel}/torture_planted_{n}.o",
                               self.rng.randbytes(self.rng.randint(100, 50_000)))
            if n <= 3:
                self.workload.favoured_dirs.append(rel)
        self.step(f"planted {len(self.planted.files)} files on the remote")

    def run(self) -> int:
        with contextlib.ExitStack() as stack:
            self.sshd = stack.enter_context(PrivateSshd(self.workdir / "sshd"))
            self.proxy = TortureProxy(("127.0.0.1", self.sshd.port), 0.05, handshake=True)
            self.proxy.start()
            stack.callback(self.proxy.stop)
            self.config = self.sshd.write_client_config(port=self.proxy.port)
            size = int(sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file()
                           and ".git" not in f.parts) * 1.6) + 4 * self.big_size + (64 << 20)
            self.disk = stack.enter_context(
                remote_disk(self.workdir / "remote-fs", size))
            stack.callback(self.forget_records)
            # First contact: the remote already holds a copy of one directory (new mtimes),
            # files lsync verifies but did not write.
            (self.remote / self.first_contact).parent.mkdir(parents=True)
            subprocess.run(["cp", "-r", str(self.local / self.first_contact),
                            str(self.remote / self.first_contact)], check=True)
            self.workload = Workload(self.local, self.material.tags, self.rng)
            bad = self.workload.check_names()
            if bad:
                raise SystemExit(f"torture: invented names are ignored here: {bad}")
            self.commander = Commander(self.local, self.rng.randrange(1 << 30), self.tally)
            self.client = Client(self.connect_args(), self.local, self.workdir, self.tally)
            self.commander.client = self.client
            stack.callback(self.stop_everything)
            self.say(f"initial sync of {self.local} ({size >> 20} MiB tmpfs remote)")
            self.client.wait_ready(120 if self.short else 900)
            self.plant()
            self.checked_flush(30, must_answer=True)
            self.commander.start()
            for fault, must in self.schedule():
                if time.monotonic() > self.deadline and not must:
                    break
                self.round(fault)
        return 1 if self.tally.violations else 0

    def stop_everything(self) -> None:
        self.commander.stop()
        if self.client.alive():
            self.client.interrupt(self.tally)

    def forget_records(self) -> None:
        for path in agent_record_files(self.remote):
            path.unlink(missing_ok=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torture",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--short", action="store_true",
                      help="the CI mode: a slice of the tree, every fault once (<= 6 min)")
    mode.add_argument("--minutes", type=float, default=None,
                      help="the long mode: the whole tree, rounds until M minutes passed")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the trees go (default: a new temporary directory)")
    args = parser.parse_args(argv)
    if args.minutes is None and not args.short:
        args.minutes = 30.0
    if args.minutes is not None and args.minutes < 30 and not os.environ.get(
            "TORTURE_ANY_MINUTES"):
        parser.error("the long mode runs at least 30 minutes (--short for the short mode)")
    return args


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: clean up (mounts, sysctl, processes) as for Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    reason = require_root()
    if reason is not None:
        print(f"torture: {reason}", file=sys.stderr)
        return 2
    began = time.monotonic()
    material = prepare(full=args.minutes is not None)
    took = material.prepare_seconds
    print(f"material: {material.repo} "
          f"({f'prepared in {took:.0f} s' if took > 1 else 'cached'})")
    workdir = Path(tempfile.mkdtemp(prefix="lsync-torture-", dir=args.workdir))
    os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")
    for name in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "XDG_RUNTIME_DIR"):
        os.environ.pop(name, None)
    signal.signal(signal.SIGTERM, _interrupted)
    torture = None
    status = 1
    try:
        checkout_copy(material, workdir / "local", material.tags[0])
        commit = git("rev-parse", "--short", "HEAD", check=False,
                     cwd=Path(lsync.client.__file__).resolve().parent).stdout.strip()
        print(f"lsync at {commit}, seed {args.seed}, "
              f"{'short' if args.minutes is None else f'{args.minutes:.0f} minutes'}")
        torture = Torture(args, material, workdir)
        status = torture.run()
    except Exception:  # a bug of the harness itself: said as such, after the table
        traceback.print_exc()
        print("torture: the harness itself failed (see above); exit 3", file=sys.stderr)
        status = 3
    finally:
        if torture is not None:
            print(f"\n## Torture table ({time.monotonic() - began:.0f} s)\n")
            print(torture.tally.table())
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
