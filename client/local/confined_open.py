"""Paths below a local root, reached without ever resolving a symlink.

Promises:
- `open_parent(root, rel)` opens the directory that holds `rel`'s last component (a `Parent`:
  `fd` and `name`), and `lstat_below(root, rel)` lstats `rel` (with a link's target). Both
  reach it from `root` without following a symlink in any component and without leaving
  `root`: `rel` must be relative, with no empty, "." or ".." component (ValueError
  otherwise). A symlink or a non-directory on the way is OSError ELOOP or ENOTDIR, a missing
  directory ENOENT, as with `open(part, O_NOFOLLOW|O_DIRECTORY)`.
- Where Linux's openat2(2) is available (5.6 and later, x86_64 and aarch64), the walk is one
  openat2 call relative to the root's descriptor, with RESOLVE_NO_SYMLINKS (no symlink in any
  component), RESOLVE_BENEATH (nothing outside the root) and RESOLVE_NO_MAGICLINKS;
  `lstat_below` opens `rel` itself with O_PATH|O_NOFOLLOW (a trailing symlink is then opened
  as the link) and fstats it. Elsewhere, or when the kernel or a seccomp filter refuses
  openat2 (ENOSYS, EPERM, EINVAL), every component is opened with O_NOFOLLOW|O_DIRECTORY
  relative to the previous one. Whether openat2 works is probed once per process
  (`openat2_available`); `openat2_enabled = False` forces the component walk (for tests).
- The root itself may be a symlink; it is resolved as open(2) resolves it, once per call,
  and its descriptor is closed when the call no longer holds it (a call holds the `_Root`
  whose `fd` it uses). No descriptor outlives a call: one kept open would pin the local
  filesystem, so that a lazily unmounted tree would never tell the watcher (and lsync must
  stop then). Thread-safe.
- openat2 checks permissions as stat(2) does: search (x) on the directories on the way; the
  component walk also needs read permission on each. A parent is opened for reading either way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
from collections.abc import Callable
from pathlib import Path

openat2_enabled = True  # False: always walk component by component (tests compare the two)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437}

OpenAt2 = Callable[[int, bytes, int], int]
_LINK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # the path itself, even a symlink


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _bind_openat2() -> OpenAt2 | None:
    """openat2(dir_fd, path, flags) for DIR_FLAGS and _LINK_FLAGS with our resolve flags,
    raising OSError; None where the syscall number is not known to be openat2's."""
    number = _SYS_OPENAT2.get(platform.machine())
    if sys.platform != "linux" or number is None or sys.maxsize <= 2**32:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    # No argtypes (converting them costs a third of the call): the number and the size go
    # as C longs built once, the path as char *, dir_fd as a C int (libffi widens it with
    # its sign, and the kernel reads an int), `how` by reference to structs built once.
    resolve = _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS
    structs = [_OpenHow(flags, 0, resolve) for flags in (DIR_FLAGS, _LINK_FLAGS)]
    hows = {int(how.flags): ctypes.byref(how) for how in structs}  # keep them alive
    c_number = ctypes.c_long(number)
    c_size = ctypes.c_size_t(ctypes.sizeof(_OpenHow))

    def openat2(dir_fd: int, path: bytes, flags: int) -> int:
        fd: int = syscall(c_number, dir_fd, path, hows[flags], c_size)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return fd

    return openat2


def _probe() -> OpenAt2 | None:
    """The openat2 binding if it works here (kernel, seccomp filter), else None."""
    openat2 = _bind_openat2()
    if openat2 is None:
        return None
    try:
        top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.close(openat2(top, b".", DIR_FLAGS))
        os.close(openat2(top, b".", _LINK_FLAGS))
    except OSError:
        return None  # ENOSYS (before 5.6), EPERM (seccomp), EINVAL (unknown flags)...
    finally:
        os.close(top)
    return openat2


_openat2 = _probe()


def openat2_available() -> bool:
    """Whether open_parent uses openat2 (unless `openat2_enabled` is False)."""
    return _openat2 is not None


_NOT_NAMES = frozenset({"", ".", ".."})


def check_rel(rel: str) -> list[str]:
    """The components of `rel`; ValueError unless it is a plain relative path."""
    parts = rel.split("/")
    if not _NOT_NAMES.isdisjoint(parts):  # also "" and "/..." (an empty component)
        raise ValueError(f"not a relative path: {rel!r}")
    return parts


