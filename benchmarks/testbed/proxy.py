"""A userspace TCP delay proxy that turns loopback into a long link.

This kernel has no netem, so `DelayProxy` sits between a client and a server (sshd) and
delays each direction by a one-way delay d: every chunk read is scheduled for delivery at its
read time + d, in order, with TCP_NODELAY on both legs. A new connection pays the TCP
handshake: the upstream connection is opened only 3d after the client's connect (the
client's first bytes land then, the server's first reply reaches the client at 4d, as on a
real link). Optionally each direction is capped to a bandwidth (a token bucket shared by all
connections, with a bounded bottleneck queue, so a bulk transfer cannot build a huge backlog).
Bytes are counted each way, and `cut()` drops every open connection at once (fault tests).

Use it in-process (`await proxy.start()` ... `await proxy.stop()`), from synchronous code
(`ThreadedProxy` runs its own event loop in a thread), or as a program:
``python -m benchmarks.testbed.proxy --listen 127.0.0.1:0 --target 127.0.0.1:22 --delay-ms 150``.
`self_check()` measures an echo through the proxy; at d = 150 ms it must read 300 ms, never
more than 3 ms early nor 15 ms late (timers of a loaded machine fire late).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")

# Chunks are split into segments of at most this many bytes on a capped link, so delivery is
# smooth rather than one 64 KiB lump per read.
SEGMENT_BYTES = 16 * 1024
# Stop reading a direction when this many bytes wait inside the proxy for it (a memory bound;
# it caps an uncapped link at 64 MiB / d, far above what ssh over loopback reaches).
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
# On a capped link, the bottleneck queue holds at most this much time's worth of data.
DEFAULT_QUEUE_SECONDS = 0.05
# asyncio's timers wake up to 1 ms late (epoll's timeout is in whole ms, rounded up): arm
# each delivery this much early and treat chunks this close to due as due, centring the error.
TIMER_SLACK = 0.0005
# Token bucket depth: this much time's worth of data may go out in one burst.
DEFAULT_BURST_SECONDS = 0.002

UP = "up"  # client -> server
DOWN = "down"  # server -> client


class ProxyError(RuntimeError):
    """The proxy could not start or a self-check failed. `code` names the failure."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


@dataclass(frozen=True)
class Counters:
    """Bytes each way (counted when read from the sender) and connection counts."""

    bytes_up: int
    bytes_down: int
    connections_total: int
    connections_open: int
    connections_cut: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down


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


