"""The sync engine: turns "this path may have changed" into pipelined operations.

Paths become dirty (from the initial comparison or from the watcher); the engine takes
them in order and reconciles each: it looks at the local path now, compares it with the
`RemoteModel`, and sends whatever operations make the remote match — nothing when they
already match. A path dirtied again while still queued is reconciled once, with its newest
content. Operations flow through a bounded window (count and bytes) and are acknowledged
asynchronously; nothing on this path waits for the remote except for window space.

Safety: before any delete the engine checks that the local root still exists and is not
suddenly empty; otherwise it raises `SafetyStop` and sends nothing more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsync.client import sigstore
from lsync.client.delta import ZDICT_MAX_NEW, Signature, make_delta_and_signature, signature
from lsync.client.errors import SafetyStop
from lsync.client.hashcache import HashCache
from lsync.client.ignore import IgnoreRules
from lsync.client.link import AgentLink, Reply
from lsync.client.model import DIR, FILE, LINK, RemoteEntry, RemoteModel
from lsync.client.reporter import Reporter
from lsync.client.scanner import (
    LocalEntry,
    ScanError,
    UnstableFileError,
    read_file_stable,
    scan_tree,
)
from lsync.protocol import messages as m
from lsync.protocol import packing
from lsync.protocol.errors import AckStatus, ErrorCode
from lsync.protocol.paths import relpath_problem

CHUNK = 4 << 20
WINDOW_OPS = 16384
WINDOW_BYTES = 64 << 20  # of operations on the wire (compressed), not yet acknowledged
HASH_BATCH = 2000
UNSTABLE_RETRY = 0.05
SETTLE_SIZE = 1 << 20  # files this big are sent once they have been still for SETTLE seconds
SETTLE = 0.02
SETTLE_MAX = 1.0
# Files are read whole into memory (and sent in CHUNK pieces); bigger ones are reported.
MAX_FILE = 1 << 30
COMPRESS_ABOVE = 256  # smaller contents travel raw
BULK_QUEUE = 100  # more queued paths than this: compress for speed (see _PACKERS)
RECENT_BYTES = 32 << 20  # contents of recently sent small files: bases of zdict deltas
# Per packing: its code, its level in bursts, in bursts over a long link (bound by the SSH
# window, but still by the CPU too: level 4 gives 92% of level 6's ratio for 45% of its
# time on source files), and for single saves.
_PACKERS = {packing.ZLIB: (packing.PACK_ZLIB, 1, 4, 6), packing.ZSTD: (packing.PACK_ZSTD, 3, 6, 9)}
DICTIONARY_MIN_FILES = 64  # an initial sync of this many files sets a preset dictionary
DICTIONARY_SAMPLES = 16
DICTIONARY_SAMPLE_MAX = 256 << 10  # files sampled for it are at most this big
RENAME_MATCH = 0.5  # share of a vanished directory's files a new one must hold to be its move
PREFETCH = 16  # queued files read, hashed and compressed ahead in worker threads
PREFETCH_MAX = 8 << 20  # bigger files are read when their turn comes
PREFETCH_WORKERS = 2
PREFETCH_LOOK = 4 * PREFETCH  # queued paths examined for reading ahead, from the head
SIGN_AHEAD_MIN = 256 << 10  # verified remote files this big are signed once in sync
SIGN_AHEAD_MAX = 64 << 20  # (read whole: bigger ones wait for their first send)
REAL_PARENT_TTL = 0.05  # seconds a "this directory is no symlink" answer is reused


@dataclass(slots=True)
class Prepared:
    """A file read, hashed, cut into compressed pieces and signed ahead of its turn."""

    content: bytes
    entry: LocalEntry
    packer: Packer
    pieces: list[tuple[bytes, int]]  # per CHUNK of content: (data, packing code)
    signature: Signature


Packer = tuple[int, int, bytes]  # (packing code, level, preset dictionary)


def _pack_piece(piece: bytes, packer: Packer) -> tuple[bytes, int]:
    if len(piece) >= COMPRESS_ABOVE:
        packed = packing.pack(piece, *packer)
        if len(packed) < len(piece) * 0.9:
            return packed, packer[0]
    return piece, packing.PACK_RAW


def _pieces(content: bytes, packer: Packer) -> list[tuple[bytes, int]]:
    return [_pack_piece(content[offset:offset + CHUNK], packer)
            for offset in range(0, max(len(content), 1), CHUNK)]


def _prepare(root: Path, path: str, cache: HashCache, packer: Packer) -> Prepared | None:
    """Worker-thread half of sending a new file whole (compressors release the GIL)."""
    try:
        content, entry = read_file_stable(root, path, cache, limit=PREFETCH_MAX)
    except (OSError, ScanError):
        return None  # not a file, too big, unstable, gone: its turn will sort it out
    return Prepared(content, entry, packer, _pieces(content, packer), signature(content))


def _sign_local(root: Path, path: str, cache: HashCache, digest: bytes) -> Signature | None:
    """Worker-thread half of signing ahead: the signature of the local file, if it still
    holds the content whose digest is `digest` (the remote's version)."""
    try:
        content, entry = read_file_stable(root, path, cache, limit=SIGN_AHEAD_MAX)
    except (OSError, ScanError):
        return None
    return signature(content) if entry.digest == digest else None


@dataclass(slots=True)
class InFlight:
    path: str
    nbytes: int  # content bytes the operation syncs
    since: float  # when the path became dirty: the save, as far as we can tell
    op: str
    src: str = ""  # for copies and renames: the remote path the content came from
    wire: int = 0  # bytes it takes on the wire: what the window bounds


@dataclass
class Counters:
    files: int = 0
    bytes: int = 0
    errors: int = 0
    last_latency: float | None = None


class SyncEngine:
    def __init__(self, link: AgentLink, root: Path, rules: IgnoreRules, cache: HashCache,
                 reporter: Reporter, delete_extra: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 compression: str = packing.ZLIB, long_link: bool = False) -> None:
        self.link = link
        self.root = root
        self.rules = rules
        self.cache = cache
        self.reporter = reporter
        self.delete_extra = delete_extra
        self.clock = clock
        self.packing = _PACKERS.get(compression, _PACKERS[packing.ZLIB])
        # Over a long link a burst is bound by the SSH window (bytes per round trip) as much
        # as by the CPU: compress it harder.
        self.long_link = long_link
        self.model = RemoteModel()
        self.dirty: dict[str, float] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.in_flight_bytes = 0
        self.counters = Counters()
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._retry_handles: set[asyncio.TimerHandle] = set()
        self._recent: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        self._recent_bytes = 0
        self._initial_total = (0, 0)  # files, bytes queued by the initial comparison
        self._initial_done = (0, 0)
        self._dirty_dirs: set[str] = set()  # queued paths that are directories remotely
        self._deferred: set[str] = set()  # deletes put back once behind the rest of the queue
        self._settling: dict[str, float] = {}  # big files waiting to be still: since when
        self._settle_wait: set[str] = set()  # ... and due to be looked at again: not idle
        self._real_parents: dict[str, tuple[bool, float]] = {}
        self._prefetched: dict[str, concurrent.futures.Future[Prepared | None]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._zdict = b""  # the preset dictionary set on the agent (zlib packing only)
        self._zdict_failed = False

    # -- input ----------------------------------------------------------------------------
    def mark_dirty(self, paths: Iterable[str], since: float | None = None) -> None:
        when = self.clock() if since is None else since
        added = False
        for path in paths:
            if path not in self.dirty:
                self.dirty[path] = when
                added = True
                entry = self.model.get(path)
                if entry is not None and entry.kind == DIR:
                    self._dirty_dirs.add(path)
        if added:
            self._idle.clear()
            self._wakeup.set()
            self.reporter.queue(len(self.dirty), len(self.in_flight))

    async def wait_idle(self) -> None:
        """Return once nothing is queued and every operation sent has been answered."""
        while True:
            self._check_idle()
            if self._idle.is_set():
                return
            await self._idle.wait()

    def _check_idle(self) -> None:
        if not self.dirty and not self.in_flight and not self._settle_wait:
            self._idle.set()

    # -- initial comparison ---------------------------------------------------------------
    async def initial_sync(self, local: dict[str, LocalEntry],
                           remote_entries: list[list[Any]]) -> None:
        """Load the remote manifest and queue every path where local and remote differ."""
        for path, kind, size, _mtime, mode, digest, target, _written in remote_entries:
            # The scan already judged local paths; a path of the same kind is not ignored.
            mine = local.get(path)
            if (mine is None or _kind(mine) != kind) and self.rules.is_ignored(path, kind == DIR):
                continue
            self.model.put(path, RemoteEntry(kind, mode, digest, target, owned=False,
                                             size=size))
        if self.delete_extra and not local and len(self.model):
            raise SafetyStop(
                f"the local tree {self.root} is empty while the remote holds "
                f"{len(self.model)} entries; refusing to delete them (--delete)")
        to_send: list[str] = []
        need_hash: list[str] = []
        for path in sorted(local):
            entry = local[path]
            remote = self.model.get(path)
            if remote is None or remote.kind != _kind(entry):
                to_send.append(path)
            elif entry.kind == "dir":
                remote.owned = True
                if remote.mode != entry.mode:
                    to_send.append(path)
            elif entry.kind == "link":
                if remote.target == entry.target:
                    remote.owned = True
                else:
                    to_send.append(path)
            elif remote.size != entry.size or entry.digest is None:
                to_send.append(path)
            elif remote.digest is None:
                need_hash.append(path)
            elif remote.digest == entry.digest:
                remote.owned = True
                if remote.mode != entry.mode:
                    to_send.append(path)
            else:
                to_send.append(path)
        batches = [need_hash[i:i + HASH_BATCH] for i in range(0, len(need_hash), HASH_BATCH)]
        results = await asyncio.gather(*(self.link.hash_paths(b) for b in batches))
        for batch, digests in zip(batches, results, strict=True):
            for path, digest in zip(batch, digests, strict=True):
                remote = self.model.get(path)
                assert remote is not None
                self.model.set_digest(path, digest)
                if digest is not None and digest == local[path].digest:
                    remote.owned = True
                    if remote.mode != local[path].mode:
                        to_send.append(path)
                else:
                    to_send.append(path)
        if self.delete_extra:
            extra = [p for p in self.model.entries if p not in local]
            for path in extra:
                entry_ = self.model.get(path)
                if entry_ is not None:
                    entry_.owned = True
            to_send.extend(sorted(extra))
        files = [p for p in to_send if p in local and local[p].kind == "file"]
        if len(files) >= DICTIONARY_MIN_FILES and self.packing[0] == packing.PACK_ZLIB:
            self._set_dictionary(files)
        self._initial_total = (len(files), sum(local[p].size for p in files))
        self._initial_done = (0, 0)
        self.mark_dirty(sorted(set(to_send)))

    def _set_dictionary(self, files: list[str]) -> None:
        """Give the agent a preset dictionary sampled from the files about to be sent: the
        starts of files spread over the list (licence headers, includes, idioms)."""
        step = max(1, len(files) // DICTIONARY_SAMPLES)
        pieces: list[bytes] = []
        for path in files[::step][:DICTIONARY_SAMPLES]:
            try:
                content, _ = read_file_stable(self.root, path, self.cache,
                                              limit=DICTIONARY_SAMPLE_MAX)
            except (OSError, ScanError):
                continue
            pieces.append(content[:m.MAX_DICTIONARY // DICTIONARY_SAMPLES])
        zdict = b"".join(pieces)[-m.MAX_DICTIONARY:]
        if len(zdict) < 1024:
            return
        self._submit(m.SetDictionary(self.link.next_seq(), zdict), "", 0, self.clock(),
                     op="dictionary")
        self._zdict = zdict

    # -- signatures kept between sessions (lsync.client.sigstore) -------------------------
    def adopt_signatures(self, stored: dict[str, tuple[bytes, Signature]]) -> int:
        """Take the stored signatures of remote files that still hold the version they were
        made for; returns how many were taken."""
        taken = 0
        for path, (digest, sig) in stored.items():
            entry = self.model.get(path)
            if (entry is not None and entry.kind == FILE and entry.owned
                    and entry.signature is None and entry.digest == digest
                    and entry.size == sig.size):
                entry.signature = sig
                taken += 1
        return taken

    def signatures_to_keep(self) -> list[tuple[str, bytes, Signature]]:
        return [(path, entry.digest, entry.signature)
                for path, entry in self.model.entries.items()
                if entry.kind == FILE and entry.digest is not None
                and entry.signature is not None and entry.size >= sigstore.MIN_SIZE]

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Reconcile dirty paths for ever (until cancelled or a SafetyStop)."""
        signer = asyncio.ensure_future(self._sign_ahead())
        try:
            while True:
                if not self.dirty:
                    self._check_idle()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                path, since = next(iter(self.dirty.items()))
                await self._wait_for_window()
                if self.dirty.get(path) != since:
                    continue
                del self.dirty[path]
                if len(self.dirty) > 1:
                    self._prefetch_ahead()
                await self._reconcile(path, since)
                self.reporter.queue(len(self.dirty), len(self.in_flight))
        finally:
            signer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await signer
            for handle in self._retry_handles:
                handle.cancel()
            self._retry_handles.clear()
            self._prefetched.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    async def _sign_ahead(self) -> None:
        """Once in sync, sign the bigger remote files that lsync verified but never sent
        (it has no signature of them, and none was stored), so that their first edit is a
        delta too. One file at a time in a worker thread, only while nothing is queued."""
        await self.wait_idle()
        todo = [path for path, entry in self.model.entries.items()
                if entry.kind == FILE and entry.owned and entry.signature is None
                and entry.digest is not None
                and SIGN_AHEAD_MIN <= entry.size <= SIGN_AHEAD_MAX]
        signed = 0
        for path in todo:
            await self.wait_idle()
            entry = self.model.get(path)
            if entry is None or entry.signature is not None or entry.digest is None:
                continue
            digest = entry.digest
            result = await asyncio.wrap_future(self._workers().submit(
                _sign_local, self.root, path, self.cache, digest))
            entry = self.model.get(path)
            if (result is not None and entry is not None and entry.digest == digest
                    and entry.signature is None):
                entry.signature = result
                signed += 1
        if signed:
            self.reporter.note(f"{signed} big files signed: their first edits travel as deltas")

    def _workers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                PREFETCH_WORKERS, thread_name_prefix="lsync-read")
        return self._pool

    # -- reading ahead ----------------------------------------------------------------------
    def _prefetch_ahead(self) -> None:
        """Start reading the next queued new files in worker threads, so that reading,
        hashing and compressing overlap with sending (a burst or the initial sync)."""
        if len(self._prefetched) >= PREFETCH:
            return
        pool = self._workers()
        packer = self._packer()
        # Look only at the head of the queue: the engine takes paths from there.
        for path in itertools.islice(self.dirty, PREFETCH_LOOK):
            if path in self._prefetched:
                continue
            entry = self.model.get(path)
            if entry is not None and (entry.kind != FILE or entry.signature is not None):
                continue  # a directory or link, or a file that may travel as a delta
            self._prefetched[path] = pool.submit(_prepare, self.root, path, self.cache, packer)
            if len(self._prefetched) >= PREFETCH:
                return

    async def _take_prepared(self, future: concurrent.futures.Future[Prepared | None] | None,
                             st: os.stat_result) -> Prepared | None:
        """What a worker read ahead of time, if it is still the file `st` shows."""
        if future is None:
            return None
        prepared = await asyncio.wrap_future(future)
        if prepared is None:
            return None
        if prepared.entry.local_key != (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return None  # changed since: read it again
        return prepared

    def _packer(self) -> Packer:
        # A burst (initial sync, branch switch) compresses fast; a single save compresses well.
        code, bulk, long_bulk, single = self.packing
        burst = long_bulk if self.long_link else bulk
        level = burst if len(self.dirty) > BULK_QUEUE else single
        if code == packing.PACK_ZLIB and self._zdict:
            return packing.PACK_ZLIB_DICT, level, self._zdict
        return code, level, b""

    async def _wait_for_window(self) -> None:
        while len(self.in_flight) >= WINDOW_OPS or self.in_flight_bytes >= WINDOW_BYTES:
            self._space.clear()
            await self._space.wait()

    def _retry_later(self, path: str, since: float, delay: float = UNSTABLE_RETRY) -> None:
        def again() -> None:
            self._retry_handles.discard(handle)
            self.mark_dirty([path], since)

        handle = asyncio.get_running_loop().call_later(delay, again)
        self._retry_handles.add(handle)

    # -- reconciling one path -------------------------------------------------------------
    async def _reconcile(self, path: str, since: float) -> None:
        ahead = self._prefetched.pop(path, None)
        self._settle_wait.discard(path)
        if path == "":
            self._check_root()
            await self._reconcile_dir_listing("", since)
            return
        if relpath_problem(path):
            return
        absolute = self.root / path
        try:
            st = os.lstat(absolute) if self._parent_is_real(path) else None
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self.reporter.failed(path, f"cannot read: {exc.strerror}")
            return
        remote = self.model.get(path)
        if st is not None and self.rules.is_ignored(path, stat.S_ISDIR(st.st_mode)):
            if remote is not None:
                self.model.drop_tree(path)  # ignored now: leave the remote copy alone
            return
        if st is None:
            if remote is not None and self.dirty and path not in self._deferred:
                # Gone locally: delete it after the paths queued behind it, one of which may
                # be where it moved (a file moved into a new directory is listed after it),
                # so that its content can still be copied there remotely.
                self._deferred.add(path)
                self.dirty[path] = since
                return
            self._deferred.discard(path)
            self._settling.pop(path, None)
            self.rules.forget(path)
            if remote is not None:
                await self._remove(path, since)
            return
        self._deferred.discard(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            await self._reconcile_dir(path, remote, mode, since)
        elif stat.S_ISLNK(st.st_mode):
            await self._reconcile_link(path, remote, since)
        elif stat.S_ISREG(st.st_mode):
            await self._reconcile_file(path, remote, st, since, ahead)

    def _parent_is_real(self, path: str) -> bool:
        """False when a directory above `path` is now a symlink: the path is gone for us.

        An answer is reused for REAL_PARENT_TTL (the files of one directory come in a row);
        reading a file goes through no symlink anyway (see read_file_stable)."""
        parent = path.rpartition("/")[0]
        if not parent:
            return True
        now = self.clock()
        known = self._real_parents.get(parent)
        if known is not None and now - known[1] < REAL_PARENT_TTL:
            return known[0]
        real = os.path.realpath(self.root / parent) == str(self.root / parent)
        if len(self._real_parents) > 4096:
            self._real_parents.clear()
        self._real_parents[parent] = (real, now)
        return real

    async def _reconcile_dir(self, path: str, remote: RemoteEntry | None, mode: int,
                             since: float) -> None:
        if remote is not None and remote.kind != DIR:
            await self._remove(path, since)
            remote = None
        if remote is None:
            moved_from = self._vanished_twin(path)
            if moved_from is not None:
                # A directory moved (seen as delete + add): rename it remotely, then let the
                # listing below fix whatever differs inside.
                self._submit(m.Rename(self.link.next_seq(), moved_from, path), path, 0, since,
                             op="rename", src=moved_from)
                self.model.move_tree(moved_from, path)
                self.dirty.pop(moved_from, None)
                remote = self.model.get(path)
                self.mark_dirty(sorted(self.model.child_names(path)), since)
        if remote is None or remote.mode != mode or not remote.owned:
            self._submit(m.Mkdir(self.link.next_seq(), path, mode), path, 0, since)
            self.model.put(path, RemoteEntry(DIR, mode, owned=True))
        await self._reconcile_dir_listing(path, since)

    def _vanished_twin(self, path: str) -> str | None:
        """A queued directory that is gone locally and whose files `path` now holds."""
        # (set.intersection_update(dict) would walk the whole queue: keep this O(dirs).)
        self._dirty_dirs = {p for p in self._dirty_dirs if p in self.dirty}
        candidates = [p for p in self._dirty_dirs if p != path and not p.startswith(path + "/")
                      and (e := self.model.get(p)) is not None and e.kind == DIR and e.owned
                      and not os.path.lexists(self.root / p)]
        if not candidates:
            return None
        try:
            local = scan_tree(self.root, self.rules, self.cache, subdir=path,
                              on_error=lambda rel, exc: None)
        except OSError:
            return None
        prefix = len(path) + 1
        here = {rel[prefix:]: e.digest for rel, e in local.items() if e.kind == "file"}
        if not here:
            return None
        for candidate in candidates:
            files = [p for p in self.model.descendants(candidate)
                     if (e := self.model.get(p)) is not None and e.kind == FILE]
            if not files:
                continue
            cut = len(candidate) + 1
            same = sum(1 for p in files
                       if (e := self.model.get(p)) is not None
                       and here.get(p[cut:]) == e.digest and e.digest is not None)
            if same >= RENAME_MATCH * max(len(files), len(here)):
                return candidate
        return None

    async def _reconcile_dir_listing(self, path: str, since: float) -> None:
        """Queue children that exist on one side only (moved-in or vanished subtrees)."""
        local_children: set[str] = set()
        try:
            with os.scandir(self.root / path if path else self.root) as listing:
                for item in listing:
                    child = f"{path}/{item.name}" if path else item.name
                    if relpath_problem(child):
                        continue
                    if self.rules.is_ignored(child, item.is_dir(follow_symlinks=False)):
                        continue
                    local_children.add(child)
        except OSError:
            return
        self.mark_dirty(sorted(local_children ^ self.model.child_names(path)), since)

    async def _reconcile_link(self, path: str, remote: RemoteEntry | None,
                              since: float) -> None:
        try:
            target = os.readlink(self.root / path)
        except OSError:
            self.mark_dirty([path], since)
            return
        if remote is not None and remote.kind == LINK and remote.target == target:
            remote.owned = True
            return
        if remote is not None and remote.kind == DIR:
            await self._remove(path, since)
        self._submit(m.Symlink(self.link.next_seq(), path, target), path, 0, since)
        self.model.put(path, RemoteEntry(LINK, 0, target=target, owned=True))

    async def _reconcile_file(self, path: str, remote: RemoteEntry | None,
                              st: os.stat_result, since: float,
                              ahead: concurrent.futures.Future[Prepared | None] | None = None
                              ) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if remote is not None and remote.kind == FILE and remote.mode == mode and remote.owned:
            # The hash cache trusts a stat only for files older than the clock's granularity,
            # so a same-size rewrite within one timestamp tick is always read again.
            known = self.cache.lookup(path, st)
            if known is not None and known == remote.digest:
                return
        old_size = remote.size if remote is not None and remote.kind == FILE else 0
        if max(st.st_size, old_size) >= SETTLE_SIZE:
            # A big file written in place may be caught between the truncate and the last
            # write, in a state that is consistent but not the one being saved: wait until
            # it has not been modified for SETTLE (small files, most saves, never wait), but
            # never more than SETTLE_MAX in all (a file written all the time still goes).
            quiet = (time.time_ns() - st.st_mtime_ns) / 1e9
            waiting = self._settling.setdefault(path, self.clock())
            if 0 <= quiet < SETTLE and self.clock() - waiting < SETTLE_MAX:
                self._settle_wait.add(path)
                self._idle.clear()
                self._retry_later(path, since, SETTLE - quiet)
                return
        self._settling.pop(path, None)
        prepared = await self._take_prepared(ahead, st)
        if prepared is not None:
            content, entry = prepared.content, prepared.entry
        else:
            try:
                content, entry = read_file_stable(self.root, path, self.cache, limit=MAX_FILE)
            except UnstableFileError:
                self._retry_later(path, since)
                return
            except FileNotFoundError:
                self._retry_later(path, since)  # gone or replaced meanwhile: look again
                return
            except (OSError, ScanError) as exc:
                self.reporter.failed(path, f"cannot read: {exc}")
                return
        digest = entry.digest
        assert digest is not None  # read_file_stable hashes what it read
        mode = entry.mode
        if remote is not None and remote.kind == FILE and remote.digest == digest:
            if remote.mode != mode:
                self._submit(m.SetMode(self.link.next_seq(), path, mode), path, 0, since)
                remote.mode = mode
            remote.owned = True
            return
        if remote is not None and remote.kind == DIR:
            await self._remove(path, since)
            remote = None
        holder = self.model.holder_of(digest)
        if holder is not None and holder != path:
            # The remote already has this content (a copy, or a move seen as add + delete
            # whose delete is still queued behind this): copy it there, send no content.
            source = self.model.get(holder)
            self._submit(m.Copy(self.link.next_seq(), holder, path, mode, digest), path, 0,
                         since, op="copy", src=holder)
            self.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content),
                                             signature=source.signature if source else None))
            return
        new_signature = await self._send_file(path, content, mode, digest, remote, since,
                                              prepared)
        self.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content),
                                         signature=new_signature))
        if len(self.dirty) <= BULK_QUEUE:
            # A file saved on its own is likely to be saved again soon: keep it as the base
            # of the next delta. Files of a burst are not (and would only evict those).
            self._remember_content(path, digest, content)

    def _remember_content(self, path: str, digest: bytes, content: bytes) -> None:
        old = self._recent.pop(path, None)
        if old is not None:
            self._recent_bytes -= len(old[1])
        if len(content) > ZDICT_MAX_NEW:
            return
        self._recent[path] = (digest, content)
        self._recent_bytes += len(content)
        while self._recent_bytes > RECENT_BYTES:
            _, (_, dropped) = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped)

    def _recent_content(self, path: str, digest: bytes) -> bytes | None:
        found = self._recent.get(path)
        if found is None or found[0] != digest:
            return None
        self._recent.move_to_end(path)
        return found[1]

    async def _send_file(self, path: str, content: bytes, mode: int, digest: bytes,
                         remote: RemoteEntry | None, since: float,
                         prepared: Prepared | None = None) -> Signature:
        """Send the new content as a delta against the remote version when that is smaller,
        else whole (in CHUNK pieces, compressed when that helps); returns the new
        version's signature."""
        seq = self.link.next_seq()
        if (remote is not None and remote.kind == FILE and remote.digest is not None
                and remote.signature is not None):
            base = self._recent_content(path, remote.digest)
            delta, new_signature = make_delta_and_signature(
                remote.signature, content, base, zstd=self.packing[0] == packing.PACK_ZSTD)
            if delta is not None:
                self._submit(m.WriteDelta(seq, path, mode, remote.digest, digest, delta), path,
                             len(content), since, op="write", wire=len(delta))
                await self.link.drain()
                return new_signature
        elif prepared is not None:
            new_signature = prepared.signature
        else:
            new_signature = signature(content)
        packer = self._packer()
        if prepared is not None and prepared.packer == packer:
            pieces = prepared.pieces
        elif len(content) > CHUNK:
            pieces = await asyncio.to_thread(_pieces, content, packer)
        else:
            pieces = _pieces(content, packer)
        for index, (data, code) in enumerate(pieces):
            offset = index * CHUNK
            final = index == len(pieces) - 1
            message = m.WriteFile(seq, path, mode, offset, data, final, code)
            if index == 0:
                self._submit(message, path, len(content), since, op="write",
                             wire=sum(len(data) for data, _ in pieces))
            else:
                self.link.send(message)
            await self.link.drain()
        return new_signature

    async def _remove(self, path: str, since: float) -> None:
        """Delete what lsync owns at and below `path`; the rest stays."""
        self._check_root()
        for below in list(self.model.descendants(path)):
            self._remove_one(below, since)
        self._remove_one(path, since)

    def _remove_one(self, path: str, since: float) -> None:
        entry = self.model.get(path)
        if entry is None:
            return
        if entry.owned or self.delete_extra:
            self._submit(m.Delete(self.link.next_seq(), path), path, 0, since, op="delete")
        self.model.drop(path)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise SafetyStop(f"the local tree {self.root} has disappeared; stopped without "
                             "deleting anything on the remote")
        try:
            with os.scandir(self.root) as listing:
                empty = next(iter(listing), None) is None
        except OSError as exc:
            raise SafetyStop(f"the local tree {self.root} cannot be read ({exc.strerror}); "
                             "stopped without deleting anything on the remote") from None
        if empty and self.model.owned_count():
            raise SafetyStop(f"the local tree {self.root} is suddenly empty (an unmounted "
                             "disk?); stopped without deleting anything on the remote")

    # -- acknowledgements -----------------------------------------------------------------
    def _submit(self, message: m.Message, path: str, nbytes: int, since: float,
                op: str = "", src: str = "", wire: int = 0) -> None:
        seq: int = message.seq  # type: ignore[union-attr]
        self.in_flight[seq] = InFlight(path, nbytes, since, op or type(message).__name__, src,
                                       wire)
        self.in_flight_bytes += wire
        self._idle.clear()
        future = self.link.submit(message)
        future.add_done_callback(lambda done: self._on_reply(seq, done))

    def _on_reply(self, seq: int, future: asyncio.Future[Reply]) -> None:
        flight = self.in_flight.pop(seq)
        self.in_flight_bytes -= flight.wire
        self._space.set()
        if future.cancelled() or future.exception() is not None:
            return  # the link broke; the session reports it and resyncs on reconnect
        reply = future.result()
        if isinstance(reply, m.Ack):
            self._on_ack(reply, flight)
        else:
            self._on_error(reply, flight)
        self.reporter.queue(len(self.dirty), len(self.in_flight))
        self._check_idle()

    def _on_ack(self, ack: m.Ack, flight: InFlight) -> None:
        if flight.op == "dictionary":
            return
        latency = self.clock() - flight.since
        if flight.op == "write":
            self.counters.files += 1
            self.counters.bytes += flight.nbytes
            self.counters.last_latency = latency
            files, nbytes = self._initial_done
            total_files, total_bytes = self._initial_total
            if files < total_files:
                self._initial_done = (files + 1, nbytes + flight.nbytes)
                self.reporter.progress(nbytes + flight.nbytes, total_bytes, files + 1,
                                       total_files)
        if ack.status == AckStatus.KEPT_NOT_EMPTY:
            self.reporter.note(ack.detail)
        self.reporter.acked(flight.path, latency, flight.nbytes)

    def _on_error(self, error: m.Error, flight: InFlight) -> None:
        if flight.op == "dictionary":
            # Chunks packed with it are refused: send those again without it.
            self._zdict, self._zdict_failed = b"", True
            return
        if self._zdict_failed and flight.op == "write" and error.code == ErrorCode.BAD_DELTA:
            self.mark_dirty([flight.path])
            return
        self.counters.errors += 1
        self.reporter.failed(flight.path, error.message)
        if flight.op == "rename":
            # The directory did not move remotely: what the model moved is unknown there.
            below = [*self.model.descendants(flight.path), flight.path]
            for path in below:
                self.model.set_digest(path, None)
            self.reporter.note(f"{flight.src} stays on the remote (the rename failed); "
                               f"{flight.path} is sent whole")
            self.mark_dirty(sorted(below))
            return
        # The remote state of this path is unknown now: the next change sends it whole.
        self.model.set_digest(flight.path, None)
        if flight.op == "copy":
            # Its source was not what we thought (changed, or gone: NOT_FOUND): look at both
            # again; with the source's digest forgotten, the retry sends the content.
            self.model.set_digest(flight.src, None)
            self.mark_dirty([flight.src, flight.path])
        elif error.code in (ErrorCode.BASE_MISMATCH, ErrorCode.DIGEST_MISMATCH):
            self.mark_dirty([flight.path])


def _kind(entry: LocalEntry) -> str:
    return {"file": FILE, "dir": DIR, "link": LINK}[entry.kind]
