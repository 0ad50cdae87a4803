"""IgnoreRules in a git work tree: tracked files are never ignored (lsync.client.local.ignore with
lsync.client.local.gitindex), the paths a new index changes, the rule behind a verdict, and the
note when the rules ignore most of a tree (lsync.client.local.ignored).

The differential test compares the verdicts with `git ls-files --cached --others
--exclude-standard` on random trees where random ignored files were added with `git add -f`.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules, Rule
from lsync.client.local.ignored import IgnoredTally, follow_index
from lsync.client.local.scanner import scan_tree
from lsync.protocol import hashing
from tests.test_gitindex import git
from tests.test_ignore import _kept_by_us, _random_tree, make_tree

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")

# Like the kernel: a root pattern `tags` that matches a directory of tracked files, dotfiles
# every .gitignore hides, and build outputs next to the sources.
KERNEL_LIKE = {
    ".gitignore": "*.o\n.*\n!.gitignore\ntags\n/out/\n",
    ".clang-format": "style\n",
    ".mailmap": "who\n",
    "Makefile": "all:\n",
    "kernel/sched.c": "int s;\n",
    "kernel/sched.o": "obj\n",
    "tools/arm64/tags/Makefile": "tags:\n",
    "tools/arm64/tags/tags_test.c": "int t;\n",
    "tools/arm64/tags/tags_test.o": "obj\n",
    "tools/arm64/tags/scratch.txt": "mine\n",
    "tools/arm64/tags/deeper/untracked.c": "int u;\n",
    "lib/.kunitconfig": "CONFIG_KUNIT=y\n",
    "out/vmlinux": "elf\n",
}
TRACKED_IGNORED = [".clang-format", ".mailmap", "tools/arm64/tags/Makefile",
                   "tools/arm64/tags/tags_test.c", "lib/.kunitconfig"]


def kernel_like(root: Path) -> Path:
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    make_tree(root, KERNEL_LIKE)
    git(root, "add", "-A")  # what the rules allow: .gitignore, Makefile, kernel/sched.c
    git(root, "add", "-f", *TRACKED_IGNORED)
    git(root, "commit", "-q", "-m", "kernel-like")
    return root


def test_tracked_files_matching_rules_are_not_ignored_and_untracked_siblings_are(
        tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    r = IgnoreRules(root)
    for rel in TRACKED_IGNORED:
        assert not r.is_ignored(rel, False), rel
    # Directories holding tracked files are entered, at any depth.
    assert not r.is_ignored("tools/arm64/tags", True)
    # Untracked paths still follow the rules, in and below such a directory too.
    assert r.is_ignored("kernel/sched.o", False)
    assert r.is_ignored("tools/arm64/tags/tags_test.o", False)
    assert r.is_ignored("tools/arm64/tags/scratch.txt", False)  # below `tags`, untracked
    assert r.is_ignored("tools/arm64/tags/deeper", True)
    assert r.is_ignored("tools/arm64/tags/deeper/untracked.c", False)
    assert r.is_ignored("out", True) and r.is_ignored(".git", True)
    # Without the index (git_index=False), the plain rules, as before.
    plain = IgnoreRules(root, git_index=False)
    assert all(plain.is_ignored(rel, False) for rel in TRACKED_IGNORED)
    assert plain.is_ignored("tools/arm64/tags", True)


def test_exclude_still_ignores_tracked_files(tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    r = IgnoreRules(root, ["/tools/", ".mailmap", "kernel/*.c"])
    assert r.is_ignored("tools/arm64/tags", True)
    assert r.is_ignored("tools/arm64/tags/Makefile", False)
    assert r.is_ignored(".mailmap", False)
    assert r.is_ignored("kernel/sched.c", False)
    assert not r.is_ignored(".clang-format", False)


def test_scan_lists_tracked_files_the_rules_match(tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    r = IgnoreRules(root)
    tally = IgnoredTally(root, r)
    local = scan_tree(root, r, HashCache(hashing.BLAKE2B_128), on_ignored=tally.add)
    files = {rel for rel, entry in local.items() if entry.kind == "file"}
    assert files == {".gitignore", "Makefile", "kernel/sched.c", *TRACKED_IGNORED}
    # What the scan skipped: the two .o files, scratch.txt, deeper/ and out/ (not .git).
    assert tally.entries == 5
    assert tally.mostly_ignored_note(len(files)) is None


def test_scan_keeps_the_path_strings_of_git_index(tmp_path: Path) -> None:
    # One string per path of the tree (issue 16: memory): a tracked file's path in the scan
    # is the very string the rules keep from git's index.
    root = kernel_like(tmp_path / "k")
    r = IgnoreRules(root)
    local = scan_tree(root, r, HashCache(hashing.BLAKE2B_128))
    tracked = [rel for rel in local if rel in r.tracked.files]
    assert "kernel/sched.c" in tracked and len(tracked) >= 3
    assert all(rel is r.tracked.names[rel] for rel in tracked)
    assert r.own("not/tracked.c") == "not/tracked.c"


def test_verdicts_match_git_with_tracked_ignored_files_on_random_trees(
        tmp_path: Path) -> None:
    for seed in range(30):
        root = tmp_path / f"t{seed}"
        root.mkdir()
        git(root, "init", "-q")
        rng = random.Random(seed)
        _random_tree(root, rng)
        everything = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                            if p.is_file() and ".git" not in p.parts)
        chosen = rng.sample(everything, min(len(everything), rng.randint(1, 6)))
        git(root, "add", "-f", "--", *chosen)
        expected = {p for p in git(root, "-c", "core.excludesFile=" + os.devnull, "ls-files",
                                   "-z", "--cached", "--others", "--exclude-standard")
                    .split("\0") if p}
        ours = _kept_by_us(root, IgnoreRules(root))
        assert ours == expected, (seed, chosen, sorted(ours - expected),
                                  sorted(expected - ours))


def test_refresh_index_reports_tracked_ignored_paths_a_checkout_adds_and_removes(
        tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    git(root, "tag", "one")
    make_tree(root, {"tools/x86/tags/run.sh": "#!/bin/sh\n", "kernel/new.c": "int n;\n",
                     "docs/.kunitconfig": "k\n"})
    git(root, "add", "kernel/new.c")
    git(root, "add", "-f", "tools/x86/tags/run.sh", "docs/.kunitconfig")
    git(root, "rm", "-q", "lib/.kunitconfig")
    git(root, "commit", "-q", "-m", "two")
    git(root, "checkout", "-q", "one")
    r = IgnoreRules(root)
    assert r.is_ignored("docs/.kunitconfig", False)  # (untracked in `one`)
    assert not r.refresh_index()  # unchanged index: nothing to say
    git(root, "checkout", "-q", "main")
    change = r.refresh_index()
    # Tracked now and matched by rules: the files and the ignored directory holding one;
    # kernel/new.c is not reported (the rules never ignored it); the removed one is.
    assert change.paths == {"tools/x86/tags", "tools/x86/tags/run.sh", "docs/.kunitconfig",
                            "lib/.kunitconfig"}
    assert change.dirs == {"tools/x86/tags"}
    assert not r.is_ignored("tools/x86/tags/run.sh", False)
    assert not r.refresh_index()
    git(root, "checkout", "-q", "one")
    back = r.refresh_index()
    # The directory no longer holding tracked files is walked again by the watcher but
    # not looked at (that would forget its remote copy before run.sh is deleted there).
    assert back.paths == change.paths - {"tools/x86/tags"}
    assert back.dirs == change.dirs
    assert r.is_ignored("tools/x86/tags", True)


def test_unreadable_index_falls_back_to_the_rules_with_one_note(tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    notes: list[str] = []
    r = IgnoreRules(root, on_note=notes.append)
    assert not notes and not r.is_ignored(".mailmap", False)
    index = root / ".git" / "index"
    good = index.read_bytes()
    index.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    change = r.refresh_index()
    assert r.is_ignored(".mailmap", False) and ".mailmap" in change.paths
    assert len(notes) == 1 and "checksum mismatch" in notes[0]
    os.utime(index, ns=(1, 1))  # another unreadable version: no second note
    r.refresh_index()
    assert len(notes) == 1
    index.write_bytes(good)
    assert ".mailmap" in r.refresh_index().paths
    assert not r.is_ignored(".mailmap", False) and r.index_problem is None


def test_repository_made_after_the_rules_and_a_tree_without_git(tmp_path: Path) -> None:
    root = tmp_path / "later"
    make_tree(root, {".gitignore": "*.log\n", "keep.log": "k\n"})
    r = IgnoreRules(root)
    assert r.is_ignored("keep.log", False) and not r.refresh_index()
    git(root, "init", "-q")
    git(root, "add", "-f", "keep.log")
    assert r.refresh_index().paths == {"keep.log"}
    assert not r.is_ignored("keep.log", False)


def test_explain_names_file_line_and_pattern(tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    make_tree(root, {"kernel/.gitignore": "# objects\n\n*.tmp\n", "kernel/x.tmp": "t"})
    r = IgnoreRules(root, ["*.bak"])
    assert r.explain("kernel/x.tmp", False) == Rule("kernel/.gitignore", 3, "*.tmp")
    assert str(r.explain("kernel/x.tmp", False)) == 'kernel/.gitignore:3 "*.tmp"'
    assert r.explain("out/vmlinux", False) == Rule(".gitignore", 5, "/out/")
    assert r.explain("tools/arm64/tags/deeper/untracked.c", False) == Rule(".gitignore", 4,
                                                                          "tags")
    assert r.explain("kernel/a.bak", False) == Rule("--exclude", 1, "*.bak")
    assert str(r.explain(".git", True)) == ".git"
    assert r.explain(".mailmap", False) is None  # tracked
    assert r.explain("kernel/sched.c", False) is None


def test_mostly_ignored_note_names_the_rule(tmp_path: Path) -> None:
    """Debian's kernel source: `/*` and `!/debian/` at the end of the top .gitignore."""
    root = tmp_path / "deb"
    files = {f"{top}/f{i}.c": "x" for top in ("kernel", "mm", "fs/ext4") for i in range(20)}
    make_tree(root, {**files, "README": "r", ".gitignore": "*.o\n/*\n!/debian/\n"})
    r = IgnoreRules(root)
    tally = IgnoredTally(root, r)
    local = scan_tree(root, r, HashCache(hashing.BLAKE2B_128), on_ignored=tally.add)
    assert local == {} and tally.entries == 5  # kernel, mm, fs, README, .gitignore itself
    note = tally.mostly_ignored_note(0)
    assert note == '62 of 62 files ignored (.gitignore:2 "/*")'


