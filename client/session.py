"""One target of an `lsync connect` run: connect, bring that remote up to date, then
follow every save.

The watcher (lsync.client.local.localside, shared by every target) starts before anything else,
so no change made during the connection or the initial scan is missed: its batches wait in
this target's buffer until its engine exists. Each connection runs the same sequence —
start the agent, send Hello and ListTree in one flight, scan the local tree (hash cache;
a scan another target started after this one's buffer did serves too) while the manifest
streams in, queue the differences, and then reconcile watcher batches — and a broken link
leads to a reconnect with backoff that repeats it (the rescan is cheap with a warm cache).
The backoff starts again from its first step once a connection got as far as the initial
sync. What lsync owned on the remote (it made or verified it there) stays owned across
reconnects, so files deleted locally while the link was down, or whose delete or rename was
in flight when it broke, are still deleted or moved remotely; paths of operations left
unanswered are reconciled again. Stopping (Ctrl-C) drains what is queued, says goodbye to
the agent, and ends cleanly.

The session also checks the link's liveness (pings, a bound on silence) and tells the
engine what the watcher saw: changed paths, files still open for writing or closed, and
overflows (which make the engine check the whole tree). Its state (engine, ready, link up)
is what its build loop (lsync.client.buildloop.loop) waits on; the control socket and the
supervision of every target are lsync.client.fleet's. Ownership across restarts comes from
the agent's record (the manifest's `written` field), not from this process.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from lsync.client.buildloop.control import JsonObject
from lsync.client.buildloop.loop import BuildLoop, Progress, TrackingReporter
from lsync.client.buildloop.pull import Stamp
from lsync.client.buildloop.pullrules import DEFAULT_REWRITE, PullRules, PushRules, RewriteRules
from lsync.client.errors import (
    Abandoned,
    ConnectError,
    LinkBroken,
    LsyncError,
    SafetyStop,
)
from lsync.client.local import hashchoice
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IndexChange
from lsync.client.local.ignored import IgnoredTally
from lsync.client.local.localentry import LocalEntry
from lsync.client.local.localside import LocalSide
from lsync.client.local.watcher import (
    DEFAULT_DEBOUNCE_MS,
    DEFAULT_STEP_MS,
    WatchBatch,
)
from lsync.client.project import DEFAULT_LANES
from lsync.client.remote import remotelisting, sigstore
from lsync.client.remote.engine import SyncEngine
from lsync.client.remote.remoteside import EDITOR_SAVE_MAX, URGENT_MAX
from lsync.client.reporter import Reporter
from lsync.client.target import target_name
from lsync.client.transport import lanes, ssh
from lsync.client.transport.bootstrap import MAX_INITIAL, bundle_b64, local_argv
from lsync.client.transport.link import AgentLink
from lsync.client.transport.streams import LocalAgentStream, SshAgentStream
from lsync.protocol import PROTOCOL_VERSION, packing
from lsync.protocol import messages as m

WELCOME_TIMEOUT = 60.0
DRAIN_TIMEOUT = 60.0
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
LONG_LINK_HANDSHAKE = 0.25  # seconds; about 35 ms of round trip or more
LONG_LINK_RTT = 0.035  # seconds: a ping slower than this confirms a long link


_T = TypeVar("_T")


class _Stopped(Exception):
    """The user stopped lsync while it was still connecting or doing the initial sync."""


@dataclass
class Options:
    target: ssh.Target
    local_root: Path
    ssh_config: list[str] | None = None
    delete: bool = False
    excludes: list[str] = field(default_factory=list)
    include_vcs: bool = False
    accept_new_host_key: bool = False
    step_ms: int = DEFAULT_STEP_MS
    debounce_ms: int = DEFAULT_DEBOUNCE_MS
    reconnect: bool = True
    lanes: int = DEFAULT_LANES  # extra SSH channels for data (lsync.client.transport.lanes)
    # [pull] paths (lsync.client.buildloop.pull)
    pull_paths: list[str] = field(default_factory=list)
    pull_rewrite: list[str] = field(default_factory=lambda: list(DEFAULT_REWRITE))
    name: str | None = None  # the target's short name (default: lsync.client.target)


class Session:
    """One target's side of a run: its connection, engine and reconnect loop. The local
    side (watcher, rules, scans, hash caches) is shared with the other targets' sessions
    (lsync.client.local.localside); `lsync.client.fleet` runs them all."""

    def __init__(self, options: Options, reporter: Reporter, local: LocalSide | None = None,
                 stop: asyncio.Event | None = None, name: str | None = None,
                 abort: asyncio.Event | None = None) -> None:
        self.options = options
        self.progress = Progress()
        self.reporter: Reporter = TrackingReporter(reporter, self.progress)
        self.root = options.local_root
        self.target_text = options.target.describe()
        self.name = name or target_name(options.target)
        # For the build loop (lsync.client.buildloop.loop): the current engine, whether its
        # initial sync is done, and an event set whenever either changes.
        self.engine_ready = False
        self.engine_changed = asyncio.Event()
        # The link to the agent is up (False from the moment a connection starts to end,
        # through the backoff, until the next one has its engine).
        self.link_up = False
        self.remote_root: str | None = None
        if local is None:  # a session of its own (tests): a local side for it alone
            # Pulled paths are never pushed (lsync.client.buildloop.pullrules): the rules say so.
            rules = PushRules(self.root, options.excludes, options.include_vcs,
                              pull=PullRules(options.pull_paths))
            local = LocalSide(self.root, rules, options.step_ms, options.debounce_ms,
                              self.reporter.note)
        local.hosts.append(self)
        self.local = local
        self.rules = local.rules
        self.rewrite_rules = RewriteRules(options.pull_rewrite)
        self.pulled_digests: dict[str, tuple[Stamp, bytes]] = {}  # rewritten pulled files
        self.stop = stop or asyncio.Event()
        self.abort = abort or asyncio.Event()  # stop without draining (a second Ctrl-C)
        self.engine: SyncEngine | None = None
        self._buffered: dict[str, float] = {}
        # Since when (monotonic) every change has been kept here for the next connection
        # (the last engine's end): a scan that started later serves it (LocalSide.scan).
        self._missed_since = time.monotonic()
        self._ssh: asyncssh.SSHClientConnection | None = None
        # Carried from one connection to the next: remote paths lsync owned, and trees
        # whose delete or rename got no answer (everything below them was ours).
        self._owned: set[str] = set()
        self._owned_trees: set[str] = set()
        self._hash_seen: str | None = None  # the hash the agent chose last
        # The build loop of this target (lsync.client.buildloop.loop), set by the fleet: warmed
        # once the initial sync is done.
        self.buildloop: BuildLoop | None = None

    @property
    def ignored(self) -> IgnoredTally | None:
        """What the last full scan of the tree skipped (status)."""
        return self.local.ignored

    def _set_engine(self, engine: SyncEngine | None) -> None:
        if engine is None and self.engine is not None:
            self._missed_since = time.monotonic()
        self.engine = engine
        self.engine_ready = False
        self.link_up = engine is not None
        self.engine_changed.set()

    def _link_down(self) -> None:
        """The connection is ending: from now on no flush passes and no command starts on
        it (the build loop waits for the next one)."""
        self.engine_ready = False
        self.link_up = False
        self.engine_changed.set()

    @property
    def target_is_local(self) -> bool:
        """The target is a local directory (no SSH): commands run as local processes."""
        return self.options.target.host is None

    @property
    def ssh_connection(self) -> asyncssh.SSHClientConnection | None:
        return self._ssh

    def buffered_paths(self) -> list[str]:
        """Paths changed while no connection was up (the next one compares everything)."""
        return sorted(self._buffered)

    def seen_until(self) -> int:
        """Unix ns before which every local change has been delivered by the watcher."""
        return self.local.seen_until()

    # -- the watcher feeds whichever engine is current --------------------------------------
    def _on_batch(self, batch: WatchBatch) -> None:
        """A watcher batch, through the local side (which gives it to every target)."""
        self.local.on_batch(batch)

    def take_batch(self, dirty: list[str], batch: WatchBatch, now: float) -> None:
        """The paths of a watcher batch to look at (LocalSide.on_batch): for the engine,
        or kept for the next connection."""
        engine = self.engine
        if engine is not None:
            engine.mark_dirty(dirty, now)
            if batch.latest and len(dirty) > EDITOR_SAVE_MAX:
                # A burst: its last events may be a save made right after it (they go first,
                # the newest first). A burst that reaches lsync in small batches (each bulk
                # work then, see RemoteSide._is_save) ends in one: its last path goes first.
                wanted = set(dirty)
                latest = batch.latest if len(dirty) > URGENT_MAX else batch.latest[-1:]
                engine.mark_dirty([p for p in reversed(latest) if p in wanted], now,
                                  urgent=True)
            engine.hold(p for p in batch.writing if not p.rpartition("/")[2].startswith(
                ".lsync-tmp-"))
            engine.release(batch.closed)
            if batch.overflow:
                self.reporter.note(f"watcher: {batch.note}; checking the whole tree")
                engine.check_all(batch.note)
        else:
            # The next connection compares the whole tree anyway (overflow or not).
            for path in dirty:
                self._buffered.setdefault(path, now)

    def index_changed(self, change: IndexChange) -> None:
        """Git's index made these paths (un)tracked, so (un)ignored: look at them again
        (the local side has refreshed the watcher)."""
        if self.engine is not None:
            self.engine.mark_dirty(sorted(change.paths), hint=False)
            # An in-sync report was held back while the index was read: give it now
            # (after a check) even when nothing changed.
            self.engine.report_again()
        else:  # (each path keeps its earliest time)
            self._buffered = {**dict.fromkeys(change.paths, time.monotonic()), **self._buffered}

    def _on_kept(self, entries: list[list[Any]], listing: bool) -> None:
        """The agent kept remote edits aside: say so, and keep them for `lsync status`,
        newest first (its listing, right after the Welcome, replaces the last one's)."""
        kept: list[JsonObject] = [
            {"path": path, "kept_as": kept_as, "kind": "link" if kind == m.KIND_LINK
             else "file", "size": size, "mtime_ns": mtime_ns}
            for path, kept_as, kind, size, mtime_ns in entries]
        if not listing:
            for edit in kept:
                self.reporter.note(f"kept remote edit of {edit['path']} as {edit['kept_as']}")
            kept = [*reversed(kept), *self.progress.kept_edits]
        self.progress.kept_edits = kept[:m.MAX_KEPT_LISTED]

    # -- running ----------------------------------------------------------------------------
    async def connect_loop(self, watcher: asyncio.Task[None]) -> None:
        """Connect, sync and follow the tree until stopped; reconnect with backoff after a
        broken link (unless told not to). `watcher` is the local side's watch task."""
        attempt = 0
        connected_once = False
        while not self.stop.is_set():
            try:
                await self._one_connection(watcher)
                return
            except _Stopped:
                self.reporter.state("stopped before the initial sync completed")
                return
            except (LinkBroken, ConnectError) as exc:
                worked = self._forget_connection()
                connected_once = connected_once or worked
                if isinstance(exc, ConnectError) and not connected_once:
                    raise
                if not self.options.reconnect or self.stop.is_set():
                    raise
                if worked:
                    attempt = 0  # this connection worked: start the backoff again
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                attempt += 1
                # (Disconnected for status, flush and run from here on: the dead engine
                # is gone before the backoff.)
                self.reporter.state(f"disconnected ({exc}); reconnecting in {delay:.0f} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            finally:
                self._forget_connection()

    def _forget_connection(self) -> bool:
        """The connection ended: keep what the next one needs, drop its engine; whether
        it had got as far as an engine."""
        engine = self.engine
        if engine is None:
            return False
        self._carry_over(engine)
        self._set_engine(None)
        return True

    def _carry_over(self, engine: SyncEngine) -> None:
        """Keep what the next connection needs from one that ended: the paths still to do
        or whose operations got no answer (the remote may or may not have applied them),
        and what lsync owned remotely."""
        now = time.monotonic()
        for path in engine.pending_paths():
            self._buffered.setdefault(path, now)
        self._owned, self._owned_trees = engine.side.owned_now()

    def _adopt_owned(self, engine: SyncEngine, local: Container[str]) -> list[str]:
        """After a reconnect: mark what lsync owned before as owned again in the new model,
        and return those paths that are gone locally (they are to be deleted remotely)."""
        return engine.side.adopt_owned(self._owned, self._owned_trees, local)

    async def _scan(self, hash_name: str) -> tuple[HashCache, dict[str, LocalEntry]]:
        """The tree's entries and hash cache: a scan shared with the other targets where
        one serves (LocalSide.scan)."""
        return await self.local.scan(hash_name, self._missed_since, self._scan_problem)

    def _scan_problem(self, path: str, exc: Exception) -> None:
        self.reporter.failed(path, f"not synced for now: {exc}")

    async def _or_stop(self, awaitable: Awaitable[_T]) -> _T:
        """Await `awaitable` unless the user stops lsync first (then raise _Stopped)."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, LsyncError):
            await task
        raise _Stopped

    async def _one_connection(self, watcher: asyncio.Task[None]) -> None:
        started = time.monotonic()
        target = self.options.target
        hello = m.Hello(
            PROTOCOL_VERSION,
            {"hash": hashchoice.offered(),
             "compression": packing.available_packings()},
            target.tree, {"create_root": True,
                          "lanes": target.host is not None and self.options.lanes > 0})
        connecting = time.monotonic()
        opening: asyncio.Future[asyncssh.SSHClientConnection] | None = None
        if target.host is not None:
            self.reporter.state(f"connecting to {target.describe()}")
            # The connection starts first: the threads below compete for the interpreter.
            opening = asyncio.ensure_future(ssh.connect(
                target, self.options.ssh_config, self.options.accept_new_host_key))
            await asyncio.sleep(0)
        # The copy of the remote's listing kept by the last session is read meanwhile.
        copy = remotelisting.Copy(self.root, target.describe(), self.reporter.note)
        holding = asyncio.ensure_future(asyncio.to_thread(copy.load))
        # Nothing is scanned before the watcher reports changes (none may fall between).
        if not self.local.watching.is_set():
            ready = asyncio.ensure_future(self.local.watching.wait())
            await asyncio.wait({ready, watcher}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if watcher.done() and not self.local.watching.is_set():
                if opening is not None:
                    opening.cancel()
                holding.cancel()
                watcher.result()  # its failure (a safety stop), else:
                raise _Stopped
        # The agent's bundle is built (once per process) while SSH connects.
        warm = asyncio.get_running_loop().run_in_executor(None, bundle_b64)
        warm.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen later
        # Scan while SSH connects, with the hash the agent is likely to choose.
        guess = hashchoice.likely(self.root, self._hash_seen)
        scan = asyncio.create_task(self._scan(guess), name="scan")
        stream: LocalAgentStream | SshAgentStream
        long_link = False
        if opening is None:
            stream = LocalAgentStream()
        else:
            try:
                self._ssh = await self._or_stop(opening)
                # An SSH handshake is about 7 round trips: a slow one means a long link.
                long_link = time.monotonic() - connecting > LONG_LINK_HANDSHAKE
            except BaseException:
                opening.cancel()
                holding.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await opening
                scan.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await scan
                raise
            stream = SshAgentStream()
        link = AgentLink(stream)
        link.on_kept = self._on_kept
        tasks: list[asyncio.Future[Any]] = [scan, holding]
        try:
            held = await self._or_stop(holding)
            # Hello and ListTree travel on the agent's command line, with its code: the
            # ListTree names the listing held, and only what changed since comes back.
            link.start(hello)
            manifest = asyncio.create_task(remotelisting.fetch(
                link.listing(held.generation if held is not None else ""), held),
                name="manifest")
            tasks.append(manifest)
            # While the agent walks: the model of the copy held, brought up to date with
            # the delta when it comes (loading the whole manifest after it takes long).
            preparing = None
            if held is not None:
                preparing = asyncio.create_task(remotelisting.prepare(
                    scan, held, self.rules.is_ignored), name="prepare")
                tasks.append(preparing)
            if isinstance(stream, SshAgentStream):
                assert self._ssh is not None
                await self._or_stop(ssh.start_agent(self._ssh, stream))
            else:
                await stream.launch(local_argv, MAX_INITIAL)
            welcome = await self._or_stop(link.welcome(WELCOME_TIMEOUT))
            tasks.append(asyncio.create_task(link.watch_liveness(), name="liveness"))
            # The handshake's time says "long" also when the local scan slowed it (both
            # want the interpreter): a ping, answered while the scan goes on, says it again.
            pinging = asyncio.create_task(link.ping(), name="ping") if long_link else None
            if pinging is not None:
                tasks.append(pinging)
            socket = welcome.info.get("lanes")
            if socket and self._ssh is not None:
                # More channels for data, opened while the manifest and the scan go on.
                link.lanes_opening = asyncio.create_task(lanes.open_lanes(
                    link, self._ssh, welcome.info.get("executable") or "python3", socket,
                    ssh.CHANNEL_WINDOW, ssh.MAX_PACKET, self.options.lanes), name="lanes")
                tasks.append(link.lanes_opening)
            hash_name = welcome.chosen["hash"]
            self._hash_seen = hash_name
            self.reporter.state(f"scanning (agent python {welcome.info.get('python', '?')}, "
                                f"{hash_name})")
            if hash_name != guess:
                tasks.remove(scan)  # (a finished one would keep its result for the session)
                scan = asyncio.create_task(self.local.scan_instead(
                    scan, hash_name, self._missed_since, self._scan_problem), name="scan")
                tasks.append(scan)
            cache, local = await self._or_stop(scan)
            listing = await self._or_stop(manifest)
            loaded = await self._or_stop(remotelisting.updated_model(
                preparing, listing, local, self.rules.is_ignored))
            # (Nothing may keep the copy nor a model of it for the rest of the session.)
            tasks = [task for task in tasks if task is not holding and task is not preparing]
            del held, preparing, holding
            if pinging is not None and pinging.done() and not pinging.cancelled() \
                    and pinging.exception() is None:
                long_link = pinging.result() > LONG_LINK_RTT  # (no answer yet: long it is)
            engine = SyncEngine(
                link, self.root, self.rules, cache, self.reporter, self.options.delete,
                compression=welcome.chosen.get("compression", packing.ZLIB),
                long_link=long_link,
                seen_until=self.seen_until,
                close_events=self.local.close_events, reads=self.local.reads)
            await engine.initial_sync(local, list(listing.entries.values()), loaded)
            keeping = None
            if listing.changed and listing.generation:
                keeping = asyncio.ensure_future(asyncio.to_thread(copy.keep, listing))
                tasks.append(keeping)
            gone = self._adopt_owned(engine, local)
            # The scan and the manifest (tens of MB on a big tree) are not needed any more:
            # nothing may keep them for the rest of the session (nor while the signatures
            # kept, as big again, are read).
            tasks = [task for task in tasks if task is not scan and task is not manifest]
            del local, listing, scan, manifest, loaded
            signatures = sigstore.default_path(self.root, hash_name)
            engine.model.adopt_signatures(await asyncio.to_thread(sigstore.load, signatures))
            self.remote_root = welcome.info.get("root") or None
            self._set_engine(engine)
            engine.mark_dirty(sorted(gone))
            buffered, self._buffered = self._buffered, {}
            for path, since in buffered.items():
                engine.mark_dirty([path], since)
            self.reporter.state("syncing")
            runner = asyncio.create_task(engine.run(), name="engine")
            tasks.append(runner)
            idle = asyncio.create_task(engine.wait_idle(), name="initial-idle")
            tasks.append(idle)
            link_closed = asyncio.ensure_future(link.closed)
            tasks.append(link_closed)
            stopping = asyncio.create_task(self.stop.wait(), name="stop")
            tasks.append(stopping)
            await _first(idle, runner, watcher, link_closed, stopping)
            _raise_failures(runner, watcher, link)
            if not idle.done():
                raise _Stopped
            self.reporter.ready(engine.counters.files, engine.counters.bytes,
                                time.monotonic() - started)
            self.engine_ready = True
            self.engine_changed.set()
            if self.buildloop is not None:
                self.buildloop.warm()  # `lsync run` then starts without opening a channel
            self.reporter.state("watching")
            await self._save_caches(cache, signatures, engine)
            await _first(stopping, runner, watcher, link_closed)
            _raise_failures(runner, watcher, link)
            self.reporter.state("stopping: draining queued writes (Ctrl-C again: at once)")
            drained = asyncio.create_task(engine.wait_idle(), name="drain")
            tasks.append(drained)
            drain_limit = asyncio.create_task(asyncio.sleep(DRAIN_TIMEOUT), name="drain-limit")
            tasks.append(drain_limit)
            aborting = asyncio.create_task(self.abort.wait(), name="abort")
            tasks.append(aborting)
            await _first(drained, runner, link_closed, drain_limit, aborting)
            if aborting.done() and not drained.done():
                left = len(engine.pending_paths())
                await self._save_caches(cache, signatures, engine)
                raise Abandoned(f"stopped at once: {self.target_text} had not confirmed "
                                f"{left} change{'s' if left != 1 else ''} (they are sent "
                                "when lsync next runs)")
            _raise_failures(runner, None, link)
            await self._save_caches(cache, signatures, engine)
            if engine.counters.files or engine.remote_hashed:
                # Kept as the remote holds it now (what lsync wrote, the digests the agent
                # learnt): the next start hears of nothing else.
                if keeping is not None:
                    await keeping
                await copy.refresh(link)
            await self._close_link(link, "user stopped lsync")
            self.reporter.state("stopped")
        finally:
            self._link_down()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, LinkBroken, SafetyStop):
                    await task
            await self._close_link(link, "client ending")
            if self._ssh is not None:
                await _close_ssh(self._ssh, clean=link.failure is None
                                 and not self.abort.is_set())
                self._ssh = None

    async def _close_link(self, link: AgentLink, reason: str) -> None:
        """Close the link, at once when the user asks for it meanwhile (a second Ctrl-C:
        a goodbye over a frozen link would wait for its bounds)."""
        if self.abort.is_set():
            await link.close(reason, at_once=True)
            return
        closing = asyncio.ensure_future(link.close(reason))
        aborting = asyncio.ensure_future(self.abort.wait())
        try:
            await asyncio.wait({closing, aborting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborting.cancel()
            if not closing.done():
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError, LinkBroken):
                    await closing
        if self.abort.is_set():
            await link.close(reason, at_once=True)
        else:
            closing.result()

    async def _save_caches(self, cache: HashCache, signatures: Path,
                           engine: SyncEngine) -> None:
        """Save the hash cache and the signatures; a failure is a note, never fatal. (The
        signatures are taken from the model here, on the event loop: a worker thread reading
        the model while passes change it died of "dictionary changed size during iteration"
        in the torture run, and took the session with it.)"""
        kept = engine.model.signatures_to_keep(sigstore.MIN_SIZE)
        for problem in await self.local.save(cache, signatures, kept):
            self.reporter.note(problem)


async def _close_ssh(conn: asyncssh.SSHClientConnection, clean: bool) -> None:
    """Close the connection; abort it when the link broke or a clean close takes long
    (on a frozen TCP path a clean close would wait for ever)."""
    if clean:
        conn.close()
        with contextlib.suppress(OSError, asyncssh.Error, asyncio.TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), 5)
            return
    conn.abort()
    with contextlib.suppress(OSError, asyncssh.Error, asyncio.TimeoutError):
        await asyncio.wait_for(conn.wait_closed(), 2)


async def _first(*aws: asyncio.Future[Any]) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


def _raise_failures(runner: asyncio.Task[Any], watcher: asyncio.Task[Any] | None,
                    link: AgentLink) -> None:
    for task in (runner, watcher):
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise exc
    if link.internal is not None:
        raise link.internal
    if link.failure is not None:
        raise link.failure
    if link.goodbye is not None:
        raise LinkBroken(f"the agent ended the session: {link.goodbye.reason}")


def default_local_root(given: str | None) -> Path:
    return Path(given or os.getcwd()).expanduser().resolve()