# --- root descriptors -----------------------------------------------------------------------

class _Root:
    """A descriptor of a root directory, closed when the last reference to it goes: a call
    holds one while it uses `fd`, so the number cannot be closed and reused under it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


def _root(root: Path) -> _Root:
    """A descriptor of the directory now at `root`, opened for this call alone: a
    descriptor kept between calls would pin the filesystem, and a lazily unmounted local
    tree would then never report its unmount to the watcher (lsync must stop then)."""
    fd = os.open(os.fspath(root), _ROOT_FLAGS)
    return _Root(fd)


# --- the walk -------------------------------------------------------------------------------


class Parent:
    """The open directory `fd` that holds `name`, the last component of a relative path.
    `close()` it (or use it as a context manager), never `fd` itself: it may be the root's
    kept descriptor."""

    __slots__ = ("_root", "fd", "name")

    def __init__(self, fd: int, name: str, root: _Root | None) -> None:
        self.fd = fd
        self.name = name
        self._root = root  # set when fd is the root's: holding it keeps fd open

    def close(self) -> None:
        if self._root is None and self.fd >= 0:
            os.close(self.fd)
        self._root = None
        self.fd = -1

    def __enter__(self) -> Parent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_parent(root: Path, rel: str) -> Parent:
    """rel's parent directory, reached without following symlinks, and rel's last
    component. Raises OSError (ENOENT, ENOTDIR, ELOOP...) on the way."""
    parts = check_rel(rel)
    top = _root(root)
    if len(parts) == 1:
        return Parent(top.fd, rel, top)
    return Parent(_open_below(top.fd, rel.rpartition("/")[0], parts[:-1]), parts[-1], None)


def lstat_below(root: Path, rel: str) -> tuple[os.stat_result, str | None]:
    """lstat of `rel` reached without following symlinks, and its target when it is a
    link. Raises OSError (ENOENT, ENOTDIR, ELOOP...; EINVAL when the path stopped being a
    link between the lstat and the readlink of the component walk)."""
    parts = check_rel(rel)
    top = _root(root)
    openat2 = _openat2 if openat2_enabled and len(parts) > 1 else None
    # With RESOLVE_NO_SYMLINKS, O_PATH|O_NOFOLLOW opens a trailing symlink itself.
    fd = None if openat2 is None else _openat2_or_none(openat2, top.fd, rel)
    if fd is None:
        return _lstat_walking(top.fd, parts)
    try:
        st = os.fstat(fd)
        # The descriptor is the link itself: it cannot stop being one.
        return st, os.readlink("", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
    finally:
        os.close(fd)


def _lstat_walking(root_fd: int, parts: list[str]) -> tuple[os.stat_result, str | None]:
    fd = _walk(root_fd, parts[:-1]) if len(parts) > 1 else root_fd
    try:
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            return st, None
        return st, os.readlink(parts[-1], dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def _open_below(root_fd: int, path: str, parts: list[str]) -> int:
    """Open directory `path` (split into `parts`) below `root_fd` without following links."""
    openat2 = _openat2 if openat2_enabled else None
    if openat2 is not None:
        fd = _openat2_or_none(openat2, root_fd, path, DIR_FLAGS)
        if fd is not None:
            return fd
    return _walk(root_fd, parts)


def _openat2_or_none(openat2: OpenAt2, root_fd: int, path: str,
                     flags: int = _LINK_FLAGS) -> int | None:
    """openat2 of `path` below `root_fd`, or None when the component walk must answer."""
    global _openat2
    for _attempt in range(3):
        try:
            return openat2(root_fd, os.fsencode(path), flags)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                continue  # a racing rename (RESOLVE_BENEATH), a signal: try again
            if exc.errno == errno.ENOSYS:
                _openat2 = None  # gone after all (a filter installed since): walk
            elif exc.errno == errno.EXDEV:  # would leave the root: only through a link
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from exc
            elif exc.errno not in (errno.EPERM, errno.EINVAL):
                raise
            # EPERM may be a filter, EINVAL flags this kernel refuses: let the walk say
            # (never report a path as gone on the word of a refused call).
            return None
    return None


def _walk(root_fd: int, parts: list[str]) -> int:
    """Open the directory `parts` below `root_fd` one component at a time, O_NOFOLLOW."""
    fd = os.open(parts[0], DIR_FLAGS, dir_fd=root_fd)
    try:
        for part in parts[1:]:
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd
