"""Which paths git tracks in a work tree, read from git's index file (no `git` process).

In git, ignore rules apply only to untracked files: a path in the index is part of the
source whatever `.gitignore` says. `IgnoreRules` (lsync.client.local.ignore) asks this module for
the tracked paths below lsync's root.

`locate(root)` finds the repository the way git does: `.git` in `root` or in its nearest
ancestor on the same file system (git's default without GIT_DISCOVERY_ACROSS_FILESYSTEM),
either a directory holding `HEAD` or a file `gitdir: <path>` (linked worktrees,
submodules). The index is `<git dir>/index`; a repository using SHA-256 is recognised by
`objectformat = sha256` in its (common) config. Not honoured: the GIT_DIR, GIT_INDEX_FILE,
GIT_WORK_TREE and GIT_CEILING_DIRECTORIES variables, `core.worktree`, bare repositories.
Nested repositories (submodules, vendored clones) below the root are not read: their
tracked files follow the ignore rules as before.

`read(location)` parses index versions 2, 3 and 4 (Documentation/gitformat-index.txt):
the fixed part of each entry, its flags (and extended flags), its name (NUL-padded in v2
and v3, prefix-compressed in v4). Extensions are walked over without being read, and the
trailing checksum is verified (about 10 ms for the Linux kernel's 8 MB index; skipped when
it is zero, as `index.skipHash` writes it). Every stage counts (a conflicted path is
tracked), and so do entries flagged intent-to-add (`git add -N`) and skip-worktree (sparse
checkout: such a file is normally absent; if it is there, it is still git's). A gitlink
(submodule) and a sparse-index directory entry make their directory tracked, not the files
below it. A split index (`core.splitIndex`, the `link` extension) is refused: its entries
live in two files.

Anything that is not a well-formed index raises `IndexUnreadable` with a one-line reason
(the caller falls back to plain ignore rules); no other exception comes out of `read` but
OSError from opening or reading the file. Paths are decoded like `os.fsdecode` (what
`os.scandir` yields), so they compare equal to the names lsync sees.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import struct
from collections.abc import KeysView
from dataclasses import dataclass

SHA1_SIZE = 20
SHA256_SIZE = 32
_HEADER = struct.Struct(">4sII")
_EXTENSION = struct.Struct(">4sI")
_MODE_FILE = 0o100000  # files (0o100644, 0o100755) and links (0o120000) lie in between
_MODE_GITLINK = 0o160000
_MODE_DIR = 0o040000  # a sparse-index directory entry (its name ends with "/")
_FLAG_EXTENDED = 0x4000
_NAME_MASK = 0x0FFF
_OBJECT_FORMAT = re.compile(rb"^\s*objectformat\s*=\s*sha256\s*$", re.IGNORECASE | re.MULTILINE)


class IndexUnreadable(ValueError):
    """The index file is not one this reader understands (corrupt, unknown, split)."""

    code = "git-index-unreadable"


@dataclass(frozen=True, slots=True)
class IndexLocation:
    """Where the index of the repository holding a tree is, and what it needs to be read."""

    path: str  # the index file (it may not exist yet: a fresh repository)
    prefix: str  # the tree's path inside the work tree ("" when the tree is its top)
    hash_size: int  # SHA1_SIZE or SHA256_SIZE


@dataclass(frozen=True, slots=True, eq=False)
class Tracked:
    """Tracked paths relative to the tree: `files` (regular files and symlinks, any stage)
    and `ordered`, the same files plus gitlinks and sparse directories (with a trailing
    '/'), sorted, for `holds`. `names` maps each file to its own path string, never
    changed: `own` gives a scan that string for an equal one, so the paths of a tree are
    held once (a dict of 80,000 names is also smaller than a frozenset of them)."""

    names: dict[str, str]
    ordered: list[str]

    @property
    def files(self) -> KeysView[str]:
        return self.names.keys()

    def own(self, rel: str) -> str:
        """The path string kept here that equals `rel` (`rel` itself when untracked)."""
        return self.names.get(rel, rel)

    def holds(self, dir_rel: str) -> bool:
        """Whether the directory `dir_rel` holds a tracked path at any depth (or is a
        gitlink or a sparse directory itself)."""
        below = dir_rel + "/"
        i = bisect.bisect_left(self.ordered, below)
        return i < len(self.ordered) and self.ordered[i].startswith(below)


EMPTY = Tracked({}, [])


def locate(root: os.PathLike[str] | str) -> IndexLocation | None:
    """The index of the git repository whose work tree holds `root`, or None (no git)."""
    try:
        here = os.path.realpath(root)
        device = os.stat(here).st_dev
    except OSError:
        return None
    inside: list[str] = []
    while True:
        git_dir = _git_dir(os.path.join(here, ".git"))
        if git_dir is not None:
            prefix = "/".join(reversed(inside))
            return IndexLocation(os.path.join(git_dir, "index"), prefix, _hash_size(git_dir))
        parent = os.path.dirname(here)
        if parent == here:
            return None
        try:
            if os.stat(parent).st_dev != device:
                return None
        except OSError:
            return None
        inside.append(os.path.basename(here))
        here = parent


def _git_dir(dot_git: str) -> str | None:
    """The git directory `dot_git` stands for: itself, or what its `gitdir:` line names."""
    try:
        if os.path.isdir(dot_git) and not os.path.islink(dot_git):
            return dot_git if os.path.exists(os.path.join(dot_git, "HEAD")) else None
        if not os.path.isfile(dot_git):
            return None
        with open(dot_git, "rb") as f:
            text = f.read(4096)
    except OSError:
        return None
    if not text.startswith(b"gitdir:"):
        return None
    target = os.fsdecode(text[len(b"gitdir:"):].strip())
    git_dir = os.path.normpath(os.path.join(os.path.dirname(dot_git), target))
    return git_dir if os.path.isdir(git_dir) else None


def _hash_size(git_dir: str) -> int:
    """SHA256_SIZE when the repository's config says objectformat = sha256."""
    common = git_dir
    try:
        with open(os.path.join(git_dir, "commondir"), "rb") as f:
            common = os.path.join(git_dir, os.fsdecode(f.read().strip()))
    except OSError:
        pass
    try:
        with open(os.path.join(common, "config"), "rb") as f:
            config = f.read(1 << 20)
    except OSError:
        return SHA1_SIZE
    return SHA256_SIZE if _OBJECT_FORMAT.search(config) else SHA1_SIZE


