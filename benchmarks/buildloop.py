"""The build loop (issue 9): how soon after a save a command starts on the remote.

    python -m benchmarks.buildloop [--rtts-ms 0,300] [--iterations 20] [--slow-iterations 12]

For each link (the testbed's private sshd behind the delay proxy, one-way delay RTT/2; a
new connection pays the TCP handshake) one `lsync connect -v` session runs, and each
iteration measures, in this order:

- `lsync run`, started right after a save: a 20 KB C file is saved (truncate and write,
  as an editor does) and at once `lsync run -- sh -c 'date +%s%N'` is spawned. "Started
  remotely" is the time `date` prints: the moment the command runs remotely, on the same
  clock (the remote is this machine). Measured from the save, and from the save's
  acknowledgement (the `ack` line of `lsync connect -v`); the goal is at most one RTT +
  30 ms after the acknowledgement.
- the same run asked by this process on the session's control socket right after the
  save (`lsync.client.buildloop.control.stream`): the session's own part, without the
  `lsync` command's Python start-up.
- `lsync run` with nothing pending: from spawning the command to the remote start, and to
  its exit.
- `lsync status`: spawn to exit, the command's start-up plus one local request (no network).
- `ssh -F cfg host 'cd tree && exec sh -c "date +%s%N"'` through an OpenSSH ControlMaster
  opened beforehand, and the same without one (a new connection each time): spawn to remote
  start, and to exit; and through the ControlMaster with the command `lsync run` sends
  (`exec "$SHELL" -l -c 'cd tree && exec sh -c ...'`: the remote login shell's start-up,
  which `lsync run` pays by design, on top of the shell sshd itself starts).

p50 and p90 of each over the iterations; nothing sleeps in place of a condition.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench import percentile, say
from benchmarks.lsync_runner import LsyncWatcher, lsync_command
from benchmarks.peers import ControlMaster, Link, save_file
from benchmarks.testbed import trees
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.buildloop.control import decode_output, request, stream
from lsync.client.buildloop.controlpath import find_socket
from lsync.protocol import hashing

EDITED = "src/edited.c"
DATE = "date +%s%N"
GOAL_SLACK_MS = 30.0  # the goal: remote start <= ack + one RTT + this
RUN_TIMEOUT = 60.0


@dataclass
class Series:
    """One measured quantity (milliseconds) of one link."""

    label: str
    values: list[float] = field(default_factory=list)

    def p(self, q: float) -> float | None:
        return percentile(self.values, q) if self.values else None


@dataclass
class LinkResult:
    rtt_ms: float
    series: dict[str, Series]

    def add(self, key: str, value_ms: float) -> None:
        self.series[key].values.append(value_ms)


# What is measured, in table order: key -> row label.
ROWS = {
    "cli_save": "`lsync run` spawned right after the save: save → remote start",
    "cli_ack": "`lsync run` spawned right after the save: ack → remote start",
    "cli_exit": "`lsync run` spawned right after the save: save → exit",
    "req_save": "run request on the control socket right after the save: save → remote start",
    "req_ack": "run request on the control socket right after the save: ack → remote start",
    "idle_start": "`lsync run`, nothing pending: spawn → remote start",
    "idle_exit": "`lsync run`, nothing pending: spawn → exit",
    "status_exit": "`lsync status` (start-up + one local request): spawn → exit",
    "cm_start": "`ssh` with a ControlMaster open: spawn → remote start",
    "cm_exit": "`ssh` with a ControlMaster open: spawn → exit",
    "cm_login": "`ssh` with a ControlMaster open, `lsync run`'s login-shell wrapper: "
                "spawn → remote start",
    "ssh_start": "`ssh`, new connection: spawn → remote start",
    "ssh_exit": "`ssh`, new connection: spawn → exit",
}
GOAL_ROWS = ("cli_ack", "req_ack")


def wall_of(perf: float, offset_ns: int) -> int:
    """A time.perf_counter() reading as Unix ns (offset measured once per link)."""
    return int(perf * 1e9) + offset_ns


def remote_start(output: str | bytes) -> int:
    """The Unix ns a remote `date +%s%N` printed (the last line of its output)."""
    text = output.decode() if isinstance(output, bytes) else output
    lines = text.strip().splitlines()
    if not lines or not lines[-1].strip().isdigit():
        raise RuntimeError(f"no time in the command's output: {text[-300:]!r}")
    return int(lines[-1].strip())


def spawn_timed(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[int, int, int]:
    """Run argv; (spawn ns, remote start ns from its stdout, exit ns)."""
    spawned = time.time_ns()
    done = subprocess.run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=RUN_TIMEOUT, check=False)
    exited = time.time_ns()
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-300:]}")
    return spawned, remote_start(done.stdout), exited


async def run_request(socket: Path, cwd: Path) -> bytes:
    """`lsync run -- sh -c DATE` as the command does it, from this process; its stdout."""
    message = {"v": 1, "op": "run", "argv": ["sh", "-c", DATE], "pty": False,
               "map_paths": False, "cwd": str(cwd)}
    out = b""
    async with stream(socket, message) as lines:
        await lines.close_stdin()
        async for line in lines:
            got = decode_output(line)
            if got is not None and got[0] == "out":
                out += got[1]
            elif line.get("done") and line.get("exit") != 0:
                raise RuntimeError(f"run request ended with {line}")
    return out


def ms(later_ns: int, earlier_ns: int) -> float:
    return (later_ns - earlier_ns) / 1e6


class LinkBench:
    """One link: the sshd behind a delay proxy, a ControlMaster, and an lsync session."""

    def __init__(self, sshd: PrivateSshd, work: Path, rtt_ms: float) -> None:
        self.sshd = sshd
        self.work = work
        self.rtt_ms = rtt_ms
        self.local = work / "local"
        self.remote = work / "remote"
        self.cache = work / "cache"  # XDG_CACHE_HOME of lsync (hash cache, control socket)
        self.env = dict(os.environ, XDG_CACHE_HOME=str(self.cache))
        self.env.pop("XDG_RUNTIME_DIR", None)
        self.rng = random.Random(int(rtt_ms))

    def prepare(self) -> None:
        for i in range(50):
            path = self.local / "src" / f"file{i:02d}.c"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(trees.text_of_size(20_000, seed=i, name=path.name))
        (self.local / EDITED).write_bytes(trees.text_of_size(20_000, seed=99, name=EDITED))

    def edit(self, i: int) -> bytes:
        """The edited file with one line changed (a new content each time)."""
        data = bytearray((self.local / EDITED).read_bytes())
        at = self.rng.randrange(0, len(data) - 40)
        data[at:at + 24] = f"/* edit {i:06d} */\n".encode().ljust(24, b" ")
        return bytes(data)

    @contextlib.contextmanager
    def running(self) -> Iterator[tuple[LsyncWatcher, ControlMaster, Link]]:
        delay = self.rtt_ms / 2000
        with ThreadedProxy(("127.0.0.1", self.sshd.port), delay) as proxy:
            config = self.sshd.write_client_config(port=proxy.port)
            link = Link(config, self.sshd.alias, self.remote)
            watcher = LsyncWatcher(self.local, link, self.work / "lsync", verbose=True,
                                   cache_home=self.cache)
            watcher.start(timeout=300)
            try:
                with ControlMaster(link) as master:
                    yield watcher, master, link
            finally:
                watcher.stop()

    def measure(self, iterations: int) -> LinkResult:
        result = LinkResult(self.rtt_ms, {key: Series(label) for key, label in ROWS.items()})
        self.prepare()
        with self.running() as (watcher, master, link):
            saved = os.environ.get("XDG_CACHE_HOME")
            os.environ["XDG_CACHE_HOME"] = str(self.cache)  # where find_socket looks
            try:
                socket = find_socket(self.local)
            finally:
                if saved is None:
                    os.environ.pop("XDG_CACHE_HOME", None)
                else:
                    os.environ["XDG_CACHE_HOME"] = saved
            if socket is None:
                raise RuntimeError("the lsync session has no control socket")
            offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)
            lsync = [*lsync_command()]
            run_argv = [*lsync, "run", "--", "sh", "-c", DATE]
            ssh_remote = f"cd {self.remote} && exec sh -c '{DATE}'"
            # What lsync.client.buildloop.loop asks sshd to run for `lsync run -- sh -c DATE`.
            inner = f"cd {shlex.quote(str(self.remote))} && exec {shlex.join(['sh', '-c', DATE])}"
            login_wrapped = f'exec "${{SHELL:-/bin/sh}}" -l -c {shlex.quote(inner)}'
            for i in range(iterations):
                self._idle(socket)
                # 1. `lsync run` spawned right after a save.
                before = time.perf_counter()
                save_file(self.local / EDITED, self.edit(i))
                saved_ns = time.time_ns()
                spawned, started, exited = spawn_timed(run_argv, self.local, self.env)
                acked = self._ack(watcher, before, offset_ns)
                result.add("cli_save", ms(started, saved_ns))
                result.add("cli_ack", ms(started, acked))
                result.add("cli_exit", ms(exited, saved_ns))
                self._idle(socket)
                # 2. The same run asked on the control socket right after a save.
                before = time.perf_counter()
                save_file(self.local / EDITED, self.edit(i + 100_000))
                saved_ns = time.time_ns()
                started = remote_start(asyncio.run(run_request(socket, self.local)))
                acked = self._ack(watcher, before, offset_ns)
                result.add("req_save", ms(started, saved_ns))
                result.add("req_ack", ms(started, acked))
                self._idle(socket)
                # 3. `lsync run` with nothing pending; `lsync status`.
                spawned, started, exited = spawn_timed(run_argv, self.local, self.env)
                result.add("idle_start", ms(started, spawned))
                result.add("idle_exit", ms(exited, spawned))
                spawned = time.time_ns()
                subprocess.run([*lsync, "status"], cwd=self.local, env=self.env,
                               stdin=subprocess.DEVNULL, capture_output=True, check=True,
                               timeout=RUN_TIMEOUT)
                result.add("status_exit", ms(time.time_ns(), spawned))
                # 4. ssh, through the ControlMaster and on a new connection.
                cm = ["ssh", "-F", str(link.ssh_config), *master.ssh_options(), link.alias,
                      ssh_remote]
                spawned, started, exited = spawn_timed(cm, self.local, self.env)
                result.add("cm_start", ms(started, spawned))
                result.add("cm_exit", ms(exited, spawned))
                wrapped = [*cm[:-1], login_wrapped]
                spawned, started, exited = spawn_timed(wrapped, self.local, self.env)
                result.add("cm_login", ms(started, spawned))
                plain = ["ssh", "-F", str(link.ssh_config), link.alias, ssh_remote]
                spawned, started, exited = spawn_timed(plain, self.local, self.env)
                result.add("ssh_start", ms(started, spawned))
                result.add("ssh_exit", ms(exited, spawned))
                say(f"RTT {self.rtt_ms:g} ms, iteration {i + 1}/{iterations}: save -> started "
                    f"{result.series['cli_save'].values[-1]:.0f} ms (command), "
                    f"{result.series['req_save'].values[-1]:.0f} ms (request)")
        return result

    @staticmethod
    def _idle(socket: Path) -> None:
        """Nothing pending in the session (a flush)."""
        asyncio.run(request(socket, {"v": 1, "op": "flush", "timeout": 60}, 70))

    @staticmethod
    def _ack(watcher: LsyncWatcher, after: float, offset_ns: int) -> int:
        found = watcher.wait_ack(EDITED, after, timeout=RUN_TIMEOUT)
        if found is None:
            raise RuntimeError(f"no ack line for {EDITED}: {watcher.tail()}")
        return wall_of(found, offset_ns)


def forget_agent_records(remote: Path) -> None:
    """Delete what the agent recorded about `remote` (gone with the work directory) under
    ~/.cache/lsync, named as in agent/records.py (the sshd logs in as this user)."""
    directory = Path.home() / ".cache" / "lsync"
    for algorithm in hashing.ALGORITHMS:
        key = f"{remote}\0{algorithm}".encode("utf-8", "surrogateescape")
        name = hashlib.sha256(key).hexdigest()[:24]
        for suffix in ("json", "journal"):
            (directory / f"agent-{name}.{suffix}").unlink(missing_ok=True)


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def table(results: Sequence[LinkResult]) -> str:
    head = "| measured (ms) | " + " | ".join(
        f"RTT {r.rtt_ms:g} ms p50 | p90" for r in results) + " |"
    rule = "|---|" + "---|---|" * len(results)
    lines = [head, rule]
    for key, label in ROWS.items():
        cells = []
        for r in results:
            series = r.series[key]
            p50 = series.p(0.5)
            mark = ""
            if key in GOAL_ROWS and p50 is not None:
                mark = " ✓" if p50 <= r.rtt_ms + GOAL_SLACK_MS else " ✗"
            cells.append(f"{fmt(p50)}{mark} | {fmt(series.p(0.9))}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"RTT {r.rtt_ms:g} ms: n = {len(r.series['cli_save'].values)}"
                       for r in results)
    goal = (f"✓/✗: p50 against the goal, remote start ≤ ack + one RTT + "
            f"{GOAL_SLACK_MS:.0f} ms. {counts}.")
    return "\n".join(lines) + "\n\n" + goal


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    return (f"{os.cpu_count()} CPUs ({model}), kernel {platform.release()}, Python "
            f"{platform.python_version()}, {ssh.stderr.strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.buildloop",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rtts-ms", default="0,300",
                        help="comma-separated round-trip times (default 0,300)")
    parser.add_argument("--iterations", type=int, default=20,
                        help="iterations on links under 100 ms RTT (default 20)")
    parser.add_argument("--slow-iterations", type=int, default=12,
                        help="iterations on longer links (default 12)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    rtts = [float(x) for x in args.rtts_ms.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="lsync-buildloop-"))
    results: list[LinkResult] = []
    try:
        with PrivateSshd(work / "sshd") as sshd:
            for rtt in rtts:
                count = args.iterations if rtt < 100 else args.slow_iterations
                say(f"RTT {rtt:g} ms: {count} iterations")
                bench = LinkBench(sshd, work / f"rtt{rtt:g}", rtt)
                try:
                    results.append(bench.measure(count))
                finally:
                    if not args.keep:
                        forget_agent_records(bench.remote)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"Machine: {machine()}")
    print(f"Command: python -m benchmarks.buildloop {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
