"""Pure decisions of the client core: what the remote holds, and which paths differ.

`load_manifest` turns the agent's manifest into the `RemoteModel`, deciding ownership from
what the agent recorded lsync wrote (a file is lsync's while it still holds the content lsync
wrote; a directory or link lsync made is lsync's), and lists the files whose remote digest
must be asked for. `differences` compares local entries (a scan of the tree or of part of
it) with the model: it is the initial comparison and every later convergence check, and it
names each path whose local and remote sides differ — including owned remote paths that
are gone locally, but never a path that is ignored locally or that lsync did not make
(unless the user asked for --delete). No I/O: the callers scan and ask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lsync.client.model import DIR, FILE, LINK, RemoteEntry, RemoteModel
from lsync.client.scanner import LocalEntry

IsIgnored = Callable[[str, bool], bool]

_KIND = {"file": FILE, "dir": DIR, "link": LINK}


def kind_of(entry: LocalEntry) -> str:
    return _KIND[entry.kind]


def load_manifest(entries: Iterable[list[Any]], local: Mapping[str, LocalEntry],
                  is_ignored: IsIgnored) -> tuple[RemoteModel, list[str]]:
    """The model of the remote tree, and the remote files whose digest must be asked: the
    agent does not know it, and either the local file has the same size (it may be equal)
    or lsync wrote it (it may still be lsync's)."""
    model = RemoteModel()
    need_hash: list[str] = []
    for path, kind, size, _mtime, mode, digest, target, *more in entries:
        written = more[0] if more else None
        mine = local.get(path)
        same_kind = mine is not None and kind_of(mine) == kind
        # The scan already judged local paths: a path of the same kind is not ignored. What
        # lsync wrote is kept in the model even when ignored now (it stays on the remote).
        if not same_kind and written is None and is_ignored(path, kind == DIR):
            continue
        entry = RemoteEntry(kind, mode, digest, target, owned=False, size=size,
                            written=written)
        model.put(path, entry)
        settle_ownership(entry)
        if kind == FILE and digest is None and (
                written is not None or (same_kind and mine is not None and mine.size == size)):
            need_hash.append(path)
    return model, need_hash


def settle_ownership(entry: RemoteEntry) -> None:
    """Mark `entry` owned if it is what lsync made there (see the module docstring)."""
    if entry.written is None:
        return
    if entry.kind == DIR:
        entry.owned = True
    elif entry.kind == LINK:
        entry.owned = entry.target is not None and entry.written == entry.target.encode(
            "utf-8", "surrogateescape")
    elif entry.digest is not None:
        entry.owned = entry.written == entry.digest


def same(local: LocalEntry, remote: RemoteEntry | None) -> bool:
    """Whether the remote entry already is the local one (content, target, mode)."""
    if remote is None or remote.kind != kind_of(local):
        return False
    if local.kind == "dir":
        return remote.mode == local.mode
    if local.kind == "link":
        return remote.target == local.target
    return (local.digest is not None and remote.digest == local.digest
            and remote.mode == local.mode)


def differences(local: Mapping[str, LocalEntry], model: RemoteModel, is_ignored: IsIgnored,
                delete_extra: bool, under: str | None = None,
                shallow: bool = False) -> list[str]:
    """Paths where the remote differs from `local`, sorted. `local` holds every entry below
    `under` ("" or None: the whole tree) — only its direct children when `shallow`; remote
    entries outside that scope are not compared. Entries found equal become owned: lsync
    verified them."""
    out: set[str] = set()
    for path, entry in local.items():
        remote = model.get(path)
        if same(entry, remote):
            assert remote is not None
            remote.owned = True
        else:
            out.add(path)
    for path in _remote_scope(model, under, shallow):
        if path in local:
            continue
        remote = model.get(path)
        if remote is None:
            continue
        if (remote.owned or delete_extra) and not is_ignored(path, remote.kind == DIR):
            out.add(path)
    return sorted(out)


def _remote_scope(model: RemoteModel, under: str | None, shallow: bool) -> Iterable[str]:
    if not under:
        return list(model.child_names("")) if shallow else list(model.entries)
    if shallow:
        return list(model.child_names(under))
    return list(model.descendants(under))
