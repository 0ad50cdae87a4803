"""Every message of the lsync protocol, as small immutable records, and their encoding.

A message travels as one msgpack array: ``[type_code, field, field, ...]``. `SCHEMA` is
the single table that ties a type code to its record class, the types of its fields and the
direction it may travel in; `decode_message` accepts exactly what the table allows and raises
`ProtocolError(MALFORMED_FRAME)` for anything else, whatever the bytes were. No array in a
message may hold more than `MAX_ARRAY_LEN` items, and no frame more than `MAX_CONTAINERS`
arrays and maps, so a hostile frame costs little to refuse.

A well-typed request may still ask for what the agent must refuse: `request_problem` says
why (a NUL byte in the root or a link target, more than `MAX_HASH_PATHS` paths), with the
code of the answer (a `Goodbye` for a Hello, an `Error` for an operation). Wire paths are
checked where the agent resolves them (lsync.agent.confined), with BAD_PATH.

Operations that change the remote tree carry a sequence number (`seq`) chosen by the client;
the agent answers each with exactly one `Ack` or `Error` bearing the same `seq` (an
`Acked` answers many). Content writes of one path (WriteFile, WriteDelta, a WriteBatch's
files) take effect in `seq` order whatever stream they came on: one that arrives after a
newer write of its path is answered `Ack(SUPERSEDED)` and not applied.
"""

import zlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import msgpack

from lsync.protocol import fields
from lsync.protocol.errors import ErrorCode, ProtocolError
from lsync.protocol.fields import (
    FieldCheck,
    is_batch_files,
    is_bool,
    is_bool_map,
    is_bytes,
    is_capabilities,
    is_digest_list,
    is_generation,
    is_int,
    is_kept_entries,
    is_opt_bytes,
    is_path_list,
    is_str,
    is_str_list,
    is_str_map,
    is_uint,
    is_uint_list,
)
from lsync.protocol.paths import link_target_problem, relpath_problem, root_problem, shown

# The limits and kinds the field checks apply (lsync.protocol.fields), here too.
MAX_HASH_PATHS, MAX_BATCH_FILES = fields.MAX_HASH_PATHS, fields.MAX_BATCH_FILES
MAX_GENERATION = fields.MAX_GENERATION
KIND_FILE, KIND_DIR, KIND_LINK = fields.KIND_FILE, fields.KIND_DIR, fields.KIND_LINK
is_manifest_entries = fields.is_manifest_entries

# Largest preset dictionary (deflate's window).
MAX_DICTIONARY = 32768
# Largest uncompressed content one WriteFile chunk may carry.
MAX_CHUNK = 8 * 1024 * 1024
# Most items of any array (and entries of any map) in a message, checked while unpacking.
MAX_ARRAY_LEN = 4 * MAX_HASH_PATHS
MAX_MAP_LEN = 1024
# Arrays and maps in one frame: a legal 16 MiB frame of nested empty arrays would otherwise
# build millions of objects (about 1 GB) before any check. A manifest batch holds about
# MANIFEST_BATCH + 2 of them; nothing legitimate comes near this.
MAX_CONTAINERS = 100000

# Largest payload a Packed message inflates to (a frame's size, see lsync.protocol.framing).
MAX_PACKED = 16 * 1024 * 1024



class Hello(NamedTuple):
    """Client → agent, first message: version, offered capabilities, the root to sync."""

    version: int
    capabilities: Dict[str, List[str]]  # e.g. {"hash": ["xxh3-128", "blake2b-128"]}
    root: str  # as the user gave it; relative means relative to the remote home
    options: Dict[str, bool]  # {"create_root": True}


class Welcome(NamedTuple):
    """Agent → client, answer to Hello: the chosen capabilities and facts about the agent."""

    version: int
    chosen: Dict[str, str]  # e.g. {"hash": "blake2b-128", "compression": "zlib"}
    info: Dict[str, str]  # {"root": absolute root, "python": "3.6.15", "pid": "123"}


