"""The control socket from the client's side: where the socket lives (and which directories
are refused), the client's errors when no session or a bad one answers, the messages
without sockets, and `lsync run`'s answer when the session hung up first.

Tests that need a server run a real `ControlServer` over the fake session of
tests/controlrig.py on a real Unix socket; waits are bounded by `BOUND`. The server's own
tests are in tests/test_control_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lsync.client.buildloop.control import (
    ControlError,
    Flush,
    Hello,
    Resize,
    RunRequest,
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
from tests.controlrig import BOUND, FakeSession, JsonObject, dead_socket, serve
from tests.controlrig import short_dir as short_dir  # (a fixture)

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