def test_no_note_for_an_ignored_build_directory_however_big(tmp_path: Path) -> None:
    root = tmp_path / "js"
    make_tree(root, {".gitignore": "node_modules/\n*.log\n", "src/a.js": "a", "src/b.js": "b",
                     "x.log": "l", **{f"node_modules/p{i}/i.js": "m" for i in range(50)}})
    r = IgnoreRules(root)
    tally = IgnoredTally(root, r)
    local = scan_tree(root, r, HashCache(hashing.BLAKE2B_128), on_ignored=tally.add)
    kept = sum(1 for e in local.values() if e.kind == "file")
    assert kept == 3 and tally.entries == 2
    assert tally.mostly_ignored_note(kept) is None


def test_note_lists_several_rules_with_counts(tmp_path: Path) -> None:
    root = tmp_path / "many"
    make_tree(root, {".gitignore": "*.o\n*.d\nbuild/\n", "a.c": "a",
                     **{f"x{i}.o": "o" for i in range(6)}, **{f"x{i}.d": "d" for i in range(3)},
                     **{f"build/b{i}": "b" for i in range(2)}})
    r = IgnoreRules(root)
    tally = IgnoredTally(root, r)
    scan_tree(root, r, HashCache(hashing.BLAKE2B_128), on_ignored=tally.add)
    assert tally.mostly_ignored_note(2) == ('11 of 13 files ignored (.gitignore:1 "*.o": 6, '
                                            '.gitignore:2 "*.d": 3, .gitignore:3 "build/": 2)')