class ListTree(NamedTuple):
    """Client → agent: stream the remote manifest as `ManifestBatch` messages: of the whole
    tree, or (`under`, a relative path) of the entry at `under` and everything below it
    (nothing when there is none; the client asks again about paths whose operations the
    remote refused, since what is there is not known any more).

    `since` (whole-tree listings only): the generation of the last whole-tree listing the
    client holds (`ManifestBatch.generation`), "" for none. When the agent still keeps that
    very listing, it answers with only what changed since (see `ManifestBatch.base`);
    otherwise, or when in any doubt, with the whole manifest."""

    seq: int
    under: str = ""
    since: str = ""


class ManifestBatch(NamedTuple):
    """Agent → client: part of the remote manifest; the last batch has done=True.

    Each entry is [path, kind, size, mtime_ns, mode, digest, target, written]:
    - digest: the file's content digest, or None; present only when the agent knows it
      without reading the file (ask `HashPaths` for the others);
    - target: a symlink's target, None for files and directories;
    - written: what lsync itself made at this path, as the agent recorded it across its
      sessions, or None when lsync did not make this entry (or does not know): for a file
      the digest of the content lsync wrote, for a symlink the target it wrote (UTF-8),
      for a directory b"" (lsync made it, or a Mkdir claimed it). It is reported only while
      the entry is of the kind lsync made. A file is lsync's own when `written` equals its
      current digest, a link when it equals its current target.

    A whole-tree manifest may be a delta (`base` is not ""): it then holds only the entries
    that differ from the listing of generation `base` (new or changed, in full), and
    `removed` names the paths of that listing that are gone; applied to that listing, it
    gives exactly the whole manifest. `generation` (last batch only) names the listing this
    manifest completes, which the agent keeps for the next `ListTree.since`; "" when it
    keeps none.
    """

    seq: int
    entries: List[List[Any]]
    done: bool
    removed: List[str] = []  # noqa: RUF012  (never mutated)
    base: str = ""
    generation: str = ""


class HashPaths(NamedTuple):
    """Client → agent: content digests of regular files, answered by `Hashes`; at most
    `MAX_HASH_PATHS` paths (more is refused with BAD_REQUEST)."""

    seq: int
    paths: List[str]


class Hashes(NamedTuple):
    """Agent → client: one digest (or None if not a readable regular file) per path asked."""

    seq: int
    digests: List[Optional[bytes]]


class WriteFile(NamedTuple):
    """Client → agent: whole-file content, possibly in several chunks of one `seq`.

    Chunks arrive in order with increasing `offset` (counted in uncompressed bytes); the one
    with final=True makes the agent rename the finished temporary file over `path` and
    acknowledge. `packing` says how each chunk's data is compressed (a PACK_* code of
    lsync.protocol.packing: 0 raw, 1 one complete zlib stream, 2 one zstd frame, 3 one zlib
    stream with the session's `SetDictionary` preset); packed data inflates to at most
    `MAX_CHUNK` bytes.
    """

    seq: int
    path: str
    mode: int
    offset: int
    data: bytes
    final: bool
    packing: int = 0


class WriteDelta(NamedTuple):
    """Client → agent: new content as a delta against the version whose digest is `base`.

    The agent checks its file is that base (else Error BASE_MISMATCH, nothing written),
    applies the delta into a temporary file, checks the result against `digest`, renames.
    """

    seq: int
    path: str
    mode: int
    base: bytes
    digest: bytes
    delta: bytes


class WriteBatch(NamedTuple):
    """Client → agent: many small whole files in one message, each its own operation.

    `files` are ``[seq, path, mode, size]``, or with a fifth field, the content's digest
    under the session's hash (the agent records it instead of hashing again); `data` is
    their contents one after the other, packed as one piece (`packing`, as for WriteFile:
    one compression context), inflating to exactly the sum of the sizes, at most
    `MAX_CHUNK`. The agent writes each file as a one-chunk WriteFile and answers each seq
    (`Acked`, or an `Error` each); a batch it cannot unpack fails every file in it.
    """

    files: List[List[Any]]
    data: bytes
    packing: int


