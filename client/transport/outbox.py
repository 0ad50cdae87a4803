"""What the link holds before it writes: batches of small files, their compression, lanes.

`PendingBatch` collects the small whole files of a burst for one lane's next WriteBatch;
`pack_batch` compresses a closed batch as one piece in a worker thread (`Compressing` is a
batch while that runs; the link keeps later messages of the lane behind it, so each lane's
order is the order of submission). `SideLane` is the link's record of a data lane (the extra SSH
channels of lsync.client.transport.lanes, seen through the `LaneWriter` interface). `unless` awaits
backpressure but gives up when urgent work (a save) comes. No decisions about paths here.

Several targets in one process send the same files, and each link packs its own batches:
`SharedBatches` (one per process, `SHARED_BATCHES`) lets them pack the same content once.
With more than one target, a zlib batch is packed in segments cut after files chosen by the
file's content object alone (so the targets' batches, cut elsewhere, share most segments),
each a raw deflate piece that ends on a byte boundary and takes the 32 KiB before it in the
batch as its dictionary: joined, with a zlib header, a last empty block and the batch's
Adler-32, they are one ordinary zlib stream, which any inflater reads. A segment is named by
the very content objects it and its dictionary are made of (the targets' engines share the
bytes objects of a file version read once: lsync.client.local.localside), and held with
them, so a name can only ever mean the same bytes.

The C heap those bytes come from: file contents and packed batches are big, short-lived
buffers allocated in worker threads. glibc's malloc raises its mmap threshold to the size of
every big block freed (up to 32 MiB), after which such buffers come from its arenas, one
per thread that allocates, and are kept there once freed: an initial sync of the Linux
kernel left the client 100 MB above what it held. `limit_heap_retention` (once per process)
fixes the threshold at `MMAP_ABOVE`, so a buffer that big is returned to the system when it
is freed, and allows two arenas; `trim_heap` returns what the arenas hold free (after a
burst). Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import threading
import zlib
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from lsync.protocol import packing

BATCH_BYTES = 1 << 20  # content bytes of one WriteBatch (well under MAX_CHUNK)
BATCH_FILES = 1024  # files in one WriteBatch
BATCH_DELAY = 0.002  # an open batch leaves at the latest this long after its first file
PACKING_AHEAD = 4  # batches being compressed before `drain` waits
BACKLOG = 1 << 20  # bytes buffered for a channel beyond its window: the link is the bottleneck
MMAP_ABOVE = 256 << 10  # C heap blocks this big are mapped apart, unmapped when freed
HEAP_ARENAS = 2  # glibc arenas (its default: 8 per core, each keeping what it freed)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt(3) names
SEGMENT = 32 << 10  # content bytes per shared segment of a batch, on average
SEGMENTS_HELD = 32 << 20  # content bytes of packed segments held for the other targets
SEGMENT_WAIT = 5.0  # seconds a worker waits for another target's packing of a segment
_WINDOW = 32 << 10  # deflate's window: the dictionary a segment takes from before it
_ZLIB_HEADER = b"\x78\x9c"  # deflate, 32 KiB window, no preset dictionary
_LAST_BLOCK = b"\x03\x00"  # an empty final block (fixed Huffman codes)


class PendingBatch:
    """Files submitted for the next WriteBatch of one lane."""

    def __init__(self, lane: int, code: int, level: int, timer: asyncio.TimerHandle) -> None:
        self.lane = lane
        self.code = code
        self.level = level
        self.timer = timer
        self.files: list[list[Any]] = []
        self.contents: list[bytes] = []
        self.size = 0


class Compressing:
    """A closed batch while a worker thread compresses it."""

    def __init__(self, files: list[list[Any]], packed: asyncio.Future[tuple[bytes, int]]) -> None:
        self.files = files
        self.packed = packed


class LaneWriter(Protocol):
    """The client's end of a data lane (see lsync.client.transport.lanes)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def backlog(self) -> int:
        """Bytes written and not yet sent (waiting for the channel's window)."""
        ...

    async def wait_closed(self) -> str:
        """Until the lane ends; why it ended (for the user)."""
        ...

    async def close(self) -> None: ...


class SideLane:
    def __init__(self, writer: LaneWriter) -> None:
        self.writer = writer
        self.unflushed = 0


