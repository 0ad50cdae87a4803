"""Pure decisions of the client core: what the remote holds, and which paths differ.

`load_manifest` turns the agent's manifest into the `RemoteModel`, deciding ownership from
what the agent recorded lsync wrote (a file is lsync's while it still holds the content lsync
wrote; a directory or link lsync made is lsync's), and lists the files whose remote digest
must be asked for. `differences` compares local entries (a scan of the tree or of part of
it) with the model: it is the initial comparison and every later convergence check, and it
names each path whose local and remote sides differ — including owned remote paths that
are gone locally, but never a path that is ignored locally or that lsync did not make
(unless the user asked for --delete). `plan_path` and `plan_content` decide what one pass
over one path must do, and `moved_from` recognises a directory moved as delete + add. No
I/O: the callers look, scan and ask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lsync.client.local.localentry import LocalEntry, shared_mode
from lsync.client.remote.model import DIR, FILE, LINK, RemoteEntry, RemoteModel

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
    for entry in entries:
        _load_entry(model, need_hash, entry, local, is_ignored)
    return model, need_hash


def load_changes(model: RemoteModel, need_hash: list[str], entries: Iterable[list[Any]],
                 removed: Iterable[str], local: Mapping[str, LocalEntry],
                 is_ignored: IsIgnored) -> bool:
    """Bring a model that `load_manifest` made from one manifest (with its `need_hash`) to
    what it makes from that manifest with these entries new or changed and the `removed`
    paths gone (a restart's delta, lsync.client.remote.remotelisting), in place. False when this
    delta cannot be applied so (an entry now left out that kept a directory's children
    in): then load the whole manifest instead."""
    entries = list(entries)
    gone = set(removed)
    touched = gone.union(entry[0] for entry in entries)
    for path in sorted(gone, key=lambda p: p.count("/"), reverse=True):
        model.drop(path)  # (deepest first: what was below a path gone is gone too)
    added: list[str] = []
    for entry in entries:
        old = model.get(entry[0])
        if not _load_entry(model, added, entry, local, is_ignored) and old is not None:
            if old.kind == DIR and model.children.get(entry[0]):
                return False
            model.drop(entry[0])
    need_hash[:] = [path for path in need_hash if path not in touched] + added
    return True


def _load_entry(model: RemoteModel, need_hash: list[str], entry: list[Any],
                local: Mapping[str, LocalEntry], is_ignored: IsIgnored) -> bool:
    """Put one manifest entry in the model (False: it is left out, ignored here)."""
    path, kind, size, _mtime, mode, digest, target, written = entry
    mine = local.get(path)
    same_kind = mine is not None and _KIND[mine.kind] == kind
    # The scan already judged local paths: a path of the same kind is not ignored. What
    # lsync wrote is kept in the model even when ignored now (it stays on the remote).
    if not same_kind and written is None and is_ignored(path, kind == DIR):
        return False
    remote = RemoteEntry(kind, shared_mode(mode), digest, target, owned=False, size=size,
                         written=written)
    model.put(path, remote)
    settle_ownership(remote)
    if kind == FILE and digest is None and (
            written is not None or (same_kind and mine is not None and mine.size == size)):
        need_hash.append(path)
    return True


def relearn(model: RemoteModel, under: str, entries: Iterable[list[Any]],
            is_ignored: IsIgnored) -> list[tuple[str, RemoteEntry | None]]:
    """Replace what the model says of `under` and below with the agent's listing of it (an
    operation there was refused: what is there is not known any more). Ownership comes from
    what the agent recorded lsync wrote, and stays where the model had an entry of the same
    kind and content as lsync's (a file it verified equal, say). Returns the files whose
    digest must be asked for, each with the model's entry before: give each answer to
    `relearned_digest`."""
    before = {path: model.get(path) for path in [under, *model.descendants(under)]}
    model.drop_tree(under)
    need_hash: list[tuple[str, RemoteEntry | None]] = []
    for path, kind, size, _mtime, mode, digest, target, written in entries:
        old = before.get(path)
        if written is None and old is None and is_ignored(path, kind == DIR):
            continue
        entry = RemoteEntry(kind, mode, digest, target, owned=False, size=size,
                            written=written)
        model.put(path, entry)
        if kind == FILE and digest is None:
            need_hash.append((path, old))
        else:
            _settle_relearned(entry, old)
    return need_hash


def relearned_digest(model: RemoteModel, path: str, digest: bytes | None,
                     old: RemoteEntry | None) -> None:
    """The agent's digest of a file `relearn` listed without one."""
    entry = model.get(path)
    if entry is None or entry.kind != FILE:
        return
    model.set_digest(path, digest)
    _settle_relearned(entry, old)


def _settle_relearned(entry: RemoteEntry, old: RemoteEntry | None) -> None:
    settle_ownership(entry)
    if old is None or old.kind != entry.kind:
        return
    if entry.kind == FILE:
        if old.digest is not None and old.digest == entry.digest:
            entry.signature = old.signature
        # (A refused write left the model's digest unknown: what is there is still the
        # version lsync had, as far as lsync can know.)
        entry.owned = entry.owned or (old.owned and old.digest in (None, entry.digest))
    elif entry.owned:
        return
    elif entry.kind == LINK:
        entry.owned = old.owned and old.target == entry.target
    else:
        entry.owned = old.owned


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


