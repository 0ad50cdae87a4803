"""One pass over one local path: look at it, and send what makes the remote match.

The planner decides (`lsync.client.remote.planner.plan_path` from what an lstat saw and what
the model holds, `plan_content` once a file is read); `PathPasses` does the looking (at the
local side: `LocalInputs`), reading and sending (on the target's remote side:
lsync.client.remote.remoteside) for the engine (lsync.client.remote.engine), one path at a
time. Every pass ends in the queue as done, deferred, retried later or failed. Promises kept
here: nothing is read through a symlinked directory; a file is sent only as a consistent
snapshot (or not at all); what lsync did not make is never deleted (a directory holding such
files is kept, and renamed along with its contents when it moved); and before any delete the
local root is checked: a vanished or suddenly empty root raises `SafetyStop`.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lsync.client.errors import SafetyStop
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import (
    LocalEntry,
    NotRegularFileError,
    ScanError,
    UnstableFileError,
)
from lsync.client.local.localside import Found, SharedReads
from lsync.client.local.scanner import lstat_confined, scan_tree
from lsync.client.local.stableread import read_file_stable
from lsync.client.remote import planner, relearn
from lsync.client.remote.delta import Signature, signature
from lsync.client.remote.model import DIR, FILE, LINK, RemoteEntry
from lsync.client.remote.pathqueue import PathRecord
from lsync.client.remote.planner import Content, Step
from lsync.client.remote.remoteside import RemoteSide
from lsync.client.remote.sender import (
    BATCH_FILE_MAX,
    SIGN_MIN,
    Ahead,
    Prepared,
    content_messages,
    delta_message,
    pieces_of,
    prepared_of,
    still_current,
)
from lsync.client.remote.window import InFlight, Op
from lsync.client.transport.outbox import BATCH_BYTES
from lsync.protocol import messages as m
from lsync.protocol.paths import relpath_problem

UNSTABLE_RETRY = 0.05
LANE_WAIT = 0.01  # a pass waits this long (again) while data-lane writes below it fly
FAST_LANE = 1  # the data lane of single saves; batches take the others in turn
DELETE_WAIT = 0.01  # a delete waits this long (again) while the watcher has undelivered events
SETTLE_SIZE = 1 << 20  # without close-write events, files this big wait to be still
SETTLE = 0.02
SETTLE_MAX = 1.0  # a file written all the time is sent anyway, this long after its change
NEW_FILE_SETTLE_SIZE = 256 << 10
NEW_FILE_SETTLE = 0.05
MAX_FILE = 1 << 30  # files are read whole into memory; bigger ones are reported
BULK_QUEUE = 100  # more queued paths than this: compress for speed, batch small files
RENAME_MATCH = 0.5  # share of a vanished directory's files a new one must hold to be its move
PARENT_WAIT = 0.005  # a path whose parent is not a known directory remotely waits this long
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})  # lstat: no such path any more
OFF_LOOP = 1 << 20  # reading, hashing, delta-encoding or compressing this many bytes or more
# happens in a worker thread: the event loop keeps answering replies, pings, the watcher
# and the control socket meanwhile

_T = TypeVar("_T")


async def _off_loop(size: int, work: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`work(*args, **kwargs)`, in a worker thread when it handles `size` >= OFF_LOOP bytes
    (smaller work costs less than the hand-off)."""
    if size < OFF_LOOP:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)


class Outcome(enum.Enum):
    """How a pass over one path ended, for the queue."""

    DONE = "done"  # sent what was needed (or nothing was): done once acknowledged
    RETRY = "retry"  # the queue holds it for a retry the pass has scheduled
    DEFERRED = "deferred"  # put back behind the paths queued (the queue knows)
    FAILED = "failed"  # failed and reported; retried with backoff (the queue knows)


