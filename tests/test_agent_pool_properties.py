"""The agent's write pool changes when things happen, never what happens (issue 16, h).

Random sequences of operations, as a client sends them, go to two agents: one that applies
everything in order on its own thread (no pool), and one that hands batches, big files and
a bulk lane's deltas to its write pool, lets Mkdirs and Copies skip waiting for writes
they cannot see, and collects finished jobs at random moments (as its loop does at the end
of a turn). Both must end with the same tree (contents, kinds, modes), the same answer for
every operation, and the same record of what lsync wrote. The paths are few and nested, so
that operations often meet: a batch writing below a directory that a Mkdir makes, a delta
of a file that a Copy reads, a Rename of a directory with writes in flight.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from lsync.agent.manifest import walk_tree
from lsync.agent.service import INLINE_WRITE_MAX, AgentService
from lsync.agent.writer import WritePool
from lsync.protocol import messages as m
from lsync.protocol.delta import ZDICT_MAX_DICT, encode_zdict_delta
from tests.test_agent_crash import _agent, _digest
from tests.test_agent_crash import home as home  # (a fixture)

CASES = int(os.environ.get("LSYNC_POOL_CASES", "150"))
STEPS = 40
DIRS = ["a", "a/b", "a/b/c", "d"]
NAMES = ["x.c", "y.h", "z.txt"]


def _content(rng: random.Random, big: bool = False) -> bytes:
    if big:
        return rng.randbytes(INLINE_WRITE_MAX + rng.randrange(1, 5000))
    line = b"int f%d(void) { return %d; }\n" % (rng.randrange(100), rng.randrange(100))
    return line * rng.randrange(1, 60)


def _operations(seed: int) -> list[tuple[Any, bool]]:
    """(message, bulk) pairs; `files` models what the client believes is there."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    ops: list[tuple[Any, bool]] = []
    seq = 100

    def some_file() -> str:
        return f"{rng.choice(DIRS)}/{rng.choice(NAMES)}"

    for _ in range(STEPS):
        seq += 1
        kind = rng.choice(["batch", "batch", "file", "big", "delta", "delta", "mkdir", "copy",
                           "delete", "rename", "mode", "symlink"])
        if kind == "batch":
            items, data = [], b""
            for path in sorted({some_file() for _ in range(rng.randrange(1, 4))}):
                content = _content(rng)
                items.append([seq, path, 0o644, len(content), _digest(content)])
                data += content
                files[path] = content
                seq += 1
            ops.append((m.WriteBatch(items, data, 0), True))
        elif kind in ("file", "big"):
            path, content = some_file(), _content(rng, big=kind == "big")
            files[path] = content
            ops.append((m.WriteFile(seq, path, 0o644, 0, content, True), rng.random() < 0.5))
        elif kind == "delta" and files:
            path = rng.choice(sorted(files))
            old, new = files[path], _content(rng)
            start = max(0, len(old) - ZDICT_MAX_DICT)
            ops.append((m.WriteDelta(seq, path, 0o644, _digest(old), _digest(new),
                                     encode_zdict_delta(len(old), new, start, old[start:])),
                        rng.random() < 0.7))
            files[path] = new
        elif kind == "mkdir":
            ops.append((m.Mkdir(seq, rng.choice(DIRS), rng.choice([0o755, 0o750, 0o700])),
                        False))
        elif kind == "copy" and files:
            src = rng.choice(sorted(files))
            dst = some_file()
            files[dst] = files[src]
            ops.append((m.Copy(seq, src, dst, 0o644, _digest(files[src])), False))
        elif kind == "delete":
            path = rng.choice(DIRS + sorted(files))
            for gone in [p for p in files if p == path or p.startswith(path + "/")]:
                del files[gone]
            ops.append((m.Delete(seq, path), False))
        elif kind == "rename" and files:
            src = rng.choice(sorted(files))
            dst = some_file()
            if dst != src:
                files[dst] = files.pop(src)
                ops.append((m.Rename(seq, src, dst), False))
        elif kind == "symlink":
            path = some_file()
            files.pop(path, None)
            ops.append((m.Symlink(seq, path, rng.choice(NAMES)), False))
        elif kind == "mode" and files:
            ops.append((m.SetMode(seq, rng.choice(sorted(files)), rng.choice([0o644, 0o755])),
                        False))
    return ops


def _answers(sent: list[Any]) -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for message in sent:
        if isinstance(message, m.Acked):
            found.update((seq, ("ack", 0)) for seq in message.seqs)
        elif isinstance(message, m.Ack):
            found[message.seq] = ("ack", message.status)
        elif isinstance(message, m.Error):
            found[message.seq] = ("error", message.code)
    return found


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    found: dict[str, tuple[int, bytes]] = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(directory) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = (st.st_mode, os.readlink(path).encode())
            else:
                found[rel] = (st.st_mode, path.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
    return found


def _run(root: Path, ops: list[tuple[Any, bool]], pooled: bool, seed: int
         ) -> tuple[dict[str, tuple[int, bytes]], dict[int, tuple[str, int]], dict[str, Any]]:
    rng = random.Random(seed)
    service: AgentService
    service, sent = _agent(root, WritePool() if pooled else None)
    try:
        for message, bulk in ops:
            service.handle(message, bulk and pooled)
            if pooled and rng.random() < 0.3:
                service.collect_pool()  # (a turn ended)
        service.drain_pool()
        assert service.root is not None and service.record is not None
        written = {entry[0]: entry[7] for entry in walk_tree(service.root.fd, service.record)}
    finally:
        service.close()
    return _tree(root), _answers(sent[1:]), written


@pytest.mark.parametrize("seed", range(CASES))
def test_the_write_pool_gives_the_same_tree_answers_and_record_as_writing_in_order(
        home: Path, tmp_path: Path, seed: int) -> None:
    ops = _operations(seed)
    inline = _run(tmp_path / "inline", ops, pooled=False, seed=seed)
    pooled = _run(tmp_path / "pooled", ops, pooled=True, seed=seed)
    assert pooled[1] == inline[1], "answers differ"
    assert pooled[0] == inline[0], "trees differ"
    assert pooled[2] == inline[2], "records differ"
    assert len(inline[1]) >= STEPS // 2  # (the sequence did things)
