"""A generated git repository with real history, for end-to-end tests on real trees.

`make_repo(path)` builds, with the `git` command and content drawn from a seeded
`random.Random` (the same seed gives the same trees), a repository of a few hundred files in
nested directories — C sources, headers, Makefiles, text, test scripts — and 33 commits on
`main` that edit, add and delete files, rename files and directories (`lib/crypto` ->
`crypto`, `drivers/usb` -> `drivers/usb-core`, `gui/lib` -> `gui/library`), add and remove
directories, turn a file into a directory, and carry:

- `subprojects/gui -> ../gui`, a symlink to an in-tree directory (as git's
  `subprojects/git-gui -> ../git-gui`), present from the first commit, whose target changes
  in most commits;
- `scripts/dtc/include-prefixes/arm -> ../../../arch/arm/dts` (as in the Linux kernel),
  added after `v1`;
- `include/config.h -> linux/autoconf.h`, a symlink to a file, retargeted after `v2`;
- executable scripts (`scripts/*.sh`, `t/t*.sh`), one of which loses its executable bit;
- a `.gitignore` that ignores build outputs (`*.o`, `.depend/`, `/build/`) and a top-level
  `Makefile` whose `make` compiles every C source next to itself (`x.o`), writes its
  dependency file to `.depend/x.o.d` in the source's directory and a list of objects to
  `build/objects.txt`: all of them ignored.

Tags `v1` (commit 7), `v2` (commit 16) and `v3` (commit 33, the head of `main`) mark distant
versions; branch `topic` holds three commits on top of `v2` that touch only `feature/`, so
`git rebase main` on it applies without conflicts. `is_build_output` tells which relative
paths the `.gitignore` ignores (and `.git/`), for comparing a local tree with a remote one on
which `make` has run.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GITIGNORE = "# build outputs\n*.o\n.depend/\n/build/\n"

MAKEFILE = """\
# Every C source is compiled next to itself; its dependency file goes to .depend/ in the
# source's directory; build/objects.txt lists the objects. All of it is ignored by git.
SRCS := $(shell find . -path ./.git -prune -o -path ./build -prune -o -name '*.c' -print)
OBJS := $(SRCS:.c=.o)
CFLAGS := -O0 -w

all: build/objects.txt

build/objects.txt: $(OBJS)
\t@mkdir -p build && printf '%s\\n' $(OBJS) >$@

%.o: %.c
\t@mkdir -p $(dir $@).depend
\t@$(CC) $(CFLAGS) -MMD -MF $(dir $@).depend/$(notdir $@).d -c $< -o $@

