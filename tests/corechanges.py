"""The local changes and steps the core property tests generate (hypothesis strategies).

A change (`Write`, `Edit`, `Chmod`, `Delete`, `MakeDir`, `RemoveDir`, `MoveDir`, `Retype`,
`MakeLink`) picks its place by index among the entries of the local tree as it is then,
applies itself, and returns the paths an inotify watcher would report (none are reported
if it is `lost`). The other steps act on the rig: a build output written on the remote,
event-loop turns, a wait for quiet, an overflow signal, a link cut, a restart with changes
made while stopped. `STEPS` generates sequences of them; `START` is the tree examples start
from. Used by tests/test_core_properties.py and tests/test_fleet_properties.py.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from lsync.client.local.ignore import IgnoreRules
from tests.corerig import _view

NAMES = ("a", "b", "f.c", "g.h")
MAX_DEPTH = 3


def content(version: int) -> bytes:
    """Few distinct contents, so that files often share one (copies on the remote)."""
    return f"/* version {version} */\n".encode() * (1 + version % 4)


def _entries(root: Path) -> dict[str, str]:
    """Local entries the changes may pick, by kind ("" is the root directory)."""
    found = {"": "dir"}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(top, name)
            rel = full.relative_to(root).as_posix()
            if rel == ".gitignore":
                continue
            found[rel] = ("link" if full.is_symlink() else "dir" if full.is_dir() else "file")
    return dict(sorted(found.items()))


def _pick(items: list[str], index: int) -> str | None:
    return items[index % len(items)] if items else None


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _depth(rel: str) -> int:
    return 0 if not rel else rel.count("/") + 1


def _remove(root: Path, rel: str) -> list[str]:
    """Remove what is at `rel` (a whole tree); returns the removed paths, deepest first, as
    inotify reports them."""
    path = root / rel
    gone: list[str] = []
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path, topdown=False):
            for name in files + dirs:
                gone.append(Path(top, name).relative_to(root).as_posix())
        shutil.rmtree(path)
    else:
        path.unlink()
    return [*gone, rel]


def _write(root: Path, rel: str, data: bytes, by_rename: bool) -> list[str]:
    path = root / rel
    if by_rename:  # how vim and many editors save
        temp = path.with_name(f".{path.name}.swp")
        temp.write_bytes(data)
        if path.exists():
            os.chmod(temp, stat.S_IMODE(path.stat().st_mode))
        os.rename(temp, path)
        return [rel, temp.relative_to(root).as_posix()]
    path.write_bytes(data)
    return [rel]


@dataclass(frozen=True)
class Write:
    """Create a file (or edit one) at directory `where` / `name`."""

    where: int
    name: str
    version: int
    by_rename: bool
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        parent = _pick([p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH],
                       self.where)
        assert parent is not None
        rel = _join(parent, self.name)
        if kinds.get(rel, "file") != "file":
            return []
        return _write(root, rel, content(self.version), self.by_rename)


@dataclass(frozen=True)
class Edit:
    which: int
    version: int
    by_rename: bool
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k == "file"], self.which)
        if rel is None:
            return []
        return _write(root, rel, content(self.version) + b"edited\n", self.by_rename)


@dataclass(frozen=True)
class Chmod:
    which: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k == "file"], self.which)
        if rel is None:
            return []
        path = root / rel
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) ^ 0o100)
        return [rel]


@dataclass(frozen=True)
class Delete:
    """Delete a file or a symlink."""

    which: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k in ("file", "link")],
                    self.which)
        return [] if rel is None else _remove(root, rel)


@dataclass(frozen=True)
class MakeDir:
    """Create a directory holding one file."""

    where: int
    name: str
    version: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        parent = _pick([p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH],
                       self.where)
        assert parent is not None
        rel = _join(parent, self.name)
        if rel in kinds:
            return []
        (root / rel).mkdir()
        return [rel, *_write(root, f"{rel}/f.c", content(self.version), False)]


@dataclass(frozen=True)
class RemoveDir:
    which: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k == "dir" and p], self.which)
        return [] if rel is None else _remove(root, rel)


@dataclass(frozen=True)
class MoveDir:
    """Rename a directory to `where` / `name` (another parent, or over another entry),
    and with `back`, afterwards back where it was."""

    which: int
    where: int
    name: str
    back: bool
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        src = _pick([p for p, k in kinds.items() if k == "dir" and p], self.which)
        if src is None:
            return []
        parents = [p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH
                   and p != src and not p.startswith(src + "/")]
        parent = _pick(parents, self.where)
        assert parent is not None
        dst = _join(parent, self.name)
        if dst == src or src.startswith(dst + "/"):
            return []
        reported: list[str] = []
        if dst in kinds:  # renamed over: what was there goes first (rm -rf; mv)
            reported += _remove(root, dst)
        os.rename(root / src, root / dst)
        reported = [dst, *reported, src]
        if self.back and (root / src).parent.is_dir():
            os.rename(root / dst, root / src)
            reported += [src, dst]
        return reported


@dataclass(frozen=True)
class Retype:
    """Replace an entry by one of another kind (file, directory or symlink)."""

    which: int
    to: str
    version: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        rel = _pick([p for p, k in kinds.items() if p and k != self.to], self.which)
        if rel is None:
            return []
        removed = _remove(root, rel)
        path = root / rel
        if self.to == "file":
            return [*_write(root, rel, content(self.version), False), *removed]
        if self.to == "dir":
            path.mkdir()
            return [rel, *_write(root, f"{rel}/f.c", content(self.version), False), *removed]
        os.symlink("f.c" if self.version % 2 else "..", path)
        return [rel, *removed]


@dataclass(frozen=True)
class MakeLink:
    """A symlink at `where` / `name` to an existing entry (`s/link -> ../a`)."""

    where: int
    name: str
    target: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        parent = _pick([p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH],
                       self.where)
        assert parent is not None
        rel = _join(parent, self.name)
        target = _pick([p for p, k in kinds.items() if k in ("dir", "file") and p != rel],
                       self.target)
        if rel in kinds or target is None:
            return []
        os.symlink(os.path.relpath(root / target if target else root, root / parent),
                   root / rel)
        return [rel]


Change = Write | Edit | Chmod | Delete | MakeDir | RemoveDir | MoveDir | Retype | MakeLink


@dataclass(frozen=True)
class BuildOutput:
    """A build on the remote writes an output into one of its directories."""

    where: int
    kind: str  # "obj": <dir>/oN.o; "build": <dir>/build/outN.bin


@dataclass(frozen=True)
class Turns:
    """Let the engine (and the agent) run this many event loop turns."""

    count: int


@dataclass(frozen=True)
class Quiet:
    """Wait until the engine is idle."""


@dataclass(frozen=True)
class Overflow:
    """The watcher reports lost events."""


@dataclass(frozen=True)
class Cut:
    """The link drops after the agent handled `after` more messages."""

    after: int


@dataclass(frozen=True)
class Restart:
    """lsync is stopped, the tree changes, lsync starts again."""

    changes: tuple[Change, ...]


Step = Change | BuildOutput | Turns | Quiet | Overflow | Cut | Restart

LOST = st.integers(0, 5).map(lambda n: n == 5)
INDEX = st.integers(0, 15)
NAME = st.sampled_from(NAMES)
VERSION = st.integers(0, 7)

CHANGES: st.SearchStrategy[Change] = st.one_of(
    st.builds(Write, INDEX, NAME, VERSION, st.booleans(), LOST),
    st.builds(Edit, INDEX, VERSION, st.booleans(), LOST),
    st.builds(Chmod, INDEX, LOST),
    st.builds(Delete, INDEX, LOST),
    st.builds(MakeDir, INDEX, NAME, VERSION, LOST),
    st.builds(RemoveDir, INDEX, LOST),
    st.builds(MoveDir, INDEX, INDEX, NAME, st.booleans(), LOST),
    st.builds(Retype, INDEX, st.sampled_from(["file", "dir", "link"]), VERSION, LOST),
    st.builds(MakeLink, INDEX, NAME, INDEX, LOST),
)
STEPS: st.SearchStrategy[list[Step]] = st.lists(st.one_of(
    CHANGES, CHANGES, CHANGES, CHANGES,
    st.builds(BuildOutput, INDEX, st.sampled_from(["obj", "build"])),
    st.builds(Turns, st.integers(1, 20)),
    st.just(Quiet()),
    st.just(Overflow()),
    st.builds(Cut, st.integers(0, 8)),
    st.builds(Restart, st.lists(CHANGES, max_size=4).map(tuple)),
), min_size=1, max_size=14)

# Where the examples start: a small tree with a symlink to an in-tree directory.
START = {"a/f.c": content(1), "a/d/g.h": content(2), "b/f.c": content(3), "g.h": content(4)}


def _make_start(root: Path) -> None:
    for rel, data in START.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "b" / "a").symlink_to("../a")


def _remote_dirs(root: Path) -> list[str]:
    rules = IgnoreRules(root)
    return ["", *sorted(rel for rel, entry in _view(root, rules).items() if entry[0] == "dir")]

