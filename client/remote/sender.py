"""How file content travels: packing, deltas, reading ahead, and the bases kept for deltas.

Everything here is about bytes, not about which path to sync: `Packing` chooses how a piece
of content is compressed (fast in bursts, small for single saves, with the session's
preset dictionary when there is one); `content_messages` cuts a file into `WriteFile`
chunks; `delta_message` makes a `WriteDelta` when that beats the whole file and fits in a
frame; `ReadAhead` reads, hashes and compresses queued files in worker threads (with several
targets, what one target's read-ahead reads is taken by the others' while no watcher event
came for the path since the read started: lsync.client.local.localside.AheadSlots);
`RecentBases` keeps the contents of recently sent small files (the bases of dictionary deltas).

Threads: `ReadAhead`'s workers only read files and compress; the HashCache they share has
its own lock. Everything else runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lsync.client.local.hashcache import HashCache
from lsync.client.local.localentry import LocalEntry, ScanError
from lsync.client.local.localside import AheadSlot, AheadSlots
from lsync.client.local.stableread import SiblingReader, read_file_stable
from lsync.client.remote.delta import ZDICT_MAX_NEW, Signature, make_delta_and_signature, signature
from lsync.protocol import messages as m
from lsync.protocol import packing
from lsync.protocol.framing import MAX_FRAME

CHUNK = 4 << 20  # content bytes per WriteFile chunk
MAX_DELTA = MAX_FRAME - (64 << 10)  # a delta this big travels as a whole file instead
COMPRESS_ABOVE = 256  # smaller contents travel raw
RECENT_BYTES = 32 << 20  # contents of recently sent small files: bases of zdict deltas
PREFETCH = 64  # queued files read, hashed and compressed ahead in worker threads
PREFETCH_GROUP = 16  # files per read-ahead job
PREFETCH_MAX = 8 << 20  # bigger files are read when their turn comes
PREFETCH_BYTES = 24 << 20  # content read ahead and not yet taken by its pass, at most
PREFETCH_WORKERS = 2
BATCH_FILE_MAX = 256 << 10  # whole new files of a burst up to this size travel in batches
SIGN_MIN = 64 << 10  # smaller files of a burst are not signed (their first edit goes whole)
DICTIONARY_SAMPLES = 16
DICTIONARY_SAMPLE_MAX = 256 << 10  # files sampled for the preset dictionary are this small
# Per packing: its code, its level in bursts while the link keeps up, in bursts once data
# waits for the link (bound by it, but still by the CPU too: level 4 gives 92% of level 6's
# ratio for 45% of its time on source files), and for single saves (`Packing.packer`).
_PACKERS = {packing.ZLIB: (packing.PACK_ZLIB, 1, 4, 6), packing.ZSTD: (packing.PACK_ZSTD, 3, 6, 9)}
# Level RAW: not compressed at all. zlib at its fastest (level 1) deflates source files at
# about 115 MB/s per core here: on a short link that keeps up it is the client's biggest
# cost and saves nothing. A burst over a short link therefore goes raw while the link keeps
# up and at level 1 once data waits for it (a LAN slower than zlib); over a long link, and
# for single saves, as above. Where ISA-L makes zlib's level 1 (lsync.protocol.packing:
# about 400 MB/s, a better ratio than zlib's) a burst is compressed on every link: that
# costs less than sending four times the bytes through SSH.
RAW = 0
_SHORT_LINK_BULK: dict[str, tuple[int, int]] = (
    {} if packing.fast_zlib() else {packing.ZLIB: (RAW, 1)})

Packer = tuple[int, int, bytes]  # (packing code, level, preset dictionary)
Pieces = list[tuple[bytes, int]]  # per CHUNK of content: (data, packing code)


class Packing:
    """The session's packing: the negotiated compression, the preset dictionary if any."""

    def __init__(self, compression: str, long_link: bool) -> None:
        self.code, self.bulk, self.long_bulk, self.single = _PACKERS.get(
            compression, _PACKERS[packing.ZLIB])
        self.set_long_link(long_link)
        self.dictionary = b""  # set on the agent (zlib only)
        self.dictionary_failed = False

    def set_long_link(self, long_link: bool) -> None:
        """Whether the link is long, once known better than at construction (the SSH
        handshake's time says it under no CPU load only): it decides the burst levels."""
        code = next(name for name, packer in _PACKERS.items() if packer[0] == self.code)
        _, self.bulk, self.long_bulk, _ = _PACKERS[code]
        self.long_link = long_link
        if not long_link and code in _SHORT_LINK_BULK:
            self.bulk, self.long_bulk = _SHORT_LINK_BULK[code]

    @property
    def zstd(self) -> bool:
        return self.code == packing.PACK_ZSTD

    def packer(self, burst: bool, backlogged: bool = False) -> Packer:
        """A burst (initial sync, branch switch) compresses fast (or not at all: level RAW,
        on a short link) while the link keeps up, harder once data waits for it
        (`backlogged`), on any link: the batches' rule (RemoteSide.submit_batched), for the
        big files too. A single save compresses well."""
        level = (self.long_bulk if backlogged else self.bulk) if burst else self.single
        if self.code == packing.PACK_ZLIB and self.dictionary:
            return packing.PACK_ZLIB_DICT, level, self.dictionary
        return self.code, level, b""

    def of_burst(self, packer: Packer) -> bool:
        """Whether `packer` is one of this session's burst packers as they are now (what
        a file read ahead was compressed with may still travel)."""
        now = self.packer(burst=True)
        return packer[0] == now[0] and packer[2] == now[2] \
            and packer[1] in (self.bulk, self.long_bulk)

    def drop_dictionary(self) -> None:
        self.dictionary, self.dictionary_failed = b"", True


