"""Watching the local tree: watchfiles events turned into batches of relative paths.

watchfiles (inotify on Linux) reports created, modified and deleted paths; a rename arrives
as a delete plus an add, and a directory moved in is reported alone, without its contents —
the engine's reconcile step lists such directories itself. Paths are returned relative to
the root, POSIX style; "" stands for the root itself. `step_ms` is how long watchfiles
waits for more events before it delivers a batch: it bounds detection latency (see
benchmarks/README.md for the latency against idle CPU trade-off).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import watchfiles

DEFAULT_STEP_MS = 5
DEFAULT_DEBOUNCE_MS = 50


def relative(root: str, path: str) -> str | None:
    """`path` relative to `root` with '/' separators, '' for the root, None if outside."""
    if path == root:
        return ""
    prefix = root.rstrip(os.sep) + os.sep
    if not path.startswith(prefix):
        return None
    return path[len(prefix):].replace(os.sep, "/")


async def watch(root: Path, stop: asyncio.Event, step_ms: int = DEFAULT_STEP_MS,
                debounce_ms: int = DEFAULT_DEBOUNCE_MS) -> AsyncIterator[list[str]]:
    """Yield batches of changed relative paths until `stop` is set.

    Within a batch, additions come before deletions, so that a move seen as delete + add
    can be recognised while the old path still exists remotely.
    """
    top = str(root)
    async for changes in watchfiles.awatch(
            top, watch_filter=None, step=step_ms, debounce=debounce_ms, stop_event=stop,
            recursive=True, ignore_permission_denied=True):
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
        batch = sorted(set(added)) + sorted(set(others)) + sorted(set(deleted))
        if batch:
            yield batch