def stamp(location: IndexLocation) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of the index file, None when it does not exist. Git replaces
    the index by renaming a new file over it, so a changed index has a new stamp."""
    try:
        st = os.stat(location.path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read(location: IndexLocation) -> Tracked:
    """The tracked paths below the tree (EMPTY when the repository has no index yet).
    Raises IndexUnreadable, or OSError when the file cannot be read."""
    try:
        with open(location.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return EMPTY
    return tracked_paths(data, location.hash_size, location.prefix)


def tracked_paths(data: bytes, hash_size: int = SHA1_SIZE, prefix: str = "") -> Tracked:
    """Parse the bytes of an index file: the tracked paths below `prefix`, relative to it."""
    names, dir_names = parse(data, hash_size)
    # One decode for all the names (80,000 calls of os.fsdecode would cost 4 times more).
    files = os.fsdecode(b"\0".join(names)).split("\0") if names else []
    dirs = os.fsdecode(b"\0".join(dir_names)).split("\0") if dir_names else []
    if prefix:
        cut = len(prefix) + 1
        start = prefix + "/"
        files = [name[cut:] for name in files if name.startswith(start)]
        dirs = [name[cut:] for name in dirs if name.startswith(start)]
    ordered = files + [name + "/" for name in dirs]
    ordered.sort()  # (the index is sorted by bytes already: this costs little)
    return Tracked({name: name for name in files}, ordered)


def parse(data: bytes, hash_size: int = SHA1_SIZE) -> tuple[list[bytes], list[bytes]]:
    """The names of the index's entries: (files and links, directories: gitlinks and sparse
    directories without their trailing '/'). Raises IndexUnreadable."""
    if len(data) < _HEADER.size + hash_size:
        raise IndexUnreadable("too short for an index")
    signature, version, count = _HEADER.unpack_from(data, 0)
    if signature != b"DIRC":
        raise IndexUnreadable("not an index (no DIRC signature)")
    if version not in (2, 3, 4):
        raise IndexUnreadable(f"index version {version} is not supported")
    end = len(data) - hash_size
    if count > (end - _HEADER.size) // (40 + hash_size + 3):
        raise IndexUnreadable(f"{count} entries cannot fit in {len(data)} bytes")
    try:
        if version == 4:
            names, dirs, pos = _entries_v4(data, count, hash_size, end)
        else:
            names, dirs, pos = _entries_v2(data, count, hash_size, end, version == 3)
    except (struct.error, IndexError) as exc:
        raise IndexUnreadable(f"truncated entry ({exc})") from None
    _check_extensions(data, pos, end)
    checksum = data[end:]
    if checksum.count(0) != hash_size:
        digest = (hashlib.sha1 if hash_size == SHA1_SIZE else hashlib.sha256)(
            memoryview(data)[:end]).digest()
        if digest != checksum:
            raise IndexUnreadable("checksum mismatch")
    return names, dirs


def _entries_v2(data: bytes, count: int, hash_size: int, end: int,
                extended_ok: bool) -> tuple[list[bytes], list[bytes], int]:
    """Entries of a version 2 or 3 index: names NUL-padded to a multiple of 8 bytes.
    (The loop is the reader's hot spot: 80,000 turns for the Linux kernel.)"""
    fixed = struct.Struct(f">24xI{12 + hash_size}xH")  # mode, then flags
    name_at = 40 + hash_size + 2
    unpack = fixed.unpack_from
    names: list[bytes] = []
    dirs: list[bytes] = []
    append = names.append
    pos = _HEADER.size
    for _ in range(count):
        mode, flags = unpack(data, pos)
        length = flags & _NAME_MASK
        if flags & _FLAG_EXTENDED or length == _NAME_MASK or not _MODE_FILE <= mode < _MODE_GITLINK:
            pos = _unusual_entry(data, pos, mode, flags, name_at, extended_ok, names, dirs)
            continue
        stop = pos + name_at + length
        if data[stop] or not length:
            raise _bad_entry(pos, length)
        append(data[pos + name_at:stop])
        pos += (name_at + length + 8) & ~7
    if pos > end:
        raise IndexUnreadable("entries run into the checksum")
    return names, dirs, pos


def _unusual_entry(data: bytes, pos: int, mode: int, flags: int, name_at: int,
                   extended_ok: bool, names: list[bytes], dirs: list[bytes]) -> int:
    """A v2/v3 entry with extended flags, a name of 4095 bytes or more, or a mode other
    than a file's or a link's: add its name where it belongs; return where the next is."""
    start = pos + name_at
    if flags & _FLAG_EXTENDED:
        if not extended_ok:
            raise IndexUnreadable("extended flags in a version 2 index")
        start += 2
    length = flags & _NAME_MASK
    if length == _NAME_MASK:  # 4095 bytes or more: up to the NUL
        length = data.index(b"\0", start) - start
    stop = start + length
    if data[stop] or not length:
        raise _bad_entry(pos, length)
    if mode & 0o170000 in (_MODE_GITLINK, _MODE_DIR):
        dirs.append(data[start:stop].rstrip(b"/"))
    else:
        names.append(data[start:stop])
    return pos + ((stop - pos + 8) & ~7)


def _entries_v4(data: bytes, count: int, hash_size: int,
                end: int) -> tuple[list[bytes], list[bytes], int]:
    """Entries of a version 4 index: each name is the previous one with N bytes cut from
    its end (N a varint) and a NUL-terminated suffix appended; no padding. The flags give
    the whole name's length, so the suffix's end is known before looking at it."""
    fixed = struct.Struct(f">24xI{12 + hash_size}xH")
    flags_end = 40 + hash_size + 2
    unpack = fixed.unpack_from
    names: list[bytes] = []
    dirs: list[bytes] = []
    append = names.append
    previous = b""
    pos = _HEADER.size
    for _ in range(count):
        mode, flags = unpack(data, pos)
        strip = data[pos + flags_end]
        length = flags & _NAME_MASK
        if flags & _FLAG_EXTENDED or strip & 0x80 or length == _NAME_MASK \
                or not _MODE_FILE <= mode < _MODE_GITLINK:
            pos, previous = _unusual_entry_v4(data, pos, mode, flags, flags_end, previous,
                                              names, dirs)
            continue
        keep = len(previous) - strip
        start = pos + flags_end + 1
        stop = start + length - keep
        if keep < 0 or stop < start or not length or data[stop]:  # (an empty suffix: a
            # conflict's next stage)
            raise _bad_entry(pos, length)
        previous = previous[:keep] + data[start:stop]
        append(previous)
        pos = stop + 1
    if pos > end:
        raise IndexUnreadable("entries run into the checksum")
    return names, dirs, pos


def _unusual_entry_v4(data: bytes, pos: int, mode: int, flags: int, flags_end: int,
                      previous: bytes, names: list[bytes],
                      dirs: list[bytes]) -> tuple[int, bytes]:
    """A v4 entry with extended flags, a long name, a cut of 128 bytes or more, or a mode
    other than a file's or a link's: add its name where it belongs; return where the next
    entry is and this entry's name."""
    entry = pos
    pos += flags_end
    if flags & _FLAG_EXTENDED:
        pos += 2
    byte = data[pos]
    pos += 1
    strip = byte & 0x7F
    while byte & 0x80:  # git's offset varint
        byte = data[pos]
        pos += 1
        strip = ((strip + 1) << 7) | (byte & 0x7F)
    if strip > len(previous):
        raise IndexUnreadable(f"bad name compression at byte {entry}")
    stop = data.index(b"\0", pos)
    name = previous[:len(previous) - strip] + data[pos:stop]
    length = flags & _NAME_MASK
    if not name or (length != _NAME_MASK and length != len(name)):
        raise _bad_entry(entry, len(name))
    if mode & 0o170000 in (_MODE_GITLINK, _MODE_DIR):
        dirs.append(name.rstrip(b"/"))
    else:
        names.append(name)
    return stop + 1, name


def _bad_entry(pos: int, length: int) -> IndexUnreadable:
    if not length:  # what a split index's own file holds for a replaced entry
        return IndexUnreadable(f"entry without a name at byte {pos} (split index?)")
    return IndexUnreadable(f"bad entry at byte {pos}")


def _check_extensions(data: bytes, pos: int, end: int) -> None:
    """Walk over the extensions between the entries and the checksum; refuse a split
    index and any required extension (lowercase first letter) that is unknown here."""
    while pos < end:
        if pos + _EXTENSION.size > end:
            raise IndexUnreadable("truncated extension header")
        signature, size = _EXTENSION.unpack_from(data, pos)
        if signature == b"link":
            raise IndexUnreadable("split index (core.splitIndex) is not supported")
        if not (65 <= signature[0] <= 90) and signature != b"sdir":
            raise IndexUnreadable(f"unknown required extension {signature!r}")
        pos += _EXTENSION.size + size
    if pos != end:
        raise IndexUnreadable("extensions run into the checksum")
