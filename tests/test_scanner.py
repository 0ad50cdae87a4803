"""Unit tests of lsync.client.local.scanner and lsync.client.local.hashcache on temporary trees.

Most tests give the HashCache a clock 10 s ahead, so files written by the test count as
settled (not racily recent) and digests are remembered; the racy rule has its own test.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from lsync.client.local import hashcache as hashcache_module
from lsync.client.local.hashcache import RACY_NS, HashCache, default_cache_path
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import (
    FileTooLargeError,
    LocalEntry,
    NotRegularFileError,
    ScanError,
    ScanStopped,
    UnstableFileError,
    shared_mode,
)
from lsync.client.local.scanner import ErrorHandler, scan_tree, stat_path
from lsync.client.local.stableread import StableFileReader, read_file_stable


def settled_clock() -> int:
    return time.time_ns() + 5 * RACY_NS


def new_cache(path: Path | None = None, root: Path | None = None,
              algorithm: str = "xxh3-128") -> HashCache:
    return HashCache(algorithm, path, root=root, clock=settled_clock)


def write(root: Path, rel: str, data: bytes = b"", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


def scan(
    root: Path,
    cache: HashCache | None = None,
    *,
    subdir: str = "",
    on_error: ErrorHandler | None = None,
) -> dict[str, LocalEntry]:
    if cache is None:
        cache = new_cache()
    return scan_tree(root, IgnoreRules(root), cache, subdir=subdir, on_error=on_error)


def xxh(data: bytes) -> bytes:
    return xxhash.xxh3_128(data).digest()


# --- scanning ----------------------------------------------------------------------------


def test_scan_lists_files_dirs_and_links_but_not_the_root(tmp_path: Path) -> None:
    write(tmp_path, "a.c", b"int a;\n")
    write(tmp_path, "d/e/f.h", b"#pragma once\n")
    os.symlink("a.c", tmp_path / "link")
    entries = scan(tmp_path)
    assert set(entries) == {"a.c", "d", "d/e", "d/e/f.h", "link"}
    assert entries["a.c"].kind == "file"
    assert entries["a.c"].size == 7
    assert entries["a.c"].digest == xxh(b"int a;\n")
    assert entries["d"].kind == "dir" and entries["d"].size == 0
    assert entries["link"] == LocalEntry(
        "link", 3, entries["link"].mtime_ns, entries["link"].mode, None, "a.c",
        entries["link"].ino, entries["link"].ctime_ns,
    )


def test_symlink_to_directory_is_a_link_and_never_followed(tmp_path: Path) -> None:
    write(tmp_path, "real/inside.c", b"x")
    os.symlink("real", tmp_path / "alias")
    os.symlink(str(tmp_path / "real"), tmp_path / "absolute")
    entries = scan(tmp_path)
    assert entries["alias"].kind == "link" and entries["alias"].target == "real"
    assert entries["absolute"].target == str(tmp_path / "real")
    assert not any(rel.startswith(("alias/", "absolute/")) for rel in entries)


def test_dangling_symlink_is_listed(tmp_path: Path) -> None:
    os.symlink("nowhere", tmp_path / "dangling")
    assert scan(tmp_path)["dangling"].target == "nowhere"


def test_modes_and_exec_bit(tmp_path: Path) -> None:
    write(tmp_path, "run.sh", b"#!/bin/sh\n", mode=0o755)
    write(tmp_path, "data", b"1", mode=0o640)
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "private").chmod(0o700)
    entries = scan(tmp_path)
    assert entries["run.sh"].mode == 0o755
    assert entries["run.sh"].mode & stat.S_IXUSR
    assert entries["data"].mode == 0o640
    assert entries["private"].mode == 0o700


def test_empty_directories_are_listed(tmp_path: Path) -> None:
    (tmp_path / "empty/nested").mkdir(parents=True)
    entries = scan(tmp_path)
    assert entries["empty"].kind == "dir"
    assert entries["empty/nested"].kind == "dir"


def test_special_files_are_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    write(tmp_path, "a", b"a")
    assert set(scan(tmp_path)) == {"a"}


def test_ignored_paths_are_skipped_and_ignored_directories_never_entered(
    tmp_path: Path,
) -> None:
    write(tmp_path, ".gitignore", b"*.o\nbuild/\n")
    write(tmp_path, "a.c")
    write(tmp_path, "a.o")
    write(tmp_path, "build/deep/x.c")
    write(tmp_path, ".git/HEAD", b"ref: refs/heads/main\n")
    rules = IgnoreRules(tmp_path)
    asked: list[str] = []
    original = rules.is_ignored

    def recording(rel: str, is_dir: bool) -> bool:
        asked.append(rel)
        return original(rel, is_dir)

    rules.is_ignored = recording  # type: ignore[method-assign]
    entries = scan_tree(tmp_path, rules, new_cache())
    assert set(entries) == {".gitignore", "a.c"}
    assert "build" in asked and ".git" in asked
    assert not any(rel.startswith(("build/", ".git/")) for rel in asked)


def test_include_vcs_scans_git_directory(tmp_path: Path) -> None:
    write(tmp_path, ".git/HEAD", b"ref: refs/heads/main\n")
    entries = scan_tree(tmp_path, IgnoreRules(tmp_path, include_vcs=True), new_cache())
    assert set(entries) == {".git", ".git/HEAD"}


def test_blake2b_digests(tmp_path: Path) -> None:
    write(tmp_path, "f", b"hello")
    entries = scan(tmp_path, new_cache(algorithm="blake2b-128"))
    assert entries["f"].digest == hashlib.blake2b(b"hello", digest_size=16).digest()


def test_subdir_scan_lists_only_below_the_subdirectory(tmp_path: Path) -> None:
    write(tmp_path, "top.c")
    write(tmp_path, "d/x.c", b"x")
    write(tmp_path, "d/e/y.c", b"y")
    assert set(scan(tmp_path, subdir="d")) == {"d/x.c", "d/e", "d/e/y.c"}
    assert scan(tmp_path, subdir="missing") == {}
    os.symlink("d", tmp_path / "alias")
    assert scan(tmp_path, subdir="alias") == {}


def test_unreadable_file_is_listed_without_digest_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "ok", b"fine")
    write(tmp_path, "bad", b"secret")
    real_open = os.open

    def failing_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "bad":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", failing_open)
    errors: list[tuple[str, Exception]] = []
    entries = scan(tmp_path, on_error=lambda rel, exc: errors.append((rel, exc)))
    assert entries["bad"].kind == "file" and entries["bad"].digest is None
    assert entries["ok"].digest == xxh(b"fine")
    assert [(rel, type(exc)) for rel, exc in errors] == [("bad", PermissionError)]
    with pytest.raises(PermissionError):
        scan(tmp_path)


def test_path_replaced_by_a_directory_during_the_scan_is_listed_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "f", b"was a file")
    real_open = os.open

    def replacing_open(path: str, flags: int, mode: int = 0o777, *,
                       dir_fd: int | None = None) -> int:
        if path == "f" and not flags & os.O_DIRECTORY and (tmp_path / "f").is_file():
            (tmp_path / "f").unlink()
            write(tmp_path, "f/inner", b"now a directory")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", replacing_open)
    entries = scan(tmp_path)
    assert entries["f"].kind == "dir"
    assert entries["f/inner"].digest == xxh(b"now a directory")


def test_vanished_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "gone")


# --- one path ----------------------------------------------------------------------------


def test_stat_path_reports_files_dirs_links_and_none_for_missing_or_ignored(
    tmp_path: Path,
) -> None:
    write(tmp_path, ".gitignore", b"*.o\n")
    write(tmp_path, "d/f.c", b"abc", mode=0o755)
    write(tmp_path, "d/f.o")
    os.symlink("f.c", tmp_path / "d/l")
    os.mkfifo(tmp_path / "fifo")
    rules, cache = IgnoreRules(tmp_path), new_cache()
    f = stat_path(tmp_path, "d/f.c", rules, cache)
    assert f is not None and f.kind == "file" and f.digest == xxh(b"abc") and f.mode == 0o755
    d = stat_path(tmp_path, "d", rules, cache)
    assert d is not None and d.kind == "dir"
    link = stat_path(tmp_path, "d/l", rules, cache)
    assert link is not None and link.kind == "link" and link.target == "f.c"
    assert stat_path(tmp_path, "d/f.o", rules, cache) is None
    assert stat_path(tmp_path, "d/missing", rules, cache) is None
    assert stat_path(tmp_path, "nodir/x", rules, cache) is None
    assert stat_path(tmp_path, "d/f.c/x", rules, cache) is None
    assert stat_path(tmp_path, "fifo", rules, cache) is None
    assert not rules.is_ignored("", True)
    assert scan(tmp_path)["d/f.c"] == f


def test_stat_path_never_resolves_through_a_symlinked_directory(tmp_path: Path) -> None:
    write(tmp_path, "real/f", b"x")
    os.symlink("real", tmp_path / "alias")
    rules, cache = IgnoreRules(tmp_path), new_cache()
    assert stat_path(tmp_path, "alias/f", rules, cache) is None
    with pytest.raises(FileNotFoundError):
        read_file_stable(tmp_path, "alias/f", cache)


def test_stat_path_rejects_paths_that_are_not_relative(tmp_path: Path) -> None:
    for bad in ("", "/etc/passwd", "a/../b", "./a", "a//b"):
        with pytest.raises(ValueError):
            stat_path(tmp_path, bad, IgnoreRules(tmp_path), new_cache())


# --- stable reads --------------------------------------------------------------------------


def test_read_file_stable_returns_content_with_its_entry(tmp_path: Path) -> None:
    write(tmp_path, "f.c", b"int main;\n", mode=0o700)
    content, entry = read_file_stable(tmp_path, "f.c", new_cache())
    assert content == b"int main;\n"
    assert entry.kind == "file" and entry.size == len(content) and entry.mode == 0o700
    assert entry.digest == xxh(content)


def test_read_file_stable_errors(tmp_path: Path) -> None:
    write(tmp_path, "big", b"x" * 100)
    (tmp_path / "dir").mkdir()
    cache = new_cache()
    with pytest.raises(FileNotFoundError):
        read_file_stable(tmp_path, "missing", cache)
    with pytest.raises(NotRegularFileError) as not_regular:
        read_file_stable(tmp_path, "dir", cache)
    assert not_regular.value.code == "not-regular-file"
    with pytest.raises(FileTooLargeError):
        read_file_stable(tmp_path, "big", cache, limit=99)


def patch_read(
    monkeypatch: pytest.MonkeyPatch, path: Path, new_contents: list[bytes]
) -> list[int]:
    """Make os.read rewrite `path` with the next of `new_contents` just before it reads
    (simulating a writer racing the reader). Returns the list of calls made."""
    real_read = os.read
    calls: list[int] = []

    def racing_read(fd: int, n: int) -> bytes:
        calls.append(n)
        if new_contents:
            data = new_contents.pop(0)
            # A tear: the reader sees part of the old content, then the writer's change.
            first = real_read(fd, max(1, n // 2))
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(data)
            return first + real_read(fd, n - len(first))
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", racing_read)
    return calls


def test_file_changed_during_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "f", b"old old old old")
    calls = patch_read(monkeypatch, path, [b"new content, longer than before"])
    content, entry = read_file_stable(tmp_path, "f", new_cache())
    assert content == b"new content, longer than before"
    assert entry.size == len(content) and entry.digest == xxh(content)
    assert len(calls) >= 2


def test_a_file_renamed_over_the_path_during_the_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor's save (a new file renamed over the old one) while the old one is read:
    the lstat of the path after the read names another inode, and the new file is read."""
    path = write(tmp_path, "f", b"old content")
    real_read = os.read
    saved: list[int] = []

    def racing_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if not saved:
            saved.append(n)
            (tmp_path / "f.tmp").write_bytes(b"saved by an editor")
            os.replace(tmp_path / "f.tmp", path)
        return data

    monkeypatch.setattr(os, "read", racing_read)
    content, entry = read_file_stable(tmp_path, "f", new_cache())
    assert content == b"saved by an editor" and entry.digest == xxh(content)
    assert entry.ino == os.lstat(path).st_ino


