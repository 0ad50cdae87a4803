"""The agent's record of what lsync wrote survives an agent killed at any moment, and one
agent at a time keeps it (issue 15, defect 10).

The agent service is driven directly (no client, no subprocess) with HOME in a temporary
directory, so its record lives there. "Killed" means: the change was applied and nothing
after it ran — no journal write (`flush` would do it before the answers leave), no close
(which saves a snapshot), the pooled outcome never collected. A second service for the same
root is then the next agent: what it lists (`walk_tree`, the manifest) must say that lsync
wrote the entry, else the restarted client does not own it and a local delete of it never
reaches the remote. A real agent subprocess whose client is gone (its stdin stays open, as
behind a frozen link) must be ended by the next agent before it lists the tree, and must
leave its writes recorded.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lsync.agent import rootlock
from lsync.agent.manifest import walk_tree
from lsync.agent.records import DigestRecord
from lsync.agent.service import AgentService
from lsync.agent.writer import WritePool
from lsync.protocol import PROTOCOL_VERSION, hashing
from lsync.protocol import messages as m
from lsync.protocol.connection import CLIENT, Connection
from lsync.protocol.delta import encode_zdict_delta
from lsync.protocol.errors import ErrorCode, ProtocolError
from tests.conftest import wait_until

HASH = hashing.BLAKE2B_128


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _digest(data: bytes) -> bytes:
    hasher = hashing.new_hasher(HASH)
    hasher.update(data)
    digest: bytes = hasher.digest()
    return digest


def _hello(root: Path) -> m.Hello:
    return m.Hello(PROTOCOL_VERSION, {"hash": [HASH], "compression": []}, str(root),
                   {"create_root": True})


def _agent(root: Path, pool: WritePool | None = None) -> tuple[AgentService, list[Any]]:
    sent: list[Any] = []
    service = AgentService(sent.append, lambda: None, time.time_ns, True, pool)
    service.handle(_hello(root))
    assert isinstance(sent[0], m.Welcome), sent
    return service, sent


def _die(service: AgentService) -> None:
    """What dies with an agent's process: its lock (nothing is written, nothing closed)."""
    service.lock.release()


def _written(root: Path) -> dict[str, Any]:
    """What the next agent's manifest says lsync wrote: path -> written (None: not lsync's)."""
    service, _ = _agent(root)
    try:
        assert service.root is not None and service.record is not None
        return {entry[0]: entry[7] for entry in walk_tree(service.root.fd, service.record)}
    finally:
        service.close()


def _acked(sent: list[Any], seq: int) -> bool:
    return any((isinstance(x, m.Ack) and x.seq == seq)
               or (isinstance(x, m.Acked) and seq in x.seqs) for x in sent)


BASE = b"int base(void) { return 0; }\n" * 40
NEW = BASE.replace(b"return 0", b"return 1")

# Each change: the messages (after a first acknowledged write of "base.c", journaled), the
# path it makes, and what its `written` must then be.
CHANGES: dict[str, tuple[list[Any], str, bytes]] = {
    "write-file": ([m.WriteFile(10, "new.c", 0o644, 0, NEW, True)], "new.c", _digest(NEW)),
    "write-file-in-chunks": ([m.WriteFile(10, "sub/new.c", 0o644, 0, NEW[:100], False),
                              m.WriteFile(10, "sub/new.c", 0o644, 100, NEW[100:], True)],
                             "sub/new.c", _digest(NEW)),
    "copy-into-a-new-directory": ([m.Copy(10, "base.c", "made/deeper/copy.c", 0o644,
                                          _digest(BASE))], "made/deeper/copy.c",
                                  _digest(BASE)),
    "write-delta": ([m.WriteDelta(10, "base.c", 0o644, _digest(BASE), _digest(NEW),
                                  encode_zdict_delta(len(BASE), NEW, 0, BASE))],
                    "base.c", _digest(NEW)),
    "copy": ([m.Copy(10, "base.c", "copy.c", 0o644, _digest(BASE))], "copy.c", _digest(BASE)),
    "rename": ([m.Rename(10, "base.c", "moved.c")], "moved.c", _digest(BASE)),
    "symlink": ([m.Symlink(10, "link", "base.c")], "link", b"base.c"),
    "mkdir": ([m.Mkdir(10, "made", 0o755)], "made", b""),
    "write-batch": ([m.WriteBatch([[10, "new/b1.c", 0o644, len(NEW)],
                                   [11, "b2.c", 0o644, 3]], NEW + b"b2\n", 0)],
                    "new/b1.c", _digest(NEW)),
}


BIG = os.urandom(400 << 10)  # a whole file too big to be written inline: the pool writes it

# (change, pooled): every change inline; those the write pool takes, pooled as well.
CASES = [(change, False) for change in sorted(CHANGES)] + [("write-batch", True),
                                                            ("big-write-file", True),
                                                            ("write-delta", True)]
CHANGES["big-write-file"] = ([m.WriteFile(10, "big/big.bin", 0o644, 0, BIG, True)],
                             "big/big.bin", _digest(BIG))


