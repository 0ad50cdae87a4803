"""What the client believes the remote tree holds: the `RemoteModel`.

The client is the only writer of the paths it syncs, so after the initial manifest it
knows the remote's state without asking: every operation it sends updates the model at once
(operations run in order on one channel), and an error reply marks the path as unknown so
the next change sends it whole. Entries carry `owned`: lsync put or verified them there, so
it may delete them when they vanish locally; entries found only on the remote are not owned
and are never deleted unless the user asked for --delete. A child index makes "everything
below this directory" cheap, and a digest index finds content the remote already holds
(moves and copies then cost no content on the wire).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lsync.client.remote.delta import Signature
from lsync.protocol.paths import parent_of

FILE = "f"
DIR = "d"
LINK = "l"


@dataclass(slots=True)
class RemoteEntry:
    kind: str
    mode: int
    digest: bytes | None = None  # content digest of a file, None when unknown
    target: str | None = None  # symlink target
    owned: bool = False
    size: int = 0
    # Block signature of the remote's version, the base of the next delta; None: send whole.
    signature: Signature | None = None
    # What the agent recorded lsync wrote there (manifest): a file's digest, a link's target,
    # b"" for a directory; None when lsync did not make it (or the agent does not know).
    written: bytes | None = None


class RemoteModel:
    def __init__(self) -> None:
        self.entries: dict[str, RemoteEntry] = {}
        self.children: dict[str, set[str]] = {"": set()}
        # digest -> the file holding it, or the set of files when several do (most files
        # are unique: a set each would cost ~200 bytes per file of the tree).
        self.by_digest: dict[bytes, str | set[str]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, path: str) -> RemoteEntry | None:
        return self.entries.get(path)

    def put(self, path: str, entry: RemoteEntry) -> None:
        old = self.entries.get(path)
        if old is not None and old.kind == DIR and entry.kind != DIR:
            self.drop_tree(path)
        elif old is not None:
            self._unindex(path, old)
        self.entries[path] = entry
        if entry.kind == FILE and entry.digest is not None:
            self._index(path, entry.digest)
        parent = parent_of(path)
        siblings = self.children.get(parent)
        if siblings is None:
            siblings = self.children[parent] = set()
        siblings.add(path)
        if entry.kind == DIR:
            self.children.setdefault(path, set())

    def _index(self, path: str, digest: bytes) -> None:
        holders = self.by_digest.get(digest)
        if holders is None or holders == path:
            self.by_digest[digest] = path
        elif isinstance(holders, str):
            self.by_digest[digest] = {holders, path}
        else:
            holders.add(path)

    def _unindex(self, path: str, entry: RemoteEntry) -> None:
        if entry.digest is not None:
            holders = self.by_digest.get(entry.digest)
            if holders == path:
                del self.by_digest[entry.digest]
            elif isinstance(holders, set):
                holders.discard(path)
                if len(holders) == 1:
                    self.by_digest[entry.digest] = next(iter(holders))

    def set_digest(self, path: str, digest: bytes | None) -> None:
        """Change what the model believes a file's content is (None: unknown)."""
        entry = self.entries.get(path)
        if entry is None:
            return
        self._unindex(path, entry)
        entry.digest = digest
        if digest is None:
            entry.signature = None
        elif entry.kind == FILE:
            self._index(path, digest)

    def holder_of(self, digest: bytes) -> str | None:
        """Some remote file that holds content `digest`, if the model knows one."""
        holders = self.by_digest.get(digest)
        if holders is None or isinstance(holders, str):
            return holders
        return next(iter(holders)) if holders else None

    def move_tree(self, src: str, dst: str) -> None:
        """The remote renamed `src` (and everything below) to `dst`."""
        moved = [(p, self.entries[p]) for p in [*self.descendants(src), src]]
        for path, _ in moved:
            self.drop(path)
        for path, entry in reversed(moved):  # parents first
            self.put(dst + path[len(src):], entry)

    def drop(self, path: str) -> None:
        """Forget one entry (its descendants must already be gone)."""
        entry = self.entries.pop(path, None)
        if entry is None:
            return
        self._unindex(path, entry)
        siblings = self.children.get(parent_of(path))
        if siblings is not None:
            siblings.discard(path)
        self.children.pop(path, None)

    def drop_tree(self, path: str) -> None:
        for below in list(self.descendants(path)):
            self.drop(below)
        self.drop(path)

    def descendants(self, path: str) -> Iterator[str]:
        """Every path below `path`, deepest first (a directory after its contents)."""
        for child in sorted(self.children.get(path, ())):
            yield from self.descendants(child)
            yield child

    def child_names(self, path: str) -> set[str]:
        return set(self.children.get(path, ()))

    def owned_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.owned)

    def file_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.kind == FILE)

    # -- signatures kept between sessions (lsync.client.remote.sigstore) --------------------------
    def adopt_signatures(self, stored: dict[str, tuple[bytes, Signature]]) -> int:
        """Take the stored signatures of remote files that lsync owns and that still hold
        the version they were made for; returns how many were taken."""
        taken = 0
        for path, (digest, sig) in stored.items():
            entry = self.entries.get(path)
            if (entry is not None and entry.kind == FILE and entry.owned
                    and entry.signature is None and entry.digest == digest
                    and entry.size == sig.size):
                entry.signature = sig
                taken += 1
        return taken

    def signatures_to_keep(self, min_size: int) -> list[tuple[str, bytes, Signature]]:
        """(path, digest, signature) of the files at least `min_size` big with a known
        signature: worth keeping for the next session."""
        return [(path, entry.digest, entry.signature)
                for path, entry in self.entries.items()
                if entry.kind == FILE and entry.digest is not None
                and entry.signature is not None and entry.size >= min_size]
