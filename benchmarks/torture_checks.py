"""What the torture test checks, and its tally.

`TreeComparer.differences(local, remote)` compares the local tree with the remote one once,
now: every path by kind, mode, content (files, by xxh3-128 digests cached per inode, size,
mtime and ctime, so that a comparison after a few edits reads only those files) and link
target. What lsync may leave different is taken out, and nothing else:

- paths the local tree's `.gitignore` rules ignore (asked of `git check-ignore --no-index`,
  the reference for gitignore semantics), except lsync's own temporary files
  (`.lsync-tmp-*`), which must not remain once lsync says it is in sync;
- what the harness planted on the remote (`Planted`: build outputs, a remote-only file) and
  the directories holding them; lsync did not write those and must keep them.

`Planted.lost(remote)` names the planted files whose content no longer exists on the remote
under their name (a directory rename carries them along, a kept directory
`PATH.lsync-kept-N` too; so they are looked for by name and content anywhere).

`Tally` counts steps, faults by kind and checks by kind, keeps each violation with its
round, step and seed, and prints the table.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

LSYNC_TEMP = ".lsync-tmp-"
SHOWN = 12  # differing paths named in one violation


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir" or "link"
    mode: int
    size: int = 0
    target: str = ""
    key: tuple[int, ...] = ()  # (dev, ino, size, mtime_ns, ctime_ns) of a file


def walk(root: Path, skip_top: frozenset[str] = frozenset()) -> dict[str, Entry]:
    """Every entry below `root` (not following links); `skip_top` names left out at the top."""
    found: dict[str, Entry] = {}
    stack = [("", str(root))]
    while stack:
        rel_dir, full_dir = stack.pop()
        try:
            names = os.listdir(full_dir)
        except FileNotFoundError:
            continue
        for name in names:
            if not rel_dir and name in skip_top:
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = f"{full_dir}/{name}"
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = Entry("link", 0, target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = Entry("dir", mode)
                stack.append((rel, full))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = Entry("file", mode, st.st_size,
                                   key=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                        st.st_ctime_ns))
            else:
                found[rel] = Entry("other", mode)
    return found


class Digests:
    """File digests cached by (dev, inode, size, mtime, ctime); thread-safe."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, ...], bytes] = {}
        self._lock = threading.Lock()

    def of(self, path: Path, entry: Entry) -> bytes | None:
        with self._lock:
            known = self._cache.get(entry.key)
        if known is not None:
            return known
        hasher = xxhash.xxh3_128()
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
        except OSError:
            return None
        value = hasher.digest()
        with self._lock:
            if len(self._cache) > 2_000_000:
                self._cache.clear()
            self._cache[entry.key] = value
        return value


def describe(entry: Entry | None) -> str:
    if entry is None:
        return "absent"
    if entry.kind == "file":
        return f"file {entry.size} B mode {entry.mode:o}"
    if entry.kind == "link":
        return f"link -> {entry.target}"
    return f"{entry.kind} mode {entry.mode:o}"


def ignored(local: Path, rels: list[str], dirs: set[str]) -> set[str]:
    """Which of `rels` the local tree's .gitignore rules ignore (git's own semantics)."""
    if not rels:
        return set()
    text = "".join(f"{rel}/\n" if rel in dirs else f"{rel}\n" for rel in rels)
    done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=local,
                          input=text, capture_output=True, text=True, check=False)
    return {line.rstrip("/") for line in done.stdout.splitlines() if line}


def _under_ignored(rel: str, ignored_set: set[str]) -> bool:
    parts = rel.split("/")
    return any("/".join(parts[:i]) in ignored_set for i in range(1, len(parts) + 1))


