"""The local control socket of a running `lsync connect`: `flush`, `status` and `run`.

Where: `lsync.client.buildloop.controlpath` (one socket per local tree, in a private directory).

Who. The socket is made mode 0600 before the server accepts anything (bound, chmod, checked,
and only then listening: a socket that does not listen refuses every connection, so no
process-wide umask change is needed), and on Linux each connection's peer is checked with
SO_PEERCRED: another user gets one `refused` line and is disconnected. A socket file left by
a dead session (connecting is refused) is removed at start; a live one is an error naming
its pid. `close()` removes the socket and the lock file and ends every task it started.

Wire format (version 1): UTF-8 JSON, one object per line (`\\n`), a request line at most
`MAX_REQUEST_LINE` (64 KiB; longer: a `bad-request` reply and the connection is closed),
reply lines at most `MAX_REPLY_LINE` (1 MiB). At most `MAX_CLIENTS` connections at once
(more: a `busy` reply); a connection idle for `IDLE_TIMEOUT` before a request is closed.
Every server line carries `"v": 1`. A line that carries `"ok"` is the last of an exchange;
streamed lines never do (a refusal, `busy` or `refused`, comes as such a line before the
request is read, and the server hangs up). Several requests may follow each other on one
connection, except after `run`. A client that leaves while its request is being answered
cancels the answer (a Ctrl-C'd `lsync flush` holds nothing). The handler keeps a flush's
timeout itself, so that its error can say what is pending; past the timeout plus
`FLUSH_GRACE` the server answers `timeout` on its own.

    → {"v": 1, "op": "hello"}
    ← {"v": 1, "ok": true, "pid": 4242, "ops": ["hello", "status", "flush", "run"]}
    → {"v": 1, "op": "status"}
    ← {"v": 1, "ok": true, "pid": 4242, ...the handler's fields...}
      (with several targets: "hosts": [one object per target, "name" in each])
    → {"v": 1, "op": "flush", "timeout": 10.0}              (timeout: seconds, or null)
      ("target": "arm-box": that target only; default: every target)
    ← {"v": 1, "ok": true, ...the handler's fields...}
    ← {"v": 1, "ok": false, "code": "timeout", "error": "3 paths still pending", ...}
    → {"v": 1, "op": "run", "argv": ["make", "-j8"], "pty": true, "term": "xterm-256color",
       "cols": 80, "rows": 24, "map_paths": true, "cwd": "/home/me/src/linux/drivers",
       "timeout": 30.0}
      ("on": "arm-box": on that target, default the first; "all": true: on every target
      at once, each output line prefixed with "[NAME] ", the exit status the worst)
    ← {"v": 1, "stream": "out", "data": "<base64>"}          (also "err"; any number)
    ← {"v": 1, "note": "waiting for the link to come back"}   (optional, free text)
    ← {"v": 1, "ok": true, "done": true, "exit": 0}          (128+N: killed by signal N)
    ← {"v": 1, "ok": false, "done": true, "code": "...", "error": "..."}
    → {"v": 1, "op": "pull", "patterns": ["build/*.log"], "timeout": null}
      (or "kept": ["src/main.c"]: the newest remote edit of it kept aside, brought back
      beside it as src/main.c.lsync-remote-N; "on": "arm-box": from that target, default
      the first)
    ← {"v": 1, "ok": true, "listed": 3, "pulled": [...], "unchanged": 1, "skipped": {...},
       "failed": {...}, ...}                                 (see lsync.client.buildloop.pull)

A run request requires `argv`; the rest is optional (pty false, term null, 80x24, map_paths
true, cwd null: the tree's root, timeout null: the flush before the command waits as long
as it takes, pull false: with true, the session pulls what its `[pull] paths` select and
the command changed, and says so in a note line, before the final line). After it the
client may send, any number of times, one of:

    → {"signal": "INT"}            (INT TERM HUP QUIT KILL USR1 USR2 ABRT ALRM PIPE)
    → {"resize": [132, 43]}
    → {"stdin": "<base64>"}
    → {"eof": true}                (the command's stdin ends)

A malformed one is answered by a notice line `{"v": 1, "code": "bad-request", "error":
"..."}` (no "ok": the run goes on). The client never half-closes: the end of its lines
means it left, and the handler's `run` is then cancelled (it must stop the command).

Error codes (`ControlError.code`): `bad-request` (malformed or unknown request), `refused`
(another user), `busy` (too many clients; or, at start, another session for this tree),
`timeout`, `internal` (a bug in the session's handler; details go to its log, not to the
peer), `no-session` (no socket, or connecting is refused), `bad-reply` (the peer sent
something that is not this protocol), `closed` (the session hung up mid-exchange),
`unsafe-dir` / `path-too-long` (no safe place for the socket), `client-gone` (raised by
`send_line` to a handler whose client left). A handler answers a failure by raising
`ControlError(code, message)`; its `details` become fields of the error reply.

The server side (`ControlServer`) is in `lsync.client.buildloop.control_server`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import struct
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Union

from lsync.client.errors import LsyncError
from lsync.client.target import NAME
from lsync.protocol.paths import relpath_problem

__all__ = [
    "FLUSH_GRACE", "IDLE_TIMEOUT", "MAX_CLIENTS", "MAX_REPLY_LINE", "MAX_REQUEST_LINE",
    "OUTPUT_CHUNK", "PROTOCOL_VERSION", "SIGNALS", "ClientLine", "ControlError",
    "ControlHandler", "ControlStream", "Flush", "Hello", "JsonObject", "PullRequest",
    "Request", "Resize", "RunRequest", "SendLine", "Signal", "Status",
    "Stdin", "StdinEnd", "decode_output", "encode_line", "output_lines",
    "parse_client_line", "parse_request", "request",
    "stream",
]

PROTOCOL_VERSION = 1
MAX_REQUEST_LINE = 64 * 1024  # a line from a client, newline included
MAX_REPLY_LINE = 1024 * 1024  # a line from the server
MAX_CLIENTS = 16
IDLE_TIMEOUT = 30.0  # seconds a connection may wait before sending a request
FLUSH_GRACE = 5.0  # seconds past a flush's own timeout before the server gives up on it
OUTPUT_CHUNK = 32 * 1024  # bytes of command output per streamed line (before base64)
SIGNALS = frozenset({"INT", "TERM", "HUP", "QUIT", "KILL", "USR1", "USR2", "ABRT", "ALRM",
                     "PIPE"})
_MAX_WINDOW = 10000  # columns or rows
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
m_PULL_PATTERNS = 256  # patterns of one pull request (the agent takes that many rules)

JsonObject = dict[str, object]
SendLine = Callable[[JsonObject], Awaitable[None]]


class ControlError(LsyncError):
    """A control request failed; `code` says how (see the module docstring). `reply` is
    the peer's error reply when there was one; `details` are extra fields for the reply a
    handler's error becomes. Its exit status is LsyncError's (1): a command that wants
    another one for a code (a flush timeout, no session) maps it."""

    def __init__(self, code: str, message: str, *, reply: JsonObject | None = None,
                 details: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply
        self.details: JsonObject = dict(details or {})


# -- messages -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    pass


@dataclass(frozen=True, slots=True)
class Status:
    pass


@dataclass(frozen=True, slots=True)
class Flush:
    timeout: float | None = None
    target: str | None = None  # one target's name; None: every target


@dataclass(frozen=True, slots=True)
class RunRequest:
    argv: tuple[str, ...]
    pty: bool = False
    term: str | None = None
    cols: int = 80
    rows: int = 24
    map_paths: bool = True
    cwd: str | None = None  # absolute local directory to run in (mapped by the handler)
    timeout: float | None = None  # for the flush before the command
    pull: bool = False  # then pull what the [pull] rules select and the command changed
    on: str | None = None  # the target to run on (by name); None: the first
    all: bool = False  # on every target at once, output lines prefixed with its name


@dataclass(frozen=True, slots=True)
class PullRequest:
    patterns: tuple[str, ...] = ()  # gitignore patterns; none: the session's [pull] paths
    timeout: float | None = None  # for waiting for the link
    kept: tuple[str, ...] = ()  # tree paths whose newest kept remote edit to bring back
    on: str | None = None  # the target to pull from (by name); None: the first


Request = Union[Hello, Status, Flush, RunRequest, PullRequest]


@dataclass(frozen=True, slots=True)
class Signal:
    name: str  # one of SIGNALS


@dataclass(frozen=True, slots=True)
class Resize:
    cols: int
    rows: int


@dataclass(frozen=True, slots=True)
class Stdin:
    data: bytes


@dataclass(frozen=True, slots=True)
class StdinEnd:
    pass


ClientLine = Union[Signal, Resize, Stdin, StdinEnd]


class ControlHandler(Protocol):
    """What the session provides. Return values are merged into the `ok` reply; a failure
    is a raised `ControlError`. `run` gets the validated request, `send_line` (streams one
    line to the client: `output_lines` builds output lines; never send "ok" or "done") and
    the client's later lines; it returns the command's exit status. It is cancelled when
    the client leaves or the server closes."""

    async def flush(self, timeout: float | None, target: str | None = None) -> JsonObject: ...

    async def status(self) -> JsonObject: ...

    async def run(self, request: RunRequest, send_line: SendLine,
                  incoming: AsyncIterator[ClientLine]) -> int: ...

    async def pull(self, request: PullRequest) -> JsonObject: ...


def encode_line(message: Mapping[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def _decode_object(line: bytes, code: str) -> JsonObject:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError(code, "not a JSON line") from None
    if not isinstance(value, dict):
        raise ControlError(code, "not a JSON object")
    return value


def _fields(message: JsonObject, allowed: set[str]) -> None:
    unknown = sorted(set(message) - allowed)
    if unknown:
        raise ControlError("bad-request", f"unknown field {unknown[0]!r}")


def _number(message: JsonObject, key: str) -> float | None:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ControlError("bad-request", f"{key!r} must be a number of seconds >= 0 or null")
    return float(value)


def _int(message: JsonObject, key: str, default: int) -> int:
    value = message.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_WINDOW:
        raise ControlError("bad-request", f"{key!r} must be a whole number in 1..{_MAX_WINDOW}")
    return value


def _bool(message: JsonObject, key: str, default: bool) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):
        raise ControlError("bad-request", f"{key!r} must be true or false")
    return value


def _text(message: JsonObject, key: str) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or "\0" in value or len(value) > 4096:
        raise ControlError("bad-request", f"{key!r} must be a string")
    return value


def _name(message: JsonObject, key: str) -> str | None:
    """A target's name (see lsync.client.target.NAME), or None."""
    name = _text(message, key)
    if name is not None and not NAME.fullmatch(name):
        raise ControlError("bad-request", f"{key!r} is not a target name")
    return name