def _pack_piece(piece: bytes, packer: Packer) -> tuple[bytes, int]:
    if len(piece) >= COMPRESS_ABOVE and packer[1] != RAW:
        packed = packing.pack(piece, *packer)
        if len(packed) < len(piece) * 0.9:
            return packed, packer[0]
    return piece, packing.PACK_RAW


def pieces_of(content: bytes, packer: Packer) -> Pieces:
    return [_pack_piece(content[offset:offset + CHUNK], packer)
            for offset in range(0, max(len(content), 1), CHUNK)]


def content_messages(seq: int, path: str, mode: int, pieces: Pieces) -> list[m.WriteFile]:
    return [m.WriteFile(seq, path, mode, index * CHUNK, data, index == len(pieces) - 1, code)
            for index, (data, code) in enumerate(pieces)]


def delta_message(seq: int, path: str, mode: int, base_digest: bytes, base: Signature,
                  content: bytes, digest: bytes, base_content: bytes | None, zstd: bool
                  ) -> tuple[m.WriteDelta | None, Signature]:
    """A WriteDelta to `content` when one is smaller than the whole file and fits in one
    frame (else None), and the new content's signature."""
    delta, new_signature = make_delta_and_signature(base, content, base_content, zstd=zstd)
    if delta is None or len(delta) > MAX_DELTA:
        return None, new_signature
    return m.WriteDelta(seq, path, mode, base_digest, digest, delta), new_signature


@dataclass(slots=True)
class Prepared:
    """A file read and hashed ahead of its turn; cut into compressed pieces unless small
    enough to travel in a batch (`pieces` None), signed unless smaller than SIGN_MIN.
    `st`: the lstat the content belongs to; `seen`: the watcher's epoch and the wall time
    (ns) before the read began, when the epoch was known (SharedReads.stat_epoch)."""

    content: bytes
    entry: LocalEntry
    packer: Packer
    pieces: Pieces | None
    signature: Signature | None
    st: os.stat_result
    seen: tuple[int, int] | None = None


def _prepare(reader: SiblingReader, path: str, packer: Packer,
             limit: int = PREFETCH_MAX, seen: tuple[int, int] | None = None
             ) -> Prepared | None:
    """Worker-thread half of sending a new file whole (compressors release the GIL)."""
    try:
        content, entry, st = reader.read_stat(path, limit=limit)
    except (OSError, ScanError):
        return None  # not a file, too big, unstable, gone: its turn will sort it out
    size = len(content)
    return Prepared(content, entry, packer,
                    pieces_of(content, packer) if size > BATCH_FILE_MAX else None,
                    signature(content) if size >= SIGN_MIN else None, st, seen)


def sign_local(root: Path, path: str, cache: HashCache, digest: bytes,
               limit: int) -> Signature | None:
    """The signature of the local file, if it still holds the content whose digest is
    `digest` (the remote's version); for worker threads."""
    try:
        content, entry = read_file_stable(root, path, cache, limit=limit)
    except (OSError, ScanError):
        return None
    return signature(content) if entry.digest == digest else None


