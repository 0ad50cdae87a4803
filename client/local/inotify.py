"""Watching the local tree through raw Linux inotify: batches of changed relative paths.

What it promises:
- Symlinks are never followed: a symlink is reported as its own path and never entered, so a
  change inside a directory that an in-tree symlink points to is reported under its real path.
- Every directory below the root is watched unless `skip_dir` says to skip it (nor anything
  below it). A directory that appears (created or moved in) is watched before it is listed, and
  everything found inside it is reported, so files written before its watch existed are not
  lost. A directory that leaves (moved away or deleted) is forgotten with everything below it;
  events of forgotten watches are dropped, so stale watch descriptors never produce paths.
- Lost events are never silent: a queue overflow, a filesystem unmounted below the root, or a
  directory that could not be watched for lack of watches gives a batch with `overflow=True`
  and a note; the consumer must then rescan everything. After an overflow the tree is walked
  again, so directories created while events were lost are watched too.
- `writing` and `closed` tell a half-written file from a finished one (IN_MODIFY after the
  last IN_CLOSE_WRITE, and IN_CLOSE_WRITE).
- The root deleted, moved or unmounted raises `RootGone` from `batches()`.
- Paths are relative to the root, '/'-separated, "" for the root itself; names that cannot
  travel on the wire (`relpath_problem`: not UTF-8, too long) are skipped.

Parsing the kernel's buffer and collecting one batch are pure (`parse_events`,
`BatchCollector`); the watcher reads its non-blocking descriptor with `loop.add_reader`.
The first walk of the whole tree (`prepare`) may run in a worker thread before the watcher
is attached to the loop (`attach`): what changes meanwhile waits in inotify's queue.
Walking a big subtree that appeared (a checkout, a directory moved in, the whole tree after
an overflow) takes at most WALK_SLICE of each turn of the event loop, so replies, pings and
the control socket keep running; until the walk is over, `seen_until` does not move (a
flush waits for what the walk will report).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import select
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsync.protocol.paths import is_within, parent_of, relpath_problem

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

WATCH_MASK = (IN_CREATE | IN_DELETE | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM
              | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_DONT_FOLLOW | IN_ONLYDIR | IN_EXCL_UNLINK)
ROOT_GONE_MASK = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED

_EVENT = struct.Struct("=iIII")  # struct inotify_event without its name
READ_SIZE = 65536                # room for hundreds of events; one event never exceeds 272 bytes
MAX_READS_PER_WAKEUP = 16        # then let the loop run; the reader is level-triggered
WALK_SLICE = 0.005  # seconds of walking a new subtree (or the tree, after an overflow) at
# most per turn of the event loop; the rest continues on the next turns
LATEST = 4  # paths of a batch's last events it names (a save at the end of a burst)
WATCH_LIMIT_NOTE = "cannot watch all directories: raise fs.inotify.max_user_watches"


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Changed paths: additions, then modifications, then deletions, each group sorted."""

    paths: list[str]
    writing: frozenset[str]  # paths of this batch still open for writing at its end
    closed: frozenset[str]   # paths that got IN_CLOSE_WRITE in this batch
    overflow: bool = False   # events were lost: the consumer must rescan everything
    note: str = ""           # why, when overflow; also names directories skipped for EACCES
    # The paths of the batch's last events, the latest last (a hint: not part of equality).
    latest: tuple[str, ...] = field(default=(), compare=False)


class RootGone(Exception):
    """The watched root was deleted, moved, or its filesystem unmounted."""



@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "inotify_init1"):
        return None
    for name, argtypes in (("inotify_init1", [ctypes.c_int]),
                           ("inotify_add_watch", [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]),
                           ("inotify_rm_watch", [ctypes.c_int, ctypes.c_int])):
        getattr(libc, name).argtypes = argtypes
        getattr(libc, name).restype = ctypes.c_int
    return libc


def available() -> bool:
    """True on Linux when libc has inotify_init1."""
    return _libc() is not None


