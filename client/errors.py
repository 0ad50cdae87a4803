"""The client's error vocabulary, grouped by what the user can do about it.

Foreign exceptions (asyncssh, OSError, the protocol's) are mapped into these where they
enter the client (ssh.py, streams.py, link.py); the CLI prints `str(error)` and exits with
`error.exit_status`, never a traceback. Three kinds, by what can be done about them:
*closed* (the user stopped lsync: exit 0), *broken by the world* (`ConnectError`,
`LinkBroken`: reconnect with backoff, or report), and *internal* (`InternalError`, a bug in
lsync: never retried, reported in one line, the traceback kept in a log file). Anything else
that reaches the CLI is mapped to `InternalError` there, the last boundary.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from pathlib import Path


class LsyncError(Exception):
    """Base of every error the client reports to the user."""

    exit_status = 1


class UsageError(LsyncError):
    """The command line or a local path is wrong."""

    exit_status = 2


class ConnectError(LsyncError):
    """The SSH connection or the agent could not be started."""

    exit_status = 3


class HostKeyError(ConnectError):
    """The host key is unknown or changed; nothing was sent."""

    exit_status = 4


class LinkBroken(LsyncError):
    """The connection to the agent broke during the session."""

    exit_status = 5


class Abandoned(LsyncError):
    """Stopped at once (a second Ctrl-C) with changes a target had not confirmed."""

    exit_status = 130  # (as a shell says of a command ended by SIGINT)


class SafetyStop(LsyncError):
    """lsync stopped rather than mirror a vanished or emptied local tree."""

    exit_status = 6


class InternalError(LsyncError):
    """A bug in lsync (or in something it relies on) ended the session; never retried.
    The traceback went to `log_path` (see lsync.client.cli)."""

    exit_status = 70  # EX_SOFTWARE

    def __init__(self, message: str, log_path: str = "") -> None:
        super().__init__(message)
        self.log_path = log_path


def log_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lsync"


def _append_log(text: str) -> Path:
    """Append `text` (a line stamped with the time and pid) to ~/.cache/lsync/client.log;
    its path. Raises OSError."""
    path = log_dir() / "client.log"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{datetime.datetime.now().isoformat()} pid {os.getpid()}: {text}")
    return path


def log_event(text: str) -> None:
    """Append one line to client.log (best effort): something a later report may need to
    be explained, that is no error of the session's."""
    with contextlib.suppress(OSError):
        _append_log(text + "\n")


def internal_error(context: str, exc: BaseException) -> InternalError:
    """`exc`, an exception nothing expected, as an `InternalError`: its traceback is
    appended to ~/.cache/lsync/client.log (best effort), the message names the log."""
    try:
        path = _append_log(f"{context}\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))
        where = f"; details in {path}"
    except OSError:
        where = ""
    return InternalError(f"internal error while {context}: {type(exc).__name__}: {exc}"
                         f"{where} (please report it)", str(path) if where else "")
