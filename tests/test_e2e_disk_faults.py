"""End to end: disks that fill up or go away (issue 11 items 5 and 7).

A full remote disk heals by itself: the remote tree lives on a small tmpfs; files that do
not fit fail with a clear error and are not counted as synced (no in-sync line while they
fail); once the tmpfs is remounted bigger, lsync retries them with its backoff and converges
without a restart. A local tree on a filesystem that gets unmounted stops lsync with the
safety message (exit 6), and nothing is deleted remotely. Needs root to mount; skipped
elsewhere with the reason, never in CI (which runs as root).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import LsyncProcess, assert_same_now, fresh_dirs

Start = Callable[..., LsyncProcess]


def _mount_tmpfs(mount_point: Path, size: str) -> None:
    mount_point.mkdir()
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: the tmpfs test must run there")
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "remote-disk"
    _mount_tmpfs(mount_point, "256k")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_writes_refused_by_a_full_disk_are_retried_once_there_is_room(
        tmp_path: Path, small_tmpfs: Path, run_lsync: Start) -> None:
    local, _ = fresh_dirs(tmp_path)
    remote = small_tmpfs / "tree"
    for i in range(8):
        (local / f"big{i}.bin").write_bytes(os.urandom(100_000))  # 800 KB: 256 KB do not fit
    lsync = run_lsync("connect", str(remote), cwd=local)
    lsync.wait_for_line("No space left on device", timeout=20)
    lsync.wait_for_line("paths failing", timeout=20)
    assert lsync.in_sync_as_of() is None  # failing paths are not "in sync"
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    mark = time.time_ns()
    lsync.wait_in_sync(mark, timeout=40)  # backoff: 1, 2, 4, 8 s ...
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0


def test_local_tree_unmounted_under_lsync_stops_it_without_deleting_remotely(
        tmp_path: Path, run_lsync: Start) -> None:
    local = tmp_path / "local-disk"
    _mount_tmpfs(local, "8m")
    remote = tmp_path / "remote"
    try:
        for i in range(20):
            (local / f"f{i}.c").write_text(f"int f{i};\n")
        lsync = run_lsync("connect", str(remote), "--local", str(local), cwd=tmp_path)
        lsync.wait_for_line(" ready ")
        assert_same_now(local, remote, lsync=lsync)
    finally:
        subprocess.run(["umount", "-l", str(local)], check=False)
    assert lsync.finish(timeout=20) == 6, lsync.stderr
    assert "stopped without deleting anything" in lsync.stderr
    assert len(list(remote.iterdir())) == 20
