"""What the agent holds at paths it refused to change: asked again before their next pass.

A refused operation leaves the model a guess (a refused delete's entry was put back, but not
over what the same pass sent after it; a refused mkdir forgot what was below): the owner's
next pass (lsync.client.remote.passes) first asks the agent what is at those paths and
below them, and the model then says exactly that. `flying_near` tells which paths have
unanswered operations near them (what the agent would list there may not be what those
operations leave: such a pass waits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from lsync.client.local.ignore import IgnoreRules
from lsync.client.remote import planner
from lsync.client.remote.model import RemoteEntry
from lsync.client.remote.remoteside import RemoteSide
from lsync.client.remote.window import Window

RELEARN_HASH_BATCH = 2000  # files per HashPaths when the agent is asked about refused paths
RELEARN_MAX = 2000  # other refused paths' owners asked about in the same round trip


def flying_near(window: Window) -> Callable[[str], bool]:
    """A test of whether an unanswered operation touches a path, a path below it, or a
    directory above it (as things are now)."""
    flying: set[str] = set()
    holding: set[str] = set()  # directories with operations in flight below them
    for flight in window.flights.values():
        for touched in (flight.target, flight.src):
            if touched:
                flying.add(touched)
                holding.update(ancestors(touched))

    def near(path: str) -> bool:
        return path in flying or path in holding or any(
            parent in flying for parent in ancestors(path))
    return near


async def relearn(side: RemoteSide, rules: IgnoreRules, path: str,
                  near: Callable[[str], bool]) -> None:
    """Ask the agent what is at the remote paths `path`'s pass had refused, and below
    them, and let the model say exactly that. The other refused paths with nothing in
    flight near them are asked about in the same round trip (after a read-only spell, a
    thousand paths retry at once: one round trip each was minutes)."""
    others = [o for o, paths in side.unsure.items()
              if o != path and not any(near(p) for p in paths)]
    owners = [path, *others[:RELEARN_MAX]]
    asked: set[str] = set()
    for owner in owners:
        asked.update(p for p in side.unsure.pop(owner) if p)
    tops = sorted(p for p in asked if not any(parent in asked for parent in ancestors(p)))
    listings = await asyncio.gather(*(_listing(side, top) for top in tops))
    need: list[tuple[str, RemoteEntry | None]] = []
    for top, entries in zip(tops, listings, strict=True):
        need += planner.relearn(side.model, top, entries, rules.is_ignored)
    parts = [need[i:i + RELEARN_HASH_BATCH] for i in range(0, len(need), RELEARN_HASH_BATCH)]
    answers = await asyncio.gather(*(side.link.hash_paths([p for p, _ in part])
                                     for part in parts))
    for part, digests in zip(parts, answers, strict=True):
        for (file, old), digest in zip(part, digests, strict=True):
            planner.relearned_digest(side.model, file, digest, old)


async def _listing(side: RemoteSide, top: str) -> list[list[Any]]:
    return [entry async for batch in side.link.list_tree(top) for entry in batch]


def ancestors(path: str) -> Iterator[str]:
    parent = path.rpartition("/")[0]
    while parent:
        yield parent
        parent = parent.rpartition("/")[0]