def test_index_seen_until_waits_while_a_new_index_is_not_applied(tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    r = IgnoreRules(root)
    before = time.time_ns()
    assert r.index_seen_until() >= before and not r.index_changed()
    git(root, "add", "-f", "kernel/sched.o")
    after_add = time.time_ns()
    assert r.index_changed()
    assert r.index_seen_until() < after_add
    change = r.refresh_index()
    assert change.paths == {"kernel/sched.o"}
    assert r.index_seen_until() < after_add  # read, but the caller has not acted yet
    r.index_applied(change)
    assert r.index_seen_until() >= after_add and not r.index_changed()


def test_follow_index_hands_changes_over_and_notes_an_unreadable_index(
        tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "k")
    r = IgnoreRules(root)
    changes: list[frozenset[str]] = []
    notes: list[str] = []

    async def scenario() -> None:
        follower = asyncio.create_task(follow_index(
            r, lambda change: changes.append(change.paths), notes.append, interval=0.01))
        try:
            await asyncio.to_thread(git, root, "add", "-f", "kernel/sched.o")
            await _until(lambda: any(changes))
            # A new index that changes no verdict is handed over too (with no paths): an
            # in-sync report held back while it was read may then be given.
            seen = len(changes)
            (root / "Makefile").write_text("all:\n")
            await asyncio.to_thread(git, root, "add", "Makefile")
            await _until(lambda: len(changes) > seen)
            assert changes[-1] == frozenset()
            index = root / ".git" / "index"
            index.write_bytes(index.read_bytes()[:-3])
            await _until(lambda: bool(notes))
        finally:
            follower.cancel()

    asyncio.run(scenario())
    assert next(c for c in changes if c) == {"kernel/sched.o"}
    assert len(notes) == 1 and "unreadable" in notes[0]
    assert r.is_ignored(".mailmap", False)  # the plain rules, meanwhile


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
