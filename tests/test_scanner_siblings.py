"""SiblingReader: read_file_stable for a group of files, one descriptor per directory."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import pytest

from lsync.client.local.hashcache import RACY_NS, HashCache
from lsync.client.local.localentry import FileTooLargeError, NotRegularFileError
from lsync.client.local.stableread import SiblingReader, read_file_stable
from lsync.client.remote.sender import ReadAhead


def new_cache() -> HashCache:
    return HashCache("blake2b-128", clock=lambda: time.time_ns() + 5 * RACY_NS)


def write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def test_siblings_read_as_read_file_stable_reads_them_each(tmp_path: Path) -> None:
    files = {"top.c": b"top\n", "a/one.c": b"one\n", "a/two.c": b"two\n" * 100,
             "a/b/deep.c": b"deep\n", "a/three.c": b"three\n", "c/other.h": b""}
    for rel, data in files.items():
        write(tmp_path, rel, data)
    with SiblingReader(tmp_path, new_cache()) as reader:
        got = {rel: reader.read(rel) for rel in files}
    for rel, (content, entry) in got.items():
        alone = read_file_stable(tmp_path, rel, new_cache())
        assert content == files[rel] and (content, entry) == alone


def test_a_failing_file_concerns_that_file_alone(tmp_path: Path) -> None:
    write(tmp_path, "a/ok.c", b"ok\n")
    write(tmp_path, "a/big.c", b"x" * 100)
    (tmp_path / "a" / "sub").mkdir()
    write(tmp_path, "real/in.c", b"in\n")
    (tmp_path / "link").symlink_to("real")
    with SiblingReader(tmp_path, new_cache()) as reader:
        with pytest.raises(FileNotFoundError):
            reader.read("a/missing.c")
        assert reader.read("a/ok.c")[0] == b"ok\n"
        with pytest.raises(FileTooLargeError):
            reader.read("a/big.c", limit=99)
        with pytest.raises(NotRegularFileError):
            reader.read("a/sub")
        with pytest.raises(ValueError):
            reader.read("a/..")  # the name is checked in the directory already open
        with pytest.raises(FileNotFoundError):
            reader.read("link/in.c")  # never through a symlink
        with pytest.raises(FileNotFoundError):
            reader.read("gone/x.c")
        assert reader.read("a/ok.c")[0] == b"ok\n"


def test_a_directory_renamed_meanwhile_is_read_where_it_went(
        tmp_path: Path) -> None:
    """The descriptor held is the directory it opened: after the name points elsewhere,
    the file read is still the one in the directory first opened (whose stat the caller
    compares with the path's before using it, as with read_file_stable's result)."""
    write(tmp_path, "d/f.c", b"first\n")
    write(tmp_path, "d/g.c", b"first g\n")
    with SiblingReader(tmp_path, new_cache()) as reader:
        content, entry = reader.read("d/f.c")
        os.rename(tmp_path / "d", tmp_path / "old")
        write(tmp_path, "d/g.c", b"second g\n")
        content, entry = reader.read("d/g.c")
    assert content == b"first g\n"
    assert entry.ino == os.stat(tmp_path / "old" / "g.c").st_ino
    assert entry.ino != os.stat(tmp_path / "d" / "g.c").st_ino


def test_read_ahead_skips_files_the_cache_says_the_remote_already_holds(
        tmp_path: Path) -> None:
    """A rescan (the root .gitignore deleted or restored in a branch switch) queues every
    file below; those whose cached digest is what the remote holds are not read again."""
    write(tmp_path, "a/same.c", b"unchanged\n" * 50)
    write(tmp_path, "a/changed.c", b"new content\n" * 50)
    write(tmp_path, "a/new.c", b"a new file\n")
    cache = new_cache()
    same = read_file_stable(tmp_path, "a/same.c", cache)[1].digest
    assert same is not None
    read_file_stable(tmp_path, "a/changed.c", cache)
    ahead = ReadAhead(tmp_path, cache)
    try:
        ahead.start(["a/same.c", "a/changed.c", "a/new.c"], (0, 0, b""),
                    {"a/same.c": same, "a/changed.c": b"\0" * 16})
        results = {path: ahead.take(path) for path in ("a/same.c", "a/changed.c", "a/new.c")}
        for item in results.values():
            assert item is not None
            concurrent.futures.wait([item.group], timeout=10)
        assert results["a/same.c"] is not None and results["a/same.c"].result is None
        changed, new = results["a/changed.c"], results["a/new.c"]
        assert changed is not None and changed.result is not None
        assert changed.result.content == b"new content\n" * 50
        assert new is not None and new.result is not None
    finally:
        ahead.close()
