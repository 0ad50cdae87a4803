"""Real material for the torture test: two point releases of the Linux kernel as two
revisions of one git repository, prepared once and cached.

Debian ships the kernel source as `linux-source-6.1` (`usr/src/linux-source-6.1.tar.xz`
inside the .deb). `prepare(full=...)` downloads the two releases with `apt-get download`
into `~/.cache/lsync-bench/kernel/` (reused when present), unpacks each, drops the two lines
Debian appends to the top-level `.gitignore` (`/*` and `!/debian/`, which would hide the
whole tree from git and from lsync), and commits each release as one revision, tagged
`v6.1.170` and `v6.1.176`:

- the full repository, `~/.cache/lsync-bench/kernel-git` (~80,000 files a revision);
- the short slice, `~/.cache/lsync-bench/kernel-git-short`: the root-level files and a few
  subdirectories (`SLICE`) of both releases, chosen so that real paths change between them
  (~270 of ~4,800: the root `Makefile` among them, its SUBLEVEL differs; files added and
  removed too).

Every file of the tarball is committed (`git add -A -f`: the kernel's 6.1 `.gitignore` says
`.*`, yet its repository tracks `.gitignore`, `.clang-format`, ... as this one does; lsync
honours the `.gitignore` rules, so such files are ignored paths for it). A repository is used
only once its `prepared` marker exists (written last), so an interrupted preparation starts
again.
`checkout_copy()` clones a prepared repository (`--shared`: no object is copied) into a
working directory for one run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("LSYNC_BENCH_CACHE", Path.home() / ".cache" / "lsync-bench"))
DEB_DIR = CACHE / "kernel"
PACKAGE = "linux-source-6.1"
RELEASES = ("6.1.170-3", "6.1.176-1")
TAGS = ("v6.1.170", "v6.1.176")
TARBALL = "./usr/src/linux-source-6.1.tar.xz"
DEBIAN_GITIGNORE_LINES = ("/*", "!/debian/")
# The short mode's slice: root-level files (always) and these subdirectories.
SLICE = ("kernel", "mm", "fs/ext4", "net/ipv4", "net/ipv6", "net/netfilter", "include/linux",
         "include/net", "include/rdma", "drivers/spi", "drivers/infiniband/core",
         "tools/testing/selftests/mqueue")
MARKER = "prepared"
GIT_ENV = {"GIT_AUTHOR_NAME": "torture", "GIT_AUTHOR_EMAIL": "torture@localhost",
           "GIT_COMMITTER_NAME": "torture", "GIT_COMMITTER_EMAIL": "torture@localhost",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}


class MaterialError(RuntimeError):
    """The kernel material could not be downloaded or prepared; `code` says which step."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


@dataclass(frozen=True)
class Material:
    """A prepared repository, its two tags, and how long preparing it took here (0: cached)."""

    repo: Path
    tags: tuple[str, str]
    prepare_seconds: float


def git(*args: str, cwd: Path, check: bool = True, capture: bool = True,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["git", *args], cwd=cwd, text=True, check=False, input=input_text,
                          capture_output=capture, env={**os.environ, **GIT_ENV})
    if check and done.returncode != 0:
        raise MaterialError("git", f"git {' '.join(args)} in {cwd}: {done.stderr.strip()}")
    return done


def deb_path(release: str) -> Path:
    return DEB_DIR / f"{PACKAGE}_{release}_all.deb"


def download() -> list[Path]:
    """The two .deb files, downloaded with apt-get where missing."""
    DEB_DIR.mkdir(parents=True, exist_ok=True)
    wanted = [deb_path(release) for release in RELEASES]
    missing = [f"{PACKAGE}={release}" for release, path in zip(RELEASES, wanted, strict=True)
               if not path.exists()]
    if missing:
        done = subprocess.run(["apt-get", "download", *missing], cwd=DEB_DIR, text=True,
                              capture_output=True, check=False)
        if done.returncode != 0:
            raise MaterialError("download", f"apt-get download {' '.join(missing)}: "
                                f"{done.stderr.strip()[-500:]}")
    for path in wanted:
        if not path.exists():
            raise MaterialError("download", f"{path} missing after apt-get download")
    return wanted


