"""What the client believes the remote tree holds: the `RemoteModel`.

The client is the only writer of the paths it syncs, so after the initial manifest it
knows the remote's state without asking: every operation it sends updates the model at once
(operations run in order on one channel), and an error reply marks the path as unknown so
the next change sends it whole. Entries carry `owned`: lsync put or verified them there, so
it may delete them when they vanish locally; entries found only on the remote are not owned
and are never deleted unless the user asked for --delete. A child index makes "everything
below this directory" cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


class RemoteModel:
    def __init__(self) -> None:
        self.entries: dict[str, RemoteEntry] = {}
        self.children: dict[str, set[str]] = {"": set()}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, path: str) -> RemoteEntry | None:
        return self.entries.get(path)

    def put(self, path: str, entry: RemoteEntry) -> None:
        old = self.entries.get(path)
        if old is not None and old.kind == DIR and entry.kind != DIR:
            self.drop_tree(path)
        self.entries[path] = entry
        parent = parent_of(path)
        self.children.setdefault(parent, set()).add(path)
        if entry.kind == DIR:
            self.children.setdefault(path, set())

    def drop(self, path: str) -> None:
        """Forget one entry (its descendants must already be gone)."""
        if self.entries.pop(path, None) is None:
            return
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
