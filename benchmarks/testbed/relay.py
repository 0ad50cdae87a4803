"""How `DelayProxy` (benchmarks.testbed.proxy) relays one connection, and the link it shares.

`_Link` is one direction of the simulated link, shared by all connections: it says when
bytes read now are to be delivered (the one-way delay, and a token bucket when the
direction is capped). `_Connection` is one client connection and its upstream connection,
opened after the simulated handshake (3d, unless the proxy is told otherwise) or refused at
once while the proxy does not accept; it has a `_Leg` (an asyncio protocol, TCP_NODELAY)
for each socket and a `_Direction` each way: a timed queue that delivers each chunk at its
due time, in order, keeps a half close (EOF) in its place, stops reading its source while
too much waits in it, the bottleneck queue is full or the receiver cannot take more, and
can be frozen (nothing delivered, nothing read, nothing closed). Each connection reports
the bytes it reads, and its opening and closing, to its `DelayProxy`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.testbed.proxy import DelayProxy

# Chunks are split into segments of at most this many bytes on a capped link, so delivery is
# smooth rather than one 64 KiB lump per read.
SEGMENT_BYTES = 16 * 1024
# asyncio's timers wake up to 1 ms late (epoll's timeout is in whole ms, rounded up): arm
# each delivery this much early and treat chunks this close to due as due, centring the error.
TIMER_SLACK = 0.0005

UP = "up"  # client -> server
DOWN = "down"  # server -> client


class _Link:
    """One direction of the simulated link, shared by all connections: delay and rate.

    `schedule(n, now)` returns when n bytes read at `now` are to be delivered. Without a rate
    that is now + delay. With a rate, bytes leave through a token bucket (depth `burst`
    seconds of data): departure = max(now - burst, busy_until) + n / rate, delivery =
    departure + delay.
    """

    def __init__(self, delay: float, rate_bps: float | None, burst: float) -> None:
        self.delay = delay
        self.rate_bytes = rate_bps / 8.0 if rate_bps else None
        self.burst = burst
        self.busy_until = 0.0

    def schedule(self, nbytes: int, now: float) -> float:
        if self.rate_bytes is None:
            return now + self.delay
        start = max(now - self.burst, self.busy_until)
        self.busy_until = start + nbytes / self.rate_bytes
        return max(now, self.busy_until) + self.delay

    def backlog(self, now: float) -> float:
        """Seconds of data queued at the bottleneck that has not left yet."""
        if self.rate_bytes is None:
            return 0.0
        return max(0.0, self.busy_until - now)


class _Leg(asyncio.Protocol):
    """One TCP socket of a proxied connection (client side or upstream side)."""

    def __init__(self, conn: _Connection, side: str) -> None:
        self.conn = conn
        self.side = side  # "client" or "server"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.side == "client":
            self.conn.client_connected(self)

    def data_received(self, data: bytes) -> None:
        self.conn.direction_from(self.side).received(data)

    def eof_received(self) -> bool:
        self.conn.direction_from(self.side).received_eof()
        return True  # keep the socket open for the other direction (half close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conn.leg_lost(self.side)

    def pause_writing(self) -> None:
        self.conn.direction_to(self.side).pause("dst-full")

    def resume_writing(self) -> None:
        self.conn.direction_to(self.side).resume("dst-full")


_EOF = b""


class _Direction:
    """Bytes flowing one way through one connection: a timed queue feeding the other leg."""

    def __init__(self, conn: _Connection, name: str, link: _Link) -> None:
        self.conn = conn
        self.name = name
        self.link = link
        self.src: _Leg | None = None
        self.dst: _Leg | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.resume_timer: asyncio.TimerHandle | None = None
        self.pause_reasons: set[str] = set()
        self.eof_queued = False
        self.eof_delivered = False
        self.frozen = False  # nothing is delivered, nothing more is read; nothing closes

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.conn.proxy.loop

    def freeze(self) -> None:
        self.frozen = True
        self.pause("freeze")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _due(self, nbytes: int, now: float) -> float:
        due = max(self.link.schedule(nbytes, now), self.last_due)
        self.last_due = due
        return due

    def received(self, data: bytes) -> None:
        now = self.loop.time()
        self.conn.proxy.count(self.name, len(data))
        if self.link.rate_bytes is not None and len(data) > SEGMENT_BYTES:
            view = memoryview(data)
            for i in range(0, len(data), SEGMENT_BYTES):
                seg = bytes(view[i : i + SEGMENT_BYTES])
                self.queue.append((self._due(len(seg), now), seg))
        else:
            self.queue.append((self._due(len(data), now), data))
        self.queued_bytes += len(data)
        self._arm()
        self._check_backpressure(now)

    def received_eof(self) -> None:
        if self.eof_queued:
            return
        self.eof_queued = True
        now = self.loop.time()
        self.queue.append((self._due(0, now), _EOF))
        self._arm()

    def _check_backpressure(self, now: float) -> None:
        if self.queued_bytes > self.conn.proxy.buffer_bytes:
            self.pause("buffer")
        backlog = self.link.backlog(now)
        if backlog > self.conn.proxy.queue_seconds:
            self.pause("bottleneck")
            if self.resume_timer is None:
                self.resume_timer = self.loop.call_later(
                    backlog - self.conn.proxy.queue_seconds, self._bottleneck_drained
                )

    def _bottleneck_drained(self) -> None:
        self.resume_timer = None
        now = self.loop.time()
        backlog = self.link.backlog(now)
        if backlog > self.conn.proxy.queue_seconds:
            self.resume_timer = self.loop.call_later(
                backlog - self.conn.proxy.queue_seconds, self._bottleneck_drained
            )
        else:
            self.resume("bottleneck")

    def pause(self, reason: str) -> None:
        if not self.pause_reasons and self.src is not None and self.src.transport is not None:
            self.src.transport.pause_reading()
        self.pause_reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self.pause_reasons:
            return
        self.pause_reasons.discard(reason)
        if not self.pause_reasons and self.src is not None and self.src.transport is not None:
            self.src.transport.resume_reading()

    def _arm(self) -> None:
        if self.timer is not None or not self.queue or self.frozen:
            return
        if self.dst is None or self.dst.transport is None:
            return  # upstream not connected yet: flushed when it is
        self.timer = self.loop.call_at(self.queue[0][0] - TIMER_SLACK, self.flush)

    def flush(self) -> None:
        """Deliver every chunk that is due; re-arm for the next one."""
        self.timer = None
        dst = self.dst.transport if self.dst is not None else None
        if dst is None:
            return
        now = self.loop.time() + TIMER_SLACK
        parts: list[bytes] = []
        delivered = 0
        eof = False
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is _EOF:
                eof = True
                break
            parts.append(data)
            delivered += len(data)
        if parts:
            dst.write(b"".join(parts) if len(parts) > 1 else parts[0])
            self.queued_bytes -= delivered
            if self.queued_bytes <= self.conn.proxy.buffer_bytes // 2:
                self.resume("buffer")
        if eof:
            self.queue.clear()
            self.eof_delivered = True
            try:
                if dst.can_write_eof():
                    dst.write_eof()
            except OSError:  # the receiver is gone already: nothing left to deliver to
                self.conn.abort()
                return
            self.conn.direction_done()
            return
        self._arm()

    def cancel(self) -> None:
        for handle in (self.timer, self.resume_timer):
            if handle is not None:
                handle.cancel()
        self.timer = self.resume_timer = None
        self.queue.clear()
        self.queued_bytes = 0


class _Connection:
    """One client connection and its upstream connection, with a direction each way."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.client = _Leg(self, "client")
        self.server = _Leg(self, "server")
        self.up = _Direction(self, UP, proxy.link_up)
        self.down = _Direction(self, DOWN, proxy.link_down)
        self.up.src, self.up.dst = self.client, self.server
        self.down.src, self.down.dst = self.server, self.client
        self.connect_timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.closed = False

    def direction_from(self, side: str) -> _Direction:
        return self.up if side == "client" else self.down

    def direction_to(self, side: str) -> _Direction:
        return self.down if side == "client" else self.up

    def client_connected(self, leg: _Leg) -> None:
        self.proxy.connection_opened(self)
        if not self.proxy.accepting:
            self.abort()
            return
        handshake = 3 * self.proxy.delay if self.proxy.handshake else 0.0
        self.connect_timer = self.proxy.loop.call_later(handshake, self._start_connect)

    def _start_connect(self) -> None:
        self.connect_timer = None
        self.connect_task = self.proxy.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.proxy.target
        try:
            await self.proxy.loop.create_connection(lambda: self.server, host, port)
        except OSError:
            self.abort()
            return
        if self.closed:
            self.abort()
            return
        # Bytes the client sent meanwhile are due already: deliver them now, in order.
        self.up.flush()
        self.down._arm()

    def direction_done(self) -> None:
        if self.up.eof_delivered and self.down.eof_delivered:
            self.close()

    def leg_lost(self, side: str) -> None:
        """A socket closed: what it sent still arrives (then EOF); what was for it is lost."""
        if self.closed:
            return
        self.direction_from(side).received_eof()
        towards = self.direction_to(side)
        towards.cancel()
        towards.eof_delivered = True
        self.direction_done()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for leg in (self.client, self.server):
            if leg.transport is not None:
                leg.transport.close()
        self._finish()

    def abort(self) -> None:
        """Drop both sockets now (RST), discarding anything queued."""
        self.closed = True
        self.up.cancel()
        self.down.cancel()
        for leg in (self.client, self.server):
            if leg.transport is not None:
                leg.transport.abort()
        self._finish()

    def _finish(self) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        self.proxy.connection_closed(self)


