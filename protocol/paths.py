"""Validation of paths as they appear on the wire.

A wire path is a relative POSIX path: '/'-separated, no empty, '.' or '..' components, no
NUL byte, not absolute, valid UTF-8 (names that are not are skipped by the client with a
warning), and not longer than `MAX_PATH_BYTES`. Both ends check every path with
`check_relpath`; the agent additionally refuses to pass through symlinks when it resolves one.
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


def parent_of(path: str) -> str:
    """The wire path of the parent directory, '' for a top-level entry."""
    head, _, _ = path.rpartition("/")
    return head


def is_within(path: str, directory: str) -> bool:
    """True when `path` equals `directory` or lies below it ('' is the root)."""
    if not directory:
        return True
    return path == directory or path.startswith(directory + "/")
