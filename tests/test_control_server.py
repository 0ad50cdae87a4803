"""The control socket's server: who may connect, the JSON-lines protocol against a fake
session, streamed runs, and a server that leaves nothing behind when it closes.

Every test uses a real Unix socket in a short private directory under /tmp (a socket path
must fit in 107 bytes). Waits are on events the fake handler (tests/controlrig.py) sets,
bounded by `BOUND`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from lsync.client.buildloop.control import (
    MAX_REQUEST_LINE,
    ControlError,
    Resize,
    Stdin,
    StdinEnd,
    decode_output,
    request,
    stream,
)
from lsync.client.buildloop.control_server import ControlServer
from tests.controlrig import BOUND, FakeSession, JsonObject, dead_socket, exchange, serve
from tests.controlrig import short_dir as short_dir  # (a fixture)

# -- the server ---------------------------------------------------------------------------

def test_socket_mode_and_hello(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        reply = await request(path, {"op": "hello"}, BOUND)
        assert reply == {"v": 1, "ok": True, "pid": os.getpid(),
                         "ops": ["hello", "status", "flush", "run", "pull"]}

    serve(path, test)
    assert not (short_dir / "s.sock.lock").exists()


def test_flush_and_status_round_trips(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    bugs: list[BaseException] = []

    async def test(server: ControlServer, session: FakeSession) -> None:
        assert await request(path, {"op": "flush", "timeout": 10.0}, BOUND) == {
            "v": 1, "ok": True, "flushed": True}
        assert await request(path, {"op": "flush"}, BOUND) == {
            "v": 1, "ok": True, "flushed": True}
        assert session.flushes == [10.0, None]
        assert await request(path, {"op": "status"}, BOUND) == {
            "v": 1, "ok": True, "pid": os.getpid(), "state": "connected", "target": "h:t"}
        with pytest.raises(ControlError) as caught:
            await request(path, {"op": "flush", "timeout": 0}, BOUND)
        assert caught.value.code == "timeout" and str(caught.value) == "2 paths still pending"
        assert caught.value.reply is not None and caught.value.reply["pending"] == 2
        with pytest.raises(ControlError) as caught:
            await request(path, {"op": "flush", "timeout": 1.5}, BOUND)
        assert caught.value.code == "internal" and "bug" not in str(caught.value)
        assert len(bugs) == 1 and isinstance(bugs[0], RuntimeError)
        assert (await request(path, {"op": "status"}, BOUND))["state"] == "connected"

    serve(path, test, on_internal_error=bugs.append)


def test_several_requests_on_one_connection(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        replies = await exchange(path, b'{"v":1,"op":"status"}\n', b'{"v":1,"op":"hello"}\n',
                                 b'{"v":1,"op":"flush","timeout":3}\n')
        assert [r["ok"] for r in replies] == [True, True, True]
        assert replies[0]["state"] == "connected" and replies[2]["flushed"] is True

    serve(path, test)


def test_malformed_requests_get_an_error_reply_and_the_server_goes_on(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        bad = [b"not json\n", b"[1, 2]\n", b'{"op": "status"}\n', b'{"v": 2, "op": "status"}\n',
               b'{"v": true, "op": "status"}\n', b'{"v": 1, "op": "reboot"}\n',
               b'{"v": 1, "op": "flush", "timeout": "soon"}\n',
               b'{"v": 1, "op": "flush", "timeout": -1}\n',
               b'{"v": 1, "op": "status", "extra": 1}\n', b'{"v": 1, "op": "run"}\n',
               b'{"v": 1, "op": "run", "argv": []}\n', b"\xff\xfe\n", b"\n"]
        replies = await exchange(path, *bad, b'{"v":1,"op":"hello"}\n')
        assert len(replies) == len(bad) + 1
        for reply in replies[:-1]:
            assert reply["v"] == 1 and reply["ok"] is False and reply["code"] == "bad-request"
            assert isinstance(reply["error"], str) and reply["error"]
        assert replies[-1]["ok"] is True  # the same connection still serves
        assert (await request(path, {"op": "status"}, BOUND))["ok"] is True  # and a new one

    serve(path, test)


def test_oversize_line_is_refused(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        huge = b'{"v":1,"op":"status","x":"' + b"x" * MAX_REQUEST_LINE + b'"}\n'
        replies = await exchange(path, huge, b'{"v":1,"op":"hello"}\n')
        assert len(replies) == 1  # then the server hung up
        assert replies[0]["code"] == "bad-request" and "longer than" in str(replies[0]["error"])
        assert (await request(path, {"op": "hello"}, BOUND))["ok"] is True

    serve(path, test)


def test_idle_connection_is_closed(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await reader.read() == b""  # the server hung up after idle_timeout
        writer.close()

    serve(path, test, idle_timeout=0.05)


def test_clients_are_bounded(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"v":1,"op":"hello"}\n')
        assert json.loads(await reader.readline())["ok"] is True  # being served now
        with pytest.raises(ControlError) as caught:
            await request(path, {"op": "status"}, BOUND)
        assert caught.value.code == "busy"
        writer.close()

    serve(path, test, max_clients=1)


def test_stale_socket_is_removed(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    dead_socket(path)
    assert stat.S_ISSOCK(path.lstat().st_mode)

    async def test(server: ControlServer, session: FakeSession) -> None:
        assert (await request(path, {"op": "hello"}, BOUND))["pid"] == os.getpid()

    serve(path, test)


def test_live_session_is_detected(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        second = ControlServer(path, FakeSession())
        with pytest.raises(ControlError) as caught:
            await second.start()
        assert caught.value.code == "busy"
        assert str(caught.value) == (
            f"another lsync connect is running for this tree (pid {os.getpid()})")
        assert (await request(path, {"op": "hello"}, BOUND))["ok"] is True  # untouched

    serve(path, test)


def test_live_socket_without_lock_is_detected(short_dir: Path) -> None:
    """A session that answers on the socket (say, of another lsync version) is live."""
    path = short_dir / "s.sock"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"v":1,"ok":true,"pid":4242}\n')
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        other = await asyncio.start_unix_server(answer, str(path))
        try:
            with pytest.raises(ControlError) as caught:
                await ControlServer(path, FakeSession()).start()
            assert caught.value.code == "busy" and "(pid 4242)" in str(caught.value)
            assert path.exists() and not (short_dir / "s.sock.lock").exists()
        finally:
            other.close()
            await other.wait_closed()

    asyncio.run(scenario())


def test_a_file_that_is_not_a_socket_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    path.write_text("mine")

    async def scenario() -> None:
        with pytest.raises(ControlError) as caught:
            await ControlServer(path, FakeSession()).start()
        assert caught.value.code == "unsafe-dir"

    asyncio.run(scenario())
    assert path.read_text() == "mine"


CHILD = """
import json, os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.errno}))
    sys.exit(0)
