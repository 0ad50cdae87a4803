"""Local file content read whole and consistent: never torn, never through a symlink.

Promises:
- File content is never torn. A file is stat'ed before reading, then read through a
  descriptor whose fstat must match; after reading, the path's lstat must still match
  (size, mtime_ns, ctime_ns, inode, device: the same inode, so it sees every change an
  fstat of the descriptor would, and a path swapped meanwhile as well). Otherwise it is
  read again, `MAX_ATTEMPTS` times in all, and then reported as `UnstableFileError`, for
  the caller to retry later (on the next watch event, or after a delay).
  Limit: timestamps are coarse (a kernel tick), so a write inside the same tick as the
  previous one that keeps the size is invisible to stat; what was read may then be stale
  or torn, but that write also produces a watch event after our read began, so the next
  read, triggered by it, sends the right content. `HashCache` never trusts such files.
- A path is reached through `confined_open` (no symlink followed on the way, nothing
  outside the root) and opened with O_NOFOLLOW | O_NONBLOCK (a path swapped for a FIFO
  does not hang the read). IgnoreRules are not consulted here.
- Digests come from `HashCache` when the stat is unchanged (`file_entry`, `hash_file`);
  freshly read digests go back into it.

`read_file_stable` reads a file whole (up to `INLINE_LIMIT`, 64 MiB) and returns the
content with the entry it belongs to; `SiblingReader` does the same for many files in turn,
holding one descriptor per directory; bigger files go through `StableFileReader`, which
yields chunks and verifies, after the last one, that the file did not change meanwhile.
The scan (lsync.client.local.scanner) hashes the files it lists through `file_entry`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from lsync.client.local.confined_open import Parent, check_rel
from lsync.client.local.confined_open import open_parent as _open_parent
from lsync.client.local.hashcache import HashCache, Hasher
from lsync.client.local.localentry import (
    GONE,
    FileTooLargeError,
    LocalEntry,
    NotRegularFileError,
    UnstableFileError,
    entry_of,
)

INLINE_LIMIT = 64 << 20  # read_file_stable refuses bigger files
CHUNK_SIZE = 1 << 20  # read size for big files
MAX_ATTEMPTS = 3  # reads of a changing file before UnstableFileError

# O_NONBLOCK: a path swapped for a FIFO between lstat and open must not hang us.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        a.st_ino == b.st_ino
        and a.st_dev == b.st_dev
        and a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_ctime_ns == b.st_ctime_ns
    )


def _read_fd(fd: int, size: int, hasher: Hasher | None, keep: bool) -> tuple[int, list[bytes]]:
    """Read up to `size` bytes (stopping early at EOF), feeding `hasher`. Returns the
    count read and, when `keep`, the chunks."""
    chunks: list[bytes] = []
    total = 0
    while total < size:
        data = os.read(fd, min(size - total, CHUNK_SIZE) if not keep else size - total)
        if not data:
            break
        total += len(data)
        if hasher is not None:
            hasher.update(data)
        if keep:
            chunks.append(data)
    return total, chunks


def _read_stable(
    dir_fd: int,
    name: str,
    rel: str,
    cache: HashCache,
    keep: bool,
    first_stat: os.stat_result | None = None,
) -> tuple[bytes, os.stat_result, bytes]:
    """Read the regular file `name` in `dir_fd` consistently: (content, stat, digest).
    The content is b"" unless `keep`. Raises OSError when it vanishes, NotRegularFileError,
    UnstableFileError."""
    before = first_stat
    for _attempt in range(MAX_ATTEMPTS):
        if before is None:
            before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):
            raise NotRegularFileError(rel, "not a regular file")
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        try:
            opened = os.fstat(fd)
            if not _same(before, opened):
                before = None
                continue
            hasher = cache.new_hasher()
            total, chunks = _read_fd(fd, before.st_size, hasher, keep)
        finally:
            os.close(fd)
        now = cache.now_ns()
        # (No fstat of the descriptor after the read: the path's lstat below names the
        # same inode when it matches, and sees every change that fstat would have seen,
        # later. One system call less per file: each costs a reader thread a trip through
        # the interpreter lock, the read-ahead's bound during a burst.)
        try:
            again = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            again = None
        if total == before.st_size and again is not None and _same(before, again):
            digest = hasher.digest()
            cache.store(rel, before, digest, now)
            content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            return content, before, digest
        before = None
    raise UnstableFileError(rel, f"changed while being read, {MAX_ATTEMPTS} times")


def file_entry(dir_fd: int, name: str, rel: str, st: os.stat_result,
               cache: HashCache, hash_files: bool = True) -> LocalEntry:
    """The entry of the regular file `name` in `dir_fd` (lstat `st`), with the digest the
    cache holds for that stat, else (with `hash_files`) the digest of a stable read of it."""
    digest = cache.lookup(rel, st)
    if digest is None and hash_files:
        _, st, digest = _read_stable(dir_fd, name, rel, cache, False, st)
    return entry_of("file", st, digest)


def hash_file(root: Path, rel: str, cache: HashCache) -> LocalEntry:
    """The entry of the regular file `rel` with its digest (from the cache when its stat
    matches, else read); raises what read_file_stable raises, but for FileTooLargeError."""
    with _open_parent_or_gone(root, rel) as parent:
        st = os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(rel, "not a regular file")
        return file_entry(parent.fd, parent.name, rel, st, cache)


def _open_parent_or_gone(root: Path, rel: str) -> Parent:
    """`_open_parent`, with a path that is gone (also below a symlink) as FileNotFoundError."""
    try:
        return _open_parent(root, rel)
    except OSError as exc:
        if exc.errno in GONE:
            raise FileNotFoundError(errno.ENOENT, "no such file", rel) from exc
        raise


def read_file_stable(
    root: Path, rel: str, cache: HashCache, *, limit: int = INLINE_LIMIT
) -> tuple[bytes, LocalEntry]:
    """The whole content of the regular file `rel` and the entry it belongs to (its
    digest is the content's). Does not consult IgnoreRules.

    Raises FileNotFoundError when the path is gone (also below a symlink),
    NotRegularFileError, FileTooLargeError above `limit` (use StableFileReader),
    UnstableFileError, or another OSError.
    """
    with _open_parent_or_gone(root, rel) as parent:
        st = os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(rel, "not a regular file")
        if st.st_size > limit:
            raise FileTooLargeError(rel, f"{st.st_size} bytes, more than {limit}")
        content, st, digest = _read_stable(parent.fd, parent.name, rel, cache, True, st)
        return content, entry_of("file", st, digest)


class SiblingReader:
    """`read_file_stable` for many files in turn, consecutive files of one directory
    reached through one descriptor of it (the read-ahead's groups: neighbours in the queue
    are mostly siblings), opened as `read_file_stable` opens it and held until the next
    directory or `close`. Each file is checked and read as `read_file_stable` does; what
    one raises concerns that file alone."""

    def __init__(self, root: Path, cache: HashCache) -> None:
        self._root = root
        self._cache = cache
        self._directory: str | None = None
        self._parent: Parent | None = None

    def _parent_of(self, rel: str) -> tuple[int, str]:
        directory, _, name = rel.rpartition("/")
        if self._parent is None or directory != self._directory:
            self.close()
            self._parent = _open_parent_or_gone(self._root, rel)
            self._directory = directory
        else:
            check_rel(rel)  # the name as `_open_parent` checks it (ValueError)
        return self._parent.fd, name

    def digest_known(self, rel: str) -> bytes | None:
        """The digest the hash cache holds for `rel` as it is now (its stat), or None; for
        a regular file only. Raises as `read` does when it cannot look."""
        fd, name = self._parent_of(rel)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        return self._cache.lookup(rel, st) if stat.S_ISREG(st.st_mode) else None

    def read(self, rel: str, *, limit: int = INLINE_LIMIT) -> tuple[bytes, LocalEntry]:
        content, entry, _ = self.read_stat(rel, limit=limit)
        return content, entry

    def read_stat(self, rel: str, *, limit: int = INLINE_LIMIT
                  ) -> tuple[bytes, LocalEntry, os.stat_result]:
        """`read`, and the file's lstat (through the confined parent) that the content
        belongs to."""
        fd, name = self._parent_of(rel)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(rel, "not a regular file")
        if st.st_size > limit:
            raise FileTooLargeError(rel, f"{st.st_size} bytes, more than {limit}")
        content, st, digest = _read_stable(fd, name, rel, self._cache, True, st)
        return content, entry_of("file", st, digest), st

    def close(self) -> None:
        if self._parent is not None:
            self._parent.close()
        self._parent = None
        self._directory = None

    def __enter__(self) -> SiblingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StableFileReader:
    """Reads a file of any size in chunks and checks at the end that it did not change.

        with StableFileReader(root, rel, cache) as reader:
            send_header(reader.size)
            for chunk in reader:          # raises UnstableFileError after the last
                send(chunk)               # chunk if the file changed meanwhile
            entry = reader.entry          # with the digest of what was sent

    Opening raises what read_file_stable raises, but for FileTooLargeError. On
    UnstableFileError the caller discards what it sent and tries again later.
    """

    def __init__(self, root: Path, rel: str, cache: HashCache,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self.rel = rel
        self._cache = cache
        self._chunk_size = chunk_size
        self._entry: LocalEntry | None = None
        self._parent = _open_parent_or_gone(root, rel)
        dir_fd, name = self._parent.fd, self._parent.name
        self._fd = -1
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(rel, "not a regular file")
            self._fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            if not _same(st, os.fstat(self._fd)):
                raise UnstableFileError(rel, "changed while being opened")
        except BaseException:
            self.close()
            raise
        self.file_stat = st
        self.size = st.st_size

    def __enter__(self) -> StableFileReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._parent.close()

    def __iter__(self) -> Iterator[bytes]:
        if self._fd < 0:
            raise ValueError("reader is closed")
        hasher = self._cache.new_hasher()
        total = 0
        while total < self.size:
            data = os.read(self._fd, min(self._chunk_size, self.size - total))
            if not data:
                break
            total += len(data)
            hasher.update(data)
            yield data
        after = os.fstat(self._fd)
        now = self._cache.now_ns()
        try:
            again: os.stat_result | None = os.stat(
                self._parent.name, dir_fd=self._parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            again = None
        if total != self.size or not _same(self.file_stat, after) or again is None \
                or not _same(self.file_stat, again):
            raise UnstableFileError(self.rel, "changed while being read")
        digest = hasher.digest()
        self._cache.store(self.rel, self.file_stat, digest, now)
        self._entry = entry_of("file", self.file_stat, digest)

    @property
    def entry(self) -> LocalEntry:
        """The verified entry; only after the iteration completed."""
        if self._entry is None:
            raise ValueError("the file has not been read to the end")
        return self._entry
