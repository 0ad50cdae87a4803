"""A save is never queued behind bulk work in the agent (issue 16, h).

The client's first data lane carries single saves; its pump names that role (URGENT) in the
first byte it sends, the others BULK (lsync.agent.lanes). The agent applies what a bulk
lane brings in its write pool, deltas included, and what the lane of saves brings at once
(lsync.agent.service). The pooled delta keeps the promises of the inline one: the base is
checked, the answer comes once the file is in place and recorded, and an operation on the
same path that follows it sees its result. The main thread waits for the pool only for
what could see a pooled write: not for a Mkdir of a directory the pool is filling, not for
a Copy of other paths. And the agent's loop reads the lane of saves between the messages
of a long turn (lsync.agent.main).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lsync.agent import main as agent_main
from lsync.agent import service as service_module
from lsync.agent import writer
from lsync.agent.confined import file_key
from lsync.agent.lanes import BULK, PUMP, URGENT, LaneServer
from lsync.agent.writer import WritePool
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from lsync.protocol.connection import CLIENT, Connection, Lane
from lsync.protocol.delta import encode_zdict_delta
from lsync.protocol.errors import ErrorCode
from lsync.protocol.framing import MAGIC
from tests.conftest import wait_until
from tests.test_agent_crash import BASE, HASH, NEW, _acked, _agent, _digest
from tests.test_agent_crash import home as home  # (a fixture)

NEWER = NEW.replace(b"return 1", b"return 2")


def _delta(seq: int, path: str, old: bytes, new: bytes) -> m.WriteDelta:
    return m.WriteDelta(seq, path, 0o644, _digest(old), _digest(new),
                        encode_zdict_delta(len(old), new, 0, old))


def _errors(sent: list[Any], seq: int) -> list[int]:
    return [x.code for x in sent if isinstance(x, m.Error) and x.seq == seq]


def _held_jobs(monkeypatch: pytest.MonkeyPatch, maker: str) -> threading.Event:
    """The pool's jobs made by `maker` (lsync.agent.writer's "batch_job", "delta_job") wait
    for the returned event, which is set when the service waits for its pool (or by the
    test): whatever the service does before then, it did without waiting."""
    go = threading.Event()
    real_maker = getattr(writer, maker)

    def held_maker(*args: Any) -> Any:
        job = real_maker(*args)

        def run() -> Any:
            assert go.wait(10), "the service never waited for a held job"
            return job()
        return run

    real_collect = WritePool.collect

    def collect(self: WritePool, wait: bool = False) -> Any:
        if wait:
            go.set()
        return real_collect(self, wait)

    monkeypatch.setattr(f"lsync.agent.service.{maker}", held_maker)
    monkeypatch.setattr(WritePool, "collect", collect)
    return go


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
    _held_jobs(monkeypatch, "delta_job")
    service, sent = _agent(root, WritePool())
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


def test_a_mkdir_does_not_wait_for_the_batches_writing_below_it(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of a new directory's files overtakes its Mkdir (another data lane): the
    Mkdir is answered while the batch is still being written, and both end up recorded."""
    root = tmp_path / "remote"
    go = _held_jobs(monkeypatch, "batch_job")
    service, sent = _agent(root, WritePool())
    try:
        service.handle(m.WriteBatch([[2, "new/sub/a.c", 0o644, 3]], b"a;\n", 0))
        service.handle(m.Mkdir(3, "new/sub", 0o750))
        assert _acked(sent, 3) and not go.is_set(), sent
        go.set()
        service.drain_pool()
        assert _acked(sent, 2)
        assert (root / "new/sub/a.c").read_bytes() == b"a;\n"
        assert (root / "new/sub").stat().st_mode & 0o777 == 0o750
        record = service.record
        assert record is not None
        ino = (root / "new/sub").stat().st_ino
        assert record.written("new/sub", m.KIND_DIR, ino) == b""
        assert record.written("new/sub/a.c", m.KIND_FILE, 0) == _digest(b"a;\n")
    finally:
        service.close()


