"""Where the control socket of a running `lsync connect` lives (see lsync.client.buildloop.control).

One Unix socket per local tree, in `$XDG_RUNTIME_DIR/lsync/` when that is set and
ours (owned by us, not group- or world-writable), else in `~/.cache/lsync/run/` (honouring
`$XDG_CACHE_HOME`; created mode 0700; a directory not owned by us or group/world-writable
is refused). The file name is a readable tail of the tree's name and a hash of its resolved
path (`linux-3f2a9c0d1e5b7a64.sock`), so `find_socket` finds the session from any
directory inside the tree by walking up. A lock file beside it (`….lock`, flock) is held
for the session's lifetime: two sessions cannot race for one tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from lsync.client.buildloop.control import ControlError
from lsync.client.errors import log_dir

_SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the terminating NUL (Linux)


def _private_problem(path: Path, *, follow: bool) -> str:
    """'' when `path` is a directory owned by us that nobody else can write; else why not."""
    try:
        st = path.stat() if follow else path.lstat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} is not owned by us (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _private_dir(path: Path, *, create: bool) -> str:
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            return f"{path}: cannot create: {exc.strerror}"
    return _private_problem(path, follow=False)


def _socket_dirs(*, create: bool, problems: list[str]) -> Iterator[Path]:
    """The usable socket directories, best first (each created when `create` and checked
    when reached); why the others are not usable is appended to `problems`. Without
    `create` (looking for a session) `/run/user/UID` stands in for an unset
    XDG_RUNTIME_DIR, which a second terminal (su, tmux, ssh) may lack."""
    runtimes = [os.environ.get("XDG_RUNTIME_DIR", "")]
    if not create:
        runtimes.append(f"/run/user/{os.geteuid()}")
    seen: set[str] = set()
    for runtime in runtimes:
        if not runtime or not os.path.isabs(runtime) or runtime in seen:
            continue
        seen.add(runtime)
        if not create and not os.path.isdir(os.path.join(runtime, "lsync")):
            continue
        problem = _private_problem(Path(runtime), follow=True)
        if not problem:
            problem = _private_dir(Path(runtime) / "lsync", create=create)
        if problem:
            problems.append(problem)
        else:
            yield Path(runtime) / "lsync"
    cache = log_dir() / "run"
    problem = _private_dir(cache, create=create)
    if problem:
        problems.append(problem)
    else:
        yield cache


def _socket_name(root: Path) -> tuple[str, str]:
    """(readable name, short name) of the socket of the tree at `root` (resolved)."""
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", root.name)[:24].lstrip(".") or "root"
    return f"{tail}-{digest}.sock", f"{digest}.sock"


def _fit(directory: Path, root: Path) -> Path:
    for name in _socket_name(root):
        path = directory / name
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            return path
    raise ControlError("path-too-long", f"{directory} is too long a directory for a Unix "
                       "socket; set XDG_RUNTIME_DIR to a shorter private directory")


def socket_path(local_root: Path) -> Path:
    """Where the session of the tree at `local_root` listens (its directory is created)."""
    problems: list[str] = []
    for directory in _socket_dirs(create=True, problems=problems):
        return _fit(directory, local_root.expanduser().resolve())
    raise ControlError("unsafe-dir", "no private directory for the control socket: "
                       + "; ".join(problems))


def find_socket(start: Path) -> Path | None:
    """The socket of the nearest tree, from `start` up to `/`, with a live session (one
    that accepts a connection); else the nearest socket file of a tree; else None. Looks
    in both socket directories (a second terminal may lack XDG_RUNTIME_DIR). Creates
    nothing."""
    here = start.expanduser().resolve()
    if not here.is_dir():
        here = here.parent
    directories = list(_socket_dirs(create=False, problems=[]))
    nearest: Path | None = None
    for tree in (here, *here.parents):
        for directory in directories:
            try:
                path = _fit(directory, tree)
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    continue
            except (ControlError, OSError):
                continue
            if _answers(path):
                return path
            nearest = nearest or path
    return nearest


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fsencode(path))
        except OSError:
            return False
    return True
