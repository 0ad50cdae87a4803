"""Where to sync to: `[user@]host:tree`, or a local directory (no SSH).

Parsing only, as scp and rsync read their targets: a first colon before any slash separates
the host; no host means a local directory. Kept apart from lsync.client.transport.ssh so that the
commands that do not connect (flush, run, status, the project file) need not load asyncssh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A target's short name (`lsync flush --target NAME`, `lsync run --on NAME`, output prefixes).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def target_name(target: Target) -> str:
    """The default short name of a target: its host (alias) as written, or the last part
    of a local directory; what a name may not hold becomes "-"."""
    text = target.host if target.host is not None else (
        target.tree.rstrip("/").rpartition("/")[2] or "local")
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-")[:64]
    return name or "target"


def unique_names(names: list[str]) -> list[str]:
    """`names` with repeats made distinct: a second "box" is "box-2"."""
    taken: set[str] = set()
    out: list[str] = []
    for name in names:
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}-{count}"
        taken.add(unique)
        out.append(unique)
    return out