async def unless(wait: Coroutine[Any, Any, Any], interrupt: asyncio.Event | None) -> bool:
    """Await `wait` unless `interrupt` is or gets set first; whether `wait` finished."""
    if interrupt is None:
        await wait
        return True
    if interrupt.is_set():
        wait.close()
        return False
    waiting = asyncio.ensure_future(wait)
    interrupted = asyncio.ensure_future(interrupt.wait())
    try:
        await asyncio.wait({waiting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
    return waiting.done() and not waiting.cancelled()


class _Segment:
    __slots__ = ("contents", "done", "packed", "size", "takes")

    def __init__(self, contents: tuple[bytes, ...], size: int, takes: int) -> None:
        self.contents = contents  # its dictionary's files, then its own (kept alive)
        self.size = size
        self.takes = takes  # other targets still to take it
        self.packed: bytes | None = None
        self.done = threading.Event()


class SharedBatches:
    """Packed segments of batches, for the other targets' links (see the module
    docstring); any thread. `sharers` says how many targets there are (set by their
    engines); with one, batches are packed whole, as before."""

    def __init__(self) -> None:
        self.sharers: Callable[[], int] = lambda: 1
        self.made = 0  # segments packed (a test counts them)
        self.taken = 0  # segments taken from another target's packing
        self._lock = threading.Lock()
        self._held: collections.OrderedDict[tuple[Any, ...], _Segment] = \
            collections.OrderedDict()
        self._bytes = 0

    def pack(self, contents: list[bytes], level: int) -> bytes:
        """The files' contents as one zlib stream at `level`, packed segment by segment
        (a segment another target packed is taken)."""
        out = [_ZLIB_HEADER]
        check = 1
        start = 0
        for end in _cuts(contents):
            history: list[bytes] = []  # the files the dictionary comes from
            size = 0
            for index in range(start - 1, -1, -1):
                if size >= _WINDOW:
                    break
                history.insert(0, contents[index])
                size += len(contents[index])
            out.append(self._segment(history, contents[start:end], level))
            for content in contents[start:end]:
                check = zlib.adler32(content, check)
            start = end
        out += [_LAST_BLOCK, check.to_bytes(4, "big")]
        return b"".join(out)

    def _segment(self, history: list[bytes], files: list[bytes], level: int) -> bytes:
        # (Not named by its level: a target whose link fell behind wants level 4 where one
        # keeping up wants 1; the segment the first packed serves both, CPU being what
        # several targets run short of.)
        key = (len(history), *map(id, history), *map(id, files))
        objects = (*history, *files)
        with self._lock:
            held = self._held.get(key)
            if held is not None and all(a is b for a, b in zip(held.contents, objects,
                                                                  strict=True)):
                held.takes -= 1
                if held.takes <= 0:
                    self._drop(key)
            else:
                held = None
                mine = _Segment(objects, sum(map(len, files)), self.sharers() - 1)
                self._drop(key)
                self._held[key] = mine
                self._bytes += mine.size
                while self._bytes > SEGMENTS_HELD:
                    self._drop(next(iter(self._held)))
                self.made += 1
        if held is not None and held.done.wait(SEGMENT_WAIT) and held.packed is not None:
            with self._lock:
                self.taken += 1
            return held.packed
        if held is not None:  # its packing failed or is late: pack it here, for here only
            return _deflate(history, files, level)
        try:
            mine.packed = _deflate(history, files, level)
        finally:
            mine.done.set()
        return mine.packed

    def _drop(self, key: tuple[Any, ...]) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._bytes -= held.size


SHARED_BATCHES = SharedBatches()


def _cuts(contents: list[bytes]) -> list[int]:
    """Where the segments of a batch end: after a file whose content object says so (the
    bigger the file, the likelier: SEGMENT bytes per segment on average), and at the end."""
    ends = [index + 1 for index, content in enumerate(contents)
            if (hash((id(content), SEGMENT)) & 0xFFFFFFFF) % SEGMENT < len(content)]
    if not ends or ends[-1] != len(contents):
        ends.append(len(contents))
    return ends


def _deflate(history: list[bytes], files: list[bytes], level: int) -> bytes:
    """Raw deflate of `files` ending on a byte boundary (not a last block), with the end
    of `history` as its dictionary."""
    dictionary = b"".join(history)[-_WINDOW:]
    if dictionary:
        packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS,
                                  zdict=dictionary)
    else:
        packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join([*map(packer.compress, files), packer.flush(zlib.Z_SYNC_FLUSH)])


def pack_batch(data: bytes | list[bytes], code: int, level: int,
               shared: SharedBatches | None = None) -> tuple[bytes, int]:
    """A batch's contents packed as one piece (raw at level 0, lsync.client.remote.sender's RAW,
    and when packing does not pay); any thread. Given the files' contents as a list, it
    joins them itself (in the worker thread, not on the event loop's); with `shared` and
    several targets, a zlib batch is packed in segments the targets share."""
    if (isinstance(data, list) and shared is not None and code == packing.PACK_ZLIB
            and level != 0 and not packing.fast_zlib() and shared.sharers() > 1):
        size = sum(map(len, data))
        packed = shared.pack(data, level)
        if len(packed) < size * 0.9:
            return packed, code
        return b"".join(data), packing.PACK_RAW
    if isinstance(data, list):
        data = b"".join(data)
    if code == packing.PACK_RAW or level == 0:
        return data, packing.PACK_RAW
    packed = packing.pack(data, code, level)
    if len(packed) < len(data) * 0.9:
        return packed, code
    return data, packing.PACK_RAW


def _glibc_function(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None
    return function


_heap_limited = False


def limit_heap_retention() -> bool:
    """Once per process: big buffers mapped apart (returned when freed), at most
    HEAP_ARENAS arenas, freed memory at the top of a heap returned beyond 2 * MMAP_ABOVE
    (glibc's default once the threshold is fixed). Whether glibc took the settings."""
    global _heap_limited
    if _heap_limited:
        return True
    mallopt = _glibc_function("mallopt")
    if mallopt is None or not hasattr(ctypes.CDLL(None), "malloc_trim"):
        return False
    _heap_limited = all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, MMAP_ABOVE), (_M_TRIM_THRESHOLD, 2 * MMAP_ABOVE),
        (_M_ARENA_MAX, HEAP_ARENAS)))
    return _heap_limited


def trim_heap() -> bool:
    """Return the free memory of glibc's arenas to the system (a few ms for hundreds of
    MB); whether anything was returned."""
    malloc_trim = _glibc_function("malloc_trim")
    return malloc_trim is not None and malloc_trim(0) == 1
