"""Validation of paths as they appear on the wire.

A wire path is a relative POSIX path: '/'-separated, no empty, '.' or '..' components, no
NUL byte, not absolute, valid UTF-8 (names that are not are skipped by the client with a
warning), and not longer than `MAX_PATH_BYTES`. Both ends check every path with
`relpath_problem`; the agent additionally refuses to pass through symlinks when it resolves
one. A symlink target (`link_target_problem`) and the root named by Hello (`root_problem`)
are free text but never hold a NUL byte, which no system call could take.
"""

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


def relpath_problem(path: str) -> str:
    """Return why `path` is not an acceptable wire path, or '' when it is."""
    if not path:
        return "empty path"
    if "\x00" in path:
        return "path contains a NUL byte"
    if path.startswith("/"):
        return "absolute path"
    try:
        encoded = path.encode("utf-8")
    except UnicodeError:
        return "path is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return "path too long"
    # Fast path (every path of a tree walk comes through here): look at the components only
    # when the whole could hide a bad one.
    padded = "/" + path + "/"
    if "//" not in padded and "/./" not in padded and "/../" not in padded \
            and len(encoded) <= MAX_NAME_BYTES:
        return ""
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return "path component {!r} not allowed".format(part)
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return "path component too long"
    return ""


def link_target_problem(target: str) -> str:
    """Return why `target` cannot be a symlink's target, or '' when it can.

    Any text the filesystem can store: not empty, no NUL byte, at most `MAX_PATH_BYTES`
    bytes of UTF-8. (A target may be absolute or climb with '..': a symlink is never
    followed by the agent, whatever it points at.)
    """
    if not target:
        return "empty link target"
    if "\x00" in target:
        return "link target contains a NUL byte"
    try:
        encoded = target.encode("utf-8")
    except UnicodeError:
        return "link target is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return "link target too long"
    return ""


def root_problem(root: str) -> str:
    """Return why `root` (a Hello's root, a path on the agent's host) is unusable, or ''."""
    if "\x00" in root:
        return "root contains a NUL byte"
    try:
        encoded = root.encode("utf-8")
    except UnicodeError:
        return "root is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return "root path too long"
    return ""


def shown(text: str, limit: int = 200) -> str:
    """`text` quoted for a message: control characters escaped, at most about `limit`."""
    if len(text) > limit:
        return repr(text[:limit]) + "... ({} characters)".format(len(text))
    return repr(text)


def parent_of(path: str) -> str:
    """The wire path of the parent directory, '' for a top-level entry."""
    head, _, _ = path.rpartition("/")
    return head


def is_within(path: str, directory: str) -> bool:
    """True when `path` equals `directory` or lies below it ('' is the root)."""
    if not directory:
        return True
    return path == directory or path.startswith(directory + "/")