try:
    sock.sendall(b'{"v":1,"op":"status"}\\n')
except BrokenPipeError:  # refused before it asked: the refusal is still there to read
    pass
print(sock.makefile("rb").readline().decode().strip())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused(short_dir: Path) -> None:
    short_dir.chmod(0o711)  # reachable by uid 65534
    path = short_dir / "s.sock"

    async def as_nobody() -> JsonObject:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(child.communicate(), BOUND)
        assert child.returncode == 0
        result = json.loads(out)
        assert isinstance(result, dict)
        return result

    async def test(server: ControlServer, session: FakeSession) -> None:
        import errno
        assert await as_nobody() == {"connect": errno.EACCES}  # mode 0600 keeps it out
        path.chmod(0o666)  # and were the mode wrong, the peer's uid still would
        reply = await as_nobody()
        assert reply["ok"] is False and reply["code"] == "refused" and reply["v"] == 1
        assert "state" not in reply
        assert (await request(path, {"op": "status"}, BOUND))["ok"] is True

    serve(path, test)


# -- runs ---------------------------------------------------------------------------------

def test_a_quick_commands_answer_survives_the_clients_late_end_of_stdin(
        short_dir: Path) -> None:
    """The command is over, and its answer sent, before the client's next line (the end of
    its stdin, sent right after the request) arrives. The server must not have closed by
    then: the client's write would fail, and asyncio's transport would drop the answer it
    had not read yet (`lsync run -- pwd` exited 125, "the lsync session closed the
    connection", in CI and in the torture run)."""
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        async with stream(path, {"op": "run", "argv": ["echo", "quick"]}) as lines:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + BOUND
            # Until the answer has reached this client (before the fix the server had
            # then closed the connection too).
            while b'"done"' not in bytes(lines._reader._buffer):  # type: ignore[union-attr]
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            with contextlib.suppress(ControlError):
                await lines.close_stdin()
            got = [line async for line in lines]
        assert got[-1] == {"v": 1, "ok": True, "done": True, "exit": 0}

    serve(path, test)


