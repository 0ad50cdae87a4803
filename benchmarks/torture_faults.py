"""The faults of the torture test (`benchmarks.torture`), each with its way back.

- `TortureProxy`: the testbed's delay proxy (`testbed.proxy.ThreadedProxy`) with a bandwidth
  cap that can be set and lifted while connections are open (`set_rate`); cuts, freezes and
  refusing new connections are the proxy's own.
- `RemoteDisk`: the remote tree's own small tmpfs, made full (`fill`: its size lowered to
  what it holds, so the next write gets ENOSPC) or read-only (`remount,ro`), and put back;
  unmounted (lazily) by `close()` whatever happened.
- `small_inotify_queue`: `fs.inotify.max_queued_events` lowered while a new lsync creates
  its inotify instance (the limit is taken when the instance is created, so the window is
  kept to that moment), restored afterwards, always.
- `agent_pids`: the lsync agents below this run's sshd (never another run's), to kill.
- `rss_bytes`: a process's resident set size.

Everything here needs root (mounts, sysctl); `require_root()` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.lsync_runner import AGENT_CMDLINE_NEEDLE
from benchmarks.testbed.proxy import ThreadedProxy

INOTIFY_QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")
PAGE = 4096


def require_root() -> str | None:
    """None when the faults can be injected here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "the torture test needs root (tmpfs mounts, remounts, /proc/sys/fs/inotify)"
    if not INOTIFY_QUEUE.exists():
        return f"{INOTIFY_QUEUE} is missing (no inotify?)"
    return None


class TortureProxy(ThreadedProxy):
    """A ThreadedProxy whose bandwidth cap can change at any time (None: uncapped)."""

    def set_rate(self, rate_bps: float | None) -> None:
        def apply() -> None:
            for link in (self.proxy.link_up, self.proxy.link_down):
                link.rate_bytes = rate_bps / 8.0 if rate_bps else None
                link.busy_until = 0.0
            self.proxy.rate_bps = rate_bps

        self._call_sync(apply)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


class FaultError(RuntimeError):
    """A fault could not be injected or undone; `code` names which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


class RemoteDisk:
    """A tmpfs of `size` bytes mounted at `mount_point`, for the remote tree."""

    def __init__(self, mount_point: Path, size: int) -> None:
        self.mount_point = mount_point
        self.size = size
        self.mounted = False

    def open(self) -> RemoteDisk:
        self.mount_point.mkdir(parents=True, exist_ok=True)
        done = _run("mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                    str(self.mount_point))
        if done.returncode != 0:
            raise FaultError("mount", f"tmpfs at {self.mount_point}: {done.stderr.strip()}")
        self.mounted = True
        return self

    def used(self) -> int:
        st = os.statvfs(self.mount_point)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _remount(self, options: str, attempts: int = 50) -> bool:
        """`mount -o remount,<options>`; a read-only remount is refused (EBUSY) while a file
        is open for writing there: tried again for up to ~5 s."""
        for _ in range(attempts):
            done = _run("mount", "-o", f"remount,{options}", str(self.mount_point))
            if done.returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def fill(self) -> bool:
        """Shrink the filesystem to what it holds now (plus a page): writes fail ENOSPC.
        Whether it took (a 64 KiB probe write fails)."""
        return self._remount(f"size={self.used() + PAGE}") and not self._writable()

    def read_only(self) -> bool:
        """Remount read-only; whether it took (a probe write fails)."""
        return self._remount("ro") and not self._writable()

    def _writable(self) -> bool:
        probe = self.mount_point / ".torture-probe"
        try:
            probe.write_bytes(b"x" * 65536)
        except OSError:
            return False
        probe.unlink()
        return True

    def restore(self) -> None:
        """Writable again, at the full size."""
        if not self._remount(f"rw,size={self.size}"):
            raise FaultError("remount", f"cannot make {self.mount_point} writable again")

    def close(self) -> None:
        if self.mounted:
            _run("umount", "-l", str(self.mount_point))
            self.mounted = False


@contextlib.contextmanager
def remote_disk(mount_point: Path, size: int) -> Iterator[RemoteDisk]:
    disk = RemoteDisk(mount_point, size)
    try:
        yield disk.open()
    finally:
        disk.close()


@contextlib.contextmanager
def small_inotify_queue(limit: int) -> Iterator[None]:
    """fs.inotify.max_queued_events = `limit` for the block, restored always."""
    before = INOTIFY_QUEUE.read_text().strip()
    INOTIFY_QUEUE.write_text(f"{limit}\n")
    try:
        yield
    finally:
        INOTIFY_QUEUE.write_text(f"{before}\n")


def has_inotify(pid: int) -> bool:
    """Whether process `pid` holds an inotify instance."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    return True
    except OSError:
        return False
    return False


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc; processes come and go meanwhile)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        kids = [child for child, parent in parent_of.items() if parent == current]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def agent_pids(sshd_pid: int) -> list[int]:
    """The lsync agents started through this run's sshd."""
    return [pid for pid in children(sshd_pid) if AGENT_CMDLINE_NEEDLE in cmdline(pid)]


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll `condition` until it holds or `timeout` s pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()
