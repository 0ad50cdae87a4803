"""End to end: a big file on a slow link is not taken for a dead link (issue 15, defect 3).

lsync runs through the delay proxy capped to a bandwidth, in front of the private sshd on
127.0.0.1, with its stall bound shortened to STALL_FOR_TESTS seconds (LSYNC_STALL_SECONDS,
read once in lsync.client.transport.link) so that the test stays short. A new file of incompressible
bytes then takes several stall bounds to cross, with no reply from the agent until its
end. It must arrive on the first attempt: one TCP connection through the proxy, no "no
answer from the agent", no reconnect. A 10-byte edit in place afterwards must travel as a
delta (a file that had been cut would go whole again). Last, a control: the shortened
bound was in effect, since a frozen link is noticed within it. And the other side of the
rule: a link frozen in the middle of such a transfer is noticed within the bound too, and
the file arrives after the reconnect.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import CountingLink, LsyncProcess, fresh_dirs, wait_until

Start = Callable[..., LsyncProcess]

STALL_FOR_TESTS = 3.0  # seconds (lsync's own default is 15)
RATE_BPS = 8e6  # the link's cap each way: 1 MB/s
DELAY = 0.05  # seconds one way (RTT 100 ms)
FILE_SIZE = 12 * 1000 * 1000  # about 12 s to cross: four stall bounds
ARRIVAL_WAIT = 90.0
EDIT_WAIT = 20.0
EDIT_BUDGET = 20 * 1024  # bytes on the wire, both ways, for a 10-byte edit in place
# A frozen idle link is noticed a ping interval plus the stall bound after the freeze, and
# reported once the broken link is closed; under lsync's default bound that is 20 s and more.
FREEZE_NOTICED = 4 * STALL_FOR_TESTS


@pytest.fixture
def slow_link(sshd: PrivateSshd, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingLink]:
    """A proxy capped to RATE_BPS each way at RTT 2 * DELAY, and lsync's stall bound
    shortened (through the environment lsync is started with)."""
    monkeypatch.setenv("LSYNC_STALL_SECONDS", str(STALL_FOR_TESTS))
    with ThreadedProxy(("127.0.0.1", sshd.port), DELAY, rate_bps=RATE_BPS) as proxy:
        yield CountingLink(sshd, proxy, sshd.write_client_config(port=proxy.port))


def test_a_file_slower_to_cross_than_the_stall_bound_arrives_first_time_and_edits_are_deltas(
        slow_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "small.c").write_text("int small;\n")
    lsync = run_lsync(*slow_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ", timeout=30)

    content = os.urandom(FILE_SIZE)
    (local / "disk.img").write_bytes(content)
    created_ns = time.time_ns()
    started = time.monotonic()
    lsync.wait_in_sync(created_ns, ARRIVAL_WAIT)
    took = time.monotonic() - started
    assert (remote / "disk.img").read_bytes() == content
    assert took >= 3 * STALL_FOR_TESTS, \
        f"the file crossed in {took:.1f} s: too fast for the test to prove anything"
    counters = slow_link.proxy.counters()
    assert not lsync.saw("no answer from the agent"), lsync.log_tail()
    assert not lsync.saw("reconnecting"), lsync.log_tail()
    assert counters.connections_total == 1, f"{counters.connections_total} connections"

    slow_link.proxy.reset_counters()
    edited = bytearray(content)
    edited[FILE_SIZE // 2:FILE_SIZE // 2 + 10] = b"0123456789"
    with open(local / "disk.img", "r+b") as handle:
        handle.seek(FILE_SIZE // 2)
        handle.write(b"0123456789")
    edited_ns = time.time_ns()
    lsync.wait_in_sync(edited_ns, EDIT_WAIT)
    wire = slow_link.proxy.counters().bytes_total
    assert (remote / "disk.img").read_bytes() == bytes(edited)
    assert wire < EDIT_BUDGET, f"a 10-byte edit cost {wire} B on the wire"

    # The control: the bound above was the shortened one (a frozen link is noticed in time).
    frozen_at = time.monotonic()
    assert slow_link.proxy.freeze() == 1
    lsync.wait_for_line("no answer from the agent", timeout=FREEZE_NOTICED + 10)
    noticed = time.monotonic() - frozen_at
    assert noticed <= FREEZE_NOTICED, f"noticed after {noticed:.1f} s:\n{lsync.log_tail()}"
    assert lsync.interrupt() == 0, lsync.stderr


def test_a_link_frozen_in_the_middle_of_a_slow_transfer_is_noticed_and_the_file_arrives(
        slow_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    """The other side of the rule: bytes still entering the SSH windows when the link froze
    are no progress, so a freeze during a transfer is noticed as soon as at rest."""
    local, remote = fresh_dirs(tmp_path)
    (local / "small.c").write_text("int small;\n")
    lsync = run_lsync(*slow_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ", timeout=30)
    content = os.urandom(FILE_SIZE // 2)
    (local / "disk.img").write_bytes(content)
    created_ns = time.time_ns()
    up = slow_link.proxy.counters().bytes_up
    assert wait_until(lambda: slow_link.proxy.counters().bytes_up > up + 2_000_000, 30)
    frozen_at = time.monotonic()
    assert slow_link.proxy.freeze() == 1
    lsync.wait_for_line("no answer from the agent", timeout=FREEZE_NOTICED + 10)
    noticed = time.monotonic() - frozen_at
    assert noticed <= FREEZE_NOTICED, f"noticed after {noticed:.1f} s:\n{lsync.log_tail()}"
    lsync.wait_in_sync(created_ns, ARRIVAL_WAIT)
    assert (remote / "disk.img").read_bytes() == content
    assert lsync.interrupt() == 0, lsync.stderr
