"""The sessions the build-loop tests drive: a running `lsync connect`, and what they do with it.

`Session` is a running `lsync connect` against the private sshd through a counting (and
maybe delaying) proxy (`counting_link_to` of tests/conftest.py), with its control socket;
`running_session` starts one and stops it as Ctrl-C does; `own_session` is the fixture for
a test that needs a session of its own (it breaks the link, or kills the session).
`lsync_cli` runs one `lsync` command as a user runs it (stdin not a terminal). The helpers
change the link's delay for a while (`link_delay`), compare trees (`differences`), find the
quiet moment after a liveness ping (`after_a_ping`), follow the remote command of an
`lsync run` by pid (`read_pid`, `alive`, `end_remote`: the remote is this machine), and
connect to a socket as another user (`connect_as_nobody`). Used by
tests/test_e2e_buildloop*.py and tests/test_e2e_fleet.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.buildloop.control import JsonObject, request
from lsync.client.buildloop.controlpath import find_socket
from lsync.client.transport.link import PING_EVERY
from tests.conftest import (
    LSYNC,
    CountingLink,
    LsyncProcess,
    counting_link_to,
    snapshot,
    wait_steady,
    wait_until,
)

NOBODY = 65534  # another user (tests run as root)


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

