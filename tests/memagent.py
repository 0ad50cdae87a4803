"""An `AgentStream` whose far end is the real `AgentService`, in this process.

`MemoryAgentStream` drives `lsync.agent.service.AgentService` the way `lsync.agent.main.serve`
does, but through byte buffers instead of a subprocess's stdin and stdout: no subprocess,
no sockets. Bytes the client writes are fed to the agent's sans-IO
`Connection(AGENT)` (which expects the client's magic first and sends its own with its first
answer, as in `serve`); each decoded message goes to `service.handle`, on the event loop's
thread, one loop turn after it was written (the agent is another party, not a callee of
the client). The service runs without a write pool (`pool=None`), so every operation is
applied and answered before the next one is read: runs are deterministic.

Errors are handled as `serve` handles them: `SessionEnd` ends the session, a
`ProtocolError` ends it with a `Goodbye` carrying the code (unless the input just ended), any
other exception in a handler becomes `Error(INTERNAL)` for that operation (and is kept in
`internal_errors`, where `serve` would log its traceback). When the session ends the
service is closed, exactly as `serve` closes it on end of input.

`open_lane(delay_turns)` gives a data lane (the LaneWriter of lsync.client.transport.outbox)
into the same service: its frames are handled `delay_turns` turns of the event loop after they were
written, so lanes and the main stream overtake each other the way separate SSH channels
may. A cut ends the lanes too.

`cut()` drops the connection the way a dead network does: bytes still travelling either
way are lost, the agent sees its input end (and closes, keeping its record of what lsync
wrote, which lives under $HOME/.cache/lsync unless `use_cache` is False), the client's
`read()` returns b"" and its `write()` raises `ConnectionResetError`. `cut_after(n)` lets
the agent handle `n` more messages first (their effects stay, their answers are lost),
which cuts a burst at a chosen point.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

from lsync.agent.service import AgentService, SessionEnd
from lsync.client.transport.link import AgentLink
from lsync.protocol import PROTOCOL_VERSION, hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, Connection, Lane
from lsync.protocol.errors import ErrorCode, ProtocolError
from lsync.protocol.framing import MAGIC


class MemoryAgentStream:
    """The client's end of an in-memory link to an in-process `AgentService`."""

    def __init__(self, *, use_cache: bool = True,
                 now_ns: Callable[[], int] = time.time_ns) -> None:
        self.conn = Connection(AGENT)
        self.service = AgentService(self.conn.send, self._flush, now_ns, use_cache,
                                    pool=None, log_internal=self._log_internal)
        self.handled = 0  # messages the agent has handled
        self.internal_errors: list[str] = []  # what `serve` would write to agent.log
        self.cuts = 0  # 1 once the link was cut
        self._inbox = bytearray()  # written by the client, not yet read by the agent
        self._outbox: deque[bytes] = deque()  # written by the agent, not yet read
        self._readable = asyncio.Event()
        self._consumed = asyncio.Event()
        self._scheduled = False
        self._status: int | None = None  # the agent's exit status, once its session ended
        self._dropped = False  # cut: nothing travels any more
        self._cut_after: int | None = None
        self._stderr: list[str] = []
        self.lanes: list[MemoryLane] = []
        self._held: list[bytes] | None = None  # answers held back (`hold_answers`)

    # -- the agent's side (lsync.agent.main.serve, over buffers) --------------------------
    def _log_internal(self, context: str, trace: str | None = None) -> None:
        self.internal_errors.append(f"{context}\n{trace or traceback.format_exc()}")

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.service.journal()  # acknowledged changes are on disk before answers leave
            if self._held is not None:
                self._held.append(data)
            elif not self._dropped:
                self._outbox.append(data)
                self._readable.set()

    def _serve(self) -> None:
        """Handle every complete message written so far (one turn of the agent's loop)."""
        self._scheduled = False
        if self._status is not None:
            return
        data, self._inbox = bytes(self._inbox), bytearray()
        try:
            self.conn.receive_data(data)
            while True:
                if self._cut_after is not None and self.handled >= self._cut_after:
                    self.cut()
                    return
                message = self.conn.next_message()
                if message is None:
                    break
                self._handle(message)
            self.service.collect_pool()
            self._flush()
            self.service.save_record_if_due(quiet=False)
        except SessionEnd as end:
            self._end(0 if end.code == 0 else 1)
        except ProtocolError as exc:
            self._protocol_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self._end(3)
        except Exception as exc:
            self._log_internal("session")
            with contextlib.suppress(ProtocolError):
                self.conn.send(m.Goodbye(int(ErrorCode.INTERNAL),
                                         f"internal agent error: {type(exc).__name__}"))
            self._end(4)
        finally:
            self._consumed.set()

    def _handle(self, message: m.Message) -> None:
        self.handled += 1
        try:
            self.service.handle(message)
        except (SessionEnd, ProtocolError):
            raise
        except Exception as exc:
            self._log_internal(f"handling {type(message).__name__}")
            seq = getattr(message, "seq", None)
            if seq is None:
                raise
            self.conn.send(m.Error(seq, int(ErrorCode.INTERNAL),
                                   f"internal agent error: {type(exc).__name__}"))

    def _protocol_error(self, exc: ProtocolError) -> None:
        if exc.code != ErrorCode.CONNECTION_LOST:
            with contextlib.suppress(ProtocolError):
                self.conn.send(m.Goodbye(int(exc.code), exc.message))
        self._stderr.append(f"lsync agent: {exc}")
        self._end(2)

    def _end(self, status: int) -> None:
        """The agent's session is over: answer what it can, close the service, exit."""
        with contextlib.suppress(OSError, ProtocolError):
            self.service.drain_pool()
            self._flush()
        self.service.close()
        self._status = status
        self._readable.set()
        for lane in self.lanes:
            lane.ended.set()

    def _input_ended(self) -> None:
        """The agent reads the end of its input (after whatever was still buffered)."""
        if self._status is not None:
            return
        try:
            self.conn.receive_eof()
        except ProtocolError as exc:
            self._protocol_error(exc)
        else:
            self._end(0)

    # -- data lanes -------------------------------------------------------------------------
    def open_lane(self, delay_turns: int = 0) -> MemoryLane:
        lane = MemoryLane(self, delay_turns)
        self.lanes.append(lane)
        return lane

    def _serve_lane(self, lane: MemoryLane, data: bytes) -> None:
        if self._status is not None or self._dropped:
            return
        try:
            lane.decoder.receive_data(data)
            while True:
                if self._cut_after is not None and self.handled >= self._cut_after:
                    self.cut()
                    return
                message = lane.decoder.next_message()
                if message is None:
                    break
                lane.handled += 1
                lane.kinds[type(message).__name__] += 1
                self._handle(message)
            self.service.collect_pool()
            self._flush()
        except SessionEnd as end:
            self._end(0 if end.code == 0 else 1)
        except ProtocolError as exc:
            self._protocol_error(exc)

    # -- the test's controls --------------------------------------------------------------
    def cut(self) -> None:
        """Drop the connection now, as a dead network would."""
        if self._dropped:
            return
        self._dropped = True
        for lane in self.lanes:
            lane.ended.set()
        self.cuts += 1
        self._inbox.clear()
        self._outbox.clear()
        self._input_ended()
        self._readable.set()
        self._consumed.set()

    def hold_answers(self) -> None:
        """Keep the agent's answers from the client until `release_answers` (the agent
        still applies every write at once): a long link's last round trip, for as long as
        a test needs."""
        self._held = []

    def release_answers(self) -> None:
        held, self._held = self._held, None
        if held and not self._dropped:
            self._outbox.extend(held)
            self._readable.set()

    @property
    def answers_held(self) -> int:
        return len(self._held or ())

    def cut_after(self, messages: int) -> None:
        """Cut once the agent has handled `messages` more messages (0: now)."""
        self._cut_after = self.handled + messages
        if messages <= 0:
            self.cut()

    @property
    def is_cut(self) -> bool:
        return self._dropped

    @property
    def session_over(self) -> bool:
        return self._status is not None

    # -- AgentStream ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._dropped:
            raise ConnectionResetError("the in-memory link was cut")
        if self._status is not None:
            raise BrokenPipeError("the agent has exited")
        self._inbox += data
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._serve)

    def backlog(self) -> int:
        return len(self._inbox)

    async def drain(self) -> None:
        while self._inbox and not self._dropped and self._status is None:
            self._consumed.clear()
            await self._consumed.wait()

    async def read(self) -> bytes:
        while not self._outbox:
            if self._dropped or self._status is not None:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    async def close(self, wait: float = 10.0) -> None:
        """The client closes its side: the agent reads what is left, then the end (it
        runs in this thread, so there is nothing to wait for)."""
        if self._dropped:
            return
        if self._inbox:
            self._serve()
        self._input_ended()

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr[-20:])

    def exit_status(self) -> int | None:
        return self._status


