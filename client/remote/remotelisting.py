"""The remote's last whole-tree listing, kept between sessions: a restart hears only changes.

The agent keeps the last whole-tree manifest it sent under a generation id (see
lsync.agent.listing); the client keeps its copy of the same manifest, with that id, under
~/.cache/lsync (named after the local tree and the target). `fetch` asks for the manifest
with the generation held (`ListTree.since`); when the agent still holds the same listing it
answers with only the entries that changed and the paths that are gone, and `fetch` applies
them to the copy — which gives exactly the whole manifest the agent would have sent, so
everything after (planner.load_manifest, the hashes asked for, ownership) is as on a first
start. The agent walks the tree for every answer, so what others changed remotely between
sessions (build outputs, edits of synced files) is in the delta.

Nothing doubtful is used: a copy that is missing, torn, corrupt (its SHA-256 is checked),
of another format or of another target is no copy (the request names no generation, the
answer is the whole manifest), and a delta against a listing the client did not name is a
broken link. The copy is replaced (temp file + rename) only by a complete answer; an answer
that names no generation leaves the copy as it is (the agent's own stands too). `refresh`
asks again at the end of a session, so that the next start hears only what changed after
it. The work on the copy (reading, checking, writing) is for worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from lsync.client.errors import LinkBroken, LsyncError
from lsync.client.local.hashcache import HashCache, default_cache_dir
from lsync.client.local.localentry import LocalEntry
from lsync.client.remote import planner
from lsync.client.remote.model import RemoteModel
from lsync.client.transport.link import AgentLink
from lsync.protocol import messages as m

_MAGIC = b"lsync-remote-listing 1\n"
_DIGEST = 32  # bytes of SHA-256 after the magic
REFRESH_TIMEOUT = 10.0  # seconds for the listing at the end of a session

Entry = list[Any]


@dataclass
class Listing:
    """A whole-tree manifest (path -> manifest entry) and the generation the agent gave it
    ("" for none: not to be kept)."""

    generation: str = ""
    entries: dict[str, Entry] = field(default_factory=dict)
    changed: bool = True  # differs from the copy on disk (a delta found nothing: False)
    # When it came as a delta against the copy held: the entries new or changed, and the
    # paths gone (planner.load_changes brings a model of the copy up to date with them).
    delta: tuple[list[Entry], list[str]] | None = None


def default_path(root: Path, target: str) -> Path:
    """The copy for the local tree `root` synced to `target` (as `Target.describe()`)."""
    key = b"\0".join((os.fsencode(Path(root).resolve()),
                      target.encode("utf-8", "surrogateescape")))
    tag = hashlib.sha256(key).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]", "_", Path(root).resolve().name)[:40] or "root"
    return default_cache_dir() / f"{label}-{tag}.remote"


def load(path: Path, target: str) -> Listing | None:
    """The copy kept at `path` for `target`, or None when there is none worth trusting."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + _DIGEST
    payload = memoryview(data)[head:]  # (no copy of the listing's megabytes)
    if (not data.startswith(_MAGIC)
            or hashlib.sha256(payload).digest() != data[len(_MAGIC):head]):
        return None
    try:
        saved = msgpack.unpackb(payload, raw=False, use_list=True)
        generation, saved_target, entries = saved
    except Exception:  # (only our own checked bytes get here; still, no doubt survives)
        return None
    if (saved_target != target or not isinstance(generation, str) or not generation
            or len(generation) > m.MAX_GENERATION or not m.is_manifest_entries(entries)):
        return None
    return Listing(generation, {entry[0]: entry for entry in entries}, changed=False)


