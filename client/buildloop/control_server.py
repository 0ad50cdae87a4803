"""The control socket's server side: `ControlServer`, run by `lsync connect`.

The protocol, the messages and the client side are in `lsync.client.buildloop.control`; this module
listens on the socket (mode 0600, peers checked with SO_PEERCRED, stale sockets of dead
sessions removed, a lock file so two sessions cannot serve one tree), reads requests with
bounded lines, answers them through a `ControlHandler`, and owns every task it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import (
    AsyncGenerator,
    Callable,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lsync.client.buildloop.control import (
    _UCRED,
    FLUSH_GRACE,
    IDLE_TIMEOUT,
    MAX_CLIENTS,
    MAX_REPLY_LINE,
    MAX_REQUEST_LINE,
    PROTOCOL_VERSION,
    ClientLine,
    ControlError,
    ControlHandler,
    Flush,
    Hello,
    JsonObject,
    PullRequest,
    RunRequest,
    Status,
    encode_line,
    parse_client_line,
    parse_request,
    request,
)
from lsync.client.errors import log_event

LINGER = 2.0  # seconds a finished connection waits for its client to hang up
LINGER_READ = 64 * 1024

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
            await _linger(reader, writer)
        except (ControlError, ConnectionError) as exc:
            # The client left (logged: a run that ends with no answer must say why).
            log_event(f"control: connection ended: {type(exc).__name__}: {exc}")
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

    async def _answer(self, request: Hello | Status | Flush | PullRequest) -> JsonObject:
        try:
            if isinstance(request, Hello):
                return {"ok": True, "pid": os.getpid(),
                        "ops": ["hello", "status", "flush", "run", "pull"]}
            if isinstance(request, Status):
                result = await self.handler.status()
                reply: JsonObject = {**result, "ok": True, "pid": os.getpid()}
            elif isinstance(request, PullRequest):
                result = await self.handler.pull(request)
                reply = {**result, "ok": True}
            else:
                result = await self._flush(request.timeout, request.target)
                reply = {**result, "ok": True}
            encode_line(reply)  # a reply that cannot be sent is the handler's bug
            return reply
        except ControlError as exc:
            return _error_reply(exc)
        except Exception as exc:
            return self._internal(exc)

    async def _flush(self, timeout: float | None, target: str | None) -> JsonObject:
        """The handler's flush, which keeps its own timeout (so that its error says what
        is pending); a handler that overruns it by FLUSH_GRACE is given up on."""
        if timeout is None:
            return await self.handler.flush(None, target)
        try:
            return await asyncio.wait_for(self.handler.flush(timeout, target),
                                          timeout + FLUSH_GRACE)
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

        left = False  # the client hung up (its run is cancelled; nobody to answer)

        async def pump() -> None:
            """Client lines to the handler; the client leaving cancels the run."""
            nonlocal left
            why = "end of its stream"
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
            except (_Oversize, ControlError, ConnectionError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            left = True
            log_event(f"control: run {request.argv[:3]!r}: the client left ({why})")
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
        if run.cancelled() and left:
            return
        # (Cancelled with the client still there: a cancellation escaped the handler, a
        # bug; the client gets a final answer all the same, never a silent hang-up.)
        exc = (RuntimeError("the command's handler was cancelled") if run.cancelled()
               else run.exception())
        if exc is None and type(run.result()) is not int:
            exc = TypeError(f"the handler's run returned {run.result()!r}, not an exit status")
        if exc is None:
            final: JsonObject = {"ok": True, "done": True, "exit": run.result()}
        elif isinstance(exc, ControlError):
            if exc.code == "client-gone":
                log_event(f"control: run {request.argv[:3]!r}: the client left ({exc})")
                return
            final = _error_reply(exc, done=True)
        elif isinstance(exc, Exception):
            final = {**self._internal(exc), "done": True}
        else:
            raise exc
        await connection.send(final)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End our side and wait (at most LINGER seconds) for the client to hang up, dropping
    what it still sends. Closing at once would lose the client its answer: a quick command
    is over before the client's next line (its stdin's end) arrives; that write then meets
    a closed socket, and asyncio's transport, failing the write, drops the answer it had
    not read yet ("the lsync session closed the connection", exit 125, after the command
    had run)."""
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
    async def until_eof() -> None:
        while await reader.read(LINGER_READ):
            pass

    with contextlib.suppress(OSError, ValueError, asyncio.TimeoutError):
        await asyncio.wait_for(until_eof(), LINGER)


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
