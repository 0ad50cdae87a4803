"""Remote edits of what lsync wrote are kept aside, never silently overwritten.

Someone may edit, on the build host, a file that lsync put there. Local always wins, but
nothing on the remote is lost without a word: `Keeper` is the root's `ReplaceGuard`, asked
right before an entry is replaced (a write's rename, a symlink, a rename onto it) or
deleted. When the record (lsync.agent.records) says lsync wrote a file or a symlink at that
path and what is there now is not that — other content, another link target, or another
kind of entry than lsync made — the version there is kept under `KEPT_DIR`:

    .lsync/kept/<n>/<path>      one numbered directory per keep (1, 2, ...), which holds
                                the entry at its own path, with its own name and mode

A replacement hard-links it there first (so the path never goes missing: a build sees the
remote edit or the local version, never nothing) and a delete moves it there; where a hard
link or a move cannot be made (another filesystem, one without hard links) it is copied.
A keep that fails refuses the operation (the remote edit stays where it is, the client
retries and reports the error), so nothing is overwritten without being kept first. What
lsync did not write (no record) and directories are left to the operation as before.

Why there: the kept tree is one hidden directory at the root, which builds and tools skip
(like .git), and which the agent's manifest never lists (lsync.agent.manifest), so the
client never counts a kept copy as a remote extra nor deletes it, even with --delete; no
operation may write in it (lsync.agent.confined refuses). Kept copies keep their names, so
`diff .lsync/kept/3/src/main.c src/main.c` is the merge's starting point.

Crash safety needs no journal: a kept copy is a directory entry made (link or rename)
before the path is replaced or removed, so an agent killed between the two leaves both the
kept copy and the remote version (at worst one edit kept twice); the listing comes from
the directory itself, never from a record. Each keep is told to the client (`take`, as a
`Kept` message before the operation's answer), and `listing` lists every kept version for
a new session.

Files up to `VERIFY_MAX` are hashed before every replacement, whatever the digest cache
says (a same-size edit with its mtime put back is seen); bigger ones trust the cache's
stat key (size, mtime, inode). An edit that lands between the last look and the rename
(microseconds) is not seen. Any thread (the write pool replaces files too); Python 3.6 and
the standard library only.
"""

import errno
import os
import re
import stat
import threading
from typing import Any, Callable, List, Optional, Tuple

from lsync.agent.confined import DIR_FLAGS, file_key, iter_fd
from lsync.agent.records import DigestRecord
from lsync.agent.refusals import OpError, ReplaceGuard, op_error
from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode
from lsync.protocol.paths import relpath_problem, shown

VERIFY_MAX = 1 << 20  # files up to this size are hashed before they are replaced
_NUMBER = re.compile(r"[1-9][0-9]{0,17}\Z")
LOOKS = 3  # a file that changes while it is looked at is looked at again, this many times
_READ_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
               | getattr(os, "O_CLOEXEC", 0))
_COPY_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
               | getattr(os, "O_CLOEXEC", 0))