@pytest.mark.parametrize(("change", "pooled"), CASES,
                         ids=[f"{c}-{'pooled' if p else 'inline'}" for c, p in CASES])
def test_a_change_applied_just_before_the_agent_was_killed_is_known_as_lsyncs(
        home: Path, tmp_path: Path, change: str, pooled: bool) -> None:
    root = tmp_path / "remote"
    messages, path, expected = CHANGES[change]
    pool = WritePool() if pooled else None
    try:
        service, sent = _agent(root, pool)
        service.handle(m.WriteFile(1, "base.c", 0o644, 0, BASE, True))
        service.journal()  # acknowledged: journaled before the answer left
        assert _acked(sent, 1)
        for message in messages:
            service.handle(message, bulk=pooled)  # (a delta is pooled from a bulk lane)
        if pool is not None:
            # The worker has put the file in place; its outcome is never collected.
            assert pool.outstanding == 1
            assert wait_until(lambda: os.path.lexists(root / path), timeout=10)
            assert select.select([pool.wakeup_fd], [], [], 10)[0]
        else:
            assert _acked(sent, 10), sent
        _die(service)
        assert os.path.lexists(root / path)
        written = _written(root)
        assert written.get(path) == expected, (change, written)
        if "/" in path:  # made on the way by the killed agent: lsync's too
            assert written.get(path.rpartition("/")[0]) == b"", (change, written)
    finally:
        if pool is not None:
            pool.close()


def test_an_intent_never_claims_what_is_not_there(home: Path, tmp_path: Path) -> None:
    """An agent killed after saying what it would write but before writing it: the next
    agent claims nothing (the remote file is someone else's content)."""
    root = tmp_path / "remote"
    root.mkdir()
    (root / "theirs.c").write_bytes(b"made on the remote\n")
    service, _ = _agent(root)
    assert service.record is not None
    service.record.intend([("theirs.c", m.KIND_FILE, _digest(NEW)),
                           ("link", m.KIND_LINK, b"elsewhere"),
                           ("gone.c", m.KIND_FILE, _digest(NEW))])
    os.symlink("somewhere", root / "link")
    _die(service)
    written = _written(root)
    assert written.get("theirs.c") is None
    assert written.get("link") is None


def test_an_intent_recorded_or_failed_claims_nothing_later(home: Path, tmp_path: Path) -> None:
    """Only intents left unsettled by a killed agent are candidates: a file lsync wrote and
    deleted, and a write that failed, claim nothing when the remote user later puts the
    very same content there (the agent was killed without closing: only its journal)."""
    root = tmp_path / "remote"
    service, sent = _agent(root)
    service.handle(m.WriteFile(1, "second.c", 0o644, 0, b"2\n", True))
    service.handle(m.Delete(2, "second.c"))
    (root / "dir.c").mkdir()
    service.handle(m.WriteFile(3, "dir.c", 0o644, 0, b"3\n", True))  # a directory is there
    service.journal()
    assert _acked(sent, 1) and _acked(sent, 2)
    assert any(isinstance(x, m.Error) and x.seq == 3 for x in sent), sent
    _die(service)
    (root / "second.c").write_bytes(b"2\n")
    (root / "dir.c").rmdir()
    (root / "dir.c").write_bytes(b"3\n")
    written = _written(root)
    assert written.get("second.c") is None
    assert written.get("dir.c") is None