def parse_request(line: bytes) -> Request:
    """One request line as a record; anything else is ControlError("bad-request")."""
    message = _decode_object(line, "bad-request")
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ControlError("bad-request", f"unsupported protocol version {version!r} "
                           f"(this session speaks {PROTOCOL_VERSION})")
    op = message.get("op")
    if op == "hello":
        _fields(message, {"v", "op"})
        return Hello()
    if op == "status":
        _fields(message, {"v", "op"})
        return Status()
    if op == "flush":
        _fields(message, {"v", "op", "timeout", "target"})
        return Flush(_number(message, "timeout"), _name(message, "target"))
    if op == "run":
        _fields(message, {"v", "op", "argv", "pty", "term", "cols", "rows", "map_paths",
                          "cwd", "timeout", "pull", "on", "all"})
        argv = message.get("argv")
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and "\0" not in a for a in argv)):
            raise ControlError("bad-request", "'argv' must be a non-empty list of strings")
        term = _text(message, "term")
        if term is not None and not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", term):
            raise ControlError("bad-request", "'term' is not a terminal type name")
        cwd = _text(message, "cwd")
        if cwd is not None and not cwd.startswith("/"):
            raise ControlError("bad-request", "'cwd' must be an absolute path")
        return RunRequest(
            argv=tuple(argv), pty=_bool(message, "pty", False), term=term,
            cols=_int(message, "cols", 80), rows=_int(message, "rows", 24),
            map_paths=_bool(message, "map_paths", True), cwd=cwd,
            timeout=_number(message, "timeout"), pull=_bool(message, "pull", False),
            on=_name(message, "on"), all=_bool(message, "all", False))
    if op == "pull":
        _fields(message, {"v", "op", "patterns", "timeout", "kept", "on"})
        patterns, kept = message.get("patterns", []), message.get("kept", [])
        if (not isinstance(patterns, list) or len(patterns) > m_PULL_PATTERNS
                or not all(isinstance(p, str) and "\0" not in p and "\n" not in p
                           for p in patterns)):
            raise ControlError("bad-request", "'patterns' must be a list of patterns")
        if (not isinstance(kept, list) or len(kept) > m_PULL_PATTERNS
                or not all(isinstance(p, str) and not relpath_problem(p) for p in kept)):
            raise ControlError("bad-request", "'kept' must be a list of paths in the tree")
        return PullRequest(tuple(patterns), _number(message, "timeout"), tuple(kept),
                           _name(message, "on"))
    raise ControlError("bad-request", f"unknown op {op!r}" if isinstance(op, str)
                       else "missing 'op'")