class Delete(NamedTuple):
    """Client → agent: remove a file, a symlink, or an empty directory.

    A directory that still holds entries is kept and acknowledged as KEPT_NOT_EMPTY; a
    FIFO, socket or device is never removed (Error TYPE_CONFLICT).
    """

    seq: int
    path: str


class Rename(NamedTuple):
    """Client → agent: move an entry (file or whole directory) that the remote holds."""

    seq: int
    src: str
    dst: str


class Copy(NamedTuple):
    """Client → agent: copy a remote file whose content digest is `digest` to `dst`."""

    seq: int
    src: str
    dst: str
    mode: int
    digest: bytes


class Mkdir(NamedTuple):
    """Client → agent: make a directory (parents too); an existing one just gets `mode`."""

    seq: int
    path: str
    mode: int


class Symlink(NamedTuple):
    """Client → agent: make `path` a symlink to `target` (replacing a file or link)."""

    seq: int
    path: str
    target: str


class SetMode(NamedTuple):
    """Client → agent: change permission bits of a file or directory."""

    seq: int
    path: str
    mode: int


class SetDictionary(NamedTuple):
    """Client → agent: the preset dictionary (at most `MAX_DICTIONARY` bytes) for later
    chunks packed as PACK_ZLIB_DICT, replacing any earlier one. Many small files of one
    tree share much (licence headers, includes, idioms) that a file alone cannot exploit."""

    seq: int
    data: bytes


class Ack(NamedTuple):
    """Agent → client: operation `seq` succeeded; `status` is an `AckStatus`."""

    seq: int
    status: int
    detail: str


class Acked(NamedTuple):
    """Agent → client: the operations `seqs` succeeded (each as an `Ack` with status OK)."""

    seqs: List[int]


class Error(NamedTuple):
    """Agent → client: operation `seq` failed with `code`; nothing was half-done."""

    seq: int
    code: int
    message: str


class Packed(NamedTuple):
    """Agent → client: one other message, encoded and compressed as one zlib stream (big
    answers such as manifest batches, whose paths share long prefixes). `decode_message`
    hands back the message inside, which is never itself Packed and inflates to at most
    a frame's size."""

    payload: bytes


# -- kept remote edits (lsync.agent.keeping): one block, additive ----------------------------
# Where the agent keeps remote versions it moved aside: `KEPT_DIR/<n>/<path>`, one numbered
# directory per keep. The agent's manifest never lists it, and no operation may write in it.
KEPT_DIR = ".lsync/kept"
# Most entries of the listing sent after the Welcome (the newest ones).
MAX_KEPT_LISTED = 1000


class Kept(NamedTuple):
    """Agent → client, unasked: remote versions of files and links lsync wrote, edited on
    the remote since, that the agent moved aside before replacing or deleting them.

    Each entry is [path, kept_as, kind, size, mtime_ns]: the path it was at, where it is
    now (a wire path under `KEPT_DIR`), KIND_FILE or KIND_LINK, and its lstat's size and
    mtime. With listing=False the entries are new, and come before the answer of the
    operation that kept them; with listing=True (sent once, right after the Welcome) they
    are every kept version there is, newest first (at most `MAX_KEPT_LISTED`).
    """

    entries: List[List[Any]]
    listing: bool


class Ping(NamedTuple):
    """Either way: answered by `Pong` with the same nonce (liveness, round-trip time)."""

    nonce: int


class Pong(NamedTuple):
    """Either way: answer to `Ping`."""

    nonce: int


class Goodbye(NamedTuple):
    """Either way: the sender is closing; code 0 means a clean end."""

    code: int
    reason: str


