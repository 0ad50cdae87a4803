"""What the link holds before it writes: batches of small files, their compression, lanes.

`PendingBatch` collects the small whole files of a burst for one lane's next WriteBatch;
`pack_batch` compresses a closed batch as one piece in a worker thread (`Compressing` is a
batch while that runs; the link keeps later messages of the lane behind it, so each lane's
order is the order of submission). `SideLane` is the link's record of a data lane (the extra SSH
channels of lsync.client.transport.lanes, seen through the `LaneWriter` interface). `unless` awaits
backpressure but gives up when urgent work (a save) comes. No decisions about paths here.

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
import contextlib
import ctypes
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


def pack_batch(data: bytes | list[bytes], code: int, level: int) -> tuple[bytes, int]:
    """A batch's contents packed as one piece (raw at level 0, lsync.client.remote.sender's RAW,
    and when packing does not pay); any thread. Given the files' contents as a list, it
    joins them itself (in the worker thread, not on the event loop's)."""
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