class Keeper(ReplaceGuard):
    """Keeps remote edits of what lsync wrote under KEPT_DIR of the root `root_fd`."""

    def __init__(self, root_fd: int, record: DigestRecord,
                 new_hasher: Callable[[], Any]) -> None:
        self.root_fd = root_fd
        self.record = record
        self.new_hasher = new_hasher
        self._lock = threading.Lock()
        self._kept: List[List[Any]] = []  # kept since the last `take`
        self._next = 0  # the number the next keep tries first (0: not looked yet)

    # -- ReplaceGuard -----------------------------------------------------------------------
    def before_replace(self, dfd: int, name: str, path: str, known: bytes) -> None:
        st = self._edited(dfd, name, path, known)
        if st is not None:
            self._keep(dfd, name, path, st, move=False)

    def before_delete(self, dfd: int, name: str, path: str) -> bool:
        st = self._edited(dfd, name, path, b"")
        if st is None:
            return False
        self._keep(dfd, name, path, st, move=True)
        return True

    def take(self) -> List[List[Any]]:
        """The `Kept` entries of the keeps since the last call (for the service's thread)."""
        with self._lock:
            kept, self._kept = self._kept, []
        return kept

    # -- is it a remote edit? -----------------------------------------------------------------
    def _edited(self, dfd: int, name: str, path: str, known: bytes
                ) -> Optional[os.stat_result]:
        """The lstat of entry `name` when it is a file or link lsync wrote at `path` and it
        no longer holds what lsync wrote (nor `known`); None when there is nothing to keep."""
        for _ in range(LOOKS):
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise op_error(exc, "look at", path)
            if stat.S_ISREG(st.st_mode):
                wrote, other = m.KIND_FILE, m.KIND_LINK
            elif stat.S_ISLNK(st.st_mode):
                wrote, other = m.KIND_LINK, m.KIND_FILE
            else:
                return None  # a directory, a special file: the operation's own business
            value = self.record.written(path, wrote, 0)
            if value is None:
                # lsync wrote nothing here (keep out of it), or the other kind (edited).
                return st if self.record.written(path, other, 0) is not None else None
            now = self._content(dfd, name, path, st)
            if now is None:
                continue  # it changed while being read
            try:
                again = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise op_error(exc, "look at", path)
            if _key(again) == _key(st):
                return st if now not in (value, known) else None
        raise OpError(ErrorCode.IO_ERROR, "{} keeps changing on the remote; not replaced "
                      "while it does".format(path))

    def _content(self, dfd: int, name: str, path: str, st: os.stat_result
                 ) -> Optional[bytes]:
        """A file's digest or a link's target (bytes); None when it changed meanwhile."""
        try:
            if stat.S_ISLNK(st.st_mode):
                return os.readlink(name, dir_fd=dfd).encode("utf-8", "surrogateescape")
            if st.st_size > VERIFY_MAX:
                cached = self.record.lookup(path, file_key(st))
                if cached is not None:
                    return cached
            fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EINVAL):
                return None  # replaced by another kind meanwhile: look again
            raise op_error(exc, "read", path)
        try:
            if _key(os.fstat(fd)) != _key(st):
                return None
            hasher = self.new_hasher()
            for chunk in iter_fd(fd):
                hasher.update(chunk)
            if _key(os.fstat(fd)) != _key(st):
                return None
            digest = hasher.digest()  # type: bytes
            return digest
        except OSError as exc:
            raise op_error(exc, "read", path)
        finally:
            os.close(fd)

    # -- keeping ------------------------------------------------------------------------------
    def _keep(self, dfd: int, name: str, path: str, st: os.stat_result, move: bool) -> None:
        """Link (or, `move`, rename) entry `name` to a new numbered place under KEPT_DIR,
        copying it when neither can be done; OpError when it cannot be kept at all."""
        kdfd, kname, kept_as = self._place(path)
        try:
            try:
                if move:
                    os.rename(name, kname, src_dir_fd=dfd, dst_dir_fd=kdfd)
                else:
                    os.link(name, kname, src_dir_fd=dfd, dst_dir_fd=kdfd,
                            follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK,
                                     getattr(errno, "ENOTSUP", errno.EPERM)):
                    raise
                _copy(dfd, name, kdfd, kname, st)
                if move:
                    os.unlink(name, dir_fd=dfd)
        except OSError as exc:
            raise OpError(ErrorCode.IO_ERROR, "cannot keep the remote edit of {} as {} ({}); "
                          "left as it is".format(path, kept_as, exc.strerror or exc))
        finally:
            os.close(kdfd)
        kind = m.KIND_LINK if stat.S_ISLNK(st.st_mode) else m.KIND_FILE
        with self._lock:
            self._kept.append([path, kept_as, kind, st.st_size, st.st_mtime_ns])

    def _place(self, path: str) -> Tuple[int, str, str]:
        """A new numbered directory under KEPT_DIR with `path`'s directories in it: an fd
        of the last one, the entry's name, and the wire path it is kept as."""
        parts = path.split("/")
        try:
            fd = self._open_kept(create=True)
            try:
                number = self._new_number(fd, path)
            except BaseException:
                os.close(fd)
                raise
            fd = _descend(fd, [str(number)] + parts[:-1], create=True)
        except OSError as exc:
            why = "{} is not a directory".format(m.KEPT_DIR) if exc.errno in (
                errno.ELOOP, errno.ENOTDIR) else exc.strerror or str(exc)
            raise OpError(ErrorCode.IO_ERROR, "cannot keep the remote edit of {} ({}); left "
                          "as it is".format(path, why))
        return fd, parts[-1], "{}/{}/{}".format(m.KEPT_DIR, number, path)

    def _new_number(self, fd: int, path: str) -> int:
        """Make the next free numbered directory in KEPT_DIR (`fd`); its number."""
        with self._lock:
            if not self._next:
                self._next = max(_numbers(fd), default=0) + 1
            number = self._next
            while True:
                problem = relpath_problem("{}/{}/{}".format(m.KEPT_DIR, number, path))
                if problem:
                    raise OpError(ErrorCode.BAD_PATH, "cannot keep the remote edit of {} "
                                  "({}); left as it is".format(shown(path), problem))
                try:
                    os.mkdir(str(number), 0o755, dir_fd=fd)
                    break
                except FileExistsError:
                    number += 1  # another agent's keep
            self._next = number + 1
        return number

    def _open_kept(self, create: bool) -> int:
        """An fd of KEPT_DIR (made when `create`), never through a symlink."""
        return _descend(os.dup(self.root_fd), m.KEPT_DIR.split("/"), create)

    # -- listing ------------------------------------------------------------------------------
    def listing(self, limit: int = m.MAX_KEPT_LISTED) -> List[List[Any]]:
        """Every kept version as `Kept` entries, newest keep first (at most `limit`)."""
        try:
            fd = self._open_kept(create=False)
        except (OSError, OpError):
            return []  # nothing kept yet (or no directory lsync can use)
        found: List[List[Any]] = []
        try:
            for number in sorted(_numbers(fd), reverse=True):
                if len(found) >= limit:
                    break
                prefix = "{}/{}/".format(m.KEPT_DIR, number)
                for rel, st in _walk(fd, str(number)):
                    kind = m.KIND_LINK if stat.S_ISLNK(st.st_mode) else m.KIND_FILE
                    if not relpath_problem(prefix + rel):
                        found.append([rel, prefix + rel, kind, st.st_size, st.st_mtime_ns])
        finally:
            os.close(fd)
        return found[:limit]


