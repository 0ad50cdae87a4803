"""One `lsync connect` over one or more targets: the supervisor of the run.

A `Fleet` owns one local side (lsync.client.local.localside: watcher, rules, scans, hash caches),
one `Session` per target (connection, engine, reconnect loop: lsync.client.session), the
control socket (lsync.client.buildloop.fleetloop answers flush, status, run and pull over every
target) and the signals. Every task it starts is its own: the first failure of any of them
(the tree cannot be watched, a target's fatal error) stops all the others and is raised
once they have ended; Ctrl-C stops every target, each draining its queue.

`FleetReporter` gives each target's session a reporter of its own. With one target it is
the user's reporter itself, so the output is what it always was. With several, the lines
that concern one target say its name (`state arm-box: syncing`, `note arm-box: ...`), the
live line's queue and initial-sync progress are those of the target furthest behind (the
largest queue, the smallest share done), `ready` comes once every target is ready (each
target's own is a note), and `in-sync as-of=T`
means what it says for one target, for all of them: T is the oldest of the targets' last
in-sync reports, so every change made before T is on every target.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

from lsync.client.buildloop.control import ControlError
from lsync.client.buildloop.control_server import ControlServer
from lsync.client.buildloop.controlpath import socket_path
from lsync.client.buildloop.fleetloop import FleetLoop
from lsync.client.buildloop.loop import BuildLoop
from lsync.client.buildloop.pullrules import PullRules, PushRules
from lsync.client.errors import UsageError, internal_error
from lsync.client.local.localside import LocalSide
from lsync.client.reporter import Reporter
from lsync.client.session import Options, Session


class Fleet:
    def __init__(self, options: list[Options], reporter: Reporter, control: bool = True
                 ) -> None:
        if not options:
            raise UsageError("no target given")
        described = [o.target.describe() for o in options]
        twice = sorted({d for d in described if described.count(d) > 1})
        if twice:  # (two agents on one remote tree would end each other: agent/records)
            raise UsageError(f"target {twice[0]} is given twice")
        first = options[0]
        self.root = first.local_root
        self.control = control  # serve `lsync flush/run/status` on the control socket
        self.reporter = FleetReporter(reporter, [o.name or "" for o in options])
        self.stop = asyncio.Event()
        self.abort = asyncio.Event()  # a second Ctrl-C: stop without waiting for the drain
        # Pulled paths are never pushed (lsync.client.buildloop.pullrules): the rules say so.
        rules = PushRules(self.root, first.excludes, first.include_vcs,
                          pull=PullRules(first.pull_paths))
        self.local = LocalSide(self.root, rules, first.step_ms, first.debounce_ms,
                               reporter.note)
        self.sessions = [Session(o, self.reporter.for_host(i), self.local, self.stop, o.name,
                                 self.abort)
                         for i, o in enumerate(options)]
        for session in self.sessions:
            session.buildloop = BuildLoop(session)
        self.loop = FleetLoop(self.sessions)

    async def run(self) -> None:
        if not self.root.is_dir():
            raise UsageError(f"local tree {self.root} is not a directory")
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._signalled)
        server = await self._serve_control()
        watcher = asyncio.create_task(self.local.watch(self.stop), name="watcher")
        hosts = [asyncio.create_task(s.connect_loop(watcher), name=f"target {s.name}")
                 for s in self.sessions]
        try:
            pending: set[asyncio.Task[None]] = set(hosts)
            while pending:
                done, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            self.stop.set()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            # Every target drains and says goodbye on its own (the stop event); one that
            # failed is over already.
            await asyncio.gather(*hosts, return_exceptions=True)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            if server is not None:
                await server.close()
            await self.loop.close()
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            raise watcher.exception()  # type: ignore[misc]

    def _signalled(self) -> None:
        """Ctrl-C (or SIGTERM): the first drains what is queued, a second stops at once."""
        if self.stop.is_set():
            self.abort.set()
        self.stop.set()

    async def _serve_control(self) -> ControlServer | None:
        """The control socket for `lsync flush/run/status` (none when no safe place for it
        exists: a note says so). Another session for this tree is a usage error."""
        if not self.control:
            return None
        try:
            server = ControlServer(socket_path(self.root), self.loop,
                                   on_internal_error=self._control_bug)
            await server.start()
        except ControlError as exc:
            if exc.code == "busy":
                raise UsageError(str(exc)) from None
            self.reporter.note(f"no control socket ({exc}): flush, run and status are "
                               "unavailable for this session")
            return None
        return server

    def _control_bug(self, exc: BaseException) -> None:
        self.reporter.note(str(internal_error("answering a control request", exc)))


@dataclass
class _HostState:
    queued: int = 0
    in_flight: int = 0
    share: float = 0.0  # of the initial sync's bytes acknowledged
    progress: tuple[int, int, int, int] | None = None
    ready: tuple[int, int, float] | None = None
    in_sync: int | None = None  # as_of_ns of the last in-sync report
    files: int = 0
    bytes: int = 0


class FleetReporter:
    """The user's reporter, shared by the targets (see the module docstring)."""

    def __init__(self, inner: Reporter, names: list[str]) -> None:
        self.inner = inner
        self.names = names
        self.hosts = [_HostState() for _ in names]
        self._ready_said = False
        self._in_sync_said = 0

    def note(self, message: str) -> None:
        self.inner.note(message)

    def for_host(self, index: int) -> Reporter:
        if len(self.names) == 1:
            return self.inner
        return _HostReporter(self, index)

    def state_changed(self, index: int, text: str) -> None:
        self.inner.state(f"{self.names[index]}: {text}")

    def queue_changed(self, index: int, queued: int, in_flight: int) -> None:
        host = self.hosts[index]
        host.queued, host.in_flight = queued, in_flight
        self.inner.queue(max(h.queued for h in self.hosts),
                         max(h.in_flight for h in self.hosts))

    def progress_changed(self, index: int, done_bytes: int, total_bytes: int,
                         done_files: int, total_files: int) -> None:
        host = self.hosts[index]
        host.share = done_bytes / total_bytes if total_bytes else 1.0
        host.progress = (done_bytes, total_bytes, done_files, total_files)
        slowest = min((h for h in self.hosts if h.progress is not None),
                      key=lambda h: h.share)
        assert slowest.progress is not None
        self.inner.progress(*slowest.progress)

    def ready_said(self, index: int, files: int, nbytes: int, seconds: float) -> None:
        self.hosts[index].ready = (files, nbytes, seconds)
        self.hosts[index].share = 1.0
        self.inner.note(f"{self.names[index]}: ready, {files} files, {nbytes} bytes in "
                        f"{seconds:.2f} s")
        if not self._ready_said and all(h.ready is not None for h in self.hosts):
            self._ready_said = True
            readies = [h.ready for h in self.hosts if h.ready is not None]
            self.inner.ready(sum(r[0] for r in readies), sum(r[1] for r in readies),
                             max(r[2] for r in readies))

    def in_sync_said(self, index: int, as_of_ns: int, files: int, nbytes: int) -> None:
        host = self.hosts[index]
        host.in_sync, host.files, host.bytes = as_of_ns, files, nbytes
        reports = [h.in_sync for h in self.hosts]
        if any(r is None for r in reports):
            return
        as_of = min(r for r in reports if r is not None)
        if as_of > self._in_sync_said:
            self._in_sync_said = as_of
            self.inner.in_sync(as_of, sum(h.files for h in self.hosts),
                               sum(h.bytes for h in self.hosts))


class _HostReporter:
    """One target's reporter when there are several: its lines say its name."""

    def __init__(self, fleet: FleetReporter, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.name = fleet.names[index]

    def state(self, text: str) -> None:
        self.fleet.state_changed(self.index, text)

    def acked(self, path: str, latency: float | None, nbytes: int) -> None:
        self.fleet.inner.acked(f"{self.name}: {path}", latency, nbytes)

    def failed(self, path: str, message: str) -> None:
        self.fleet.inner.failed(f"{self.name}: {path}", message)

    def note(self, message: str) -> None:
        self.fleet.inner.note(f"{self.name}: {message}")

    def queue(self, queued: int, in_flight: int) -> None:
        self.fleet.queue_changed(self.index, queued, in_flight)

    def progress(self, done_bytes: int, total_bytes: int, done_files: int,
                 total_files: int) -> None:
        self.fleet.progress_changed(self.index, done_bytes, total_bytes, done_files,
                                    total_files)

    def ready(self, files: int, nbytes: int, seconds: float) -> None:
        self.fleet.ready_said(self.index, files, nbytes, seconds)

    def in_sync(self, as_of_ns: int, files: int, nbytes: int) -> None:
        self.fleet.in_sync_said(self.index, as_of_ns, files, nbytes)
