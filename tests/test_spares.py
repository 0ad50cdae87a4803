"""The build loop's spare command channels (`lsync.client.buildloop.loop.Spares`): a spare is kept
per connection and kind; one that failed or was cancelled is just no spare (never the
command's failure); spares of an earlier connection are closed, never handed to a command
on a later one; the caller's own cancellation still goes through."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncssh
import pytest

from lsync.client.buildloop.control import RunRequest
from lsync.client.buildloop.loop import Spares


class FakeProcess:
    def __init__(self) -> None:
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.closed = False
        self.stdin = self

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class FakeConnection:
    """`create_process` returns what the test puts in `opens` (a future it resolves)."""

    def __init__(self) -> None:
        self.opens: list[asyncio.Future[Any]] = []

    async def create_process(self, command: str, **kwargs: object) -> Any:
        opened: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.opens.append(opened)
        return await opened


def _conn(fake: FakeConnection) -> asyncssh.SSHClientConnection:
    return cast(asyncssh.SSHClientConnection, fake)


REQUEST = RunRequest(argv=("make",))


def test_a_warmed_spare_is_taken_once() -> None:
    async def run() -> None:
        spares, conn = Spares(), FakeConnection()
        spares.warm(_conn(conn), REQUEST)
        await asyncio.sleep(0)
        process = FakeProcess()
        conn.opens[0].set_result(process)
        taken: object = await spares.take(_conn(conn), REQUEST)
        assert taken is process
        assert await spares.take(_conn(conn), REQUEST) is None
        await spares.close()

    asyncio.run(run())


@pytest.mark.parametrize("how", ["cancelled", "error", "oserror"])
def test_a_spare_that_failed_to_open_is_no_spare(how: str) -> None:
    async def run() -> None:
        spares, conn = Spares(), FakeConnection()
        spares.warm(_conn(conn), REQUEST)
        await asyncio.sleep(0)
        if how == "cancelled":
            conn.opens[0].cancel()
        elif how == "error":
            conn.opens[0].set_exception(asyncssh.ChannelOpenError(2, "refused"))
        else:
            conn.opens[0].set_exception(BrokenPipeError())
        assert await spares.take(_conn(conn), REQUEST) is None
        await spares.close()

    asyncio.run(run())


def test_spares_of_an_earlier_connection_are_closed_and_never_handed_out() -> None:
    async def run() -> None:
        spares, old, new = Spares(), FakeConnection(), FakeConnection()
        spares.warm(_conn(old), REQUEST)
        await asyncio.sleep(0)
        stale = FakeProcess()
        old.opens[0].set_result(stale)
        await asyncio.sleep(0)
        assert await spares.take(_conn(new), REQUEST) is None  # nothing for the new one
        await asyncio.sleep(0)
        assert stale.closed
        assert await spares.take(_conn(old), REQUEST) is None  # and it is gone
        await spares.close()

    asyncio.run(run())


def test_the_callers_cancellation_goes_through_and_closes_the_spare() -> None:
    async def run() -> None:
        spares, conn = Spares(), FakeConnection()
        spares.warm(_conn(conn), REQUEST)
        await asyncio.sleep(0)
        taking = asyncio.ensure_future(spares.take(_conn(conn), REQUEST))
        await asyncio.sleep(0)
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        await asyncio.sleep(0)
        assert conn.opens[0].cancelled()
        await spares.close()

    asyncio.run(run())
