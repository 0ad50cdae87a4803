"""lsync itself as a benchmark subject: the one place where the benchmark plugs lsync in.

`LsyncWatcher` runs ``lsync connect -F <cfg> <alias>:<remote dir> --local <dir> [-v]`` as a
subprocess (with this interpreter) and follows its log lines (see notes/contract.md):

    <iso-time> ready files=N bytes=M      once the initial sync is acknowledged
    <iso-time> ack <path> ms=<latency>    per acknowledged write (with -v)
    <iso-time> in-sync as-of=<ns> files=N bytes=M
                                          a check found the remote in sync with the tree
                                          as of <ns> (wall clock, time.time_ns())

`start()` returns at the "ready" line (and records when it came, relative to the spawn);
`spawn()` and `wait_ready()` are its two halves, for work done during the initial sync;
`wait_ack()` finds the acknowledgement of a path; `wait_in_sync()` the first in-sync line
as of a given moment or later; `stop()` sends SIGINT (lsync drains, says
goodbye, exits 0) and keeps the exit status in `exit_status`. `pid` is the client process
itself (for /proc measurements). lsync's local hash cache goes where `cache_home` says (it sets
XDG_CACHE_HOME), so a run can start cold or reuse a previous run's cache on purpose.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.peers import Link, PeerError

NAME = "lsync"
# The agent's command line (python3 -c LOADER BUNDLE INITIAL) contains this line of LOADER.
AGENT_CMDLINE_NEEDLE = "from lsync.agent.main import main"

_READY_RE = re.compile(r"^\S+ ready files=(\d+) bytes=(\d+)")
_ACK_RE = re.compile(r"^\S+ ack (.+) ms=([0-9.]+)\s*$")
_IN_SYNC_RE = re.compile(r"^\S+ in-sync as-of=(\d+) files=(\d+) bytes=(\d+)")


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
    """lsync as a `peers.Watcher`: start() returns at its "ready" line; acks are recorded."""

    name = NAME

    def __init__(self, local_dir: Path, link: Link, workdir: Path,
                 extra_args: Sequence[str] = (), verbose: bool = True,
                 cache_home: Path | None = None) -> None:
        self.local_dir = local_dir
        self.link = link
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.verbose = verbose
        self.cache_home = cache_home if cache_home is not None else workdir / "cache"
        self.log = workdir / "lsync.log"
        self.ready_at: float | None = None
        self.started_at = 0.0
        self.ready_files = 0
        self.ready_bytes = 0
        self.exit_status: int | None = None
        self._acks: list[tuple[float, str, float]] = []  # (perf_counter, path, lsync's ms)
        self._in_sync: list[tuple[float, int]] = []  # (perf_counter, as-of wall ns)
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def argv(self) -> list[str]:
        return [*lsync_command(), "connect", "-F", str(self.link.ssh_config),
                f"{self.link.alias}:{self.link.remote_dir}", "--local", str(self.local_dir),
                *(["-v"] if self.verbose else []), *self.extra_args]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def startup_seconds(self) -> float | None:
        """From the spawn of the process to its "ready" line."""
        return None if self.ready_at is None else self.ready_at - self.started_at

    def start(self, timeout: float = 600.0) -> None:
        """Spawn lsync and return at its "ready" line (PeerError if it never comes)."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process and return at once (its initial sync runs on; see wait_ready)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, XDG_CACHE_HOME=str(self.cache_home))
        with open(self.log, "a") as log:
            log.write(f"--- {' '.join(self.argv())}\n")
        self.ready_at = None
        self.exit_status = None
        self.started_at = time.perf_counter()
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True, env=env,
        )
        self._reader = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._reader.start()

    def is_ready(self) -> bool:
        """Whether the "ready" line has been read (the initial sync is acknowledged)."""
        with self._cond:
            return self.ready_at is not None

    def wait_ready(self, timeout: float) -> None:
        """Wait for the "ready" line of the spawned process; stop it and raise if it never
        comes within `timeout` seconds or the process exits first."""
        proc = self._proc
        assert proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.ready_at is None:
                if proc.poll() is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
        if self.ready_at is None:
            exited = proc.poll()
            self.stop()
            code = "start-timeout" if exited is None else "exited"
            raise PeerError(code, f"lsync not ready (exit {exited}): {self.tail()}")

    def tail(self, n: int = 800) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with open(self.log, "a") as log:
            for line in proc.stdout:
                now = time.perf_counter()
                log.write(line)
                log.flush()
                if m := _ACK_RE.match(line):
                    with self._cond:
                        self._acks.append((now, m.group(1), float(m.group(2))))
                        self._cond.notify_all()
                elif m := _IN_SYNC_RE.match(line):
                    with self._cond:
                        self._in_sync.append((now, int(m.group(1))))
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
                found: float | None = None
                for t, path, _ms in reversed(self._acks):
                    if t < after:
                        break
                    if path == rel:
                        found = t
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.05))

    def wait_in_sync(self, as_of_ns: int, timeout: float) -> float | None:
        """perf_counter() when the first in-sync line whose as-of is `as_of_ns` (wall clock)
        or later was read, or None if none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, as_of in self._in_sync:
                    if as_of >= as_of_ns:
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or (self._proc is not None and self._proc.poll() is not None):
                    return None
                self._cond.wait(min(left, 0.05))

    def acks_since(self, rel: str, after: float) -> int:
        """How many ack lines for `rel` (or paths below it) were read after `after`."""
        with self._cond:
            return sum(1 for t, path, _ms in self._acks
                       if t >= after and (path == rel or path.startswith(rel + "/")))

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGINT, wait for the exit (SIGKILL after 30 s); `exit_status` says how it ended."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)  # drain, goodbye, exit 0
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)
        self.exit_status = proc.returncode
