"""The local control socket of a running `lsync connect`: `flush`, `status` and `run`.

Where. One Unix socket per local tree, in `$XDG_RUNTIME_DIR/lsync/` when that is set and
ours (owned by us, not group- or world-writable), else in `~/.cache/lsync/run/` (honouring
`$XDG_CACHE_HOME`; created mode 0700; a directory not owned by us or group/world-writable
is refused). The file name is a readable tail of the tree's name and a hash of its resolved
path (`linux-3f2a9c0d1e5b7a64.sock`), so `find_socket` finds the session from any
directory inside the tree by walking up. A lock file beside it (`….lock`, flock) is held
for the session's lifetime: two sessions cannot race for one tree.

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
    → {"v": 1, "op": "flush", "timeout": 10.0}              (timeout: seconds, or null)
    ← {"v": 1, "ok": true, ...the handler's fields...}
    ← {"v": 1, "ok": false, "code": "timeout", "error": "3 paths still pending", ...}
    → {"v": 1, "op": "run", "argv": ["make", "-j8"], "pty": true, "term": "xterm-256color",
       "cols": 80, "rows": 24, "map_paths": true, "cwd": "/home/me/src/linux/drivers",
       "timeout": 30.0}
    ← {"v": 1, "stream": "out", "data": "<base64>"}          (also "err"; any number)
    ← {"v": 1, "note": "waiting for the link to come back"}   (optional, free text)
    ← {"v": 1, "ok": true, "done": true, "exit": 0}          (128+N: killed by signal N)
    ← {"v": 1, "ok": false, "done": true, "code": "...", "error": "..."}

A run request requires `argv`; the rest is optional (pty false, term null, 80x24, map_paths
true, cwd null: the tree's root, timeout null: the flush before the command waits as long
as it takes). After it the client may send, any number of times, one of:

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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import struct
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Union

from lsync.client.errors import LsyncError, log_dir

__all__ = [
    "FLUSH_GRACE", "IDLE_TIMEOUT", "MAX_CLIENTS", "MAX_REPLY_LINE", "MAX_REQUEST_LINE",
    "OUTPUT_CHUNK", "PROTOCOL_VERSION", "SIGNALS", "ClientLine", "ControlError",
    "ControlHandler", "ControlServer", "ControlStream", "Flush", "Hello", "JsonObject",
    "PeerCredentials", "Request", "Resize", "RunRequest", "SendLine", "Signal", "Status",
    "Stdin", "StdinEnd", "decode_output", "encode_line", "find_socket", "output_lines",
    "parse_client_line", "parse_request", "peer_credentials", "request", "socket_path",
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
_SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the terminating NUL (Linux)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

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


Request = Union[Hello, Status, Flush, RunRequest]


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

    async def flush(self, timeout: float | None) -> JsonObject: ...

    async def status(self) -> JsonObject: ...

    async def run(self, request: RunRequest, send_line: SendLine,
                  incoming: AsyncIterator[ClientLine]) -> int: ...


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
        _fields(message, {"v", "op", "timeout"})
        return Flush(_number(message, "timeout"))
    if op == "run":
        _fields(message, {"v", "op", "argv", "pty", "term", "cols", "rows", "map_paths",
                          "cwd", "timeout"})
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
            timeout=_number(message, "timeout"))
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


# -- where the socket is ------------------------------------------------------------------

def _private_problem(path: Path, *, follow: bool) -> str:
    """'' when `path` is a directory owned by us that nobody else can write; else why not."""
    try:
        st = path.stat() if follow else path.lstat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} is not owned by us (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _private_dir(path: Path, *, create: bool) -> str:
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            return f"{path}: cannot create: {exc.strerror}"
    return _private_problem(path, follow=False)


def _socket_dirs(*, create: bool, problems: list[str]) -> Iterator[Path]:
    """The usable socket directories, best first (each created when `create` and checked
    when reached); why the others are not usable is appended to `problems`. Without
    `create` (looking for a session) `/run/user/UID` stands in for an unset
    XDG_RUNTIME_DIR, which a second terminal (su, tmux, ssh) may lack."""
    runtimes = [os.environ.get("XDG_RUNTIME_DIR", "")]
    if not create:
        runtimes.append(f"/run/user/{os.geteuid()}")
    seen: set[str] = set()
    for runtime in runtimes:
        if not runtime or not os.path.isabs(runtime) or runtime in seen:
            continue
        seen.add(runtime)
        if not create and not os.path.isdir(os.path.join(runtime, "lsync")):
            continue
        problem = _private_problem(Path(runtime), follow=True)
        if not problem:
            problem = _private_dir(Path(runtime) / "lsync", create=create)
        if problem:
            problems.append(problem)
        else:
            yield Path(runtime) / "lsync"
    cache = log_dir() / "run"
    problem = _private_dir(cache, create=create)
    if problem:
        problems.append(problem)
    else:
        yield cache


def _socket_name(root: Path) -> tuple[str, str]:
    """(readable name, short name) of the socket of the tree at `root` (resolved)."""
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", root.name)[:24].lstrip(".") or "root"
    return f"{tail}-{digest}.sock", f"{digest}.sock"


def _fit(directory: Path, root: Path) -> Path:
    for name in _socket_name(root):
        path = directory / name
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            return path
    raise ControlError("path-too-long", f"{directory} is too long a directory for a Unix "
                       "socket; set XDG_RUNTIME_DIR to a shorter private directory")


def socket_path(local_root: Path) -> Path:
    """Where the session of the tree at `local_root` listens (its directory is created)."""
    problems: list[str] = []
    for directory in _socket_dirs(create=True, problems=problems):
        return _fit(directory, local_root.expanduser().resolve())
    raise ControlError("unsafe-dir", "no private directory for the control socket: "
                       + "; ".join(problems))


def find_socket(start: Path) -> Path | None:
    """The socket of the nearest tree, from `start` up to `/`, with a live session (one
    that accepts a connection); else the nearest socket file of a tree; else None. Looks
    in both socket directories (a second terminal may lack XDG_RUNTIME_DIR). Creates
    nothing."""
    here = start.expanduser().resolve()
    if not here.is_dir():
        here = here.parent
    directories = list(_socket_dirs(create=False, problems=[]))
    nearest: Path | None = None
    for tree in (here, *here.parents):
        for directory in directories:
            try:
                path = _fit(directory, tree)
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    continue
            except (ControlError, OSError):
                continue
            if _answers(path):
                return path
            nearest = nearest or path
    return nearest


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fsencode(path))
        except OSError:
            return False
    return True


# -- the server ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> PeerCredentials | None:
    """The connecting process (Linux SO_PEERCRED); None where the platform cannot tell,
    which leaves the socket's mode 0600 and its private directory as the only guard."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return PeerCredentials(pid, uid, gid)


