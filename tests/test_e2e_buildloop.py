"""End to end: the build loop (issue 9) — `lsync flush`, `lsync run`, `lsync status` and
`.lsync.toml` — against the private sshd, through a byte-counting proxy.

Two `lsync connect` sessions are shared by most tests of this module, each test working in
its own directory of the tree: one at RTT 0 and one through the delay proxy at 100 ms each
way (RTT 200 ms; enough to tell a barrier from luck and a local answer from a round trip,
and short enough for the module's time budget). Tests that break the link or kill the
session start their own. The commands run as a user would run them (`lsync flush`,
`lsync run -- make` in a directory of the tree, stdin not a terminal), except where a time
inside the session is measured: there the test sends the request itself on the session's
control socket (`lsync.client.buildloop.control.request`), so that process start-up is not counted.

What a promise means here: when `flush` returns, the remote tree is compared once, at
once (no polling after); "no network traffic" is the proxy's byte counters unchanged
across the request, measured right after a liveness ping, so that no ping (every
`PING_EVERY` s) can fall inside the window; "the remote process is gone" is checked by pid
(the remote is this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.lsync_runner import AGENT_CMDLINE_NEEDLE
from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.buildloop.control import JsonObject, request
from lsync.client.buildloop.controlpath import find_socket
from lsync.client.transport.link import PING_EVERY
from tests.conftest import (
    LSYNC,
    CountingLink,
    LsyncProcess,
    counting_link_to,
    save_atomically,
    snapshot,
    wait_steady,
    wait_until,
)

SLOW_DELAY = 0.1  # seconds one way through the proxy (RTT 200 ms)
LOCAL_ANSWER = 0.050  # seconds: a flush with nothing pending answers within this
PROMPT = 3.0  # seconds: a Ctrl-C'd (or stale) run ends within this
NOBODY = 65534  # another user (tests run as root)

# Make the pty the controlling terminal of the new session, then become the program.
_CTTY_EXEC = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
              "os.execv(sys.argv[1], sys.argv[1:])")

HELLO_MAKEFILE = """\
hello: hello.c
\tcc -o hello hello.c
run: hello
\t./hello
bad:
\tcc -c $(CURDIR)/src/bad.c -o bad.o
"""
BAD_C = """\
int main(void)
{
    return undefined_name;
}
"""


def hello_c(version: str) -> str:
    return f'#include <stdio.h>\nint main(void) {{ puts("hello {version}"); return 0; }}\n'


# -- sessions ---------------------------------------------------------------------------------


@dataclass
class Session:
    """A running `lsync connect` through a counting (and maybe delaying) proxy."""

    link: CountingLink
    local: Path
    remote: Path
    lsync: LsyncProcess
    delay: float

    def socket(self) -> Path:
        found = find_socket(self.local)
        assert found is not None, "the session has no control socket"
        return found

    def request(self, message: Mapping[str, object], timeout: float = 60) -> JsonObject:
        """One request on the session's control socket, sent from this process."""
        return asyncio.run(request(self.socket(), {"v": 1, **message}, timeout))

    def own_dir(self, name: str) -> tuple[Path, Path]:
        """A fresh local directory for one test, and where it lands remotely."""
        safe = re.sub(r"\W", "_", name)
        (self.local / safe).mkdir()
        return self.local / safe, self.remote / safe


