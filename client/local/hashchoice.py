"""Which content hash a session offers the agent, and which it guesses before the answer.

The offer is the same for every session of this process: every algorithm this process
computes, those it computes at full speed first (lsync.protocol.hashing): xxh3 (where the
`xxhash` package is installed), SHA-256 where it is fast here, BLAKE2b. The agent takes the
first it computes at full speed, preferring one it already holds a record of the root
under, so a tree synced before keeps its algorithm on both ends, and the targets of one
run, each with its own agent, never make each other change. The guess, made so that the
scan can start before the agent answers, is the algorithm the agent chose last in this
process, else that of this tree's newest hash cache, else the head of the offer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lsync.client.local.hashcache import default_cache_path
from lsync.protocol import hashing


def offered() -> list[str]:
    """The algorithms to offer, best first."""
    fast = hashing.available_hashes()
    return fast + [name for name in hashing.HASHERS if name not in fast]


def _newest_cache(root: Path) -> str | None:
    found = []
    for name in hashing.ALGORITHMS:
        with contextlib.suppress(OSError):
            found.append((default_cache_path(root, name).stat().st_mtime, name))
    return max(found)[1] if found else None


def likely(root: Path, seen: str | None) -> str:
    """The hash the agent will most likely choose for the tree at `root`."""
    if seen is not None:
        return seen
    cached = _newest_cache(root)
    if cached is not None and cached in hashing.HASHERS:
        return cached
    return offered()[0]
