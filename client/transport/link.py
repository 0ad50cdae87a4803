"""The asyncio side of the protocol: one `AgentLink` per agent, over an `AgentStream`.

It owns the sans-IO `Connection`, one reader task, and the `LinkWriter` that writes the
main channel and the data lanes in order (lsync.client.transport.writing: coalescing,
batches, backpressure); the link matches what comes back. Operations are submitted with
`submit`, which returns a future resolved by the matching `Ack` or `Error`; requests
(`list_tree`, `hash_paths`, `ping`) are awaited the same way. When the stream ends or a
protocol error arrives, every pending future fails at once with `LinkBroken`, so nothing
waits forever (the engine's window knows which operations were left unanswered). The link
moves bytes and matches replies; it makes no sync decisions. `watch_liveness` breaks it when
the agent shows no progress (lsync.client.transport.liveness decides): never while a transfer moves,
however long it takes. `on_kept` hears of the remote edits the agent kept aside (`m.Kept`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lsync.client.errors import ConnectError, InternalError, LinkBroken, internal_error
from lsync.client.transport.liveness import Liveness, Verdict
from lsync.client.transport.outbox import LaneWriter, limit_heap_retention, trim_heap
from lsync.client.transport.pullroutes import PullRoutes
from lsync.client.transport.streams import AgentStream
from lsync.client.transport.writing import LinkWriter
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from lsync.protocol.connection import CLIENT, Connection
from lsync.protocol.errors import AckStatus, ErrorCode, ProtocolError
from lsync.protocol.paths import relpath_problem

Reply = m.Ack | m.Error


MAX_MANIFEST_ENTRIES = 4_000_000  # a remote tree bigger than this is refused (memory)


def _stall_bound(default: float = 15.0) -> float:
    """The stall bound: `default`, or LSYNC_STALL_SECONDS when set to a positive number (the
    end-to-end tests shorten it; read here only)."""
    try:
        value = float(os.environ.get("LSYNC_STALL_SECONDS", ""))
    except ValueError:
        return default
    return value if 0 < value < 3600 else default


STALL = _stall_bound()  # seconds without progress, with something awaited: a stuck link
PING_EVERY = STALL / 3  # seconds without progress before the agent is pinged
TRIM_AFTER = 64 << 20  # bytes sent, everything answered: the C heap is trimmed (a burst ended)
class AgentLink:
    def __init__(self, stream: AgentStream) -> None:
        self.stream = stream
        self.conn = Connection(CLIENT)
        limit_heap_retention()  # (once per process: big buffers go back when freed)
        self._trim_at = TRIM_AFTER  # bytes_sent beyond which an idle link trims the heap
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._kinds: dict[int, tuple[type[Any], ...]] = {}  # the replies each seq may get
        self._manifests: dict[int, asyncio.Queue[m.ManifestBatch | None]] = {}
        # pull answers, main stream and lanes (lsync.client.buildloop.pull)
        self.pulls = PullRoutes()
        self._welcome: asyncio.Future[m.Welcome] = asyncio.get_running_loop().create_future()
        self.conn_offer: dict[str, list[str]] = {}  # the capabilities the Hello offered
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        # What is written, main channel and lanes (lsync.client.transport.writing)
        self.writer = LinkWriter(stream, self.conn, self._finish, self._bug)
        self._lane_watchers: list[asyncio.Task[None]] = []
        # The data lanes being opened (lsync.client.transport.lanes.open_lanes), if any.
        self.lanes_opening: asyncio.Future[int] | None = None
        self.failure: LinkBroken | None = None
        self.internal: InternalError | None = None  # a bug ended the link (never retried)
        self.goodbye: m.Goodbye | None = None
        self.bytes_received = 0
        self.manifest_entries = 0
        # Told of remote edits the agent kept aside: (entries, listing), see `m.Kept`.
        self.on_kept: Callable[[list[list[Any]], bool], None] | None = None

    # -- life cycle -----------------------------------------------------------------------
    def start(self, hello: m.Hello) -> None:
        """Send the Hello (operations may follow at once); the reader starts listening."""
        self.conn_offer = hello.capabilities
        self.conn.send(hello)
        self.writer.write(self.conn.data_to_send())
        self._reader = asyncio.ensure_future(self._read_loop())

    async def welcome(self, timeout: float) -> m.Welcome:
        try:
            return await asyncio.wait_for(asyncio.shield(self._welcome), timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"the agent did not answer within {timeout:.0f} s") from None

    async def close(self, reason: str = "done", at_once: bool = False) -> None:
        """Say goodbye, wait briefly for the agent's, and release the stream. An agent
        that never welcomed us gets no goodbye and no wait (it may never answer); `at_once`
        (the user would not wait): no goodbye, the shortest wait."""
        welcomed = (self._welcome.done() and not self._welcome.cancelled()
                    and self._welcome.exception() is None)
        if (self.failure is None and self.goodbye is None and not self.closing and welcomed
                and not at_once):
            try:
                self.send(m.Goodbye(0, reason))
                self.writer.closing = True
                await asyncio.wait_for(asyncio.shield(self._closed), 5)
            except (asyncio.TimeoutError, LinkBroken, ProtocolError):
                pass
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkBroken):
                await self._reader
        # A broken link may be a frozen one: do not wait for a clean end that cannot come
        # (the lanes are closed together, each waiting for its channel's end, so a frozen
        # link costs one short wait, not one per lane).
        wait = 0.5 if self.failure is not None or not welcomed or at_once else 10.0
        await self.stream.close(wait=wait)
        for watcher in self._lane_watchers:
            watcher.cancel()
        for watcher in self._lane_watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.writer.close_lanes(wait)

    async def watch_liveness(self, every: float = PING_EVERY, stall: float = STALL,
                             tick: float = 1.0) -> None:
        """Until the link ends: look every `tick` seconds whether the agent shows progress
        (bytes from it, or bytes of ours that it took off a channel's write buffer; see
        lsync.client.transport.liveness), ping it when nothing moved for `every` seconds, and break
        the link when something is awaited and nothing moved for `stall` seconds (a frozen
        link, a stopped agent). A long transfer that moves is never cut."""
        loop = asyncio.get_running_loop()
        liveness = Liveness(loop.time(), every, stall, max_gap=2 * tick)
        while (self.failure is None and self.goodbye is None and not self.closing
               and not self._closed.done()):
            channels = self.writer.channel_readings()
            awaiting = bool(self._pending or self._manifests or self.pulls
                            or any(buffered for _, buffered in channels))
            verdict = liveness.observe(loop.time(), self.bytes_received, channels, awaiting)
            if verdict is Verdict.STALLED:
                self._finish(LinkBroken(
                    f"no answer from the agent for {stall:.0f} s, and nothing sent got "
                    "through (the link or the agent is stuck)"))
                if self._reader is not None:
                    self._reader.cancel()
                return
            if verdict is Verdict.PING:
                nonce = self.next_seq()
                pong = self._expect(nonce, m.Pong)
                pong.add_done_callback(lambda done: done.cancelled() or done.exception())
                self.send(m.Ping(nonce))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), tick)

    @property
    def closed(self) -> Awaitable[None]:
        """Resolves when the link ends, cleanly or not."""
        return asyncio.shield(self._closed)

    @property
    def closing(self) -> bool:
        """A Goodbye was sent: nothing more may follow it."""
        return self.writer.closing

    @property
    def bytes_sent(self) -> int:
        return self.writer.bytes_sent

    # -- sending --------------------------------------------------------------------------
    def next_seq(self) -> int:
        return next(self._seq)

    def send(self, message: m.Message) -> None:
        """Queue a message for the main channel (see LinkWriter.send)."""
        self.writer.send(message)

    def flush(self) -> None:
        self.writer.flush()

    async def drain(self, lane: int = 0, interrupt: asyncio.Event | None = None) -> None:
        """Backpressure on `lane` (see LinkWriter.drain)."""
        await self.writer.drain(lane, interrupt)

    def _expect(self, seq: int, *kinds: type[Any]) -> asyncio.Future[Any]:
        """A future for the reply to `seq`, which must be one of `kinds` (else the agent
        broke the protocol)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        self._kinds[seq] = kinds
        return future

    def submit(self, op: m.Message, lane: int = 0) -> asyncio.Future[Reply]:
        """Send an operation (on data lane `lane`, if not 0); the future resolves with its
        Ack or Error."""
        seq: int = op.seq  # type: ignore[union-attr]
        future = self._expect(seq, m.Ack, m.Error)
        try:
            self.writer.send_on(op, lane)
        except BaseException:
            self._pending.pop(seq, None)  # never sent: nobody will wait for it
            self._kinds.pop(seq, None)
            future.cancel()
            raise
        return future

    def submit_batched(self, seq: int, path: str, mode: int, content: bytes, code: int,
                       level: int, lane: int = 0, digest: bytes | None = None
                       ) -> asyncio.Future[Reply]:
        """Send a small whole file as part of a WriteBatch (packed with `code` at `level`
        together with the files submitted around it; with its `digest` under the session's
        hash, which the agent then records without hashing the content); the future
        resolves with its Ack or Error like `submit`'s. The batch leaves when it is full,
        when another message is sent, on `close_batch`, or BATCH_DELAY after its first file
        (LinkWriter.batch)."""
        self.writer.batch(seq, path, mode, content, code, level, lane, digest)
        return self._expect(seq, m.Ack, m.Error)

    def close_batch(self, lane: int | None = None) -> None:
        """Let the open batch of `lane` (of every lane: None) leave."""
        self.writer.close_batch(lane)

    # -- data lanes -------------------------------------------------------------------------
    def add_lane(self, writer: LaneWriter) -> int:
        """Take a data lane into use (its magic already written); returns its number."""
        number = self.writer.add_lane(writer)
        receive = getattr(writer, "set_receiver", None)
        if receive is not None:  # the lane carries pulled files back
            receive(functools.partial(self._lane_data, number))
        self._lane_watchers.append(asyncio.ensure_future(self._watch_lane(number, writer)))
        return number

    @property
    def lanes(self) -> int:
        return self.writer.lanes

    def backlogged(self, lane: int) -> bool:
        """Whether data for `lane` waits for the link (see LinkWriter.backlogged)."""
        return self.writer.backlogged(lane)

    async def _watch_lane(self, number: int, writer: LaneWriter) -> None:
        why = await writer.wait_closed()
        if self.failure is None and self.goodbye is None and not self.closing:
            self._finish(LinkBroken(f"data lane {number} ended: {why}"))

    def send_on(self, message: m.Message, lane: int) -> None:
        """Send a message that is no operation of its own (a later chunk) on `lane`."""
        self.writer.send_on(message, lane)

    async def hash_paths(self, paths: list[str]) -> list[bytes | None]:
        seq = self.next_seq()
        future = self._expect(seq, m.Hashes)
        self.send(m.HashPaths(seq, paths))
        reply: m.Hashes | m.Error = await future
        if isinstance(reply, m.Error):
            raise LinkBroken(f"the agent refused to hash files: {reply.message}")
        if len(reply.digests) != len(paths):
            broken = LinkBroken(f"agent link failed: {len(reply.digests)} digests for "
                                f"{len(paths)} paths")
            self._finish(broken)
            raise broken
        return reply.digests

    def list_tree(self, under: str = "") -> AsyncIterator[list[list[Any]]]:
        """Ask for the remote manifest (of the whole tree, or of the entry at `under` and
        what is below it) now; iterate to receive it batch by batch."""
        return self._entries_of(self.listing(under=under))

    def listing(self, since: str = "", under: str = "") -> AsyncIterator[m.ManifestBatch]:
        """`list_tree` with the batches whole: a whole-tree listing may be a delta against
        the kept listing `since` (see lsync.client.remote.remotelisting)."""
        seq = self.next_seq()
        queue: asyncio.Queue[m.ManifestBatch | None] = asyncio.Queue()
        self._manifests[seq] = queue
        self.send(m.ListTree(seq, under, since))
        return self._manifest_batches(seq, queue)

    @staticmethod
    async def _entries_of(batches: AsyncIterator[m.ManifestBatch]
                          ) -> AsyncIterator[list[list[Any]]]:
        async for batch in batches:
            yield batch.entries

    async def _manifest_batches(self, seq: int, queue: asyncio.Queue[m.ManifestBatch | None]
                                ) -> AsyncIterator[m.ManifestBatch]:
        try:
            while True:
                batch = await queue.get()
                if batch is None:
                    assert self.failure is not None
                    raise self.failure
                yield batch
                if batch.done:
                    return
        finally:
            self._manifests.pop(seq, None)

    async def ping(self) -> float:
        """Round-trip time to the agent, in seconds."""
        nonce = self.next_seq()
        future = self._expect(nonce, m.Pong)
        started = time.monotonic()
        self.send(m.Ping(nonce))
        await future
        return time.monotonic() - started

    # -- pulls ----------------------------------------------------------------------------
    def open_pull(self, seq: int, on_message: Callable[[m.Message | None], None]) -> None:
        """Route the messages of pull `seq` (PullListing, PullData, PullDone, Error) to
        `on_message`, and None once when the link ends first; `close_pull` stops it."""
        if self.failure is not None:
            raise self.failure
        self.pulls.open(seq, on_message)

    def close_pull(self, seq: int) -> None:
        self.pulls.close(seq)

    def _on_pull(self, message: m.PullListing | m.PullData | m.PullDone) -> None:
        self.pulls.deliver(message)

    def _lane_data(self, number: int, data: bytes) -> None:
        """Bytes from the agent on data lane `number`: pulled files."""
        if self.failure is not None:
            return
        self.bytes_received += len(data)
        try:
            self.pulls.lane_data(number, data)
        except ProtocolError as exc:
            self._finish(self._broken(exc))
        except Exception as exc:  # a bug here ends the session visibly: not retried
            self.internal = internal_error("reading a data lane", exc)
            self._finish(LinkBroken(f"agent link failed: {self.internal}"))

    # -- receiving ------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.read()
                if not data:
                    self.conn.receive_eof()
                    break
                self.bytes_received += len(data)
                self.conn.receive_data(data)
                while (message := self.conn.next_message()) is not None:
                    self._dispatch(message)
                    if self.goodbye is not None:
                        break
                if self.goodbye is not None:
                    break
                if not self._pending and self.bytes_sent >= self._trim_at:
                    # A burst is over (all answered): the memory it freed goes back now.
                    self._trim_at = self.bytes_sent + TRIM_AFTER
                    trim_heap()
            self._finish(None)
        except ProtocolError as exc:
            self._finish(self._broken(exc))
        except (OSError, EOFError) as exc:
            self._finish(LinkBroken(f"connection to the agent lost: {exc}"))
        except Exception as exc:  # a bug here ends the session visibly: not retried
            self.internal = internal_error("reading the agent's replies", exc)
            self._finish(LinkBroken(f"agent link failed: {self.internal}"))
        except asyncio.CancelledError:
            self._finish(LinkBroken("connection closed"))
            raise

    def _broken(self, exc: ProtocolError) -> LinkBroken:
        tail = self.stream.stderr_tail()
        skipped = self.conn.skipped_output.decode("utf-8", "replace").strip()
        detail = tail or skipped
        if exc.code == ErrorCode.CONNECTION_LOST and not self._welcome.done():
            return LinkBroken("the agent did not start" + (f": {detail}" if detail else ""))
        return LinkBroken(f"agent link failed: {exc.message}" + (f" ({detail})" if detail else ""))

    def _dispatch(self, message: m.Message) -> None:
        handler = _DISPATCH.get(type(message))
        if handler is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                f"client cannot handle {type(message).__name__}")
        handler(self, message)

    def _on_welcome(self, message: m.Welcome) -> None:
        if message.version != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION_MISMATCH, "agent speaks another version")
        if self._welcome.done():
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a second Welcome")
        offered = self.conn_offer
        for name in ("hash", "compression"):
            chosen = message.chosen.get(name)
            if chosen is None or (name in offered and chosen not in offered[name]):
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"the agent chose {name} {chosen!r}, which was not offered")
        self._welcome.set_result(message)

    def _on_reply(self, message: m.Ack | m.Error | m.Hashes | m.Pong) -> None:
        key = message.nonce if isinstance(message, m.Pong) else message.seq
        if isinstance(message, m.Error) and key in self.pulls:
            self.pulls.deliver(message)  # a listing refused
            return
        future = self._pending.get(key)
        kinds = self._kinds.get(key, ())
        if future is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"reply to unknown request {key}")
        if not isinstance(message, kinds) and not (isinstance(message, m.Error)
                                                   and m.Hashes in kinds):
            # (Left pending: the link's end fails it with the reason.)
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                f"{type(message).__name__} answered request {key}")
        del self._pending[key]
        self._kinds.pop(key, None)
        if not future.done():
            future.set_result(message)

    def _on_acked(self, message: m.Acked) -> None:
        for seq in message.seqs:
            self._on_reply(m.Ack(seq, int(AckStatus.OK), ""))

    def _on_manifest(self, message: m.ManifestBatch) -> None:
        queue = self._manifests.get(message.seq)
        if queue is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "manifest nobody asked for")
        self.manifest_entries += len(message.entries) + len(message.removed)
        if self.manifest_entries > MAX_MANIFEST_ENTRIES:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "the remote manifest has more "
                                f"than {MAX_MANIFEST_ENTRIES} entries")
        for path in [*(entry[0] for entry in message.entries), *message.removed]:
            problem = relpath_problem(path)
            if problem:
                raise ProtocolError(ErrorCode.MALFORMED_FRAME,
                                    f"the remote manifest names a bad path: {problem}")
        queue.put_nowait(message)

    def _on_kept(self, message: m.Kept) -> None:
        for path, kept_as, *_ in message.entries:
            if relpath_problem(path) or relpath_problem(kept_as) or not kept_as.startswith(
                    m.KEPT_DIR + "/"):
                raise ProtocolError(ErrorCode.MALFORMED_FRAME,
                                    "the agent names a bad path for a kept remote edit")
        if self.on_kept is not None:
            self.on_kept(message.entries, message.listing)

    def _on_ping(self, message: m.Ping) -> None:
        self.send(m.Pong(message.nonce))

    def _on_goodbye(self, message: m.Goodbye) -> None:
        self.goodbye = message

    def _bug(self, what: str, exc: Exception) -> None:
        """A bug (in `what`) ends the link, visibly: never retried."""
        self.internal = internal_error(what, exc)
        self._finish(LinkBroken(f"agent link failed: {self.internal}"))

    def _finish(self, failure: LinkBroken | None) -> None:
        if failure is None and self.goodbye is not None and self.goodbye.code != 0:
            failure = LinkBroken(f"agent ended the session: {self.goodbye.reason}")
        if failure is None and self.goodbye is None:
            failure = LinkBroken("the agent closed the connection")
        if failure is not None and self.failure is None:
            self.failure = failure
        self.writer.end(self.failure)
        error = self.failure or LinkBroken("connection closed")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for queue in self._manifests.values():
            queue.put_nowait(None)
        self.pulls.end()
        if not self._welcome.done():
            self._welcome.set_exception(error)
            self._welcome.exception()  # observed: the failure is reported through `failure`
        if not self._closed.done():
            self._closed.set_result(None)


_DISPATCH: dict[type[Any], Callable[[AgentLink, Any], None]] = {
    m.Welcome: AgentLink._on_welcome,
    m.Ack: AgentLink._on_reply,
    m.Acked: AgentLink._on_acked,
    m.Error: AgentLink._on_reply,
    m.Hashes: AgentLink._on_reply,
    m.Pong: AgentLink._on_reply,
    m.ManifestBatch: AgentLink._on_manifest,
    m.Ping: AgentLink._on_ping,
    m.Goodbye: AgentLink._on_goodbye,
    m.PullListing: AgentLink._on_pull,
    m.PullData: AgentLink._on_pull,
    m.PullDone: AgentLink._on_pull,
    m.Kept: AgentLink._on_kept,
}