def lsync_cli(*args: str, cwd: Path, timeout: float = 60,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One `lsync` command as a user runs it (stdin not a terminal), output captured."""
    return subprocess.run(LSYNC + list(args), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False,
                          env=None if env is None else {**os.environ, **env})


@contextlib.contextmanager
def running_session(sshd: PrivateSshd, base: Path, delay: float = 0.0,
                    extra: tuple[str, ...] = ()) -> Iterator[Session]:
    local, remote = base / "local", base / "remote"
    local.mkdir()
    (local / "README").write_text("build loop tests\n")
    with counting_link_to(sshd, delay) as link:
        lsync = LsyncProcess(link.connect_args(remote, *extra), cwd=local)
        try:
            lsync.wait_for_line(" ready ", timeout=60)
            yield Session(link, local, remote, lsync, delay)
        finally:
            if lsync.proc.poll() is None:
                lsync.interrupt()
            else:
                lsync.finish(timeout=5)


@pytest.fixture(scope="module")
def fast(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The module's session at RTT 0."""
    with running_session(sshd, tmp_path_factory.mktemp("fast")) as session:
        yield session


@pytest.fixture(scope="module")
def slow(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The module's session through the delay proxy (SLOW_DELAY each way)."""
    with running_session(sshd, tmp_path_factory.mktemp("slow"), SLOW_DELAY) as session:
        yield session


@pytest.fixture(params=["rtt0", "rtt200"])
def session(request: pytest.FixtureRequest) -> Session:
    """Each of the two shared sessions in turn."""
    value = request.getfixturevalue("fast" if request.param == "rtt0" else "slow")
    assert isinstance(value, Session)
    return value


@pytest.fixture
def own_session(sshd: PrivateSshd, tmp_path: Path) -> Iterator[Session]:
    """A session of the test's own (RTT 0), for tests that break its link."""
    with running_session(sshd, tmp_path) as session:
        yield session


@contextlib.contextmanager
def link_delay(session: Session, delay: float) -> Iterator[None]:
    """The session's link at one-way `delay` (0: unchanged) for the block's duration."""
    if not delay:
        yield
        return
    session.link.proxy.set_delay(delay)
    try:
        yield
    finally:
        session.link.proxy.set_delay(session.delay)


def differences(local: Path, remote: Path) -> list[str]:
    want, have = snapshot(local), snapshot(remote)
    return sorted(rel for rel in set(want) | set(have) if want.get(rel) != have.get(rel))


def after_a_ping(session: Session) -> float:
    """Wait for the session's next liveness ping and its answer; return (monotonic) when
    the link went quiet after it. No ping is sent for PING_EVERY s after one."""
    proxy = session.link.proxy
    before = proxy.counters().bytes_up
    assert wait_until(lambda: proxy.counters().bytes_up != before, PING_EVERY + 3), \
        "no liveness ping seen"
    wait_steady(lambda: proxy.counters().bytes_total, quiet=2 * session.delay + 0.1)
    return time.monotonic()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_pid(path: Path, process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> int:
    """The pid a remote command wrote into `path` (waits for it, bounded)."""
    def written() -> bool:
        with contextlib.suppress(FileNotFoundError):
            return path.read_text().endswith("\n")
        return False

    assert wait_until(lambda: written() or process.poll() is not None), f"no {path}"
    assert written(), f"`lsync run` exited {process.poll()} before the command started"
    return int(path.read_text())


def end_remote(pid: int | None) -> None:
    """Clean-up: kill a remote command a failed test left running."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- flush ------------------------------------------------------------------------------------


def test_flush_after_a_burst_of_saves_returns_when_all_are_remote(
        session: Session, request: pytest.FixtureRequest) -> None:
    local, remote = session.own_dir(request.node.name)
    for i in range(20):
        (local / f"base{i}.c").write_text(f"int base{i};\n" * 40)
    session.request({"op": "flush", "timeout": 30})
    assert not differences(local, remote)
    # The burst: edits in place, atomic saves, deletes, new files, one bigger file.
    for i in range(10):
        (local / f"base{i}.c").write_text(f"int base{i} = {i}; /* edited */\n" * 40)
    for i in range(10, 13):
        save_atomically(local / f"base{i}.c", f"long base{i};\n".encode() * 50)
    for i in range(13, 16):
        (local / f"base{i}.c").unlink()
    (local / "new").mkdir()
    for i in range(30):
        (local / "new" / f"n{i}.c").write_text(f"int n{i};\n")
    (local / "big.bin").write_bytes(os.urandom(300_000))
    last = local / "new" / "last.h"
    last.write_text("#define LAST 1\n")
    absent_when_asked = not (remote / "new" / "last.h").exists()
    reply = session.request({"op": "flush", "timeout": 30})
    left = differences(local, remote)  # once, at the moment flush returned
    assert not left, f"flush returned ({reply}) with {len(left)} paths differing: {left[:10]}"
    if session.delay:
        assert absent_when_asked, "the last save was remote before flush was asked"


def test_flush_command_returns_once_a_save_in_flight_is_remote(
        slow: Session, request: pytest.FixtureRequest) -> None:
    local, remote = slow.own_dir(request.node.name)
    with link_delay(slow, 0.4):  # RTT 800 ms: the command starts before the ack is back
        (local / "main.c").write_text("int main(void) { return 0; }\n")
        done = lsync_cli("flush", "--timeout", "30", cwd=local)
        arrived = (remote / "main.c").exists() and (remote / "main.c").read_bytes() == \
            (local / "main.c").read_bytes()
    assert done.returncode == 0, done.stderr
    assert arrived, "lsync flush returned before the save was remote"


def test_flush_with_nothing_pending_answers_locally_without_network_traffic(
        session: Session) -> None:
    session.request({"op": "flush", "timeout": 30})  # whatever an earlier test left
    quiet_since = after_a_ping(session)
    proxy = session.link.proxy
    times: list[float] = []
    for _ in range(5):
        before = proxy.counters()
        started = time.perf_counter()
        session.request({"op": "flush", "timeout": 30})
        times.append(time.perf_counter() - started)
        after = proxy.counters()
        assert (after.bytes_up, after.bytes_down) == (before.bytes_up, before.bytes_down), \
            "a flush with nothing pending sent or received bytes"
    assert time.monotonic() - quiet_since < PING_EVERY - 1, "measured too late after a ping"
    assert max(times) < LOCAL_ANSWER, f"flush answers took {[round(t * 1000, 1) for t in times]} ms"


def test_flush_waits_for_the_reconnect_after_a_cut_and_then_succeeds(
        own_session: Session) -> None:
    s = own_session
    assert s.link.proxy.cut() == 1
    (s.local / "during-cut.c").write_text("int cut;\n")
    done = lsync_cli("flush", "--timeout", "30", cwd=s.local)
    assert done.returncode == 0, done.stderr
    assert (s.remote / "during-cut.c").read_text() == "int cut;\n"
    assert s.lsync.saw("reconnecting in"), "the link was not broken: the test proved nothing"


def test_flush_times_out_with_exit_1_while_the_link_cannot_come_back(
        own_session: Session) -> None:
    s = own_session
    s.link.proxy.set_accepting(False)
    assert s.link.proxy.cut() == 1
    s.lsync.wait_for_line("reconnecting in")
    (s.local / "while-down.c").write_text("int down;\n")
    started = time.monotonic()
    done = lsync_cli("flush", "--timeout", "1.5", cwd=s.local)
    took = time.monotonic() - started
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert 1.5 <= took < 1.5 + 5, took
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and "not connected" in said[0], done.stderr
    assert not (s.remote / "while-down.c").exists()
    # The link comes back: the same session delivers the save and flushes.
    s.link.proxy.set_accepting(True)
    done = lsync_cli("flush", "--timeout", "30", cwd=s.local)
    assert done.returncode == 0, done.stderr
    assert (s.remote / "while-down.c").read_text() == "int down;\n"


@pytest.mark.parametrize("after", [0.0, 0.2, 0.5])
def test_run_during_a_reconnect_runs_on_the_remote_after_the_link_is_back(
        own_session: Session, after: float) -> None:
    """Cut, then `lsync run` at once or a little later, inside the reconnect's backoff:
    the command runs over SSH once the link is back (it ran locally, 3 times of 3)."""
    s = own_session
    assert s.link.proxy.cut() == 1
    if after:
        time.sleep(after)  # (the moment of the run, not a wait for a condition)
    done = lsync_cli("run", "--timeout", "30", "--", "sh", "-c",
                     "echo where=${SSH_CONNECTION:-none}", cwd=s.local)
    assert done.returncode == 0, (done.returncode, done.stderr)
    where = [line for line in done.stdout.splitlines() if line.startswith("where=")]
    assert len(where) == 1 and where[0] != "where=none", done.stdout
    assert s.lsync.saw("reconnecting in"), "the link was not broken: the test proved nothing"


def _agents_serving(remote: Path) -> list[int]:
    """Pids of the lsync agents that hold a descriptor in the remote tree `remote`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if AGENT_CMDLINE_NEEDLE.encode() not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if Path(os.readlink(f"/proc/{entry}/fd/{fd}")) == remote:
                        found.append(int(entry))
                        break
    return found


@pytest.mark.parametrize("fault", ["cut", "agent-kill"])
def test_run_whose_connection_breaks_under_the_command_exits_125(
        own_session: Session, fault: str) -> None:
    """The link is cut, or the agent killed, while the remote command runs: its outcome is
    unknown, which is 125 (lsync could not run it to the end), never a made-up status (an
    agent kill gave 255)."""
    s = own_session
    agents = _agents_serving(s.remote.resolve())
    assert len(agents) == 1, agents
    runner = subprocess.Popen([*LSYNC, "run", "--", "sh", "-c", "echo started; sleep 60"],
                              cwd=s.local, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        assert runner.stdout is not None
        assert runner.stdout.readline().strip() == "started"
        if fault == "cut":
            assert s.link.proxy.cut() >= 1
        else:
            os.kill(agents[0], signal.SIGKILL)
        status = runner.wait(timeout=60)
        assert status == 125, (status, runner.stderr.read() if runner.stderr else "")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_run_while_the_link_stays_down_exits_125_without_running_anything(
        own_session: Session) -> None:
    s = own_session
    s.link.proxy.set_accepting(False)
    assert s.link.proxy.cut() == 1
    marker = s.local / "ran-here"
    done = lsync_cli("run", "--timeout", "1.5", "--", "sh", "-c",
                     f"echo where=${{SSH_CONNECTION:-none}}; touch {marker}", cwd=s.local)
    assert done.returncode == 125, (done.returncode, done.stdout, done.stderr)
    assert "where=" not in done.stdout and not marker.exists()
    assert "not connected" in done.stderr, done.stderr
    status = json.loads(lsync_cli("status", "--json", cwd=s.local).stdout)
    assert status["connected"] is False and status["state"].startswith("disconnected")
    s.link.proxy.set_accepting(True)


def test_flush_times_out_with_the_pending_paths_counted_on_a_frozen_link(
        own_session: Session) -> None:
    s = own_session
    assert s.link.proxy.freeze() == 1  # connected, but nothing gets through
    (s.local / "stuck.c").write_text("int stuck;\n")
    done = lsync_cli("flush", "--timeout", "1", cwd=s.local)
    assert done.returncode == 1, (done.returncode, done.stderr)
    said = done.stderr.strip().splitlines()
    s.lsync.proc.kill()  # its Ctrl-C would wait for the frozen link to drain
    assert len(said) == 1 and "1 paths still pending" in said[0], done.stderr


# -- run --------------------------------------------------------------------------------------


def test_run_make_sees_the_save_made_just_before_it(
        session: Session, request: pytest.FixtureRequest) -> None:
    local, _ = session.own_dir(request.node.name)
    (local / "Makefile").write_text(HELLO_MAKEFILE)
    (local / "hello.c").write_text(hello_c("v1"))
    first = lsync_cli("run", "--", "make", "-s", "run", cwd=local)
    assert (first.returncode, first.stdout) == (0, "hello v1\n"), first.stderr
    (local / "hello.c").write_text(hello_c("v2"))
    second = lsync_cli("run", "--", "make", "-s", "run", cwd=local)
    assert (second.returncode, second.stdout) == (0, "hello v2\n"), second.stderr


def test_run_waits_for_a_save_the_watcher_has_not_delivered_yet(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    # A write already sent is always on the remote before a command that follows it on the
    # same connection starts: the barrier shows where the watcher still holds a save. Here
    # it holds every save for 1 s of quiet, longer than `lsync run` takes to start.
    with running_session(sshd, tmp_path, extra=("--step-ms", "1000",
                                                "--debounce-ms", "3000")) as s:
        (s.local / "Makefile").write_text(HELLO_MAKEFILE)
        (s.local / "hello.c").write_text(hello_c("v1"))
        s.request({"op": "flush", "timeout": 30})
        started = time.monotonic()
        (s.local / "hello.c").write_text(hello_c("v2"))
        done = lsync_cli("run", "--", "make", "-s", "run", cwd=s.local)
        assert (done.returncode, done.stdout) == (0, "hello v2\n"), done.stderr
        assert time.monotonic() - started >= 1.0  # it did wait for the watcher


def test_run_exits_with_the_commands_status(fast: Session, request: pytest.FixtureRequest
                                            ) -> None:
    local, _ = fast.own_dir(request.node.name)
    assert lsync_cli("run", "--", "sh", "-c", "exit 7", cwd=local).returncode == 7
    assert lsync_cli("run", "--", "true", cwd=local).returncode == 0
    killed = lsync_cli("run", "--", "sh", "-c", "kill -TERM $$", cwd=local)
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr
    (local / "src").mkdir()
    (local / "src" / "bad.c").write_text(BAD_C)
    (local / "Makefile").write_text(HELLO_MAKEFILE)
    failed = lsync_cli("run", "--", "make", "bad", cwd=local)
    assert failed.returncode == 2, (failed.returncode, failed.stderr)  # make's own status
    assert "undefined_name" in failed.stderr


def test_run_output_names_local_paths_and_no_map_paths_keeps_remote_ones(
        fast: Session, request: pytest.FixtureRequest) -> None:
    local, remote = fast.own_dir(request.node.name)
    (local / "src").mkdir()
    (local / "src" / "bad.c").write_text(BAD_C)
    (local / "Makefile").write_text(HELLO_MAKEFILE)
    mapped = lsync_cli("run", "--", "make", "bad", cwd=local)
    assert mapped.returncode == 2
    assert f"{local}/src/bad.c:3:" in mapped.stderr, mapped.stderr
    assert str(fast.remote) not in mapped.stdout + mapped.stderr
    unmapped = lsync_cli("run", "--no-map-paths", "--", "make", "bad", cwd=local)
    assert unmapped.returncode == 2
    assert f"{remote}/src/bad.c:3:" in unmapped.stderr, unmapped.stderr
    assert str(fast.local) not in unmapped.stdout + unmapped.stderr


def test_run_opens_no_new_ssh_connection(slow: Session, request: pytest.FixtureRequest
                                         ) -> None:
    local, _ = slow.own_dir(request.node.name)
    before = slow.link.proxy.counters().connections_total
    for i in range(3):
        (local / f"step{i}.c").write_text(f"int step{i};\n")
        done = lsync_cli("run", "--", "cat", f"step{i}.c", cwd=local)
        assert (done.returncode, done.stdout) == (0, f"int step{i};\n"), done.stderr
    assert slow.link.proxy.counters().connections_total == before


def test_ctrl_c_of_lsync_run_without_a_terminal_ends_the_remote_command(
        fast: Session, request: pytest.FixtureRequest) -> None:
    local, remote = fast.own_dir(request.node.name)
    run = subprocess.Popen([*LSYNC, "run", "--", "sh", "-c", "echo $$ > pid; exec sleep 60"],
                           cwd=local, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    pid: int | None = None
    try:
        pid = read_pid(remote / "pid", run)
        run.send_signal(signal.SIGINT)
        try:
            status = run.wait(timeout=PROMPT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"lsync run still running {PROMPT} s after Ctrl-C "
                        f"(remote command alive: {alive(pid)})")
        assert status == 128 + signal.SIGINT
        assert wait_until(lambda: not alive(pid), PROMPT), "the remote command survived"
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate(timeout=10)
        end_remote(pid)


class Watching:
    """`lsync run --watch -- ARGS` in `cwd`; its output lines (stdout and stderr) kept."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([*LSYNC, "run", "--watch", "--", *args], cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, line: str, count: int = 1) -> None:
        if not wait_until(lambda: self.lines.count(line) >= count
                          or self.proc.poll() is not None):
            raise AssertionError(f"no {line!r} (x{count}) from lsync run --watch:\n"
                                 + "\n".join(self.lines))
        assert self.lines.count(line) >= count, "\n".join(self.lines)

    def stop(self) -> int:
        """Ctrl-C, and the exit status."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=PROMPT)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


WAITING = "lsync: exit 0; waiting for changes (Ctrl-C to stop)"


def test_run_watch_runs_again_after_each_change_lands(
        fast: Session, request: pytest.FixtureRequest) -> None:
    local, _ = fast.own_dir(request.node.name)
    (local / "f.txt").write_text("one\n")
    watching = Watching(["cat", "f.txt"], local)
    try:
        watching.wait_for(WAITING)
        assert watching.lines[:1] == ["one"]
        (local / "f.txt").write_text("two\n")
        watching.wait_for(WAITING, 2)
        (local / "f.txt").write_text("three\n")
        watching.wait_for(WAITING, 3)
        assert watching.stop() == 128 + signal.SIGINT
        # (The remote login shell's own stderr, e.g. a profile's complaint when two login
        # shells start at once, is passed on too: only the command's lines are counted.)
        ran = [line for line in watching.lines if line in ("one", "two", "three")]
        assert ran == ["one", "two", "three"], watching.lines
    finally:
        if watching.proc.poll() is None:
            watching.stop()


def test_run_watch_interrupts_a_run_that_a_newer_change_made_stale(
        fast: Session, request: pytest.FixtureRequest) -> None:
    local, remote = fast.own_dir(request.node.name)
    (local / "f.txt").write_text("one\n")
    watching = Watching(["sh", "-c", "cat f.txt; echo $$ > pid; exec sleep 60"], local)
    pid: int | None = None
    try:
        pid = read_pid(remote / "pid", watching.proc)
        (remote / "pid").unlink()
        (local / "f.txt").write_text("two\n")
        assert wait_until(lambda: "two" in watching.lines, PROMPT), \
            f"the stale run went on:\n{watching.lines}"
        assert not alive(pid)
    finally:
        watching.kill()
        end_remote(pid)
        with contextlib.suppress(FileNotFoundError, ValueError):
            end_remote(int((remote / "pid").read_text()))


class Terminal:
    """A program running on a pty that is its controlling terminal (as in a shell)."""

    def __init__(self, argv: list[str], cwd: Path, size: tuple[int, int] | None) -> None:
        master, slave = pty.openpty()
        if size is not None:
            cols, rows = size
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(
            [LSYNC[0], "-c", _CTTY_EXEC, *LSYNC, *argv], cwd=cwd, stdin=slave, stdout=slave,
            stderr=slave, start_new_session=True, env={**os.environ, "TERM": "xterm"})
        os.close(slave)
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the last holder of the slave side is gone
                return
            if not data:
                return
            with self._lock:
                self._output += data

    def text(self) -> str:
        with self._lock:
            return self._output.decode("utf-8", "replace")

    def finish(self, timeout: float) -> int:
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        os.close(self.master)


def test_ctrl_c_of_lsync_run_on_a_terminal_ends_the_remote_command(
        fast: Session, request: pytest.FixtureRequest) -> None:
    local, remote = fast.own_dir(request.node.name)
    command = "stty size; echo $$ > pid; exec sleep 60"
    terminal = Terminal(["run", "--", "sh", "-c", command], local, size=(120, 40))
    pid: int | None = None
    try:
        pid = read_pid(remote / "pid", terminal.proc)
        running = json.loads(lsync_cli("status", "--json", cwd=local).stdout)["commands"]
        assert running == [f"sh -c '{command}'"], running
        os.write(terminal.master, b"\x03")  # the terminal turns it into SIGINT
        try:
            status = terminal.finish(timeout=PROMPT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"lsync run still running {PROMPT} s after Ctrl-C:\n{terminal.text()}")
        assert status == 128 + signal.SIGINT, terminal.text()
        assert wait_until(lambda: not alive(pid), PROMPT), "the remote command survived"
        assert "40 120" in terminal.text(), terminal.text()  # the remote pty has our size
    finally:
        terminal.close()
        end_remote(pid)


def test_run_on_a_terminal_of_unknown_size_uses_80x24(
        fast: Session, request: pytest.FixtureRequest) -> None:
    local, _ = fast.own_dir(request.node.name)
    terminal = Terminal(["run", "--", "stty", "size"], local, size=None)  # a 0x0 pty
    try:
        assert terminal.finish(timeout=30) == 0, terminal.text()
        assert "24 80" in terminal.text(), terminal.text()
    finally:
        terminal.close()


# -- the control socket and status ------------------------------------------------------------


def connect_as_nobody(path: Path) -> str:
    """Connect to the Unix socket at `path` from a child process running as another user;
    what it got: "ERR <errno name>" or "OK <first line the server sent>"."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        outcome = b"ERR child failed"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(os.fsencode(path))
                    outcome = b"OK " + sock.recv(4096).split(b"\n")[0]
                except OSError as exc:
                    outcome = f"ERR {errno.errorcode.get(exc.errno or 0, exc.errno)}".encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            return pipe.read().decode()
    finally:
        os.waitpid(child, 0)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")


@needs_root
def test_control_socket_is_mode_0600_in_a_private_directory_and_refuses_another_user(
        fast: Session) -> None:
    path = fast.socket()
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    directory = path.parent.lstat()
    assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == os.geteuid()
    assert connect_as_nobody(path) == "ERR EACCES"
    assert fast.request({"op": "hello"})["pid"] == fast.lsync.proc.pid


@needs_root
def test_session_refuses_another_user_even_through_a_world_writable_socket(
        sshd: PrivateSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="lsync-xdg-", dir="/tmp"))  # reachable by nobody
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        with running_session(sshd, tmp_path) as s:
            path = s.socket()
            assert path.parent == runtime / "lsync"
            # Loosen everything a mode can loosen: only the session's own check is left.
            runtime.chmod(0o711)
            path.parent.chmod(0o711)
            path.chmod(0o666)
            got = connect_as_nobody(path)
            assert got.startswith("OK "), got
            assert json.loads(got[3:]) == {
                "v": 1, "ok": False, "done": True, "code": "refused",
                "error": "this lsync session belongs to another user"}
            assert s.request({"op": "hello"})["pid"] == s.lsync.proc.pid  # still serving
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_stale_socket_of_a_killed_session_is_replaced_by_the_next_session(
        own_session: Session) -> None:
    s = own_session
    path = s.socket()
    s.lsync.proc.kill()  # SIGKILL: no clean-up
    s.lsync.finish(timeout=10)
    assert stat.S_ISSOCK(path.lstat().st_mode), "nothing stale left: the test proves nothing"
    flushed = lsync_cli("flush", cwd=s.local)
    assert flushed.returncode == 3, flushed.stderr
    successor = LsyncProcess(s.link.connect_args(s.remote), cwd=s.local)
    try:
        successor.wait_for_line(" ready ", timeout=60)
        assert s.socket() == path
        assert s.request({"op": "hello"})["pid"] == successor.proc.pid
        assert lsync_cli("flush", cwd=s.local).returncode == 0
    finally:
        successor.interrupt()


def test_second_session_for_the_same_tree_is_refused_naming_the_first(fast: Session) -> None:
    second = subprocess.run(
        LSYNC + fast.link.connect_args(fast.remote.with_name("elsewhere")), cwd=fast.local,
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30, check=False)
    assert second.returncode == 2, second.stderr
    assert f"another lsync connect is running for this tree (pid {fast.lsync.proc.pid})" \
        in second.stderr
    assert not fast.remote.with_name("elsewhere").exists()


def test_status_json_reports_state_target_and_counters(fast: Session,
                                                       request: pytest.FixtureRequest) -> None:
    local, _ = fast.own_dir(request.node.name)
    (local / "counted.c").write_bytes(b"x" * 1000)
    fast.request({"op": "flush", "timeout": 30})
    shown = lsync_cli("status", "--json", cwd=local)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "watching"
    assert status["connected"] is True
    assert status["target"] == f"{fast.link.sshd.alias}:{fast.remote}"
    assert status["local"] == str(fast.local)
    assert status["pid"] == fast.lsync.proc.pid
    assert status["files"] >= 2 and status["bytes"] >= 1000
    assert (status["queued"], status["in_flight"], status["pending"]) == (0, 0, 0)
    assert status["last_error"] == ""
    text = lsync_cli("status", cwd=local)
    assert text.returncode == 0
    assert text.stdout.startswith(f"watching: {fast.local} -> {status['target']}\n"), text.stdout


def test_without_a_session_run_exits_125_flush_and_status_exit_3(tmp_path: Path) -> None:
    ran = lsync_cli("run", "--", "true", cwd=tmp_path)
    assert ran.returncode == 125
    assert ran.stdout == "" and len(ran.stderr.splitlines()) == 1, ran.stderr
    assert "no running `lsync connect`" in ran.stderr
    flushed = lsync_cli("flush", cwd=tmp_path)
    assert flushed.returncode == 3, flushed.stderr
    assert lsync_cli("status", cwd=tmp_path).returncode == 3


def test_run_connect_without_a_session_syncs_once_runs_and_stops(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / "a.c").write_text("int a;\n")
    (local / ".lsync.toml").write_text(
        f'target = "{sshd.alias}:{remote}"\nssh_config = "{sshd.client_config}"\n')
    ran = lsync_cli("run", "--connect", "--", "sh", "-c", "cat a.c; exit 5", cwd=local)
    assert ran.returncode == 5, ran.stderr
    assert ran.stdout == "int a;\n"
    assert (remote / "a.c").read_text() == "int a;\n"
    assert lsync_cli("status", cwd=local).returncode == 3  # nothing left running


# -- the project file -------------------------------------------------------------------------


def test_connect_without_arguments_uses_the_project_file(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / "a.c").write_text("int a;\n")
    (local / "scratch.tmp").write_text("not synced\n")
    (local / ".lsync.toml").write_text(
        f'target = "{sshd.alias}:{remote}"\n'
        f'ssh_config = "{sshd.client_config}"\n'
        'exclude = ["*.tmp"]\n'
        "\n[run]\nmap_paths = false\n")
    lsync = LsyncProcess(["connect"], cwd=local)
    try:
        lsync.wait_for_line(" ready ", timeout=60)
        assert (remote / "a.c").read_text() == "int a;\n"
        assert not (remote / "scratch.tmp").exists()
        shown = lsync_cli("run", "--", "sh", "-c", 'echo "$PWD/a.c:1:"', cwd=local)
        assert shown.stdout == f"{remote}/a.c:1:\n", shown.stdout  # [run] map_paths = false
    finally:
        lsync.interrupt()


@pytest.mark.parametrize(("text", "line", "says"), [
    ('target = "host:tree"\n\ninclude-vcs = true\n', 3,
     "unknown key `include-vcs` (did you mean `include_vcs`?)"),
    ('target = "host:tree"\nstep_ms = "fast"\n', 2, "step_ms"),
], ids=["unknown-key", "bad-value"])
def test_project_file_error_exits_2_naming_the_line(tmp_path: Path, text: str, line: int,
                                                     says: str) -> None:
    (tmp_path / ".lsync.toml").write_text(text)
    done = lsync_cli("connect", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    said = done.stderr.strip().splitlines()
    assert len(said) == 1, done.stderr
    assert f"{tmp_path}/.lsync.toml, line {line}: " in said[0] and says in said[0], said[0]
