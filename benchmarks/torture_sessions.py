"""The lsync processes of the torture test: the session, and the commands beside it.

- `Client`: one `lsync connect` (`tests.conftest.LsyncProcess`: the real command, its log
  lines read by a thread). The harness ends it only by SIGKILL (`kill`) or Ctrl-C
  (`interrupt`, which must exit 0); any other exit is a crash (`check_alive` records it
  with the status, stderr and the end of client.log), and so is a `Traceback` anywhere.
- `cli()`: one `lsync flush/run/status` as a user runs it (a subprocess, bounded).
- `Commander`: a thread that runs `flush`, `run` and `status` at random times from another
  process while the harness works, and checks each answer: `run` printed an SSH
  connection (never `none`) or exited 124/125; exit statuses are documented ones (3, "no
  session", only while a session was being stopped or started); nothing hangs. It also
  samples the client's RSS. `probe_run(delay)` runs one such `run` `delay` s from now (right
  after a cut, say).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.torture_checks import Tally
from benchmarks.torture_faults import rss_bytes
from tests.conftest import LSYNC, LsyncProcess, wait_until

BAD_OUTPUT = ("Traceback", "internal error")
HANG = 60.0  # seconds beyond its own timeout after which a command is hung
RUN_PROBE = ["sh", "-c", "echo SSH=${SSH_CONNECTION:-none}"]


@dataclass(frozen=True)
class CliResult:
    status: int | None  # None: killed after hanging
    output: str  # stdout and stderr together
    started: float
    ended: float


def cli(args: list[str], cwd: Path, timeout: float) -> CliResult:
    started = time.monotonic()
    proc = subprocess.Popen(LSYNC + args, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = None
    return CliResult(status, out, started, time.monotonic())


class Client:
    """One `lsync connect` of the run."""

    def __init__(self, args: list[str], local: Path, workdir: Path, tally: Tally) -> None:
        self.workdir = workdir
        self.tally = tally
        self.process = LsyncProcess(args, local)
        self.ended_by_us = False
        self.reported = False
        self.scanned = 0  # log lines checked for tracebacks so far
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    @property
    def lines(self) -> list[str]:
        return self.process.lines

    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def in_sync_as_of(self) -> int | None:
        return self.process.in_sync_as_of()

    def tail(self, count: int) -> str:
        return " | ".join(list(self.lines)[-count:])

    def client_log(self) -> str:
        path = self.workdir / "cache" / "lsync" / "client.log"
        try:
            return " | ".join(path.read_text(errors="replace").splitlines()[-6:])
        except OSError:
            return "(no client.log)"

    def wait_ready(self, timeout: float) -> bool:
        ready = wait_until(lambda: self.process.saw(" ready ") or not self.alive(), timeout)
        self.check_alive(self.tally)
        ok = ready and self.process.saw(" ready ")
        if self.alive():
            self.tally.check("convergence", ok, f"no ready line within {timeout:.0f} s of "
                             f"the start: {self.tail(8)}")
        return ok

    def check_output(self, tally: Tally, what: str, text: str) -> None:
        bad = [word for word in BAD_OUTPUT if word in text]
        tally.check("no-crash", not bad, f"{what} printed {bad}: {text[-1500:]}")

    def check_alive(self, tally: Tally) -> None:
        """The no-crash invariant: alive, or ended by the harness; no traceback so far."""
        lines = list(self.lines)
        fresh = lines[self.scanned:]
        self.scanned = len(lines)
        bad = [line for line in fresh if any(word in line for word in BAD_OUTPUT)]
        if bad:
            tally.check("no-crash", False, f"lsync connect logged {bad[:3]}")
        if self.alive() or self.ended_by_us or self.reported:
            if self.alive() or self.ended_by_us:
                tally.check("no-crash", True)
            return
        self.reported = True
        status = self.process.finish(timeout=5)
        tally.check("no-crash", False,
                    f"lsync connect exited {status} by itself; stderr: "
                    f"{self.process.stderr.strip()[-800:]}; last lines: {self.tail(5)}; "
                    f"client.log: {self.client_log()}")

    def kill(self) -> None:
        self.ended_by_us = True
        with contextlib.suppress(ProcessLookupError):
            self.process.proc.kill()
        self.process.finish(timeout=10)

    def interrupt(self, tally: Tally) -> None:
        """Ctrl-C: lsync drains and must exit 0 (within 60 s)."""
        self.check_alive(tally)
        if not self.alive():
            return
        self.ended_by_us = True
        self.process.proc.send_signal(signal.SIGINT)
        status = self.process.finish(timeout=60)
        stderr = self.process.stderr
        tally.check("no-crash", status == 0 and "Traceback" not in stderr,
                    f"Ctrl-C: lsync connect exited {status}; stderr: {stderr[-800:]}; "
                    f"last lines: {self.tail(5)}")

    def disconnects_since(self, mark: int) -> list[str]:
        return [line for line in list(self.lines)[mark:] if "state disconnected" in line]


class Commander:
    """Random `lsync flush/run/status` from other processes, checked (see the module)."""

    def __init__(self, local: Path, seed: int, tally: Tally) -> None:
        self.local = local
        self.rng = random.Random(seed)
        self.tally = tally
        self.client: Client | None = None
        self.peak_rss = 0
        self.transitions: list[float] = []  # when a session was stopped or started
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.counts = {"flush": 0, "run": 0, "status": 0}

    def start(self) -> None:
        thread = threading.Thread(target=self._loop, name="commander", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=HANG + 30)

    def transition(self) -> None:
        """A session is being stopped or started now (a `no session` answer is fine)."""
        with self._lock:
            self.transitions.append(time.monotonic())

    def _sample(self) -> None:
        client = self.client
        if client is not None and client.alive():
            self.peak_rss = max(self.peak_rss, rss_bytes(client.pid))

    def _loop(self) -> None:
        next_at = time.monotonic() + self.rng.uniform(0.3, 2.5)
        while not self._stop.wait(0.25):
            self._sample()
            if time.monotonic() < next_at:
                continue
            next_at = time.monotonic() + self.rng.uniform(0.3, 2.5)
            kind = self.rng.choice(("flush", "run", "status"))
            where = self.local / "kernel" if self.rng.random() < 0.5 else self.local
            thread = threading.Thread(target=self.command, args=(kind, where), daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def probe_run(self, delay: float) -> None:
        """One checked `lsync run` `delay` s from now, from its own thread."""
        def later() -> None:
            self._stop.wait(delay)
            self.command("run", self.local)
        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _session_changed(self, started: float, ended: float) -> bool:
        with self._lock:
            return any(started - 2 <= moment <= ended + 1 for moment in self.transitions)

    def command(self, kind: str, where: Path) -> None:
        timeout = self.rng.choice((2.0, 5.0))
        if kind == "run":
            args = ["run", "--timeout", str(timeout), "--", *RUN_PROBE]
        elif kind == "flush":
            args = ["flush", "--timeout", str(timeout)]
        else:
            args = ["status", "--json"] if self.rng.random() < 0.5 else ["status"]
        done = cli(args, where, timeout + HANG)
        with self._lock:
            self.counts[kind] += 1
        what = f"concurrent lsync {' '.join(args[:3])}"
        out = done.output.strip()[-800:]
        bad = [word for word in BAD_OUTPUT if word in done.output]
        self.tally.check("no-crash", not bad, f"{what} printed {bad}: {out}")
        if done.status is None:
            self.tally.check("cli-answers", False, f"{what} still running after "
                             f"{timeout + HANG:.0f} s: {out}")
            return
        self.tally.check("cli-answers", True)
        client = self.client
        # "No session" is right while a session is stopped or started (a Ctrl-C'd one
        # drains first), or after it died (that is a crash, reported as one).
        changed = self._session_changed(done.started, done.ended) or (
            client is None or not client.alive() or client.ended_by_us)
        if kind == "run":
            ok = "SSH=none" not in done.output and (
                (done.status == 0 and "SSH=127.0.0.1" in done.output)
                or done.status in (124, 125))
            self.tally.check("run-on-target", ok,
                             f"{what} (in {where.name}) exited {done.status}: {out}")
        else:
            allowed = {0, 1} if kind == "flush" else {0}
            # (A session SIGKILLed mid-answer: "closed the connection", exit 1.)
            ok = done.status in allowed or (done.status in (1, 3) and changed)
            self.tally.check("cli-status", ok, f"{what} exited {done.status}: {out}")