class Planted:
    """Files the harness put on the remote itself (lsync did not write them): name ->
    content digest. Their names are unique (`torture_planted_N.o`, `REMOTE-ONLY-N.txt`)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # basename -> digest of its content

    def plant(self, remote: Path, rel: str, data: bytes) -> None:
        path = remote / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[path.name] = xxhash.xxh3_128(data).digest()

    def is_planted(self, path: Path, entry: Entry, digests: Digests) -> bool:
        want = self.files.get(path.name)
        return want is not None and entry.kind == "file" and digests.of(path, entry) == want

    def lost(self, remote: Path, entries: dict[str, Entry], digests: Digests) -> list[str]:
        seen: set[str] = set()
        for rel, entry in entries.items():
            name = rel.rpartition("/")[2]
            if name in self.files and self.is_planted(remote / rel, entry, digests):
                seen.add(name)
        return sorted(set(self.files) - seen)


class TreeComparer:
    """One comparison of the local tree with the remote, now (see the module's doc)."""

    def __init__(self, planted: Planted) -> None:
        self.planted = planted
        self.digests = Digests()

    def differences(self, local: Path, remote: Path) -> list[str]:
        want = walk(local, frozenset({".git"}))
        have = walk(remote)
        differing: list[str] = []
        for rel in set(want) | set(have):
            a, b = want.get(rel), have.get(rel)
            if a is not None and b is not None and a.kind == b.kind == "file":
                if a.mode != b.mode or a.size != b.size or (
                        self.digests.of(local / rel, a) != self.digests.of(remote / rel, b)):
                    differing.append(rel)
            elif a != b:
                differing.append(rel)
        if not differing:
            return []
        dirs = {rel for rel in differing
                if (want.get(rel) or have.get(rel) or Entry("file", 0)).kind == "dir"}
        ignored_set = ignored(local, [rel for rel in differing if LSYNC_TEMP not in rel],
                              dirs)
        kept_dirs: set[str] = set()
        for rel, entry in have.items():
            if rel not in want and self.planted.is_planted(remote / rel, entry, self.digests):
                parts = rel.split("/")
                kept_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        out: list[str] = []
        for rel in sorted(differing):
            a, b = want.get(rel), have.get(rel)
            if LSYNC_TEMP not in rel and _under_ignored(rel, ignored_set):
                continue
            if a is None and b is not None and (
                    rel in kept_dirs or self.planted.is_planted(remote / rel, b, self.digests)):
                continue
            if a is not None and b is not None and a.kind == "dir" and rel in kept_dirs:
                continue  # a kept directory (build outputs inside) may differ in mode
            out.append(f"{rel}: local {describe(a)}, remote {describe(b)}")
        return out

    def lost(self, remote: Path) -> list[str]:
        return self.planted.lost(remote, walk(remote), self.digests)


@dataclass
class Violation:
    kind: str
    round_no: int
    step: int
    detail: str


@dataclass
class Tally:
    """Counts and violations of one run; `table()` renders them."""

    seed: int
    steps: int = 0
    rounds: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    round_no: int = 0

    def check(self, kind: str, ok: bool, detail: str = "") -> bool:
        """Count one check of invariant `kind`; record a violation when it failed."""
        detail = " | ".join(line for line in detail.splitlines() if line.strip())
        with self.lock:
            self.checks[kind] += 1
            if not ok:
                self.violations.append(Violation(kind, self.round_no, self.steps, detail))
                print(f"  VIOLATION {kind} (round {self.round_no}, step {self.steps}, seed "
                      f"{self.seed}): {detail[:2000]}", flush=True)
        return ok

    def fault(self, kind: str) -> None:
        with self.lock:
            self.faults[kind] += 1

    def step(self) -> int:
        with self.lock:
            self.steps += 1
            return self.steps

    def table(self) -> str:
        failed = Counter(v.kind for v in self.violations)
        lines = [f"seed {self.seed}: {self.rounds} rounds, {self.steps} steps",
                 "", "| fault | injected |", "|---|---:|"]
        lines += [f"| {kind} | {count} |" for kind, count in sorted(self.faults.items())]
        lines += ["", "| invariant | checks | violations |", "|---|---:|---:|"]
        lines += [f"| {kind} | {count} | {failed.get(kind, 0)} |"
                  for kind, count in sorted(self.checks.items())]
        lines += ["", f"violations: {len(self.violations)}"]
        for v in self.violations:
            detail = v.detail if len(v.detail) <= 1500 else v.detail[:1500] + " ..."
            lines.append(f"- {v.kind} (round {v.round_no}, step {v.step}, seed {self.seed}): "
                         f"{detail}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def shown(items: list[str]) -> str:
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more
