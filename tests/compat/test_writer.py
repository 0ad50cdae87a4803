"""Pooled whole-file writes (lsync.agent.writer) give the same replies and the same tree as
handling every operation in sequence, whatever order the worker threads finish in."""

import os
import random
import zlib

from lsync.agent.service import AgentService
from lsync.agent.writer import WritePool
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from tests.compat.helpers import TempTree


def _run(root, messages, pooled):
    sent = []
    service = AgentService(sent.append, lambda: None, lambda: 10 ** 18, use_cache=False,
                           pool=WritePool(4) if pooled else None)
    service.handle(m.Hello(PROTOCOL_VERSION, {"hash": ["blake2b-128"]}, root,
                           {"create_root": True}))
    for message in messages:
        service.handle(message)
    service.drain_pool()
    service.close()
    replies = {}
    for reply in sent:
        if isinstance(reply, m.Ack):
            replies[reply.seq] = ("ack", reply.status)
        elif isinstance(reply, m.Acked):
            for seq in reply.seqs:
                replies[seq] = ("ack", 0)
        elif isinstance(reply, m.Error):
            replies[reply.seq] = ("error", reply.code)
    return replies


def _snapshot(root):
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(top, name), root)] = "dir"
        for name in files:
            full = os.path.join(top, name)
            if os.path.islink(full):
                found[os.path.relpath(full, root)] = ("link", os.readlink(full))
                continue
            with open(full, "rb") as handle:
                found[os.path.relpath(full, root)] = (handle.read(), os.stat(full).st_mode)
    return found


def _workload(seed):
    rng = random.Random(seed)
    names = ["d{}/f{}".format(rng.randrange(6), i) for i in range(40)]
    names += ["d1", "d2/f3/x", "d3/sub/deep", "d0/f1"]
    messages = []
    seqs = iter(range(1, 10 ** 6))
    for seq in seqs:
        if seq > 300:
            break
        path = rng.choice(names)
        kind = rng.random()
        if kind < 0.1:
            files, contents = [], []
            for _ in range(rng.randrange(1, 6)):
                data = os.urandom(rng.randrange(0, 500)) + b"y" * rng.randrange(0, 2000)
                files.append([seq, rng.choice(names), rng.choice([0o644, 0o755]), len(data)])
                contents.append(data)
                seq = next(seqs)
            joined = b"".join(contents)
            packed = rng.random() < 0.5
            messages.append(m.WriteBatch(files, zlib.compress(joined) if packed else joined,
                                         int(packed)))
        elif kind < 0.65:
            data = os.urandom(rng.randrange(0, 3000)) + b"x" * rng.randrange(0, 5000)
            packed = rng.random() < 0.5
            messages.append(m.WriteFile(seq, path, rng.choice([0o644, 0o755]), 0,
                                        zlib.compress(data) if packed else data, True,
                                        packed))
        elif kind < 0.75:
            messages.append(m.Delete(seq, path))
        elif kind < 0.82:
            messages.append(m.Mkdir(seq, path, 0o755))
        elif kind < 0.88:
            messages.append(m.Rename(seq, path, rng.choice(names)))
        elif kind < 0.93:
            messages.append(m.SetMode(seq, path, 0o600))
        else:
            messages.append(m.Symlink(seq, path, "target"))
    return messages


def test_pooled_writes_and_batches_match_sequential_handling():
    for seed in range(5):
        messages = _workload(seed)
        plain, pooled = TempTree(), TempTree()
        try:
            expected = _run(plain.root, messages, pooled=False)
            got = _run(pooled.root, messages, pooled=True)
            assert got == expected, seed
            assert _snapshot(pooled.root) == _snapshot(plain.root), seed
        finally:
            plain.cleanup()
            pooled.cleanup()


def test_pool_reports_each_write_and_conflicts_only_on_related_paths():
    pool = WritePool(2)
    try:
        pool.submit(1, "a/b/c", lambda: 1)
        assert pool.conflicts("a/b/c")
        assert pool.conflicts("a/b")  # a directory above a running write
        assert pool.conflicts("a")
        assert pool.conflicts("a/b/c/d")  # below a file being written
        assert not pool.conflicts("a/x")
        assert not pool.conflicts("a/b/cc")
        outcomes = []
        while pool.outstanding:
            outcomes.extend(pool.collect(wait=True))
        assert [(o.seq, o.path, o.result, o.error) for o in outcomes] == [(1, "a/b/c", 1, None)]
        assert not pool.conflicts("a/b/c")
    finally:
        pool.close()


def test_pool_hands_back_errors_with_their_traceback():
    pool = WritePool(1)
    try:
        def fail():
            raise ValueError("boom")
        pool.submit(7, "x", fail)
        outcome = pool.collect(wait=True)[0]
        assert isinstance(outcome.error, ValueError) and "boom" in outcome.trace
    finally:
        pool.close()


def _related(a, b):
    """Whether an operation on `a` could see or change `b` (equal, or one above the other)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def test_batches_conflict_exactly_with_related_paths_and_leave_no_count_behind():
    import threading
    rng = random.Random(5)
    names = ["a", "b", "a/b", "a/b/c", "a/bc", "b/a", "a/b/c/d", "c/d/e", "c/d", "ab"]
    for _ in range(200):
        pool = WritePool(2)
        gate = threading.Event()
        try:
            running = []
            for _ in range(rng.randrange(1, 4)):
                batch = [rng.choice(names) for _ in range(rng.randrange(1, 5))]
                pool.submit_batch(batch, gate.wait)
                running += batch
            for _ in range(20):
                asked = [rng.choice(names) for _ in range(rng.randrange(1, 5))]
                expected = any(_related(p, q) for p in asked for q in running)
                assert pool.conflicts_any(asked) == expected, (asked, running)
                assert pool.conflicts(asked[0]) == any(_related(asked[0], q)
                                                       for q in running)
            gate.set()
            while pool.outstanding:
                pool.collect(wait=True)
            assert pool._busy == {} and pool._below == {}
            assert not pool.conflicts_any(names)
        finally:
            gate.set()
            pool.close()