def test_same_size_change_during_read_is_detected_by_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "f", b"AAAAAAAA")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    calls = patch_read(monkeypatch, path, [b"BBBBBBBB"])
    content, entry = read_file_stable(tmp_path, "f", new_cache())
    assert content == b"BBBBBBBB" and entry.digest == xxh(b"BBBBBBBB")
    assert len(calls) == 2


def test_file_that_keeps_changing_is_reported_unstable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "f", b"0")
    patch_read(monkeypatch, path, [b"1" * n for n in range(2, 20)])
    with pytest.raises(UnstableFileError) as raised:
        read_file_stable(tmp_path, "f", new_cache())
    assert raised.value.code == "unstable-file"
    assert isinstance(raised.value, ScanError) and raised.value.rel == "f"


def test_scan_lists_an_unstable_file_without_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "f", b"0")
    patch_read(monkeypatch, path, [b"1" * n for n in range(2, 20)])
    errors: list[tuple[str, Exception]] = []
    entries = scan(tmp_path, on_error=lambda rel, exc: errors.append((rel, exc)))
    assert entries["f"].digest is None
    assert [(rel, type(exc)) for rel, exc in errors] == [("f", UnstableFileError)]


def test_stable_file_reader_yields_chunks_and_verified_entry(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    write(tmp_path, "big", data)
    cache = new_cache()
    with StableFileReader(tmp_path, "big", cache, chunk_size=4096) as reader:
        assert reader.size == len(data)
        with pytest.raises(ValueError):
            _ = reader.entry
        chunks = list(reader)
        entry = reader.entry
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == data
    assert entry.digest == xxh(data) and entry.size == len(data)
    assert cache.lookup("big", os.lstat(tmp_path / "big")) == entry.digest


def test_stable_file_reader_raises_when_the_file_changed_meanwhile(tmp_path: Path) -> None:
    path = write(tmp_path, "big", b"a" * 10_000)
    with StableFileReader(tmp_path, "big", new_cache(), chunk_size=4096) as reader:
        chunks = iter(reader)
        next(chunks)
        with open(path, "ab") as f:
            f.write(b"more")
        with pytest.raises(UnstableFileError):
            list(chunks)


# --- hash cache ----------------------------------------------------------------------------


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    real_read = os.read
    calls: list[int] = []

    def counting_read(fd: int, n: int) -> bytes:
        calls.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    return calls


def test_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "f", b"data")
    cache = new_cache()
    first = scan(tmp_path, cache)
    reads = count_reads(monkeypatch)
    assert scan(tmp_path, cache) == first
    assert reads == [] and cache.hits == 1


