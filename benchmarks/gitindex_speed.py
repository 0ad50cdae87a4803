"""How fast lsync reads git's index (lsync.client.local.gitindex): prints a table.

    python -m benchmarks.gitindex_speed [REPO ...]

For each repository given (default: the real kernel prepared by `benchmarks/` in
~/.cache/lsync-bench/kernel-git, when present) and for a synthetic index of 80,000 entries
made with `git update-index --index-info`, the index is read as written and as version 4
(converted in a copy through GIT_INDEX_FILE: the repository's own index is not touched).
Times are the best of 7 reads, wall and CPU of the reading thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsync.client.local import gitindex

KERNEL = Path.home() / ".cache" / "lsync-bench" / "kernel-git"
RUNS = 7


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None,
         stdin: bytes | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, check=True)
    return done.stdout.decode()


def _time(location: gitindex.IndexLocation) -> tuple[float, float, int]:
    wall = cpu = float("inf")
    count = 0
    for _ in range(RUNS):
        w, c = time.perf_counter(), time.thread_time()
        tracked = gitindex.read(location)
        cpu = min(cpu, time.thread_time() - c)
        wall = min(wall, time.perf_counter() - w)
        count = len(tracked.ordered)
    return wall, cpu, count


def _synthetic(work: Path) -> Path:
    root = work / "synthetic"
    root.mkdir()
    _git(root, "init", "-q")
    blob = _git(root, "hash-object", "-w", "--stdin", stdin=b"x\n").strip()
    lines = [f"100644 {blob}\tdrivers/d{i // 400:03d}/sub{i // 40 % 10}/file{i:05d}.c"
             for i in range(80_000)]
    _git(root, "update-index", "--index-info", stdin=("\n".join(lines) + "\n").encode())
    return root / ".git" / "index"


def main(argv: list[str]) -> int:
    repos = [Path(a) for a in argv] or ([KERNEL] if (KERNEL / ".git" / "index").exists()
                                         else [])
    rows: list[tuple[str, int, int, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        indexes = [(repo.name, repo / ".git", repo / ".git" / "index") for repo in repos]
        synthetic = _synthetic(work)
        indexes.append(("synthetic 80k", synthetic.parent, synthetic))
        for name, git_dir, index in indexes:
            v4 = work / f"{len(rows)}-v4"
            shutil.copyfile(index, v4)
            env = dict(os.environ, GIT_DIR=str(git_dir), GIT_INDEX_FILE=str(v4))
            _git(work, "update-index", "--index-version", "4", env=env)
            for label, path in ((name, index), (f"{name} (v4)", v4)):
                data = path.read_bytes()
                location = gitindex.IndexLocation(str(path), "", gitindex.SHA1_SIZE)
                wall, cpu, count = _time(location)
                version = int.from_bytes(data[4:8], "big")
                rows.append((label, version, count, len(data), wall, cpu))
    print(f"{'index':<28} {'ver':>3} {'entries':>8} {'bytes':>10} {'wall ms':>8} {'cpu ms':>7}")
    for label, version, count, size, wall, cpu in rows:
        print(f"{label:<28} {version:>3} {count:>8,} {size:>10,} {wall * 1000:>8.1f} "
              f"{cpu * 1000:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
