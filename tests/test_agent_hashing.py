"""The agent hashes files for a HashPaths in its worker pool: its main loop goes on with the
messages behind it (pings above all) while big files are read, so a long hashing cannot look
like a dead link to the client; the answer is the same as when hashed inline."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from lsync.agent.confined import ConfinedRoot
from lsync.agent.writer import WritePool
from lsync.protocol import messages as m
from tests.conftest import wait_until
from tests.test_agent_crash import _agent, _digest
from tests.test_agent_crash import home as home  # (a fixture)


def test_a_ping_behind_a_slow_hash_request_is_answered_before_it(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    files = {"a.c": b"int a;\n", "sub/b.c": b"int b;\n" * 1000}
    for rel, data in files.items():
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
    go_on = threading.Event()
    real = ConfinedRoot.digest_file

    def slow(self: ConfinedRoot, path: str, new_hasher: Any) -> Any:
        assert go_on.wait(10), "the ping was not answered while hashing"
        return real(self, path, new_hasher)

    monkeypatch.setattr(ConfinedRoot, "digest_file", slow)
    pool = WritePool()
    service, sent = _agent(root, pool)
    try:
        service.handle(m.HashPaths(5, ["a.c", "missing.c", "sub/b.c"]))
        service.handle(m.Ping(6))
        assert any(isinstance(x, m.Pong) and x.nonce == 6 for x in sent)
        assert not any(isinstance(x, m.Hashes) for x in sent)
        go_on.set()
        def answered() -> bool:
            service.collect_pool()
            return any(isinstance(x, m.Hashes) for x in sent)

        assert wait_until(answered, 10)
        hashes = next(x for x in sent if isinstance(x, m.Hashes))
        assert hashes.seq == 5
        assert hashes.digests == [_digest(files["a.c"]), None, _digest(files["sub/b.c"])]
    finally:
        service.close()


def test_hashes_are_the_same_inline_and_in_the_pool(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(20):
        (root / f"f{i}.c").write_bytes(b"x" * (i * 997))
    paths = [f"f{i}.c" for i in range(20)] + ["nothing-here"]
    answers = []
    for pool in (None, WritePool()):
        service, sent = _agent(root, pool)
        try:
            service.handle(m.HashPaths(9, paths))
            service.drain_pool()
            answers.append(next(x for x in sent if isinstance(x, m.Hashes)).digests)
        finally:
            service.close()
    assert answers[0] == answers[1] and answers[0][-1] is None and None not in answers[0][:-1]
