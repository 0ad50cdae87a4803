"""Filesystem operations confined to one root directory.

Every path comes from the wire and is resolved component by component from an open file
descriptor of the root, with O_NOFOLLOW: a path with '..', an absolute path, or a path that
passes through a symlink is refused with `OpError(BAD_PATH)` before anything is touched.
Nothing acts by path after a check: the last component is acted on relative to its parent's
descriptor, by calls that do not follow symlinks (rename, unlink, mkdir), or through a
descriptor of its own opened with O_NOFOLLOW (read, fchmod), so a directory swapped for a
symlink while an operation runs cannot lead it outside the root.

Every open of a file is O_NONBLOCK and is checked with fstat: a FIFO, socket or device at a
synced path never blocks the agent; it is refused with TYPE_CONFLICT, and never replaced
(lsync did not make it). A reader never sees a half-written file: every write goes to a file
of its own in the target's directory, which gets the target's name only once complete
(`begin_write` makes it: a `PendingFile`, see lsync.agent.tempfiles). Where the kernel and
the file system have O_TMPFILE (and /proc/self/fd is there), that file has no name while it
is written; otherwise it has a temporary name. A root whose file system refuses O_TMPFILE, or
where linking through /proc fails, goes back to temporary names for good
(`ConfinedRoot.tmpfile`).

`resolve_root` says which directory a Hello's root names ('~' expanded; a relative one
is taken from the home directory).

Failures become `OpError` with a code from `ErrorCode` (lsync.agent.refusals); no other
exception escapes for ordinary filesystem trouble (missing, permission, full disk, type
conflicts).

Before an entry is replaced (a write's rename, a symlink, a rename onto it) or deleted, the
root's `guard` is asked first (`ReplaceGuard`; lsync.agent.keeping keeps remote edits of
what lsync wrote aside there). Nothing may be written at or below `KEPT_DIR`, where it
keeps them (BAD_PATH).
"""

import collections
import errno
import itertools
import os
import stat
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from lsync.agent.refusals import (
    OpError,
    ReplaceGuard,
    lstat_at,
    op_error,
    refuse_special,
    special_kind,
)
from lsync.agent.tempfiles import NEW_FILE_FLAGS, READ_CHUNK, TEMP_PREFIX, PendingFile
from lsync.protocol.errors import ErrorCode
from lsync.protocol.messages import KEPT_DIR
from lsync.protocol.paths import relpath_problem, shown

_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _SAFE
# An unnamed file in a directory (Linux >= 3.11): O_RDWR so that it can still be copied to a
# named one should linking it fail; never O_EXCL, which would forbid linking it.
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_TMPFILE_FLAGS = _O_TMPFILE | os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
# What the open answers where O_TMPFILE is not supported: the file system (EOPNOTSUPP), an
# old kernel that takes it for O_DIRECTORY (EISDIR), or anything refusing the flags.
_TMPFILE_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS)
_READ_FLAGS = os.O_RDONLY | _SAFE
_HAS_O_PATH = hasattr(os, "O_PATH")
_PATH_FLAGS = getattr(os, "O_PATH", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def file_key(st: os.stat_result) -> Tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _refuse_reserved(path: str, moving: bool = False) -> None:
    """Refuse to write at or below KEPT_DIR (or, `moving`, to move a directory above it)."""
    if (path == KEPT_DIR or path.startswith(KEPT_DIR + "/")
            or (moving and KEPT_DIR.startswith(path + "/"))):
        raise OpError(ErrorCode.BAD_PATH, "refused path {}: lsync keeps remote edits in "
                      "{}".format(shown(path), KEPT_DIR))


def resolve_root(root: str, create: bool) -> str:
    """The absolute root: '~' expanded, relative paths taken from the home directory."""
    path = os.path.expanduser(root)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser("~"), path)
    path = os.path.normpath(path)
    if create and not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
    return path


