"""Data lanes over SSH: extra session channels that carry content writes to the agent.

Each SSH channel has its own flow-control window (2 MiB in OpenSSH's sshd): over a 300 ms
link one channel carries at most about 7 MB/s, and everything on it arrives in order, so a
save queues behind the bulk of an initial sync. When the agent offers a lane socket (see
lsync.agent.lanes), the session opens `--lanes` more channels, each running the agent's
pump (stdin into that socket), and hands them to the link: the first carries single saves,
the others take batches in turn (which write may take which lane is decided in
lsync.client.remote.window). Answers come back on the main channel.

A lane that cannot be opened is left out (the session works on the main channel alone); a
lane that ends while the link lives breaks the link (the session reconnects). asyncssh's
errors are mapped here, once: a failed write raises OSError, which the link maps to a
broken link.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Callable

import asyncssh

from lsync.agent.lanes import BULK, PUMP, URGENT
from lsync.client.transport.link import AgentLink
from lsync.client.transport.streams import _StderrTail
from lsync.protocol.framing import MAGIC

OPEN_TIMEOUT = 15.0
# A lane buffers this much beyond its channel's window before `drain` waits (enough to keep
# a window of 2 MiB full; more would only cost memory), and drains to the low mark.
LANE_WRITE_HIGH = 2 << 20
LANE_WRITE_LOW = 512 << 10


class _LaneSession(asyncssh.SSHClientSession[bytes]):
    def __init__(self, lane: SshLane) -> None:
        self.lane = lane

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.lane.stderr.feed(data)
        elif self.lane.receiver is not None:
            self.lane.receiver(data)  # pulled files (lsync.client.buildloop.pull)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lane.stderr.end()
        if exc is not None and not self.lane.why:
            self.lane.why = str(exc)
        self.lane.ended.set()

    def pause_writing(self) -> None:
        self.lane.writable.clear()

    def resume_writing(self) -> None:
        self.lane.writable.set()

    def exit_status_received(self, status: int) -> None:
        if not self.lane.why:
            self.lane.why = f"the lane's pump exited with status {status}"


class SshLane:
    """One data lane: an SSH channel running the agent's pump."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.ended = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.why = ""
        self.stderr = _StderrTail()  # what the pump printed (bounded)
        self.receiver: Callable[[bytes], None] | None = None  # the agent's data back

    def set_receiver(self, receiver: Callable[[bytes], None]) -> None:
        self.receiver = receiver

    @classmethod
    async def open(cls, conn: asyncssh.SSHClientConnection, python: str, socket_path: str,
                   window: int, max_pktsize: int, role: str = BULK) -> SshLane:
        lane = cls()
        command = (f"exec {shlex.quote(python)} -c {shlex.quote(PUMP)} "
                   f"{shlex.quote(socket_path)} {role}")
        chan, _ = await conn.create_session(lambda: _LaneSession(lane), command,
                                            encoding=None, window=window,
                                            max_pktsize=max_pktsize)
        chan.set_write_buffer_limits(LANE_WRITE_HIGH, LANE_WRITE_LOW)
        lane.chan = chan
        lane.write(MAGIC)
        return lane

    def write(self, data: bytes) -> None:
        if self.chan is None or self.ended.is_set():
            raise ConnectionResetError(self.why or "the data lane is closed")
        try:
            self.chan.write(data)
        except (asyncssh.Error, BrokenPipeError) as exc:
            raise ConnectionResetError(str(exc)) from None

    def backlog(self) -> int:
        return self.chan.get_write_buffer_size() if self.chan is not None else 0

    async def drain(self) -> None:
        while not self.writable.is_set() and not self.ended.is_set():
            ended = asyncio.ensure_future(self.ended.wait())
            writable = asyncio.ensure_future(self.writable.wait())
            try:
                await asyncio.wait({ended, writable}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                writable.cancel()

    async def wait_closed(self) -> str:
        await self.ended.wait()
        detail = [line.strip() for line in self.stderr.lines if line.strip()][-1:]
        return "; ".join([self.why or "closed", *detail])

    async def close(self) -> None:
        if self.chan is not None and not self.ended.is_set():
            self.chan.write_eof()
            self.chan.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ended.wait(), 2.0)


async def open_lanes(link: AgentLink, conn: asyncssh.SSHClientConnection, python: str,
                     socket_path: str, window: int, max_pktsize: int,
                     count: int) -> int:
    """Open up to `count` lanes in parallel and hand them to `link` in a fixed order;
    returns how many it took (those that failed to open are left out). The first is the
    lane of single saves (lsync.client.remote.passes.FAST_LANE), and its pump tells the
    agent so (URGENT); when it fails to open, the next one carries the saves as a BULK lane
    (the agent may then apply a save's delta in its write pool: later, never wrong)."""
    opening = [asyncio.ensure_future(asyncio.wait_for(
        SshLane.open(conn, python, socket_path, window, max_pktsize,
                     URGENT if i == 0 else BULK), OPEN_TIMEOUT))
        for i in range(count)]
    results = await asyncio.gather(*opening, return_exceptions=True)
    taken = 0
    for result in results:
        if isinstance(result, SshLane):
            if link.failure is not None or link.closing:
                await result.close()
                continue
            link.add_lane(result)
            taken += 1
        elif isinstance(result, BaseException) and not isinstance(
                result, (OSError, asyncssh.Error, asyncio.TimeoutError)):
            raise result
    return taken
