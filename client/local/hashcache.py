"""Content digests of local files, remembered across runs so an unchanged tree is not re-read.

`HashCache` maps a relative path to the digest of the file's content together with the
(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) the file had when it was read; a lookup
with a different stat misses. Editors that save by rename get a new inode; in-place writes
change mtime and ctime; chmod and touch change ctime.

The racy-write rule: kernels stamp files with a coarse clock (one tick is 1-10 ms, and 2 s on
FAT), so a second write within the tick of the first keeps size, mtime and ctime, and a
digest taken between the two would be wrong for as long as it is trusted. So a digest is
remembered only when the file's newer of mtime and ctime lies at least `RACY_NS` (2 s)
before the moment reading finished. A file changed in the last 2 s is therefore hashed
again on every lookup (cheap for one file), within a run and on the next run, until it
has been quiet for 2 s; mtimes in the future are never trusted. `store` applies the rule,
given the time the caller finished reading; the clock is injectable for tests.

On disk: a magic line, a JSON header (format version, algorithm, the absolute local root,
the save time, the record count), all paths as one NUL-separated UTF-8 blob, all records
as one blob, and a blake2b checksum of everything before it; written to a temporary file,
fsynced and renamed over the old one. A missing, unreadable, corrupt, truncated or foreign
(other algorithm or root) cache file is ignored, never fatal: `load` returns False and
says why in `load_problem`. Loading 80,000 records takes a few split and slice calls. In memory a
record is one 56-byte bytes object per path; `retain`, run after a full scan, drops paths
that are gone and shares the path strings with the scan result (about 10 MB beyond the
scan itself for 80,000 files).

Threads: the scanner and the engine's reader threads call `lookup`, `store` and `discard`
while the event loop's thread may call `save`; one lock guards what changes the records
(with their dirty flag), and `save` encodes a snapshot taken under it, so a save never mixes
two states of the cache. Lookups and the noted digests (`note_read`, `forget_recent`) take
no lock: each is one dictionary operation, atomic on its own, and a lookup that races a
store sees the record before or after it, both true of some moment. (The lock used to be
taken there too: the event loop's thread then waited, several times per file of a burst,
for a reader thread that held it while the interpreter had switched away from it.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from lsync.protocol.hashing import ALGORITHMS, XXH3_128, new_hasher

MAGIC = b"lsync-hashcache\n"
VERSION = 1
RACY_NS = 2_000_000_000
RECENT_NS = 4_000_000_000  # a digest noted by `note_read` serves lookups this long
RECENT_MAX = 4096  # digests noted at most (all are forgotten past that)
MAX_CACHE_FILE = 1 << 30  # a bigger file is not ours

# dev, ino, size, mtime_ns, ctime_ns, digest
_RECORD = struct.Struct("<QQQqq16s")
_KEY = struct.Struct("<QQQqq")
_KEY_SIZE = _KEY.size
_LENGTHS = struct.Struct("<IQ")  # header length, paths blob length
_CHECKSUM_SIZE = 16


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECKSUM_SIZE).digest()


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lsync, else ~/.cache/lsync."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "lsync"


def default_cache_path(root: Path, algorithm: str) -> Path:
    """The cache file for the local tree `root`: named after its absolute path and the
    hash algorithm, e.g. ~/.cache/lsync/linux-3f0c1e2d4b5a6978-xxh3-128.hashes."""
    absolute = os.fsencode(Path(root).resolve())
    tag = hashlib.sha256(absolute).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]", "_", Path(root).resolve().name)[:40] or "root"
    return default_cache_dir() / f"{label}-{tag}-{algorithm}.hashes"


def _stat_key(st: os.stat_result) -> bytes:
    return _KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashCache:
    """Digests of local files by relative path, validated by stat.

    `path` is the cache file; when None it is derived from `root` (see
    `default_cache_path`), and with neither the cache lives in memory only.
    """

    def __init__(
        self,
        algorithm: str = XXH3_128,
        path: Path | None = None,
        *,
        root: Path | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {algorithm!r}")
        new_hasher(algorithm)  # fails now if the algorithm is not available
        self.algorithm = algorithm
        self.root = str(Path(root).resolve()) if root is not None else None
        if path is None and root is not None:
            path = default_cache_path(Path(root), algorithm)
        self.path = path
        self.clock = clock
        self.load_problem: str | None = None
        self.hits = 0
        self.misses = 0
        self._records: dict[str, bytes] = {}
        self._dirty = False
        # rel -> (stat key + digest, when noted): digests of versions just read that the
        # racy-write rule keeps out of _records (`note_read`), in memory only.
        self._recent: dict[str, tuple[bytes, int]] = {}
        # (Guards changes to _records and _dirty: see the module docstring.)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of remembered digests."""
        return len(self._records)

    def __bool__(self) -> bool:
        return True  # an empty cache is still a cache: `cache or default` must keep it

    def new_hasher(self) -> Hasher:
        """A fresh hash object for this cache's algorithm."""
        hasher: Hasher = new_hasher(self.algorithm)
        return hasher

    def digest_of(self, data: bytes) -> bytes:
        hasher = self.new_hasher()
        hasher.update(data)
        return hasher.digest()

    def now_ns(self) -> int:
        return self.clock()

    def lookup(self, rel: str, st: os.stat_result) -> bytes | None:
        """The digest of `rel` if it was read when it had exactly this stat, else None."""
        key = _stat_key(st)
        record = self._records.get(rel)
        if record is None or record[:_KEY_SIZE] != key:
            noted = self._recent.get(rel)
            if noted is not None and self.clock() - noted[1] < RECENT_NS:
                record = noted[0]
        if record is not None and record[:_KEY_SIZE] == key:
            self.hits += 1
            return record[_KEY_SIZE:]
        self.misses += 1
        return None

    def note_read(self, rel: str, st: os.stat_result, digest: bytes) -> None:
        """`digest` was just read of `rel` with stat `st`: serve it to lookups of that
        stat for RECENT_NS even where `store` may not remember it (a file changed in the
        last 2 s). Only for a caller that forgets it (`forget_recent`) as soon as the
        watcher reports the path changed: then a second write within the same clock tick
        cannot be taken for the version read (lsync.client.local.localside does this; the
        convergence check after a save then does not read the file again)."""
        if len(self._recent) >= RECENT_MAX:
            self._recent.clear()
        self._recent[rel] = (_stat_key(st) + digest, self.clock())

    def forget_recent(self, paths: Iterable[str] | None = None) -> None:
        """Forget the noted digests of `paths` (None: all)."""
        if paths is None:
            self._recent.clear()
        elif self._recent:
            for rel in paths:
                self._recent.pop(rel, None)

    def store(self, rel: str, st: os.stat_result, digest: bytes, read_done_ns: int) -> bool:
        """Remember `digest` for `rel` read with stat `st` (unchanged from before to after
        reading), reading having finished at `read_done_ns`. A racily recent file is not
        remembered (any old record is dropped). Returns whether it was remembered."""
        with self._lock:
            if max(st.st_mtime_ns, st.st_ctime_ns) > read_done_ns - RACY_NS:
                if self._records.pop(rel, None) is not None:
                    self._dirty = True
                return False
            self._records[rel] = _stat_key(st) + digest
            self._dirty = True
            return True

    def discard(self, rel: str) -> None:
        with self._lock:
            if self._records.pop(rel, None) is not None:
                self._dirty = True

    def retain(self, paths: Iterable[str]) -> None:
        """Keep only the records of `paths` (the files of a full scan), re-keyed with the
        given strings so the cache shares them instead of holding copies."""
        with self._lock:
            old = self._records
            kept = {rel: record for rel in paths if (record := old.get(rel)) is not None}
            if len(kept) != len(old):
                self._dirty = True
            self._records = kept

    def load(self) -> bool:
        """Replace the records with those of the cache file. Returns False, leaving the
        cache empty and the reason in `load_problem`, when there is nothing usable."""
        self._records = {}
        self._dirty = False
        self.load_problem = None
        if self.path is None:
            self.load_problem = "no cache file"
            return False
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_CACHE_FILE:
                    self.load_problem = "cache file too large"
                    return False
                data = f.read()
        except OSError as exc:
            self.load_problem = f"cannot read {self.path}: {exc.strerror or exc}"
            return False
        try:
            self._records = self._decode(data)
        except ValueError as exc:
            self.load_problem = str(exc)
            return False
        return True

    def _decode(self, data: bytes) -> dict[str, bytes]:
        """The records in a cache file's bytes; ValueError says what is wrong."""
        fixed = len(MAGIC) + _LENGTHS.size + _CHECKSUM_SIZE
        if not data.startswith(MAGIC) or len(data) < fixed:
            raise ValueError("not an lsync hash cache")
        view = memoryview(data)
        if _checksum(view[:-_CHECKSUM_SIZE]) != data[-_CHECKSUM_SIZE:]:
            raise ValueError("corrupt cache file (checksum)")
        header_len, paths_len = _LENGTHS.unpack_from(data, len(MAGIC))
        offset = len(MAGIC) + _LENGTHS.size
        try:
            header = json.loads(bytes(view[offset : offset + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError("corrupt cache header") from exc
        problem = self._check_header(header)
        if problem:
            raise ValueError(problem)
        count = header["count"]
        offset += header_len
        paths_blob = bytes(view[offset : offset + paths_len])
        offset += paths_len
        size = _RECORD.size
        if offset + count * size != len(data) - _CHECKSUM_SIZE:
            raise ValueError("corrupt cache file (lengths)")
        paths = paths_blob.decode("utf-8", "surrogateescape").split("\0") if count else []
        if len(paths) != count:
            raise ValueError("corrupt cache file (paths)")
        records = [data[i : i + size] for i in range(offset, offset + count * size, size)]
        return dict(zip(paths, records, strict=True))

    def _check_header(self, header: Any) -> str:
        if not isinstance(header, dict):
            return "corrupt cache header"
        if header.get("version") != VERSION:
            return f"cache format version {header.get('version')!r} not supported"
        if header.get("algorithm") != self.algorithm:
            return f"cache is for algorithm {header.get('algorithm')!r}"
        if self.root is not None and header.get("root") != self.root:
            return "cache is for another local root"
        count = header.get("count")
        if type(count) is not int or count < 0:
            return "corrupt cache header"
        return ""

    def save(self, *, force: bool = False) -> None:
        """Write the cache file atomically (temporary file, fsync, rename) if anything
        changed since load or the last save."""
        with self._lock:
            if self.path is None or not (self._dirty or force):
                return
            records = dict(self._records)
            self._dirty = False  # set again by any store after this snapshot
        header = {
            "version": VERSION,
            "algorithm": self.algorithm,
            "root": self.root,
            "saved_at_ns": self.clock(),
            "count": len(records),
        }
        header_bytes = json.dumps(header).encode()
        paths_blob = "\0".join(records).encode("utf-8", "surrogateescape")
        parts = [
            MAGIC,
            _LENGTHS.pack(len(header_bytes), len(paths_blob)),
            header_bytes,
            paths_blob,
            b"".join(records.values()),
        ]
        del records  # (the parts are written one by one: no copy of the whole file)
        checksum = hashlib.blake2b(digest_size=_CHECKSUM_SIZE)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    checksum.update(part)
                    f.write(part)
                f.write(checksum.digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            with self._lock:
                self._dirty = True
            raise
