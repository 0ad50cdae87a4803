"""The sync engine: the asyncio driver of the client core.

The decisions live in sans-IO parts: `PathQueue` (each path's state, idle, the flush
watermark), `Window` (operations in flight and what a reply means), `planner` (the model
from the manifest, and which paths differ) and `RemoteModel` (what the remote holds). This
driver moves between them: it takes the next queued path, looks at it locally (stat here,
reads in worker threads), sends the operations that make the remote match, feeds replies
back, and runs the convergence checks — after the watcher goes quiet (the directories it
touched), after an overflow or on a slow timer (the whole tree) — queueing whatever they
find. "Idle" is the queue's idle; the `in_sync` report says that a check found nothing
left and since when every change is on the remote.

The parts it drives are its own, each with its own state: the target's remote side
(`lsync.client.remote.remoteside.RemoteSide`: model, queue, window, check schedule, what each
answer means), the passes over one path at a time (`lsync.client.remote.passes.PathPasses`, which
read the shared local side through `LocalInputs`; safety there: before any delete the local
root is checked, and a vanished or suddenly empty root raises `SafetyStop`, sending nothing
more), the convergence checks and in-sync reports (`lsync.client.remote.convergence`) and the
read-ahead of bulk work (`lsync.client.remote.sender.ReadAhead`). The properties and one-line
methods below are what the session, the build loop and the tests see of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lsync.client.errors import LsyncError, internal_error
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import LocalEntry
from lsync.client.local.localside import SharedReads
from lsync.client.remote.convergence import Convergence
from lsync.client.remote.initial import initial_comparison
from lsync.client.remote.model import FILE, RemoteModel
from lsync.client.remote.passes import LocalInputs, Outcome, PathPasses
from lsync.client.remote.pathqueue import PathQueue, PathRecord, State
from lsync.client.remote.remoteside import Counters, RemoteSide
from lsync.client.remote.sender import (
    PREFETCH,
    Packing,
    ReadAhead,
    sign_local,
)
from lsync.client.remote.window import Window
from lsync.client.reporter import Reporter
from lsync.client.transport.link import AgentLink
from lsync.client.transport.outbox import SHARED_BATCHES
from lsync.protocol import packing
from lsync.protocol.paths import relpath_problem

YIELD_EVERY = 0.005  # seconds of passes before the engine lets the event loop run
PREFETCH_LOOK = 128  # queued paths examined for reading ahead, from the head
LANES_HOLD_MAX = 2.0  # seconds bulk work may wait for the data lanes being opened
SIGN_AHEAD_MIN = 256 << 10  # verified remote files this big are signed once in sync
SIGN_AHEAD_MAX = 64 << 20


class SyncEngine:
    """The driver of one target's core: its remote side (lsync.client.remote.remoteside), the
    passes over its paths (lsync.client.remote.passes), the read-ahead, the convergence checks."""

    def __init__(self, link: AgentLink, root: Path, rules: IgnoreRules, cache: HashCache,
                 reporter: Reporter, delete_extra: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 compression: str = packing.ZLIB, long_link: bool = False,
                 seen_until: Callable[[], int] = time.time_ns,
                 close_events: bool = False, reads: SharedReads | None = None) -> None:
        self.root = root
        self.rules = rules
        self.cache = cache
        self.reporter = reporter
        self.clock = clock
        # Wall time (ns) before which every local change has been marked here (the watcher
        # has delivered its events); the `in_sync` report is as of then at the latest.
        self.seen_until = seen_until
        self.side = RemoteSide(link, reporter, clock, Packing(compression, long_link),
                               delete_extra)
        # (close_events: the watcher reports when writers close files, hold/release: no
        # settling guess. reads: one read of a save for every target.)
        self.passes = PathPasses(self.side, LocalInputs(
            root, rules, cache, seen_until, close_events, reads,
            reads.stat_epoch if reads is not None else lambda: None))
        # (With several targets, what one read ahead the others take: SharedReads.ahead.)
        self.read_ahead = ReadAhead(root, cache, reads.ahead if reads is not None else None,
                                    self.passes.local.epoch)
        if reads is not None:  # (the links' batches are packed once for every target too)
            SHARED_BATCHES.sharers = reads.sharers
        self.remote_hashed = 0  # remote files the initial comparison had the agent hash
        self.convergence = Convergence(self.side, self.passes.local, self.passes.check_root)
        self._ahead: asyncio.Task[None] | None = None  # a check while answers travel
        self._lanes_hold_until: float | None = None  # see _held_for_lanes

    # -- the remote side, as the session, the build loop and the tests see it ---------------
    @property
    def link(self) -> AgentLink:
        return self.side.link

    @property
    def model(self) -> RemoteModel:
        return self.side.model

    @model.setter
    def model(self, model: RemoteModel) -> None:
        self.side.model = model

    @property
    def queue(self) -> PathQueue:
        return self.side.queue

    @property
    def window(self) -> Window:
        return self.side.window

    @property
    def counters(self) -> Counters:
        return self.side.counters

    @property
    def skipped(self) -> dict[str, tuple[int, int, int, int]]:
        return self.side.skipped

    @property
    def packing(self) -> Packing:
        return self.side.packing

    @property
    def delete_extra(self) -> bool:
        return self.side.delete_extra

    def mark_dirty(self, paths: Iterable[str], since: float | None = None,
                   hint: bool = True, urgent: bool | None = None) -> None:
        """RemoteSide.mark_dirty: these paths may have changed."""
        self.side.mark_dirty(paths, since, hint, urgent)

    def hold(self, paths: Iterable[str]) -> None:
        """Their writers still have them open (the watcher saw writes and no close)."""
        self.queue.hold(paths, self.clock())
        self.side.poke()

    def release(self, paths: Iterable[str]) -> None:
        """Their writers closed them."""
        self.queue.release(paths, self.clock())
        self.side.poke()

    def check_all(self, reason: str) -> None:
        """Compare the whole tree with the model once the queue is idle (events were lost)."""
        self.side.checks.whole(reason)
        self.side.poke()

    def report_again(self) -> None:
        """Something that held back the last in-sync report (git's index being read) is
        over: once idle, check and report again."""
        self.side.checks.worked()
        self.side.poke()

    async def wait_idle(self) -> None:
        await self.side.wait_idle()

    async def wait_flushed(self, tick: int) -> None:
        await self.side.wait_flushed(tick)

    def pending_paths(self) -> list[str]:
        return self.side.pending_paths()

    @property
    def idle(self) -> bool:
        return self.queue.idle

    # -- initial comparison ---------------------------------------------------------------
    async def initial_sync(self, local: dict[str, LocalEntry],
                           remote_entries: list[list[Any]],
                           loaded: tuple[RemoteModel, list[str]] | None = None) -> None:
        """Load the remote manifest (or take `loaded`, what `planner.load_manifest` made of
        it with this `local`) and queue every path where local and remote differ
        (lsync.client.remote.initial)."""
        self.remote_hashed = await initial_comparison(
            self.side, self.passes.local, self.read_ahead.pool(), local, remote_entries,
            loaded)

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Drive the core for ever (until cancelled, or a SafetyStop)."""
        signer = asyncio.ensure_future(self._sign_ahead())
        yielded = time.monotonic()
        try:
            while True:
                # Cleared before the work, not before the wait: a poke that comes while
                # this iteration awaits (a read, a convergence check) is not lost.
                self.side.wake.clear()
                if self.side.failure is not None:
                    raise self.side.failure
                now = self.clock()
                self.queue.wake(now)
                if not self.queue.urgent:
                    self.side.urgent_work.clear()
                # (A save goes even when bulk work has filled the window: it is small.)
                held = not self.queue.urgent and self._held_for_lanes(now)
                if held and self.queue.queued:
                    self._read_ahead()  # (the reading goes on meanwhile)
                if (self.queue.queued and not held
                        and (self.window.has_space() or self.queue.urgent)):
                    taken = self.queue.take()
                    if taken is not None:
                        self.side.checks.worked()
                        await self._pass(*taken)
                        self.side.poke()
                    if time.monotonic() - yielded >= YIELD_EVERY:
                        # Passes over files read ahead need not suspend at all: let the
                        # replies, the watcher, timers and the control socket run.
                        await asyncio.sleep(0)
                        yielded = time.monotonic()
                    continue
                if self._ahead is not None and (self._ahead.done() or self.queue.idle):
                    ahead, self._ahead = self._ahead, None
                    await ahead  # (its findings come before a report; a SafetyStop ends here)
                    continue
                if self.queue.idle and self.window.has_space():
                    await self.convergence.check_if_due(now)
                    if self.queue.queued:
                        continue
                elif (not self.queue.queued and self._ahead is None
                      and self.side.checks.ahead_due):
                    # While the last answers travel; passes go on meanwhile.
                    self._ahead = asyncio.ensure_future(self.convergence.check_ahead())
                timeout = self._next_wake(now)
                self.link.close_batch()  # nothing more to add to it now
                if not self.queue.queued:
                    self.passes.bursting = False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.side.wake.wait(), timeout)
        finally:
            signer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await signer
            if self._ahead is not None:
                self._ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, LsyncError):
                    await self._ahead  # (what ends the session is already on its way)
                self._ahead = None
            self.read_ahead.close()

    def _held_for_lanes(self, now: float) -> bool:
        """Whether bulk work waits for the data lanes, opened with the welcome (two round
        trips), and at most LANES_HOLD_MAX: sent on the main channel meanwhile, it would be
        ahead of every save made before the lanes are there (a save waited 360 ms behind
        it at RTT 300 ms). Saves go meanwhile, on the main channel."""
        opening = self.link.lanes_opening
        if opening is None or opening.done():
            return False
        if self._lanes_hold_until is None:
            self._lanes_hold_until = now + LANES_HOLD_MAX
            opening.add_done_callback(lambda _: self.side.poke())
        return now < self._lanes_hold_until

    def _next_wake(self, now: float) -> float | None:
        hold = self._lanes_hold_until if self._held_for_lanes(now) else None
        wakes = [t - now for t in (self.queue.next_due(), self.convergence.report_due, hold)
                 if t is not None]
        if self.queue.idle and not self.queue.records:
            wakes.append(self.side.checks.next_time() - now)
        return max(0.0, min(wakes)) if wakes else None

    async def _sign_ahead(self) -> None:
        """Once in sync, sign the bigger remote files that lsync verified but never sent
        (it has no signature of them, and none was stored), so that their first edit is a
        delta too. One file at a time in a worker thread, only while idle and checked."""
        await self._wait_settled()
        todo = [path for path, entry in self.model.entries.items()
                if entry.kind == FILE and entry.owned and entry.signature is None
                and entry.digest is not None
                and SIGN_AHEAD_MIN <= entry.size <= SIGN_AHEAD_MAX]
        signed = 0
        for path in todo:
            await self._wait_settled()
            entry = self.model.get(path)
            if entry is None or entry.signature is not None or entry.digest is None:
                continue
            digest = entry.digest
            result = await asyncio.wrap_future(self.read_ahead.pool().submit(
                sign_local, self.root, path, self.cache, digest, SIGN_AHEAD_MAX))
            entry = self.model.get(path)
            if (result is not None and entry is not None and entry.digest == digest
                    and entry.signature is None):
                entry.signature = result
                signed += 1
        if signed:
            self.reporter.note(f"{signed} big files signed: their first edits travel as deltas")

    async def _wait_settled(self) -> None:
        """Until idle with no convergence check due or under way: signing ahead competes
        for the CPU with the check an in-sync report waits for."""
        while not self.convergence.settled:
            self.side.changed.clear()
            await self.side.changed.wait()

    def _read_ahead(self) -> None:
        """Start reading the next queued new files in worker threads (in groups: only
        once at most half of what may be read ahead is left). The root and names the
        agent would refuse are never files to read."""
        futures = self.read_ahead.futures
        if len(futures) > PREFETCH // 2:
            return
        upcoming: list[str] = []
        # What the remote is believed to hold: a file the hash cache says still has that
        # content is not read (a rescan after a rules change queues the whole subtree).
        believed: dict[str, bytes] = {}
        for path in self.queue.peek(PREFETCH_LOOK):
            if not path or path in futures:  # (the root; being read already)
                continue
            entry = self.model.get(path)
            if entry is not None and (entry.kind != FILE or entry.signature is not None):
                continue  # not a file, or one whose edit travels as a delta
            if relpath_problem(path):
                continue
            upcoming.append(path)
            if entry is not None and entry.digest is not None:
                believed[path] = entry.digest
        self.read_ahead.start(
            upcoming, self.packing.packer(burst=True, backlogged=self.passes.bulk_backlogged()),
            believed)

    # -- one pass over one path -----------------------------------------------------------
    async def _pass(self, path: str, record: PathRecord) -> None:
        """Look at `path` and send what makes the remote match; ends the pass in the queue
        (done, deferred, retried later or failed) whatever happens."""
        ahead = self.read_ahead.take(path)
        if self.queue.queued > 1:
            self._read_ahead()
        try:
            outcome = await self.passes.reconcile(path, record, ahead)
        except LsyncError:  # the link broke, a safety stop: the session's business
            if self.queue.state(path) is not None:
                self.queue.done(path, self.clock())
            raise
        except Exception as exc:
            # A bug met while syncing one path is that path's failure, retried with
            # backoff and reported (the traceback goes to the client log): the session
            # and every other path go on.
            bug = internal_error(f"syncing {path!r}", exc)
            self.counters.errors += 1
            if self.queue.state(path) is State.READING:
                self.queue.fail(path, self.clock(), str(bug), own_pass=True)
            self.reporter.failed(path, str(bug))
            return
        except BaseException:
            if self.queue.state(path) is not None:
                self.queue.done(path, self.clock())
            raise
        if outcome is Outcome.DONE:
            self.queue.done(path, self.clock())