def sample_dictionary(root: Path, files: list[str], cache: HashCache) -> bytes:
    """A preset dictionary (at most `MAX_DICTIONARY` bytes, or b"" when too little was
    found) sampled from the files about to be sent: the starts of files spread over the list,
    where many files of one tree repeat themselves (licence headers, includes, idioms)."""
    step = max(1, len(files) // DICTIONARY_SAMPLES)
    pieces: list[bytes] = []
    for path in files[::step][:DICTIONARY_SAMPLES]:
        try:
            content, _ = read_file_stable(root, path, cache, limit=DICTIONARY_SAMPLE_MAX)
        except (OSError, ScanError):
            continue
        pieces.append(content[:m.MAX_DICTIONARY // DICTIONARY_SAMPLES])
    dictionary = b"".join(pieces)[-m.MAX_DICTIONARY:]
    return dictionary if len(dictionary) >= 1024 else b""


class Ahead:
    """One file being read ahead: `done` once `result` is set (by a worker thread); `group`
    resolves when every file of its job is done (what to wait on when this one is not).
    `source`: another target's Ahead of the same file (its read is this one's), through
    `slot`, which says whether it may still be taken."""

    __slots__ = ("believed", "done", "group", "hash_name", "held", "result", "slot", "source",
                 "taken")

    def __init__(self, group: concurrent.futures.Future[None],
                 believed: bytes | None = None, source: Ahead | None = None,
                 slot: AheadSlot | None = None, hash_name: str = "") -> None:
        self.group = group
        self.hash_name = hash_name  # the hash of the digest its read makes
        self.believed = believed  # the content the remote is believed to hold
        self.done = False
        self.result: Prepared | None = None
        self.held = 0  # bytes of its content counted in the read-ahead's budget
        self.taken = False  # its pass took it (what it holds is the pass's from then on)
        self.source = source
        self.slot = slot


class ReadAhead:
    """Worker threads that prepare queued new files before their turn, a group of files
    per job: one hand-off between threads, and one future, per group, not per file."""

    def __init__(self, root: Path, cache: HashCache, slots: AheadSlots | None = None,
                 epoch: Callable[[], int | None] = lambda: None) -> None:
        self.root = root
        self.cache = cache
        self.slots = slots  # the other targets' read-aheads, and what they read
        self.epoch = epoch  # the watcher's epoch (SharedReads.stat_epoch), read by workers
        self.shared = 0  # files taken from another target's read-ahead (a test counts them)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.futures: dict[str, Ahead] = {}
        self._groups: set[concurrent.futures.Future[None]] = set()  # submitted, not done
        # Bytes of content read ahead and not taken yet (workers add, `take` subtracts):
        # a file that would take it beyond PREFETCH_BYTES is read at its turn instead (64
        # neighbours of 8 MB each, as in the kernel's amd headers, held 300 MB).
        self.held = 0
        self.lock = threading.Lock()

    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                PREFETCH_WORKERS, thread_name_prefix="lsync-read")
        return self._pool

    def start(self, paths: list[str], packer: Packer,
              believed: Mapping[str, bytes] | None = None) -> None:
        """Read `paths` ahead; a path in `believed` (the digest the remote is believed to
        hold) is not read when the hash cache says the file still has that content (its
        pass will find nothing to send)."""
        group: list[tuple[str, Ahead]] = []
        believed = believed or {}
        for path in paths:
            if len(self.futures) >= PREFETCH:
                break
            if path not in self.futures:
                slot = self.slots.take(path) if self.slots is not None else None
                if (slot is not None and isinstance(slot.item, Ahead)
                        and slot.item.hash_name == self.cache.algorithm):
                    # Another target reads (or read) it since its last event: take that.
                    source = slot.item
                    self.futures[path] = Ahead(source.group, believed.get(path), source, slot,
                                               source.hash_name)
                    continue
                if not group:
                    done: concurrent.futures.Future[None] = concurrent.futures.Future()
                ahead = self.futures[path] = Ahead(done, believed.get(path),
                                                   hash_name=self.cache.algorithm)
                if self.slots is not None:
                    ahead.slot = self.slots.put(path, ahead)  # before the read starts
                group.append((path, ahead))
                if len(group) >= PREFETCH_GROUP:
                    self._submit(group, done, packer)
                    group = []
        if group:
            self._submit(group, group[0][1].group, packer)

    def _submit(self, group: list[tuple[str, Ahead]], done: concurrent.futures.Future[None],
                packer: Packer) -> None:
        self._groups.add(done)
        done.add_done_callback(self._groups.discard)
        self.pool().submit(_prepare_group, self, group, done, packer)

    def take(self, path: str) -> Ahead | None:
        ahead = self.futures.pop(path, None)
        if ahead is not None and ahead.source is not None:
            if ahead.slot is None or ahead.slot.stale:
                return None  # an event for the path came since that read started
            self.shared += 1
            return ahead
        if ahead is not None:
            with self.lock:
                ahead.taken = True
                self.held -= ahead.held
                ahead.held = 0
        return ahead

    def left(self) -> int:
        """Bytes that may still be read ahead (any thread)."""
        with self.lock:
            return PREFETCH_BYTES - self.held

    def count(self, ahead: Ahead, size: int) -> None:
        """A worker read `size` bytes for `ahead` (not counted once its pass took it)."""
        with self.lock:
            if not ahead.taken:
                ahead.held = size
                self.held += size

    def close(self) -> None:
        self.futures.clear()
        with self.lock:
            self.held = 0
        for done in list(self._groups):
            done.cancel()  # (not started yet: the targets sharing it read for themselves)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _prepare_group(owner: ReadAhead, group: list[tuple[str, Ahead]],
                   done: concurrent.futures.Future[None], packer: Packer) -> None:
    """Prepare each file of the group. Whatever goes wrong with one file is that file's
    business alone: it is left unprepared, and its own pass reads it (and reports what
    fails then); the group, and the session, go on."""
    if not done.set_running_or_notify_cancel():
        return
    # (Before anything is opened: the stats read below are as of no later than this.)
    epoch = owner.epoch()
    seen = (epoch, time.time_ns()) if epoch is not None else None
    with SiblingReader(owner.root, owner.cache) as reader:
        for path, ahead in group:
            try:
                left = min(PREFETCH_MAX, owner.left())
                if left > 0 and (ahead.believed is None
                                 or reader.digest_known(path) != ahead.believed):
                    ahead.result = _prepare(reader, path, packer, left, seen)
                    if ahead.result is not None:
                        owner.count(ahead, _held_bytes(ahead.result))
            except Exception:
                ahead.result = None
            ahead.done = True
    done.set_result(None)


def _held_bytes(prepared: Prepared) -> int:
    """The content and its pieces (a piece is the content itself when it travels raw in
    one piece)."""
    pieces = prepared.pieces or []
    return len(prepared.content) + sum(len(data) for data, _ in pieces
                                       if data is not prepared.content)


async def prepared_of(ahead: Ahead) -> Prepared | None:
    """What was read ahead (waiting for its group when it is not done yet; None if that
    was called off: its read-ahead closed)."""
    read = ahead.source or ahead
    if not read.done:
        try:
            # (Shielded: a pass cancelled while it waits does not call off a group that
            # other targets wait for too.)
            await asyncio.shield(asyncio.wrap_future(read.group))
        except asyncio.CancelledError:
            if read.group.cancelled():
                return None
            raise
    return read.result


def still_current(prepared: Prepared | None, st: os.stat_result) -> Prepared | None:
    """What a worker read ahead, if it is still the file `st` shows."""
    if prepared is None:
        return None
    if prepared.entry.local_key != (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
        return None
    return prepared


class RecentBases:
    """Contents of recently sent small files, by path and digest (least recent dropped)."""

    def __init__(self, limit: int = RECENT_BYTES) -> None:
        self.limit = limit
        self._items: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        self._bytes = 0

    def remember(self, path: str, digest: bytes, content: bytes) -> None:
        old = self._items.pop(path, None)
        if old is not None:
            self._bytes -= len(old[1])
        if len(content) > ZDICT_MAX_NEW:
            return
        self._items[path] = (digest, content)
        self._bytes += len(content)
        while self._bytes > self.limit:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= len(dropped)

    def get(self, path: str, digest: bytes) -> bytes | None:
        found = self._items.get(path)
        if found is None or found[0] != digest:
            return None
        self._items.move_to_end(path)
        return found[1]
