"""The remote manifest: every entry below the root, walked from directory descriptors.

`walk_tree` yields the tree (`walk_under`: one entry and what is below it) as manifest
entries (the 8 fields of `ManifestBatch`) without following a symlink or naming anything
by a path from the root: each directory is opened relative to its parent's descriptor with
O_DIRECTORY|O_NOFOLLOW, its entries are listed and lstat'ed relative to it, and a directory
swapped for a symlink while the walk runs is skipped, never followed, so nothing outside
the root is listed or touched. Stale temporary files of dead agents are removed on the way
(unlink relative to the directory's descriptor) and never listed. Entries that cannot
travel on the wire (names or link targets that are not UTF-8) and special files (FIFOs,
sockets, devices) are left out, and so are the kept remote edits (`KEPT_DIR`,
lsync.agent.keeping) and the directory above them unless lsync made it: the client never
counts nor deletes them.

The walk holds one descriptor per level of the directory being listed, and closes them all
when it ends or is abandoned. Standard library only, Python 3.6 and later (os.listdir and
os.stat accept a directory descriptor there; os.scandir does only from 3.7).
"""

import os
import stat
from stat import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, S_IMODE
from typing import Any, Generator, List, Optional, Tuple

from lsync.agent.confined import DIR_FLAGS, ConfinedRoot, file_key
from lsync.agent.records import DigestRecord
from lsync.agent.refusals import OpError
from lsync.agent.tempfiles import TEMP_PREFIX, is_stale_temp
from lsync.protocol import messages as m
from lsync.protocol.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, relpath_problem

Entry = List[Any]
_KEPT_TOP = m.KEPT_DIR.partition("/")[0]


def walk_tree(root_fd: int, record: DigestRecord,
              prefix: str = "") -> Generator[Entry, None, None]:
    """Yield manifest entries for everything below the directory `root_fd` (not closed),
    whose path from the root is `prefix` ("" for the root itself).

    Digests come from `record` when it knows them without reading a file, and so does
    each entry's `written` field (what lsync made there).
    """
    # (descriptor, wire path, subdirectories still to visit; None until listed)
    stack: List[Tuple[int, str, Optional[List[str]]]] = []
    try:
        stack.append((os.dup(root_fd), prefix, None))
        while stack:
            dfd, rel_dir, subdirs = stack[-1]
            if subdirs is None:
                entries, subdirs = _list_dir(dfd, rel_dir, record)
                subdirs.reverse()  # visited in listing order
                stack[-1] = (dfd, rel_dir, subdirs)
                for entry in entries:
                    yield entry
                continue
            if not subdirs:
                stack.pop()
                os.close(dfd)
                continue
            name = subdirs.pop()
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=dfd)
            except OSError:
                continue  # gone, or no longer a directory (a symlink now): not followed
            stack.append((child, rel_dir + "/" + name if rel_dir else name, None))
    finally:
        for dfd, _, _ in stack:
            os.close(dfd)


def walk_under(root: ConfinedRoot, under: str,
               record: DigestRecord) -> Generator[Entry, None, None]:
    """Yield the manifest entry at `under` (a relative path) and, for a directory, every
    entry below it; nothing when there is none (or its parent is not a directory). Like
    `walk_tree`, never through a symlink."""
    try:
        dfd, name = root.parent_fd(under)
    except OpError:
        return
    try:
        entry = _entry(dfd, name, under, record)
        if entry is None:
            return
        yield entry
        if entry[1] != m.KIND_DIR:
            return
        try:
            child = os.open(name, DIR_FLAGS, dir_fd=dfd)
        except OSError:
            return  # gone, or swapped for a symlink meanwhile: not followed
        try:
            for below in walk_tree(child, record, under):
                yield below
        finally:
            os.close(child)
    finally:
        os.close(dfd)


def _list_dir(dfd: int, rel_dir: str, record: DigestRecord) -> Tuple[List[Entry], List[str]]:
    """The entries of one directory, and the names of its subdirectories.

    `_entry` for each name, written out: this loop runs once per entry of the tree on
    every listing (a restart's too). `rel_dir` is a wire path already (or ""), so a name
    needs only its own checks (listdir never gives "", ".", "..", a slash or a NUL)."""
    entries: List[Entry] = []
    subdirs: List[str] = []
    try:
        names = os.listdir(dfd)
    except OSError:
        return entries, subdirs
    prefix = rel_dir + "/" if rel_dir else ""
    room = MAX_PATH_BYTES - len(prefix.encode("utf-8"))
    lookup, written, lstat = record.lookup, record.written, os.stat
    for name in names:
        if name.startswith(TEMP_PREFIX):
            if is_stale_temp(name):
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    pass
            continue
        try:
            length = len(name.encode("utf-8"))
        except UnicodeError:
            continue  # not representable on the wire
        if length > MAX_NAME_BYTES or length > room:
            continue
        rel = prefix + name
        try:
            st = lstat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue
        mode = st.st_mode
        kind = S_IFMT(mode)
        if kind == S_IFREG:
            entries.append([rel, m.KIND_FILE, st.st_size, st.st_mtime_ns, S_IMODE(mode),
                            lookup(rel, (st.st_size, st.st_mtime_ns, st.st_ino)), None,
                            written(rel, m.KIND_FILE, st.st_ino)])
        elif kind == S_IFDIR:
            made = written(rel, m.KIND_DIR, st.st_ino)
            if rel == m.KEPT_DIR or (rel == _KEPT_TOP and made is None):
                continue
            entries.append([rel, m.KIND_DIR, 0, st.st_mtime_ns, S_IMODE(mode), None, None,
                            made])
            subdirs.append(name)
        elif kind == S_IFLNK:
            entry = _entry(dfd, name, rel, record)  # (rare: readlink and its checks)
            if entry is not None:
                entries.append(entry)
    return entries, subdirs


def _entry(dfd: int, name: str, rel: str, record: DigestRecord) -> Optional[Entry]:
    """The manifest entry of `name` in the directory `dfd` (None: nothing there, or
    nothing that can be listed: a special file, a name not representable on the wire)."""
    if relpath_problem(rel):
        return None  # not representable on the wire (e.g. not UTF-8)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        written = record.written(rel, m.KIND_DIR, st.st_ino)
        if rel == m.KEPT_DIR or (rel == _KEPT_TOP and written is None):
            return None
        return [rel, m.KIND_DIR, 0, st.st_mtime_ns, stat.S_IMODE(mode), None, None, written]
    if stat.S_ISREG(mode):
        return [rel, m.KIND_FILE, st.st_size, st.st_mtime_ns, stat.S_IMODE(mode),
                record.lookup(rel, file_key(st)), None,
                record.written(rel, m.KIND_FILE, st.st_ino)]
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(name, dir_fd=dfd)
            target.encode("utf-8")
        except (OSError, UnicodeError):
            return None
        return [rel, m.KIND_LINK, 0, st.st_mtime_ns, 0, None, target,
                record.written(rel, m.KIND_LINK, st.st_ino)]
    return None
