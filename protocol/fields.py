"""The checks of a message's fields (`SCHEMA` in lsync.protocol.messages), and the limits
and kinds they apply.

Each check takes a value as msgpack decoded it and says whether it is of the field's type
and within its limits; `decode_message` refuses a message any of whose fields fails. They
run on every message the agent receives, so the hot ones (a manifest of a whole tree) are
written out with exact types.
"""

from typing import Any, Callable

# Most paths one HashPaths may ask for (the client asks in batches of 2,000).
MAX_HASH_PATHS = 10000
# Most files one WriteBatch may carry; their contents together inflate to at most MAX_CHUNK.
MAX_BATCH_FILES = 4096
# Longest generation id of a kept listing (ListTree.since, ManifestBatch.base/generation).
MAX_GENERATION = 64

# Most rules one PullList may carry.
MAX_PULL_RULES = 256
# Bytes of a content digest (lsync.protocol.hashing.DIGEST_SIZE: both hashes are cut to it).
DIGEST_SIZE = 16

# Kinds of tree entries in a manifest.
KIND_FILE = "f"
KIND_DIR = "d"
KIND_LINK = "l"

FieldCheck = Callable[[Any], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_uint(value: Any) -> bool:
    return is_int(value) and value >= 0


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def is_bytes(value: Any) -> bool:
    return isinstance(value, bytes)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_opt_bytes(value: Any) -> bool:
    return value is None or isinstance(value, bytes)


def is_list(value: Any) -> bool:
    return isinstance(value, list)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_generation(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_GENERATION


def is_path_list(value: Any) -> bool:
    # An overlong list is refused by `request_problem` without looking at its items.
    return isinstance(value, list) and (len(value) > MAX_HASH_PATHS or is_str_list(value))


def is_digest_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_opt_bytes(v) for v in value)


def is_capabilities(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and is_str_list(v) for k, v in value.items()
    )


def is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def is_bool_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
    )


def is_uint_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_uint(v) for v in value)


def is_batch_files(value: Any) -> bool:
    if not isinstance(value, list) or not value or len(value) > MAX_BATCH_FILES:
        return False
    for item in value:
        if not (isinstance(item, list) and len(item) in (4, 5) and is_uint(item[0])
                and is_str(item[1]) and is_uint(item[2]) and is_uint(item[3])):
            return False
        if len(item) == 5 and not (isinstance(item[4], bytes) and len(item[4]) == DIGEST_SIZE):
            return False
    return True


def is_kept_entries(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 5 and is_str(entry[0])
                and is_str(entry[1]) and entry[2] in (KIND_FILE, KIND_LINK)
                and is_uint(entry[3]) and is_int(entry[4])):
            return False
    return True


def is_manifest_entries(value: Any) -> bool:
    """Whether `value` is a list of well-formed manifest entries (see ManifestBatch)."""
    # The same checks as is_uint, is_opt_bytes...: one per field of up to 80,000 entries
    # (a whole tree), so written out, with exact types (what msgpack makes).
    if type(value) is not list:
        return False
    for entry in value:
        if type(entry) is not list or len(entry) != 8:
            return False
        path, kind, size, mtime, mode, digest, target, written = entry
        if not (type(path) is str and type(kind) is str
                and kind in (KIND_FILE, KIND_DIR, KIND_LINK)
                and type(size) is int and size >= 0 and type(mtime) is int
                and type(mode) is int and mode >= 0
                and (digest is None or type(digest) is bytes)
                and (target is None or type(target) is str)
                and (written is None or type(written) is bytes)):
            return False
    return True


def is_pull_rules(value: Any) -> bool:
    if not isinstance(value, list) or len(value) > MAX_PULL_RULES:
        return False
    return all(isinstance(rule, list) and len(rule) == 3 and isinstance(rule[0], str)
               and is_uint(rule[1]) and isinstance(rule[2], str) for rule in value)


def is_pull_entries(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and is_uint(e[1])
        and is_int(e[2]) and is_uint(e[3]) for e in value)
