"""The client's error vocabulary, grouped by what the user can do about it.

Foreign exceptions (asyncssh, OSError, the protocol's) are mapped into these at the few
places where they enter the client; the CLI prints `str(error)` and exits with
`error.exit_status`, never a traceback.
"""

from __future__ import annotations


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


class SafetyStop(LsyncError):
    """lsync stopped rather than mirror a vanished or emptied local tree."""

    exit_status = 6
