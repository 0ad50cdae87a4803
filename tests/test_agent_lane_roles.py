"""A save is never queued behind a burst's deltas in the agent (issue 16, h).

The client's first data lane carries single saves; its pump names that role (URGENT) in the
first byte it sends, the others BULK (lsync.agent.lanes). The agent applies what a bulk
lane brings in its write pool, deltas included, and what the lane of saves brings at once
(lsync.agent.service). The pooled delta keeps the promises of the inline one: the base is
checked, the answer comes once the file is in place and recorded, and an operation on the
same path that follows it sees its result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lsync.agent import writer
from lsync.agent.confined import file_key
from lsync.agent.lanes import BULK, PUMP, URGENT, LaneServer
from lsync.agent.writer import WritePool
from lsync.protocol import messages as m
from lsync.protocol.connection import Lane
from lsync.protocol.delta import encode_zdict_delta
from lsync.protocol.errors import ErrorCode
from lsync.protocol.framing import MAGIC
from tests.conftest import wait_until
from tests.test_agent_crash import BASE, NEW, _acked, _agent, _digest
from tests.test_agent_crash import home as home  # (a fixture)

NEWER = NEW.replace(b"return 1", b"return 2")


def _delta(seq: int, path: str, old: bytes, new: bytes) -> m.WriteDelta:
    return m.WriteDelta(seq, path, 0o644, _digest(old), _digest(new),
                        encode_zdict_delta(len(old), new, 0, old))


def _errors(sent: list[Any], seq: int) -> list[int]:
    return [x.code for x in sent if isinstance(x, m.Error) and x.seq == seq]


def test_a_bulk_lanes_delta_is_applied_in_the_pool_and_answered_once_recorded(
        home: Path, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    pool = WritePool()
    service, sent = _agent(root, pool)
    try:
        service.handle(m.WriteFile(1, "a.c", 0o644, 0, BASE, True))
        service.handle(_delta(2, "a.c", BASE, NEW), bulk=True)
        assert pool.outstanding == 1 and not _acked(sent, 2)
        service.drain_pool()
        assert _acked(sent, 2), sent
        assert (root / "a.c").read_bytes() == NEW
        record = service.record
        assert record is not None
        assert record.written("a.c", m.KIND_FILE, 0) == _digest(NEW)
        assert record.lookup("a.c", file_key(os.stat(root / "a.c"))) == _digest(NEW)
    finally:
        service.close()  # (and its pool)


def test_a_saves_delta_is_applied_at_once_while_bulk_work_is_pooled(
        home: Path, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    pool = WritePool()
    service, sent = _agent(root, pool)
    try:
        service.handle(m.WriteFile(1, "a.c", 0o644, 0, BASE, True))
        service.handle(m.WriteFile(2, "b.c", 0o644, 0, BASE, True))
        service.handle(_delta(3, "b.c", BASE, NEW), bulk=True)
        service.handle(_delta(4, "a.c", BASE, NEW))  # the save: not bulk
        assert _acked(sent, 4), sent
        assert (root / "a.c").read_bytes() == NEW
        service.drain_pool()
        assert _acked(sent, 3) and (root / "b.c").read_bytes() == NEW
    finally:
        service.close()  # (and its pool)


def test_a_pooled_delta_on_a_changed_base_is_refused_and_the_file_kept(
        home: Path, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    pool = WritePool()
    service, sent = _agent(root, pool)
    try:
        service.handle(m.WriteFile(1, "a.c", 0o644, 0, BASE, True))
        (root / "a.c").write_bytes(b"edited on the remote\n")
        service.handle(_delta(2, "a.c", BASE, NEW), bulk=True)
        service.drain_pool()
        assert _errors(sent, 2) == [int(ErrorCode.BASE_MISMATCH)], sent
        assert (root / "a.c").read_bytes() == b"edited on the remote\n"
        assert not [p for p in os.listdir(root) if p != "a.c"]  # no temporary file left
    finally:
        service.close()  # (and its pool)


def test_the_next_write_of_a_path_waits_for_its_pooled_delta(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pooled delta is held until the service waits for the pool: a save's delta of the
    same path (against the first one's result), applied at once without waiting, would
    find the old base and be refused."""
    root = tmp_path / "remote"
    pool = WritePool()
    service, sent = _agent(root, pool)
    waited = threading.Event()
    real_job = writer.delta_job

    def held_job(*args: Any) -> Any:
        job = real_job(*args)

        def run() -> Any:
            assert waited.wait(10), "the service did not wait for the pooled delta"
            return job()
        return run

    real_collect = WritePool.collect

    def collect(self: WritePool, wait: bool = False) -> Any:
        if wait:
            waited.set()
        return real_collect(self, wait)

    monkeypatch.setattr("lsync.agent.service.delta_job", held_job)
    monkeypatch.setattr(WritePool, "collect", collect)
    try:
        service.handle(m.WriteFile(1, "a.c", 0o644, 0, BASE, True))
        service.handle(_delta(2, "a.c", BASE, NEW), bulk=True)
        service.handle(_delta(3, "a.c", NEW, NEWER))  # a save: applied at once
        service.drain_pool()
        assert _acked(sent, 2) and _acked(sent, 3), sent
        assert (root / "a.c").read_bytes() == NEWER
    finally:
        service.close()  # (and its pool)


@pytest.mark.parametrize("role", [URGENT, BULK])
def test_a_pump_names_its_lanes_role_and_the_lane_carries_messages(
        tmp_path: Path, role: str) -> None:
    """The real pump program (as a lane's SSH channel runs it) joins the agent's socket."""
    server = LaneServer()
    pump = subprocess.Popen([sys.executable, "-c", PUMP, server.path, role],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        message = m.WriteFile(7, "x.c", 0o644, 0, b"int x;\n", True)
        assert pump.stdin is not None
        pump.stdin.write(MAGIC + Lane.encode(message))
        pump.stdin.flush()
        received: list[m.Message] = []
        lane_fds: list[int] = []

        def arrived() -> bool:
            for fd in server.fds():
                if fd == server.listener.fileno():
                    server.readable(fd)
                else:
                    lane_fds.append(fd)
                    received.extend(server.readable(fd))
            return bool(received)

        assert wait_until(arrived, 10)
        assert received == [message]
        assert server.urgent(lane_fds[-1]) == (role == URGENT)
    finally:
        if pump.stdin is not None:
            pump.stdin.close()
        pump.wait(10)
        server.close()
