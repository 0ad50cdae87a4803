"""The TCP connection to a host, opened while the client is still importing asyncssh.

A new TCP connection costs a round trip before the server's first byte can leave it, and
lsync spends about 0.3 s importing asyncssh and its own session code before it can start
the SSH handshake. So `lsync connect` starts each target's TCP connection first
(`start`, in a thread), and the SSH handshake takes it over (`take`) instead of opening its
own.

The address is a guess: the host as written, resolved through the simple part of the SSH
configuration (`Host` blocks, `HostName`, `Port`). Anything this module does not evaluate
(`Match`, `Include`, `%` tokens other than `%h`, a proxy, a jump host, a bind address, an
address family, host-name canonicalization) makes it guess nothing. And `take` hands over
the socket only when asyncssh's own reading of the configuration leads to the same host
and port with nothing in between; otherwise the early connection is closed unused, and
asyncssh connects as it always did. So a wrong guess costs one short-lived connection,
never a connection to the wrong place. Standard library only (no asyncssh import here).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PORT = 22
CONNECT_TIMEOUT = 30.0
_LINE = re.compile(r"([^\s=]+)\s*(?:=|\s)\s*(.*)")  # keyword, then "=" or blanks, then arguments
# Keywords that change how (or whether) the TCP connection is made, or that this reader
# cannot evaluate: with any of them in play there is no guess.
_NO_GUESS = frozenset({
    "match", "include", "proxycommand", "proxyjump", "bindaddress", "bindinterface",
    "addressfamily", "canonicalizehostname", "canonicaldomains",
})


def _config_files(config_files: list[str] | None) -> list[Path]:
    if config_files:
        return [Path(name).expanduser() for name in config_files]
    return [Path("~", ".ssh", "config").expanduser()]  # asyncssh's default, like OpenSSH's


def _host_matches(host: str, patterns: list[str]) -> bool:
    """OpenSSH's `Host` rule: some pattern matches and no negated one does."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(host.lower(), pattern[1:].lower() if negated else pattern.lower()):
            if negated:
                return False
            matched = True
    return matched


def _words(line: str) -> list[str] | None:
    """A configuration line as its keyword and arguments; [] for a blank line or a
    comment; None when it cannot be read (its quotes do not close)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return []
    found = _LINE.fullmatch(text)
    if found is None:
        return [text]  # a keyword alone
    try:
        return [found.group(1), *shlex.split(found.group(2), comments=True)]
    except ValueError:
        return None


def guess_address(host: str, config_files: list[str] | None) -> tuple[str, int] | None:
    """(host name, port) that the SSH configuration names for `host`, when only its
    simple part applies; None when the guess could be wrong or the files cannot be read."""
    hostname: str | None = None
    port: int | None = None
    for path in _config_files(config_files):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeError):
            return None
        active = True  # lines before the first Host block apply to every host
        for line in text.splitlines():
            words = _words(line)
            if words is None:
                return None
            if not words:
                continue
            keyword, args = words[0].lower(), words[1:]
            if keyword == "host":
                active = _host_matches(host, args)
            elif keyword in _NO_GUESS and (active or keyword in ("match", "include")):
                return None
            elif active and keyword == "hostname" and hostname is None and args:
                if "%" in args[0].replace("%h", "").replace("%%", ""):
                    return None
                hostname = args[0].replace("%h", host).replace("%%", "%")
            elif active and keyword == "port" and port is None and args:
                try:
                    port = int(args[0])
                except ValueError:
                    return None
    return hostname or host, port if port is not None else DEFAULT_PORT


@dataclass
class Preconnect:
    """One early TCP connection to `address`, made in a daemon thread."""

    address: tuple[str, int]
    timeout: float = CONNECT_TIMEOUT
    sock: socket.socket | None = None
    error: OSError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False

    def start(self) -> None:
        threading.Thread(target=self._connect, name="lsync-preconnect", daemon=True).start()

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
            sock.settimeout(None)
        except OSError as exc:
            self.error = exc
        else:
            with self.lock:
                if self.abandoned:
                    sock.close()
                else:
                    self.sock = sock
        finally:
            self.done.set()

    def result(self) -> socket.socket:
        """The connected socket, now the caller's, once `done`; raises the connection's
        OSError (connecting again to the same address would fail alike)."""
        assert self.done.is_set()
        if self.error is not None:
            raise self.error
        with self.lock:
            sock, self.sock = self.sock, None
            self.abandoned = True
        if sock is None:
            raise ConnectionAbortedError(f"the connection to {self.address[0]} port "
                                         f"{self.address[1]} was closed before its use")
        return sock

    def close(self) -> None:
        with self.lock:
            self.abandoned = True
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


_started: dict[tuple[str, tuple[str, ...]], Preconnect] = {}


def start(host: str, config_files: list[str] | None) -> None:
    """Open the TCP connection to `host` early, when its address can be guessed (once per
    host and configuration)."""
    key = (host, tuple(config_files or ()))
    if key in _started or os.environ.get("LSYNC_NO_PRECONNECT"):
        return
    address = guess_address(host, config_files)
    if address is None:
        return
    early = _started[key] = Preconnect(address)
    early.start()


def take(host: str, config_files: list[str] | None, options: Any) -> Preconnect | None:
    """The early connection for `host`, when asyncssh's `options` (an
    SSHClientConnectionOptions) connect to exactly its address, directly; None otherwise
    (the early connection, if any, is then closed). Its `result` is the caller's to take."""
    early = _started.pop((host, tuple(config_files or ())), None)
    if early is None:
        return None
    direct = (not getattr(options, "tunnel", None)
              and not getattr(options, "proxy_command", None)
              and not getattr(options, "local_addr", None)
              and getattr(options, "family", socket.AF_UNSPEC) == socket.AF_UNSPEC
              and not (getattr(options, "canonicalize_hostname", False)
                       and getattr(options, "canonical_domains", ())))
    if not direct or (getattr(options, "host", None), getattr(options, "port", None)) != (
            early.address[0], early.address[1]):
        early.close()
        return None
    return early


def close_all() -> None:
    """Close every early connection no SSH handshake took (at the command's end)."""
    while _started:
        _, early = _started.popitem()
        early.close()
