"""End to end over a real sshd: files git tracks reach the remote whatever `.gitignore` says
(issue 16, item 4), and lsync says so when its rules ignore most of a tree.

The repository is shaped like the Linux kernel's cases: dotfiles that `.*` ignores but git
tracks (`.clang-format`, `.mailmap`, `lib/.kunitconfig`), and a directory of tracked files
that the root pattern `tags` matches (`tools/arm64/tags/`), next to untracked build outputs
(`*.o`), untracked files inside that directory, and an ignored `out/`. The real `lsync
connect` syncs it; right after ` ready ` and after each `in-sync as-of=N` (N after the
step) the remote must hold exactly the tracked files and the untracked files the rules
allow — no waiting, no retry. The steps: a checkout that changes a tracked-but-ignored file,
adds one in a new ignored directory and removes one; `git add -f` of a build output (only
git's index changes: no event in the work tree); and the checkout back.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LSYNC, LsyncProcess, assert_same_now
from tests.gitrepo import GitRepo

Start = Callable[..., LsyncProcess]
READY_WAIT = 60.0
IN_SYNC_WAIT = 20.0

GITIGNORE = "*.o\n.*\n!.gitignore\ntags\n/out/\n"
TRACKED = {
    ".gitignore": GITIGNORE,
    ".clang-format": "BasedOnStyle: LLVM\n",
    ".mailmap": "A <a@example.org>\n",
    "Makefile": "all:\n",
    "kernel/sched.c": "int sched;\n",
    "lib/.kunitconfig": "CONFIG_KUNIT=y\n",
    "tools/arm64/tags/Makefile": "tags_test:\n",
    "tools/arm64/tags/tags_test.c": "int main(void) { return 0; }\n",
    "tools/arm64/tags/run_tags_test.sh": "#!/bin/sh\n./tags_test\n",
}
UNTRACKED_IGNORED = {
    "kernel/sched.o": "obj",
    "tools/arm64/tags/tags_test.o": "obj",
    "tools/arm64/tags/scratch.txt": "notes",
    "tools/arm64/tags/deeper/untracked.c": "int u;\n",
    "out/vmlinux": "elf",
}
# What stays local: untracked ignored paths (a directory stands for what is below it).
STAYS_LOCAL = {".git", "kernel/sched.o", "tools/arm64/tags/tags_test.o",
               "tools/arm64/tags/scratch.txt", "tools/arm64/tags/deeper", "out",
               "tools/x86/tags/run.o"}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def below_any(paths: set[str]) -> Callable[[str], bool]:
    """Whether a relative path is one of `paths` or below one of them."""
    def test(rel: str) -> bool:
        parts = rel.split("/")
        return any("/".join(parts[:i]) in paths for i in range(1, len(parts) + 1))
    return test


def kernel_like_repo(path: Path) -> GitRepo:
    """Tag v1: TRACKED. Tag v2: .clang-format changed, tools/x86/tags/run.sh added (a new
    directory the rules ignore), lib/.kunitconfig removed. HEAD: v1, with UNTRACKED_IGNORED
    made (as a build would)."""
    path.mkdir(parents=True)
    repo = GitRepo(path)
    repo.git("init", "-q", "-b", "main")
    write(path, TRACKED)
    repo.git("add", "-A")
    repo.git("add", "-f", *TRACKED)
    repo.git("commit", "-q", "-m", "v1")
    repo.git("tag", "v1")
    write(path, {".clang-format": "BasedOnStyle: Linux\nIndentWidth: 8\n",
                 "tools/x86/tags/run.sh": "#!/bin/sh\necho x86\n"})
    repo.git("add", "-f", ".clang-format", "tools/x86/tags/run.sh")
    repo.git("rm", "-q", "lib/.kunitconfig")
    repo.git("commit", "-q", "-m", "v2")
    repo.git("tag", "v2")
    repo.git("checkout", "-q", "v1")
    write(path, UNTRACKED_IGNORED)
    return repo


def test_tracked_files_the_rules_match_reach_the_remote_and_follow_checkouts(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    repo = kernel_like_repo(local)
    lsync = run_lsync("connect", "-F", str(sshd.client_config), f"{sshd.alias}:{remote}",
                      cwd=local)
    local_only = set(STAYS_LOCAL)
    stays_local = below_any(local_only)
    lsync.wait_for_line(" ready ", timeout=READY_WAIT)
    assert_same_now(local, remote, stays_local, lsync)
    for rel in TRACKED:
        assert (remote / rel).read_text() == TRACKED[rel], rel
    assert not (remote / "kernel/sched.o").exists()
    assert not (remote / "tools/arm64/tags/scratch.txt").exists()
    assert not (remote / "out").exists()

    def step(*args: str) -> None:
        repo.git(*args)
        lsync.wait_in_sync(time.time_ns(), IN_SYNC_WAIT)
        assert_same_now(local, remote, stays_local, lsync)

    step("checkout", "-q", "v2")
    assert (remote / ".clang-format").read_text().startswith("BasedOnStyle: Linux")
    assert (remote / "tools/x86/tags/run.sh").exists()
    assert not (remote / "lib/.kunitconfig").exists()
    # An untracked build output in the new directory stays local.
    write(local, {"tools/x86/tags/run.o": "obj"})
    lsync.wait_in_sync(time.time_ns(), IN_SYNC_WAIT)
    assert_same_now(local, remote, stays_local, lsync)
    assert not (remote / "tools/x86/tags/run.o").exists()

    # Only the index changes: the forced add is seen through git's index alone.
    local_only.discard("kernel/sched.o")
    step("add", "-f", "kernel/sched.o")
    assert (remote / "kernel/sched.o").read_text() == "obj"
    local_only.add("kernel/sched.o")  # untracked again: the remote copy is left alone
    repo.git("rm", "-q", "--cached", "kernel/sched.o")

    step("checkout", "-q", "v1")
    assert (remote / ".clang-format").read_text() == TRACKED[".clang-format"]
    assert (remote / "lib/.kunitconfig").read_text() == TRACKED["lib/.kunitconfig"]
    assert not (remote / "tools/x86/tags/run.sh").exists()
    assert lsync.interrupt() == 0, lsync.stderr


def test_a_tree_whose_rules_ignore_most_of_it_gets_a_note(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    """Debian's kernel source appends `/*` and `!/debian/` to the top .gitignore."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    files = {f"{top}/f{i}.c": "int x;\n" for top in ("kernel", "mm", "fs/ext4")
             for i in range(20)}
    write(local, {**files, "README": "r\n", ".gitignore": "*.o\n/*\n!/debian/\n"})
    lsync = run_lsync("connect", "-F", str(sshd.client_config), f"{sshd.alias}:{remote}",
                      cwd=local)
    lsync.wait_for_line(" ready ", timeout=READY_WAIT)
    assert lsync.saw(' note 62 of 62 files ignored (.gitignore:2 "/*")'), lsync.log_tail()
    assert lsync.count("files ignored") == 1
    status = subprocess.run([*LSYNC, "status", "--json"], cwd=local, capture_output=True,
                            text=True, timeout=60, check=True)
    # .gitignore, README, kernel, mm, fs: what the scan left alone (not what is below
    # the directories).
    assert json.loads(status.stdout)["ignored"] == 5, status.stdout
    assert lsync.interrupt() == 0, lsync.stderr
