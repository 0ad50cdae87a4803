"""The SSH connection's writes of one event-loop step go out as one write
(lsync.client.transport.coalesce), on real sockets; and a real session runs through it."""

from __future__ import annotations

import asyncio
import socket

from lsync.client.transport.coalesce import FLUSH_AT, CoalescingTransport, coalesce_writes


async def _pair() -> tuple[asyncio.Transport, socket.socket]:
    ours, theirs = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        asyncio.Protocol, ours)
    theirs.setblocking(False)
    return transport, theirs


async def _read(sock: socket.socket, size: int) -> bytes:
    loop, got = asyncio.get_running_loop(), b""
    while len(got) < size:
        got += await asyncio.wait_for(loop.sock_recv(sock, size - len(got)), 10)
    return got


class _Conn:
    """What coalesce_writes reaches into: the asyncssh connection's `_transport`."""

    def __init__(self, transport: object) -> None:
        self._transport = transport


def test_writes_of_one_step_reach_the_socket_as_one_write_in_order() -> None:
    async def main() -> None:
        transport, theirs = await _pair()
        conn = _Conn(transport)
        coalescing = coalesce_writes(conn)
        assert coalescing is not None and conn._transport is coalescing
        pieces = [bytes([i]) * (100 + i) for i in range(40)]
        for piece in pieces:
            coalescing.write(piece)
        assert coalescing.flushes == 0 and coalescing.get_write_buffer_size() >= 40 * 100
        assert await _read(theirs, sum(map(len, pieces))) == b"".join(pieces)
        assert coalescing.flushes == 1  # (in the same step: no timer)
        coalescing.write(b"x" * FLUSH_AT)  # this much goes at once
        assert coalescing.flushes == 2
        assert await _read(theirs, FLUSH_AT) == b"x" * FLUSH_AT
        coalescing.close()
        theirs.close()

    asyncio.run(main())


def test_abort_writes_what_was_kept_and_nothing_goes_once_closing() -> None:
    async def main() -> None:
        transport, theirs = await _pair()
        coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
        coalescing.write(b"disconnect")
        coalescing.abort()  # (asyncssh aborts right after its last packet)
        assert coalescing.flushes == 1
        coalescing.write(b"too late")
        await asyncio.sleep(0)
        assert coalescing.flushes == 1  # the transport is closing: nothing more written
        theirs.close()

    asyncio.run(main())


def test_anything_else_than_an_asyncio_transport_is_left_as_it_is() -> None:
    conn = _Conn(None)

    async def main() -> None:
        assert coalesce_writes(conn) is None

    asyncio.run(main())
    assert conn._transport is None
