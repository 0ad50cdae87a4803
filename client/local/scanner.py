"""The local tree as lsync sees it: `LocalEntry` records from a full scan or one path.

Promises:
- Symlinks are never followed: a link is reported as a link with its target, even when it
  points to a directory, and no path is ever resolved through a symlinked directory nor
  outside the root. A scan opens directories one at a time with O_NOFOLLOW, relative to
  their parent's descriptor; a single path (`stat_path`, `lstat_confined`, `scan_dir`) is
  reached through `confined_open`: one openat2(2) call with RESOLVE_NO_SYMLINKS |
  RESOLVE_BENEATH relative to a kept descriptor of the root where Linux offers it, else the
  same one-component-at-a-time walk. The local root itself may be a symlink.
- Ignored paths (`IgnoreRules`) are skipped and ignored directories are never entered.
  Sockets, FIFOs and devices are skipped. The root is not part of the result.
- A file's digest comes from `HashCache` when the stat is unchanged, else from reading it
  as lsync.client.local.stableread reads (never torn; a file that keeps changing is listed
  without digest); freshly read digests go back into the cache.

The records and their errors are lsync.client.local.localentry's; reading content (whole,
in chunks, or many siblings in turn) is lsync.client.local.stableread's.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from lsync.client.local.confined_open import DIR_FLAGS as _DIR_FLAGS
from lsync.client.local.confined_open import lstat_below
from lsync.client.local.confined_open import open_parent as _open_parent
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import (
    GONE,
    LocalEntry,
    NotRegularFileError,
    ScanError,
    ScanStopped,
    UnstableFileError,
    entry_of,
)
from lsync.client.local.stableread import MAX_ATTEMPTS, file_entry

ErrorHandler = Callable[[str, Exception], None]
IgnoredHandler = Callable[[str, bool], None]  # (rel, is_dir) of an ignored entry


def _open_root(root: Path) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


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
            if exc.errno in GONE:  # gone, or not a directory (any more)
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
                if exc.errno in GONE:  # removed or replaced since listed
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
        if exc.errno in GONE:
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
        if exc.errno in GONE:
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
                        result[rel] = file_entry(fd, name, rel, st, cache, hash_files)
                        continue
                    except NotRegularFileError:
                        pass  # replaced since listed: look again below
                    except (ScanError, OSError) as exc:
                        if isinstance(exc, OSError) and exc.errno in GONE:
                            continue
                        result[rel] = entry_of("file", st)  # exists, content unknown
                        report(rel, exc)
                        continue
                elif item.is_dir(follow_symlinks=False):
                    if not rules.is_ignored(rel, True):
                        result[rel] = entry_of("dir", item.stat(follow_symlinks=False))
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
                        result[rel] = entry_of("link", st, target=os.readlink(name, dir_fd=fd))
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
                if exc.errno in GONE:
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
            if exc.errno in GONE:
                return None
            raise
        mode = st.st_mode
        if rules.is_ignored(rel, stat.S_ISDIR(mode)):
            return None
        if stat.S_ISDIR(mode):
            return entry_of("dir", st)
        try:
            if stat.S_ISLNK(mode):
                return entry_of("link", st, target=os.readlink(name, dir_fd=dir_fd))
            if stat.S_ISREG(mode):
                return file_entry(dir_fd, name, rel, st, cache)
            return None
        except NotRegularFileError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # readlink: no longer a link
                continue
            if exc.errno in GONE:
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
        if exc.errno in GONE:
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
        if exc.errno in GONE or exc.errno == errno.EINVAL:  # gone, or no longer a link
            return None
        raise