# -- pulls: remote files brought back to the local tree (lsync pull, lsync run --pull) ------
# The client asks for a listing of what its pull rules select (`PullList`), then fetches
# files one by one (`PullFetch`); the agent answers a fetch with `PullData` pieces and one
# `PullDone`, all on the stream the fetch came on: a data lane (lanes then carry data back to
# the client too; the client keeps its lane of single saves out of it) or the main stream.
# Any failure of a fetch is its `PullDone` (outcome PULL_FAILED with an error code), never
# an `Error`; a failed listing is an `Error`.

# A pull rule: [regex, flags, prefix]. `regex` is a gitignore pattern translated for
# `fullmatch` (by the client, lsync.client.local.gitpatterns); flags are PULL_RULE_*; `prefix` is
# the literal directory part of an anchored pattern ("" for a name pattern), which lets
# the agent skip directories that no rule can reach.
PULL_RULE_NEGATIVE = 1
PULL_RULE_DIR_ONLY = 2
PULL_RULE_BASENAME = 4
MAX_PULL_RULES = fields.MAX_PULL_RULES
MAX_PULL_BLOCKS = 1 << 16  # block hashes one PullFetch may carry
PULL_BLOCK_HASH = 8  # bytes of each block hash (blake2b, digest_size=8)

# PullDone outcomes.
PULL_WHOLE = 0  # the PullData pieces are the file's content
PULL_DELTA = 1  # they are a delta (lsync.protocol.delta) against the client's base
PULL_SAME = 2  # the remote file is the client's base: nothing was sent
PULL_FAILED = 3  # `code` and `message` say why; nothing more comes for this seq


class PullList(NamedTuple):
    """Client → agent: list the regular files that `rules` select, modified within the
    last `age_ns` nanoseconds of the agent's clock (0: whatever their age). Answered by
    `PullListing` batches (an `Error` if the rules are unusable)."""

    seq: int
    rules: List[List[Any]]
    age_ns: int


class PullListing(NamedTuple):
    """Agent → client: part of a pull listing, entries [path, size, mtime_ns, mode]; the
    last batch has done=True."""

    seq: int
    entries: List[List[Any]]
    done: bool


class PullFetch(NamedTuple):
    """Client → agent: send the file `path`. `base` is the digest of the client's copy
    (None: it has none), `base_size` its size; `blocks` are the PULL_BLOCK_HASH-byte hashes
    of its consecutive blocks of `block_size` bytes (empty: send no delta)."""

    seq: int
    path: str
    base: Optional[bytes]
    base_size: int
    block_size: int
    blocks: bytes


class PullData(NamedTuple):
    """Agent → client: the piece at `offset` of a fetch's payload (`packing` as for
    WriteFile chunks; at most MAX_CHUNK bytes unpacked)."""

    seq: int
    offset: int
    data: bytes
    packing: int


class PullDone(NamedTuple):
    """Agent → client: the end of a fetch: `outcome` (PULL_*), the payload's size, the
    file's mode and the digest of its content as sent; for PULL_FAILED, `code` and
    `message`."""

    seq: int
    outcome: int
    size: int
    mode: int
    digest: bytes
    code: int
    message: str


# What travels from the agent to the client on a data lane.
PULL_LANE_MESSAGES = (PullData, PullDone)


Message = Union[
    Hello, Welcome, ListTree, ManifestBatch, HashPaths, Hashes, WriteFile, WriteDelta,
    Delete, Rename, Copy, Mkdir, Symlink, SetMode, SetDictionary, WriteBatch, Ack, Acked,
    Error, Packed, Ping, Pong, Goodbye, Kept,
    PullList, PullListing, PullFetch, PullData, PullDone,
]

# Operations: messages that carry a seq and are answered by Ack or Error.
OPERATIONS = (WriteFile, WriteDelta, Delete, Rename, Copy, Mkdir, Symlink, SetMode,
              SetDictionary)