def parse_client_line(line: bytes) -> ClientLine:
    """One line a client sends during a run; anything else is ControlError("bad-request")."""
    message = _decode_object(line, "bad-request")
    message.pop("v", None)
    if len(message) != 1:
        raise ControlError("bad-request", "expected one of 'signal', 'resize', 'stdin', 'eof'")
    ((key, value),) = message.items()
    if key == "signal":
        if value not in SIGNALS:
            raise ControlError("bad-request", f"unknown signal {value!r}")
        assert isinstance(value, str)
        return Signal(value)
    if key == "resize":
        if (not isinstance(value, list) or len(value) != 2
                or not all(type(n) is int and 1 <= n <= _MAX_WINDOW for n in value)):
            raise ControlError("bad-request", "'resize' must be [cols, rows]")
        return Resize(value[0], value[1])
    if key == "stdin":
        if not isinstance(value, str):
            raise ControlError("bad-request", "'stdin' must be base64 text")
        try:
            return Stdin(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise ControlError("bad-request", "'stdin' must be base64 text") from None
    if key == "eof":
        if value is not True:
            raise ControlError("bad-request", "'eof' must be true")
        return StdinEnd()
    raise ControlError("bad-request", f"unknown field {key!r}")


def output_lines(stream: str, data: bytes) -> list[JsonObject]:
    """Lines carrying `data` of the command's "out" or "err", each within MAX_REPLY_LINE."""
    if stream not in ("out", "err"):
        raise ValueError(f"stream must be 'out' or 'err', not {stream!r}")
    return [{"stream": stream, "data": base64.b64encode(data[i:i + OUTPUT_CHUNK]).decode()}
            for i in range(0, len(data), OUTPUT_CHUNK)]


def decode_output(line: Mapping[str, object]) -> tuple[str, bytes] | None:
    """(stream, data) of an output line; None for any other line."""
    stream, data = line.get("stream"), line.get("data")
    if stream not in ("out", "err") or not isinstance(data, str):
        return None
    assert isinstance(stream, str)
    try:
        return stream, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("bad-reply", "output line with bad base64 data") from None


# -- the client ---------------------------------------------------------------------------

def _no_session(path: Path, tree: Path | None) -> ControlError:
    where = f" for {tree}" if tree is not None else f" (no session at {path})"
    return ControlError("no-session", f"no running `lsync connect`{where}")


async def _open(path: Path, tree: Path | None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(str(path), limit=MAX_REPLY_LINE)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        raise _no_session(path, tree) from None
    except PermissionError:
        raise ControlError("refused", f"not allowed to connect to {path}") from None
    except OSError as exc:
        raise ControlError("no-session", f"cannot connect to {path}: {exc.strerror}") from None


async def _send(writer: asyncio.StreamWriter, message: Mapping[str, object]) -> None:
    """Send a line; a peer that already hung up is noticed when its reply is read (a
    refusal is written before the server closes)."""
    with contextlib.suppress(ConnectionError):
        writer.write(encode_line({"v": PROTOCOL_VERSION, **message}))
        await writer.drain()


async def _read_reply(reader: asyncio.StreamReader) -> JsonObject:
    try:
        line = await reader.readline()
    except ValueError:
        raise ControlError("bad-reply", f"reply line longer than {MAX_REPLY_LINE} bytes"
                           ) from None
    except ConnectionError:
        line = b""
    if not line:
        raise ControlError("closed", "the lsync session closed the connection")
    reply = _decode_object(line, "bad-reply")
    if reply.get("v") != PROTOCOL_VERSION:
        raise ControlError("bad-reply", f"reply of protocol version {reply.get('v')!r}")
    return reply


def _check(reply: JsonObject) -> JsonObject:
    if reply.get("ok") is True:
        return reply
    code, error = reply.get("code"), reply.get("error")
    raise ControlError(code if isinstance(code, str) else "bad-reply",
                       error if isinstance(error, str) else "request failed", reply=reply)


async def request(path: Path, message: Mapping[str, object], timeout: float | None,
                  *, tree: Path | None = None) -> JsonObject:
    """Send one request, return its `ok` reply; a failure reply or any other trouble is a
    ControlError. `timeout` (seconds, None: none) bounds the whole exchange; give a flush
    a little more than its own timeout, so that its reply says what is pending. `tree`
    names the local tree in a no-session error."""

    async def exchange() -> JsonObject:
        reader, writer = await _open(path, tree)
        try:
            await _send(writer, message)
            return _check(await _read_reply(reader))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    if timeout is None:
        return await exchange()
    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise ControlError("timeout", f"no reply from the lsync session in {timeout:g} s"
                           ) from None


class ControlStream:
    """A streamed exchange (`run`): `async with stream(path, message) as lines:` then
    `async for line in lines` (output lines, notices, and the final `ok` line, after which
    iteration stops; a final error is raised as ControlError), sending lines back with
    `signal`, `resize`, `write_stdin`, `close_stdin` (or `send`) meanwhile."""

    def __init__(self, path: Path, message: Mapping[str, object], *, tree: Path | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.path = path
        self.message = dict(message)
        self.tree = tree
        self.connect_timeout = connect_timeout
        self.final: JsonObject | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlStream:
        try:
            reader, writer = await asyncio.wait_for(
                _open(self.path, self.tree), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ControlError("timeout", f"the lsync session at {self.path} does not "
                               "accept connections") from None
        self._reader, self._writer = reader, writer
        await _send(writer, self.message)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[JsonObject]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[JsonObject]:
        if self._reader is None:
            raise RuntimeError("use `async with` first")
        while self.final is None:
            reply = await _read_reply(self._reader)
            if "ok" in reply or reply.get("done") is True:
                self.final = reply
                yield _check(reply)
                return
            yield reply

    async def send(self, line: Mapping[str, object]) -> None:
        if self._writer is None:
            raise RuntimeError("use `async with` first")
        try:
            self._writer.write(encode_line(line))
            await self._writer.drain()
        except ConnectionError:
            raise ControlError("closed", "the lsync session closed the connection") from None

    async def signal(self, name: str) -> None:
        await self.send({"signal": name})

    async def resize(self, cols: int, rows: int) -> None:
        await self.send({"resize": [cols, rows]})

    async def write_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), OUTPUT_CHUNK):
            await self.send({"stdin": base64.b64encode(data[i:i + OUTPUT_CHUNK]).decode()})

    async def close_stdin(self) -> None:
        await self.send({"eof": True})

    async def aclose(self) -> None:
        """Hang up (during a run: the session stops the command)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def stream(path: Path, message: Mapping[str, object], *, tree: Path | None = None,
           connect_timeout: float = 5.0) -> ControlStream:
    """A streamed exchange: use as `async with stream(...) as lines`."""
    return ControlStream(path, message, tree=tree, connect_timeout=connect_timeout)
