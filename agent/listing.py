"""Streaming the manifest, and the kept listing that lets a restart hear only what changed.

`send_manifest` streams a walk (lsync.agent.manifest) as `ManifestBatch` messages. For a
whole-tree listing the agent keeps what it listed, under a generation id, in a file beside
its record (~/.cache/lsync/agent-<hash>.listing): a new random id whenever the listing
changed, the same id when it did not (nothing is written then). A client that kept the same
listing names its generation in `ListTree.since`; the agent still walks the whole tree (a
stat per entry, cheap locally, so files changed remotely by others — build outputs, edits
of synced files — are seen) but sends only the entries that differ from the kept listing,
and the paths gone from it (`ManifestBatch.base`, `removed`). The entries compared are the
manifest entries themselves — stat fields, the digest the record knows, what lsync wrote —
so the delta applied to the kept listing is exactly the whole manifest.

Anything doubtful gives the whole manifest: another generation, a missing, torn or corrupt
file (its SHA-256 is checked), another format or another Python (the payload is the dict
path -> entry in `marshal`), no cache at all. The new listing is in place (temp file +
rename) before the answer names its generation; when it cannot be written the answer names
none and the old file stands, still matching the client's old copy. Standard library only,
Python 3.6 and later.
"""

import hashlib
import marshal
import os
import sys
from typing import Any, Callable, Dict, Generator, List, Optional

from lsync.protocol import fastpack
from lsync.protocol import messages as m

MANIFEST_BATCH = 2000
_MAGIC = b"lsync-listing"
_FORMAT = b"2"
_PYTHON = "{}.{}".format(*sys.version_info[:2]).encode("ascii")

Entry = List[Any]
Send = Callable[[m.Message], None]


class KeptListing:
    """The last whole-tree listing of one root (and hash), as kept on disk."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.generation = ""
        self.entries = None  # type: Optional[Dict[str, Entry]]  # None: not read yet

    @staticmethod
    def beside(record_path: Optional[str]) -> Optional[str]:
        """Where the listing of the root whose record is at `record_path` is kept."""
        if not record_path:
            return None
        base = record_path[:-5] if record_path.endswith(".json") else record_path
        return base + ".listing"

    def load(self) -> None:
        """Read the kept listing once; none (generation "") when it is missing or in doubt."""
        if self.entries is not None:
            return
        self.entries = {}
        if not self.path:
            return
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except OSError:
            return
        header, sep, payload = data.partition(b"\n")
        fields = header.split(b" ")
        if not sep or len(fields) != 6 or fields[:3] != [_MAGIC, _FORMAT, _PYTHON]:
            return
        try:
            if hashlib.sha256(payload).hexdigest().encode("ascii") != fields[5]:
                return
            listed = marshal.loads(payload)
            count = int(fields[4])
            generation = fields[3].decode("ascii")
        except (ValueError, EOFError, TypeError, UnicodeError):
            return
        if (type(listed) is not dict or len(listed) != count or not generation
                or len(generation) > m.MAX_GENERATION):
            return
        for path, entry in listed.items():
            if type(entry) is not list or len(entry) != 8 or entry[0] != path:
                return
        self.entries = listed
        self.generation = generation

    def keep(self, entries: Dict[str, Entry], same: bool = False) -> str:
        """Keep `entries` as the listing; its generation ("" when it could not be kept).
        `same`: the caller found them equal to the kept listing already."""
        if self.entries is not None and self.generation and (same or entries == self.entries):
            return self.generation
        if not self.path:
            return ""
        generation = os.urandom(8).hex()
        payload = marshal.dumps(entries)
        header = b" ".join((_MAGIC, _FORMAT, _PYTHON, generation.encode("ascii"),
                            str(len(entries)).encode("ascii"),
                            hashlib.sha256(payload).hexdigest().encode("ascii")))
        temp = "{}.tmp-{}".format(self.path, os.getpid())
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:  # (paths and digests: for our eyes only)
                handle.write(header + b"\n" + payload)
            os.replace(temp, self.path)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
            return ""
        self.entries = entries
        self.generation = generation
        return generation


def send_manifest(seq: int, walk: Generator[Entry, None, None], send: Send,
                  flush: Callable[[], None],
                  kept: Optional[KeptListing] = None, since: str = "") -> None:
    """Stream `walk` as ManifestBatch messages (closing it in the end, even when sending
    fails). With `kept` (a whole-tree listing): only what changed since the kept listing
    when its generation is `since`, and the listing is kept for the next time."""
    flush()  # what is answered already (the Welcome) does not wait for the walk
    base = ""
    old = None  # type: Optional[Dict[str, Entry]]
    listed = None  # type: Optional[Dict[str, Entry]]
    if kept is not None:
        kept.load()
        listed = {}
        if since and since == kept.generation:
            base, old = since, kept.entries
    batch = []  # type: List[Entry]
    sent = 0
    try:
        for entry in walk:
            if listed is not None:
                listed[entry[0]] = entry
                if old is not None and old.get(entry[0]) == entry:
                    continue
            batch.append(entry)
            sent += 1
            if len(batch) >= MANIFEST_BATCH:
                send(_packed(m.ManifestBatch(seq, batch, False, [], base, "")))
                flush()
                batch = []
    finally:
        walk.close()  # its directory descriptors
    removed = []  # type: List[str]
    if old is not None and listed is not None:
        removed = [path for path in old if path not in listed]
        while len(removed) > MANIFEST_BATCH:
            send(_packed(m.ManifestBatch(seq, [], False, removed[:MANIFEST_BATCH], base, "")))
            flush()
            removed = removed[MANIFEST_BATCH:]
    same = bool(base) and not sent and not removed  # (a delta with nothing in it)
    generation = kept.keep(listed, same) if kept is not None and listed is not None else ""
    send(_packed(m.ManifestBatch(seq, batch, True, removed, base, generation)))


def _packed(batch: m.ManifestBatch) -> m.Packed:
    return m.packed(batch, payload=fastpack.manifest_batch(batch))