class DelayProxy:
    """A TCP proxy from `listen` to `target` adding a one-way delay each way.

    `delay` is the one-way delay d in seconds (RTT = 2d). `rate_bps` caps each direction
    (bits per second, shared by all connections); None means uncapped. `handshake` makes a
    new connection wait 3d before the upstream connect. Set `accepting = False` to refuse new
    connections (they are reset at once); `cut()` drops the open ones.
    """

    def __init__(
        self,
        target: tuple[str, int],
        delay: float,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        rate_bps: float | None = None,
        handshake: bool = True,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        queue_seconds: float = DEFAULT_QUEUE_SECONDS,
        burst_seconds: float = DEFAULT_BURST_SECONDS,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError("rate_bps must be > 0 or None")
        self.target = target
        self.listen = listen
        self.delay = delay
        self.rate_bps = rate_bps
        self.handshake = handshake
        self.buffer_bytes = buffer_bytes
        self.queue_seconds = queue_seconds
        self.link_up = _Link(delay, rate_bps, burst_seconds)
        self.link_down = _Link(delay, rate_bps, burst_seconds)
        self.accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._bytes = {UP: 0, DOWN: 0}
        self._total = 0
        self._cut = 0
        self.address: tuple[str, int] = listen

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ProxyError("not-started", "proxy not started")
        return self._loop

    @property
    def port(self) -> int:
        return self.address[1]

    async def start(self) -> DelayProxy:
        """Listen; returns self. `address` / `port` tell where."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self).client, self.listen[0], self.listen[1]
        )
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        return self

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_delay(self, delay: float) -> None:
        """Change d for chunks read from now on (order is still kept)."""
        self.delay = delay
        self.link_up.delay = delay
        self.link_down.delay = delay

    def cut(self) -> int:
        """Reset every open connection now; returns how many were dropped."""
        conns = list(self._connections)
        for conn in conns:
            conn.abort()
        self._cut += len(conns)
        return len(conns)

    def freeze(self) -> int:
        """Stop every open connection dead without closing it (a link gone silent: no
        byte either way, no RST); new connections are not affected. Returns how many."""
        conns = list(self._connections)
        for conn in conns:
            conn.up.freeze()
            conn.down.freeze()
        return len(conns)

    def counters(self) -> Counters:
        return Counters(
            bytes_up=self._bytes[UP],
            bytes_down=self._bytes[DOWN],
            connections_total=self._total,
            connections_open=len(self._connections),
            connections_cut=self._cut,
        )

    def reset_counters(self) -> None:
        self._bytes = {UP: 0, DOWN: 0}

    # -- called by connections --------------------------------------------------------------

    def count(self, direction: str, nbytes: int) -> None:
        self._bytes[direction] += nbytes

    def connection_opened(self, conn: _Connection) -> None:
        self._connections.add(conn)
        self._total += 1

    def connection_closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)


class ThreadedProxy:
    """A `DelayProxy` run by its own event loop in a daemon thread, for synchronous callers.

    ``with ThreadedProxy(("127.0.0.1", port), delay=0.15) as p: ... p.port ... p.cut()``.
    Every method is safe to call from any thread other than the proxy's own.
    """

    def __init__(self, target: tuple[str, int], delay: float, **kwargs: Any) -> None:
        self.proxy = DelayProxy(target, delay, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._started = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call_sync(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        async def run() -> _T:
            return fn()

        return self._call(run(), timeout)

    def start(self) -> ThreadedProxy:
        if not self._started:
            self._thread.start()
            self._started = True
            self._call(self.proxy.start())
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            self._call(self.proxy.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> ThreadedProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.address

    def cut(self) -> int:
        return self._call_sync(self.proxy.cut)

    def freeze(self) -> int:
        return self._call_sync(self.proxy.freeze)

    def counters(self) -> Counters:
        return self._call_sync(self.proxy.counters)

    def reset_counters(self) -> None:
        self._call_sync(self.proxy.reset_counters)

    def set_accepting(self, accepting: bool) -> None:
        def apply() -> None:
            self.proxy.accepting = accepting

        self._call_sync(apply)

    def set_delay(self, delay: float) -> None:
        self._call_sync(lambda: self.proxy.set_delay(delay))


# -- self-check ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCheck:
    """What `self_check` measured (seconds)."""

    delay: float
    first_echo: float  # connect + first echo: should be 4d (3d handshake + d back)
    echo_rtts: tuple[float, ...]  # echoes on the open connection: each should be 2d

    @property
    def median_rtt(self) -> float:
        return statistics.median(self.echo_rtts)

    @property
    def worst_error(self) -> float:
        return max(abs(r - 2 * self.delay) for r in self.echo_rtts)

    def ok(self, tolerance: float = 0.003, late: float = 0.015) -> bool:
        """No echo earlier than 2d - `tolerance` (the delay is really paid), none later than
        2d + `late` (a loaded machine schedules the proxy's timers a few ms late)."""
        return all(-tolerance <= r - 2 * self.delay <= late for r in self.echo_rtts)

    def describe(self) -> str:
        ms = [round(r * 1000, 2) for r in self.echo_rtts]
        return (
            f"d={self.delay * 1000:.1f} ms: echo RTT median {self.median_rtt * 1000:.2f} ms "
            f"(expect {2 * self.delay * 1000:.1f}), worst error {self.worst_error * 1000:.2f} ms, "
            f"first echo incl. handshake {self.first_echo * 1000:.2f} ms "
            f"(expect {4 * self.delay * 1000:.1f}); samples {ms}"
        )


class _Echo(asyncio.Protocol):
    """Echo server protocol for the self-check: sends back whatever it receives."""

    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


async def _echo_server() -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0)


async def self_check(delay: float = 0.150, rounds: int = 5) -> SelfCheck:
    """Echo through a fresh proxy at one-way `delay`; return the measured times."""
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    try:
        async with DelayProxy(("127.0.0.1", port), delay) as proxy:
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"x")
                await reader.readexactly(1)
                first = time.perf_counter() - t0
                rtts = []
                for i in range(rounds):
                    msg = b"ping %d\n" % i
                    t = time.perf_counter()
                    writer.write(msg)
                    await reader.readexactly(len(msg))
                    rtts.append(time.perf_counter() - t)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return SelfCheck(delay=delay, first_echo=first, echo_rtts=tuple(rtts))


# -- command line -------------------------------------------------------------------------


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    rate = args.rate_mbit * 1e6 if args.rate_mbit else None
    proxy = DelayProxy(
        args.target,
        args.delay_ms / 1000.0,
        listen=args.listen,
        rate_bps=rate,
        handshake=not args.no_handshake,
    )
    await proxy.start()
    host, port = proxy.address
    print(f"listening {host}:{port} -> {args.target[0]}:{args.target[1]} "
          f"delay_ms={args.delay_ms} rate_mbit={args.rate_mbit or 'none'}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if sys.platform != "win32":
        loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"cut {proxy.cut()}", flush=True))
    await stop.wait()
    c = proxy.counters()
    await proxy.stop()
    print(f"bytes_up={c.bytes_up} bytes_down={c.bytes_down} "
          f"connections={c.connections_total}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.testbed.proxy",
        description="TCP delay proxy (SIGUSR1 cuts every open connection).",
    )
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0))
    parser.add_argument("--target", type=_hostport)
    parser.add_argument("--delay-ms", type=float, default=150.0, help="one-way delay d")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="cap per direction")
    parser.add_argument("--no-handshake", action="store_true",
                        help="connect upstream at once instead of after 3d")
    parser.add_argument("--self-check", action="store_true",
                        help="measure an echo through the proxy at --delay-ms and exit")
    args = parser.parse_args(argv)
    if args.self_check:
        result = asyncio.run(self_check(args.delay_ms / 1000.0))
        print(("OK " if result.ok() else "FAIL ") + result.describe())
        return 0 if result.ok() else 1
    if args.target is None:
        parser.error("--target is required")
    asyncio.run(_serve(args))
    return 0


def run_in_thread(target: tuple[str, int], delay: float, **kwargs: Any) -> ThreadedProxy:
    """Start a `ThreadedProxy` and return it (stop it with `.stop()`)."""
    return ThreadedProxy(target, delay, **kwargs).start()


__all__ = [
    "Counters",
    "DelayProxy",
    "ProxyError",
    "SelfCheck",
    "ThreadedProxy",
    "main",
    "run_in_thread",
    "self_check",
]

if __name__ == "__main__":
    sys.exit(main())
