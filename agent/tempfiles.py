"""Files being written beside their target, put in place only once complete.

A `PendingFile` (`ConfinedRoot.begin_write` makes it, and chooses which kind) is written
through a descriptor of its own in the target's directory; a reader never sees it
half-written, since it gets the target's name only in `commit`, and `abort` leaves nothing
behind. Where the kernel and the file system have O_TMPFILE (and /proc/self/fd is there),
the file has no name while it is written; a new file (nothing at its name) is then linked
into place by linkat, which makes one directory entry instead of two and fails with EEXIST
rather than replace an entry that appeared meanwhile (that entry then goes through the
replacement's checks, below). Otherwise, and to replace an existing entry, the file has a
temporary name, `.lsync-tmp-<pid>-<n>` (`TEMP_PREFIX`), and is renamed over the target: never
over a directory, a FIFO, a socket or a device, and only after the root's `ReplaceGuard` has
been asked. Where linking through /proc fails, the unnamed file is copied to a named one and
its root makes named files from then on (`ConfinedRoot.tmpfile`).

`is_stale_temp` recognises the temporary files of an agent that no longer runs (an unnamed
file leaves none). Failures are `OpError` (lsync.agent.refusals); a commit that fails
removes the file.
"""

import errno
import os
import re
import stat
from typing import TYPE_CHECKING, Optional, Union

from lsync.agent.refusals import OpError, ReplaceGuard, lstat_at, op_error, refuse_special
from lsync.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from lsync.agent.confined import ConfinedRoot

TEMP_PREFIX = ".lsync-tmp-"
_TEMP_RE = re.compile(r"^\.lsync-tmp-(\d+)-\d+$")
# A named temporary file: never through a symlink, never over an entry already there.
NEW_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
                  | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
_PROC_FD = "/proc/self/fd/{}"
READ_CHUNK = 1 << 20


def is_stale_temp(name: str) -> bool:
    """True for a temporary file left by an agent process that no longer runs."""
    match = _TEMP_RE.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but not ours to signal: assume alive
    return _is_zombie(pid)  # a killed agent not reaped yet writes nothing more


def _is_zombie(pid: int) -> bool:
    """Whether process `pid` has ended and waits to be reaped (Linux /proc; else False)."""
    try:
        with open("/proc/{}/stat".format(pid), "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


class PendingFile:
    """A file being written, unnamed (O_TMPFILE: `temp` is None) or under a temporary name;
    `commit` puts it in place, `abort` removes it."""

    def __init__(self, path: str, dfd: int, name: str, temp: Optional[str], fd: int,
                 owns_dfd: bool = True, guard: Optional[ReplaceGuard] = None,
                 root: Optional["ConfinedRoot"] = None) -> None:
        self.path = path
        self.dfd = dfd
        self.name = name
        self.temp = temp  # None while the file has no name
        self.fd = fd
        self.size = 0
        self.owns_dfd = owns_dfd  # else the directory belongs to a batch's `Parents`
        self.guard = guard or ReplaceGuard()  # asked right before the rename
        self.known = b""  # a digest of content the client has (a delta's base), for it
        self.root = root  # told when linking an unnamed file does not work

    def write(self, data: Union[bytes, memoryview]) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            raise op_error(exc, "write", self.path)

    def commit(self, mode: int) -> os.stat_result:
        """Give the file `mode`, put it in place, and return its stat.

        An unnamed file is linked at the target's name, which fails when an entry is
        there (never replacing it); it is then named and renamed over the target after the
        checks and the guard, as a named temporary file is."""
        try:
            if self.temp is None:
                # Made with `mode` already, unless the umask or a setuid bit said otherwise.
                st = os.fstat(self.fd)
                if stat.S_IMODE(st.st_mode) != mode & 0o7777:
                    os.fchmod(self.fd, mode & 0o7777)
                    st = os.fstat(self.fd)
                # The link itself says whether an entry is there (EEXIST): no look first.
                linked = self._link(self.name)
                if linked:
                    os.close(self.fd)
                    self.fd = -1
                    self._release()
                    return st
                if self._name_temp(copy=linked is None):  # None: linking does not work
                    st = os.fstat(self.fd)  # the copy is another file
                target = lstat_at(self.dfd, self.name)
            else:
                os.fchmod(self.fd, mode & 0o7777)
                st = os.fstat(self.fd)
                target = lstat_at(self.dfd, self.name)
            os.close(self.fd)
            self.fd = -1
            if target is not None and stat.S_ISDIR(target.st_mode):
                raise OpError(ErrorCode.TYPE_CONFLICT, "{} is a directory".format(self.path))
            refuse_special(target, self.path)
            self.guard.before_replace(self.dfd, self.name, self.path, self.known)
            assert self.temp is not None
            os.rename(self.temp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        except OSError as exc:
            self.abort()
            raise op_error(exc, "replace", self.path)
        except OpError:
            self.abort()
            raise
        self._release()
        return st

    def _link(self, name: str) -> Optional[bool]:
        """Link the unnamed file as `name` of its directory: True when done, False when an
        entry of that name is there (never replaced), None when the link failed otherwise
        (linking through /proc may not work here; or the directory is full or gone: the
        named copy's creation then says so)."""
        try:
            os.link(_PROC_FD.format(self.fd), name, dst_dir_fd=self.dfd,
                    follow_symlinks=True)
            return True
        except FileExistsError:
            return False
        except OSError:
            return None

    def _name_temp(self, copy: bool) -> bool:
        """Give the unnamed file a temporary name: a link to it, or (`copy`, or when that
        link fails) a named copy of it, after which the root makes named files. True when
        it made a copy (the fd is then the copy's)."""
        temp = self.root._temp_name() if self.root is not None else "{}{}-u{}".format(
            TEMP_PREFIX, os.getpid(), self.fd)
        if not copy:
            linked = self._link(temp)
            if linked:
                self.temp = temp
                return False
            if linked is False:  # a leftover of that name: as O_EXCL would say
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), temp)
        fd = os.open(temp, NEW_FILE_FLAGS, 0o600, dir_fd=self.dfd)
        self.temp = temp
        try:
            size = os.fstat(self.fd).st_size
            offset = 0
            while offset < size:
                chunk = os.pread(self.fd, READ_CHUNK, offset)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                offset += len(chunk)
            os.fchmod(fd, stat.S_IMODE(os.fstat(self.fd).st_mode))
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd
        if self.root is not None:
            self.root.tmpfile = False  # linking through /proc does not work here
        return True

    def _release(self) -> None:
        if self.owns_dfd:
            os.close(self.dfd)
        self.dfd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dfd >= 0:
            if self.temp is not None:
                try:
                    os.unlink(self.temp, dir_fd=self.dfd)
                except OSError:
                    pass
            self._release()