def unpack(deb: Path, into: Path) -> Path:
    """The kernel tree of one .deb, unpacked below `into`; returns its top directory."""
    into.mkdir(parents=True, exist_ok=True)
    pipeline = (f"dpkg-deb --fsys-tarfile {deb} | tar -xO {TARBALL} | tar -xJ -C {into}")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], text=True,
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise MaterialError("unpack", f"{pipeline}: {done.stderr.strip()[-500:]}")
    tops = [entry for entry in into.iterdir() if entry.is_dir()]
    if len(tops) != 1:
        raise MaterialError("unpack", f"{deb}: expected one top directory, got {tops}")
    drop_debian_gitignore_lines(tops[0] / ".gitignore")
    return tops[0]


def drop_debian_gitignore_lines(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() not in DEBIAN_GITIGNORE_LINES]
    path.write_text("".join(kept))


def commit_tree(repo: Path, tree: Path, tag: str) -> None:
    """Make `tree`'s content the next revision of `repo` (tagged `tag`)."""
    git(f"--work-tree={tree}", "add", "-A", "-f", ".", cwd=repo)
    git(f"--work-tree={tree}", "commit", "-q", "--allow-empty", "-m", tag, cwd=repo)
    git("tag", "-f", tag, cwd=repo)


def _fresh_repo(repo: Path) -> None:
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo)
    git("config", "gc.auto", "0", cwd=repo)


def _prepare_full(repo: Path) -> None:
    debs = download()
    _fresh_repo(repo)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="unpack-") as scratch:
        for deb, tag in zip(debs, TAGS, strict=True):
            where = Path(scratch) / tag
            tree = unpack(deb, where)
            commit_tree(repo, tree, tag)
            shutil.rmtree(where)


def _prepare_short(repo: Path, full: Path) -> None:
    _fresh_repo(repo)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="slice-") as scratch:
        for tag in TAGS:
            tree = Path(scratch) / tag
            tree.mkdir()
            roots = git("ls-tree", "--name-only", tag, cwd=full).stdout.split()
            top_files = [name for name in roots
                         if git("cat-file", "-t", f"{tag}:{name}", cwd=full).stdout.strip()
                         == "blob"]
            archive = subprocess.run(
                ["git", "archive", "--format=tar", tag, *top_files, *SLICE], cwd=full,
                capture_output=True, check=False)
            if archive.returncode != 0:
                raise MaterialError("slice", archive.stderr.decode(errors="replace")[-500:])
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
            commit_tree(repo, tree, tag)


def prepare(full: bool) -> Material:
    """The full repository, or the short slice (which needs the full one to exist)."""
    started = time.monotonic()
    full_repo = CACHE / "kernel-git"
    short_repo = CACHE / "kernel-git-short"
    if not (full_repo / MARKER).exists():
        _prepare_full(full_repo)
        (full_repo / MARKER).write_text("ok\n")
    repo = full_repo
    if not full:
        repo = short_repo
        if not (short_repo / MARKER).exists():
            _prepare_short(short_repo, full_repo)
            (short_repo / MARKER).write_text("ok\n")
    return Material(repo, TAGS, time.monotonic() - started)


def checkout_copy(material: Material, into: Path, tag: str) -> Path:
    """A working clone of the material at `tag` (objects shared with the cache)."""
    git("clone", "-q", "--shared", "--no-checkout", str(material.repo), str(into), cwd=CACHE)
    git("checkout", "-q", tag, cwd=into)
    return into


def changed_paths(repo: Path, old: str, new: str) -> list[str]:
    """Paths that differ between two revisions (added, removed or changed)."""
    out = git("diff", "--name-only", "--no-renames", old, new, cwd=repo).stdout
    return [line for line in out.splitlines() if line]


def main() -> int:
    """Prepare both repositories and print what they hold."""
    for full in (True, False):
        material = prepare(full)
        files = len(git("ls-tree", "-r", "--name-only", material.tags[0],
                        cwd=material.repo).stdout.splitlines())
        changed = changed_paths(material.repo, *material.tags)
        print(f"{material.repo}: {files} files at {material.tags[0]}, {len(changed)} changed "
              f"to {material.tags[1]} (prepared in {material.prepare_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
