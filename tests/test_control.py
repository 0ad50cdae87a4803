"""The control socket: where it lives, who may connect, the JSON-lines protocol against a
fake session, streamed runs, and a server that leaves nothing behind when it closes.

Every test uses a real Unix socket in a short private directory under /tmp (a socket path
must fit in 107 bytes). Waits are on events the fake handler sets, bounded by `BOUND`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lsync.client.buildloop.control import (
    MAX_REQUEST_LINE,
    ClientLine,
    ControlError,
    Flush,
    Hello,
    PullRequest,
    Resize,
    RunRequest,
    SendLine,
    Signal,
    Status,
    Stdin,
    StdinEnd,
    decode_output,
    output_lines,
    parse_client_line,
    parse_request,
    request,
    stream,
)
from lsync.client.buildloop.control_server import ControlServer
from lsync.client.buildloop.controlpath import find_socket, socket_path

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
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert not path.exists()

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


# -- where the socket is ------------------------------------------------------------------

@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return runtime, cache


def test_socket_path_is_in_the_runtime_dir(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    runtime, _ = dirs
    root = tmp_path / "src" / "linux"
    root.mkdir(parents=True)
    path = socket_path(root)
    assert path.parent == runtime / "lsync"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.name.startswith("linux-") and path.name.endswith(".sock")
    link = tmp_path / "link"
    link.symlink_to(root)
    assert socket_path(link) == path  # the resolved tree decides
    other = tmp_path / "other" / "linux"
    other.mkdir(parents=True)
    assert socket_path(other) != path


def test_socket_path_falls_back_to_a_private_cache_dir(
        tmp_path: Path, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, cache = dirs
    runtime.chmod(0o777)  # not private: not used
    path = socket_path(tmp_path)
    assert path.parent == cache / "lsync" / "run"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_path(tmp_path) == path


def test_a_directory_others_can_write_is_refused(
        tmp_path: Path, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, cache = dirs
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    run = cache / "lsync" / "run"
    run.mkdir(parents=True)
    run.chmod(0o770)
    with pytest.raises(ControlError) as caught:
        socket_path(tmp_path)
    assert caught.value.code == "unsafe-dir" and "writable by others" in str(caught.value)
    if os.geteuid() == 0:
        run.chmod(0o700)
        os.chown(run, 65534, 65534)
        with pytest.raises(ControlError) as caught:
            socket_path(tmp_path)
        assert "not owned by us" in str(caught.value)


def test_find_socket_walks_up_to_a_live_session(tmp_path: Path,
                                                dirs: tuple[Path, Path]) -> None:
    tree = tmp_path / "tree"
    inner = tree / "sub"
    deep = inner / "a" / "b"
    deep.mkdir(parents=True)
    assert find_socket(deep) is None
    dead_socket(socket_path(inner))  # a dead session of the inner tree...
    assert find_socket(deep) == socket_path(inner)  # ...is the nearest socket file

    async def test(server: ControlServer, session: FakeSession) -> None:
        found = await asyncio.to_thread(find_socket, deep)
        assert found == socket_path(tree)  # ...but a live session above it wins
        assert await asyncio.to_thread(find_socket, deep / "missing.c") == found
        assert await asyncio.to_thread(find_socket, tmp_path) is None

    serve(socket_path(tree), test)


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


# -- the client's errors ------------------------------------------------------------------

def test_no_session(short_dir: Path) -> None:
    path = short_dir / "s.sock"

    async def scenario() -> None:
        with pytest.raises(ControlError) as caught:
            await request(path, {"op": "status"}, BOUND, tree=Path("/src/linux"))
        assert caught.value.code == "no-session"
        assert str(caught.value) == "no running `lsync connect` for /src/linux"
        dead_socket(path)
        with pytest.raises(ControlError) as caught:
            await request(path, {"op": "status"}, BOUND)
        assert caught.value.code == "no-session"
        with pytest.raises(ControlError) as caught:
            async with stream(path, {"op": "run", "argv": ["x"]}):
                pass
        assert caught.value.code == "no-session"

    asyncio.run(scenario())


def test_bad_reply(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    replies = [b"garbage\n", b"[]\n", b'{"v": 7, "ok": true}\n', b""]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(replies.pop(0))
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(answer, str(path))
        try:
            for code in ("bad-reply", "bad-reply", "bad-reply", "closed"):
                with pytest.raises(ControlError) as caught:
                    await request(path, {"op": "status"}, BOUND)
                assert caught.value.code == code
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


# -- the messages, without sockets --------------------------------------------------------

def test_parse_request() -> None:
    assert parse_request(b'{"v":1,"op":"hello"}') == Hello()
    assert parse_request(b'{"v":1,"op":"status"}\n') == Status()
    assert parse_request(b'{"v":1,"op":"flush","timeout":null}') == Flush(None)
    assert parse_request(b'{"v":1,"op":"flush","timeout":2}') == Flush(2.0)
    run = parse_request(json.dumps({
        "v": 1, "op": "run", "argv": ["make", "-j8"], "pty": True, "term": "xterm-256color",
        "cols": 80, "rows": 24, "map_paths": False, "cwd": "/src/linux/drivers",
        "timeout": 30}).encode())
    assert run == RunRequest(argv=("make", "-j8"), pty=True, term="xterm-256color",
                             map_paths=False, cwd="/src/linux/drivers", timeout=30.0)
    assert parse_request(b'{"v":1,"op":"run","argv":["true"]}') == RunRequest(argv=("true",))
    for bad in ({"argv": ["a\u0000b"]}, {"argv": ["x"], "cols": 0}, {"argv": ["x"], "pty": 1},
                {"argv": ["x"], "term": "x; rm"}, {"argv": ["x"], "cwd": "relative"},
                {"argv": [1]}):
        with pytest.raises(ControlError) as caught:
            parse_request(json.dumps({"v": 1, "op": "run", **bad}).encode())
        assert caught.value.code == "bad-request"


def test_parse_client_line() -> None:
    assert parse_client_line(b'{"signal":"INT"}') == Signal("INT")
    assert parse_client_line(b'{"v":1,"resize":[80,24]}') == Resize(80, 24)
    assert parse_client_line(b'{"stdin":"aGk="}') == Stdin(b"hi")
    assert parse_client_line(b'{"eof":true}') == StdinEnd()
    for bad in (b'{"signal":"KILLALL"}', b'{"resize":[80]}', b'{"resize":[true,1]}',
                b'{"stdin":"***"}', b'{"eof":false}', b'{"signal":"INT","eof":true}', b"{}",
                b"nope"):
        with pytest.raises(ControlError):
            parse_client_line(bad)


def test_output_lines_are_chunked_and_round_trip() -> None:
    data = os.urandom(100_000)
    lines = output_lines("err", data)
    assert len(lines) == 4
    decoded = [decode_output(line) for line in lines]
    assert b"".join(d[1] for d in decoded if d is not None) == data
    assert decode_output({"note": "x"}) is None
    with pytest.raises(ValueError):
        output_lines("tty", b"x")


class _AnsweredAlready:
    """A run stream whose session answered and hung up before the client sent its stdin's
    end (a quick command): sending fails, the final answer is still there to read."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def __aenter__(self) -> _AnsweredAlready:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def close_stdin(self) -> None:
        raise ControlError("closed", "the lsync session closed the connection")

    async def signal(self, name: str) -> None:
        raise ControlError("closed", "the lsync session closed the connection")

    async def resize(self, cols: int, rows: int) -> None:
        raise ControlError("closed", "the lsync session closed the connection")

    async def __aiter__(self) -> AsyncIterator[JsonObject]:
        yield {"ok": True, "done": True, "exit": 3}


def test_run_of_a_quick_command_reports_its_status_when_the_session_hung_up_first(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lsync.client.buildloop import commands

    monkeypatch.setattr(commands, "stream", _AnsweredAlready)
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)  # not a terminal
        status = asyncio.run(commands._run_once(tmp_path / "s.sock", tmp_path, ["true"],
                                                None, True))
    assert status == 3