class _Oversize(Exception):
    pass


class _Connection:
    """One client's stream: lines in (bounded), lines out (serialised, with "v")."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._write_lock = asyncio.Lock()

    async def read_line(self) -> bytes:
        """The next line; b"" at the end of the stream. _Oversize past the limit."""
        try:
            return await self.reader.readline()
        except ValueError:  # asyncio's report of a line past the reader's limit
            raise _Oversize from None

    async def send(self, message: Mapping[str, object]) -> None:
        """Send one line; ControlError("client-gone") when the client left."""
        line = encode_line({"v": PROTOCOL_VERSION, **message})
        if len(line) > MAX_REPLY_LINE:
            raise ValueError(f"control reply line of {len(line)} bytes is too long")
        async with self._write_lock:
            try:
                self.writer.write(line)
                await self.writer.drain()
            except (ConnectionError, OSError):
                raise ControlError("client-gone", "the control client went away") from None

    async def send_line(self, message: JsonObject) -> None:
        """`send` for a handler's streamed lines: never a final one."""
        if "ok" in message or "done" in message:
            raise ValueError("a handler's streamed line must not carry 'ok' or 'done'")
        await self.send(message)


def _error_reply(exc: ControlError, **extra: object) -> JsonObject:
    return {**exc.details, **extra, "ok": False, "code": exc.code, "error": str(exc)}


