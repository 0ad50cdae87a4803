"""One target's remote side of the client core: what lsync believes the remote holds, what
it still has to make true there, what is in flight, and what each answer means.

`RemoteSide` holds the sans-IO parts for one target — the model of the remote
(`RemoteModel`), the queue of paths with each one's state (`PathQueue`), the window of
operations in flight (`Window`), the convergence-check schedule (`CheckSchedule`) — with
the link they travel on, and applies the agent's answers to them (`verdict` says what an
answer means; here it is carried out: a refused delete puts its entry back, a refused link
or directory is forgotten, a refused operation makes its owner ask the agent what is there
before its next pass, counters and reports). It does no local I/O: the passes over paths
(lsync.client.remote.passes) and the engine's loop (lsync.client.remote.engine) drive it. A
bug met while applying an answer is kept as `failure` (an answer's callback must not raise) for the
engine's loop to raise.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from lsync.client.errors import InternalError, internal_error
from lsync.client.remote.checks import CheckSchedule
from lsync.client.remote.model import DIR, LINK, RemoteModel
from lsync.client.remote.pathqueue import PathQueue
from lsync.client.remote.sender import Packing, RecentBases
from lsync.client.remote.window import InFlight, Op, Window, verdict
from lsync.client.reporter import Reporter
from lsync.client.transport.link import AgentLink, Reply
from lsync.protocol import messages as m

URGENT_MAX = 16  # a watcher batch of at most this many paths is a save, not a burst...
BURST_WINDOW = 0.5  # ... unless more came within this many seconds (a burst in small batches)
EDITOR_SAVE_MAX = 2  # paths of a batch that is a save even then (a file, its backup or temp)


@dataclass
class Counters:
    files: int = 0
    bytes: int = 0
    errors: int = 0
    last_latency: float | None = None
    checks: int = 0  # convergence checks run
    found: int = 0  # differences they found


class RemoteSide:
    def __init__(self, link: AgentLink, reporter: Reporter, clock: Callable[[], float],
                 packing: Packing, delete_extra: bool) -> None:
        self.link = link
        self.reporter = reporter
        self.clock = clock
        self.packing = packing
        self.delete_extra = delete_extra
        self.model = RemoteModel()
        self.queue = PathQueue()
        self.window = Window()
        self.checks = CheckSchedule(clock())
        self.counters = Counters()
        self.recent = RecentBases()
        self.urgent_work = asyncio.Event()  # urgent paths are queued
        self.changed = asyncio.Event()  # the queue or the window changed: waiters re-check
        self.wake = asyncio.Event()  # the same, for the engine's loop alone (it clears it)
        self.queued_dirs: set[str] = set()  # marked paths that are directories remotely
        # Owner path -> remote paths where an operation its pass sent was refused: what is
        # there is not known any more; its next pass asks the agent first (passes._relearn).
        self.unsure: dict[str, set[str]] = {}
        # Files too big to sync (passes.MAX_FILE): path -> the version (local_key) skipped.
        self.skipped: dict[str, tuple[int, int, int, int]] = {}
        self.initial_total = (0, 0)  # files and bytes the initial comparison queued
        self.initial_done = (0, 0)
        self.failure: InternalError | None = None  # a bug in an answer's callback
        # When (Unix ns) the watcher last delivered changes here: an in-sync report as of
        # an earlier moment does not cover them (lsync.client.remote.convergence says it again).
        self.marked_ns = 0
        self._recent_marks: deque[tuple[float, int]] = deque()  # (when, paths) of batches
        self._recent_paths = 0

    # -- input ----------------------------------------------------------------------------
    def mark_dirty(self, paths: Iterable[str], since: float | None = None,
                   hint: bool = True, urgent: bool | None = None) -> None:
        """These paths may have changed. `hint`: from the watcher (their directories are
        checked once it goes quiet, and a failing path is retried at once). `urgent`: taken
        before the bulk work queued (default: a watcher batch of a few paths, a save)."""
        paths = list(paths)
        if hint and paths:
            self.marked_ns = time.time_ns()
        for path in paths:
            if hint:
                self.checks.touched(path)
            entry = self.model.get(path)
            if entry is not None and entry.kind == DIR:
                self.queued_dirs.add(path)
        if urgent is None:  # a few paths from the watcher are a save
            urgent = hint and self._is_save(len(paths))
        if urgent and paths:
            self.urgent_work.set()  # a pass waiting for bulk backpressure lets it go first
        if self.queue.mark(paths, self.clock(), since, retry_failed=hint, urgent=urgent):
            self.poke()

    def _is_save(self, count: int) -> bool:
        """Whether a watcher batch of `count` paths is a save (taken before bulk work, sent
        on its own and packed small) rather than part of a burst. A checkout or a build
        that writes hundreds of files reaches lsync in watcher batches of a few paths each:
        once more than URGENT_MAX paths came within BURST_WINDOW, only a batch of one or
        two paths (an editor's save) is a save; the rest go the bulk way (read ahead, in
        batches)."""
        now = self.clock()
        recent = self._recent_marks
        while recent and now - recent[0][0] > BURST_WINDOW:
            self._recent_paths -= recent.popleft()[1]
        recent.append((now, count))
        self._recent_paths += count
        if count > URGENT_MAX:
            return False
        return count <= EDITOR_SAVE_MAX or self._recent_paths <= URGENT_MAX

    def poke(self) -> None:
        self.changed.set()
        self.wake.set()
        self.reporter.queue(self.queue.queued, len(self.window))

    async def wait_idle(self) -> None:
        """Return once nothing is queued, held or being read and every operation sent has
        been answered (paths that failed wait for their retry and do not count)."""
        while not self.queue.idle:
            self.changed.clear()
            await self.changed.wait()

    async def wait_flushed(self, tick: int) -> None:
        """Return once every change marked before the queue's tick `tick` is acknowledged."""
        while not self.queue.flushed(tick):
            self.changed.clear()
            await self.changed.wait()

    def pending_paths(self) -> list[str]:
        """Paths the next connection must look at: every path with a record here, and both
        ends of every operation in flight (the remote may or may not have applied them)."""
        paths = dict.fromkeys(self.queue.records)
        for flight in self.window.flights.values():
            paths[flight.target] = None
            if flight.src:
                paths[flight.src] = None
        paths.pop("", None)
        return list(paths)

    # -- across connections ------------------------------------------------------------------
    def owned_now(self) -> tuple[set[str], set[str]]:
        """For the next connection: the remote paths lsync owns, and the trees of deletes
        and renames still unanswered (everything below them was lsync's)."""
        owned = {path for path, entry in self.model.entries.items() if entry.owned}
        trees: set[str] = set()
        for flight in self.window.flights.values():
            if flight.op is Op.DELETE:
                trees.add(flight.target)
            elif flight.op is Op.RENAME:
                trees.add(flight.src)
        return owned, trees

    def adopt_owned(self, owned: set[str], trees: set[str], local: Container[str]
                    ) -> list[str]:
        """After a reconnect: mark what lsync owned before (`owned_now` of the last
        connection) as owned again in this model, and return those paths that are gone
        locally (they are to be deleted remotely)."""
        if not owned and not trees:
            return []
        tops = tuple(trees)
        gone: list[str] = []
        for path, entry in self.model.entries.items():
            if entry.owned:
                continue
            if path in owned or any(path == top or path.startswith(top + "/") for top in tops):
                entry.owned = True
                if path not in local:
                    gone.append(path)
        return gone

    # -- sending --------------------------------------------------------------------------
    def submit(self, message: m.Message, flight: InFlight) -> None:
        seq: int = message.seq  # type: ignore[union-attr]
        self.window.add(seq, flight)
        if flight.op is not Op.DICTIONARY:
            self.queue.sent(flight.owner)
        future = self.link.submit(message, flight.lane)
        future.add_done_callback(lambda done: self._on_reply(seq, done))

    def submit_batched(self, seq: int, path: str, mode: int, content: bytes,
                       flight: InFlight, digest: bytes | None = None) -> None:
        """A small whole file of a burst: it travels in a WriteBatch with its neighbours
        (with `digest`, the agent's hash of its content, which the agent then records
        without hashing it again)."""
        self.window.add(seq, flight)
        self.queue.sent(flight.owner)
        # Compress fast while the link keeps up, harder once data waits for it.
        level = (self.packing.long_bulk if self.link.backlogged(flight.lane)
                 else self.packing.bulk)
        future = self.link.submit_batched(seq, path, mode, content, self.packing.code, level,
                                          flight.lane, digest)
        future.add_done_callback(lambda done: self._on_reply(seq, done))

    # -- acknowledgements -----------------------------------------------------------------
    def _on_reply(self, seq: int, future: asyncio.Future[Reply]) -> None:
        """A done-callback: an exception here would only be logged by asyncio, so a bug is
        kept and raised by the engine's loop (an internal error ends the session, never
        silently)."""
        try:
            self._apply_reply(seq, future)
        except Exception as exc:
            if self.failure is None:
                self.failure = internal_error("applying an acknowledgement", exc)
            self.poke()

    def _apply_reply(self, seq: int, future: asyncio.Future[Reply]) -> None:
        if future.cancelled() or future.exception() is not None:
            # The link broke: no answer came. The operation stays in the window, where the
            # session finds what the next connection must redo (`pending_paths`, and the
            # trees of deletes and renames lsync owned: Session._carry_over).
            return
        flight = self.window.answer(seq)
        if flight is None:
            return
        reply = future.result()
        below = None
        if flight.op is Op.RENAME and isinstance(reply, m.Error):
            # The model moved the tree when the Rename was sent: it did not move remotely.
            if self.model.get(flight.target) is not None and flight.src:
                self.model.move_tree(flight.target, flight.src)
                self.model.set_digest(flight.src, None)
            below = [*self.model.descendants(flight.src), flight.src, flight.target]
        result = verdict(flight, reply, self.packing.dictionary_failed, below)
        if flight.op is Op.DELETE:
            self._after_delete(flight, result.ok)
        elif not result.ok:
            self._after_refusal(flight)
        now = self.clock()
        if result.retry_later:  # before `answered`, which forgets a path with nothing left
            self.queue.fail(flight.owner, now, result.failure)
            self.unsure.setdefault(flight.owner, set()).add(flight.target)
        if result.look_again:  # (also before it: the path keeps its tick, a flush waits)
            self.mark_dirty(result.look_again, hint=False)
        if flight.op is not Op.DICTIONARY:
            self.queue.answered(flight.owner, result.ok)
        if result.drop_dictionary:
            self.packing.drop_dictionary()
        if result.synced_file:
            self._count_write(flight, now)
        if result.ok and flight.op is not Op.DICTIONARY:
            self.reporter.acked(flight.target, now - flight.since, flight.nbytes)
        for path in result.unknown:
            self.model.set_digest(path, None)
        if result.note:
            self.reporter.note(result.note)
        if result.failure:
            self.counters.errors += 1
            self.reporter.failed(flight.target, result.failure)
        self.poke()

    def _after_delete(self, flight: InFlight, ok: bool) -> None:
        """A refused delete leaves its entry on the remote: the model gets it back (owned,
        content unknown) so that the retry of its owner deletes it again; a directory
        kept because such an entry is still in it comes back too. (Unless the path was
        made again meanwhile: then the model already says what it holds.)"""
        target, entry = flight.target, flight.dropped
        if entry is None or self.model.get(target) is not None:
            return
        if ok and not (entry.kind == DIR and self.model.child_names(target)):
            return
        entry.owned = True
        if entry.kind != DIR:
            entry.digest, entry.signature = None, None
        self.model.put(target, entry)

    def _after_refusal(self, flight: InFlight) -> None:
        """The model took a link or a directory as there when it was sent; refused, it is
        not (or may not be): forget it, so that the retry sends it again (it found nothing
        to do, and the path counted as synced). (A refused write or mode change leaves the
        file's content unknown: its retry sends it whole, mode included.)"""
        entry = self.model.get(flight.target)
        if entry is None:
            return
        if flight.op is Op.SYMLINK and entry.kind == LINK:
            self.model.drop(flight.target)
        elif flight.op is Op.MKDIR and entry.kind == DIR:
            self.model.drop_tree(flight.target)  # what was sent below it was refused too

    def _count_write(self, flight: InFlight, now: float) -> None:
        self.counters.files += 1
        self.counters.bytes += flight.nbytes
        self.counters.last_latency = now - flight.since
        files, nbytes = self.initial_done
        total_files, total_bytes = self.initial_total
        if files < total_files:
            self.initial_done = (files + 1, nbytes + flight.nbytes)
            self.reporter.progress(nbytes + flight.nbytes, total_bytes, files + 1, total_files)
