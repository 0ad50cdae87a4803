"""Block signatures of the remote's file versions, kept between sessions.

A delta needs the signature of the version the remote holds. Within a session the engine
keeps the signature of every version it sent; this store keeps those of the bigger files
across restarts, so that the first edit of a big file after lsync starts again is a delta
too, without reading anything at start-up. An entry is used only for a remote file whose
digest (from the agent's manifest, checked against the local file) equals the digest the
signature was made for, so a stale or foreign entry is never applied to another version.

The file sits next to the hash cache (~/.cache/lsync/<tree>-<tag>-<hash>.signatures), is
written atomically (temporary file + rename), and a damaged one is ignored. Format: magic,
then per entry: path length (u16), path (UTF-8), digest (16 bytes), signature length (u32),
`Signature.to_bytes()`.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from lsync.client.local.hashcache import default_cache_path
from lsync.client.remote.delta import Signature

MAGIC = b"lsync-signatures-1\n"
MIN_SIZE = 64 << 10  # smaller files are cheap to send whole on their first change
MAX_BYTES = 64 << 20  # the store never grows beyond this


def default_path(root: Path, algorithm: str) -> Path:
    return default_cache_path(root, algorithm).with_suffix(".signatures")


def load(path: Path) -> dict[str, tuple[bytes, Signature]]:
    """path -> (digest, signature); empty when the file is missing or damaged."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if not data.startswith(MAGIC):
        return {}
    found: dict[str, tuple[bytes, Signature]] = {}
    pos = len(MAGIC)
    try:
        while pos < len(data):
            (name_len,) = struct.unpack_from("<H", data, pos)
            pos += 2
            name = data[pos:pos + name_len].decode("utf-8")
            pos += name_len
            digest = data[pos:pos + 16]
            pos += 16
            (sig_len,) = struct.unpack_from("<I", data, pos)
            pos += 4
            blob = data[pos:pos + sig_len]
            pos += sig_len
            if len(digest) != 16 or len(blob) != sig_len:
                return {}
            found[name] = (digest, Signature.from_bytes(blob))
    except (struct.error, UnicodeDecodeError, ValueError):
        return {}
    return found


def save(path: Path, entries: Iterable[tuple[str, bytes, Signature]]) -> None:
    """Replace the store with `entries` (path, digest, signature), up to MAX_BYTES."""
    out = bytearray(MAGIC)
    for name, digest, signature in entries:
        encoded = name.encode("utf-8")
        blob = signature.to_bytes()
        if len(encoded) > 0xFFFF or len(digest) != 16:
            continue
        if len(out) + len(encoded) + len(blob) + 22 > MAX_BYTES:
            break
        out += struct.pack("<H", len(encoded)) + encoded + digest
        out += struct.pack("<I", len(blob)) + blob
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(bytes(out))
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
