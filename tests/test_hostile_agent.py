"""A broken or hostile agent must not hurt the client (issue 11 items 9-11).

The client's `AgentLink` talks to a fake agent through an in-memory stream: a real
`Connection(AGENT)` that reads what the client sends and answers with well-framed but wrong
replies — a manifest naming "" or "../x", an endless manifest, fewer digests than paths, an
Ack where Hashes were asked for, a Welcome choosing what was never offered, a stderr flood
without newlines. Each must end the link with a clear `LinkBroken`/`ConnectError` quickly,
in bounded memory, never a hang or an internal error.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import pytest

from lsync.client.errors import ConnectError, LinkBroken
from lsync.client.transport import link as link_module
from lsync.client.transport.link import AgentLink
from lsync.client.transport.streams import _StderrTail
from lsync.protocol import PROTOCOL_VERSION, hashing
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, Connection

BOUND = 5.0  # seconds any of these may take

Script = Callable[["FakeAgent", m.Message], list[m.Message]]


class FakeAgent:
    """An `AgentStream` whose other end is a scripted agent speaking the real framing."""

    def __init__(self, script: Script) -> None:
        self.conn = Connection(AGENT)
        self.script = script
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()

    def write(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while (message := self.conn.next_message()) is not None:
            for reply in self.script(self, message):
                self.conn.send(reply)
        out = self.conn.data_to_send()
        if out:
            self.incoming.put_nowait(out)

    async def drain(self) -> None:
        pass

    def backlog(self) -> int:
        return 0

    async def read(self) -> bytes:
        return await self.incoming.get()

    async def close(self, wait: float = 10.0) -> None:
        self.incoming.put_nowait(b"")

    def stderr_tail(self) -> str:
        return ""

    def exit_status(self) -> int | None:
        return None


def welcome(chosen_hash: str = hashing.XXH3_128) -> m.Welcome:
    return m.Welcome(PROTOCOL_VERSION, {"hash": chosen_hash, "compression": "zlib"},
                     {"root": "/r", "python": "3.6.15", "pid": "1"})


def hello() -> m.Hello:
    return m.Hello(PROTOCOL_VERSION, {"hash": [hashing.XXH3_128], "compression": ["zlib"]},
                   "tree", {"create_root": True})


def answering(**replies: Callable[[Any], list[m.Message]]) -> Script:
    """A script that welcomes the client and answers each message type as given."""
    def script(agent: FakeAgent, message: m.Message) -> list[m.Message]:
        if isinstance(message, m.Hello):
            return [welcome()]
        handler = replies.get(type(message).__name__)
        return handler(message) if handler is not None else []
    return script


async def _started(script: Script) -> AgentLink:
    link = AgentLink(FakeAgent(script))
    link.start(hello())
    await link.welcome(BOUND)
    return link


async def _collect(link: AgentLink) -> list[list[Any]]:
    entries: list[list[Any]] = []
    async for batch in link.list_tree():
        entries.extend(batch)
    return entries


@pytest.mark.parametrize("bad_path", ["", "../outside", "/etc", "a/../../b", "x\x00y"])
def test_manifest_naming_a_bad_path_breaks_the_link(bad_path: str) -> None:
    async def run() -> None:
        link = await _started(answering(ListTree=lambda msg: [
            m.ManifestBatch(msg.seq, [[bad_path, m.KIND_DIR, 0, 0, 0o755, None, None, b""]],
                            True)]))
        with pytest.raises(LinkBroken, match="bad path"):
            await asyncio.wait_for(_collect(link), BOUND)

    asyncio.run(run())


def test_endless_manifest_is_refused_in_bounded_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "MAX_MANIFEST_ENTRIES", 10_000)
    batch = [[f"f{i}", m.KIND_FILE, 1, 0, 0o644, None, None, None] for i in range(1000)]

    async def run() -> None:
        link = await _started(answering(ListTree=lambda msg: [
            m.ManifestBatch(msg.seq, batch, False) for _ in range(50)]))
        with pytest.raises(LinkBroken, match="more than 10000 entries"):
            await asyncio.wait_for(_collect(link), BOUND)

    asyncio.run(run())


def test_fewer_digests_than_paths_breaks_the_link() -> None:
    async def run() -> None:
        link = await _started(answering(HashPaths=lambda msg: [m.Hashes(msg.seq, [None])]))
        with pytest.raises(LinkBroken, match="1 digests for 3 paths"):
            await asyncio.wait_for(link.hash_paths(["a", "b", "c"]), BOUND)

    asyncio.run(run())


def test_an_ack_where_hashes_were_asked_breaks_the_link() -> None:
    async def run() -> None:
        link = await _started(answering(HashPaths=lambda msg: [m.Ack(msg.seq, 0, "")]))
        with pytest.raises(LinkBroken, match="Ack answered request"):
            await asyncio.wait_for(link.hash_paths(["a"]), BOUND)

    asyncio.run(run())


def test_welcome_choosing_a_hash_never_offered_is_refused() -> None:
    def script(agent: FakeAgent, message: m.Message) -> list[m.Message]:
        return [welcome(chosen_hash="md5")] if isinstance(message, m.Hello) else []

    async def run() -> None:
        link = AgentLink(FakeAgent(script))
        link.start(hello())
        with pytest.raises((LinkBroken, ConnectError)):
            await link.welcome(BOUND)
        assert link.failure is not None and "not offered" in str(link.failure)

    asyncio.run(run())


def test_stderr_flood_without_newlines_keeps_a_bounded_tail() -> None:
    class Flood:
        def __init__(self, chunks: int) -> None:
            self.left = chunks

        async def read(self, size: int) -> bytes:
            if not self.left:
                return b""
            self.left -= 1
            return b"x" * size

    async def run() -> None:
        tail = _StderrTail()
        await asyncio.wait_for(tail.collect(Flood(800)),  # type: ignore[arg-type]
                               BOUND)  # 50 MiB, no newline
        assert len(tail.text()) <= _StderrTail.LINE_MAX

    asyncio.run(run())


def test_liveness_pings_stop_once_goodbye_is_sent_and_late_work_is_refused() -> None:
    """A stop says goodbye and waits for the agent's: a ping (or an operation) sent in
    that window used to raise a ProtocolError out of the session (exit 70)."""

    async def run() -> None:
        link = await _started(answering())  # never answers Goodbye nor Ping
        liveness = asyncio.ensure_future(link.watch_liveness(every=0.01, stall=60, tick=0.01))
        closing = asyncio.ensure_future(link.close("user stopped lsync"))
        await asyncio.sleep(0.1)  # the window in which pings used to be sent after Goodbye
        with pytest.raises(LinkBroken, match="closing"):
            link.submit(m.Mkdir(link.next_seq(), "late", 0o755))
        await asyncio.wait_for(liveness, BOUND)  # ends by itself, without an exception
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)

    asyncio.run(run())


@pytest.mark.parametrize("garbage", [
    "import sys\nwhile True: sys.stdout.write('x' * 65536); sys.stdout.flush()",
    "import os, sys, time\nsys.stdout.write('not lsync\\n'); sys.stdout.flush(); "
    "os.close(2); time.sleep(60)",
], ids=["endless-garbage", "garbage-then-silence"])
def test_an_agent_printing_garbage_ends_the_link_and_is_reaped_quickly(garbage: str) -> None:
    """A remote shell or program that writes something else than the protocol on the
    agent's stdout: the link fails with a clear reason (no magic within 64 KiB, or no
    Welcome in time) and the process is gone when the link is closed."""
    from lsync.client.transport.streams import LocalAgentStream

    async def run() -> None:
        stream = LocalAgentStream()
        link = AgentLink(stream)
        link.start(hello())
        await stream.launch(lambda initial: [sys.executable, "-c", garbage], 0)
        with pytest.raises((LinkBroken, ConnectError)):
            await link.welcome(2.0)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(link.close("test over"), BOUND)
        assert asyncio.get_running_loop().time() - started < BOUND
        assert stream.process is not None and stream.process.returncode is not None

    asyncio.run(run())


def test_an_agent_that_stops_answering_breaks_the_link_within_the_stall_bound(
        tmp_path: Any) -> None:
    """A real agent stopped dead (SIGSTOP: its process lives, its pipe stays open) while a
    request is outstanding: the liveness watch ends the link with a clear reason after
    `stall` seconds of silence, instead of waiting for ever (issue 11 item 6)."""
    import os
    import signal

    from lsync.client.transport.bootstrap import MAX_INITIAL, local_argv
    from lsync.client.transport.streams import LocalAgentStream

    async def run() -> None:
        stream = LocalAgentStream()
        link = AgentLink(stream)
        link.start(m.Hello(PROTOCOL_VERSION, {"hash": [hashing.XXH3_128],
                                              "compression": ["zlib"]},
                           str(tmp_path / "remote"), {"create_root": True}))
        await stream.launch(local_argv, MAX_INITIAL,
                            env={**os.environ, "HOME": str(tmp_path)})
        await link.welcome(BOUND)
        assert stream.process is not None
        os.kill(stream.process.pid, signal.SIGSTOP)
        try:
            reply = link.submit(m.Mkdir(link.next_seq(), "d", 0o755))
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(link.watch_liveness(every=0.1, stall=1.0, tick=0.1), BOUND)
            assert 1.0 <= asyncio.get_running_loop().time() - started < 3.0
            assert link.failure is not None and "no answer from the agent" in str(link.failure)
            with pytest.raises(LinkBroken):
                await reply
        finally:
            os.kill(stream.process.pid, signal.SIGCONT)
            await link.close("test over")

    asyncio.run(run())
