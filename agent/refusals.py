"""How an operation on the remote tree fails, and what it checks before it acts.

Every failure of an operation on the tree is an `OpError` carrying an `ErrorCode` the client
can act on and a one-line message; `op_error` is the one place an OSError becomes one (the
errno decides the code: missing, permission, full disk, type conflict, symlink in the way;
anything else is IO_ERROR), so no traceback and no other exception escapes for ordinary
filesystem trouble. `special_kind` names what lsync never opens nor replaces (a FIFO, a
socket, a device) and `refuse_special` refuses it with TYPE_CONFLICT. `ReplaceGuard` is what
is asked before an entry is replaced or deleted (this one lets everything go;
lsync.agent.keeping has the real one). Shared by lsync.agent.confined and
lsync.agent.tempfiles; nothing here resolves a path or touches the tree.
"""

import errno
import os
import stat
from typing import Optional

from lsync.protocol.errors import ErrorCode


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


def special_kind(mode: int) -> str:
    """'a FIFO', 'a socket', 'a device' for what lsync never opens nor replaces, else ''."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return ""


def refuse_special(st: Optional[os.stat_result], path: str) -> None:
    kind = special_kind(st.st_mode) if st is not None else ""
    if kind:
        raise OpError(ErrorCode.TYPE_CONFLICT, "{} is {}; lsync leaves alone what it did not "
                      "make".format(path, kind))


def lstat_at(dfd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return None


class ReplaceGuard(object):
    """What a `ConfinedRoot` asks before it replaces or deletes an entry; this one lets
    everything go (lsync.agent.keeping has the real one). Any thread."""

    def before_replace(self, dfd: int, name: str, path: str, known: bytes) -> None:
        """Entry `name` of directory `dfd` (wire path `path`) is about to be replaced;
        `known` is a digest of content the client has (b"": none). (Should the
        replacement then fail, what this did stays: a copy kept is never lost.)"""

    def before_delete(self, dfd: int, name: str, path: str) -> bool:
        """Entry `name` is about to be deleted: True when it was moved away instead."""
        return False
