"""Byte streams to an agent: over an SSH exec channel, or to a local subprocess.

`AgentStream` is the one interface the rest of the client uses; both implementations carry
the bootstrap bundle first and then the protocol. Anything the agent prints on stderr is
collected line by line (it is shown to the user, it never reaches the protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Protocol

import asyncssh

READ_SIZE = 1 << 20


class AgentStream(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    async def read(self) -> bytes: ...  # b"" at end of stream
    async def close(self) -> None: ...
    def stderr_tail(self) -> str: ...
    def exit_status(self) -> int | None: ...


class _StderrTail:
    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=20)

    async def collect(self, reader: asyncio.StreamReader | asyncssh.SSHReader[bytes]) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            self.lines.append(line.decode("utf-8", "replace").rstrip())

    def text(self) -> str:
        return "\n".join(self.lines)


class LocalAgentStream:
    """The agent as a child process of this one (`lsync connect /some/dir`)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._stderr = _StderrTail()
        assert process.stderr is not None
        self._stderr_task = asyncio.ensure_future(self._stderr.collect(process.stderr))

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str] | None = None) -> LocalAgentStream:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, limit=READ_SIZE)
        return cls(process)

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)

    async def drain(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.drain()

    async def read(self) -> bytes:
        assert self.process.stdout is not None
        return await self.process.stdout.read(READ_SIZE)

    async def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stderr_task, 2)
        if not self._stderr_task.done():
            self._stderr_task.cancel()

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def exit_status(self) -> int | None:
        return self.process.returncode


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

    Bytes written before the channel exists are held and go out right behind the exec
    request, without waiting for its reply: the bundle, the Hello and the first operations
    travel in the same flight as the request that starts the agent, so the first reply
    arrives two round trips after authentication (channel open, then exec + data).
    """

    def __init__(self) -> None:
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._early: list[bytes] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._error: Exception | None = None
        self._exit_status: int | None = None
        self._stderr = _StderrTail()
        self._stderr_partial = b""
        self._closed = asyncio.Event()

    async def open(self, conn: asyncssh.SSHClientConnection, command: str, window: int,
                   max_pktsize: int) -> None:
        await conn.create_session(lambda: _AgentSession(self), command, encoding=None,
                                  window=window, max_pktsize=max_pktsize)

    # -- callbacks from _AgentSession ----------------------------------------------------
    def _channel_opened(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan
        # asyncssh sends the exec request right after this callback, before it next yields
        # to the loop; call_soon puts the held bytes behind that request on the wire.
        asyncio.get_running_loop().call_soon(self._send_early)

    def _send_early(self) -> None:
        early, self._early = self._early, []
        if self._chan is not None and early and not self._eof:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._chan.write(b"".join(early))

    def _stdout_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()
        if self._buffered > 8 * READ_SIZE and self._chan is not None:
            self._chan.pause_reading()

    def _stderr_received(self, data: bytes) -> None:
        text = self._stderr_partial + data
        *lines, self._stderr_partial = text.split(b"\n")
        for line in lines:
            self._stderr.lines.append(line.decode("utf-8", "replace").rstrip())

    def _ended(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._readable.set()
        self._writable.set()
        self._closed.set()

    # -- AgentStream ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._chan is None or self._early:
            self._early.append(data)
            return
        try:
            self._chan.write(data)
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionResetError(f"SSH channel closed: {exc}") from None

    async def drain(self) -> None:
        await self._writable.wait()

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

    async def close(self) -> None:
        if self._chan is None:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            self._chan.write_eof()
        try:
            await asyncio.wait_for(self._closed.wait(), 10)
        except asyncio.TimeoutError:
            self._chan.close()

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def exit_status(self) -> int | None:
        return self._exit_status
