"""Unit tests of lsync.client.local.gitindex against index files written by the real `git`.

Each index is made by git itself (versions 2, 3 and 4, SHA-1 and SHA-256, conflicts,
intent-to-add, skip-worktree, gitlinks, a linked worktree's `.git` file); the reader must
list exactly what `git ls-files` lists. Damaged indexes must give IndexUnreadable and
nothing else, also when the damage keeps the checksum right.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lsync.client.local import gitindex
from lsync.client.local.gitindex import IndexUnreadable

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def git(root: Path, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
    """Run git in `root` without user or system config; return its stdout."""
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t.invalid", LC_ALL="C")
    done = subprocess.run(["git", *args], cwd=root, env=env, input=stdin,
                          capture_output=True, check=False)
    assert done.returncode == 0 or not check, (args, done.stdout, done.stderr)
    return done.stdout.decode("utf-8", "surrogateescape")


def ls_files(root: Path) -> set[str]:
    return {p for p in git(root, "ls-files", "-z").split("\0") if p}


def make_repo(root: Path, *init: str) -> Path:
    """A repository with nested files, a link, an executable and a non-ASCII name."""
    root.mkdir(parents=True)
    git(root, "init", "-q", *init)
    files = {"README": "r\n", "a/b/c.txt": "c\n", "a/b/d.c": "d\n", "a/e.h": "e\n",
             "sp ace/x": "x\n", "\u00e9t\u00e9/caf\u00e9.txt": "\u00e9\n", "z/.gitignore": "*\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("a/b")
    git(root, "add", "-A")
    git(root, "add", "-f", "z/.gitignore")
    git(root, "commit", "-q", "-m", "one")
    return root


def read(root: Path) -> gitindex.Tracked:
    location = gitindex.locate(root)
    assert location is not None
    return gitindex.read(location)


def version(root: Path) -> int:
    return int.from_bytes((root / ".git" / "index").read_bytes()[4:8], "big")


def test_version_2_index_lists_what_git_ls_files_lists(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    git(root, "update-index", "--index-version", "2")
    assert version(root) == 2
    tracked = read(root)
    assert tracked.files == ls_files(root)
    assert "\u00e9t\u00e9/caf\u00e9.txt" in tracked.files and "link" in tracked.files
    assert tracked.holds("a") and tracked.holds("a/b") and tracked.holds("z")
    assert not tracked.holds("a/b/c.txt") and not tracked.holds("b") and not tracked.holds("a/")


def test_version_3_with_intent_to_add_and_skip_worktree_entries(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    (root / "later.c").write_text("int later;\n")
    git(root, "add", "-N", "later.c")  # intent-to-add: an extended flag, so version 3
    git(root, "update-index", "--skip-worktree", "a/e.h")
    assert version(root) == 3
    tracked = read(root)
    assert "later.c" in tracked.files and "a/e.h" in tracked.files
    assert tracked.files == ls_files(root)


def test_version_4_prefix_compressed_names(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    for i in range(300):  # long shared prefixes, and one name shorter than the previous
        (root / "deep" / "er" / f"name{i:03d}.c").parent.mkdir(parents=True, exist_ok=True)
        (root / "deep" / "er" / f"name{i:03d}.c").write_text(str(i))
    git(root, "add", "-A")
    git(root, "update-index", "--index-version", "4")
    assert version(root) == 4
    assert read(root).files == ls_files(root)
    git(root, "update-index", "--index-version", "2")
    assert read(root).files == ls_files(root)


def test_names_of_4095_bytes_and_more_and_gitlinks(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    blob = git(root, "hash-object", "-w", "--stdin", stdin=b"long\n").strip()
    head = git(root, "rev-parse", "HEAD").strip()
    long_name = "/".join(["d" * 200] * 25) + "/f"  # 5,026 bytes: the length field says 4095
    git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{long_name}")
    git(root, "update-index", "--add", "--cacheinfo", f"160000,{head},vendor/sub")
    for index_version in ("2", "4"):
        git(root, "update-index", "--index-version", index_version)
        tracked = read(root)
        assert long_name in tracked.files
        assert "vendor/sub" not in tracked.files  # a gitlink is a directory
        assert tracked.holds("vendor/sub") and tracked.holds("vendor")
        assert tracked.files == ls_files(root) - {"vendor/sub"}


def test_conflicted_paths_are_tracked_once(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    git(root, "checkout", "-q", "-b", "side")
    (root / "a/e.h").write_text("side\n")
    git(root, "commit", "-q", "-am", "side")
    git(root, "checkout", "-q", "-")
    (root / "a/e.h").write_text("main\n")
    git(root, "commit", "-q", "-am", "main")
    git(root, "merge", "-q", "side", check=False)
    stages = [line.split("\t")[0][-1] for line in git(root, "ls-files", "-s", "a/e.h").split("\n")
              if line]
    assert stages == ["1", "2", "3"]
    tracked = read(root)
    assert "a/e.h" in tracked.files and tracked.files == ls_files(root)
    git(root, "update-index", "--index-version", "4")  # same names: empty suffixes
    assert version(root) == 4 and read(root).files == ls_files(root)


def test_sha256_repository(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", "--object-format=sha256")
    location = gitindex.locate(root)
    assert location is not None and location.hash_size == gitindex.SHA256_SIZE
    assert read(root).files == ls_files(root)


def test_linked_worktree_and_a_tree_below_the_work_trees_top(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    git(root, "worktree", "add", "-q", str(tmp_path / "wt"))
    (tmp_path / "wt" / "wt-only.c").write_text("w\n")
    git(tmp_path / "wt", "add", "wt-only.c")
    assert (tmp_path / "wt" / ".git").is_file()
    assert read(tmp_path / "wt").files == ls_files(tmp_path / "wt")
    assert "wt-only.c" not in read(root).files
    below = gitindex.locate(root / "a")
    assert below is not None and below.prefix == "a"
    assert gitindex.read(below).files == {"b/c.txt", "b/d.c", "e.h"}


def test_no_repository_and_a_repository_without_index(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert gitindex.locate(tmp_path / "plain") is None
    (tmp_path / "fresh").mkdir()
    git(tmp_path / "fresh", "init", "-q")
    location = gitindex.locate(tmp_path / "fresh")
    assert location is not None and gitindex.stamp(location) is None
    assert gitindex.read(location) is gitindex.EMPTY


def test_split_index_is_refused(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    git(root, "update-index", "--split-index")
    with pytest.raises(IndexUnreadable, match="split index"):
        read(root)


def test_damaged_indexes_give_index_unreadable(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    data = (root / ".git" / "index").read_bytes()
    gitindex.parse(data)  # sound as written
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    cases = {
        "checksum mismatch": bytes(flipped),
        "too short": data[:20],
        "no DIRC": b"XXXX" + data[4:],
        "version 7": data[:4] + (7).to_bytes(4, "big") + data[8:],
        "cannot fit": data[:8] + (10**6).to_bytes(4, "big") + data[12:],
        "truncated": data[:-40],
    }
    for why, damaged in cases.items():
        with pytest.raises(IndexUnreadable):
            gitindex.parse(damaged)
            pytest.fail(f"{why}: accepted")


def test_random_damage_with_a_right_checksum_never_raises_anything_else(
        tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    (root / "later.c").write_text("l\n")
    git(root, "add", "-N", "later.c")
    originals = [(root / ".git" / "index").read_bytes()]
    git(root, "update-index", "--index-version", "4")
    originals.append((root / ".git" / "index").read_bytes())
    rng = random.Random(16)
    refused = 0
    for i in range(3000):
        data = bytearray(originals[i % 2])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(12, len(data) - 20)  # (the header's own checks are above)
            data[at] = rng.randrange(256)
        if rng.random() < 0.2:
            del data[rng.randrange(12, len(data) - 20):][:rng.randint(1, 40)]
        body = bytes(data[:-20])
        damaged = body + hashlib.sha1(body).digest()
        try:
            gitindex.tracked_paths(damaged)
        except IndexUnreadable:
            refused += 1
    assert refused > 100  # (damage to names and lengths; timestamps and ids pass unseen)


def test_kernel_sized_index_reads_quickly(tmp_path: Path) -> None:
    """80,000 entries (the Linux kernel has 78,669), made by git update-index: read in
    well under a second even on a loaded test machine (about 60 ms when idle)."""
    root = tmp_path / "r"
    root.mkdir()
    git(root, "init", "-q")
    blob = git(root, "hash-object", "-w", "--stdin", stdin=b"x\n").strip()
    lines = [f"100644 {blob}\tdrivers/d{i // 400:03d}/sub{i // 40 % 10}/file{i:05d}.c"
             for i in range(80_000)]
    git(root, "update-index", "--index-info", stdin=("\n".join(lines) + "\n").encode())
    started = time.thread_time()
    tracked = read(root)
    spent = time.thread_time() - started
    assert len(tracked.files) == 80_000 and tracked.holds("drivers/d199/sub9")
    assert spent < 1.0, spent