async def open_link(remote: Path, timeout: float) -> tuple[MemoryAgentStream, AgentLink]:
    """An AgentLink to a new in-memory agent serving `remote`, welcomed."""
    stream = MemoryAgentStream()
    link = AgentLink(stream)
    link.start(m.Hello(PROTOCOL_VERSION, {"hash": [hashing.BLAKE2B_128],
                                          "compression": [packing.ZLIB]},
                       str(remote), {"create_root": True}))
    await link.welcome(timeout)
    return stream, link


class MemoryLane:
    """A data lane into a `MemoryAgentStream`'s service (see the module docstring)."""

    def __init__(self, agent: MemoryAgentStream, delay_turns: int) -> None:
        self.agent = agent
        self.delay_turns = delay_turns
        self.decoder = Lane()
        self.handled = 0  # messages the agent handled from this lane
        self.kinds: collections.Counter[str] = collections.Counter()  # ... by message type
        self.ended = asyncio.Event()
        self.write(MAGIC)

    def write(self, data: bytes) -> None:
        if self.agent.is_cut or self.ended.is_set():
            raise ConnectionResetError("the in-memory lane was cut")
        loop = asyncio.get_running_loop()

        def later(turns: int) -> None:
            if turns > 0:
                loop.call_soon(later, turns - 1)
            else:
                self.agent._serve_lane(self, data)

        loop.call_soon(later, self.delay_turns)

    async def drain(self) -> None:
        return None

    def backlog(self) -> int:
        return 0

    async def wait_closed(self) -> str:
        await self.ended.wait()
        return "the in-memory link was cut"

    async def close(self) -> None:
        self.ended.set()
