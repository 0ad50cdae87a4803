"""The SSH connection's writes of one event-loop step reach the socket in one system call.

asyncssh writes every packet to its transport on its own, and (2.24) puts an SSH_MSG_IGNORE
packet before every packet it encrypts: a 256 KiB write on a data lane is 16 transport
writes, each a send(2) at once while the socket takes it. The kernel's initial sync made
30,000 of them on the event loop's thread, each a release and a re-acquisition of the
interpreter lock, which the reader threads hold half of the time.

`coalesce_writes` puts `CoalescingTransport` between the connection and its transport: a
write is kept, and what was kept goes out as one write when the loop runs the callbacks
that are ready, in the same step, or at once once `FLUSH_AT` bytes are kept. The bytes and
their order are the same; nothing waits for a timer. Closing or aborting writes what is
kept first, as the transport would have written it already; once the transport is closing,
nothing more is written (asyncio would only count the lost writes).

What it costs a save: its packets go out when the task that wrote them yields and the loop
reaches the flush, at once when the loop is otherwise idle; during bulk work, after at most
one of the engine's steps (lsync.client.remote.engine.YIELD_EVERY, 5 ms), the bound every
other callback of the loop (replies, the watcher) already has.
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_AT = 1 << 20  # bytes kept before they go without waiting for the loop's step


class CoalescingTransport:
    """Stands for `transport` where the SSH connection writes (see the module docstring);
    everything but writing, closing and aborting goes to `transport` as it is."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._kept: list[bytes] = []
        self._size = 0
        self.flushes = 0  # writes that reached the transport (a test counts them)

    def write(self, data: bytes) -> None:
        if not self._kept:
            self._loop.call_soon(self.flush)
        self._kept.append(data)
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        kept, self._kept, self._size = self._kept, [], 0
        if not kept or self.transport.is_closing():
            return
        self.flushes += 1
        self.transport.write(kept[0] if len(kept) == 1 else b"".join(kept))

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self._size

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.flush()
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def coalesce_writes(conn: Any) -> CoalescingTransport | None:
    """Put a `CoalescingTransport` under the asyncssh connection `conn` (from its
    `connection_made`, before it writes its version); None where its transport is not
    what this expects (the connection then writes as asyncssh does)."""
    transport = getattr(conn, "_transport", None)
    if not isinstance(transport, asyncio.Transport):
        return None
    coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
    conn._transport = coalescing
    return coalescing
