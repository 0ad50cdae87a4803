"""The files of the agent's record (lsync.agent.records): the snapshot's format, the
journal's lines, and writing a file whole by a temporary name and a rename.

A snapshot is a header line (`lsync-record 1 <SHA-256 of the rest>`) and then, in `marshal`
format 4 (read by every Python 3 since 3.4, whatever Python wrote it), the hash algorithm,
the time it was saved, the digest cache (path -> (size, mtime_ns, inode, digest)), what
lsync wrote (path -> (kind, digest / link target / b"", inode)) and the id of the journal
that extends it. `read_snapshot` checks the digest and every value's type and gives None
for anything else: a torn, corrupt or foreign file tells nothing. Journal lines are JSON,
one list per line. Standard library only, Python 3.6 and later.
"""

import hashlib
import json
import marshal
import os
from typing import Any, Dict, List, Optional, Tuple

from lsync.protocol.messages import KIND_DIR, KIND_FILE, KIND_LINK

RACY_NS = 2 * 10 ** 9  # without the file system's clock: keys this close to now are racy
_SNAPSHOT_MAGIC = b"lsync-record"
_SNAPSHOT_FORMAT = b"1"
_MARSHAL_VERSION = 4  # (written explicitly: a later Python's default may be newer)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

Entry = Tuple[int, int, int, bytes]  # (size, mtime_ns, inode, digest)
Written = Tuple[str, bytes, int]  # (kind, digest / link target / b"", inode of a directory)


def is_racy(mtime_ns: int, now_ns: int, fs_now_ns: Optional[int]) -> bool:
    """Whether a key with this mtime, saved now, could be kept by a later change of the
    file: a write in the same tick of the file system's clock leaves the mtime as it is.

    With `fs_now_ns`, the file system's own clock now (the mtime of a file it just made,
    `ConfinedRoot.filesystem_now_ns`), that is exactly the keys whose mtime is not older:
    any later write gets an mtime of at least `fs_now_ns`, whatever the clock's tick (ns on
    ext4, 1 s or 2 s elsewhere) and whatever the skew between the agent's clock and a file
    server's. Without it, the keys less than RACY_NS older than the agent's clock."""
    if fs_now_ns is not None:
        return mtime_ns >= fs_now_ns
    return now_ns - mtime_ns < RACY_NS


def is_snapshot(raw: bytes) -> bool:
    """Whether `raw` is in this format (else: the JSON of an older agent)."""
    return raw.startswith(_SNAPSHOT_MAGIC + b" ")


def snapshot_bytes(algorithm: str, now_ns: int, entries: Dict[str, Entry],
                   written: Dict[str, Written], journal_id: str,
                   fs_now_ns: Optional[int] = None) -> bytes:
    """The snapshot file's bytes. Keys that a later change could leave as they are are left
    out (the racy-mtime rule, `is_racy`)."""
    kept = {path: entry for path, entry in entries.items()
            if not is_racy(entry[1], now_ns, fs_now_ns)}
    payload = marshal.dumps((algorithm, now_ns, kept, written, journal_id), _MARSHAL_VERSION)
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return b" ".join((_SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, digest)) + b"\n" + payload


def read_snapshot(raw: bytes, algorithm: str) -> Optional[
        Tuple[Dict[str, Entry], Dict[str, Written], str]]:
    """The digest cache, what lsync wrote and the journal id of a snapshot file; None when
    it is torn, corrupt, of another format or for another hash (nothing is then known)."""
    header, sep, payload = raw.partition(b"\n")
    fields = header.split(b" ")
    if not sep or len(fields) != 3 or fields[1] != _SNAPSHOT_FORMAT:
        return None
    if hashlib.sha256(payload).hexdigest().encode("ascii") != fields[2]:
        return None
    try:
        loaded = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    if type(loaded) is not tuple or len(loaded) != 5 or loaded[0] != algorithm:
        return None
    _, _, entries, written, journal_id = loaded
    if type(entries) is not dict or type(written) is not dict or type(journal_id) is not str:
        return None
    for path, entry in entries.items():
        if (type(path) is not str or type(entry) is not tuple or len(entry) != 4
                or type(entry[3]) is not bytes):
            return None
    for path, fact in written.items():
        if (type(path) is not str or type(fact) is not tuple or len(fact) != 3
                or fact[0] not in (KIND_FILE, KIND_LINK, KIND_DIR)
                or type(fact[1]) is not bytes or type(fact[2]) is not int):
            return None
    return entries, written, journal_id


_QUOTE = json.encoder.encode_basestring_ascii


def journal_line(value: List[Any]) -> str:
    """One journal line: `value` as json.dumps(value, separators=(",", ":")) writes it.

    Journal lines are lists of strings and integers, two per file written: these are
    quoted by json's own (C) string quoting and joined here, which costs a fifth of
    json.dumps (which makes a new encoder per call); anything else goes to json.dumps."""
    parts = []
    for item in value:
        kind = type(item)
        if kind is str:
            parts.append(_QUOTE(item))
        elif kind is int:
            parts.append(str(item))
        else:
            return json.dumps(value, separators=(",", ":")) + "\n"
    return "[" + ",".join(parts) + "]\n"


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_file(path: str, data: bytes, keep_open: bool = False) -> int:
    """Write `data` to a temporary file and rename it over `path` (atomic for readers).

    With keep_open the file stays open for appending and its fd is returned, else -1.
    """
    temp = "{}.{}.tmp".format(path, os.getpid())
    try:
        os.unlink(temp)
    except OSError:
        pass
    fd = os.open(temp, _FILE_FLAGS | (os.O_APPEND if keep_open else 0), 0o600)
    try:
        write_all(fd, data)
        os.replace(temp, path)
    except OSError:
        os.close(fd)
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if keep_open:
        return fd
    os.close(fd)
    return -1
