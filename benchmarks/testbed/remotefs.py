"""A journaled ext4 file system for the benchmarks' remote trees, in a loop-mounted image.

This VM's root file system is ext4 without a journal. There, ext4's inode allocator skips
every inode freed in the last minutes (up to six), one buffer lookup per candidate
(`recently_deleted` in fs/ext4/ialloc.c, checked only when there is no journal), so that
creating files costs more the more were deleted shortly before: 40,000 files took 2.2 s of
system time, 5.8 s after one such round was deleted, 9.0 s after two; on a journaled ext4
image, 0.6 s every time (2026-12-07). What a benchmark step writes then depends on what the
steps and runs before it deleted, for rsync's receiver and lsync's agent alike. A build
host's file system has a journal (Debian's mkfs.ext4 makes one by default), so the remote
trees go on one: `journaled_fs(work)` makes a sparse image under `work`, formats it with
mkfs.ext4's defaults, mounts it and yields the mount point; it is unmounted and deleted at
the end. It needs root, mkfs.ext4 and loop devices: `available()` says whether it can be
made, and why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

IMAGE_BYTES = 24 << 30  # sparse: only what is written takes space


def available() -> tuple[bool, str]:
    """Whether a journaled image can be made here, and if not, why."""
    if os.geteuid() != 0:
        return False, "not root (loop mounts need root)"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return False, f"no {tool}"
    if not Path("/dev/loop-control").exists():
        return False, "no loop devices"
    return True, ""


@contextlib.contextmanager
def journaled_fs(work: Path, size: int = IMAGE_BYTES) -> Iterator[Path]:
    """A freshly made journaled ext4 file system mounted under `work` (see the module
    docstring); raises OSError or subprocess.CalledProcessError when it cannot be made."""
    image = work / "remote-fs.img"
    mount_point = work / "remote-fs"
    mount_point.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size)
    mounted = False
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        mounted = True
        yield mount_point
    finally:
        if mounted and subprocess.run(["umount", str(mount_point)], check=False,
                                      stdin=subprocess.DEVNULL,
                                      capture_output=True).returncode != 0:
            # Still in use (an agent not yet gone): detached now, freed once it is.
            subprocess.run(["umount", "-l", str(mount_point)], check=False,
                           stdin=subprocess.DEVNULL, capture_output=True)
        image.unlink(missing_ok=True)
