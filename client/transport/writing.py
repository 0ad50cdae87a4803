"""What the link writes, in order, on the main channel and on each data lane: `LinkWriter`.

Promises:
- Each channel carries its messages in the order they were sent or submitted. Small files
  wait in their lane's open batch (lsync.client.transport.outbox); a closed batch is
  compressed in a worker thread, and whatever is sent on the lane after it waits behind it
  in the lane's outbox until it is written. A message sent on a lane first lets that lane's
  open batch leave, so files submitted before it go before it.
- Messages sent in one turn of the event loop leave together (up to COALESCE bytes): a burst
  of small files does not cost a packet and a system call each, and nothing waits for it.
- `drain` is the backpressure: it waits while a channel holds more than DRAIN_ABOVE unsent
  bytes or more than PACKING_AHEAD batches are being compressed for it, and returns early
  when the caller's urgent work comes.
- A write that fails (the channel closed under us) breaks the link: `on_broken` hears it,
  and the write raises the link's failure. A bug while sending a batch goes to `on_bug`.
  Once the link ended (`end`), nothing more is written and open batches are dropped.
- The bytes written per channel are counted (`channel_readings`, for the liveness check).

No replies are matched here and nothing is read: lsync.client.transport.link does that,
and owns the writer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable

from lsync.client.errors import LinkBroken
from lsync.client.transport.liveness import ChannelReading
from lsync.client.transport.outbox import (
    BACKLOG,
    BATCH_BYTES,
    BATCH_DELAY,
    BATCH_FILES,
    PACKING_AHEAD,
    SHARED_BATCHES,
    Compressing,
    LaneWriter,
    PendingBatch,
    SideLane,
    pack_batch,
    unless,
)
from lsync.client.transport.streams import AgentStream
from lsync.protocol import messages as m
from lsync.protocol.connection import Connection, Lane

DRAIN_ABOVE = 1 << 20  # ask the stream for backpressure after this much was written
COALESCE = 64 << 10  # queued messages are written at once beyond this many bytes


class LinkWriter:
    def __init__(self, stream: AgentStream, conn: Connection,
                 on_broken: Callable[[LinkBroken], None],
                 on_bug: Callable[[str, Exception], None]) -> None:
        self.stream = stream
        self.conn = conn  # the link's sans-IO connection: it encodes the main channel
        self._on_broken = on_broken  # the link ends with this failure (sets `failure`)
        self._on_bug = on_bug  # (what was done, the exception): a bug ends the link
        self.failure: LinkBroken | None = None  # the link's, from `end`
        self.closing = False  # a Goodbye was sent: nothing more may follow it
        self.bytes_sent = 0
        self._written = {0: 0}  # per channel (0: main, then the lanes): bytes written to it
        self._unflushed = 0
        self._out = bytearray()  # messages of this turn of the event loop, not yet written
        self._flush_scheduled = False
        self._batches: dict[int, PendingBatch] = {}  # lane -> files waiting for its next batch
        # Per lane, sent in this order once each batch is compressed: batches, messages.
        self._outboxes: dict[int, collections.deque[Compressing | m.Message]] = {
            0: collections.deque()}
        self._outbox_moved = asyncio.Event()
        self._lanes: dict[int, SideLane] = {}  # data lanes, numbered from 1

    def end(self, failure: LinkBroken | None) -> None:
        """The link ended (with the link's `failure`, if any): open batches and everything
        waiting in an outbox are dropped, and `drain` stops waiting."""
        self.failure = failure
        for batch in self._batches.values():
            batch.timer.cancel()
        self._batches.clear()
        for outbox in self._outboxes.values():
            outbox.clear()
        self._outbox_moved.set()

    def write(self, data: bytes) -> None:
        """Write bytes to the main channel now."""
        if data:
            try:
                self.stream.write(data)
            except OSError as exc:  # the channel closed under us: the link is broken
                self._on_broken(LinkBroken(f"connection to the agent lost: {exc}"))
                assert self.failure is not None
                raise self.failure from None
            self.bytes_sent += len(data)
            self._written[0] += len(data)
            self._unflushed += len(data)

    def send(self, message: m.Message) -> None:
        """Queue a message; messages sent in one turn of the event loop leave together (up to
        COALESCE bytes), so a burst of small files does not cost a packet and a system call
        each. Nothing waits: the flush runs as soon as the current callback returns."""
        if self.failure is not None:
            raise self.failure
        if self.closing and not isinstance(message, m.Goodbye):
            # Said goodbye already (a clean stop): late work is refused like a closed link.
            raise LinkBroken("the connection to the agent is closing")
        self.close_batch(0)  # files submitted before this message go before it
        if self._outboxes[0]:
            self._outboxes[0].append(message)  # behind a batch still being compressed
            return
        self.conn.send(message)
        self._out += self.conn.data_to_send()
        if len(self._out) >= COALESCE:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        with contextlib.suppress(LinkBroken):  # reported through `failure` and `closed`
            self.flush()

    def flush(self) -> None:
        if self.failure is not None:
            self._out.clear()
            raise self.failure
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            self.write(data)

    async def drain(self, lane: int = 0, interrupt: asyncio.Event | None = None) -> None:
        """Backpressure: wait while the stream (of `lane`) holds a lot of unsent data, or too
        many batches are being compressed for it; return early once `interrupt` is set
        (urgent work for the caller: bulk data may then run a little over its bound)."""
        self.flush()
        while len(self._outboxes[lane]) > PACKING_AHEAD and self.failure is None:
            self._outbox_moved.clear()
            if not await unless(self._outbox_moved.wait(), interrupt):
                return
        if self.failure is not None:
            raise self.failure
        if lane:
            side = self._lanes[lane]
            if side.unflushed >= DRAIN_ABOVE:
                side.unflushed = 0
                await unless(side.writer.drain(), interrupt)
            return
        if self._unflushed >= DRAIN_ABOVE:
            self._unflushed = 0
            await unless(self.stream.drain(), interrupt)

    def batch(self, seq: int, path: str, mode: int, content: bytes, code: int,
              level: int, lane: int = 0, digest: bytes | None = None) -> None:
        """Add a small whole file (and its digest, when given) to the next WriteBatch of
        `lane` (of the main channel when there is no such lane), packed with `code` at
        `level` together with the files added around it. The batch leaves when it is full,
        when another message is sent on its lane, on `close_batch`, or BATCH_DELAY after its
        first file."""
        if self.failure is not None:
            raise self.failure
        if self.closing:
            raise LinkBroken("the connection to the agent is closing")
        if lane and lane not in self._lanes:
            lane = 0
        batch = self._batches.get(lane)
        if batch is not None and batch.code != code:
            self.close_batch(lane)
            batch = None
        if batch is None:
            timer = asyncio.get_running_loop().call_later(BATCH_DELAY, self._timed_close)
            batch = self._batches[lane] = PendingBatch(lane, code, level, timer)
        batch.files.append([seq, path, mode, len(content)] if digest is None
                           else [seq, path, mode, len(content), digest])
        batch.contents.append(content)
        batch.size += len(content)
        if batch.size >= BATCH_BYTES or len(batch.files) >= BATCH_FILES:
            self.close_batch(lane)

    def _timed_close(self) -> None:
        with contextlib.suppress(LinkBroken):  # reported through `failure` and `closed`
            self.close_batch()

    def close_batch(self, lane: int | None = None) -> None:
        """Let the open batch of `lane` (of every lane: None) leave: compressed in a worker
        thread, then sent in order on its lane."""
        for index in [lane] if lane is not None else list(self._batches):
            batch = self._batches.pop(index, None)
            if batch is None:
                continue
            batch.timer.cancel()
            loop = asyncio.get_running_loop()
            packed = loop.run_in_executor(None, pack_batch, batch.contents,
                                          batch.code, batch.level, SHARED_BATCHES)
            self._outboxes[index].append(Compressing(batch.files, packed))
            packed.add_done_callback(functools.partial(self._pumped, index))

    def _pumped(self, lane: int, _: asyncio.Future[tuple[bytes, int]]) -> None:
        self._pump(lane)

    def _pump(self, lane: int) -> None:
        """Send what the lane's outbox holds, in order, up to the first batch still being
        compressed."""
        outbox = self._outboxes[lane]
        try:
            while outbox and self.failure is None:
                head = outbox[0]
                if isinstance(head, Compressing):
                    if not head.packed.done():
                        break
                    data, code = head.packed.result()
                    message: m.Message = m.WriteBatch(head.files, data, code)
                else:
                    message = head
                outbox.popleft()
                if lane:
                    self._write_lane(lane, Lane.encode(message))
                else:
                    self.conn.send(message)
                    self._out += self.conn.data_to_send()
            self.flush()
        except LinkBroken:
            pass  # reported through `failure` and `closed`
        except Exception as exc:  # a bug (compressing, encoding): ends the session visibly
            self._on_bug("sending a batch", exc)
        finally:
            if self.failure is not None:
                outbox.clear()
            self._outbox_moved.set()

    # -- data lanes -------------------------------------------------------------------------
    def add_lane(self, writer: LaneWriter) -> int:
        """Write to a data lane from now on (its magic already written); its number."""
        number = len(self._lanes) + 1
        self._lanes[number] = SideLane(writer)
        self._outboxes[number] = collections.deque()
        return number

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def backlogged(self, lane: int) -> bool:
        """Whether data for `lane` waits for the link (the link, not the CPU, is the
        bottleneck there: worth compressing harder)."""
        if len(self._outboxes[lane]) > 1:
            return True
        if lane:
            return self._lanes[lane].writer.backlog() >= BACKLOG
        return self.stream.backlog() >= BACKLOG

    def channel_readings(self) -> list[ChannelReading]:
        """Per channel (the main one, then the data lanes in order): bytes written to it,
        and how many of them still wait in its write buffer."""
        readings = [(self._written[0], self.stream.backlog())]
        for number, side in self._lanes.items():
            readings.append((self._written.get(number, 0), side.writer.backlog()))
        return readings

    async def close_lanes(self, wait: float) -> None:
        """Close every data lane together, waiting at most `wait` seconds for their ends."""
        if self._lanes:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(side.writer.close() for side in self._lanes.values())), wait)

    def send_on(self, message: m.Message, lane: int) -> None:
        """Send a message on `lane` (0: the main channel, as `send`)."""
        if lane:
            self._send_on_lane(message, lane)
        else:
            self.send(message)

    def _send_on_lane(self, message: m.Message, lane: int) -> None:
        if self.failure is not None:
            raise self.failure
        if self.closing:
            raise LinkBroken("the connection to the agent is closing")
        self.close_batch(lane)
        if self._outboxes[lane]:
            self._outboxes[lane].append(message)
        else:
            self._write_lane(lane, Lane.encode(message))

    def _write_lane(self, lane: int, data: bytes) -> None:
        side = self._lanes[lane]
        try:
            side.writer.write(data)
        except OSError as exc:
            self._on_broken(LinkBroken(f"data lane {lane} lost: {exc}"))
            assert self.failure is not None
            raise self.failure from None
        self.bytes_sent += len(data)
        self._written[lane] = self._written.get(lane, 0) + len(data)
        side.unflushed += len(data)
