"""Where to sync to: `[user@]host:tree`, or a local directory (no SSH).

Parsing only, as scp and rsync read their targets: a first colon before any slash separates
the host; no host means a local directory. Kept apart from lsync.client.ssh so that the
commands that do not connect (flush, run, status, the project file) need not load asyncssh.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """Where to sync to: `[user@]host:tree`, or a local directory when host is None."""

    host: str | None
    user: str | None
    tree: str

    @classmethod
    def parse(cls, text: str) -> Target:
        head, sep, tail = text.partition(":")
        if sep and "/" not in head and head:
            user, at, host = head.rpartition("@")
            return cls(host=host, user=user if at else None, tree=tail or ".")
        return cls(host=None, user=None, tree=text)

    def describe(self) -> str:
        if self.host is None:
            return self.tree
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.tree}"
