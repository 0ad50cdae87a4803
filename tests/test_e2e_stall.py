"""End to end: a link that goes silent (no RST, no byte either way) is noticed and healed.

The delay proxy freezes the connection lsync uses: bytes stop both ways and nothing is
closed, as when a VPN or a NAT drops a flow. lsync must notice within its stall bound
(lsync.client.transport.link.STALL, plus a ping interval), say so, reconnect through the proxy (new
connections are not frozen), and deliver the edits made meanwhile.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.transport.link import PING_EVERY, STALL
from tests.conftest import LsyncProcess, assert_trees_equal, counting_link_to, fresh_dirs
from tests.loopsession import lsync_cli

NOTICE_BOUND = STALL + PING_EVERY + 5  # seconds from the freeze to the reconnect message


def test_frozen_link_is_noticed_and_edits_made_meanwhile_arrive(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a.c").write_text("int a;\n")
    with counting_link_to(sshd) as link:
        lsync = LsyncProcess(link.connect_args(remote), cwd=local)
        try:
            lsync.wait_for_line(" ready ")
            assert_trees_equal(local, remote, timeout=0)
            frozen_at = time.monotonic()
            assert link.proxy.freeze() == 1
            (local / "a.c").write_text("int a = 1; /* made while the link was frozen */\n")
            (local / "b.c").write_text("int b;\n")
            lsync.wait_for_line("no answer from the agent", timeout=NOTICE_BOUND)
            noticed = time.monotonic() - frozen_at
            assert noticed <= NOTICE_BOUND
            lsync.wait_for_count(" ready ", 2, timeout=30)
            assert_trees_equal(local, remote, timeout=0)
        finally:
            lsync.interrupt()


def test_a_second_ctrl_c_stops_at_once_while_a_frozen_link_holds_the_drain(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    """The first Ctrl-C drains what is queued; on a frozen link that would last until the
    stall bound. A second one stops lsync at once (exit 130, the unconfirmed changes
    named), and the next lsync sends them."""
    local, remote = fresh_dirs(tmp_path)
    (local / "a.c").write_text("int a;\n")
    with counting_link_to(sshd) as link:
        lsync = LsyncProcess(link.connect_args(remote), cwd=local)
        try:
            lsync.wait_for_line(" ready ")
            assert link.proxy.freeze() == 1
            (local / "b.c").write_text("int b; /* made while the link was frozen */\n")
            deadline = time.monotonic() + 10  # until the change is pending
            while _pending(local) < 1:
                assert time.monotonic() < deadline, lsync.log_tail()
                time.sleep(0.05)
            lsync.proc.send_signal(signal.SIGINT)
            lsync.wait_for_line("Ctrl-C again", timeout=10)
            asked = time.monotonic()
            lsync.proc.send_signal(signal.SIGINT)
            status = lsync.finish(timeout=STALL)
            took = time.monotonic() - asked
        finally:
            if lsync.proc.poll() is None:
                lsync.interrupt()
        assert status == 130, lsync.log_tail() + lsync.stderr
        assert took < STALL / 2, took
        assert "had not confirmed 1 change" in lsync.stderr, lsync.stderr
        assert not (remote / "b.c").exists()
        again = LsyncProcess(link.connect_args(remote), cwd=local)
        try:
            again.wait_for_line(" ready ")
            assert_trees_equal(local, remote, timeout=5)
        finally:
            assert again.interrupt() == 0, again.log_tail()


def _pending(local: Path) -> int:
    """Paths the running session still has to make true remotely (`lsync status`)."""
    shown = lsync_cli("status", "--json", cwd=local)
    return int(json.loads(shown.stdout).get("pending") or 0) if shown.returncode == 0 else 0
