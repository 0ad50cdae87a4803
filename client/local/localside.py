"""The local side of one `lsync connect`, shared by every target: one watcher, one set of
rules, one hash cache per hash, one scan for all the hosts that need it at once.

Each target has its own `Session` (lsync.client.session: connection, engine, model, window,
reconnect loop); they meet here. What this promises:

- **One watcher** for the tree. Each batch is looked at once (a changed rules file is read
  again once, not once per host) and then handed to every host in order, which gives it to
  its engine or keeps it for its next connection (`Host.take_batch`). The same for git's
  index (`Host.index_changed`). A tree that can no longer be watched ends the watch with a
  `SafetyStop`, for every host.
- **Shared scans.** A host that needs the tree's listing for its initial comparison gives
  the moment from which it has kept every change itself (`missed_since`: when its last
  engine ended, or the start); a scan of the same hash that started at or after that moment
  is as good as its own (what changed during or after it is in the host's buffer), so the
  host takes that scan (running or finished less than `SCAN_SHARED_FOR` ago) instead of
  walking the tree again. Each host gets its own dictionary (the entries are shared, never
  changed in place).
- **One hash cache per hash**, loaded once and saved under one lock (two hosts never write
  the same cache file at once); the signature store likewise.
- **A save is read and hashed once** (`SharedReads`): the first target's engine to read a
  file version reads it (and hashes it, as every read does); the others get the same bytes
  while that version stands. A watcher event for the path (or an overflow) forgets the read
  before any target hears of the event, so a target never sends what it read before the
  file's last change it was told about. The same holds for what the targets' read-aheads
  read (`SharedReads.ahead`, `AheadSlots`): one read of a queued file for every target.
- **A path looked at once** (`SharedReads.stats`, `SharedStats`): what one target's pass
  saw of a path (its lstat, and when) serves the others' passes until the watcher's next
  batch, whatever paths it names (a directory swapped for a link changes what is below it
  without an event for those paths). A pass that takes it plans as of when it was seen
  (whether the watcher was behind then); a change after it brings an event, and that event
  makes every target look at the path again. Only while every change brings an event: not
  with a watcher that may lose some unsaid (watchfiles), nor after the first overflow (a
  directory that could not be watched stays so; a convergence check that finds a change
  there must look at the path itself).
- **What is made of content once** (`SharedReads.made`): the compressed pieces, signature or
  delta of a file version, named by its digest (and the packing, or the base): the first
  target makes it, the others take it. Named by the content itself, it needs no forgetting.
- The "N of M files ignored" note of the first full scan is said once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lsync.client.buildloop.pullrules import PushRules
from lsync.client.errors import LsyncError, SafetyStop
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IndexChange
from lsync.client.local.ignored import IgnoredTally, follow_index
from lsync.client.local.localentry import LocalEntry
from lsync.client.local.scanner import scan_tree
from lsync.client.local.watcher import RootGone, TreeWatcher, WatchBatch, open_watcher
from lsync.client.remote import sigstore
from lsync.client.remote.delta import Signature

SCAN_SHARED_FOR = 10.0  # seconds a finished scan is kept for hosts that start a bit later
READ_SHARED_FOR = 5.0  # seconds a file version read by one target waits for the others
READS_HELD = 256  # file versions held at most (the oldest go first)

MADE_HELD = 512  # things made of content held at most for the other targets
STATS_HELD = 8192  # paths' lstats held at most for the other targets' passes
AHEADS_HELD = 1024  # files read ahead held at most for the other targets

Scan = tuple[HashCache, dict[str, LocalEntry]]
_T = TypeVar("_T")


class Host(Protocol):
    """What the local side needs from each target's session."""

    def take_batch(self, dirty: list[str], batch: WatchBatch, now: float) -> None: ...

    def index_changed(self, change: IndexChange) -> None: ...


Read = tuple[bytes, LocalEntry]


@dataclass
class _SharedScan:
    started: float  # monotonic
    future: asyncio.Future[Scan]
    stop: threading.Event  # set once no target waits for it any more (it ends early)
    waiting: int = 0


@dataclass
class _Held:
    key: tuple[int, int, int, int, int, str]
    future: asyncio.Future[Read]
    since: float
    takes: int  # other targets still to take it


@dataclass
class _Made:
    future: asyncio.Future[Any]
    since: float
    takes: int


