"""End to end: the interactive session on a terminal — the live status line and Ctrl-C.

`lsync connect` runs on a pseudo-terminal that is its controlling terminal (as in a shell),
against the private sshd and against a local directory. On a terminal lsync draws one live
line: connection state, files and bytes synced, queue depth and the last save-to-ack
latency, and `in sync HH:MM:SS` once a convergence check found nothing left. The tests read
what the terminal shows: right after the `in sync: ...; watching` line (the terminal's
` ready `) the trees are compared once, and after a save they wait (bounded) for the status
line to count it with `in sync` shown again, then compare the trees once (lsync has promised
they are equal). Ctrl-C is typed into the terminal (so the whole foreground process group
gets SIGINT, a local agent included); lsync must drain, say goodbye and exit 0.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LSYNC, WAIT, assert_same_now, fresh_dirs, wait_until

# Make the pty the controlling terminal of the new session, then become lsync.
_CTTY_EXEC = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
              "os.execv(sys.argv[1], sys.argv[1:])")
_STATUS = re.compile(r"(?P<state>[^|]+?) \| (?:\[[#.]+\][^|]*\| )?(?P<files>\d+) files \| "
                     r"(?P<size>[\d.]+ (?:B|KiB|MiB|GiB)) \| queue (?P<queued>\d+)\+"
                     r"(?P<in_flight>\d+) \| last (?P<last>-|\d+ ms)"
                     r"(?: \| \d+ errors)?(?: \| in sync (?P<synced>[\d:]+))?")


class TerminalLsync:
    """`lsync` running on a pty that is its controlling terminal; what it shows is kept."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CTTY_EXEC, *LSYNC, *args], cwd=cwd, stdin=slave,
            stdout=slave, stderr=slave, start_new_session=True,
            env={**os.environ, "TERM": "xterm"})
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

    def screens(self) -> list[str]:
        """Every line state the terminal showed: each redraw and each printed line."""
        return [part.strip() for part in re.split(r"\r\x1b\[2K|\r|\n", self.text())
                if part.strip()]

    def statuses(self) -> list[re.Match[str]]:
        return [match for screen in self.screens() if (match := _STATUS.fullmatch(screen))]

    def current(self) -> re.Match[str] | None:
        """The status line the terminal shows now (the last one drawn)."""
        found = self.statuses()
        return found[-1] if found else None

    def wait_for(self, what: str, condition: Callable[[], object],
                 timeout: float = WAIT) -> None:
        if not wait_until(lambda: bool(condition()) or self.proc.poll() is not None, timeout) \
                or not condition():
            raise AssertionError(f"no {what} on the terminal (exit {self.proc.poll()}):\n"
                                 + "\n".join(self.screens()[-15:]))

    def ctrl_c(self) -> int:
        os.write(self.master, b"\x03")  # the terminal turns it into SIGINT
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._reader.join(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[list[TerminalLsync]]:
    started: list[TerminalLsync] = []
    yield started
    for session in started:
        session.close()


def _settled_after(session: TerminalLsync, files_before: int) -> bool:
    """The status line counts a new file, shows nothing queued and `in sync` again (which
    is cleared while work is queued, so it now covers the save)."""
    status = session.current()
    return (status is not None and status["state"] == "watching"
            and int(status["files"]) > files_before and status["queued"] == "0"
            and status["in_flight"] == "0" and status["last"] != "-"
            and status["synced"] is not None)


def _check_live_line_and_ctrl_c(session: TerminalLsync, local: Path, remote: Path) -> None:
    session.wait_for("'in sync' line", lambda: any(s.startswith("in sync:")
                                                   for s in session.screens()))
    assert_same_now(local, remote)  # the terminal's `ready`: trusted, compared once
    session.wait_for("watching status", lambda: (s := session.current()) is not None
                     and s["state"] == "watching")
    status = session.current()
    assert status is not None
    files_before = int(status["files"])
    (local / "edited.c").write_text("int edited(void) { return 1; }\n")
    # The line catches up with the save: one more file, nothing queued, a latency shown.
    session.wait_for("status line after the save", lambda: _settled_after(session,
                                                                          files_before))
    assert_same_now(local, remote)
    assert session.ctrl_c() == 0, "\n".join(session.screens()[-15:])
    assert any(screen.startswith("stopped |") for screen in session.screens()), (
        session.screens()[-5:])


def test_terminal_shows_live_status_line_and_ctrl_c_exits_zero_over_ssh(
        sshd: PrivateSshd, tmp_path: Path, terminal: list[TerminalLsync]) -> None:
    local, remote = fresh_dirs(tmp_path)
    for i in range(5):
        (local / f"f{i}.c").write_text(f"int f{i};\n" * 100)
    session = TerminalLsync(["connect", "-F", str(sshd.client_config),
                             f"{sshd.alias}:{remote}"], cwd=local)
    terminal.append(session)
    _check_live_line_and_ctrl_c(session, local, remote)
    assert any(screen.startswith(f"connecting to {sshd.alias}") for screen in session.screens())


def test_terminal_shows_live_status_line_and_ctrl_c_exits_zero_with_a_local_agent(
        tmp_path: Path, terminal: list[TerminalLsync]) -> None:
    local, remote = fresh_dirs(tmp_path)
    for i in range(5):
        (local / f"f{i}.c").write_text(f"int f{i};\n" * 100)
    session = TerminalLsync(["connect", str(remote)], cwd=local)
    terminal.append(session)
    _check_live_line_and_ctrl_c(session, local, remote)
