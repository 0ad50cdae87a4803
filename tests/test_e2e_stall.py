"""End to end: a link that goes silent (no RST, no byte either way) is noticed and healed.

The delay proxy freezes the connection lsync uses: bytes stop both ways and nothing is
closed, as when a VPN or a NAT drops a flow. lsync must notice within its stall bound
(lsync.client.transport.link.STALL, plus a ping interval), say so, reconnect through the proxy (new
connections are not frozen), and deliver the edits made meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.transport.link import PING_EVERY, STALL
from tests.conftest import LsyncProcess, assert_trees_equal, counting_link_to, fresh_dirs

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