# Who may send a message: "c" client, "a" agent, "ca" either.
SCHEMA: Dict[int, Tuple[Any, str, Tuple[FieldCheck, ...]]] = {
    1: (Hello, "c", (is_uint, is_capabilities, is_str, is_bool_map)),
    2: (Welcome, "a", (is_uint, is_str_map, is_str_map)),
    10: (ListTree, "c", (is_uint, is_str, is_generation)),
    11: (ManifestBatch, "a", (is_uint, is_manifest_entries, is_bool, is_str_list,
                             is_generation, is_generation)),
    12: (HashPaths, "c", (is_uint, is_path_list)),
    13: (Hashes, "a", (is_uint, is_digest_list)),
    20: (WriteFile, "c", (is_uint, is_str, is_uint, is_uint, is_bytes, is_bool, is_uint)),
    21: (WriteDelta, "c", (is_uint, is_str, is_uint, is_bytes, is_bytes, is_bytes)),
    22: (Delete, "c", (is_uint, is_str)),
    23: (Rename, "c", (is_uint, is_str, is_str)),
    24: (Copy, "c", (is_uint, is_str, is_str, is_uint, is_bytes)),
    25: (Mkdir, "c", (is_uint, is_str, is_uint)),
    26: (Symlink, "c", (is_uint, is_str, is_str)),
    27: (SetMode, "c", (is_uint, is_str, is_uint)),
    28: (SetDictionary, "c", (is_uint, is_bytes)),
    29: (WriteBatch, "c", (is_batch_files, is_bytes, is_uint)),
    40: (Ack, "a", (is_uint, is_uint, is_str)),
    42: (Acked, "a", (is_uint_list,)),
    45: (Packed, "a", (is_bytes,)),
    47: (Kept, "a", (is_kept_entries, is_bool)),
    41: (Error, "a", (is_uint, is_uint, is_str)),
    50: (Ping, "ca", (is_uint,)),
    51: (Pong, "ca", (is_uint,)),
    60: (Goodbye, "ca", (is_uint, is_str)),
}


