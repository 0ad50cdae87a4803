"""Opening the one SSH connection and starting the agent on it.

`connect` honours ~/.ssh/config (or the files given with -F): Host aliases, HostName,
User, Port, IdentityFile, ProxyJump, UserKnownHostsFile; it uses the ssh agent and verifies
the host key against known_hosts. An unknown key is refused unless the user asked to accept
a new key on first use, in which case it is appended to the user's known_hosts; a changed
key, and a key marked @revoked, are always refused; `UserKnownHostsFile none` means no key
is known (every key is unknown), never "do not verify". Channel windows are sized so that a
long link is not window-bound.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import asyncssh

from lsync.client.bootstrap import MAX_INITIAL, remote_command
from lsync.client.errors import ConnectError, HostKeyError
from lsync.client.streams import SshAgentStream
from lsync.client.target import Target as Target  # (re-exported: callers say ssh.Target)

# 64 MiB: at 300 ms round trip one channel then carries > 200 MiB/s before its window stalls.
CHANNEL_WINDOW = 64 << 20
MAX_PACKET = 256 << 10


class _TofuClient(asyncssh.SSHClient):
    """Accepts a host key only when asked to and the host has no key on record at all."""

    def __init__(self, accept_new: bool, known_hosts_files: list[str]) -> None:
        self.accept_new = accept_new
        self.known_hosts_files = known_hosts_files
        self.accepted: tuple[str, int, asyncssh.SSHKey] | None = None
        self.rejected_reason = ""

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        if _is_revoked(self.known_hosts_files, host, addr, port, key):
            self.rejected_reason = (
                f"the host key of {host} ({key.get_fingerprint()}) is marked @revoked in "
                "known_hosts; refusing to connect.")
            return False
        if _host_has_keys(self.known_hosts_files, host, addr, port):
            self.rejected_reason = (
                f"the host key of {host} has CHANGED (it is not the one in known_hosts); "
                "refusing to connect. If the change is expected, remove the old key with "
                f"`ssh-keygen -R {host}`.")
            return False
        if not self.accept_new:
            self.rejected_reason = (
                f"the host key of {host} is unknown ({key.get_fingerprint()}); refusing to "
                "connect. Connect once with ssh to check and record it, or pass "
                "--accept-new-host-key to trust it on first use.")
            return False
        self.accepted = (host, port, key)
        return True


def _matches(files: list[str], host: str, addr: str, port: int | None) -> list[Any]:
    """asyncssh's known_hosts match for each readable file in `files`."""
    found = []
    for name in files:
        path = Path(name).expanduser()
        if not path.exists():
            continue
        try:
            known = asyncssh.read_known_hosts(str(path))
        except (OSError, ValueError):
            continue
        found.append(known.match(host, addr, port))
    return found


def _no_known_keys(host: str, addr: str, port: int | None) -> tuple[list[Any], ...]:
    """known_hosts as a callable that knows no key (asyncssh then asks the client)."""
    return [], [], []


def _host_has_keys(files: list[str], host: str, addr: str, port: int) -> bool:
    return any(match[0] or match[1] for match in _matches(files, host, addr, port))


def _is_revoked(files: list[str], host: str, addr: str, port: int,
                key: asyncssh.SSHKey) -> bool:
    """Whether known_hosts marks `key` @revoked for this host. (asyncssh's own lookup
    drops the `[host]:port` entries when they hold only revoked keys and retries without the
    port, so those entries are looked up here by their literal names too.)"""
    wanted = key.export_public_key()
    matches = _matches(files, host, addr, port)
    if port and port != 22:
        for name in {f"[{host}]:{port}", f"[{addr}]:{port}"}:
            matches += _matches(files, name, "", None)
    return any(revoked.export_public_key() == wanted
               for match in matches for revoked in match[2])


def _record_key(path: str, host: str, port: int, key: asyncssh.SSHKey) -> None:
    name = host if port == 22 else f"[{host}]:{port}"
    line = f"{name} {key.export_public_key().decode('ascii').strip()}\n"
    target = Path(path).expanduser()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(target, "a", encoding="ascii") as handle:
        handle.write(line)


def _known_hosts_files(options: asyncssh.SSHClientConnectionOptions) -> list[str]:
    """The known_hosts files asyncssh will check: UserKnownHostsFile, else the default;
    none at all for `UserKnownHostsFile none`."""
    configured = getattr(options, "known_hosts", ())
    if configured is None:
        return []
    if isinstance(configured, (list, tuple)) and configured and all(
            isinstance(f, str) for f in configured):
        return [os.path.expanduser(f) for f in configured]
    return [os.path.expanduser("~/.ssh/known_hosts")]


async def connect(target: Target, config_files: list[str] | None, accept_new: bool,
                  connect_timeout: float = 30.0) -> asyncssh.SSHClientConnection:
    assert target.host is not None
    config: list[str] | tuple[()] = list(config_files) if config_files else ()
    # SSH keepalives notice a dead TCP path even when the agent link is quiet.
    kwargs: dict[str, Any] = {"config": config, "connect_timeout": connect_timeout,
                              "keepalive_interval": 10, "keepalive_count_max": 3}
    if target.user:
        kwargs["username"] = target.user
    try:
        options = asyncssh.SSHClientConnectionOptions(host=target.host, **kwargs)
    except (OSError, asyncssh.Error, ValueError) as exc:
        raise ConnectError(f"cannot read the SSH configuration: {exc}") from None
    known_files = _known_hosts_files(options)
    if options.known_hosts is None:
        # `UserKnownHostsFile none`: asyncssh would skip host-key checking altogether.
        # OpenSSH still verifies (against no known key): so do we.
        options = asyncssh.SSHClientConnectionOptions(options=options, known_hosts=_no_known_keys)
    client = _TofuClient(accept_new, known_files)
    try:
        conn = await asyncssh.connect(target.host, options=options,
                                      client_factory=lambda: client)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyError(client.rejected_reason or f"host key not verified: {exc}") from None
    except asyncssh.PermissionDenied as exc:
        raise ConnectError(f"SSH authentication to {target.host} failed: {exc}") from None
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise ConnectError(f"cannot connect to {target.host}: {exc}") from None
    if client.accepted is not None and known_files:
        host, port, key = client.accepted
        _record_key(known_files[0], host, port, key)
    return conn


async def start_agent(conn: asyncssh.SSHClientConnection, stream: SshAgentStream) -> None:
    """Open the exec channel that runs the bootstrap loader and, through it, the agent.

    Whatever was written to `stream` before this call travels inside the exec request.
    """
    try:
        await stream.open(conn, remote_command, MAX_INITIAL, CHANNEL_WINDOW, MAX_PACKET)
    except (OSError, asyncssh.Error) as exc:
        raise ConnectError(f"cannot start the agent: {exc}") from None