# -- one path: what a pass must do -------------------------------------------------------------


class Step(Enum):
    NOTHING = "nothing"  # the remote already matches (or there is nothing to match)
    FORGET = "forget"  # ignored locally now: forget the remote side, leave it there
    WAIT = "wait"  # gone, but the watcher has undelivered events: look again shortly
    DEFER = "defer"  # gone: delete after the paths queued behind it (one may be its move)
    REMOVE = "remove"  # gone: delete what lsync owns at and below it
    DIR = "dir"  # make it a directory (see Plan), then compare its children
    LINK = "link"  # make it a symlink to Plan.target
    READ = "read"  # a file that may differ: read it, then `plan_content`


@dataclass(frozen=True, slots=True)
class Seen:
    """What a pass saw at a local path (lstat, never through a symlink)."""

    kind: str | None  # FILE, DIR, LINK; None: gone (or below a symlink); "" another type
    mode: int = 0
    target: str | None = None  # a link's target
    ignored: bool = False  # it exists and the ignore rules exclude it
    cached_digest: bytes | None = None  # a file's digest from the hash cache, if trusted


@dataclass(frozen=True, slots=True)
class Plan:
    step: Step
    remove_first: bool = False  # the remote holds another kind there: remove that first
    may_be_moved: bool = False  # DIR, new remotely: it may be a directory moved here
    target: str | None = None  # LINK


def plan_path(seen: Seen, remote: RemoteEntry | None, *, watcher_behind: bool,
              others_queued: bool, deferred: bool) -> Plan:
    """What one pass over a path must do, from what it saw and what the remote holds.
    `watcher_behind`: the watcher has events it has not delivered; `others_queued`: other
    paths wait in the queue; `deferred`: this path was put behind them once already."""
    if seen.ignored:
        return Plan(Step.FORGET if remote is not None else Step.NOTHING)
    if seen.kind is None:
        if remote is None:
            return Plan(Step.NOTHING)
        if watcher_behind:
            return Plan(Step.WAIT)  # an emptied or unmounted root is seen whole first
        if others_queued and not deferred:
            return Plan(Step.DEFER)
        return Plan(Step.REMOVE)
    other_kind = remote is not None and remote.kind != seen.kind
    if seen.kind == DIR:
        return Plan(Step.DIR, remove_first=other_kind, may_be_moved=remote is None or other_kind)
    if seen.kind == LINK:
        if remote is not None and remote.kind == LINK and remote.target == seen.target:
            return Plan(Step.NOTHING)
        return Plan(Step.LINK, remove_first=remote is not None and remote.kind == DIR,
                    target=seen.target)
    if seen.kind == FILE:
        if (remote is not None and remote.kind == FILE and remote.owned
                and remote.mode == seen.mode and seen.cached_digest is not None
                and seen.cached_digest == remote.digest):
            return Plan(Step.NOTHING)
        return Plan(Step.READ)
    return Plan(Step.NOTHING)  # sockets, FIFOs, devices are not synced


def needs_mkdir(remote: RemoteEntry | None, mode: int) -> bool:
    """A directory must be made (or given `mode`, or claimed) remotely."""
    return remote is None or remote.kind != DIR or remote.mode != mode or not remote.owned


class Content(Enum):
    SAME = "same"  # the remote file already holds it (and its mode)
    SET_MODE = "set-mode"  # same content, other mode
    COPY = "copy"  # another remote file holds it: copy that (no content on the wire)
    SEND = "send"  # send it: a delta against the remote version when there is a base


@dataclass(frozen=True, slots=True)
class ContentPlan:
    action: Content
    remove_first: bool = False  # a directory is there remotely: remove what lsync owns
    source: str = ""  # COPY: the remote file to copy


def plan_content(path: str, digest: bytes, mode: int, model: RemoteModel) -> ContentPlan:
    """What to do with a local file's content, now that it is read and hashed."""
    remote = model.get(path)
    if remote is not None and remote.kind == FILE and remote.digest == digest:
        return ContentPlan(Content.SAME if remote.mode == mode else Content.SET_MODE)
    remove_first = remote is not None and remote.kind == DIR
    holder = model.holder_of(digest)
    if holder is not None and holder != path:
        return ContentPlan(Content.COPY, remove_first, holder)
    return ContentPlan(Content.SEND, remove_first)


def moved_from(here: Mapping[str, bytes | None], candidates: Iterable[str],
               model: RemoteModel, share: float) -> str | None:
    """Which of `candidates` (directories gone locally, still in the model) moved to where
    the files `here` are (relative path within the new directory → digest): the first one
    that holds at least `share` of the larger of the two sets, at the same relative paths
    with the same content."""
    if not here:
        return None
    for candidate in candidates:
        files = [(p, e) for p in model.descendants(candidate)
                 if (e := model.get(p)) is not None and e.kind == FILE]
        if not files:
            continue
        cut = len(candidate) + 1
        same_files = sum(1 for p, e in files
                         if e.digest is not None and here.get(p[cut:]) == e.digest)
        if same_files >= share * max(len(files), len(here)):
            return candidate
    return None
