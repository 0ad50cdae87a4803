"""Which content hash a session offers the agent, and which it guesses before the answer.

The agent takes the first offered algorithm it computes at full speed
(lsync.protocol.hashing). The offer holds every algorithm this process computes, and puts
first the algorithm of this tree's newest hash cache, when one exists: each algorithm has
its own cache here and its own record on the remote, and a session that changed algorithm
would hash the whole tree again on both ends (an upgrade of lsync that makes SHA-256 the
choice keeps the trees synced before on BLAKE2b). Then xxh3 (where the `xxhash` package is
installed), SHA-256 where it is fast here, BLAKE2b. The guess, made so that the scan can
start before the agent answers, is the algorithm the agent chose last in this process,
else the head of the offer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lsync.client.local.hashcache import default_cache_path
from lsync.protocol import hashing


def _newest_cache(root: Path) -> str | None:
    found = []
    for name in hashing.ALGORITHMS:
        with contextlib.suppress(OSError):
            found.append((default_cache_path(root, name).stat().st_mtime, name))
    return max(found)[1] if found else None


def offered(root: Path) -> list[str]:
    """The algorithms to offer for the tree at `root`, best first."""
    fast = hashing.available_hashes()
    order = fast + [name for name in hashing.HASHERS if name not in fast]
    cached = _newest_cache(root)
    if cached in order:
        order.remove(cached)
        order.insert(0, cached)
    return order


def likely(root: Path, seen: str | None) -> str:
    """The hash the agent will most likely choose: the one it chose last (`seen`), else
    the head of the offer."""
    return seen if seen is not None else offered(root)[0]
