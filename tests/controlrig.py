"""The rig of the control-socket tests: a fake session behind a real `ControlServer`.

`FakeSession` is a handler whose behaviour is chosen by the request (a flush timeout, the
run's argv[0]): it answers, fails with a coded error, hits a bug, or waits until it is
cancelled (`started` and `cancelled` are the events the tests wait on, bounded by `BOUND`).
`serve` runs a test against a started server and then checks that closing it left no task
and no socket file; `exchange` sends raw lines on one connection and collects the replies;
`dead_socket` leaves a socket file nobody listens on, as a killed session does. The
fixture `short_dir` is a short private directory under /tmp (a socket path must fit in 107
bytes). Used by tests/test_control.py and tests/test_control_server.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lsync.client.buildloop.control import (
    ClientLine,
    ControlError,
    PullRequest,
    RunRequest,
    SendLine,
    Signal,
    output_lines,
)
from lsync.client.buildloop.control_server import ControlServer

BOUND = 10.0  # seconds: no wait in these tests should come near it
JsonObject = dict[str, object]


class FakeSession:
    """A handler whose behaviour is chosen by the request (a flush timeout, argv[0])."""

    def __init__(self) -> None:
        self.flushes: list[float | None] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def flush(self, timeout: float | None, target: str | None = None) -> JsonObject:
        self.flushes.append(timeout)
        if timeout == 0:
            raise ControlError("timeout", "2 paths still pending", details={"pending": 2})
        if timeout == 1.5:
            raise RuntimeError("a bug in the session")
        if timeout == 99:
            await self._forever()
        return {"flushed": True}

    async def status(self) -> JsonObject:
        return {"state": "connected", "target": "h:t"}

    async def pull(self, request: PullRequest) -> JsonObject:
        return {"listed": len(request.patterns), "pulled": list(request.patterns)}

    async def run(self, request: RunRequest, send_line: SendLine,
                  incoming: AsyncIterator[ClientLine]) -> int:
        command = request.argv[0]
        if command == "echo":
            for word in request.argv[1:]:
                for line in output_lines("out", word.encode() + b"\n"):
                    await send_line(line)
            await send_line({"note": f"pty={request.pty} {request.cols}x{request.rows}"})
            return 0
        if command == "interactive":  # reports what the client sends until a signal
            for line in output_lines("out", b"ready\n"):
                await send_line(line)
            async for item in incoming:
                if isinstance(item, Signal):
                    await send_line(output_lines("err", f"got {item.name}\n".encode())[0])
                    return 128 + 2
                await send_line({"note": repr(item)})
            return 1
        if command == "forever":
            await self._forever()
        if command == "fail":
            raise ControlError("link-down", "the link is down", details={"since": 3})
        if command == "cancelled":  # a cancellation that escaped something it awaited
            raise asyncio.CancelledError
        raise RuntimeError("a bug in the session's run")

    async def _forever(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lsc", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve(path: Path, test: Callable[[ControlServer, FakeSession], Awaitable[None]],
          **options: object) -> None:
    """Run `test` against a started server on `path`; afterwards the server is closed and
    no task is left."""

    async def scenario() -> None:
        session = FakeSession()
        server = ControlServer(path, session, **options)  # type: ignore[arg-type]
        await server.start()
        try:
            await asyncio.wait_for(test(server, session), BOUND)
        finally:
            await server.close()
        left = asyncio.all_tasks() - {asyncio.current_task()}
        assert not left, f"tasks left after the server closed: {left}"
        assert not path.exists(), f"{path} left after the server closed"

    asyncio.run(scenario())


async def exchange(path: Path, *lines: bytes) -> list[JsonObject]:
    """Send raw lines on one connection, then read replies until the server hangs up or
    one reply per line has come."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        replies: list[JsonObject] = []
        for line in lines:
            try:
                writer.write(line)
                await writer.drain()
                reply = await reader.readline()
            except ConnectionError:  # the server hung up earlier
                break
            if not reply:
                break
            replies.append(json.loads(reply))
        return replies
    finally:
        writer.close()


def dead_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed session leaves it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))

