"""One agent at a time keeps a root's record: the lock that says which.

`RootLock` makes one agent at a time the keeper of a root's record: an agent whose client
died (killed, or behind a frozen link) may still be applying what was sent to it, and a
second agent listing the tree meanwhile would miss those writes, or overwrite the
record with its own snapshot. The new agent asks the old one to end (SIGTERM: it stops
reading, finishes its writes, saves the record and exits), and kills it when it does not
(a blocked write): thanks to intents (lsync.agent.records) nothing it made is lost.

The lock is a file under ~/.cache/lsync, `agent-<hash of the root>.lock`, held with flock;
it holds the holder's pid and host name. A holder is signalled only when that host is this
one and, where /proc is there, its command line names lsync; a lock that cannot be taken
(held from another host sharing the home, say) leaves the agent working without it.
"""

import fcntl
import hashlib
import os
import signal
import socket
import time
from typing import Optional

TAKEOVER_WAIT = 5.0  # seconds an old agent has to end by itself once asked (SIGTERM)
KILL_WAIT = 3.0  # seconds for it to die after SIGKILL


class RootLock:
    """Held (flock) by the one agent that keeps a root's record; see the module docstring.

    `acquire` takes it, ending an older agent of the same root on this host if it must
    (returns False when it could not: an agent on another host sharing this home, say;
    then this agent works as before, without the lock). The lock file holds the holder's
    pid and host name. `release` (or the process ending) frees it.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.fd = -1
        self.took_over = 0  # pid of the agent this one ended, 0 if none

    @staticmethod
    def default_path(root: str) -> Optional[str]:
        home = os.path.expanduser("~")
        if not home or home == "~":
            return None
        name = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return os.path.join(home, ".cache", "lsync", "agent-{}.lock".format(name))

    def acquire(self) -> bool:
        if self.path is None:
            return False
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                              0o600)
        except OSError:
            return False
        if self._try():
            return True
        for signum, wait in ((signal.SIGTERM, TAKEOVER_WAIT), (signal.SIGKILL, KILL_WAIT)):
            holder = self._holder()
            if holder is not None:
                try:
                    os.kill(holder, signum)
                    self.took_over = holder
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self._try():
                    return True
                time.sleep(0.01)
        self.release()
        return False

    def _try(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, "{} {}\n".format(os.getpid(), socket.gethostname()).encode(
                "utf-8", "surrogateescape"), 0)
        except OSError:
            pass  # held all the same; a later agent cannot end this one, only wait
        return True

    def _holder(self) -> Optional[int]:
        """The pid of the agent holding the lock, if it is an lsync agent on this host."""
        try:
            words = os.pread(self.fd, 4096, 0).decode("utf-8", "surrogateescape").split()
            pid = int(words[0])
        except (OSError, ValueError, IndexError):
            return None
        if len(words) < 2 or words[1] != socket.gethostname() or pid <= 1 or pid == os.getpid():
            return None
        try:
            with open("/proc/{}/cmdline".format(pid), "rb") as handle:
                if b"lsync" not in handle.read():
                    return None
        except FileNotFoundError:
            if os.path.isdir("/proc/self"):
                return None  # no such process
        except OSError:
            pass  # no /proc here: the host name and the held lock must do
        return pid

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