def _call(name: str, *args: Any) -> int:
    libc = _libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "inotify is not available on this system")
    result = int(getattr(libc, name)(*args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def add_watch(fd: int, path: str, mask: int) -> int:
    """inotify_add_watch(2): the watch descriptor of directory `path`; raises OSError."""
    return _call("inotify_add_watch", fd, os.fsencode(path), mask)



@dataclass(frozen=True, slots=True)
class RawEvent:
    wd: int
    mask: int
    cookie: int
    name: str  # "" for an event about the watched directory itself


def parse_events(buf: bytes) -> Iterator[RawEvent]:
    """The events in one read() of an inotify descriptor (names NUL-padded, os.fsdecode'd)."""
    offset = 0
    while offset + _EVENT.size <= len(buf):
        wd, mask, cookie, length = _EVENT.unpack_from(buf, offset)
        start = offset + _EVENT.size
        name = buf[start:start + length].split(b"\0", 1)[0]
        offset = start + length
        yield RawEvent(wd, mask, cookie, os.fsdecode(name))


_ADDED, _MODIFIED, _DELETED = 0, 1, 2


class BatchCollector:
    """One batch being collected: each path's kind, closes, overflow and notes. An addition
    or deletion overrides a path's kind (the latest says if it exists); a modification not."""

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.closed: set[str] = set()
        self.overflow = False
        self.notes: list[str] = []
        self.latest: OrderedDict[str, None] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.kinds or self.overflow or self.notes)

    def _saw(self, rel: str) -> None:
        self.latest[rel] = None
        self.latest.move_to_end(rel)
        if len(self.latest) > LATEST:
            self.latest.popitem(last=False)

    def added(self, rel: str) -> None:
        self.kinds[rel] = _ADDED
        self._saw(rel)

    def deleted(self, rel: str) -> None:
        self.kinds[rel] = _DELETED
        self._saw(rel)

    def modified(self, rel: str) -> None:
        self.kinds.setdefault(rel, _MODIFIED)
        self._saw(rel)

    def note(self, text: str, overflow: bool = False) -> None:
        if text not in self.notes:
            self.notes.append(text)
        self.overflow = self.overflow or overflow

    def batch(self, open_for_write: set[str]) -> WatchBatch:
        groups: tuple[list[str], list[str], list[str]] = ([], [], [])
        for rel, kind in self.kinds.items():
            groups[kind].append(rel)
        paths = sorted(groups[0]) + sorted(groups[1]) + sorted(groups[2])
        return WatchBatch(paths, frozenset(open_for_write.intersection(self.kinds)),
                          frozenset(self.closed), self.overflow, "; ".join(self.notes),
                          tuple(self.latest))


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # vanished while listing



class InotifyWatcher:
    """Watches `root` and below; `batches()` yields what changed (see the module docstring).

    `skip_dir(rel)` True: that directory and everything below it is not watched (its own
    entry is still reported when it changes in a watched parent). One `batches()` consumer.
    """

    def __init__(self, root: Path, skip_dir: Callable[[str], bool] = lambda rel: False,
                 step_ms: int = 5, debounce_ms: int = 50) -> None:
        self._root = os.fspath(root)
        self._skip_dir = skip_dir
        self._step = step_ms / 1000
        self._debounce = debounce_ms / 1000
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._root_wd = -1
        self._wd_to_rel: dict[int, str] = {}
        self._rel_to_wd: dict[str, int] = {}
        self._subdirs: dict[str, set[str]] = {}  # watched directory -> its watched children
        self._open_for_write: set[str] = set()   # IN_MODIFY seen after the last IN_CLOSE_WRITE
        self._pending = BatchCollector()
        self._clean_ns = 0  # wall time when, last seen, no event was unread or undelivered
        self._first_at: float | None = None      # loop time of the pending batch's first event
        self._last_at = 0.0
        self._resync_due = False
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._walking: list[tuple[str, bool]] = []  # directories still to list: (rel, report)
        self._walk_scheduled = False
        self._resync_seen: set[str] | None = None  # directories seen by the resync's walk

    def start(self) -> None:
        """Open inotify and watch the whole tree; call within a running loop. Raises OSError."""
        self.prepare()
        self.attach()

    def prepare(self) -> None:
        """Open inotify and watch the whole tree (a few hundred ms on the Linux kernel's
        5,000 directories): from any thread, before `attach` and while nothing else uses
        the watcher; what changes meanwhile waits in inotify's queue. Raises OSError."""
        if self._fd is not None:
            raise RuntimeError("InotifyWatcher started twice")
        fd = _call("inotify_init1", os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._root_wd = add_watch(fd, self._root, WATCH_MASK)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._walk("", report=False, sliced=False)

    def attach(self) -> None:
        """Start reading the events of a prepared watcher; call within the running loop."""
        loop = asyncio.get_running_loop()
        assert self._fd is not None, "prepare() first"
        self._loop = loop
        loop.add_reader(self._fd, self._on_readable)
        self._note_activity()

    def refresh(self, rel: str) -> None:
        """Walk `rel` again: watch directories below it not watched yet, and stop watching
        those `skip_dir` now skips (call when ignore rules change)."""
        if self._fd is None:
            return
        if rel and self._skip_dir(rel):
            self._forget(rel)
        else:
            self._walk(rel, report=False)
        self._note_activity()

    async def batches(self, stop: asyncio.Event) -> AsyncGenerator[WatchBatch, None]:
        """Yield batches until `stop` is set or the watcher is closed; raises RootGone.

        A batch is delivered once no event arrived for step_ms, or debounce_ms after its
        first event, whichever comes first.
        """
        loop = asyncio.get_running_loop()
        stop_task = loop.create_task(stop.wait())
        try:
            while not stop.is_set() and self._fd is not None:
                if self._failure is not None:
                    raise self._failure
                if self._first_at is None:
                    await self._wait(None, stop_task)
                    continue
                due = min(self._last_at + self._step, self._first_at + self._debounce)
                if loop.time() < due:
                    await self._wait(due - loop.time(), stop_task)
                    continue
                pending, self._pending, self._first_at = self._pending, BatchCollector(), None
                if pending:
                    yield pending.batch(self._open_for_write)
        finally:
            stop_task.cancel()
            await asyncio.wait({stop_task})

    def seen_until(self) -> int:
        """A wall time (Unix ns) such that every change made before it has been delivered
        in a batch: now, when no event waits unread in the kernel's queue and none waits
        here for its batch; else the last time that was so."""
        fd = self._fd
        if fd is None or self._first_at is not None or self._pending or self._walking:
            return self._clean_ns
        now = time.time_ns()
        if select.select([fd], [], [], 0)[0]:
            return self._clean_ns
        self._clean_ns = now
        return now

    def close(self) -> None:
        """Stop reading and close the descriptor (which drops every watch); idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)
        for mapping in (self._wd_to_rel, self._rel_to_wd, self._subdirs):
            mapping.clear()
        self._wake()

    async def _wait(self, timeout: float | None, stop_task: asyncio.Future[Any]) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await asyncio.wait({waiter, stop_task}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiter = None
            waiter.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _note_activity(self, event_arrived: bool = False) -> None:
        if not (event_arrived or self._pending) or self._loop is None:
            return
        now = self._loop.time()
        if self._first_at is None:
            self._first_at = now
        self._last_at = now
        self._wake()

    def _on_readable(self) -> None:
        try:
            for _ in range(MAX_READS_PER_WAKEUP):
                if self._fd is None:
                    return
                try:
                    buf = os.read(self._fd, READ_SIZE)
                except BlockingIOError:
                    break
                for event in parse_events(buf):
                    self._handle(event)
                self._note_activity(event_arrived=True)
            if self._resync_due:
                self._resync()
                self._note_activity()
        except Exception as exc:  # raised from batches(), never into the event loop
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._wake()

    def _handle(self, event: RawEvent) -> None:
        mask = event.mask
        if mask & IN_Q_OVERFLOW:
            self._pending.note("inotify queue overflowed: events were lost", overflow=True)
            self._open_for_write.clear()
            self._resync_due = True
            return
        if event.wd == self._root_wd and not event.name and mask & ROOT_GONE_MASK:
            what = ("unmounted" if mask & IN_UNMOUNT else "moved" if mask & IN_MOVE_SELF
                    else "deleted")
            raise RootGone(f"the watched root {self._root} was {what}")
        base = self._wd_to_rel.get(event.wd)
        if base is None:
            return  # a watch already forgotten
        if not event.name:
            if mask & IN_UNMOUNT:
                self._pending.note(f"a filesystem was unmounted at {base}", overflow=True)
                self._resync_due = True
            if mask & (IN_DELETE_SELF | IN_IGNORED):
                self._forget(base)
            elif mask & IN_ATTRIB:
                self._pending.modified(base)
            return
        rel = f"{base}/{event.name}" if base else event.name
        if relpath_problem(rel):
            return
        if mask & (IN_CREATE | IN_MOVED_TO):
            self._pending.added(rel)
            if mask & IN_ISDIR and not self._skip_dir(rel):
                self._walk(rel, report=True)
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            self._pending.deleted(rel)
            self._open_for_write.discard(rel)
            if mask & IN_ISDIR:
                self._forget(rel)
        else:
            if mask & IN_MODIFY:
                self._open_for_write.add(rel)
            if mask & IN_CLOSE_WRITE:
                self._open_for_write.discard(rel)
                self._pending.closed.add(rel)
            self._pending.modified(rel)

    def _abs(self, rel: str) -> str:
        return os.path.join(self._root, rel) if rel else self._root

    def _add(self, rel: str) -> int | None:
        assert self._fd is not None
        try:
            return add_watch(self._fd, self._abs(rel), WATCH_MASK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                pass  # gone or replaced meanwhile: its parent reports that
            elif exc.errno == errno.ENOSPC:
                self._pending.note(WATCH_LIMIT_NOTE, overflow=True)
            else:  # EACCES and the like: this directory only; ENOMEM: maybe many
                self._pending.note(f"cannot watch {rel or '.'}: {exc.strerror}",
                                   overflow=exc.errno == errno.ENOMEM)
            return None

    def _watch(self, rel: str) -> bool:
        """Watch directory `rel` and map it; False when it cannot or must not be entered."""
        wd = self._add(rel)
        if wd is None:
            return False
        known = self._wd_to_rel.get(wd)
        if known == rel:
            return True
        if known is not None:
            if is_within(rel, known):
                return False  # the same directory again below itself: a bind mount loop
            # Moved while its events were lost: forget the old place (its watch too), re-add.
            self._forget(known)
            wd = self._add(rel)
            if wd is None:
                return False
        if rel in self._rel_to_wd:
            self._forget(rel)  # another directory was here before
        self._rel_to_wd[rel] = wd
        self._wd_to_rel[wd] = rel
        if rel:
            self._subdirs.setdefault(parent_of(rel), set()).add(rel)
        return True

    def _forget(self, rel: str) -> None:
        """Drop the mapping and watch of directory `rel` and of everything below it."""
        if not rel or self._fd is None:
            return  # the root stays watched until close() or RootGone
        self._subdirs.get(parent_of(rel), set()).discard(rel)
        stack = [rel]
        while stack:
            current = stack.pop()
            stack.extend(self._subdirs.pop(current, ()))
            wd = self._rel_to_wd.pop(current, None)
            if wd is not None:
                self._wd_to_rel.pop(wd, None)
                with contextlib.suppress(OSError):  # EINVAL: the kernel dropped it already
                    _call("inotify_rm_watch", self._fd, wd)
        if self._open_for_write:
            self._open_for_write = {p for p in self._open_for_write if not is_within(p, rel)}

    def _walk(self, top: str, report: bool, sliced: bool = True) -> None:
        """Watch directory `top` and every directory below it (never through a symlink);
        with `report`, every entry found below `top` counts as added. `sliced`: at most
        WALK_SLICE now, the rest on the next turns of the loop."""
        self._walking.append((top, report))
        self._continue_walk(WALK_SLICE if sliced and self._loop is not None else None)

    def _walk_later(self) -> None:
        self._walk_scheduled = False
        try:
            self._continue_walk(WALK_SLICE)
            self._note_activity()
        except Exception as exc:  # raised from batches(), never into the event loop
            self._fail(exc)

    def _continue_walk(self, budget: float | None) -> None:
        """Walk what is left for up to `budget` seconds (None: all of it)."""
        stack = self._walking
        if self._fd is None:  # closed
            stack.clear()
            return
        deadline = None if budget is None else time.monotonic() + budget
        while stack:
            rel, report = stack.pop()
            self._list(rel, report)  # (at least one directory per slice)
            if stack and deadline is not None and time.monotonic() >= deadline:
                if not self._walk_scheduled and self._loop is not None:
                    self._walk_scheduled = True
                    self._loop.call_soon(self._walk_later)
                return
        if self._resync_seen is not None:
            seen, self._resync_seen = self._resync_seen, None
            for rel in [r for r in self._rel_to_wd if r and r not in seen]:
                self._forget(rel)

    def _list(self, rel: str, report: bool) -> None:
        """Watch one directory and list it: its subdirectories go on the walk's stack."""
        stack = self._walking
        if not self._watch(rel):
            return
        if self._resync_seen is not None:
            self._resync_seen.add(rel)
        try:
            with os.scandir(self._abs(rel)) as entries:
                for entry in entries:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if relpath_problem(child):
                        continue
                    if report:
                        self._pending.added(child)
                    if not _is_real_dir(entry):
                        continue
                    if not self._skip_dir(child):
                        stack.append((child, report))
                    elif child in self._rel_to_wd:
                        self._forget(child)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._pending.note(f"cannot list {rel or '.'}: {exc.strerror}")

    def _resync(self) -> None:
        """Walk the whole tree again after lost events: watch what is new, and once the walk
        is over, forget what left."""
        self._resync_due = False
        self._resync_seen = set()
        # A walk of the tree already under way starts again from the top: what it listed
        # may have changed unseen since, and walks stacked one per overflow (a checkout
        # with a small queue) kept the watcher walking, `seen_until` still, for minutes.
        # Walks of new subtrees, which report what they find, go on.
        self._walking[:] = [item for item in self._walking if item[1]]
        self._walk("", report=False)