class ControlServer:
    """Serves `handler` on the Unix socket at `path` (see the module docstring). It owns
    every task it starts: its accept loop and one task per connection (which owns the
    handler's `run` and the reader of the client's lines); `close()` ends them all. A
    task's unexpected exception goes to `on_internal_error` (default: the event loop's
    exception handler)."""

    def __init__(self, path: Path, handler: ControlHandler, *, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT,
                 on_internal_error: Callable[[BaseException], None] | None = None) -> None:
        self.path = path
        self.handler = handler
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.on_internal_error = on_internal_error
        self._lock_path = path.with_name(path.name + ".lock")
        self._lock_fd = -1
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._started = False

    @property
    def clients(self) -> int:
        """Connections being served (or refused) right now."""
        return len(self._clients)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen; ControlError("busy") when another session serves this tree."""
        if self._started:
            raise RuntimeError("a ControlServer starts once")
        self._started = True
        try:
            self._lock_fd = _take_lock(self._lock_path)
            if self._lock_fd < 0:
                raise await self._busy()
            await self._remove_stale()
            self._sock = self._listen()
        except BaseException:
            await self.close()
            raise
        self._accepting = asyncio.create_task(self._accept(self._sock))
        self._accepting.add_done_callback(self._reap)

    async def close(self) -> None:
        """Stop listening, end every connection (cancelling running handlers), remove the
        socket and the lock file. Idempotent."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        while self._clients:
            tasks = list(self._clients)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._inode is not None:
            _unlink_if(self.path, self._inode)
            self._inode = None
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                _unlink_if(self._lock_path, _identity(os.fstat(self._lock_fd)))
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._clients.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if self.on_internal_error is not None:
            self.on_internal_error(exc)
        else:
            asyncio.get_running_loop().call_exception_handler(
                {"message": "lsync control server task failed", "exception": exc,
                 "task": task})

    # -- start-up ---------------------------------------------------------------------

    async def _busy(self) -> ControlError:
        pid = await _hello_pid(self.path)
        if pid is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(self._lock_path.read_text().split()[0])
        which = f" (pid {pid})" if pid is not None else ""
        return ControlError("busy", f"another lsync connect is running for this tree{which}")

    async def _remove_stale(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError("unsafe-dir", f"{self.path} exists and is not a socket; "
                               "refusing to replace it")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 2.0)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a dead session's socket
            return
        except (OSError, asyncio.TimeoutError):
            raise ControlError("busy", "another lsync connect seems to be running for this "
                               f"tree (its socket {self.path} does not answer)") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise await self._busy()

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(os.fsencode(self.path))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ControlError("busy", "another lsync connect is running for this "
                                       "tree") from None
                raise ControlError("unsafe-dir", f"cannot create {self.path}: "
                                   f"{exc.strerror}") from None
            self._inode = _identity(self.path.lstat())
            # Not listening yet: every connect is refused until the mode is right.
            os.chmod(self.path, 0o600)
            st = self.path.lstat()
            if (not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid()
                    or stat.S_IMODE(st.st_mode) != 0o600 or _identity(st) != self._inode):
                raise ControlError("unsafe-dir", f"{self.path} is not a private socket "
                                   f"after chmod (mode {stat.S_IMODE(st.st_mode):o})")
            sock.listen(self.max_clients)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- connections ------------------------------------------------------------------

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: let some clients end
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            refusal = "too many control clients" if len(self._clients) >= self.max_clients \
                else ""
            task = asyncio.create_task(self._on_client(conn, refusal))
            self._clients.add(task)
            task.add_done_callback(self._reap)

    async def _on_client(self, conn: socket.socket, refusal: str) -> None:
        try:
            peer = peer_credentials(conn)
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_REQUEST_LINE)
        except BaseException:
            conn.close()
            raise
        connection = _Connection(reader, writer)
        try:
            if refusal:
                await connection.send({"ok": False, "done": True, "code": "busy",
                                       "error": refusal})
            elif peer is not None and peer.uid != os.geteuid():
                await connection.send({"ok": False, "done": True, "code": "refused",
                                       "error": "this lsync session belongs to another user"})
            else:
                await self._serve(connection)
        except (ControlError, ConnectionError):
            pass  # the client left
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, connection: _Connection) -> None:
        """Requests in order until the client leaves, idles, or runs a command. While a
        request is being answered the next line is already read: the client leaving then
        cancels the answer (a Ctrl-C'd `lsync flush` does not hold its slot)."""
        reading: asyncio.Task[bytes] | None = None
        answering: asyncio.Task[JsonObject] | None = None
        try:
            while True:
                if reading is None:
                    reading = asyncio.create_task(connection.read_line())
                try:
                    line = await asyncio.wait_for(asyncio.shield(reading), self.idle_timeout)
                except asyncio.TimeoutError:
                    return
                except _Oversize:
                    await connection.send({"ok": False, "code": "bad-request", "error":
                                           f"request line longer than {MAX_REQUEST_LINE} bytes"})
                    return
                reading = None
                if not line:
                    return
                try:
                    request = parse_request(line)
                except ControlError as exc:
                    await connection.send(_error_reply(exc))
                    continue
                if isinstance(request, RunRequest):
                    await self._run(connection, request)
                    return
                answering = asyncio.create_task(self._answer(request))
                reading = asyncio.create_task(connection.read_line())
                await asyncio.wait({answering, reading}, return_when=asyncio.FIRST_COMPLETED)
                if not answering.done():
                    if reading.exception() is not None or not reading.result():
                        return  # the client left (or broke the protocol): drop the answer
                    await asyncio.wait({answering})  # a pipelined request waits its turn
                reply = answering.result()
                answering = None
                await connection.send(reply)
        finally:
            owned = [task for task in (reading, answering) if task is not None]
            for task in owned:
                task.cancel()
            await asyncio.gather(*owned, return_exceptions=True)

    async def _answer(self, request: Hello | Status | Flush) -> JsonObject:
        try:
            if isinstance(request, Hello):
                return {"ok": True, "pid": os.getpid(),
                        "ops": ["hello", "status", "flush", "run"]}
            if isinstance(request, Status):
                result = await self.handler.status()
                reply: JsonObject = {**result, "ok": True, "pid": os.getpid()}
            else:
                result = await self._flush(request.timeout)
                reply = {**result, "ok": True}
            encode_line(reply)  # a reply that cannot be sent is the handler's bug
            return reply
        except ControlError as exc:
            return _error_reply(exc)
        except Exception as exc:
            return self._internal(exc)

    async def _flush(self, timeout: float | None) -> JsonObject:
        """The handler's flush, which keeps its own timeout (so that its error says what
        is pending); a handler that overruns it by FLUSH_GRACE is given up on."""
        if timeout is None:
            return await self.handler.flush(None)
        try:
            return await asyncio.wait_for(self.handler.flush(timeout), timeout + FLUSH_GRACE)
        except asyncio.TimeoutError:
            raise ControlError("timeout", f"flush did not finish in {timeout:g} s") from None

    def _internal(self, exc: Exception) -> JsonObject:
        if self.on_internal_error is not None:
            self.on_internal_error(exc)
        return {"ok": False, "code": "internal",
                "error": "internal error in the lsync session (details in its log)"}

    async def _run(self, connection: _Connection, request: RunRequest) -> None:
        lines: asyncio.Queue[ClientLine] = asyncio.Queue(maxsize=256)

        async def incoming() -> AsyncGenerator[ClientLine, None]:
            while True:
                yield await lines.get()

        async def pump() -> None:
            """Client lines to the handler; the client leaving cancels the run."""
            try:
                while True:
                    line = await connection.read_line()
                    if not line:
                        break
                    try:
                        item = parse_client_line(line)
                    except ControlError as exc:
                        await connection.send({"code": exc.code, "error": str(exc)})
                        continue
                    await lines.put(item)
            except (_Oversize, ControlError, ConnectionError):
                pass
            run.cancel()

        client_lines = incoming()
        run = asyncio.create_task(self.handler.run(request, connection.send_line, client_lines))
        reader = asyncio.create_task(pump())
        try:
            await asyncio.wait({run})
        finally:
            for task in (reader, run):
                task.cancel()
            await asyncio.gather(reader, run, return_exceptions=True)
            await client_lines.aclose()
        if run.cancelled():
            return  # the client left
        exc = run.exception()
        if exc is None and type(run.result()) is not int:
            exc = TypeError(f"the handler's run returned {run.result()!r}, not an exit status")
        if exc is None:
            final: JsonObject = {"ok": True, "done": True, "exit": run.result()}
        elif isinstance(exc, ControlError):
            if exc.code == "client-gone":
                return
            final = _error_reply(exc, done=True)
        elif isinstance(exc, Exception):
            final = {**self._internal(exc), "done": True}
        else:
            raise exc
        await connection.send(final)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _unlink_if(path: Path, identity: tuple[int, int]) -> None:
    """Remove `path` if it is still the file we made (not a successor's)."""
    try:
        if _identity(path.lstat()) == identity:
            path.unlink()
    except FileNotFoundError:
        pass


def _take_lock(path: Path) -> int:
    """An fd holding an exclusive flock on `path` (with our pid written in it); -1 when
    another process holds it. The file may be unlinked by its holder at any time, so the
    lock counts only if the fd is still the file at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return -1
        except BaseException:
            os.close(fd)
            raise
        try:
            current = _identity(path.lstat())
        except FileNotFoundError:
            current = None
        if current != _identity(os.fstat(fd)):
            os.close(fd)  # its holder removed it between our open and our lock: again
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


async def _hello_pid(path: Path) -> int | None:
    """The pid a live session at `path` reports; None when it does not answer."""
    try:
        reply = await request(path, {"op": "hello"}, 2.0)
    except ControlError:
        return None
    pid = reply.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


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