def test_a_snapshot_keeps_only_unsettled_intents(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    service, _ = _agent(root)
    for seq in range(1, 200):
        service.handle(m.WriteFile(seq, f"f{seq}.c", 0o644, 0, b"%d\n" % seq, True))
    assert service.record is not None
    service.record.intend([("pending.c", m.KIND_FILE, _digest(b"p"))])
    service.close()
    record = DigestRecord(DigestRecord.default_path(str(root), HASH), HASH)
    path = record.journal_path
    assert path is not None
    with open(path) as journal:
        assert len(journal.read().splitlines()) == 2  # the header and the unsettled intent
    record.load()
    assert record.take_candidates() == {"pending.c": [(m.KIND_FILE, _digest(b"p"))]}


# -- one agent at a time ------------------------------------------------------------------------

AGENT = [sys.executable, "-c", "from lsync.agent.main import main; main()"]


class _AgentProcess:
    """A real agent (subprocess) fed by this test, as if by a client; stdin stays open."""

    def __init__(self, root: Path, home: Path) -> None:
        self.proc = subprocess.Popen(AGENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "HOME": str(home)})
        self.conn = Connection(CLIENT)
        self.conn.send(_hello(root))
        self.conn.send(m.ListTree(1))
        self._write()

    def _write(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.conn.data_to_send())
        self.proc.stdin.flush()

    def send(self, message: Any) -> None:
        self.conn.send(message)
        self._write()

    def answers(self) -> Iterator[Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            message = self.conn.next_message()
            if message is not None:
                yield message
                continue
            if not select.select([fd], [], [], 20)[0]:
                raise AssertionError("the agent does not answer")
            data = os.read(fd, 1 << 16)
            if not data:
                return
            self.conn.receive_data(data)

    def wait_for(self, condition: Callable[[Any], bool]) -> Any:
        for message in self.answers():
            if condition(message):
                return message
        raise AssertionError("the agent ended first")


def test_a_new_agent_ends_the_old_one_before_listing_and_both_writes_stay_owned(
        home: Path, tmp_path: Path) -> None:
    """The old agent's client is gone but its input is still open (a frozen link, or bytes
    still arriving): the next agent for the root ends it first (it records and saves what
    it wrote), so its listing sees those writes as lsync's, and the old agent's last
    snapshot never hides what the new one wrote afterwards."""
    root = tmp_path / "remote"
    old = _AgentProcess(root, home)
    try:
        _old_then_new(root, old)
    finally:
        if old.proc.poll() is None:
            old.proc.kill()
        old.proc.wait()
    written = _written(root)
    assert written.get("old.c") == _digest(b"old\n")
    assert written.get("new.c") == _digest(b"new\n")


def _old_then_new(root: Path, old: _AgentProcess) -> None:
    old.wait_for(lambda x: isinstance(x, m.ManifestBatch) and x.done)
    old.send(m.WriteFile(2, "old.c", 0o644, 0, b"old\n", True))
    old.wait_for(lambda x: isinstance(x, m.Ack) and x.seq == 2)
    # The next agent (this process): its Hello ends the old one first, which says goodbye
    # (it ended cleanly on SIGTERM, not by the SIGKILL that follows when it does not).
    service, sent = _agent(root)
    try:
        assert sent[0].info["took_over"] == str(old.proc.pid)
        assert old.proc.wait(timeout=10) == 5
        goodbye = old.wait_for(lambda x: isinstance(x, m.Goodbye))
        assert goodbye.code == ErrorCode.ROOT_UNAVAILABLE and "took over" in goodbye.reason
        assert service.root is not None and service.record is not None
        listed = {e[0]: e[7] for e in walk_tree(service.root.fd, service.record)}
        assert listed.get("old.c") == _digest(b"old\n")
        service.handle(m.WriteFile(3, "new.c", 0o644, 0, b"new\n", True))
        service.journal()
        assert _acked(sent, 3)
    finally:
        service.close()


def test_an_old_agent_that_cannot_end_by_itself_is_killed_and_its_writes_stay_owned(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An old agent that does not end when asked (stopped here; blocked on a write to a
    frozen link in life) is killed after TAKEOVER_WAIT; what it acknowledged stays lsync's."""
    monkeypatch.setattr(rootlock, "TAKEOVER_WAIT", 0.5)
    root = tmp_path / "remote"
    old = _AgentProcess(root, home)
    try:
        old.wait_for(lambda x: isinstance(x, m.ManifestBatch) and x.done)
        old.send(m.WriteFile(2, "old.c", 0o644, 0, b"old\n", True))
        old.wait_for(lambda x: isinstance(x, m.Ack) and x.seq == 2)
        old.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        service, _ = _agent(root)
        assert time.monotonic() - started >= 0.5
        assert old.proc.wait(timeout=10) == -signal.SIGKILL
        service.close()
    finally:
        if old.proc.poll() is None:
            old.proc.kill()
        old.proc.wait()
    assert _written(root).get("old.c") == _digest(b"old\n")


def test_pooled_writes_that_finish_after_the_session_ended_are_still_recorded(
        home: Path, tmp_path: Path) -> None:
    """Once the agent has said goodbye (a protocol error, say) every answer raises; the
    writes the pool finishes then must be recorded all the same, not only the first."""
    root = tmp_path / "remote"
    ended: list[bool] = []
    sent: list[Any] = []

    def send(message: Any) -> None:
        if ended:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "connection is closed")
        sent.append(message)

    pool = WritePool()
    service = AgentService(send, lambda: None, time.time_ns, True, pool)
    service.handle(_hello(root))
    names = [f"b{i}.c" for i in range(4)]
    for i, name in enumerate(names):  # one batch each: four outcomes to answer
        service.handle(m.WriteBatch([[10 + i, name, 0o644, 3]], b"%02d\n" % i, 0))
    assert wait_until(lambda: all((root / n).exists() for n in names), timeout=10)
    ended.append(True)
    while pool.outstanding:  # as `service.close` does
        with contextlib.suppress(ProtocolError):
            service.drain_pool()
    record = service.record
    assert record is not None
    recorded = {n: record.written(n, m.KIND_FILE, 0) for n in names}
    service.close()
    assert recorded == {n: _digest(b"%02d\n" % i) for i, n in enumerate(names)}


def _state_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]


def test_temporary_files_of_a_killed_agent_not_yet_reaped_are_stale() -> None:
    """A killed agent that its parent has not reaped yet (a zombie) writes nothing more: its
    temporary files are leftovers (`kill(pid, 0)` still succeeds on a zombie, so the next
    agent kept them); a live process's are not."""
    from lsync.agent.tempfiles import is_stale_temp

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while _state_of(child.pid) != b"Z":
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.01)
        assert is_stale_temp(f".lsync-tmp-{child.pid}-3")
    finally:
        child.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not is_stale_temp(f".lsync-tmp-{alive.pid}-3")
    finally:
        alive.kill()
        alive.wait()