class ConfinedRoot:
    """The remote tree: an open root directory and operations on wire paths below it."""

    def __init__(self, root: str) -> None:
        self.path = root
        # The root itself may be a symlink (~/src -> /data/src): no O_NOFOLLOW for it.
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK
                          | getattr(os, "O_CLOEXEC", 0))
        self._counter = itertools.count(1)  # next() is atomic: writer threads share it
        # Directories made on the way to a path: (path, inode). Writer threads append, the
        # service takes them (`take_made`) to record that lsync made them; a deque, whose
        # append and popleft are atomic (swapping a list for a new one could lose what a
        # thread appends to the old one meanwhile).
        self._made: Deque[Tuple[str, int]] = collections.deque()
        self.guard = ReplaceGuard()  # asked before an entry is replaced or deleted
        # Whether new files are made unnamed (O_TMPFILE) and linked into place; turned off
        # for good (by any thread) once the file system or /proc says it does not work.
        self.tmpfile = bool(_O_TMPFILE) and os.path.isdir("/proc/self/fd")

    def take_made(self) -> List[Tuple[str, int]]:
        """The directories made as parents since the last call."""
        made = []
        while self._made:
            made.append(self._made.popleft())
        return made

    def close(self) -> None:
        os.close(self.fd)

    # -- resolving ------------------------------------------------------------------------
    def _check(self, path: str) -> None:
        problem = relpath_problem(path)
        if problem:
            raise OpError(ErrorCode.BAD_PATH, "refused path {}: {}".format(shown(path),
                                                                           problem))

    def parent_fd(self, path: str, create: bool = False) -> Tuple[int, str]:
        """An fd of the directory holding `path`, and the last component's name.

        The caller closes the fd. With create=True missing directories are made (0o755).
        """
        self._check(path)
        parts = path.split("/")
        fd = os.dup(self.fd)
        try:
            walked = []
            for part in parts[:-1]:
                walked.append(part)
                made = False
                doing = "open directory"
                try:
                    try:
                        next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise OpError(ErrorCode.NOT_FOUND, "no directory {}".format(
                                "/".join(walked)))
                        doing = "make directory"
                        try:
                            os.mkdir(part, 0o755, dir_fd=fd)
                            made = True
                        except FileExistsError:
                            pass
                        next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except OSError as exc:  # (a read-only or full file system when making it too)
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, fd):
                        raise OpError(ErrorCode.BAD_PATH, "refused path {!r}: {} is a "
                                      "symlink".format(path, "/".join(walked)))
                    if exc.errno == errno.ENOTDIR:
                        raise OpError(ErrorCode.TYPE_CONFLICT, "{} is not a directory".format(
                            "/".join(walked)))
                    raise op_error(exc, doing, "/".join(walked))
                if made:
                    self._made.append(("/".join(walked), os.fstat(next_fd).st_ino))
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _temp_name(self) -> str:
        return "{}{}-{}".format(TEMP_PREFIX, os.getpid(), next(self._counter))

    # -- reading --------------------------------------------------------------------------
    def open_read(self, path: str) -> int:
        """An fd reading the regular file `path` (never through a symlink, never blocking:
        anything but a regular file is refused with TYPE_CONFLICT)."""
        dfd, name = self.parent_fd(path)
        try:
            st = lstat_at(dfd, name)
            kind = special_kind(st.st_mode) if st is not None else ""
            if kind:  # not even opened: opening a device may act
                raise OpError(ErrorCode.TYPE_CONFLICT, "{} is {}, not a regular file".format(
                    path, kind))
            fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise op_error(exc, "open", path)
        finally:
            os.close(dfd)
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            os.close(fd)
            raise op_error(exc, "stat", path)
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise OpError(ErrorCode.TYPE_CONFLICT, "{} is {}, not a regular file".format(
                path, special_kind(mode) or "a directory"))
        return fd

    def digest_file(self, path: str, new_hasher: Callable[[], Any]) -> Tuple[bytes, os.stat_result]:
        """Digest of a regular file's content, with the fstat taken after reading it."""
        fd = self.open_read(path)
        try:
            hasher = new_hasher()
            for chunk in iter_fd(fd):
                hasher.update(chunk)
            return hasher.digest(), os.fstat(fd)
        except OSError as exc:
            raise op_error(exc, "read", path)
        finally:
            os.close(fd)

    # -- writing --------------------------------------------------------------------------
    def filesystem_now_ns(self) -> Optional[int]:
        """The root's file system's clock now: the mtime of an unnamed file made in the root
        and dropped at once (O_TMPFILE: nothing appears in the tree). None when no such file
        can be made (no O_TMPFILE there, a read-only or full file system)."""
        if not self.tmpfile:
            return None
        try:
            fd = os.open(".", _TMPFILE_FLAGS, 0o600, dir_fd=self.fd)
        except OSError:
            return None
        try:
            return os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)

    def begin_write(self, path: str, parents: Optional["Parents"] = None,
                    mode: int = 0o600) -> PendingFile:
        """Start writing a new version of `path` into a file of its own beside it (its
        directory reached through `parents` when given: a batch's files share them).

        `mode` is the mode the file is made with when it has no name while written (it is
        then invisible, so it may have its final mode at once and spare `commit` a chmod);
        a named temporary file is made 0o600 whatever `mode` says."""
        _refuse_reserved(path)
        if parents is not None:
            dfd, name = parents.parent_fd(path)
        else:
            dfd, name = self.parent_fd(path, create=True)
        if self.tmpfile:
            try:
                fd = os.open(".", _TMPFILE_FLAGS, mode & 0o777, dir_fd=dfd)
                return PendingFile(path, dfd, name, None, fd, owns_dfd=parents is None,
                                   guard=self.guard, root=self)
            except OSError as exc:
                if exc.errno in _TMPFILE_UNSUPPORTED:
                    self.tmpfile = False
                # Other errors (no space, no permission) are the named file's to report.
        temp = self._temp_name()
        try:
            fd = os.open(temp, NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
        except OSError as exc:
            if parents is None:
                os.close(dfd)
            raise op_error(exc, "create temporary file for", path)
        return PendingFile(path, dfd, name, temp, fd, owns_dfd=parents is None,
                           guard=self.guard, root=self)

    def remove(self, path: str) -> Tuple[bool, bool]:
        """Remove a file, symlink or empty directory: (removed, it was a directory).

        Only the named entry is ever removed: a directory that is not empty is kept
        (removed is False) with everything in it; a FIFO, socket or device is refused.
        Raises OpError(NOT_FOUND) when there is nothing at `path`. An entry the guard moves
        away counts as removed.
        """
        _refuse_reserved(path)
        dfd, name = self.parent_fd(path)
        try:
            try:
                refuse_special(lstat_at(dfd, name), path)
                if self.guard.before_delete(dfd, name, path):
                    return True, False
                os.unlink(name, dir_fd=dfd)
                return True, False
            except IsADirectoryError:
                pass
            except PermissionError as exc:
                # Some systems answer EPERM for unlink() on a directory.
                st = os.lstat(name, dir_fd=dfd)
                if not stat.S_ISDIR(st.st_mode):
                    raise op_error(exc, "delete", path)
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False, True
                raise
            return True, True
        except OSError as exc:
            raise op_error(exc, "delete", path)
        finally:
            os.close(dfd)

    def rename(self, src: str, dst: str) -> Optional[os.stat_result]:
        """Move `src` to `dst`, replacing a file (not a non-empty directory) at `dst`; a
        FIFO, socket or device at either end is refused.

        Returns the lstat of what is now at `dst` (None if it vanished at once).
        """
        _refuse_reserved(src, moving=True)
        _refuse_reserved(dst)
        sfd, sname = self.parent_fd(src)
        try:
            dfd, dname = self.parent_fd(dst, create=True)
            try:
                refuse_special(lstat_at(sfd, sname), src)
                refuse_special(lstat_at(dfd, dname), dst)
                self.guard.before_replace(dfd, dname, dst, b"")
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                try:
                    return os.lstat(dname, dir_fd=dfd)
                except OSError:
                    return None
            except OSError as exc:
                raise op_error(exc, "rename {} to".format(src), dst)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def mkdir(self, path: str, mode: int) -> os.stat_result:
        """Make directory `path` (and its parents); an existing directory gets `mode`.

        Returns the directory's stat. The mode is set through a descriptor of the directory
        opened with O_NOFOLLOW: a directory swapped for a symlink is refused, not followed.
        """
        _refuse_reserved(path)
        dfd, name = self.parent_fd(path, create=True)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
            except FileExistsError:
                pass
            st = chmod_at(dfd, name, path, mode, directory=True)
            assert st is not None
            return st
        except OSError as exc:
            raise op_error(exc, "make directory", path)
        finally:
            os.close(dfd)

    def symlink(self, path: str, target: str) -> None:
        """Make `path` a symlink to `target`, atomically replacing a file or link."""
        _refuse_reserved(path)
        dfd, name = self.parent_fd(path, create=True)
        temp = self._temp_name()
        try:
            refuse_special(lstat_at(dfd, name), path)
            os.symlink(target, temp, dir_fd=dfd)
            try:
                self.guard.before_replace(dfd, name, path, b"")
                os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(temp, dir_fd=dfd)
                raise
        except OSError as exc:
            raise op_error(exc, "make symlink", path)
        finally:
            os.close(dfd)

    def set_mode(self, path: str, mode: int) -> None:
        """chmod a file or directory; a symlink (which has no mode of its own) is left as is.

        The mode is set through a descriptor opened with O_NOFOLLOW, never by name.
        """
        _refuse_reserved(path)
        dfd, name = self.parent_fd(path)
        try:
            chmod_at(dfd, name, path, mode, directory=False)
        except OSError as exc:
            raise op_error(exc, "set mode of", path)
        finally:
            os.close(dfd)


def chmod_at(dfd: int, name: str, path: str, mode: int,
             directory: bool) -> Optional[os.stat_result]:
    """Set the mode of entry `name` of directory `dfd` through a descriptor of its own.

    A symlink is left as is (None; with `directory`, TYPE_CONFLICT), a FIFO, socket or
    device is refused. Returns the entry's fstat after the change. The lstat first is only
    a hint (not to open what must not be opened): the fd, opened O_NOFOLLOW and checked
    with fstat, is what decides, so a swap in between cannot redirect the chmod.
    """
    st = os.lstat(name, dir_fd=dfd)
    if stat.S_ISLNK(st.st_mode) and not directory:
        return None
    if directory and not stat.S_ISDIR(st.st_mode):
        raise OpError(ErrorCode.TYPE_CONFLICT, "{} exists and is not a directory".format(path))
    refuse_special(st, path)
    flags = DIR_FLAGS if directory else _READ_FLAGS
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            # It became a symlink (or not a directory) since the lstat.
            if directory:
                raise OpError(ErrorCode.TYPE_CONFLICT, "{} is not a directory".format(path))
            return None
        if exc.errno != errno.EACCES or not _HAS_O_PATH:
            raise
        return _chmod_unreadable(dfd, name, path, mode, directory)
    try:
        st = os.fstat(fd)
        _check_chmod_target(st, path, directory)
        if stat.S_ISLNK(st.st_mode):
            return None
        os.fchmod(fd, mode & 0o7777)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _check_chmod_target(st: os.stat_result, path: str, directory: bool) -> None:
    refuse_special(st, path)
    if directory and not stat.S_ISDIR(st.st_mode):
        raise OpError(ErrorCode.TYPE_CONFLICT, "{} is not a directory".format(path))


def _chmod_unreadable(dfd: int, name: str, path: str, mode: int,
                      directory: bool) -> Optional[os.stat_result]:
    """chmod an entry this process may not open (mode 0o000, a write-only file, a directory
    without read permission): an O_PATH descriptor (Linux) names the very inode, and
    chmod goes through /proc/self/fd, which does not resolve any name again."""
    fd = os.open(name, _PATH_FLAGS | (os.O_DIRECTORY if directory else 0), dir_fd=dfd)
    try:
        st = os.fstat(fd)
        _check_chmod_target(st, path, directory)
        if stat.S_ISLNK(st.st_mode):
            return None
        proc = "/proc/self/fd/{}".format(fd)
        if not os.path.exists(proc):
            raise OpError(ErrorCode.PERMISSION_DENIED, "cannot open {} to change its mode "
                          "(and no /proc to do it otherwise)".format(path))
        os.chmod(proc, mode & 0o7777)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def iter_fd(fd: int) -> Iterator[bytes]:
    while True:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return
        yield chunk


class Parents:
    """The directories of one batch of writes, each opened once (as `parent_fd` opens it:
    never through a symlink, missing ones made) and kept until `close`."""

    def __init__(self, root: "ConfinedRoot") -> None:
        self.root = root
        self._fds: Dict[str, int] = {}

    def parent_fd(self, path: str) -> Tuple[int, str]:
        directory, _, name = path.rpartition("/")
        fd = self._fds.get(directory)
        if fd is not None:
            self.root._check(path)
            return fd, name
        fd, name = self.root.parent_fd(path, create=True)
        self._fds[directory] = fd
        return fd, name

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