class AheadSlot:
    """A file one target's read-ahead reads (`item`: what it made of it, opaque here) for
    the others. `stale` once a watcher event for the path came after the read started (or
    the slot was dropped): from then on no other target takes it."""

    __slots__ = ("item", "since", "stale")

    def __init__(self, item: object, since: float) -> None:
        self.item = item
        self.since = since
        self.stale = False


class AheadSlots:
    """The files the targets' read-aheads read, by path, for the other targets (event loop
    thread only). A slot is put before its read starts; an event for its path (`forget`)
    makes it stale, so a read that may have seen an older version than the last event is
    never handed on: the target that made it checks it against its own lstat, as before."""

    def __init__(self, sharers: Callable[[], int]) -> None:
        self.sharers = sharers
        self._slots: dict[str, AheadSlot] = {}

    def take(self, path: str) -> AheadSlot | None:
        """Another target's slot for `path`, if one is held and not stale."""
        slot = self._slots.get(path)
        if slot is None or slot.stale:
            return None
        if time.monotonic() - slot.since >= READ_SHARED_FOR:
            self._drop(path)
            return None
        return slot

    def put(self, path: str, item: object) -> AheadSlot | None:
        """Offer what is about to be read of `path` to the other targets (None with one)."""
        if self.sharers() < 2:
            return None
        while len(self._slots) >= AHEADS_HELD:
            self._drop(next(iter(self._slots)))
        self._drop(path)
        slot = self._slots[path] = AheadSlot(item, time.monotonic())
        return slot

    def _drop(self, path: str) -> None:
        slot = self._slots.pop(path, None)
        if slot is not None:
            slot.stale = True

    def forget(self, paths: Iterable[str]) -> None:
        if self._slots:
            for path in paths:
                self._drop(path)

    def clear(self) -> None:
        for slot in self._slots.values():
            slot.stale = True
        self._slots.clear()


Found = tuple[os.stat_result, str | None] | None  # an lstat, and a link's target; or gone


class SharedStats:
    """What one target's pass saw of a path, for the others (event loop thread only; see
    the module docstring): dropped on every watcher batch, once every other target took
    it, or READ_SHARED_FOR after it was seen."""

    def __init__(self, sharers: Callable[[], int]) -> None:
        self.sharers = sharers
        self.taken = 0  # (a test counts them)
        self._held: dict[str, tuple[Found, int, float, int]] = {}  # found, wall ns, since, takes
        self.trusted: Callable[[], bool] = lambda: True  # every change brings an event
        self.lost = False  # an overflow: changes may have come without events

    def overflowed(self) -> None:
        """Events were lost (or directories could not be watched): nothing is held any
        more, for the rest of the run."""
        self.lost = True
        self._held.clear()

    def take(self, path: str) -> tuple[Found, int] | None:
        """What another target saw at `path`, and its wall time then (Unix ns)."""
        held = self._held.get(path)
        if held is None:
            return None
        found, wall, since, takes = held
        if time.monotonic() - since >= READ_SHARED_FOR:
            del self._held[path]
            return None
        if takes <= 1:
            del self._held[path]
        else:
            self._held[path] = (found, wall, since, takes - 1)
        self.taken += 1
        return found, wall

    def put(self, path: str, found: Found, wall: int) -> None:
        others = self.sharers() - 1
        if others <= 0 or self.lost or not self.trusted():
            return
        while len(self._held) >= STATS_HELD:
            del self._held[next(iter(self._held))]
        self._held.pop(path, None)
        self._held[path] = (found, wall, time.monotonic(), others)

    def clear(self) -> None:
        self._held.clear()


