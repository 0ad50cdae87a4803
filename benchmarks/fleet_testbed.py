"""The testbed of benchmarks.fleet: three build hosts behind delay proxies, and the
`lsync connect` processes that sync to them.

`testbed(work, delay)` starts one private sshd on 127.0.0.1 behind three delay proxies
(`NAMES`: one-way delay `delay` each, new connections pay the handshake) and writes one ssh
config with an alias per host; on the way out it deletes the agent's records of every remote
directory the run made (`Testbed.remotes`). `Client` is one `lsync connect` process: a thread
reads its output lines (with their time), its CPU is read at its first `ready` line.
`session(bed, mode, ...)` starts the clients of one way to sync (`ONE`, `FLEET`, `THREE`) on
fresh remotes and stops them (SIGINT, then a kill after 30 s) when the block ends. Waits are
for conditions, with a deadline. Split from benchmarks/fleet.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import agent_record_files, say
from benchmarks.lsync_runner import lsync_command
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.buildloop.controlpath import find_socket

NAMES = ("x86", "arm", "box3")
ONE, FLEET, THREE = "one", "fleet", "three"
READY_TIMEOUT = 600.0


class BenchError(RuntimeError):
    """A session did not start, a save never landed, a flush failed."""


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
