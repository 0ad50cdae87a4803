"""The local tree as lsync sees it: `LocalEntry` records from a full scan or one path.

Promises:
- Symlinks are never followed: a link is reported as a link with its target, even when it
  points to a directory, and no path is ever resolved through a symlinked directory nor
  outside the root. A scan opens directories one at a time with O_NOFOLLOW, relative to
  their parent's descriptor; a single path (`stat_path`, `lstat_confined`,
  `read_file_stable`, `scan_dir`) is reached through `confined_open`: one openat2(2) call
  with RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH relative to a kept descriptor of the root where
  Linux offers it, else the same one-component-at-a-time walk. The local root itself may be
  a symlink.
- Ignored paths (`IgnoreRules`) are skipped and ignored directories are never entered.
  Sockets, FIFOs and devices are skipped. The root is not part of the result.
- File content is never torn. A file is stat'ed before reading, then read through a
  descriptor whose fstat must match; after reading, both the descriptor's fstat and the
  path's lstat must still match (size, mtime_ns, ctime_ns, inode, device). Otherwise it is
  read again, `MAX_ATTEMPTS` times in all, and then reported as `UnstableFileError`, for
  the caller to retry later (on the next watch event, or after a delay).
  Limit: timestamps are coarse (a kernel tick), so a write inside the same tick as the
  previous one that keeps the size is invisible to stat; what was read may then be stale
  or torn, but that write also produces a watch event after our read began, so the next
  read, triggered by it, sends the right content. `HashCache` never trusts such files.
- Digests come from `HashCache` when the stat is unchanged; freshly read digests go back
  into it.

`read_file_stable` reads a file whole (up to `INLINE_LIMIT`, 64 MiB) and returns the
content with the entry it belongs to; bigger files go through `StableFileReader`, which
yields chunks and verifies, after the last one, that the file did not change meanwhile.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from lsync.client.local.confined_open import DIR_FLAGS as _DIR_FLAGS
from lsync.client.local.confined_open import Parent, check_rel, lstat_below
from lsync.client.local.confined_open import open_parent as _open_parent
from lsync.client.local.hashcache import HashCache, Hasher
from lsync.client.local.ignore import IgnoreRules

EntryKind = Literal["file", "dir", "link"]

INLINE_LIMIT = 64 << 20  # read_file_stable refuses bigger files
CHUNK_SIZE = 1 << 20  # read size for big files
MAX_ATTEMPTS = 3  # reads of a changing file before UnstableFileError

# O_NONBLOCK: a path swapped for a FIFO between lstat and open must not hang us.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# errnos meaning "this path does not exist as a plain path any more"
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


@dataclass(frozen=True, slots=True)
class LocalEntry:
    """One local path. `size` is 0 for directories and the target's length for links;
    `mode` is the permission bits (stat.S_IMODE); `digest` is the 16-byte content digest
    of a file, None when it could not be read; `target` is a link's target.
    `ino` and `ctime_ns` complete `local_key`, which identifies a file version."""

    kind: EntryKind
    size: int
    mtime_ns: int
    mode: int
    digest: bytes | None = None
    target: str | None = None
    ino: int = 0
    ctime_ns: int = 0

    @property
    def local_key(self) -> tuple[int, int, int, int]:
        """(ino, size, mtime_ns, ctime_ns): equal keys mean the same file version."""
        return (self.ino, self.size, self.mtime_ns, self.ctime_ns)


class ScanError(Exception):
    """A local path could not be read as it should. `code` names the case."""

    code = "scan-error"

    def __init__(self, rel: str, message: str) -> None:
        super().__init__(f"{rel}: {message}")
        self.rel = rel


class UnstableFileError(ScanError):
    """The file kept changing while it was read; try again later."""

    code = "unstable-file"


class NotRegularFileError(ScanError):
    """The path is not (or no longer) a regular file."""

    code = "not-regular-file"


class ScanStopped(ScanError):
    """The caller stopped the scan (`scan_tree`'s `stop`)."""

    code = "scan-stopped"


class FileTooLargeError(ScanError):
    """Too big to read in one piece; use StableFileReader."""

    code = "file-too-large"


ErrorHandler = Callable[[str, Exception], None]
IgnoredHandler = Callable[[str, bool], None]  # (rel, is_dir) of an ignored entry


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        a.st_ino == b.st_ino
        and a.st_dev == b.st_dev
        and a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_ctime_ns == b.st_ctime_ns
    )


