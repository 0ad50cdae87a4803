"""Filesystem operations confined to one root directory.

Every path comes from the wire and is resolved component by component from an open file
descriptor of the root, with O_NOFOLLOW: a path with '..', an absolute path, or a path that
passes through a symlink is refused with `OpError(BAD_PATH)` before anything is touched.
All writes go to a temporary file in the target's directory that is renamed over the target,
so a reader never sees a half-written file. Temporary names are `.lsync-tmp-<pid>-<n>`;
`is_stale_temp` recognises the leftovers of an agent that is no longer running.

Failures become `OpError` with a code from `ErrorCode`; no other exception escapes for
ordinary filesystem trouble (missing, permission, full disk, type conflicts).
"""

import errno
import itertools
import os
import re
import stat
from typing import Any, Callable, Iterator, List, Optional, Tuple

from lsync.protocol.errors import ErrorCode
from lsync.protocol.paths import relpath_problem

TEMP_PREFIX = ".lsync-tmp-"
_TEMP_RE = re.compile(r"^\.lsync-tmp-(\d+)-\d+$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                   | getattr(os, "O_CLOEXEC", 0))
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
READ_CHUNK = 1 << 20


class OpError(Exception):
    """An operation failed; `code` says why in terms the client can act on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.EACCES: ErrorCode.PERMISSION_DENIED,
    errno.EPERM: ErrorCode.PERMISSION_DENIED,
    errno.EROFS: ErrorCode.PERMISSION_DENIED,
    errno.ENOSPC: ErrorCode.NO_SPACE,
    errno.EDQUOT: ErrorCode.NO_SPACE,
    errno.EISDIR: ErrorCode.TYPE_CONFLICT,
    errno.ENOTDIR: ErrorCode.TYPE_CONFLICT,
    errno.ENOTEMPTY: ErrorCode.TYPE_CONFLICT,
    errno.EEXIST: ErrorCode.TYPE_CONFLICT,
    errno.ELOOP: ErrorCode.BAD_PATH,
}


def op_error(exc: OSError, what: str, path: str) -> OpError:
    """Map an OSError to an OpError with a one-line message and no traceback."""
    code = _ERRNO_CODES.get(exc.errno or 0, ErrorCode.IO_ERROR)
    return OpError(code, "{} {}: {}".format(what, path, exc.strerror or exc))


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
    return False


def file_key(st: os.stat_result) -> Tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ConfinedRoot:
    """The remote tree: an open root directory and operations on wire paths below it."""

    def __init__(self, root: str) -> None:
        self.path = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        self._counter = itertools.count(1)  # next() is atomic: writer threads share it
        # Directories made on the way to a path: (path, inode). Writer threads append
        # (atomic), the service takes them (`take_made`) to record that lsync made them.
        self._made: List[Tuple[str, int]] = []

    def take_made(self) -> List[Tuple[str, int]]:
        """The directories made as parents since the last call."""
        made, self._made = self._made, []
        return made

    def close(self) -> None:
        os.close(self.fd)

    # -- resolving ------------------------------------------------------------------------
    def _check(self, path: str) -> None:
        problem = relpath_problem(path)
        if problem:
            raise OpError(ErrorCode.BAD_PATH, "refused path {!r}: {}".format(path, problem))

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
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise OpError(ErrorCode.NOT_FOUND, "no directory {}".format(
                            "/".join(walked)))
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        made = True
                    except FileExistsError:
                        made = False
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    if made:
                        self._made.append(("/".join(walked), os.fstat(next_fd).st_ino))
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, fd):
                        raise OpError(ErrorCode.BAD_PATH, "refused path {!r}: {} is a "
                                      "symlink".format(path, "/".join(walked)))
                    if exc.errno == errno.ENOTDIR:
                        raise OpError(ErrorCode.TYPE_CONFLICT, "{} is not a directory".format(
                            "/".join(walked)))
                    raise op_error(exc, "open directory", "/".join(walked))
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def lstat(self, path: str) -> Optional[os.stat_result]:
        """lstat of `path`, or None if it (or its parent) does not exist."""
        try:
            dfd, name = self.parent_fd(path)
        except OpError as exc:
            if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.TYPE_CONFLICT):
                return None
            raise
        try:
            return os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise op_error(exc, "stat", path)
        finally:
            os.close(dfd)

    def _temp_name(self) -> str:
        return "{}{}-{}".format(TEMP_PREFIX, os.getpid(), next(self._counter))

    # -- reading --------------------------------------------------------------------------
    def open_read(self, path: str) -> int:
        """An fd reading the regular file `path` (never through a symlink)."""
        dfd, name = self.parent_fd(path)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise op_error(exc, "open", path)
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OpError(ErrorCode.TYPE_CONFLICT, "{} is not a regular file".format(path))
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
    def begin_write(self, path: str) -> "PendingFile":
        """Start writing a new version of `path` into a temporary file beside it."""
        dfd, name = self.parent_fd(path, create=True)
        temp = self._temp_name()
        try:
            fd = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
        except OSError as exc:
            os.close(dfd)
            raise op_error(exc, "create temporary file for", path)
        return PendingFile(path, dfd, name, temp, fd)

    def remove(self, path: str) -> Tuple[bool, bool]:
        """Remove a file, symlink or empty directory: (removed, it was a directory).

        Only the named entry is ever removed: a directory that is not empty is kept
        (removed is False) with everything in it. Raises OpError(NOT_FOUND) when there is
        nothing at `path`.
        """
        dfd, name = self.parent_fd(path)
        try:
            try:
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
        """Move `src` to `dst`, replacing a file (not a non-empty directory) at `dst`.

        Returns the lstat of what is now at `dst` (None if it vanished at once).
        """
        sfd, sname = self.parent_fd(src)
        try:
            dfd, dname = self.parent_fd(dst, create=True)
            try:
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

        Returns the directory's stat.
        """
        dfd, name = self.parent_fd(path, create=True)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
            except FileExistsError:
                st = os.lstat(name, dir_fd=dfd)
                if not stat.S_ISDIR(st.st_mode):
                    raise OpError(ErrorCode.TYPE_CONFLICT,
                                  "{} exists and is not a directory".format(path))
            os.chmod(name, mode & 0o7777, dir_fd=dfd)
            return os.lstat(name, dir_fd=dfd)
        except OSError as exc:
            raise op_error(exc, "make directory", path)
        finally:
            os.close(dfd)

    def symlink(self, path: str, target: str) -> None:
        """Make `path` a symlink to `target`, atomically replacing a file or link."""
        dfd, name = self.parent_fd(path, create=True)
        temp = self._temp_name()
        try:
            os.symlink(target, temp, dir_fd=dfd)
            try:
                os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                os.unlink(temp, dir_fd=dfd)
                raise
        except OSError as exc:
            raise op_error(exc, "make symlink", path)
        finally:
            os.close(dfd)

    def set_mode(self, path: str, mode: int) -> None:
        """chmod a file or directory; a symlink (which has no mode of its own) is left as is."""
        dfd, name = self.parent_fd(path)
        try:
            st = os.lstat(name, dir_fd=dfd)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(name, mode & 0o7777, dir_fd=dfd)
        except OSError as exc:
            raise op_error(exc, "set mode of", path)
        finally:
            os.close(dfd)


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


class PendingFile:
    """A temporary file being written; `commit` renames it over the target, `abort` removes it."""

    def __init__(self, path: str, dfd: int, name: str, temp: str, fd: int) -> None:
        self.path = path
        self.dfd = dfd
        self.name = name
        self.temp = temp
        self.fd = fd
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            raise op_error(exc, "write", self.path)

    def commit(self, mode: int) -> os.stat_result:
        """Set `mode`, rename over the target, and return the new file's stat."""
        try:
            os.fchmod(self.fd, mode & 0o7777)
            st = os.fstat(self.fd)
            os.close(self.fd)
            self.fd = -1
            try:
                target = os.lstat(self.name, dir_fd=self.dfd)
            except FileNotFoundError:
                target = None
            if target is not None and stat.S_ISDIR(target.st_mode):
                raise OpError(ErrorCode.TYPE_CONFLICT, "{} is a directory".format(self.path))
            os.rename(self.temp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        except OSError as exc:
            self.abort()
            raise op_error(exc, "replace", self.path)
        except OpError:
            self.abort()
            raise
        os.close(self.dfd)
        self.dfd = -1
        return st

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dfd >= 0:
            try:
                os.unlink(self.temp, dir_fd=self.dfd)
            except OSError:
                pass
            os.close(self.dfd)
            self.dfd = -1