def save(path: Path, target: str, listing: Listing) -> None:
    """Keep `listing` at `path` (OSError when it cannot be written)."""
    payload = msgpack.packb([listing.generation, target, list(listing.entries.values())],
                            use_bin_type=True)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            for part in (_MAGIC, hashlib.sha256(payload).digest(), payload):
                out.write(part)  # (not joined: no second copy of a listing of megabytes)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def forget(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def fetch(batches: AsyncIterator[m.ManifestBatch], held: Listing | None) -> Listing:
    """The whole manifest from the answer to `ListTree(since=held.generation)` (`held`:
    the copy that was named, None if none was); raises LinkBroken when the answer is a
    delta against anything else."""
    since = held.generation if held is not None else ""
    entries: dict[str, Entry] | None = None
    delta = False
    generation = ""
    updated: list[Entry] = []
    removed: list[str] = []
    async for batch in batches:
        if entries is None:
            delta = bool(batch.base)
            if delta and (held is None or batch.base != since):
                raise LinkBroken("the agent sent the changes since a listing this client "
                                 "does not hold")
            entries = dict(held.entries) if delta and held is not None else {}
        elif bool(batch.base) != delta:
            raise LinkBroken("the agent mixed a whole manifest and a delta in one answer")
        if batch.removed and not delta:
            raise LinkBroken("the agent named removed paths in a whole manifest")
        for path in batch.removed:
            entries.pop(path, None)
        for entry in batch.entries:
            entries[entry[0]] = entry
        if delta:
            updated.extend(batch.entries)
            removed.extend(batch.removed)
        generation = batch.generation
    assert entries is not None  # (the link yields at least the last batch, or raises)
    changed = not (delta and held is not None and generation == held.generation)
    return Listing(generation, entries, changed, (updated, removed) if delta else None)


class Copy:
    """The copy of one target's listing for one local tree, as a session uses it."""

    def __init__(self, root: Path, target: str, note: Callable[[str], None]) -> None:
        self.target = target
        self.path = default_path(root, target)
        self.note = note

    def load(self) -> Listing | None:
        """(For a worker thread.)"""
        return load(self.path, self.target)

    def keep(self, listing: Listing) -> None:
        """Keep `listing` as the copy, else say why not (for a worker thread)."""
        try:
            save(self.path, self.target, listing)
        except (OSError, ValueError) as exc:
            self.note(f"could not keep the remote's listing ({exc}); the next start lists "
                      "the whole remote tree")

    async def refresh(self, link: AgentLink) -> None:
        """At the end of a session that wrote: keep the remote's listing as it is now."""
        try:
            held = await asyncio.to_thread(self.load)
            listing = await asyncio.wait_for(fetch(
                link.listing(held.generation if held is not None else ""), held),
                REFRESH_TIMEOUT)
        except (LsyncError, asyncio.TimeoutError):
            return  # (the next start asks for what changed since the older listing)
        if listing.changed and listing.generation:
            await asyncio.to_thread(self.keep, listing)


async def prepare(scan: asyncio.Task[tuple[HashCache, dict[str, LocalEntry]]], held: Listing,
                  is_ignored: planner.IsIgnored
                  ) -> tuple[dict[str, LocalEntry], RemoteModel, list[str]] | None:
    """The model of the listing `held` against the local scan (which it also returns), made
    in a worker thread while the agent walks; None when that scan did not finish (another
    replaced it)."""
    await asyncio.wait({scan})
    if scan.cancelled() or scan.exception() is not None:
        return None
    _, local = scan.result()
    model, need_hash = await asyncio.to_thread(
        planner.load_manifest, list(held.entries.values()), local, is_ignored)
    return local, model, need_hash


async def updated_model(preparing: asyncio.Future[tuple[dict[str, LocalEntry], RemoteModel,
                                                         list[str]] | None] | None,
                        listing: Listing, local: dict[str, LocalEntry],
                        is_ignored: planner.IsIgnored) -> tuple[RemoteModel, list[str]] | None:
    """What `prepare` made of the copy held, brought up to date with the delta `listing`
    came with (planner.load_changes); None when the whole manifest is to be loaded."""
    if preparing is None or listing.delta is None:
        return None
    prepared = await preparing
    if prepared is None or prepared[0] is not local:
        return None
    _, model, need_hash = prepared
    if not planner.load_changes(model, need_hash, *listing.delta, local, is_ignored):
        return None
    return model, need_hash
