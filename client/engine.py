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

Safety: before any delete the engine checks that the local root still exists and is not
suddenly empty; otherwise it raises `SafetyStop` and sends nothing more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsync.client import planner, sigstore
from lsync.client.delta import Signature, signature
from lsync.client.errors import InternalError, SafetyStop, internal_error
from lsync.client.hashcache import HashCache
from lsync.client.ignore import IgnoreRules
from lsync.client.link import AgentLink, Reply
from lsync.client.model import DIR, FILE, LINK, RemoteEntry, RemoteModel
from lsync.client.pathqueue import PathQueue, PathRecord
from lsync.client.reporter import Reporter
from lsync.client.scanner import (
    LocalEntry,
    ScanError,
    UnstableFileError,
    read_file_stable,
    scan_dir,
    scan_tree,
)
from lsync.client.sender import (
    Packing,
    Prepared,
    ReadAhead,
    RecentBases,
    content_messages,
    delta_message,
    pieces_of,
    sign_local,
    still_current,
)
from lsync.client.window import InFlight, Op, Window, verdict
from lsync.protocol import messages as m
from lsync.protocol import packing
from lsync.protocol.paths import relpath_problem

HASH_BATCH = 2000
UNSTABLE_RETRY = 0.05
DELETE_WAIT = 0.01  # a delete waits this long (again) while the watcher has undelivered events
SETTLE_SIZE = 1 << 20  # without close-write events, files this big wait to be still
SETTLE = 0.02
MAX_FILE = 1 << 30  # files are read whole into memory; bigger ones are reported
BULK_QUEUE = 100  # more queued paths than this: compress for speed
DICTIONARY_MIN_FILES = 64  # an initial sync of this many files sets a preset dictionary
DICTIONARY_SAMPLES = 16
DICTIONARY_SAMPLE_MAX = 256 << 10
RENAME_MATCH = 0.5  # share of a vanished directory's files a new one must hold to be its move
PREFETCH_LOOK = 64  # queued paths examined for reading ahead, from the head
SIGN_AHEAD_MIN = 256 << 10  # verified remote files this big are signed once in sync
SIGN_AHEAD_MAX = 64 << 20
REAL_PARENT_TTL = 0.05  # seconds a "this directory is no symlink" answer is reused
FULL_CHECK_EVERY = 600.0  # seconds between whole-tree convergence checks while idle
QUIET_CHECK_LIMIT = 256  # more touched directories than this: check the whole tree


@dataclass
class Counters:
    files: int = 0
    bytes: int = 0
    errors: int = 0
    last_latency: float | None = None
    checks: int = 0  # convergence checks run
    found: int = 0  # differences they found