def _open_root(root: Path) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


_MODES: dict[int, int] = {}  # permission bits -> one int object for them (at most 4,096)


def shared_mode(mode: int) -> int:
    """`mode`, as the one int object kept for it: the entries of a tree have a few modes
    between them, and an int of 420 (0o644) costs 28 bytes per entry otherwise. (Anything
    but permission bits, which a manifest might hold, is given back as it is.)"""
    if 0 <= mode <= 0o7777:
        return _MODES.setdefault(mode, mode)
    return mode


def _entry(kind: EntryKind, st: os.stat_result, digest: bytes | None = None,
           target: str | None = None) -> LocalEntry:
    size = 0 if kind == "dir" else st.st_size
    return LocalEntry(kind, size, st.st_mtime_ns, shared_mode(stat.S_IMODE(st.st_mode)),
                      digest, target, st.st_ino, st.st_ctime_ns)


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
            after = os.fstat(fd)
        finally:
            os.close(fd)
        now = cache.now_ns()
        try:
            again = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            again = None
        if total == before.st_size and _same(before, after) and again is not None \
                and _same(before, again):
            digest = hasher.digest()
            cache.store(rel, before, digest, now)
            content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            return content, before, digest
        before = None
    raise UnstableFileError(rel, f"changed while being read, {MAX_ATTEMPTS} times")


def _file_entry(dir_fd: int, name: str, rel: str, st: os.stat_result,
                cache: HashCache, hash_files: bool = True) -> LocalEntry:
    digest = cache.lookup(rel, st)
    if digest is None and hash_files:
        _, st, digest = _read_stable(dir_fd, name, rel, cache, False, st)
    return _entry("file", st, digest)


def hash_file(root: Path, rel: str, cache: HashCache) -> LocalEntry:
    """The entry of the regular file `rel` with its digest (from the cache when its stat
    matches, else read); raises what read_file_stable raises, but for FileTooLargeError."""
    with _open_parent_or_gone(root, rel) as parent:
        st = os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(rel, "not a regular file")
        return _file_entry(parent.fd, parent.name, rel, st, cache)


