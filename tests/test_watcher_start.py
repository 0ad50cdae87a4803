"""Starting the watcher (lsync.client.local.watcher.open_watcher): inotify's walk of the tree
runs in a worker thread while the event loop goes on (the SSH connections of a start are
under way); the tree is watched once it returns, and a start cancelled during the walk
leaves no inotify descriptor behind."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from lsync.client.local.inotify import InotifyWatcher
from lsync.client.local.watcher import open_watcher
from tests.test_inotify import inotify_fds, kernel_watches, run


def test_a_start_cancelled_during_the_walk_closes_inotify_once_the_walk_is_done(
        tmp_path: Path) -> None:
    """open_watcher walks the tree in a worker thread (the event loop goes on meanwhile);
    cancelled there, the watcher it was making is closed when the thread finishes."""
    for i in range(300):
        (tmp_path / f"d{i}" / "sub").mkdir(parents=True)
    walking = asyncio.Event()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        slow, walked = threading.Event(), threading.Event()
        real_prepare = InotifyWatcher.prepare

        def prepare(self: InotifyWatcher) -> None:
            loop.call_soon_threadsafe(walking.set)
            slow.wait(5)  # (until the start below is cancelled)
            try:
                real_prepare(self)
            finally:
                walked.set()

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(InotifyWatcher, "prepare", prepare)
            starting = asyncio.ensure_future(open_watcher(tmp_path, lambda rel: False))
            await asyncio.wait_for(walking.wait(), 5)
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
            slow.set()
            assert await asyncio.to_thread(walked.wait, 10)
            deadline = time.monotonic() + 10
            while inotify_fds() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        assert inotify_fds() == []

    assert inotify_fds() == []
    run(scenario)


def test_the_tree_is_watched_once_open_watcher_returns(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"d{i}" / "sub").mkdir(parents=True)

    async def scenario() -> None:
        watcher = await open_watcher(tmp_path, lambda rel: False)
        try:
            assert kernel_watches() == 1 + 50 * 2
        finally:
            watcher.close()

    run(scenario)