def replace_file(path: Path, data: bytes) -> None:
    """Save the way many editors do: write a temporary file, rename it over the old one."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: os.utime(p, ns=(5_000_000_000, 5_000_000_000)), id="mtime"),
        pytest.param(lambda p: p.write_bytes(b"longer data"), id="size"),
        pytest.param(lambda p: replace_file(p, b"data"), id="inode"),
        pytest.param(lambda p: p.chmod(0o600), id="ctime"),
    ],
)
def test_changed_stat_misses_the_cache(tmp_path: Path, change: Callable[[Path], object]) -> None:
    path = write(tmp_path, "f", b"data")
    cache = new_cache()
    scan(tmp_path, cache)
    change(path)
    cache.misses = 0
    entries = scan(tmp_path, cache)
    assert cache.misses == 1
    assert entries["f"].digest == xxh(path.read_bytes())


def test_recently_modified_file_is_not_trusted_from_the_cache(tmp_path: Path) -> None:
    write(tmp_path, "fresh", b"just saved")
    cache = HashCache("xxh3-128")  # the real clock: the file is younger than RACY_NS
    scan(tmp_path, cache)
    assert len(cache) == 0
    st = os.lstat(tmp_path / "fresh")
    assert cache.store("fresh", st, b"\0" * 16, time.time_ns()) is False
    assert cache.store("fresh", st, b"\0" * 16, max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS)
    assert cache.lookup("fresh", st) == b"\0" * 16


def test_cache_survives_save_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    for i in range(50):
        write(root, f"d{i % 5}/f{i}", f"content {i}".encode())
    write(root, "we\udcffird", b"undecodable name")
    cache_file = tmp_path / "cache" / "hashes"
    cache = new_cache(cache_file, root)
    first = scan(root, cache)
    cache.save()
    assert not [p for p in cache_file.parent.iterdir() if p != cache_file]  # no temp left

    warm = new_cache(cache_file, root)
    assert warm.load() and warm.load_problem is None
    assert len(warm) == 51
    reads = count_reads(monkeypatch)
    assert scan(root, warm) == first
    assert reads == [] and warm.misses == 0


def test_full_scan_drops_records_of_vanished_files(tmp_path: Path) -> None:
    write(tmp_path, "keep", b"1")
    write(tmp_path, "gone", b"2")
    cache = new_cache()
    scan(tmp_path, cache)
    assert len(cache) == 2
    (tmp_path / "gone").unlink()
    scan(tmp_path, cache)
    assert len(cache) == 1


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b"garbage", id="garbage"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], id="flipped-byte"),
    ],
)
def test_corrupt_cache_file_is_ignored(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    root = tmp_path / "root"
    write(root, "f", b"x")
    cache_file = tmp_path / "hashes"
    cache = new_cache(cache_file, root)
    scan(root, cache)
    cache.save()
    cache_file.write_bytes(damage(cache_file.read_bytes()))
    damaged = new_cache(cache_file, root)
    assert damaged.load() is False and damaged.load_problem
    assert len(damaged) == 0
    assert scan(root, damaged)["f"].digest == xxh(b"x")
    damaged.save()
    assert new_cache(cache_file, root).load()


def test_cache_of_another_root_or_algorithm_is_ignored(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    write(root, "f", b"x")
    other.mkdir()
    cache_file = tmp_path / "hashes"
    cache = new_cache(cache_file, root)
    scan(root, cache)
    cache.save()
    assert new_cache(cache_file, root).load()
    foreign_root = new_cache(cache_file, other)
    assert not foreign_root.load() and "another local root" in (foreign_root.load_problem or "")
    foreign_algo = new_cache(cache_file, root, algorithm="blake2b-128")
    assert not foreign_algo.load() and "algorithm" in (foreign_algo.load_problem or "")


def test_missing_cache_file_is_not_an_error(tmp_path: Path) -> None:
    cache = new_cache(tmp_path / "none", tmp_path)
    assert cache.load() is False and "cannot read" in (cache.load_problem or "")


def test_default_cache_path_depends_on_root_and_algorithm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert default_cache_path(a, "xxh3-128").parent == tmp_path / "xdg" / "lsync"
    assert default_cache_path(a, "xxh3-128").name.startswith("a-")
    assert default_cache_path(a, "xxh3-128") != default_cache_path(b, "xxh3-128")
    assert default_cache_path(a, "xxh3-128") != default_cache_path(a, "blake2b-128")
    cache = HashCache("xxh3-128", root=a)
    assert cache.path == default_cache_path(a, "xxh3-128")
    assert hashcache_module.default_cache_dir() == tmp_path / "xdg" / "lsync"


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError):
        HashCache("md5")


def test_a_noted_read_serves_lookups_of_that_version_until_forgotten(tmp_path: Path) -> None:
    """A file changed in the last 2 s is not remembered (the racy-write rule), but the
    digest of the version just read is served while nothing said the path changed."""
    now = [time.time_ns()]
    cache = HashCache(clock=lambda: now[0])
    path = tmp_path / "f.c"
    path.write_bytes(b"int x;\n")
    st = os.stat(path)
    digest = cache.digest_of(b"int x;\n")
    assert not cache.store("f.c", st, digest, now[0])  # racy: not remembered
    assert cache.lookup("f.c", st) is None
    cache.note_read("f.c", st, digest)
    assert cache.lookup("f.c", st) == digest
    path.write_bytes(b"int y;\n")  # another version: another stat
    assert cache.lookup("f.c", os.stat(path)) is None
    cache.forget_recent(["f.c"])  # the watcher said it changed
    assert cache.lookup("f.c", st) is None
    cache.note_read("f.c", st, digest)
    now[0] += hashcache_module.RECENT_NS  # and a noted digest serves a short while only
    assert cache.lookup("f.c", st) is None


def test_lookups_without_the_lock_never_serve_another_versions_digest(tmp_path: Path) -> None:
    """Lookups and noted digests take no lock (the event loop's thread would wait for the
    reader threads): while other threads store, note, forget, discard and save, a lookup of
    one version gets that version's digest or nothing, never the other's."""
    path = tmp_path / "f.c"
    path.write_bytes(b"one\n")
    old = os.stat(path)
    path.write_bytes(b"two, longer\n")
    new = os.stat(path)
    cache = HashCache(path=tmp_path / "cache")
    digests = {id(old): cache.digest_of(b"one\n"), id(new): cache.digest_of(b"two, longer\n")}
    settled = time.time_ns() + 10 * RACY_NS  # (read "later": not racy, so remembered)
    wrong: list[tuple[str, bytes | None]] = []
    done = threading.Event()

    def write() -> None:
        for i in range(4000):
            st = (old, new)[i % 2]
            cache.store("f.c", st, digests[id(st)], settled)
            cache.note_read("f.c", (new, old)[i % 2], digests[id((new, old)[i % 2])])
            if i % 7 == 0:
                cache.forget_recent(["f.c"])
            if i % 11 == 0:
                cache.discard("f.c")
            if i % 501 == 0:
                cache.save(force=True)
        done.set()

    def look() -> None:
        while not done.is_set():
            for st, name in ((old, "old"), (new, "new")):
                got = cache.lookup("f.c", st)
                if got not in (None, digests[id(st)]):
                    wrong.append((name, got))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=write), threading.Thread(target=look)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert done.is_set() and not wrong
    assert cache.lookup("f.c", new) in (None, digests[id(new)])


def test_entries_of_one_mode_share_one_int(tmp_path: Path) -> None:
    # Memory (issue 16): a tree's entries hold a few modes between them, one object each.
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"x")
        (tmp_path / f"f{i}").chmod(0o644)
    entries = scan(tmp_path, new_cache())
    modes = [entries[f"f{i}"].mode for i in range(3)]
    assert modes == [0o644] * 3 and modes[0] is modes[1] is modes[2]
    assert shared_mode(int("420")) is modes[0]
    assert shared_mode(1 << 40) == 1 << 40  # not permission bits: not kept


def test_a_stopped_scan_raises_and_closes_what_it_opened(tmp_path: Path) -> None:
    for d in ("a/b/c", "d/e"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "f.c").write_bytes(b"x")
    stop = threading.Event()
    assert "a/b/c/f.c" in scan_tree(tmp_path, IgnoreRules(tmp_path), new_cache(), stop=stop)
    fds = len(os.listdir("/proc/self/fd"))
    stop.set()
    with pytest.raises(ScanStopped):
        scan_tree(tmp_path, IgnoreRules(tmp_path), new_cache(), stop=stop)
    assert len(os.listdir("/proc/self/fd")) == fds