class SharedReads:
    """One read of a file version for every target (see the module docstring). `sharers`
    says how many targets there are; with one, nothing is held."""

    def __init__(self, sharers: Callable[[], int]) -> None:
        self.sharers = sharers
        self.files_read = 0  # reads made (a test counts them)
        self.made_count = 0  # things made of content by `made` (a test counts them)
        self._held: dict[str, _Held] = {}
        self._made: dict[object, _Made] = {}
        self._noted: set[HashCache] = set()  # hash caches `note` told of reads
        self.ahead = AheadSlots(sharers)
        self.stats = SharedStats(sharers)
        self.epoch = 0  # watcher batches (and overflows) delivered so far
        # Every local change brings an event (inotify, not watchfiles), unless `stats.lost`.
        self.complete: Callable[[], bool] = lambda: False

    def stat_epoch(self) -> int | None:
        """How many watcher batches were delivered so far, while every local change brings
        an event (else None). A stat taken when it said E stands for an lstat now while it
        still says E: no event came since, so the path did not change, or it changed so
        recently that the pass is as if it had looked just before (its event makes every
        target look again). The read-ahead's stats serve so (lsync.client.remote.passes)."""
        if self.stats.lost or not self.complete():
            return None
        return self.epoch

    async def made(self, key: object, make: Callable[[], Awaitable[_T]]) -> _T:
        """What `make` makes of a file's content, `key` naming it by the content's digest
        (and whatever else it depends on: the packing, the base): made by the first
        target, taken by the others. It names the content, not a path or a version, so no
        event makes it wrong; it is held READ_SHARED_FOR at most, until every other target
        took it."""
        others = self.sharers() - 1
        if others <= 0:
            self.made_count += 1
            return await make()
        now = time.monotonic()
        held = self._made.get(key)
        if held is not None and now - held.since < READ_SHARED_FOR:
            held.takes -= 1
            if held.takes <= 0:
                del self._made[key]
            result: _T = await asyncio.shield(held.future)
            return result
        # (Oldest first: a key is only ever added anew. Looking at the oldest alone keeps
        # this cheap: a burst asks once per file and target.)
        while self._made and (len(self._made) >= MADE_HELD or now - next(
                iter(self._made.values())).since >= READ_SHARED_FOR):
            del self._made[next(iter(self._made))]
        self.made_count += 1
        future = asyncio.ensure_future(make())
        self._made[key] = _Made(future, now, others)
        future.add_done_callback(lambda done: self._unmade(key, done))
        return await asyncio.shield(future)

    def _unmade(self, key: object, future: asyncio.Future[Any]) -> None:
        """What failed to be made is not handed on."""
        if future.cancelled() or future.exception() is not None:
            held = self._made.get(key)
            if held is not None and held.future is future:
                del self._made[key]

    async def read(self, path: str, st: os.stat_result,
                   read: Callable[[], Awaitable[Read]], hash_name: str = "") -> Read:
        """The content and entry of `path` as of the version `st` says: read by `read`,
        or the bytes another target's read of that version got, when its digest is of
        `hash_name` too (targets whose agents chose different hashes read for themselves)."""
        others = self.sharers() - 1
        if others <= 0:
            self.files_read += 1
            return await read()
        now = time.monotonic()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, hash_name)
        held = self._held.get(path)
        if held is not None and held.key == key and now - held.since < READ_SHARED_FOR:
            held.takes -= 1
            if held.takes <= 0:
                del self._held[path]
            return await asyncio.shield(held.future)
        self._expire(now)
        self.files_read += 1
        future = asyncio.ensure_future(read())
        self._held.pop(path, None)  # (re-added last: the dictionary stays oldest first)
        self._held[path] = _Held(key, future, now, others)
        future.add_done_callback(lambda done: self._failed(path, done))
        return await asyncio.shield(future)

    def _failed(self, path: str, future: asyncio.Future[Read]) -> None:
        """A read that failed is not handed on (each target looks again itself)."""
        if future.cancelled() or future.exception() is not None:
            held = self._held.get(path)
            if held is not None and held.future is future:
                del self._held[path]

    def _expire(self, now: float) -> None:
        while self._held and (len(self._held) >= READS_HELD or now - next(
                iter(self._held.values())).since >= READ_SHARED_FOR):
            del self._held[next(iter(self._held))]

    def note(self, cache: HashCache, path: str, st: os.stat_result, digest: bytes) -> None:
        """The version `st` of `path` was read whole and has `digest`: the hash cache
        serves it (HashCache.note_read) until the watcher reports the path changed, so the
        check of its directory after a save does not read it again."""
        cache.note_read(path, st, digest)
        self._noted.add(cache)

    def forget(self, paths: Iterable[str]) -> None:
        """These paths changed (a watcher event): what was read of them is not handed on,
        nor their digests noted."""
        paths = list(paths)
        self.epoch += 1
        self.stats.clear()  # (any batch: see SharedStats)
        if self._held:
            for path in paths:
                self._held.pop(path, None)
        self.ahead.forget(paths)
        for cache in self._noted:
            cache.forget_recent(paths)

    def clear(self) -> None:
        self.epoch += 1
        self._held.clear()
        self.ahead.clear()
        self.stats.clear()
        for cache in self._noted:
            cache.forget_recent()


