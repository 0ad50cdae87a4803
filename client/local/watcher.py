"""Watching the local tree: the watcher backends behind one interface, `TreeWatcher`.

On Linux lsync uses its own inotify watcher (`lsync.client.local.inotify`): it never follows
symlinks (a link to an in-tree directory is synced as a link, and changes in the directory
are seen under its real path only), it reports a queue overflow (`WatchBatch.overflow`:
the engine then checks the whole tree) and it reports which files their writers still hold
open (`writing`) and which they closed (`closed`), so that a file is read once its writer
is done, not when a timer guesses so. Elsewhere (macOS) watchfiles does the watching; it
reports neither overflows nor closes, and follows symlinks, so the engine relies on its
convergence checks there.

Paths are relative to the root, POSIX style; "" stands for the root itself. Within a
batch, additions come before deletions, so that a move seen as delete + add can be
recognised while the old path still exists remotely. `step_ms` is how long a backend waits
for more events before it delivers a batch: it bounds detection latency (see
benchmarks/README.md for the latency against idle CPU trade-off).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from lsync.client.local.inotify import InotifyWatcher, RootGone, WatchBatch, available

DEFAULT_STEP_MS = 5
DEFAULT_DEBOUNCE_MS = 20  # a save at the end of a long burst waits at most this

__all__ = ["DEFAULT_DEBOUNCE_MS", "DEFAULT_STEP_MS", "RootGone", "TreeWatcher", "WatchBatch",
           "open_watcher", "relative"]


class TreeWatcher(Protocol):
    close_events: bool  # whether batches say which files writers hold open / closed

    def batches(self, stop: asyncio.Event) -> AsyncIterator[WatchBatch]: ...
    def seen_until(self) -> int: ...  # Unix ns: every change before it has been delivered
    def refresh(self, rel: str) -> None: ...
    def close(self) -> None: ...


def relative(root: str, path: str) -> str | None:
    """`path` relative to `root` with '/' separators, '' for the root, None if outside."""
    if path == root:
        return ""
    prefix = root.rstrip(os.sep) + os.sep
    if not path.startswith(prefix):
        return None
    return path[len(prefix):].replace(os.sep, "/")


class _Inotify:
    """`InotifyWatcher` as a `TreeWatcher`."""

    close_events = True

    def __init__(self, root: Path, skip_dir: Callable[[str], bool], step_ms: int,
                 debounce_ms: int) -> None:
        self.watcher = InotifyWatcher(root, skip_dir, step_ms, debounce_ms)

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[WatchBatch]:
        async for batch in self.watcher.batches(stop):
            yield batch

    def seen_until(self) -> int:
        return self.watcher.seen_until()

    def refresh(self, rel: str) -> None:
        self.watcher.refresh(rel)

    def close(self) -> None:
        self.watcher.close()


class _Watchfiles:
    """watchfiles as a `TreeWatcher` (no overflow or close information)."""

    close_events = False

    def __init__(self, root: Path, step_ms: int, debounce_ms: int) -> None:
        self.root = root
        self.step_ms = step_ms
        self.debounce_ms = debounce_ms
        self.debounce_ns = (debounce_ms + step_ms) * 1_000_000

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[WatchBatch]:
        import watchfiles

        top = str(self.root)
        async for changes in watchfiles.awatch(
                top, watch_filter=None, step=self.step_ms, debounce=self.debounce_ms,
                stop_event=stop, recursive=True, ignore_permission_denied=True):
            added: list[str] = []
            others: list[str] = []
            deleted: list[str] = []
            for change, path in changes:
                rel = relative(top, path)
                if rel is None:
                    continue
                if change == watchfiles.Change.added:
                    added.append(rel)
                elif change == watchfiles.Change.deleted:
                    deleted.append(rel)
                else:
                    others.append(rel)
            paths = sorted(set(added)) + sorted(set(others)) + sorted(set(deleted))
            if paths:
                yield WatchBatch(paths, frozenset(), frozenset())
        if not stop.is_set():
            raise RootGone(f"{self.root} can no longer be watched")

    def seen_until(self) -> int:
        return time.time_ns() - self.debounce_ns - 50_000_000

    def refresh(self, rel: str) -> None:
        pass  # watchfiles watches everything, ignored directories included

    def close(self) -> None:
        pass


async def open_watcher(root: Path, skip_dir: Callable[[str], bool],
                       step_ms: int = DEFAULT_STEP_MS, debounce_ms: int = DEFAULT_DEBOUNCE_MS,
                       on_fallback: Callable[[str], None] = lambda why: None) -> TreeWatcher:
    """The best watcher for this platform, started (inotify on Linux, watchfiles elsewhere
    or when inotify cannot start, e.g. too many inotify instances: `on_fallback` says why).
    inotify's walk of the tree runs in a worker thread: the event loop goes on meanwhile
    (the SSH handshakes of a start are under way, and each step of theirs waits for it)."""
    if sys.platform.startswith("linux") and available():
        watcher = _Inotify(root, skip_dir, step_ms, debounce_ms)
        preparing = asyncio.ensure_future(asyncio.to_thread(watcher.watcher.prepare))
        try:
            await asyncio.shield(preparing)
            watcher.watcher.attach()
            return watcher
        except asyncio.CancelledError:
            # (a thread cannot be stopped: its descriptor is closed when it is done)
            preparing.add_done_callback(lambda _: watcher.close())
            raise
        except OSError as exc:
            watcher.close()
            on_fallback(f"inotify unavailable ({exc.strerror or exc}); watching with "
                        "watchfiles, which cannot report lost events")
    return _Watchfiles(root, step_ms, debounce_ms)