.PHONY: all
"""

# (directory, number of .c files, number of .h files, other files: (suffix, count))
LAYOUT: list[tuple[str, int, int, tuple[tuple[str, int], ...]]] = [
    ("core", 8, 3, (("Makefile", 1),)),
    ("core/sched", 4, 1, ()),
    ("drivers/net", 6, 2, (("Makefile", 1),)),
    ("drivers/net/phy", 4, 1, ()),
    ("drivers/usb", 5, 2, (("Makefile", 1),)),
    ("lib", 5, 2, (("Makefile", 1),)),
    ("lib/crypto", 4, 1, ()),
    ("include/linux", 0, 40, ()),
    ("include/uapi", 0, 16, ()),
    ("fs/ext4", 5, 2, (("Makefile", 1),)),
    ("mm", 4, 1, (("Makefile", 1),)),
    ("gui", 5, 2, (("Makefile", 1), (".tcl", 4))),
    ("gui/lib", 0, 0, ((".tcl", 8),)),
    ("arch/arm/dts", 0, 0, ((".dts", 24), (".dtsi", 8))),
    ("arch/arm/kernel", 4, 1, ()),
    ("arch/x86/kernel", 4, 1, ()),
    ("scripts", 0, 0, ((".sh", 5),)),
    ("scripts/dtc", 3, 1, ()),
    ("tools/old", 3, 0, ((".txt", 3),)),
    ("docs", 0, 0, ((".txt", 30),)),
    ("docs/old-api", 0, 0, ((".txt", 6),)),
    ("t", 0, 0, ((".sh", 30),)),
]

# Files that scheduled commits rename, retarget or change: never deleted by everyday ones.
PROTECTED = {"core/sched.c", "drivers/net/phy/marvell.c", "docs/howto.txt", "docs/file1.txt",
             "scripts/file0.sh"}

WORDS = ["the", "driver", "queue", "lock", "buffer", "device", "page", "table", "entry",
         "state", "count", "flags", "timer", "event", "list", "node", "write", "read",
         "block", "frame", "packet", "cache", "map", "range", "error"]


def is_build_output(rel: str) -> bool:
    """Whether a relative path (POSIX style) is ignored by the generated `.gitignore`, or is
    `.git` or inside it: what a remote tree may hold that the local one need not."""
    parts = rel.split("/")
    return (".git" in parts or ".depend" in parts or parts[0] == "build"
            or parts[-1].endswith(".o"))


def _identifier(rel: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in rel.removesuffix(".c"))


class _Content:
    """Deterministic text of each kind of file, and one-line edits of it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.counter = 0

    def _fresh(self) -> int:
        self.counter += 1
        return self.counter

    def words(self, low: int, high: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(low, high)))

    def line(self, rel: str) -> str:
        """One new line that fits the file (a C function, a #define, a sentence...)."""
        n, a, b = self._fresh(), self.rng.randint(2, 99), self.rng.randint(0, 9999)
        if rel.endswith(".c"):
            return f"int {_identifier(rel)}_f{n}(int x) {{ return x * {a} + {b}; }}"
        if rel.endswith((".h", ".dtsi")):
            return f"#define {self.words(1, 2).upper().replace(' ', '_')}_{n} {b}"
        if rel.endswith(".dts"):
            return f"\tnode{n}@{b:x} {{ reg = <0x{b:x} {a}>; status = \"okay\"; }};"
        if rel.endswith(".sh"):
            return f"echo \"{self.words(2, 6)} {n}\""
        if rel.endswith(".tcl"):
            return f"proc {self.words(1, 1)}_{n} {{}} {{ return {b} }}"
        if rel.endswith("Makefile"):
            return f"obj-y += {self.words(1, 1)}{n}.o"
        return f"{self.words(4, 14).capitalize()} ({n})."

    def text(self, rel: str) -> str:
        lines = [self.line(rel) for _ in range(self.rng.randint(12, 50))]
        if rel.endswith(".c"):
            head = [f"/* {rel}: {self.words(3, 8)} */"]
        elif rel.endswith(".h"):
            guard = _identifier(rel).upper() + "_H"
            return "\n".join([f"#ifndef {guard}", f"#define {guard}", *lines, "#endif"]) + "\n"
        elif rel.endswith(".sh"):
            head = ["#!/bin/sh", f"# {rel}"]
        else:
            head = []
        return "\n".join(head + lines) + "\n"

    def edit(self, text: str, rel: str) -> str:
        """Replace one body line and maybe append one: a small edit, still valid C."""
        lines = text.splitlines()
        body = [i for i, line in enumerate(lines)
                if not line.startswith(("#!", "/*", "#ifndef", "#endif", "# "))
                and not (rel.endswith(".h") and i == 1)]
        if body:
            lines[self.rng.choice(body)] = self.line(rel)
        if self.rng.random() < 0.5:
            index = len(lines) - 1 if rel.endswith(".h") else len(lines)
            lines.insert(index, self.line(rel))
        return "\n".join(lines) + "\n"


@dataclass
class GitRepo:
    """A generated repository; its working tree is `path` (with `.git/` inside)."""

    path: Path

    def git(self, *args: str) -> str:
        """Run git in the repository (no user or system config); return its stdout."""
        done = subprocess.run(
            ["git", "-c", "advice.detachedHead=false", "-c", "gc.auto=0", *args],
            cwd=self.path, env=_git_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done.stdout

    def checkout(self, rev: str) -> None:
        self.git("checkout", "-q", rev)

    def tracked(self) -> list[str]:
        """Paths of the files and links at HEAD (relative, POSIX style)."""
        return self.git("ls-files").splitlines()

    def changed_paths(self, a: str, b: str) -> list[str]:
        """Paths that differ between two revisions (renames listed as delete + add)."""
        return self.git("diff", "--name-only", "--no-renames", a, b).splitlines()


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "lsync tests", "GIT_AUTHOR_EMAIL": "tests@lsync.invalid",
        "GIT_COMMITTER_NAME": "lsync tests", "GIT_COMMITTER_EMAIL": "tests@lsync.invalid",
        "GIT_AUTHOR_DATE": "2024-01-01T12:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T12:00:00Z",
        "LC_ALL": "C",
    })
    return env


