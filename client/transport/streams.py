"""Byte streams to an agent: over an SSH exec channel, or to a local subprocess.

`AgentStream` is the one interface the rest of the client uses. Both implementations hold
what is written before the agent exists and hand it to the agent's command line when they
start it (see `lsync.client.transport.bootstrap`); stdin carries the rest of the protocol. What the
agent prints on stderr is collected line by line for error messages, apart from the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncssh

# (connection, session factory, command, window, max packet size): opens the session
CreateSession = Callable[[asyncssh.SSHClientConnection, Callable[[], Any], str, int, int],
                         Awaitable[None]]

READ_SIZE = 1 << 20
# Writes buffer up to WRITE_HIGH before drain() waits, and drain() returns below WRITE_LOW:
# the agent always has work queued while the client prepares the next files.
WRITE_HIGH = 8 << 20
WRITE_LOW = 2 << 20


class AgentStream(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def backlog(self) -> int: ...  # bytes written and not yet sent
    async def read(self) -> bytes: ...  # b"" at end of stream
    async def close(self, wait: float = 10.0) -> None: ...  # wait: for a clean end
    def stderr_tail(self) -> str: ...
    def exit_status(self) -> int | None: ...


async def _discard(reader: asyncio.StreamReader | None) -> None:
    while reader is not None and await reader.read(READ_SIZE):
        pass


class _StderrTail:
    """The last lines the agent wrote to stderr, in bounded memory and linear time whatever
    it writes: at most MAX_LINES lines of at most LINE_MAX characters (a flood without
    newlines keeps only its last LINE_MAX). Fed chunk by chunk (`feed`, from an SSH channel's
    callback) or from a reader (`collect`, a local agent's pipe)."""

    LINE_MAX = 2000
    MAX_LINES = 20

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=self.MAX_LINES)
        self.partial = b""  # the unfinished last line, at most LINE_MAX bytes

    def feed(self, data: bytes) -> None:
        *complete, rest = (self.partial + data).split(b"\n")
        for line in complete[-self.MAX_LINES:]:
            self.lines.append(line[-self.LINE_MAX:].decode("utf-8", "replace").rstrip())
        self.partial = rest[-self.LINE_MAX:]

    def end(self) -> None:
        """The stream ended: an unfinished last line counts as a line."""
        if self.partial:
            self.lines.append(self.partial.decode("utf-8", "replace").rstrip())
            self.partial = b""

    async def collect(self, reader: asyncio.StreamReader | asyncssh.SSHReader[bytes]) -> None:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                self.end()
                return
            self.feed(data)

    def text(self) -> str:
        return "\n".join(self.lines)


