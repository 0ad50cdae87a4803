"""What lsync records of one local path, and what can go wrong reading one.

`LocalEntry` is a path as the scan, a single-path look (lsync.client.local.scanner) and a
stable read (lsync.client.local.stableread) report it: kind, size, times, permission bits,
digest, link target, and the (ino, size, mtime_ns, ctime_ns) key that names a file version.
`entry_of` builds one from an lstat, its mode shared with every other entry of that mode
(`shared_mode`). The errors are one family, `ScanError`, each with a `code`; `GONE` are the
errnos that mean a path no longer exists as a plain path (gone, or below a symlink or a
non-directory), which the callers treat as absence, not failure. No I/O here.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Literal

EntryKind = Literal["file", "dir", "link"]

# errnos meaning "this path does not exist as a plain path any more"
GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


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


_MODES: dict[int, int] = {}  # permission bits -> one int object for them (at most 4,096)


def shared_mode(mode: int) -> int:
    """`mode`, as the one int object kept for it: the entries of a tree have a few modes
    between them, and an int of 420 (0o644) costs 28 bytes per entry otherwise. (Anything
    but permission bits, which a manifest might hold, is given back as it is.)"""
    if 0 <= mode <= 0o7777:
        return _MODES.setdefault(mode, mode)
    return mode


def entry_of(kind: EntryKind, st: os.stat_result, digest: bytes | None = None,
             target: str | None = None) -> LocalEntry:
    """The entry of a path of `kind` with lstat `st` (a directory's size is 0)."""
    size = 0 if kind == "dir" else st.st_size
    return LocalEntry(kind, size, st.st_mtime_ns, shared_mode(stat.S_IMODE(st.st_mode)),
                      digest, target, st.st_ino, st.st_ctime_ns)