class _Builder:
    def __init__(self, repo: GitRepo, rng: random.Random) -> None:
        self.repo = repo
        self.root = repo.path
        self.rng = rng
        self.content = _Content(rng)
        self.commits = 0

    def write(self, rel: str, text: str | None = None, executable: bool = False) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.content.text(rel) if text is None else text)
        if executable or rel.endswith(".sh"):
            path.chmod(0o755)

    def write_many(self, prefix: str, suffix: str, count: int) -> None:
        for i in range(count):
            self.write(f"{prefix}{i}{suffix}")

    def link(self, rel: str, target: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.symlink_to(target)

    def files(self, under: str = "") -> list[str]:
        """Regular tracked-to-be files (no links) below `under`, sorted."""
        top = self.root / under
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for name in filenames:
                full = Path(dirpath) / name
                if not full.is_symlink():
                    found.append(full.relative_to(self.root).as_posix())
        return sorted(rel for rel in found if rel not in (".gitignore", "Makefile"))

    def edit(self, rel: str) -> None:
        path = self.root / rel
        path.write_text(self.content.edit(path.read_text(), rel))

    def edit_some(self, count: int, under: str = "") -> None:
        candidates = [rel for rel in self.files(under) if not rel.startswith("feature/")]
        for rel in self.rng.sample(candidates, min(count, len(candidates))):
            self.edit(rel)

    def add_some(self, count: int) -> None:
        """New files, each of a kind its directory already holds (C sources only where
        there are C sources: directories of scripts or text never get build outputs)."""
        kinds: dict[str, list[str]] = {}
        for rel in self.files():
            directory, _, name = rel.rpartition("/")
            if directory and "." in name:
                kinds.setdefault(directory, []).append(name[name.rindex("."):])
        for _ in range(count):
            directory = self.rng.choice(sorted(kinds))
            suffix = self.rng.choice(kinds[directory])
            self.write(f"{directory}/new{self.content._fresh()}{suffix}")

    def delete_some(self, count: int) -> None:
        candidates = [rel for rel in self.files()
                      if rel.startswith(("core/", "drivers/", "lib/", "docs/", "t/"))
                      and rel not in PROTECTED]
        for rel in self.rng.sample(candidates, count):
            (self.root / rel).unlink()

    def commit(self, message: str) -> None:
        self.commits += 1
        self.repo.git("add", "-A")
        self.repo.git("commit", "-q", "--allow-empty", "-m", f"{self.commits}: {message}")

    def everyday(self) -> None:
        """What most commits do: edits all over, often in gui/ and arch/arm/dts/ (the
        targets of the in-tree directory links), some new and some deleted files."""
        self.edit_some(self.rng.randint(6, 14))
        self.edit_some(self.rng.randint(1, 3), "gui")
        if self.rng.random() < 0.6:
            self.edit_some(self.rng.randint(1, 3), "arch/arm/dts")
        if self.rng.random() < 0.5:
            self.add_some(self.rng.randint(1, 4))
        if self.rng.random() < 0.3:
            self.delete_some(1)


def make_repo(path: Path, seed: int = 8) -> GitRepo:
    """Create the repository in `path` (which must not exist or be empty); HEAD is `main`
    (tag `v3`). Takes about a second."""
    path.mkdir(parents=True, exist_ok=True)
    repo = GitRepo(path)
    repo.git("init", "-q", "-b", "main")
    b = _Builder(repo, random.Random(seed))

    # 1: the initial tree.
    b.write(".gitignore", GITIGNORE)
    b.write("Makefile", MAKEFILE)
    b.write("README")
    for directory, sources, headers, others in LAYOUT:
        for i in range(sources):
            b.write(f"{directory}/{directory.rsplit('/', 1)[-1]}{i}.c")
        for i in range(headers):
            b.write(f"{directory}/{directory.rsplit('/', 1)[-1]}{i}.h")
        for suffix, count in others:
            if suffix == "Makefile":
                b.write(f"{directory}/Makefile")
                continue
            for i in range(count):
                stem = "t" + f"{i:04d}-test" if directory == "t" else f"file{i}"
                b.write(f"{directory}/{stem}{suffix}")
    b.write("core/sched.c")
    b.write("drivers/net/phy/marvell.c")
    b.write("include/linux/autoconf.h")
    b.write("include/linux/kconfig.h")
    b.write("docs/howto.txt")
    b.link("subprojects/gui", "../gui")
    b.link("include/config.h", "linux/autoconf.h")
    b.commit("initial tree")

    scheduled: dict[int, tuple[str, Callable[[], object]]] = {
        3: ("rename core/sched.c", lambda: repo.git("mv", "core/sched.c", "core/scheduler.c")),
        5: ("add drivers/gpu", lambda: b.write_many("drivers/gpu/gpu", ".c", 5)),
        6: ("add scripts/checkpatch.sh", lambda: b.write("scripts/checkpatch.sh")),
        9: ("move lib/crypto to crypto", lambda: repo.git("mv", "lib/crypto", "crypto")),
        11: ("dtc include prefixes", lambda: b.link("scripts/dtc/include-prefixes/arm",
                                                   "../../../arch/arm/dts")),
        12: ("add net/ipv4", lambda: b.write_many("net/ipv4/ipv4_", ".c", 5)),
        13: ("remove tools/old", lambda: repo.git("rm", "-r", "-q", "tools/old")),
        14: ("move marvell.c to drivers/phy", lambda: _move_file(
            b, "drivers/net/phy/marvell.c", "drivers/phy/marvell.c")),
        18: ("rename drivers/usb", lambda: repo.git("mv", "drivers/usb", "drivers/usb-core")),
        20: ("add net/ipv6", lambda: b.write_many("net/ipv6/ipv6_", ".c", 5)),
        22: ("remove docs/old-api", lambda: repo.git("rm", "-r", "-q", "docs/old-api")),
        24: ("config.h points to kconfig.h", lambda: b.link("include/config.h",
                                                           "linux/kconfig.h")),
        26: ("rename gui/lib", lambda: repo.git("mv", "gui/lib", "gui/library")),
        28: ("executable bits", lambda: _flip_executables(b)),
        30: ("docs/howto becomes a directory", lambda: _file_to_directory(b, "docs/howto")),
    }
    for number in range(2, 34):
        message = "everyday changes"
        if number in scheduled:
            message, action = scheduled[number]
            action()
        b.everyday()
        b.commit(message)
        if number == 7:
            repo.git("tag", "v1")
        if number == 16:
            repo.git("tag", "v2")
            _topic_branch(b)
    repo.git("tag", "v3")
    return repo


def _move_file(b: _Builder, src: str, dst: str) -> None:
    (b.root / dst).parent.mkdir(parents=True, exist_ok=True)
    b.repo.git("mv", src, dst)


def _flip_executables(b: _Builder) -> None:
    (b.root / "scripts/file0.sh").chmod(0o644)
    (b.root / "docs/file1.txt").chmod(0o755)


def _file_to_directory(b: _Builder, rel: str) -> None:
    (b.root / f"{rel}.txt").unlink()
    for i in range(3):
        b.write(f"{rel}/part{i}.txt")


def _topic_branch(b: _Builder) -> None:
    """Branch `topic` at the current commit: three commits that touch only feature/."""
    numbered = b.commits  # the topic's commits are not counted among main's
    b.repo.git("checkout", "-q", "-b", "topic")
    for i in range(4):
        b.write(f"feature/feature{i}.c")
    b.commit("topic: add feature/")
    for rel in b.files("feature"):
        b.edit(rel)
    b.write("feature/sub/helper.c")
    b.commit("topic: feature/sub")
    b.edit("feature/feature0.c")
    b.commit("topic: fix feature0")
    b.repo.git("checkout", "-q", "main")
    b.commits = numbered
