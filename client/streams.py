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


class SshAgentStream:
    """The agent on the far end of an SSH exec channel."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self.process = process
        self._stderr = _StderrTail()
        self._stderr_task = asyncio.ensure_future(self._stderr.collect(process.stderr))

    def write(self, data: bytes) -> None:
        self.process.stdin.write(data)

    async def drain(self) -> None:
        await self.process.stdin.drain()

    async def read(self) -> bytes:
        return await self.process.stdout.read(READ_SIZE)

    async def close(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self.process.stdin.write_eof()
        try:
            await asyncio.wait_for(self.process.wait_closed(), 10)
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            self.process.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stderr_task, 2)
        if not self._stderr_task.done():
            self._stderr_task.cancel()

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def exit_status(self) -> int | None:
        return self.process.exit_status
