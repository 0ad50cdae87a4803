"""End to end: the build loop's commands while the link breaks — `lsync flush` and `lsync run`
across a cut, a reconnect, a link that stays down, a frozen link, an agent killed under the
command — against the private sshd, through a byte-counting proxy that cuts, refuses or
freezes connections.

Each test starts a session of its own (`own_session`, tests/loopsession.py) and breaks its
link through the proxy (a cut, new connections refused, a frozen link) or kills its agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.lsync_runner import AGENT_CMDLINE_NEEDLE
from tests.conftest import LSYNC
from tests.loopsession import Session, lsync_cli
from tests.loopsession import own_session as own_session  # (a fixture)


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