def _pull_fetch_problem(msg: PullFetch) -> Optional["Problem"]:
    if msg.blocks and (msg.block_size <= 0 or len(msg.blocks) % PULL_BLOCK_HASH
                       or len(msg.blocks) // PULL_BLOCK_HASH > MAX_PULL_BLOCKS):
        return (ErrorCode.BAD_REQUEST, "bad block hashes for {}".format(shown(msg.path)))
    if msg.blocks and len(msg.blocks) // PULL_BLOCK_HASH != -(-msg.base_size // msg.block_size):
        return (ErrorCode.BAD_REQUEST, "block hashes for {} do not cover its {} bytes".format(
            shown(msg.path), msg.base_size))
    return None


PULL_SCHEMA: Dict[int, Tuple[Any, str, Tuple[FieldCheck, ...]]] = {
    80: (PullList, "c", (is_uint, fields.is_pull_rules, is_uint)),
    81: (PullListing, "a", (is_uint, fields.is_pull_entries, is_bool)),
    82: (PullFetch, "c", (is_uint, is_str, is_opt_bytes, is_uint, is_uint, is_bytes)),
    83: (PullData, "a", (is_uint, is_uint, is_bytes, is_uint)),
    84: (PullDone, "a", (is_uint, is_uint, is_uint, is_uint, is_bytes, is_uint,
                         is_str)),
}

SCHEMA.update(PULL_SCHEMA)

_CODE_OF_TYPE: Dict[Any, int] = {cls: code for code, (cls, _, _) in SCHEMA.items()}


def encode_message(message: Message) -> bytes:
    """The msgpack payload of one message (without the frame header)."""
    code = _CODE_OF_TYPE[type(message)]
    payload: bytes = msgpack.packb([code] + list(message), use_bin_type=True)
    return payload


def code_of(cls: Any) -> int:
    """The type code of a message class."""
    return _CODE_OF_TYPE[cls]


def packed(message: Message, level: int = 1, payload: Optional[bytes] = None) -> Packed:
    """`message` (or its `payload`, already encoded) compressed into a Packed envelope."""
    return Packed(zlib.compress(payload if payload is not None else encode_message(message),
                                level))


def decode_message(payload: bytes, sender: str, inside_packed: bool = False) -> Message:
    """Decode and validate one payload sent by `sender` ("c" or "a").

    Raises only `ProtocolError`: MALFORMED_FRAME for undecodable or ill-typed payloads,
    UNEXPECTED_MESSAGE for a message that `sender` may not send.
    """
    budget = [MAX_CONTAINERS]

    def count(obj):  # type: (Any) -> Any
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("too many arrays and maps in one frame")
        return obj

    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                              max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
                              list_hook=count, object_hook=count)
    except Exception as exc:  # msgpack raises several unrelated types on hostile input
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "undecodable payload: {}".format(
            type(exc).__name__))
    if not isinstance(obj, list) or not obj or not is_int(obj[0]):
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "payload is not a typed message")
    entry = SCHEMA.get(obj[0])
    if entry is None:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "unknown message type {}".format(obj[0]))
    cls, senders, checks = entry
    if sender not in senders:
        raise ProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE, "{} may not be sent by this peer".format(cls.__name__))
    fields = obj[1:]
    if len(fields) != len(checks):
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "{} needs {} fields, got {}".format(
            cls.__name__, len(checks), len(fields)))
    for name, check, value in zip(cls._fields, checks, fields):
        if not check(value):
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "{}.{} has a bad value".format(
                cls.__name__, name))
    message: Message = cls(*fields)
    if isinstance(message, Packed):
        if inside_packed:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "a packed message inside another")
        inflater = zlib.decompressobj()
        try:
            inner = inflater.decompress(message.payload, MAX_PACKED)
        except (zlib.error, ValueError) as exc:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "bad packed message: {}".format(exc))
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "a packed message is truncated, "
                                "has trailing data or exceeds {} bytes".format(MAX_PACKED))
        message = decode_message(inner, sender, inside_packed=True)
    return message


Problem = Tuple[ErrorCode, str]


def _hello_problem(msg: Hello) -> Optional[Problem]:
    problem = root_problem(msg.root)
    return (ErrorCode.BAD_PATH, "refused root {}: {}".format(shown(msg.root), problem)) \
        if problem else None


def _hash_paths_problem(msg: HashPaths) -> Optional[Problem]:
    if len(msg.paths) > MAX_HASH_PATHS:
        return (ErrorCode.BAD_REQUEST, "{} paths in one HashPaths; at most {}".format(
            len(msg.paths), MAX_HASH_PATHS))
    return None


def _list_tree_problem(msg: ListTree) -> Optional[Problem]:
    problem = relpath_problem(msg.under) if msg.under else None
    return (ErrorCode.BAD_PATH, "refused listing of {}: {}".format(
        shown(msg.under), problem)) if problem else None


def _symlink_problem(msg: Symlink) -> Optional[Problem]:
    problem = link_target_problem(msg.target)
    return (ErrorCode.BAD_PATH, "refused target {} for {}: {}".format(
        shown(msg.target), shown(msg.path), problem)) if problem else None


_REQUEST_CHECKS: Dict[Any, Callable[[Any], Optional[Problem]]] = {
    Hello: _hello_problem,
    HashPaths: _hash_paths_problem,
    ListTree: _list_tree_problem,
    Symlink: _symlink_problem,
    PullFetch: _pull_fetch_problem,
}


def request_problem(message: Message) -> Optional[Problem]:
    """Why the agent must refuse a decoded request, with the code to answer; None if not."""
    check = _REQUEST_CHECKS.get(type(message))
    return check(message) if check is not None else None