def _key(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)


def _descend(fd: int, parts: List[str], create: bool) -> int:
    """An fd of directory `parts` below `fd` (missing ones made when `create`), never
    through a symlink; `fd` is closed whatever happens."""
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _numbers(fd: int) -> List[int]:
    """The numbers of the numbered directories in the directory `fd`."""
    return [int(name) for name in os.listdir(fd) if _NUMBER.match(name)]


def _walk(parent: int, top: str) -> List[Tuple[str, os.stat_result]]:
    """(path below `top`, lstat) of every file and link below directory `top` of `parent`,
    sorted; never through a symlink."""
    out: List[Tuple[str, os.stat_result]] = []
    stack = [(parent, top, "")]
    opened: List[int] = []
    try:
        while stack:
            dfd, name, rel = stack.pop()
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
            except OSError:
                continue
            opened.append(fd)
            for entry in sorted(os.listdir(fd)):
                try:
                    st = os.lstat(entry, dir_fd=fd)
                except OSError:
                    continue
                below = rel + "/" + entry if rel else entry
                if stat.S_ISDIR(st.st_mode):
                    stack.append((fd, entry, below))
                elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    out.append((below, st))
    finally:
        for fd in opened:
            os.close(fd)
    out.sort(key=lambda item: item[0])
    return out


def _copy(dfd: int, name: str, kdfd: int, kname: str, st: os.stat_result) -> None:
    """Copy entry `name` of `dfd` (a file or a link) to `kname` of `kdfd`, mtime included."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dfd), kname, dir_fd=kdfd)
        return
    source = os.open(name, _READ_FLAGS, dir_fd=dfd)
    try:
        copy = os.open(kname, _COPY_FLAGS, stat.S_IMODE(st.st_mode) | 0o600, dir_fd=kdfd)
        try:
            for chunk in iter_fd(source):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(copy, view):]
            os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(copy)
    finally:
        os.close(source)
