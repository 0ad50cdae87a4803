"""The agent's racy-mtime rule (lsync.agent.recordfiles.is_racy): a snapshot of the record
leaves out exactly the keys that a later same-size rewrite could keep, judged by the root
file system's own clock (an unnamed file's mtime), so that a restart right after a sync
trusts the digests of files written a moment before."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lsync.agent.confined import ConfinedRoot, file_key
from lsync.agent.recordfiles import RACY_NS, is_racy
from lsync.agent.records import DigestRecord
from tests.conftest import wait_until

DIGEST = b"\x01" * 16


def test_with_the_file_systems_clock_only_keys_not_older_than_it_are_racy() -> None:
    now = 10 * RACY_NS
    assert not is_racy(now - 1, now, fs_now_ns=now)  # a tick older: a rewrite changes it
    assert is_racy(now, now, fs_now_ns=now)
    assert is_racy(now + 5, now, fs_now_ns=now)  # a file server's clock ahead of it
    assert not is_racy(now - RACY_NS + 1, now, fs_now_ns=now)


def test_without_it_keys_younger_than_two_seconds_are_racy() -> None:
    now = 10 * RACY_NS
    assert is_racy(now - RACY_NS + 1, now, fs_now_ns=None)
    assert not is_racy(now - RACY_NS, now, fs_now_ns=None)


def test_the_file_systems_clock_is_read_off_an_unnamed_file_that_leaves_nothing(
        tmp_path: Path) -> None:
    root = ConfinedRoot(str(tmp_path))
    try:
        before = tmp_path / "before.c"
        before.write_bytes(b"int x;\n")
        mtime = before.stat().st_mtime_ns
        # The file system's clock moves on (by its coarse tick) past the file's mtime.
        assert wait_until(lambda: (root.filesystem_now_ns() or 0) > mtime, timeout=5)
        assert os.listdir(tmp_path) == ["before.c"]
    finally:
        root.close()


def _saved_and_loaded(tmp_path: Path, keys: dict[str, tuple[int, int, int]],
                      fs_now: int | None, now: int) -> DigestRecord:
    cache = str(tmp_path / "record.json")
    record = DigestRecord(cache, "blake2b-128")
    record.fs_clock = lambda: fs_now
    for path, key in keys.items():
        record.remember(path, key, DIGEST)
    record.save(now)
    record.close(now)
    loaded = DigestRecord(cache, "blake2b-128")
    loaded.load()
    return loaded


def test_a_snapshot_keeps_keys_older_than_the_file_systems_clock_even_a_moment_old(
        tmp_path: Path) -> None:
    now = time.time_ns()
    keys = {"old.c": (7, now - 10 * RACY_NS, 1), "moment.c": (7, now - 1_000_000, 2),
            "same_tick.c": (7, now, 3)}
    loaded = _saved_and_loaded(tmp_path, keys, fs_now=now, now=now)
    assert loaded.lookup("old.c", keys["old.c"]) == DIGEST
    assert loaded.lookup("moment.c", keys["moment.c"]) == DIGEST  # 1 ms old: kept
    assert loaded.lookup("same_tick.c", keys["same_tick.c"]) is None
    assert loaded.dirty is False  # (nothing written since the load)


def test_without_the_file_systems_clock_a_snapshot_drops_the_last_two_seconds(
        tmp_path: Path) -> None:
    now = time.time_ns()
    keys = {"old.c": (7, now - 10 * RACY_NS, 1), "moment.c": (7, now - 1_000_000, 2)}
    loaded = _saved_and_loaded(tmp_path, keys, fs_now=None, now=now)
    assert loaded.lookup("old.c", keys["old.c"]) == DIGEST
    assert loaded.lookup("moment.c", keys["moment.c"]) is None


def test_a_file_written_just_before_the_snapshot_keeps_its_digest_with_a_real_root(
        tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    root = ConfinedRoot(str(tree))
    try:
        path = tree / "fresh.c"
        path.write_bytes(b"int fresh;\n")
        key = file_key(path.stat())
        # The snapshot comes once the file system's clock has left the file's tick.
        assert wait_until(lambda: (root.filesystem_now_ns() or 0) > key[1], timeout=5)
        cache = str(tmp_path / "record.json")
        record = DigestRecord(cache, "blake2b-128")
        record.fs_clock = root.filesystem_now_ns
        record.remember("fresh.c", key, DIGEST)
        record.save(time.time_ns())
        record.close(time.time_ns())
        loaded = DigestRecord(cache, "blake2b-128")
        loaded.load()
        assert loaded.lookup("fresh.c", key) == DIGEST
    finally:
        root.close()
