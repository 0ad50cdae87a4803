"""The initial comparison of one target: what the remote holds against the local scan.

`initial_comparison` loads the remote's manifest into the model (or takes the model made of
the copy of the listing kept from the last session: lsync.client.remote.remotelisting), has the
agent hash the remote files whose content is in doubt while the local files that may hold
the same content are hashed here (in the read-ahead's worker threads; the others are read
once, when they are sent), settles what lsync owns, and queues every path that differs. A
big initial sync also gets a preset compression dictionary sampled from its files. With
`--delete`, an empty local tree against a remote that holds entries is a safety stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

from lsync.client.errors import SafetyStop
from lsync.client.local.hashcache import HashCache
from lsync.client.local.localentry import LocalEntry, ScanError
from lsync.client.local.stableread import hash_file
from lsync.client.remote import planner
from lsync.client.remote.model import FILE, RemoteModel
from lsync.client.remote.passes import LocalInputs
from lsync.client.remote.remoteside import RemoteSide
from lsync.client.remote.sender import sample_dictionary
from lsync.client.remote.window import InFlight, Op
from lsync.protocol import messages as m
from lsync.protocol import packing

HASH_BATCH = 2000  # paths per HashPaths request
DICTIONARY_MIN_FILES = 64  # an initial sync of this many files sets a preset dictionary


async def initial_comparison(side: RemoteSide, local_side: LocalInputs,
                             pool: concurrent.futures.Executor,
                             local: dict[str, LocalEntry], remote_entries: list[list[Any]],
                             loaded: tuple[RemoteModel, list[str]] | None = None) -> int:
    """Load the model and queue every path where local and remote differ (see the module
    docstring); returns how many remote files the agent was asked to hash. `local` gets
    the digests of the local files hashed here."""
    rules = local_side.rules
    side.model, need_hash = loaded or planner.load_manifest(remote_entries, local,
                                                            rules.is_ignored)
    model = side.model
    if side.delete_extra and not local and len(model):
        raise SafetyStop(
            f"the local tree {local_side.root} is empty while the remote holds "
            f"{len(model)} entries; refusing to delete them (--delete)")
    batches = [need_hash[i:i + HASH_BATCH] for i in range(0, len(need_hash), HASH_BATCH)]
    # Local files the scan did not hash (not in the hash cache) are hashed now, where the
    # remote holds a file of that size at that path (it may be the same), while the agent
    # hashes its side; the others are read once, when they are sent.
    unhashed = [p for p, e in local.items()
                if e.kind == "file" and e.digest is None
                and (r := model.get(p)) is not None and r.kind == FILE and r.size == e.size]
    hashing = asyncio.ensure_future(_hash_local(pool, local_side, unhashed))
    try:
        results = await asyncio.gather(*(side.link.hash_paths(b) for b in batches))
    finally:
        local.update(await hashing)
    for batch, digests in zip(batches, results, strict=True):
        for path, digest in zip(batch, digests, strict=True):
            model.set_digest(path, digest)
            entry = model.get(path)
            if entry is not None:
                planner.settle_ownership(entry)
    to_send = planner.differences(local, model, rules.is_ignored, side.delete_extra)
    files = [p for p in to_send if p in local and local[p].kind == "file"]
    if len(files) >= DICTIONARY_MIN_FILES and side.packing.code == packing.PACK_ZLIB:
        _set_dictionary(side, local_side, files)
    side.initial_total = (len(files), sum(local[p].size for p in files))
    side.initial_done = (0, 0)
    side.mark_dirty(to_send, hint=False)
    return len(need_hash)


async def _hash_local(pool: concurrent.futures.Executor, local_side: LocalInputs,
                      paths: list[str]) -> dict[str, LocalEntry]:
    """Entries with digests for `paths`, read in the worker threads (a path that cannot be
    read keeps no digest: its pass will look at it)."""
    if not paths:
        return {}
    loop = asyncio.get_running_loop()
    chunks = [paths[i:i + HASH_BATCH] for i in range(0, len(paths), HASH_BATCH)]
    found: dict[str, LocalEntry] = {}
    for part in await asyncio.gather(*(loop.run_in_executor(
            pool, _hash_files, local_side.root, chunk, local_side.cache) for chunk in chunks)):
        found.update(part)
    return found


def _hash_files(root: Path, paths: list[str], cache: HashCache) -> dict[str, LocalEntry]:
    """For a worker thread: entries with digests of the files among `paths`."""
    found: dict[str, LocalEntry] = {}
    for path in paths:
        try:
            found[path] = hash_file(root, path, cache)
        except (OSError, ScanError):
            continue
    return found


def _set_dictionary(side: RemoteSide, local_side: LocalInputs, files: list[str]) -> None:
    """Give the agent a preset dictionary sampled from the files about to be sent."""
    dictionary = sample_dictionary(local_side.root, files, local_side.cache)
    if not dictionary:
        return
    side.submit(m.SetDictionary(side.link.next_seq(), dictionary),
                InFlight("", Op.DICTIONARY, "", side.clock()))
    side.packing.dictionary = dictionary
