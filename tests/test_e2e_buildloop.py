"""End to end: the build loop (issue 9) — `lsync flush`, `lsync run` and `lsync status` on a
running session — against the private sshd, through a byte-counting proxy.

Two `lsync connect` sessions are shared by most tests of this module, each test working in
its own directory of the tree: one at RTT 0 and one through the delay proxy at 100 ms each
way (RTT 200 ms; enough to tell a barrier from luck and a local answer from a round trip,
and short enough for the module's time budget). Tests that break the link start their own
session (tests/test_e2e_buildloop_faults.py), and so do the tests of sessions that start,
end or are refused, and of `.lsync.toml` (tests/test_e2e_buildloop_sessions.py); the
session and its helpers are in tests/loopsession.py. The commands run as a user would run
them (`lsync flush`, `lsync run -- make` in a directory of the tree, stdin not a terminal),
except where a time inside the session is measured: there the test sends the request itself
on the session's control socket (`lsync.client.buildloop.control.request`), so that process
start-up is not counted.

What a promise means here: when `flush` returns, the remote tree is compared once, at
once (no polling after); "no network traffic" is the proxy's byte counters unchanged
across the request, measured right after a liveness ping, so that no ping (every
`PING_EVERY` s) can fall inside the window; "the remote process is gone" is checked by pid
(the remote is this machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import signal
import stat
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.transport.link import PING_EVERY
from tests.conftest import LSYNC, save_atomically, wait_until
from tests.loopsession import (
    Session,
    after_a_ping,
    alive,
    connect_as_nobody,
    differences,
    end_remote,
    link_delay,
    lsync_cli,
    needs_root,
    read_pid,
    running_session,
)

SLOW_DELAY = 0.1  # seconds one way through the proxy (RTT 200 ms)
LOCAL_ANSWER = 0.050  # seconds: a flush with nothing pending answers within this
PROMPT = 3.0  # seconds: a Ctrl-C'd (or stale) run ends within this

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