@dataclass(frozen=True)
class LocalInputs:
    """What the passes of one target read of the local side (lsync.client.local.localside)."""

    root: Path
    rules: IgnoreRules
    cache: HashCache
    # Wall time (ns) before which the watcher has delivered every local change.
    seen_until: Callable[[], int]
    close_events: bool  # the watcher reports when writers close files
    reads: SharedReads | None  # reads shared with the other targets' engines
    # The watcher's epoch while every change brings an event (SharedReads.stat_epoch).
    epoch: Callable[[], int | None] = lambda: None


class PathPasses:
    """One pass over one path at a time, for one target: looks at the local side
    (`local`) and makes that target's remote side (`side`) match (see the module
    docstring)."""

    def __init__(self, side: RemoteSide, local: LocalInputs) -> None:
        self.side = side
        self.local = local
        self.bursting = False  # many paths were queued, and the queue has not run dry since
        self._urgent = False  # the pass under way is over an urgent path
        self._bulk_turn = 0  # which bulk lane batches go to now
        self._bulk_bytes = 0  # content sent on it since it took its turn
        self.looked_ahead = 0  # passes that took the read-ahead's lstat (a test counts them)

    async def reconcile(self, path: str, record: PathRecord,
                         ahead: Ahead | None) -> Outcome:
        unsure = self.side.unsure.get(path)
        if unsure:
            near = self._flying_near()
            if any(near(p) for p in unsure):
                # What the agent would list may not be what those operations leave.
                self.side.queue.retry(path, self.side.clock(), LANE_WAIT)
                return Outcome.RETRY
            await self._relearn(path, near)
        if path == "":
            self.check_root()
            self._reconcile_listing("", record.since)
            return Outcome.DONE
        if relpath_problem(path):
            return Outcome.DONE
        self.side.skipped.pop(path, None)  # (skipped again below if it still is too big)
        self._urgent = record.urgent  # what the pass marks inherits it
        prepared = await prepared_of(ahead) if ahead is not None else None
        try:
            found, wall_now = self._look(path, prepared)
        except OSError as exc:
            return self._cannot_read(path, exc.strerror or str(exc))
        st, target = found if found is not None else (None, None)
        remote = self.side.model.get(path)
        seen = self._seen(path, st, target)
        # (Whether the watcher was behind when the path was seen matters only for a path
        # gone locally, and asking costs a system call.)
        behind = seen.kind is None and remote is not None and self.local.seen_until() < wall_now
        plan = planner.plan_path(seen, remote, watcher_behind=behind,
                                 others_queued=bool(self.side.queue.queued),
                                 deferred=record.deferred)
        since = record.since
        step = plan.step
        if step in (Step.DIR, Step.LINK, Step.READ) and not self._parent_ready(path):
            self.side.queue.retry(path, self.side.clock(), PARENT_WAIT)  # its parent goes first
            return Outcome.RETRY
        if step in (Step.REMOVE, Step.DIR, Step.LINK) and self.side.window.side_busy(path):
            # Main-stream operations on it would not wait for the data lanes' writes.
            self.side.queue.retry(path, self.side.clock(), LANE_WAIT)
            return Outcome.RETRY
        if step is Step.NOTHING:
            if seen.kind is None:
                self.local.rules.forget(path)
            elif remote is not None and seen.kind == LINK:
                remote.owned = True  # verified equal
        elif step is Step.FORGET:
            self.side.model.drop_tree(path)  # ignored now: leave the remote copy alone
        elif step is Step.WAIT:
            self.side.queue.retry(path, self.side.clock(), DELETE_WAIT)
            return Outcome.RETRY
        elif step is Step.DEFER:
            self.side.queue.defer(path)
            return Outcome.DEFERRED
        elif step is Step.REMOVE:
            self.local.rules.forget(path)
            self._remove(path, path, since)
        elif step is Step.DIR:
            await self._make_dir(path, plan, seen.mode, since)
        elif step is Step.LINK:
            if plan.remove_first:
                self._set_aside(path, since)
            assert plan.target is not None
            self.side.submit(m.Symlink(self.side.link.next_seq(), path, plan.target),
                             InFlight(path, Op.SYMLINK, path, since))
            self.side.model.put(path, RemoteEntry(LINK, 0, target=plan.target, owned=True))
        elif step is Step.READ:
            assert st is not None
            return await self._sync_file(path, st, since, prepared, record.urgent)
        return Outcome.DONE

    def _look(self, path: str, prepared: Prepared | None) -> tuple[Found, int]:
        """What is at `path`, and the wall time (ns) it was seen: the lstat the read-ahead
        took when no watcher batch came since it began (SharedReads.stat_epoch: the file
        is as it was then, or changed so recently that its event is still to come and
        brings it back to the queue), else an lstat now. Files of a burst thus cost no
        confined lstat of their own."""
        seen = prepared.seen if prepared is not None else None
        if seen is not None and self.local.epoch() == seen[0]:
            assert prepared is not None
            self.looked_ahead += 1
            return (prepared.st, None), seen[1]
        return self._lstat(path)

    def _lstat(self, path: str) -> tuple[Found, int]:
        """What is at `path` (never through a symlink: a directory swapped for a link hides
        what is below), and the wall time (ns) it was seen: maybe by another target's pass
        since the watcher's last batch (lsync.client.local.localside.SharedStats)."""
        stats = self.local.reads.stats if self.local.reads is not None else None
        held = stats.take(path) if stats is not None else None
        if held is not None:
            return held
        wall_now = time.time_ns()
        found = lstat_confined(self.local.root, path)
        if stats is not None:
            stats.put(path, found, wall_now)
        return found, wall_now

    def _flying_near(self) -> Callable[[str], bool]:
        return relearn.flying_near(self.side.window)

    async def _relearn(self, path: str, near: Callable[[str], bool]) -> None:
        await relearn.relearn(self.side, self.local.rules, path, near)

    def _parent_ready(self, path: str) -> bool:
        """Whether the remote holds `path`'s parent as a directory that lsync knows; if
        not, the parent is queued (the agent would otherwise make it behind the model's
        back, or refuse a path below a file or link)."""
        parent = path.rpartition("/")[0]
        if not parent:
            return True
        entry = self.side.model.get(parent)
        if entry is not None and entry.kind == DIR:
            return True
        self.side.mark_dirty([parent], hint=False, urgent=self._urgent)
        return False

    def _seen(self, path: str, st: os.stat_result | None,
              target: str | None) -> planner.Seen:
        if st is None:
            return planner.Seen(None)
        mode = st.st_mode
        if self.local.rules.is_ignored(path, stat.S_ISDIR(mode)):
            return planner.Seen("", ignored=True)
        if stat.S_ISDIR(mode):
            return planner.Seen(DIR, stat.S_IMODE(mode))
        if stat.S_ISLNK(mode):
            return planner.Seen(LINK, target=target)
        if stat.S_ISREG(mode):
            return planner.Seen(FILE, stat.S_IMODE(mode),
                                cached_digest=self.local.cache.lookup(path, st))
        return planner.Seen("")

    def _cannot_read(self, path: str, why: str) -> Outcome:
        reason = f"cannot read: {why}"
        self.side.queue.fail(path, self.side.clock(), reason, own_pass=True)
        self.side.reporter.failed(path, reason)
        return Outcome.FAILED

    async def _make_dir(self, path: str, plan: planner.Plan, mode: int, since: float) -> None:
        if plan.remove_first:
            self._remove(path, path, since)
        source = await self._moved_here(path) if plan.may_be_moved else None
        if source is not None:
            # A directory moved (seen as delete + add): rename it remotely, build outputs
            # and all, then let the listing below fix whatever differs inside.
            self.side.submit(m.Rename(self.side.link.next_seq(), source, path),
                             InFlight(path, Op.RENAME, path, since, src=source))
            self.side.model.move_tree(source, path)
            # Everything that moved is looked at (a file changed just before the move was
            # reported under its old path).
            self.side.mark_dirty(list(self.side.model.descendants(path)), since, hint=False,
                                 urgent=self._urgent)
        if planner.needs_mkdir(self.side.model.get(path), mode):
            self.side.submit(m.Mkdir(self.side.link.next_seq(), path, mode),
                             InFlight(path, Op.MKDIR, path, since))
            self.side.model.put(path, RemoteEntry(DIR, mode, owned=True))
        self._reconcile_listing(path, since)

    async def _moved_here(self, path: str) -> str | None:
        """A queued directory, gone locally, whose files the new directory `path` holds."""
        candidates = self._move_sources(path)
        if not candidates:
            return None
        try:
            # (A moved-in tree may be big: it is listed and hashed in a worker thread.)
            local = await asyncio.to_thread(scan_tree, self.local.root, self.local.rules,
                                            self.local.cache, subdir=path,
                                            on_error=lambda rel, exc: None)
        except OSError:
            return None
        candidates = [p for p in self._move_sources(path) if p in candidates]
        if not candidates:  # (replies and events came meanwhile)
            return None
        cut = len(path) + 1
        here = {rel[cut:]: e.digest for rel, e in local.items() if e.kind == "file"}
        return planner.moved_from(here, candidates, self.side.model, RENAME_MATCH)

    def _move_sources(self, path: str) -> list[str]:
        """The directories the new directory `path` may have been moved from: queued,
        owned remote directories that are gone locally and have no data-lane writes in
        flight (only the queued directories are looked at, never the whole queue)."""
        self.side.queued_dirs = {p for p in self.side.queued_dirs if p in self.side.queue}
        return [p for p in self.side.queued_dirs
                if p != path and not p.startswith(path + "/")
                and not self.side.window.side_busy(p)
                and (e := self.side.model.get(p)) is not None and e.kind == DIR and e.owned
                and not os.path.lexists(self.local.root / p)]

    def _reconcile_listing(self, path: str, since: float) -> None:
        """Queue the children of a directory the watcher reported (moved in, swapped, its
        mode changed) or that lsync made: each is looked at (cheaply, when unchanged)."""
        local_children: set[str] = set()
        waiting, urgent = self.side.queue.waiting, self._urgent
        try:
            with os.scandir(self.local.root / path if path else self.local.root) as listing:
                for item in listing:
                    child = f"{path}/{item.name}" if path else item.name
                    if waiting(child, urgent):
                        continue  # queued already (an initial sync's): marking changes nothing
                    if relpath_problem(child):
                        continue
                    if self.local.rules.is_ignored(child, item.is_dir(follow_symlinks=False)):
                        continue
                    local_children.add(child)
        except OSError:
            return
        # Every child, not only those on one side: a directory moved in, or swapped for
        # another under the same name, holds other files under the same names.
        self.side.mark_dirty(sorted(local_children | self.side.model.child_names(path)), since,
                             hint=False, urgent=self._urgent)

    async def _sync_file(self, path: str, st: os.stat_result, since: float,
                         prepared: Prepared | None, urgent: bool = False) -> Outcome:
        remote = self.side.model.get(path)
        old_size = remote.size if remote is not None and remote.kind == FILE else 0
        settle = 0.0
        if not self.local.close_events and max(st.st_size, old_size) >= SETTLE_SIZE:
            # No close events from this watcher: a big file written in place may be caught
            # between the truncate and the last write.
            settle = SETTLE
        if remote is None and st.st_size >= NEW_FILE_SETTLE_SIZE:
            # A big new file just written is likely an editor's temporary file about to be
            # renamed over its target: give the rename a moment (the target then travels
            # as a delta, and the temporary file not at all).
            settle = max(settle, NEW_FILE_SETTLE)
        quiet = (time.time_ns() - st.st_mtime_ns) / 1e9
        if 0 <= quiet < settle and self.side.clock() - since < SETTLE_MAX:
            # (until still, or SETTLE_MAX)
            self.side.queue.retry(path, self.side.clock(), settle - quiet)
            return Outcome.RETRY
        if st.st_size > MAX_FILE:
            return self._skip_too_big(path, st)
        prepared = still_current(prepared, st)
        if prepared is not None:
            content, entry = prepared.content, prepared.entry
            if self.local.reads is not None and entry.digest is not None:
                self.local.reads.note(self.local.cache, path, st, entry.digest)  # (as _read)
        else:
            try:
                content, entry = await self._read(path, st)
            except (UnstableFileError, FileNotFoundError, NotRegularFileError):
                # Changing, gone, or no longer a file: look again soon.
                self.side.queue.retry(path, self.side.clock(), UNSTABLE_RETRY)
                return Outcome.RETRY
            except (OSError, ScanError) as exc:
                return self._cannot_read(path, str(getattr(exc, "strerror", None) or exc))
        digest, mode = entry.digest, entry.mode
        assert digest is not None  # read_file_stable hashes what it read
        plan = planner.plan_content(path, digest, mode, self.side.model)
        if plan.action is Content.COPY and self.side.window.side_busy(plan.source):
            plan = planner.ContentPlan(Content.SEND, plan.remove_first)  # not written yet
        needs_main = plan.remove_first or plan.action in (Content.SET_MODE, Content.COPY)
        if needs_main and self.side.window.side_busy(path):
            self.side.queue.retry(path, self.side.clock(), LANE_WAIT)  # after its data-lane writes
            return Outcome.RETRY
        remote = self.side.model.get(path)
        if plan.action is Content.SAME or plan.action is Content.SET_MODE:
            assert remote is not None
            if plan.action is Content.SET_MODE:
                self.side.submit(m.SetMode(self.side.link.next_seq(), path, mode),
                                 InFlight(path, Op.SET_MODE, path, since))
                remote.mode = mode
            remote.owned = True
            return Outcome.DONE
        if plan.remove_first:
            self._set_aside(path, since)
            remote = None
        if plan.action is Content.COPY:
            # The remote already has this content (a copy, or a move seen as add + delete
            # whose delete is still queued behind this): copy it there, send no content.
            source = self.side.model.get(plan.source)
            self.side.submit(m.Copy(self.side.link.next_seq(), plan.source, path, mode, digest),
                             InFlight(path, Op.COPY, path, since, src=plan.source))
            self.side.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content),
                                                  signature=source.signature if source else None))
            return Outcome.DONE
        new_signature = await self._send_content(path, content, mode, digest, remote, since,
                                                 prepared, urgent)
        self.side.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content),
                                              signature=new_signature))
        if self.side.queue.queued <= BULK_QUEUE or urgent:
            # A file saved on its own is likely to be saved again soon: keep it as the base
            # of the next delta. Files of a burst are not (and would only evict those).
            self.side.recent.remember(path, digest, content)
        return Outcome.DONE

    def _skip_too_big(self, path: str, st: os.stat_result) -> Outcome:
        """A file lsync cannot send (it reads files whole): reported once per version and
        left alone, not failed — a failure would be retried for ever and keep every
        in-sync report away. It is looked at again when it changes; convergence checks
        pass over it while it stays this version (`skipped`); status lists it."""
        self.side.skipped[path] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        self.side.reporter.note(f"skipped {path}: {st.st_size} bytes, more than the "
                                f"{MAX_FILE} that lsync reads into memory; not synced (the "
                                "remote keeps whatever it has there)")
        return Outcome.DONE

    async def _read(self, path: str, st: os.stat_result) -> tuple[bytes, LocalEntry]:
        """The file as of `st` (once for every target: lsync.client.local.localside)."""
        def read() -> Awaitable[tuple[bytes, LocalEntry]]:
            return _off_loop(st.st_size, read_file_stable, self.local.root, path, self.local.cache,
                             limit=MAX_FILE)

        reads = self.local.reads
        if reads is None:
            return await read()
        content, entry = await reads.read(path, st, read, self.local.cache.algorithm)
        if entry.digest is not None and entry.local_key == (st.st_ino, st.st_size,
                                                             st.st_mtime_ns, st.st_ctime_ns):
            reads.note(self.local.cache, path, st, entry.digest)  # (for the check after)
        return content, entry

    async def _send_content(self, path: str, content: bytes, mode: int, digest: bytes,
                            remote: RemoteEntry | None, since: float,
                            prepared: Prepared | None, urgent: bool = False
                            ) -> Signature | None:
        """Send the new content as a delta against the remote version when that is smaller
        (and fits in a frame), else whole in chunks or in a batch; returns the new version's
        signature (None for a small file of a burst: not worth its time and memory)."""
        seq = self.side.link.next_seq()
        # (A burst lasts until the queue runs dry: its tail is batched too. A save made
        # meanwhile is not part of it.)
        self.bursting = self.bursting or self.side.queue.queued > BULK_QUEUE
        burst = self.bursting and not urgent
        if (remote is not None and remote.kind == FILE and remote.digest is not None
                and remote.signature is not None):
            base, old, zstd = self.side.recent.get(path, remote.digest), remote.signature, \
                self.side.packing.zstd
            delta, new_signature = await self._made(
                ("delta", remote.digest, old.size, old.avg_chunk, digest, zstd, base is not None),
                lambda: _off_loop(len(content), delta_message, seq, path, mode, remote.digest,
                                  old, content, digest, base, zstd))
            if delta is not None and delta.seq != seq:  # (another target's: ours is the same)
                delta = delta._replace(seq=seq, path=path, mode=mode)
            if delta is not None:
                # A save's delta takes the fast lane; a burst's deltas (a checkout, a
                # rewrite of many files) take the bulk lanes, so that a save made meanwhile
                # does not wait behind them in its channel.
                lane = self.side.window.lane_for(
                    path, self._bulk_lane(len(delta.delta)) if burst else self._save_lane())
                self.side.submit(delta, InFlight(path, Op.WRITE, path, since,
                                                 nbytes=len(content), wire=len(delta.delta),
                                                 lane=lane))
                await self.side.link.drain(lane, self.side.urgent_work if burst else None)
                return new_signature
        if burst and len(content) <= BATCH_FILE_MAX:
            # One of many new files: it travels with its neighbours in one compressed batch,
            # and unsigned when small (its first edit is sent whole; bigger ones are
            # signed here or, once in sync, by the engine).
            lane = self.side.window.lane_for(path, self._bulk_lane(len(content)))
            self.side.submit_batched(seq, path, mode, content,
                                     InFlight(path, Op.WRITE, path, since, nbytes=len(content),
                                              wire=len(content), lane=lane), digest)
            await self.side.link.drain(lane, self.side.urgent_work)  # a save need not wait for it
            if len(content) < SIGN_MIN:
                return None
            return prepared.signature if prepared and prepared.signature else signature(content)
        if prepared is not None and prepared.signature is not None:
            new_signature = prepared.signature
        else:
            new_signature = await self._made(("signature", digest), lambda: _off_loop(
                len(content), signature, content))
        packer = self.side.packing.packer(burst=burst,
                                          backlogged=burst and self.bulk_backlogged())
        if prepared is not None and prepared.pieces is not None and (
                prepared.packer == packer
                or (burst and self.side.packing.of_burst(prepared.packer))):
            pieces = prepared.pieces
        else:
            pieces = await self._made(("pieces", digest, packer), lambda: _off_loop(
                len(content), pieces_of, content, packer))
        messages = content_messages(seq, path, mode, pieces)
        wire = sum(len(data) for data, _ in pieces)
        # A burst's big files take the bulk lanes in turn, as its batches do: over a long
        # link one channel carries at most the server's window (OpenSSH: 2 MiB) per round
        # trip. A save in one message takes the fast lane, a bigger one the main stream
        # (see Window.lane_for for when neither may).
        wanted = (self._bulk_lane(len(content)) if burst
                  else 0 if len(messages) > 1 else self._save_lane())
        lane = self.side.window.lane_for(path, wanted)
        self.side.submit(messages[0], InFlight(path, Op.WRITE, path, since, nbytes=len(content),
                                               wire=wire, lane=lane))
        await self.side.link.drain(lane)
        for message in messages[1:]:
            self.side.link.send_on(message, lane)
            await self.side.link.drain(lane)
        return new_signature

    async def _made(self, key: object, make: Callable[[], Awaitable[_T]]) -> _T:
        """What `make` makes of content named in `key` by its digest: made once for every
        target (lsync.client.local.localside.SharedReads.made)."""
        reads = self.local.reads
        return await (make() if reads is None else reads.made(key, make))

    def _save_lane(self) -> int:
        return FAST_LANE if self.side.link.lanes >= FAST_LANE else 0

    def bulk_backlogged(self) -> bool:
        """Whether a burst's data waits for the link on a lane it takes (`_bulk_lane`)."""
        link = self.side.link
        if link.lanes <= FAST_LANE:
            return link.backlogged(0)
        return any(link.backlogged(lane) for lane in range(FAST_LANE + 1, link.lanes + 1))

    def _bulk_lane(self, size: int) -> int:
        """The data lane of the next batched file: the lanes after the fast one, in turn,
        a batch's worth of content each (main when there are none)."""
        bulk = self.side.link.lanes - FAST_LANE
        if bulk <= 0:
            return 0
        self._bulk_bytes += size
        if self._bulk_bytes >= BATCH_BYTES:
            self._bulk_bytes = 0
            self._bulk_turn += 1
        return FAST_LANE + 1 + self._bulk_turn % bulk

    def _remove(self, owner: str, path: str, since: float) -> None:
        """Delete what lsync owns at and below `path`; the rest stays (and is forgotten)."""
        self.check_root()
        for below in [*self.side.model.descendants(path), path]:
            entry = self.side.model.get(below)
            if entry is None:
                continue
            if entry.owned or self.side.delete_extra:
                self.side.submit(m.Delete(self.side.link.next_seq(), below),
                                 InFlight(owner, Op.DELETE, below, since, dropped=entry))
            self.side.model.drop(below)

    def _set_aside(self, path: str, since: float) -> None:
        """Make room for a file or link where the remote has a directory: delete what lsync
        owns below it, then move the directory aside (`PATH.lsync-kept-N`) and delete it
        there, which removes it when nothing is left and keeps it, with the build outputs
        lsync did not make, when something is (the agent says so, and it is reported)."""
        self.check_root()
        for below in list(self.side.model.descendants(path)):
            entry = self.side.model.get(below)
            if entry is not None and (entry.owned or self.side.delete_extra):
                self.side.submit(m.Delete(self.side.link.next_seq(), below),
                                 InFlight(path, Op.DELETE, below, since, dropped=entry))
            self.side.model.drop(below)
        aside = f"{path}.lsync-kept-{time.time_ns() % 10**9}"
        self.side.submit(m.Rename(self.side.link.next_seq(), path, aside),
                         InFlight(path, Op.RENAME, aside, since, src=path))
        self.side.submit(m.Delete(self.side.link.next_seq(), aside),
                         InFlight(path, Op.DELETE, aside, since))
        self.side.model.drop(path)

    def check_root(self) -> None:
        if not self.local.root.is_dir():
            raise SafetyStop(f"the local tree {self.local.root} has disappeared; stopped without "
                             "deleting anything on the remote")
        try:
            with os.scandir(self.local.root) as listing:
                empty = next(iter(listing), None) is None
        except OSError as exc:
            raise SafetyStop(f"the local tree {self.local.root} cannot be read ({exc.strerror}); "
                             "stopped without deleting anything on the remote") from None
        if empty and self.side.model.owned_count():
            raise SafetyStop(f"the local tree {self.local.root} is suddenly empty (an unmounted "
                             "disk?); stopped without deleting anything on the remote")