class LocalSide:
    def __init__(self, root: Path, rules: PushRules, step_ms: int, debounce_ms: int,
                 note: Callable[[str], None]) -> None:
        self.root = root
        self.rules = rules
        self.step_ms = step_ms
        self.debounce_ms = debounce_ms
        self.note = note
        self.hosts: list[Host] = []
        self.watcher: TreeWatcher | None = None
        self.watching = asyncio.Event()  # the watcher is set up: a scan may start
        self.ignored: IgnoredTally | None = None  # what the last full scan skipped (status)
        self.scans = 0  # whole-tree scans made for hosts (a test counts them)
        self._caches: dict[str, asyncio.Future[HashCache]] = {}
        # hash name -> the scan, while running (and shortly after, with several targets)
        self._scans: dict[str, _SharedScan] = {}
        self._saving = asyncio.Lock()
        self.reads = SharedReads(lambda: len(self.hosts))
        # (A watcher without close events is watchfiles: it may lose events unsaid.)
        self.reads.stats.trusted = lambda: self.watcher is None or self.close_events
        self.reads.complete = lambda: self.close_events

    # -- the watcher -------------------------------------------------------------------------
    def seen_until(self) -> int:
        """Unix ns before which every local change has been delivered by the watcher."""
        watched = self.watcher.seen_until() if self.watcher is not None else time.time_ns()
        return min(watched, self.rules.index_seen_until())

    @property
    def close_events(self) -> bool:
        return bool(self.watcher is not None and self.watcher.close_events)

    async def watch(self, stop: asyncio.Event) -> None:
        """Run the watcher and git's index follower until `stop`; a tree that cannot be
        watched any more raises SafetyStop."""
        await asyncio.sleep(0)  # the SSH connections start first
        watcher = await open_watcher(self.root, self._skip_dir, self.step_ms, self.debounce_ms,
                               self.note)
        self.watcher = watcher
        self.watching.set()
        follower = asyncio.create_task(follow_index(self.rules, self.index_changed,
                                                    self.note), name="git-index")
        try:
            async for batch in watcher.batches(stop):
                self.on_batch(batch)
        except RootGone:
            pass
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            watcher.close()
        if not stop.is_set():
            raise SafetyStop(f"the local tree {self.root} is no longer watchable (removed or "
                             "unmounted?); stopped without deleting anything on the remote")

    def _skip_dir(self, rel: str) -> bool:
        return bool(rel) and self.rules.is_ignored(rel, True)

    def on_batch(self, batch: WatchBatch) -> None:
        """Look at a watcher batch once (rules files read again), then give every host the
        paths to look at."""
        now = time.monotonic()
        if batch.overflow:
            self.reads.clear()
            self.reads.stats.overflowed()
        self.reads.forget(batch.paths)
        self.reads.forget(batch.writing)
        dirty: list[str] = []
        for path in batch.paths:
            name = path.rpartition("/")[2]
            if self.rules.is_rules_file(path):
                directory = path.rpartition("/")[0]
                if self.rules.reload(directory) and self.watcher is not None:
                    self.watcher.refresh(directory)  # newly unignored directories
                dirty.append(directory)  # re-list: newly (un)ignored entries
            if name.startswith(".lsync-tmp-"):
                continue
            dirty.append(path)
        for host in self.hosts:
            host.take_batch(dirty, batch, now)

    def index_changed(self, change: IndexChange) -> None:
        """Git's index made these paths (un)tracked, so (un)ignored: every host looks again."""
        if self.watcher is not None:
            for directory in sorted(change.dirs):
                self.watcher.refresh(directory)
        for host in self.hosts:
            host.index_changed(change)

    # -- scans and caches ------------------------------------------------------------------
    async def hash_cache(self, hash_name: str) -> HashCache:
        """The tree's hash cache for `hash_name`, loaded once."""
        loading = self._caches.get(hash_name)
        if loading is None:
            loading = asyncio.ensure_future(self._load_cache(hash_name))
            self._caches[hash_name] = loading
        try:
            return await asyncio.shield(loading)
        except BaseException:
            if loading.done() and (loading.cancelled() or loading.exception() is not None):
                self._caches.pop(hash_name, None)
            raise

    async def _load_cache(self, hash_name: str) -> HashCache:
        cache = HashCache(hash_name, root=self.root)
        await asyncio.to_thread(cache.load)
        return cache

    async def scan(self, hash_name: str, missed_since: float,
                   on_error: Callable[[str, Exception], None]) -> Scan:
        """The tree's entries (files not hashed) and its hash cache: a scan of `hash_name`
        that started at or after `missed_since` (monotonic) if there is one, else a new
        one. The dictionary is the caller's own. A scan no target waits for any more (the
        agent chose another hash) stops at its next directory."""
        shared = self._scans.get(hash_name)
        if shared is None or shared.started < missed_since or shared.stop.is_set() or (
                shared.future.done() and (shared.future.cancelled()
                                          or shared.future.exception() is not None)):
            stop = threading.Event()
            shared = _SharedScan(time.monotonic(),
                                 asyncio.ensure_future(self._scan(hash_name, on_error, stop)),
                                 stop)
            self._scans[hash_name] = shared
            made = shared
            shared.future.add_done_callback(lambda done: self._forget_scan_later(hash_name,
                                                                                made))
        shared.waiting += 1
        try:
            cache, local = await asyncio.shield(shared.future)
        except asyncio.CancelledError:
            shared.waiting -= 1
            if not shared.waiting and not shared.future.done():
                shared.stop.set()
                shared.future.add_done_callback(_retrieved)
                if self._scans.get(hash_name) is shared:
                    del self._scans[hash_name]
            raise
        shared.waiting -= 1
        # (Each target its own dictionary: initial_sync adds the digests it learns.)
        return cache, dict(local) if len(self.hosts) > 1 else local

    async def scan_instead(self, guessed: asyncio.Future[Scan], hash_name: str,
                           missed_since: float,
                           on_error: Callable[[str, Exception], None]) -> Scan:
        """The scan for `hash_name`, the agent's choice, in place of `guessed`, a scan for
        another hash. A scan lists without hashing: where neither hash's cache knows a
        digest (the first contact with a target), the entries of `guessed` have none and
        serve as they are; else the tree is scanned again (`scan`)."""
        cache = await self.hash_cache(hash_name)
        if len(cache) == 0:
            try:
                guessed_cache, local = await guessed
            except LsyncError:
                pass  # scanned again below, as it would have been
            else:
                if len(guessed_cache) == 0:
                    return cache, local
        else:
            guessed.cancel()  # (stopped if no other target waits for it)
        return await self.scan(hash_name, missed_since, on_error)

    def _forget_scan_later(self, hash_name: str, shared: _SharedScan) -> None:
        """A scan is kept a while for the targets that connect a little later; with one
        target, not at all (a whole tree's entries at the start's peak of memory)."""
        def forget() -> None:
            if self._scans.get(hash_name) is shared:
                del self._scans[hash_name]

        future = shared.future
        if future.cancelled() or future.exception() is not None or len(self.hosts) < 2:
            forget()
        else:
            asyncio.get_running_loop().call_later(SCAN_SHARED_FOR, forget)

    async def _scan(self, hash_name: str, on_error: Callable[[str, Exception], None],
                    stop: threading.Event) -> Scan:
        cache = await self.hash_cache(hash_name)
        # Files are hashed later, and only those the remote may already hold (see
        # SyncEngine.initial_sync): the others are read once, when they are sent.
        tally = IgnoredTally(self.root, self.rules)
        self.scans += 1
        local = await asyncio.to_thread(scan_tree, self.root, self.rules, cache,
                                        on_error=on_error, hash_files=False,
                                        on_ignored=tally.add, stop=stop)
        if self.ignored is None and (note := await asyncio.to_thread(tally.after_scan, local)):
            self.note(note)  # once per run: "N of M files ignored (rule)"
        self.ignored = tally
        return cache, local

    async def save(self, cache: HashCache, signatures: Path,
                   kept: list[tuple[str, bytes, Signature]]) -> list[str]:
        """Save the hash cache and the signatures (one save at a time); returns what could
        not be saved, as notes."""
        problems: list[str] = []
        async with self._saving:
            for what, save in (("hash cache", cache.save),
                               ("signatures", lambda: sigstore.save(signatures, kept))):
                try:
                    await asyncio.to_thread(save)
                except (OSError, ValueError) as exc:
                    problems.append(f"could not save the {what} ({exc}); the next start "
                                    "reads more")
        return problems


def _retrieved(future: asyncio.Future[Scan]) -> None:
    """A scan nobody waits for: its ending (ScanStopped) is seen here, not logged."""
    if not future.cancelled():
        future.exception()
