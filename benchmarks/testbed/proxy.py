"""A userspace TCP delay proxy that turns loopback into a long link.

This kernel has no netem, so `DelayProxy` sits between a client and a server (sshd) and
delays each direction by a one-way delay d: every chunk read is scheduled for delivery at its
read time + d, in order, with TCP_NODELAY on both legs. A new connection pays the TCP
handshake: the upstream connection is opened only 3d after the client's connect (the
client's first bytes land then, the server's first reply reaches the client at 4d, as on a
real link). Optionally each direction is capped to a bandwidth (a token bucket shared by all
connections, with a bounded bottleneck queue, so a bulk transfer cannot build a huge backlog).
Bytes are counted each way, and `cut()` drops every open connection at once (fault tests).
How one connection is relayed (legs, timed queues, the shared link) is in
benchmarks.testbed.relay.

Use it in-process (`await proxy.start()` ... `await proxy.stop()`), from synchronous code
(`ThreadedProxy` runs its own event loop in a thread), or as a program:
``python -m benchmarks.testbed.proxy --listen 127.0.0.1:0 --target 127.0.0.1:22 --delay-ms 150``.
`self_check()` measures an echo through the proxy; at d = 150 ms it must read 300 ms, never
more than 3 ms early nor 15 ms late (timers of a loaded machine fire late).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from benchmarks.testbed.relay import DOWN, UP, _Connection, _Link

_T = TypeVar("_T")

# Stop reading a direction when this many bytes wait inside the proxy for it (a memory bound;
# it caps an uncapped link at 64 MiB / d, far above what ssh over loopback reaches).
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
# On a capped link, the bottleneck queue holds at most this much time's worth of data.
DEFAULT_QUEUE_SECONDS = 0.05
# Token bucket depth: this much time's worth of data may go out in one burst.
DEFAULT_BURST_SECONDS = 0.002


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