def test_a_mkdir_that_closes_its_directory_waits_for_the_writes_below_it(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "remote"
    go = _held_jobs(monkeypatch, "batch_job")
    service, sent = _agent(root, WritePool())
    try:
        service.handle(m.WriteBatch([[2, "ro/a.c", 0o644, 3]], b"a;\n", 0))
        service.handle(m.Mkdir(3, "ro", 0o555))
        assert go.is_set() and _acked(sent, 2) and _acked(sent, 3), sent
        assert (root / "ro/a.c").read_bytes() == b"a;\n"
    finally:
        (root / "ro").chmod(0o755)
        service.close()


def test_a_copy_waits_only_for_a_pooled_write_of_its_source(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "remote"
    go = _held_jobs(monkeypatch, "batch_job")
    service, sent = _agent(root, WritePool())
    try:
        service.handle(m.WriteFile(1, "old.c", 0o644, 0, BASE, True))
        service.handle(m.WriteBatch([[2, "other/a.c", 0o644, 3]], b"a;\n", 0))
        service.handle(m.Copy(3, "old.c", "copy.c", 0o644, _digest(BASE)))
        assert _acked(sent, 3) and not go.is_set(), sent  # unrelated: not waited for
        service.handle(m.Copy(4, "other/a.c", "copy2.c", 0o644, _digest(b"a;\n")))
        assert go.is_set() and _acked(sent, 2) and _acked(sent, 4), sent
        assert (root / "copy.c").read_bytes() == BASE
        assert (root / "copy2.c").read_bytes() == b"a;\n"
    finally:
        service.close()


def test_a_save_that_arrives_during_a_long_turn_is_answered_before_the_turn_ends(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's loop (lsync.agent.main.serve, in a thread, over pipes and its lane
    socket): the main stream brings two slow operations in one read; a save arrives on the
    lane of saves while the first is handled, and is answered before the second one is."""
    monkeypatch.setattr(agent_main, "SAVE_LOOK", 0.0)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    in_first, save_sent, save_answered = threading.Event(), threading.Event(), threading.Event()
    second_saw_answer: list[bool] = []
    real_mkdir = service_module._HANDLERS[m.Mkdir]

    def slow_mkdir(service: Any, msg: m.Mkdir) -> None:
        if msg.path == "first":
            in_first.set()
            assert save_sent.wait(10)
        elif msg.path == "second":
            second_saw_answer.append(save_answered.wait(10))
        real_mkdir(service, msg)

    monkeypatch.setitem(service_module._HANDLERS, m.Mkdir, slow_mkdir)
    agent = threading.Thread(target=agent_main.serve, args=(in_r, out_w), daemon=True)
    agent.start()
    client = Connection(CLIENT)
    answers: list[m.Message] = []
    welcome = threading.Event()

    def read_answers() -> None:
        while True:
            data = os.read(out_r, 1 << 16)
            if not data:
                return
            client.receive_data(data)
            while (message := client.next_message()) is not None:
                answers.append(message)
                if isinstance(message, m.Welcome):
                    welcome.set()
                if isinstance(message, (m.Ack, m.Acked)) and 30 in _seqs(message):
                    save_answered.set()

    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    lane = None
    try:
        client.send(m.Hello(PROTOCOL_VERSION, {"hash": [HASH], "compression": []},
                            str(tmp_path / "remote"), {"create_root": True, "lanes": True}))
        os.write(in_w, client.data_to_send())
        assert welcome.wait(10)
        info = next(a for a in answers if isinstance(a, m.Welcome)).info
        lane = socket.socket(socket.AF_UNIX)
        lane.connect(info["lanes"])
        lane.sendall(URGENT.encode() + MAGIC + Lane.encode(
            m.WriteFile(10, "warm.c", 0o644, 0, b"w;\n", True)))
        assert wait_until(lambda: any(10 in _seqs(a) for a in answers), 10)
        client.send(m.Mkdir(20, "first", 0o755))
        client.send(m.Mkdir(21, "second", 0o755))
        os.write(in_w, client.data_to_send())  # (one write: one turn of the agent)
        assert in_first.wait(10)
        lane.sendall(Lane.encode(m.WriteFile(30, "save.c", 0o644, 0, b"s;\n", True)))
        save_sent.set()
        assert wait_until(lambda: any(21 in _seqs(a) for a in answers), 30)
        assert second_saw_answer == [True]
        order = [seq for a in answers for seq in _seqs(a) if seq in (20, 21, 30)]
        assert order == [20, 30, 21]
        assert (tmp_path / "remote/save.c").read_bytes() == b"s;\n"
    finally:
        save_sent.set()
        if lane is not None:
            lane.close()
        os.close(in_w)  # the end of the session: serve returns
        agent.join(10)
        os.close(out_w)  # the reader's end of input
        reader.join(10)
        for fd in (in_r, out_r):
            os.close(fd)
    assert not agent.is_alive()


def _seqs(message: m.Message) -> list[int]:
    if isinstance(message, m.Acked):
        return list(message.seqs)
    seq = getattr(message, "seq", None)
    return [] if seq is None else [seq]


def test_a_lane_dropped_earlier_in_a_turn_reads_as_nothing() -> None:
    """A turn may reach a lane's descriptor after the lane of saves was read (and ended)
    between two messages: nothing to read, no error."""
    server = LaneServer()
    try:
        assert server.readable(10_000) == []
    finally:
        server.close()