def scan_tree(
    root: Path,
    rules: IgnoreRules,
    cache: HashCache,
    *,
    subdir: str = "",
    on_error: ErrorHandler | None = None,
    hash_files: bool = True,
    on_ignored: IgnoredHandler | None = None,
    stop: threading.Event | None = None,
) -> dict[str, LocalEntry]:
    """Every path below `root` (or below `root/subdir`) that is not ignored, by relative
    path. A full scan (no `subdir`) also drops cache records of files no longer present.
    Once `stop` is set (nobody wants the result any more: cancelling the task that runs a
    scan in a thread does not end the thread) it raises ScanStopped at the next directory
    instead of walking the rest of the tree beside the scan that replaces it.
    Without `hash_files`, a file whose digest the cache does not know is listed with digest
    None instead of being read (the caller hashes what it needs: `hash_file`).

    Each entry skipped because `rules` ignore it (a directory: not entered) goes to
    `on_ignored(rel, is_dir)`. Problems with single paths go to `on_error(rel, exc)`;
    without it they are raised.
    A file that cannot be read, or keeps changing (UnstableFileError), is still listed
    with digest None (it exists: do not delete it remotely; read it again later); a
    directory that cannot be listed is listed with unknown contents. Paths that vanish
    during the scan are left out silently. Errors at the root itself always raise.
    """

    def report(rel: str, exc: Exception) -> None:
        if on_error is None:
            raise exc
        on_error(rel, exc)

    result: dict[str, LocalEntry] = {}
    if subdir:
        if rules.is_ignored(subdir, True):
            return result
        try:
            with _open_parent(root, subdir) as parent:
                top_fd = os.open(parent.name, _DIR_FLAGS, dir_fd=parent.fd)
        except OSError as exc:
            if exc.errno in _GONE:  # gone, or not a directory (any more)
                return result
            raise
        top_prefix = subdir + "/"
    else:
        top_fd = _open_root(root)
        top_prefix = ""

    # Depth-first, one open descriptor per level: (fd, prefix, subdirectories to visit)
    stack: list[tuple[int, str, Iterator[str]]] = [(top_fd, top_prefix, iter(()))]
    try:
        subdirs = _scan_dir(top_fd, top_prefix, rules, cache, result, report, top=True,
                            hash_files=hash_files, on_ignored=on_ignored)
        stack[0] = (top_fd, top_prefix, iter(subdirs))
        while stack:
            if stop is not None and stop.is_set():
                raise ScanStopped(subdir, "the scan was stopped")
            fd, prefix, pending = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                os.close(fd)
                continue
            rel = prefix + child
            try:
                child_fd = os.open(child, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _GONE:  # removed or replaced since listed
                    result.pop(rel, None)
                else:
                    report(rel, exc)
                continue
            stack.append((child_fd, rel + "/", iter(())))
            subdirs = _scan_dir(child_fd, rel + "/", rules, cache, result, report, top=False,
                                hash_files=hash_files, on_ignored=on_ignored)
            stack[-1] = (child_fd, rel + "/", iter(subdirs))
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    if not subdir:
        cache.retain(rel for rel, entry in result.items() if entry.kind == "file")
    return result


def scan_dir(root: Path, rel: str, rules: IgnoreRules,
             cache: HashCache) -> dict[str, LocalEntry] | None:
    """The entries directly inside directory `rel` ("" for the root) that are not ignored,
    or None when `rel` is gone, ignored, or no longer a directory (also below a symlink).
    Problems with single entries leave them out or without digest, as in `scan_tree`."""
    result: dict[str, LocalEntry] = {}
    if rel and rules.is_ignored(rel, True):
        return None
    try:
        if rel:
            with _open_parent(root, rel) as parent:
                fd = os.open(parent.name, _DIR_FLAGS, dir_fd=parent.fd)
        else:
            fd = _open_root(root)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    try:
        _scan_dir(fd, rel + "/" if rel else "", rules, cache, result,
                  lambda path, exc: None, top=True)
    finally:
        os.close(fd)
    return result


def _scan_dir(
    fd: int,
    prefix: str,
    rules: IgnoreRules,
    cache: HashCache,
    result: dict[str, LocalEntry],
    report: ErrorHandler,
    *,
    top: bool,
    hash_files: bool = True,
    on_ignored: IgnoredHandler | None = None,
) -> list[str]:
    """Add the entries of one directory to `result`; return its subdirectories to visit.
    Failing to list the top directory raises; any other problem goes to `report`."""
    subdirs: list[str] = []
    try:
        it = os.scandir(fd)
    except OSError as exc:
        if top:
            raise
        if exc.errno in _GONE:
            result.pop(prefix[:-1], None)
        else:
            report(prefix[:-1], exc)
        return subdirs
    with it:
        for item in it:
            name = item.name
            rel = prefix + name
            try:
                if item.is_file(follow_symlinks=False):
                    if rules.is_ignored(rel, False):
                        if on_ignored is not None:
                            on_ignored(rel, False)
                        continue
                    rel = rules.own(rel)
                    st = item.stat(follow_symlinks=False)
                    try:
                        result[rel] = _file_entry(fd, name, rel, st, cache, hash_files)
                        continue
                    except NotRegularFileError:
                        pass  # replaced since listed: look again below
                    except (ScanError, OSError) as exc:
                        if isinstance(exc, OSError) and exc.errno in _GONE:
                            continue
                        result[rel] = _entry("file", st)  # exists, content unknown
                        report(rel, exc)
                        continue
                elif item.is_dir(follow_symlinks=False):
                    if not rules.is_ignored(rel, True):
                        result[rel] = _entry("dir", item.stat(follow_symlinks=False))
                        subdirs.append(name)
                    elif on_ignored is not None:
                        on_ignored(rel, True)
                    continue
                elif item.is_symlink():
                    if rules.is_ignored(rel, False):
                        if on_ignored is not None:
                            on_ignored(rel, False)
                        continue
                    rel = rules.own(rel)
                    st = item.stat(follow_symlinks=False)
                    try:
                        result[rel] = _entry("link", st, target=os.readlink(name, dir_fd=fd))
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:  # EINVAL: no longer a link
                            raise
                else:
                    continue  # socket, FIFO, device
                # The path changed type between listing and reading it.
                entry = _entry_at(fd, name, rel, rules, cache)
                if entry is not None:
                    result[rel] = entry
                    if entry.kind == "dir":
                        subdirs.append(name)
            except ScanError as exc:
                report(rel, exc)
            except OSError as exc:
                if exc.errno in _GONE:
                    result.pop(rel, None)
                    continue
                report(rel, exc)
    return subdirs


def _entry_at(
    dir_fd: int, name: str, rel: str, rules: IgnoreRules, cache: HashCache
) -> LocalEntry | None:
    """The entry for `name` in `dir_fd`, or None (gone, ignored, or a special file).
    Looks again when the path changes type under us, MAX_ATTEMPTS times in all."""
    for _attempt in range(MAX_ATTEMPTS):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            raise
        mode = st.st_mode
        if rules.is_ignored(rel, stat.S_ISDIR(mode)):
            return None
        if stat.S_ISDIR(mode):
            return _entry("dir", st)
        try:
            if stat.S_ISLNK(mode):
                return _entry("link", st, target=os.readlink(name, dir_fd=dir_fd))
            if stat.S_ISREG(mode):
                return _file_entry(dir_fd, name, rel, st, cache)
            return None
        except NotRegularFileError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # readlink: no longer a link
                continue
            if exc.errno in _GONE:
                return None
            raise
    raise UnstableFileError(rel, "kept changing type while being read")


def stat_path(root: Path, rel: str, rules: IgnoreRules, cache: HashCache) -> LocalEntry | None:
    """The entry for one path, or None when it does not exist (also when it lies below a
    symlink or a non-directory), is ignored, or is a socket, FIFO or device.
    May raise UnstableFileError, and OSError for other failures (e.g. permissions)."""
    try:
        parent = _open_parent(root, rel)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    with parent:
        return _entry_at(parent.fd, parent.name, rel, rules, cache)


def lstat_confined(root: Path, rel: str) -> tuple[os.stat_result, str | None] | None:
    """lstat of `rel` reached without following any symlink on the way (None when it is
    gone, also below a symlink or a non-directory), and its target when it is a link.
    Raises OSError for other failures (e.g. permissions)."""
    try:
        return lstat_below(root, rel)
    except OSError as exc:
        if exc.errno in _GONE or exc.errno == errno.EINVAL:  # gone, or no longer a link
            return None
        raise


def _open_parent_or_gone(root: Path, rel: str) -> Parent:
    """`_open_parent`, with a path that is gone (also below a symlink) as FileNotFoundError."""
    try:
        return _open_parent(root, rel)
    except OSError as exc:
        if exc.errno in _GONE:
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
        return content, _entry("file", st, digest)


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
        fd, name = self._parent_of(rel)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(rel, "not a regular file")
        if st.st_size > limit:
            raise FileTooLargeError(rel, f"{st.st_size} bytes, more than {limit}")
        content, st, digest = _read_stable(fd, name, rel, self._cache, True, st)
        return content, _entry("file", st, digest)

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
        self._entry = _entry("file", self.file_stat, digest)

    @property
    def entry(self) -> LocalEntry:
        """The verified entry; only after the iteration completed."""
        if self._entry is None:
            raise ValueError("the file has not been read to the end")
        return self._entry
