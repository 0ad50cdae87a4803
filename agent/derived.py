"""Writes whose new content is made from a file already on the remote.

`write_delta` applies a WriteDelta to the file at its path, once that file is known to be
the base the client named (`open_base`: the record's digest for the file's stat key, hashed
only when the key is unknown; anything else there, a symlink included, is BASE_MISMATCH).
`copy_file` copies one file to another path (a source gone, or no longer a regular file, is
DIGEST_MISMATCH). Either way the result is hashed as it is written and put in place only
when its digest is the one the client sent (else DIGEST_MISMATCH), through the caller's
`commit`, which says the intent first (lsync.agent.records); any failure aborts the new
file and leaves the tree as it was, as an `OpError`. The caller records what was written
and answers.
"""

import os
from typing import Any, Callable, Tuple

from lsync.agent.confined import ConfinedRoot, file_key, iter_fd
from lsync.agent.records import DigestRecord
from lsync.agent.refusals import OpError, op_error
from lsync.agent.tempfiles import PendingFile
from lsync.protocol import messages as m
from lsync.protocol.delta import DeltaError, apply_delta
from lsync.protocol.errors import ErrorCode

MAX_DELTA_RESULT = 1 << 40  # the result is streamed to disk; this only bounds nonsense

# Puts a written file in place with its mode, its digest said first as an intent.
Commit = Callable[[PendingFile, int, bytes], os.stat_result]


def write_delta(root: ConfinedRoot, record: DigestRecord, msg: m.WriteDelta,
                new_hasher: Callable[[], Any], commit: Commit,
                remember: bool = True) -> Tuple[os.stat_result, bytes]:
    """Check the base cheaply (record + stat, hashing only when in doubt), apply, verify;
    the new file's stat and digest (the caller records it and answers). A base hashed here
    is remembered in the record unless `remember` is False (a write pool's thread)."""
    fd = open_base(root, record, msg.path, msg.base, new_hasher, remember)
    try:
        base_size = os.fstat(fd).st_size

        def read_base(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        pending = root.begin_write(msg.path, mode=msg.mode)
        pending.known = msg.base  # the client has it: not a remote edit to keep
        try:
            hasher = new_hasher()
            for chunk in apply_delta(msg.delta, read_base, base_size, MAX_DELTA_RESULT):
                hasher.update(chunk)
                pending.write(chunk)
            digest = hasher.digest()
            if digest != msg.digest:
                raise OpError(ErrorCode.DIGEST_MISMATCH,
                              "delta for {} did not give the expected content".format(
                                  msg.path))
            st = commit(pending, msg.mode, digest)
        except DeltaError as exc:
            pending.abort()
            raise OpError(exc.code, "delta for {}: {}".format(msg.path, exc.message))
        except BaseException:
            pending.abort()
            raise
    except OSError as exc:
        raise op_error(exc, "apply delta to", msg.path)
    finally:
        os.close(fd)
    return st, digest


def open_base(root: ConfinedRoot, record: DigestRecord, path: str, base: bytes,
              new_hasher: Callable[[], Any], remember: bool = True) -> int:
    """An fd of `path` once it is known to hold the content whose digest is `base`."""
    try:
        fd = root.open_read(path)
    except OpError as exc:
        if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.TYPE_CONFLICT, ErrorCode.BAD_PATH):
            # (BAD_PATH: a symlink is there now, made on the remote.)
            raise OpError(ErrorCode.BASE_MISMATCH, "{} is not the expected base: {}".format(
                path, exc.message))
        raise
    try:
        known = record.lookup(path, file_key(os.fstat(fd)))
        if known is None:
            hasher = new_hasher()
            for chunk in iter_fd(fd):
                hasher.update(chunk)
            known = hasher.digest()
            if remember:
                record.remember(path, file_key(os.fstat(fd)), known)
        if known != base:
            raise OpError(ErrorCode.BASE_MISMATCH,
                          "{} changed on the remote; it is not the expected base".format(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_file(root: ConfinedRoot, msg: m.Copy, new_hasher: Callable[[], Any],
              commit: Commit) -> Tuple[os.stat_result, bytes]:
    """`msg.dst` made a copy of `msg.src`, verified against the digest the client sent; the
    new file's stat and digest (the caller records it and answers)."""
    try:
        fd = root.open_read(msg.src)
    except OpError as exc:
        if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.TYPE_CONFLICT):
            raise OpError(ErrorCode.DIGEST_MISMATCH, "{} no longer has the expected "
                          "content: {}".format(msg.src, exc.message))
        raise
    try:
        pending = root.begin_write(msg.dst, mode=msg.mode)
        try:
            hasher = new_hasher()
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                hasher.update(chunk)
                pending.write(chunk)
            digest = hasher.digest()
            if digest != msg.digest:
                raise OpError(ErrorCode.DIGEST_MISMATCH,
                              "{} no longer has the expected content".format(msg.src))
            st = commit(pending, msg.mode, digest)
        except BaseException:
            pending.abort()
            raise
    except OSError as exc:
        raise OpError(ErrorCode.IO_ERROR, "copy {} to {}: {}".format(
            msg.src, msg.dst, exc.strerror or exc))
    finally:
        os.close(fd)
    return st, digest