class _EarlyBytes:
    """Bytes written before the agent exists: the first part rides on its command line."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def take(self, limit: int) -> bytes:
        data = b"".join(self.parts)
        self.parts = [data[limit:]] if len(data) > limit else []
        return data[:limit]

    def rest(self) -> bytes:
        data = b"".join(self.parts)
        self.parts = []
        return data


class LocalAgentStream:
    """The agent as a child process of this one (`lsync connect /some/dir`)."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self._early = _EarlyBytes()
        self._stderr = _StderrTail()
        self._stderr_task: asyncio.Future[None] | None = None
        self._started = asyncio.Event()

    async def launch(self, argv_for: Callable[[bytes], list[str]], max_initial: int,
                     env: dict[str, str] | None = None) -> None:
        """Start the agent; bytes written so far go on its command line (then stdin)."""
        self.process = await asyncio.create_subprocess_exec(
            *argv_for(self._early.take(max_initial)), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            limit=READ_SIZE)
        assert self.process.stderr is not None and self.process.stdin is not None
        self.process.stdin.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self._stderr_task = asyncio.ensure_future(self._stderr.collect(self.process.stderr))
        self._started.set()
        rest = self._early.rest()
        if rest:
            self.write(rest)

    def write(self, data: bytes) -> None:
        if self.process is None:
            self._early.parts.append(data)
            return
        assert self.process.stdin is not None
        self.process.stdin.write(data)

    async def drain(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            await self.process.stdin.drain()

    def backlog(self) -> int:
        if self.process is None or self.process.stdin is None:
            return 0
        return self.process.stdin.transport.get_write_buffer_size()

    async def read(self) -> bytes:
        await self._started.wait()
        assert self.process is not None and self.process.stdout is not None
        return await self.process.stdout.read(READ_SIZE)

    async def close(self, wait: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        # Whatever the agent still writes is read and dropped: asyncio reports the process
        # ended only once its pipes are closed, and a full stdout pipe nobody reads (an
        # agent printing garbage) would keep it waiting for ever.
        drain = asyncio.ensure_future(_discard(self.process.stdout))
        try:
            await asyncio.wait_for(self.process.wait(), wait)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stderr_task, 2)
            if not self._stderr_task.done():
                self._stderr_task.cancel()

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def exit_status(self) -> int | None:
        return self.process.returncode if self.process is not None else None


class _AgentSession(asyncssh.SSHClientSession[bytes]):
    """asyncssh callbacks of the agent's exec channel, kept by `SshAgentStream`."""

    def __init__(self, stream: SshAgentStream) -> None:
        self.stream = stream

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.stream._channel_opened(chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stream._stderr_received(data)
        else:
            self.stream._stdout_received(data)

    def eof_received(self) -> bool:
        self.stream._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._ended(exc)

    def pause_writing(self) -> None:
        self.stream._writable.clear()

    def resume_writing(self) -> None:
        self.stream._writable.set()

    def exit_status_received(self, status: int) -> None:
        self.stream._exit_status = status


class SshAgentStream:
    """The agent on the far end of an SSH exec channel.

    Bytes written before the channel exists ride on the exec request's command line (see
    `lsync.client.transport.bootstrap`), so the agent answers the Hello two round trips after
    authentication: one to open the channel, one for the exec and its answer.
    """

    def __init__(self) -> None:
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._early = _EarlyBytes()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._error: Exception | None = None
        self._exit_status: int | None = None
        self._stderr = _StderrTail()
        self._closed = asyncio.Event()

    async def open(self, conn: asyncssh.SSHClientConnection,
                   command_for: Callable[[bytes], str], max_initial: int, window: int,
                   max_pktsize: int, create_session: CreateSession | None = None) -> None:
        """Start `command_for(the first bytes written)` in a session channel of `conn`
        (`create_session`: how; asyncssh's own way by default)."""
        command = command_for(self._early.take(max_initial))
        if create_session is not None:
            await create_session(conn, lambda: _AgentSession(self), command, window,
                                 max_pktsize)
        else:
            await conn.create_session(lambda: _AgentSession(self), command, encoding=None,
                                      window=window, max_pktsize=max_pktsize)
        rest = self._early.rest()
        if rest:
            self.write(rest)

    # -- callbacks from _AgentSession ----------------------------------------------------
    def _channel_opened(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan
        chan.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def _stdout_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()
        if self._buffered > 8 * READ_SIZE and self._chan is not None:
            self._chan.pause_reading()

    def _stderr_received(self, data: bytes) -> None:
        self._stderr.feed(data)

    def _ended(self, exc: Exception | None) -> None:
        self._stderr.end()
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._readable.set()
        self._writable.set()
        self._closed.set()

    # -- AgentStream ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._chan is None or self._early.parts:
            self._early.parts.append(data)
            return
        try:
            self._chan.write(data)
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionResetError(f"SSH channel closed: {exc}") from None

    async def drain(self) -> None:
        await self._writable.wait()

    def backlog(self) -> int:
        return self._chan.get_write_buffer_size() if self._chan is not None else 0

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise ConnectionResetError(str(self._error))
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered <= READ_SIZE and self._chan is not None:
            self._chan.resume_reading()
        return data

    async def close(self, wait: float = 10.0) -> None:
        if self._chan is None:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            self._chan.write_eof()
        try:
            await asyncio.wait_for(self._closed.wait(), wait)
        except asyncio.TimeoutError:
            self._chan.close()

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def exit_status(self) -> int | None:
        return self._exit_status