def test_streamed_run(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        message = {"op": "run", "argv": ["echo", "a", "b"], "pty": True, "cols": 100,
                   "rows": 30, "term": "xterm-256color"}
        async with stream(path, message) as lines:
            got = [line async for line in lines]
        assert [decode_output(line) for line in got[:2]] == [("out", b"a\n"), ("out", b"b\n")]
        assert got[2] == {"v": 1, "note": "pty=True 100x30"}
        assert got[3] == {"v": 1, "ok": True, "done": True, "exit": 0}
        assert len(got) == 4 and lines.final == got[3]

    serve(path, test)


def test_run_with_lines_sent_back(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        async with stream(path, {"op": "run", "argv": ["interactive"]}) as lines:
            replies = aiter(lines)
            assert decode_output(await anext(replies)) == ("out", b"ready\n")
            await lines.resize(120, 40)
            assert (await anext(replies))["note"] == repr(Resize(120, 40))
            await lines.write_stdin(b"input\n")
            assert (await anext(replies))["note"] == repr(Stdin(b"input\n"))
            await lines.close_stdin()
            assert (await anext(replies))["note"] == repr(StdinEnd())
            await lines.send({"signal": "NOPE"})  # malformed: a notice, the run goes on
            notice = await anext(replies)
            assert notice["code"] == "bad-request" and "ok" not in notice
            await lines.signal("INT")
            assert decode_output(await anext(replies)) == ("err", b"got INT\n")
            assert await anext(replies) == {"v": 1, "ok": True, "done": True, "exit": 130}
            with pytest.raises(StopAsyncIteration):
                await anext(replies)

    serve(path, test)


def test_run_failures_end_the_stream_with_an_error(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    bugs: list[BaseException] = []

    async def test(server: ControlServer, session: FakeSession) -> None:
        async with stream(path, {"op": "run", "argv": ["fail"]}) as lines:
            with pytest.raises(ControlError) as caught:
                [line async for line in lines]
        assert caught.value.code == "link-down" and caught.value.reply == {
            "v": 1, "ok": False, "done": True, "code": "link-down",
            "error": "the link is down", "since": 3}
        async with stream(path, {"op": "run", "argv": ["bug"]}) as lines:
            with pytest.raises(ControlError) as caught:
                [line async for line in lines]
        assert caught.value.code == "internal" and len(bugs) == 1
        async with stream(path, {"op": "run", "argv": "make"}) as lines:
            with pytest.raises(ControlError) as caught:
                [line async for line in lines]
        assert caught.value.code == "bad-request"

    serve(path, test, on_internal_error=bugs.append)


def test_a_run_cancelled_from_within_still_gets_a_final_answer(short_dir: Path) -> None:
    """A CancelledError out of the handler while the client is still there is a bug, not
    the client leaving: the client is told so (code internal) instead of a hang-up."""
    path = short_dir / "s.sock"
    bugs: list[BaseException] = []

    async def test(server: ControlServer, session: FakeSession) -> None:
        async with stream(path, {"op": "run", "argv": ["cancelled"]}) as lines:
            with pytest.raises(ControlError) as caught:
                [line async for line in lines]
        assert caught.value.code == "internal", caught.value
        assert len(bugs) == 1

    serve(path, test, on_internal_error=bugs.append)


def test_client_leaving_mid_run_cancels_the_handler(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        async with stream(path, {"op": "run", "argv": ["forever"]}):
            await session.started.wait()
        await session.cancelled.wait()  # reached the handler as a cancellation

    serve(path, test)


def test_client_leaving_mid_flush_cancels_the_flush(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def test(server: ControlServer, session: FakeSession) -> None:
        with pytest.raises(ControlError) as caught:
            await request(path, {"op": "flush", "timeout": 99}, 0.2)
        assert caught.value.code == "timeout"
        await session.cancelled.wait()

    serve(path, test)


def test_close_ends_runs_leaves_no_task_and_removes_the_socket(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def scenario() -> None:
        session = FakeSession()
        server = ControlServer(path, session)
        await server.start()
        async with stream(path, {"op": "run", "argv": ["forever"]}) as lines:
            await asyncio.wait_for(session.started.wait(), BOUND)
            assert server.clients == 1
            await server.close()
            assert session.cancelled.is_set()
            assert server.clients == 0
            assert asyncio.all_tasks() == {asyncio.current_task()}
            assert not path.exists() and not (short_dir / "s.sock.lock").exists()
            with pytest.raises(ControlError) as caught:
                [line async for line in lines]
            assert caught.value.code == "closed"
        await server.close()  # idempotent

    asyncio.run(scenario())