class SyncEngine:
    def __init__(self, link: AgentLink, root: Path, rules: IgnoreRules, cache: HashCache,
                 reporter: Reporter, delete_extra: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 compression: str = packing.ZLIB, long_link: bool = False,
                 seen_until: Callable[[], int] = time.time_ns,
                 close_events: bool = False) -> None:
        self.link = link
        self.root = root
        self.rules = rules
        self.cache = cache
        self.reporter = reporter
        self.delete_extra = delete_extra
        self.clock = clock
        # Wall time (ns) before which every local change has been marked here (the watcher
        # has delivered its events); the `in_sync` report is as of then at the latest.
        self.seen_until = seen_until
        # The watcher reports when writers close files (hold/release): no settling guess.
        self.close_events = close_events
        self.packing = Packing(compression, long_link)
        self.queue = PathQueue()
        self.window = Window()
        self.model = RemoteModel()
        self.counters = Counters()
        self.read_ahead = ReadAhead(root, cache)
        self.recent = RecentBases()
        self._changed = asyncio.Event()  # the queue or the window changed: re-check
        self._touched: set[str] = set()  # directories of hinted paths since the last check
        self._queued_dirs: set[str] = set()  # marked paths that are directories remotely
        self._full_check: str | None = None  # why the whole tree must be checked, if it must
        self._last_full = clock()
        self._real_parents: dict[str, tuple[bool, float]] = {}
        self._initial_total = (0, 0)
        self._initial_done = (0, 0)
        self._worked = False  # something was sent since the last in_sync report
        self._failure: InternalError | None = None  # a bug in a reply callback

    # -- input ----------------------------------------------------------------------------
    def mark_dirty(self, paths: Iterable[str], since: float | None = None,
                   hint: bool = True) -> None:
        """These paths may have changed. `hint`: from the watcher (their directories are
        checked once it goes quiet, and a failing path is retried at once)."""
        paths = list(paths)
        for path in paths:
            if hint:
                self._touched.add(path.rpartition("/")[0])
            entry = self.model.get(path)
            if entry is not None and entry.kind == DIR:
                self._queued_dirs.add(path)
        if self.queue.mark(paths, self.clock(), since, retry_failed=hint):
            self._poke()

    def hold(self, paths: Iterable[str]) -> None:
        """Their writers still have them open (the watcher saw writes and no close)."""
        self.queue.hold(paths, self.clock())
        self._poke()

    def release(self, paths: Iterable[str]) -> None:
        """Their writers closed them."""
        self.queue.release(paths, self.clock())
        self._poke()

    def check_all(self, reason: str) -> None:
        """Compare the whole tree with the model once the queue is idle (events were lost)."""
        self._full_check = reason
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self.reporter.queue(self.queue.queued, len(self.window))

    @property
    def idle(self) -> bool:
        return self.queue.idle

    async def wait_idle(self) -> None:
        """Return once nothing is queued, held or being read and every operation sent has
        been answered (paths that failed wait for their retry and do not count)."""
        while not self.queue.idle:
            self._changed.clear()
            await self._changed.wait()

    async def wait_flushed(self, tick: int) -> None:
        """Return once every change marked before the queue's tick `tick` is acknowledged."""
        while not self.queue.flushed(tick):
            self._changed.clear()
            await self._changed.wait()

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

    # -- initial comparison ---------------------------------------------------------------
    async def initial_sync(self, local: dict[str, LocalEntry],
                           remote_entries: list[list[Any]]) -> None:
        """Load the remote manifest and queue every path where local and remote differ."""
        self.model, need_hash = planner.load_manifest(remote_entries, local,
                                                      self.rules.is_ignored)
        if self.delete_extra and not local and len(self.model):
            raise SafetyStop(
                f"the local tree {self.root} is empty while the remote holds "
                f"{len(self.model)} entries; refusing to delete them (--delete)")
        batches = [need_hash[i:i + HASH_BATCH] for i in range(0, len(need_hash), HASH_BATCH)]
        results = await asyncio.gather(*(self.link.hash_paths(b) for b in batches))
        for batch, digests in zip(batches, results, strict=True):
            for path, digest in zip(batch, digests, strict=True):
                self.model.set_digest(path, digest)
                entry = self.model.get(path)
                if entry is not None:
                    planner.settle_ownership(entry)
        to_send = planner.differences(local, self.model, self.rules.is_ignored,
                                      self.delete_extra)
        files = [p for p in to_send if p in local and local[p].kind == "file"]
        if len(files) >= DICTIONARY_MIN_FILES and self.packing.code == packing.PACK_ZLIB:
            self._set_dictionary(files)
        self._initial_total = (len(files), sum(local[p].size for p in files))
        self._initial_done = (0, 0)
        self.mark_dirty(to_send, hint=False)

    def _set_dictionary(self, files: list[str]) -> None:
        """Give the agent a preset dictionary sampled from the files about to be sent: the
        starts of files spread over the list (licence headers, includes, idioms)."""
        step = max(1, len(files) // DICTIONARY_SAMPLES)
        pieces: list[bytes] = []
        for path in files[::step][:DICTIONARY_SAMPLES]:
            try:
                content, _ = read_file_stable(self.root, path, self.cache,
                                              limit=DICTIONARY_SAMPLE_MAX)
            except (OSError, ScanError):
                continue
            pieces.append(content[:m.MAX_DICTIONARY // DICTIONARY_SAMPLES])
        dictionary = b"".join(pieces)[-m.MAX_DICTIONARY:]
        if len(dictionary) < 1024:
            return
        self._submit(m.SetDictionary(self.link.next_seq(), dictionary),
                     InFlight("", Op.DICTIONARY, "", self.clock()))
        self.packing.dictionary = dictionary

    # -- signatures kept between sessions (lsync.client.sigstore) -------------------------
    def adopt_signatures(self, stored: dict[str, tuple[bytes, Signature]]) -> int:
        """Take the stored signatures of remote files that still hold the version they were
        made for; returns how many were taken."""
        taken = 0
        for path, (digest, sig) in stored.items():
            entry = self.model.get(path)
            if (entry is not None and entry.kind == FILE and entry.owned
                    and entry.signature is None and entry.digest == digest
                    and entry.size == sig.size):
                entry.signature = sig
                taken += 1
        return taken

    def signatures_to_keep(self) -> list[tuple[str, bytes, Signature]]:
        return [(path, entry.digest, entry.signature)
                for path, entry in self.model.entries.items()
                if entry.kind == FILE and entry.digest is not None
                and entry.signature is not None and entry.size >= sigstore.MIN_SIZE]

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Drive the core for ever (until cancelled, or a SafetyStop)."""
        signer = asyncio.ensure_future(self._sign_ahead())
        try:
            while True:
                if self._failure is not None:
                    raise self._failure
                now = self.clock()
                self.queue.wake(now)
                if self.queue.queued and self.window.has_space():
                    taken = self.queue.take()
                    if taken is not None:
                        self._worked = True
                        await self._pass(*taken)
                        self._poke()
                    continue
                if self.queue.idle and self.window.has_space():
                    await self._check_if_due(now)
                    if self.queue.queued:
                        continue
                timeout = self._next_wake(now)
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
        finally:
            signer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await signer
            self.read_ahead.close()

    def _next_wake(self, now: float) -> float | None:
        wakes = [t - now for t in (self.queue.next_due(),) if t is not None]
        if self.queue.idle and not self.queue.records:
            wakes.append(self._last_full + FULL_CHECK_EVERY - now)
        return max(0.0, min(wakes)) if wakes else None

    async def _check_if_due(self, now: float) -> None:
        """The queue is idle: check what may have changed, and say so when all is in sync."""
        as_of = self.seen_until()
        if self._full_check is not None or now - self._last_full >= FULL_CHECK_EVERY or (
                len(self._touched) > QUIET_CHECK_LIMIT):
            reason = self._full_check or ("many directories changed" if self._touched
                                          else "periodic check")
            self._full_check = None
            self._touched.clear()
            self._last_full = now
            found = await self._check(None, reason)
        elif self._touched:
            touched, self._touched = self._touched, set()
            found = 0
            for directory in sorted(touched):
                found += await self._check(directory, "")
        else:
            if self._worked:
                self._worked = False
                self._report_in_sync(as_of)
            return
        if not found and self.queue.idle:
            self._worked = False
            self._report_in_sync(as_of)

    def _report_in_sync(self, as_of: int) -> None:
        failing = self.queue.failing()
        if failing:
            self.reporter.note(f"idle; {len(failing)} paths failing, retried with backoff "
                               f"(first: {next(iter(failing))}: {next(iter(failing.values()))})")
            return
        self.reporter.in_sync(as_of, self.counters.files, self.counters.bytes)

    async def _check(self, directory: str | None, reason: str) -> int:
        """Compare the local tree (all of it, or one directory's entries) with the model and
        queue what differs; returns how many paths."""
        self.counters.checks += 1
        try:
            local: dict[str, LocalEntry] | None
            if directory is None:
                local = await asyncio.to_thread(scan_tree, self.root, self.rules, self.cache,
                                                on_error=lambda rel, exc: None)
            else:
                local = await asyncio.to_thread(scan_dir, self.root, directory, self.rules,
                                                self.cache)
        except OSError as exc:
            self._check_root()
            self.reporter.note(f"convergence check of {directory or 'the tree'} failed: {exc}")
            return 0
        if local is None:  # the directory is gone: its parent's check covers it
            if directory:
                self._touched.add(directory.rpartition("/")[0])
            return 0
        found = planner.differences(local, self.model, self.rules.is_ignored,
                                    self.delete_extra, under=directory,
                                    shallow=directory is not None)
        found = [p for p in found if p not in self.queue]
        if found:
            self.counters.found += len(found)
            where = "the tree" if directory is None else (directory or "the root")
            why = f" ({reason})" if reason else ""
            self.reporter.note(f"check of {where}{why}: {len(found)} paths differ, "
                               f"syncing them (first: {found[0]})")
            self.mark_dirty(found, hint=False)
        return len(found)

    async def _sign_ahead(self) -> None:
        """Once in sync, sign the bigger remote files that lsync verified but never sent
        (it has no signature of them, and none was stored), so that their first edit is a
        delta too. One file at a time in a worker thread, only while idle."""
        await self.wait_idle()
        todo = [path for path, entry in self.model.entries.items()
                if entry.kind == FILE and entry.owned and entry.signature is None
                and entry.digest is not None
                and SIGN_AHEAD_MIN <= entry.size <= SIGN_AHEAD_MAX]
        signed = 0
        for path in todo:
            await self.wait_idle()
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

    def _read_ahead(self) -> None:
        """Start reading the next queued new files in worker threads."""
        upcoming = [p for p in self.queue.peek(PREFETCH_LOOK)
                    if (e := self.model.get(p)) is None
                    or (e.kind == FILE and e.signature is None)]
        self.read_ahead.start(upcoming, self.packing.packer(burst=True))

    # -- one pass over one path -----------------------------------------------------------
    async def _pass(self, path: str, record: PathRecord) -> None:
        """Look at `path` and send what makes the remote match; ends the pass in the queue
        (done, deferred, retried later or failed) whatever happens."""
        ahead = self.read_ahead.take(path)
        if self.queue.queued > 1:
            self._read_ahead()
        try:
            outcome = await self._reconcile(path, record, ahead)
        except BaseException:
            if self.queue.state(path) is not None:
                self.queue.done(path, self.clock())
            raise
        if outcome == "done":
            self.queue.done(path, self.clock())

    async def _reconcile(self, path: str, record: PathRecord,
                         ahead: concurrent.futures.Future[Prepared | None] | None) -> str:
        if path == "":
            self._check_root()
            self._reconcile_listing("", record.since)
            return "done"
        if relpath_problem(path):
            return "done"
        wall_now = time.time_ns()
        try:
            st = os.lstat(self.root / path) if self._parent_is_real(path) else None
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self.queue.fail(path, self.clock(), f"cannot read: {exc.strerror}", own_pass=True)
            self.reporter.failed(path, f"cannot read: {exc.strerror}")
            return "failed"
        remote = self.model.get(path)
        if st is not None and self.rules.is_ignored(path, stat.S_ISDIR(st.st_mode)):
            if remote is not None:
                self.model.drop_tree(path)  # ignored now: leave the remote copy alone
            return "done"
        if st is None:
            if remote is not None and self.seen_until() < wall_now:
                # The watcher has events not delivered yet: more of the tree may be going
                # (an emptied or unmounted root). Deletes wait until it has caught up.
                self.queue.retry(path, self.clock(), DELETE_WAIT)
                return "retry"
            if remote is not None and self.queue.queued and not record.deferred:
                # Gone locally: delete it after the paths queued behind it, one of which may
                # be where it moved, so that its content can still be copied there remotely.
                self.queue.defer(path)
                return "deferred"
            self.rules.forget(path)
            if remote is not None:
                self._remove(path, path, record.since)
            return "done"
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            self._reconcile_dir(path, remote, mode, record.since)
        elif stat.S_ISLNK(st.st_mode):
            return self._reconcile_link(path, remote, record.since)
        elif stat.S_ISREG(st.st_mode):
            return await self._reconcile_file(path, remote, st, record.since, ahead)
        return "done"

    def _parent_is_real(self, path: str) -> bool:
        """False when a directory above `path` is now a symlink: the path is gone for us.
        An answer is reused for REAL_PARENT_TTL (the files of one directory come in a row);
        reading a file goes through no symlink anyway (see read_file_stable)."""
        parent = path.rpartition("/")[0]
        if not parent:
            return True
        now = self.clock()
        known = self._real_parents.get(parent)
        if known is not None and now - known[1] < REAL_PARENT_TTL:
            return known[0]
        real = os.path.realpath(self.root / parent) == str(self.root / parent)
        if len(self._real_parents) > 4096:
            self._real_parents.clear()
        self._real_parents[parent] = (real, now)
        return real

    def _reconcile_dir(self, path: str, remote: RemoteEntry | None, mode: int,
                       since: float) -> None:
        if remote is not None and remote.kind != DIR:
            self._remove(path, path, since)
            remote = None
        if remote is None:
            moved_from = self._vanished_twin(path)
            if moved_from is not None:
                # A directory moved (seen as delete + add): rename it remotely, build outputs
                # and all, then let the listing below fix whatever differs inside.
                self._submit(m.Rename(self.link.next_seq(), moved_from, path),
                             InFlight(path, Op.RENAME, path, since, src=moved_from))
                self.model.move_tree(moved_from, path)
                remote = self.model.get(path)
                self.mark_dirty(sorted(self.model.child_names(path)), since, hint=False)
        if remote is None or remote.mode != mode or not remote.owned:
            self._submit(m.Mkdir(self.link.next_seq(), path, mode),
                         InFlight(path, Op.MKDIR, path, since))
            self.model.put(path, RemoteEntry(DIR, mode, owned=True))
        self._reconcile_listing(path, since)

    def _vanished_twin(self, path: str) -> str | None:
        """A queued directory that is gone locally and whose files `path` now holds."""
        # (Only the queued directories are looked at, never the whole queue: O(dirs).)
        self._queued_dirs = {p for p in self._queued_dirs if p in self.queue}
        candidates = [p for p in self._queued_dirs
                      if p != path and not p.startswith(path + "/")
                      and (e := self.model.get(p)) is not None and e.kind == DIR and e.owned
                      and not os.path.lexists(self.root / p)]
        if not candidates:
            return None
        try:
            local = scan_tree(self.root, self.rules, self.cache, subdir=path,
                              on_error=lambda rel, exc: None)
        except OSError:
            return None
        prefix = len(path) + 1
        here = {rel[prefix:]: e.digest for rel, e in local.items() if e.kind == "file"}
        if not here:
            return None
        for candidate in candidates:
            files = [p for p in self.model.descendants(candidate)
                     if (e := self.model.get(p)) is not None and e.kind == FILE]
            if not files:
                continue
            cut = len(candidate) + 1
            same = sum(1 for p in files
                       if (e := self.model.get(p)) is not None
                       and here.get(p[cut:]) == e.digest and e.digest is not None)
            if same >= RENAME_MATCH * max(len(files), len(here)):
                return candidate
        return None

    def _reconcile_listing(self, path: str, since: float) -> None:
        """Queue children that exist on one side only (moved-in or vanished subtrees)."""
        local_children: set[str] = set()
        try:
            with os.scandir(self.root / path if path else self.root) as listing:
                for item in listing:
                    child = f"{path}/{item.name}" if path else item.name
                    if relpath_problem(child):
                        continue
                    if self.rules.is_ignored(child, item.is_dir(follow_symlinks=False)):
                        continue
                    local_children.add(child)
        except OSError:
            return
        self.mark_dirty(sorted(local_children ^ self.model.child_names(path)), since,
                        hint=False)

    def _reconcile_link(self, path: str, remote: RemoteEntry | None, since: float) -> str:
        try:
            target = os.readlink(self.root / path)
        except OSError:
            self.queue.retry(path, self.clock(), UNSTABLE_RETRY)  # changed type meanwhile
            return "retry"
        if remote is not None and remote.kind == LINK and remote.target == target:
            remote.owned = True
            return "done"
        if remote is not None and remote.kind == DIR:
            self._remove(path, path, since)
        self._submit(m.Symlink(self.link.next_seq(), path, target),
                     InFlight(path, Op.SYMLINK, path, since))
        self.model.put(path, RemoteEntry(LINK, 0, target=target, owned=True))
        return "done"

    async def _reconcile_file(self, path: str, remote: RemoteEntry | None,
                              st: os.stat_result, since: float,
                              ahead: concurrent.futures.Future[Prepared | None] | None) -> str:
        mode = stat.S_IMODE(st.st_mode)
        if remote is not None and remote.kind == FILE and remote.mode == mode and remote.owned:
            # The hash cache trusts a stat only for files older than the clock's granularity,
            # so a same-size rewrite within one timestamp tick is always read again.
            known = self.cache.lookup(path, st)
            if known is not None and known == remote.digest:
                return "done"
        old_size = remote.size if remote is not None and remote.kind == FILE else 0
        if not self.close_events and max(st.st_size, old_size) >= SETTLE_SIZE:
            # No close events from this watcher: a big file written in place may be caught
            # between the truncate and the last write. Wait until it has been still for
            # SETTLE (the queue bounds how long a path is held).
            quiet = (time.time_ns() - st.st_mtime_ns) / 1e9
            if 0 <= quiet < SETTLE:
                self.queue.retry(path, self.clock(), SETTLE - quiet)
                return "retry"
        prepared = still_current(await asyncio.wrap_future(ahead), st) if ahead else None
        if prepared is not None:
            content, entry = prepared.content, prepared.entry
        else:
            try:
                content, entry = await self._read(path, st)
            except (UnstableFileError, FileNotFoundError):
                self.queue.retry(path, self.clock(), UNSTABLE_RETRY)  # look again soon
                return "retry"
            except (OSError, ScanError) as exc:
                reason = f"cannot read: {getattr(exc, 'strerror', None) or exc}"
                self.queue.fail(path, self.clock(), reason, own_pass=True)
                self.reporter.failed(path, reason)
                return "failed"
        digest = entry.digest
        assert digest is not None  # read_file_stable hashes what it read
        mode = entry.mode
        if remote is not None and remote.kind == FILE and remote.digest == digest:
            if remote.mode != mode:
                self._submit(m.SetMode(self.link.next_seq(), path, mode),
                             InFlight(path, Op.SET_MODE, path, since))
                remote.mode = mode
            remote.owned = True
            return "done"
        if remote is not None and remote.kind == DIR:
            self._remove(path, path, since)
            remote = None
        holder = self.model.holder_of(digest)
        if holder is not None and holder != path:
            # The remote already has this content (a copy, or a move seen as add + delete
            # whose delete is still queued behind this): copy it there, send no content.
            source = self.model.get(holder)
            self._submit(m.Copy(self.link.next_seq(), holder, path, mode, digest),
                         InFlight(path, Op.COPY, path, since, src=holder))
            self.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content),
                                             signature=source.signature if source else None))
            return "done"
        new_signature = await self._send_content(path, content, mode, digest, remote, since,
                                                 prepared)
        self.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content),
                                         signature=new_signature))
        if self.queue.queued <= BULK_QUEUE:
            # A file saved on its own is likely to be saved again soon: keep it as the base
            # of the next delta. Files of a burst are not (and would only evict those).
            self.recent.remember(path, digest, content)
        return "done"

    async def _read(self, path: str, st: os.stat_result) -> tuple[bytes, LocalEntry]:
        if st.st_size <= SETTLE_SIZE:
            return read_file_stable(self.root, path, self.cache, limit=MAX_FILE)
        return await asyncio.to_thread(read_file_stable, self.root, path, self.cache,
                                       limit=MAX_FILE)

    async def _send_content(self, path: str, content: bytes, mode: int, digest: bytes,
                            remote: RemoteEntry | None, since: float,
                            prepared: Prepared | None) -> Signature:
        """Send the new content as a delta against the remote version when that is smaller
        (and fits in a frame), else whole in chunks; returns the new version's signature."""
        seq = self.link.next_seq()
        if (remote is not None and remote.kind == FILE and remote.digest is not None
                and remote.signature is not None):
            base = self.recent.get(path, remote.digest)
            delta, new_signature = delta_message(seq, path, mode, remote.digest,
                                                 remote.signature, content, digest, base,
                                                 self.packing.zstd)
            if delta is not None:
                self._submit(delta, InFlight(path, Op.WRITE, path, since,
                                             nbytes=len(content), wire=len(delta.delta)))
                await self.link.drain()
                return new_signature
        elif prepared is not None:
            new_signature = prepared.signature
        else:
            new_signature = signature(content)
        packer = self.packing.packer(burst=self.queue.queued > BULK_QUEUE)
        if prepared is not None and prepared.packer == packer:
            pieces = prepared.pieces
        elif len(content) > SETTLE_SIZE:
            pieces = await asyncio.to_thread(pieces_of, content, packer)
        else:
            pieces = pieces_of(content, packer)
        messages = content_messages(seq, path, mode, pieces)
        wire = sum(len(data) for data, _ in pieces)
        self._submit(messages[0], InFlight(path, Op.WRITE, path, since, nbytes=len(content),
                                           wire=wire))
        await self.link.drain()
        for message in messages[1:]:
            self.link.send(message)
            await self.link.drain()
        return new_signature

    def _remove(self, owner: str, path: str, since: float) -> None:
        """Delete what lsync owns at and below `path`; the rest stays (and is forgotten)."""
        self._check_root()
        for below in [*self.model.descendants(path), path]:
            entry = self.model.get(below)
            if entry is None:
                continue
            if entry.owned or self.delete_extra:
                self._submit(m.Delete(self.link.next_seq(), below),
                             InFlight(owner, Op.DELETE, below, since))
            self.model.drop(below)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise SafetyStop(f"the local tree {self.root} has disappeared; stopped without "
                             "deleting anything on the remote")
        try:
            with os.scandir(self.root) as listing:
                empty = next(iter(listing), None) is None
        except OSError as exc:
            raise SafetyStop(f"the local tree {self.root} cannot be read ({exc.strerror}); "
                             "stopped without deleting anything on the remote") from None
        if empty and self.model.owned_count():
            raise SafetyStop(f"the local tree {self.root} is suddenly empty (an unmounted "
                             "disk?); stopped without deleting anything on the remote")

    # -- acknowledgements -----------------------------------------------------------------
    def _submit(self, message: m.Message, flight: InFlight) -> None:
        seq: int = message.seq  # type: ignore[union-attr]
        self.window.add(seq, flight)
        if flight.op is not Op.DICTIONARY:
            self.queue.sent(flight.owner)
        future = self.link.submit(message)
        future.add_done_callback(lambda done: self._on_reply(seq, done))

    def _on_reply(self, seq: int, future: asyncio.Future[Reply]) -> None:
        """A done-callback: an exception here would only be logged by asyncio, so a bug is
        kept and raised by `run` (an internal error ends the session, never silently)."""
        try:
            self._apply_reply(seq, future)
        except Exception as exc:
            if self._failure is None:
                self._failure = internal_error("applying an acknowledgement", exc)
            self._changed.set()

    def _apply_reply(self, seq: int, future: asyncio.Future[Reply]) -> None:
        flight = self.window.answer(seq)
        if flight is None or future.cancelled() or future.exception() is not None:
            return  # the link broke; the session reports it and resyncs on reconnect
        reply = future.result()
        below = None
        if flight.op is Op.RENAME and isinstance(reply, m.Error):
            below = [*self.model.descendants(flight.target), flight.target]
        result = verdict(flight, reply, self.packing.dictionary_failed, below)
        now = self.clock()
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
        if result.retry_later:
            self.queue.fail(flight.owner, now, result.failure)
        if result.look_again:
            self.mark_dirty(result.look_again, hint=False)
        self._poke()

    def _count_write(self, flight: InFlight, now: float) -> None:
        self.counters.files += 1
        self.counters.bytes += flight.nbytes
        self.counters.last_latency = now - flight.since
        files, nbytes = self._initial_done
        total_files, total_bytes = self._initial_total
        if files < total_files:
            self._initial_done = (files + 1, nbytes + flight.nbytes)
            self.reporter.progress(nbytes + flight.nbytes, total_bytes, files + 1, total_files)
