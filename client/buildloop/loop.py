"""The build loop inside a running `lsync connect`: flush, status and run, for the control
socket (`lsync.client.buildloop.control`).

- **flush** is a barrier, not a rescan: it takes the moment it was asked, waits until the
  watcher has delivered every event from before it (inotify: its queue was seen empty
  since), then waits until the client core's flush watermark passes the changes queued by
  then — all acknowledged by the agent. With nothing pending that is one local round trip
  and no network traffic. While the link is down it waits for the reconnect (the new
  connection's initial comparison covers everything changed meanwhile) and says so.
- **run** flushes, then runs the command in the remote tree over a new channel of the same
  SSH connection (no new handshake), through the remote user's login shell, with a pty when
  asked; output streams back as it comes, paths under the remote root rewritten to the
  local root (unless the client asked not to); signals, window sizes and stdin are relayed;
  the exit status is the command's (128 + N when a signal N ended it). Against a local
  target the command runs as a local subprocess in the target directory.
- **status** reports the session: state, target, counters, queue, failing paths, and the
  remote edits the agent kept aside (lsync.agent.keeping), newest first.
- **pull** brings back what the `[pull] paths` select (or the patterns given) over the
  same link (lsync.client.buildloop.pull), once the link is up; **run** with `pull` does that for
  what changed on the remote since the command started, after it exits (one note line
  says what came; the exit status stays the command's).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import asyncssh

from lsync.client.buildloop.control import (
    ClientLine,
    ControlError,
    JsonObject,
    PullRequest,
    Resize,
    RunRequest,
    SendLine,
    Signal,
    Stdin,
    StdinEnd,
    output_lines,
)
from lsync.client.buildloop.pathmap import PathMapper
from lsync.client.buildloop.pull import Stamp
from lsync.client.buildloop.pullcommand import pull_after_command, pull_request
from lsync.client.buildloop.pullrules import PushRules, RewriteRules
from lsync.client.local.ignored import IgnoredTally
from lsync.client.reporter import Reporter

if TYPE_CHECKING:
    from lsync.client.remote.engine import SyncEngine

PID_LINE = re.compile(rb"lsync-pid (\d+)\r?\n")  # what the wrapper prints first on stderr
PID_LINES = 64  # lines of the login shell's own stderr passed on before it
KILL_GRACE = 2.0  # seconds after a KILL before lsync stops waiting for the command's channel
PID_WAIT = 2.0  # seconds a signal waits for the command's pid line when it came first
WATCHER_POLL = 0.002  # seconds between looks at the watcher's queue during a flush
READ_SIZE = 32 * 1024


@dataclass
class Progress:
    """What the session reports, kept for `status` (the reporter feeds it)."""

    state: str = "starting"
    last_error: str = ""
    last_check: str = ""
    in_sync_ns: int = 0
    in_sync_changes: int = 0  # changes acknowledged as of the last in-sync report
    commands: list[str] = field(default_factory=list)
    # Remote edits the agent kept aside, newest first: {"path", "kept_as", "kind", "size",
    # "mtime_ns"} (the session's `on_kept`).
    kept_edits: list[JsonObject] = field(default_factory=list)


class TrackingReporter:
    """A `Reporter` that keeps what `status` needs (`kept`) and passes everything on."""

    def __init__(self, inner: Reporter, progress: Progress) -> None:
        self.inner = inner
        self.kept = progress
        self.changes = 0  # operations acknowledged (writes, deletes, renames, ...)

    def state(self, text: str) -> None:
        self.kept.state = text
        self.inner.state(text)

    def failed(self, path: str, message: str) -> None:
        self.kept.last_error = f"{path}: {message}"
        self.inner.failed(path, message)

    def note(self, message: str) -> None:
        if message.startswith("check of"):
            self.kept.last_check = message
        self.inner.note(message)

    def queue(self, queued: int, in_flight: int) -> None:
        self.inner.queue(queued, in_flight)

    def progress(self, done_bytes: int, total_bytes: int, done_files: int,
                    total_files: int) -> None:
        self.inner.progress(done_bytes, total_bytes, done_files, total_files)

    def ready(self, files: int, nbytes: int, seconds: float) -> None:
        self.inner.ready(files, nbytes, seconds)

    def acked(self, path: str, latency: float | None, nbytes: int) -> None:
        self.changes += 1
        self.inner.acked(path, latency, nbytes)

    def in_sync(self, as_of_ns: int, files: int, nbytes: int) -> None:
        self.kept.in_sync_ns = as_of_ns
        self.kept.in_sync_changes = self.changes
        self.inner.in_sync(as_of_ns, files, nbytes)


class SessionView(Protocol):
    """What the build loop needs from the session (lsync.client.session.Session)."""

    engine: SyncEngine | None
    engine_ready: bool
    engine_changed: asyncio.Event
    link_up: bool
    remote_root: str | None
    root: Path
    target_text: str
    progress: Progress
    rules: PushRules
    rewrite_rules: RewriteRules
    pulled_digests: dict[str, tuple[Stamp, bytes]]

    @property
    def ignored(self) -> IgnoredTally | None: ...

    @property
    def ssh_connection(self) -> asyncssh.SSHClientConnection | None: ...

    @property
    def target_is_local(self) -> bool: ...

    def seen_until(self) -> int: ...

    def buffered_paths(self) -> list[str]: ...  # changed while disconnected

    @property
    def reporter(self) -> Reporter: ...


class BuildLoop:
    """The control socket's handler for one session."""

    def __init__(self, session: SessionView) -> None:
        self.session = session
        self.spares = Spares()

    def warm(self) -> None:
        """Open a spare command channel on the session's connection (when it has one)."""
        conn = self.session.ssh_connection
        if conn is not None:
            self.spares.warm(conn, RunRequest(argv=("true",)))

    async def close(self) -> None:
        await self.spares.close()

    # -- flush ------------------------------------------------------------------------------
    async def flush(self, timeout: float | None, notify: SendLine | None = None) -> JsonObject:
        """Wait until every change made before the call is acknowledged (see the module
        docstring); past `timeout`, fail with code "timeout" while connected and
        "disconnected" while the link is down, naming what is pending either way."""
        started = time.monotonic()
        asked_ns = time.time_ns()
        try:
            await asyncio.wait_for(self._barrier(asked_ns, notify), timeout)
        except asyncio.TimeoutError:
            code = "timeout" if self.session.link_up else "disconnected"
            raise ControlError(code, self._pending_text(),
                               details=self._pending_details()) from None
        answer: JsonObject = {"waited_ms": round((time.monotonic() - started) * 1000, 1)}
        engine = self.session.engine
        if engine is not None and engine.skipped:
            answer["skipped"] = sorted(engine.skipped)[:20]  # too big: not on the remote
            answer["skipped_count"] = len(engine.skipped)
        return answer

    async def _barrier(self, asked_ns: int, notify: SendLine | None) -> None:
        session = self.session
        said = False
        while True:
            engine = session.engine
            if engine is None or not session.engine_ready:
                if notify is not None and not said:
                    said = True
                    await notify({"note": f"waiting for the link ({session.progress.state})"})
                session.engine_changed.clear()
                await session.engine_changed.wait()
                continue
            while session.seen_until() < asked_ns and session.engine is engine:
                await asyncio.sleep(WATCHER_POLL)  # the kernel's queue has no wake-up for us
            tick = engine.queue.now_tick()
            flushed = asyncio.ensure_future(engine.wait_flushed(tick))
            changed = asyncio.ensure_future(self._engine_replaced(engine))
            try:
                await asyncio.wait({flushed, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (flushed, changed):
                    task.cancel()
                await asyncio.gather(flushed, changed, return_exceptions=True)
            if flushed.done() and not flushed.cancelled() and session.engine is engine:
                return

    async def _engine_replaced(self, engine: SyncEngine) -> None:
        while self.session.engine is engine:
            self.session.engine_changed.clear()
            await self.session.engine_changed.wait()

    def _pending_details(self) -> dict[str, object]:
        engine = self.session.engine
        if engine is None:
            return {"state": self.session.progress.state, "pending": None}
        failing = engine.queue.failing()
        return {"state": self.session.progress.state, "pending": len(engine.queue.records),
                "failing": dict(list(failing.items())[:20])}

    def _pending_text(self) -> str:
        engine = self.session.engine
        if engine is None or not self.session.engine_ready:
            waiting = self.session.buffered_paths()
            shown = ", ".join(waiting[:5]) + (" ..." if len(waiting) > 5 else "")
            return (f"not connected ({self.session.progress.state}); "
                    f"{len(waiting)} changed paths wait for the link"
                    + (f": {shown}" if waiting else ""))
        failing = engine.queue.failing()
        text = f"{len(engine.queue.records)} paths still pending"
        if failing:
            path, why = next(iter(failing.items()))
            text += f", {len(failing)} failing (first: {path}: {why})"
        return text

    # -- status -----------------------------------------------------------------------------
    async def status(self) -> JsonObject:
        session = self.session
        engine = session.engine
        out: JsonObject = {
            "state": session.progress.state,
            "connected": session.link_up,
            "target": session.target_text,
            "local": str(session.root),
            "last_error": session.progress.last_error,
            "last_check": session.progress.last_check,
            "in_sync_as_of_ns": session.progress.in_sync_ns,
            "in_sync_changes": session.progress.in_sync_changes,
            "commands": list(session.progress.commands),
            # Files, links and directories the last full scan left alone (ignore rules;
            # what is below an ignored directory is not counted).
            "ignored": None if session.ignored is None else session.ignored.entries,
            "kept_remote_edits": list(session.progress.kept_edits),
        }
        if engine is not None and session.link_up:
            counters = engine.counters
            failing = engine.queue.failing()
            out.update({
                "files": counters.files, "bytes": counters.bytes, "errors": counters.errors,
                "queued": engine.queue.queued, "in_flight": len(engine.window),
                "pending": len(engine.queue.records), "failing": len(failing),
                "failing_paths": dict(list(failing.items())[:20]),
                "last_latency_ms": None if counters.last_latency is None
                else round(counters.last_latency * 1000, 1),
                "checks": counters.checks, "check_findings": counters.found,
                "skipped": len(engine.skipped),
                "skipped_paths": sorted(engine.skipped)[:20],
                "idle": engine.idle,
            })
        return out

    # -- pull (lsync.client.buildloop.pullcommand) ----------------------------------------------
    async def pull(self, request: PullRequest) -> JsonObject:
        """Pull what the patterns (or the session's [pull] paths) select and differs from
        the local copy."""
        return await pull_request(self.session, request)

    # -- run --------------------------------------------------------------------------------
    async def _flushed_connection(self, request: RunRequest, send_line: SendLine
                                  ) -> asyncssh.SSHClientConnection | None:
        """Flush, and the SSH connection that the flush passed on (None for a local
        target). A command on an SSH target runs over SSH or not at all: when the link
        breaks right after the flush, the flush is waited for again on the next
        connection (within the same timeout)."""
        deadline = None if request.timeout is None else time.monotonic() + request.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            await self.flush(left, send_line)
            if self.session.target_is_local:
                return None
            conn = self.session.ssh_connection
            if conn is not None and self.session.link_up and self.session.engine_ready:
                return conn

    async def run(self, request: RunRequest, send_line: SendLine,
                  incoming: AsyncIterator[ClientLine]) -> int:
        conn = await self._flushed_connection(request, send_line)
        session = self.session
        remote_root = session.remote_root
        if remote_root is None:
            raise ControlError("closed", "the session has no remote tree yet")
        cwd = remote_root
        if request.cwd is not None:
            rel = os.path.relpath(request.cwd, session.root)
            if rel.startswith(".."):
                raise ControlError("bad-request", f"{request.cwd} is outside the synced tree")
            if rel != ".":
                cwd = f"{remote_root}/{Path(rel).as_posix()}"
        inner = f"cd {shlex.quote(cwd)} && exec {shlex.join(request.argv)}"
        if conn is not None and not request.pty:
            # Its pid, for signals (it leads its own process group: sshd made it a session).
            inner = f"printf 'lsync-pid %s\\n' \"$$\" >&2; {inner}"
        shown = shlex.join(request.argv)
        session.progress.commands.append(shown)
        session.reporter.note(f"running {shown}")
        status = 125
        started, started_ns = time.monotonic(), time.time_ns()
        try:
            # Where the command runs follows from the target alone, never from the state of
            # the connection (a local run of `make clean` in a path of the remote's is
            # data loss).
            if conn is not None:
                spare = await self.spares.take(conn, request) if "\n" not in inner else None
                self.spares.warm(conn, request)  # for the next command
                status = await _run_ssh(conn, inner, request, send_line, incoming,
                                        self._mappers(request, remote_root), spare)
            else:
                status = await _run_local(inner, request, send_line, incoming,
                                          self._mappers(request, remote_root))
            if request.pull:
                await pull_after_command(self.session, started, started_ns, send_line)
            return status
        finally:
            session.progress.commands.remove(shown)
            session.reporter.note(f"{shown}: exit {status}")

    def _mappers(self, request: RunRequest, remote_root: str) -> dict[str, PathMapper | None]:
        def make() -> PathMapper | None:
            if not request.map_paths or remote_root == str(self.session.root):
                return None
            return PathMapper(remote_root, str(self.session.root))

        return {"out": make(), "err": make()}


async def _relay(name: str, reader: Any, send_line: SendLine, mapper: PathMapper | None,
                 pid: asyncio.Future[int] | None = None) -> None:
    """Send what `reader` yields to the client as output lines of stream `name`. With `pid`,
    the line `lsync-pid N` that the command's wrapper prints first is taken out (and the
    login shell's own output before it passed on)."""
    if pid is not None:
        for _ in range(PID_LINES):
            line: bytes = await reader.readline()
            found = PID_LINE.fullmatch(line)
            if found is not None:
                pid.set_result(int(found.group(1)))
                break
            if not line:
                return
            await _send_output(name, line, send_line, mapper)
    while True:
        data: bytes = await reader.read(READ_SIZE)
        if not data:
            break
        await _send_output(name, data, send_line, mapper)
    if mapper is not None:
        for out in output_lines(name, mapper.flush()):
            await send_line(out)


async def _send_output(name: str, data: bytes, send_line: SendLine,
                       mapper: PathMapper | None) -> None:
    if mapper is not None:
        data = mapper.feed(data)
    for line in output_lines(name, data):
        await send_line(line)


async def _run_ssh(conn: asyncssh.SSHClientConnection, inner: str, request: RunRequest,
                   send_line: SendLine, incoming: AsyncIterator[ClientLine],
                   mappers: dict[str, PathMapper | None],
                   spare: asyncssh.SSHClientProcess[bytes] | None = None) -> int:
    if spare is not None:
        # A login shell already waiting on a channel opened ahead of time: the command
        # costs one way of the link instead of a channel open, an exec and a shell start.
        process = spare
        try:
            process.stdin.write(inner.encode("utf-8", "surrogateescape") + b"\n")
        except (asyncssh.Error, OSError) as exc:
            raise ControlError("closed", f"cannot start the command remotely: {exc}") from None
    else:
        command = f'exec "${{SHELL:-/bin/sh}}" -l -c {shlex.quote(inner)}'
        try:
            process = await conn.create_process(command, encoding=None,
                                                **_terminal(request))
        except (asyncssh.Error, OSError) as exc:
            raise ControlError("closed", f"cannot start the command remotely: {exc}"
                               ) from None
    pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    relays = [asyncio.ensure_future(_relay("out", process.stdout, send_line, mappers["out"])),
              asyncio.ensure_future(_relay("err", process.stderr, send_line, mappers["err"],
                                           None if request.pty else pid))]
    control = asyncio.ensure_future(_forward_ssh(conn, process, request, incoming, pid))
    try:
        await asyncio.gather(*relays)
        await process.wait_closed()
    except (asyncssh.Error, OSError) as exc:
        raise ControlError("closed", f"the connection broke during the command: {exc}") from None
    finally:
        control.cancel()
        for task in relays:
            task.cancel()
        await asyncio.gather(control, *relays, return_exceptions=True)
        if process.exit_status is None and process.exit_signal is None:
            with contextlib.suppress(asyncssh.Error, OSError):
                process.kill()
            process.close()
    if process.exit_signal is not None:
        number = getattr(signal, f"SIG{process.exit_signal[0]}", None)
        return 128 + (int(number) if number is not None else 0)
    if process.exit_status is None:
        # The channel closed without an exit status: the connection broke under the command
        # (the session ends a connection whose agent link broke). Not the command's status.
        raise ControlError("closed", "the connection broke during the command; its outcome "
                           "is unknown")
    return process.exit_status


def _terminal(request: RunRequest) -> dict[str, Any]:
    if not request.pty:
        return {}
    return {"term_type": request.term or "xterm", "term_size": (request.cols, request.rows)}


class Spares:
    """Command channels opened ahead of time, each a login shell in the remote tree waiting
    for one command line on its stdin; one kept ready per kind (pipes, or a pty of one
    terminal type), for the current connection. Owns the tasks that open them."""

    # Reads one line and runs it in this shell (its `exec` replaces the shell).
    WAITING = 'exec "${SHELL:-/bin/sh}" -l -c ' + shlex.quote(
        'IFS= read -r lsync_command && eval "$lsync_command"')

    def __init__(self) -> None:
        # By (connection, kind): the connection object itself, never its id(), which a new
        # connection may reuse once the old one is freed.
        self._ready: dict[tuple[object, ...], asyncio.Task[Any]] = {}

    @staticmethod
    def key(conn: asyncssh.SSHClientConnection, request: RunRequest) -> tuple[object, ...]:
        return (conn, request.term or "xterm") if request.pty else (conn,)

    def warm(self, conn: asyncssh.SSHClientConnection, request: RunRequest) -> None:
        self._drop_others(conn)
        key = self.key(conn, request)
        if key not in self._ready:
            self._ready[key] = asyncio.ensure_future(conn.create_process(
                self.WAITING, encoding=None, **_terminal(request)))

    def _drop_others(self, conn: asyncssh.SSHClientConnection) -> None:
        """Spares of earlier connections are of no use: closed when their open ends."""
        for key in [key for key in self._ready if key[0] is not conn]:
            task = self._ready.pop(key)
            task.cancel()
            task.add_done_callback(_close_spare)

    async def take(self, conn: asyncssh.SSHClientConnection,
                   request: RunRequest) -> asyncssh.SSHClientProcess[bytes] | None:
        """A spare for `request`, resized to it; None when there is none (or it died: a
        spare that failed to open, for whatever reason, is just no spare)."""
        self._drop_others(conn)
        task = self._ready.pop(self.key(conn, request), None)
        if task is None:
            return None
        try:
            process: asyncssh.SSHClientProcess[bytes] = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.cancel()
                task.add_done_callback(_close_spare)
                raise  # we are cancelled (the client left), not the spare
            return None
        except Exception:  # any failure of a spare: no spare (see the docstring)
            return None
        if process.exit_status is not None or process.exit_signal is not None \
                or process.stdin.is_closing():
            return None
        if request.pty:
            with contextlib.suppress(asyncssh.Error, OSError):
                process.change_terminal_size(request.cols, request.rows)
        return process

    async def close(self) -> None:
        tasks, self._ready = list(self._ready.values()), {}
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, asyncssh.SSHClientProcess):
                result.close()


def _close_spare(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


async def _forward_ssh(conn: asyncssh.SSHClientConnection,
                       process: asyncssh.SSHClientProcess[bytes], request: RunRequest,
                       incoming: AsyncIterator[ClientLine], pid: asyncio.Future[int]) -> None:
    """Relay the client's lines to the command. Without a pty, signals go to the command's
    process group by `kill` over another channel of the connection (sshd refuses signal
    requests where it runs without privilege separation, e.g. for root); on a pty, Ctrl-C is
    the terminal's own ^C."""
    killers: set[asyncio.Task[None]] = set()
    try:
        async for line in incoming:
            with contextlib.suppress(asyncssh.Error, OSError, BrokenPipeError):
                if isinstance(line, Signal):
                    if not request.pty and not pid.done():
                        # The command's pid line may still be on its way (a Ctrl-C right
                        # after the start): its process group is what gets the signal.
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(asyncio.shield(pid), PID_WAIT)
                    if line.name == "INT" and request.pty:
                        process.stdin.write(b"\x03")  # the remote terminal's own Ctrl-C
                    elif pid.done():
                        task = asyncio.ensure_future(_kill_group(conn, pid.result(), line.name))
                        killers.add(task)
                        task.add_done_callback(killers.discard)
                    else:
                        process.send_signal(line.name)
                    if line.name == "KILL":
                        await asyncio.sleep(KILL_GRACE)  # then stop waiting for the channel
                        process.close()
                elif isinstance(line, Resize):
                    process.change_terminal_size(line.cols, line.rows)
                elif isinstance(line, Stdin):
                    process.stdin.write(line.data)
                elif isinstance(line, StdinEnd):
                    process.stdin.write_eof()
    finally:
        for task in killers:
            await asyncio.gather(task, return_exceptions=True)


async def _kill_group(conn: asyncssh.SSHClientConnection, pid: int, name: str) -> None:
    command = f"kill -s {name} -- -{pid} 2>/dev/null || kill -s {name} {pid}"
    with contextlib.suppress(asyncssh.Error, OSError):
        await asyncio.wait_for(conn.run(command, check=False), KILL_GRACE * 5)


async def _run_local(inner: str, request: RunRequest, send_line: SendLine,
                     incoming: AsyncIterator[ClientLine],
                     mappers: dict[str, PathMapper | None]) -> int:
    """The command against a local target: a subprocess in its own session (pipes only)."""
    process = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", inner, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None and process.stderr is not None
    relays = [asyncio.ensure_future(_relay("out", process.stdout, send_line, mappers["out"])),
              asyncio.ensure_future(_relay("err", process.stderr, send_line, mappers["err"]))]

    async def forward() -> None:
        async for line in incoming:
            with contextlib.suppress(ProcessLookupError, OSError):
                if isinstance(line, Signal):
                    os.killpg(process.pid, getattr(signal, f"SIG{line.name}"))
                elif isinstance(line, Stdin) and process.stdin is not None:
                    process.stdin.write(line.data)
                elif isinstance(line, StdinEnd) and process.stdin is not None:
                    process.stdin.close()

    control = asyncio.ensure_future(forward())
    try:
        await asyncio.gather(*relays)
        status = await process.wait()
    finally:
        control.cancel()
        for task in relays:
            task.cancel()
        await asyncio.gather(control, *relays, return_exceptions=True)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return 128 - status if status < 0 else status
