"""The delta payload of a `WriteDelta` message: its byte format, its encoders, its application.

A delta turns one exact version of a file (the *base*, which the agent has) into a new version
(the *result*). This module knows only bytes: the agent hands `apply_delta` a function that
reads ranges of the base and writes the chunks it yields to a temporary file; the client
decides which ranges to copy (see `lsync.client.remote.delta`) and calls the encoders here.

Promises:
- No I/O, stdlib only (zlib), Python 3.6 syntax.
- Any malformed blob -- truncated, bad varint, copy outside the base, bad or oversized deflate
  stream, a result larger than the caller's limit -- raises `DeltaError` and nothing else.
  A blob naming a base of another size raises `DeltaError` with code `BASE_MISMATCH`, so the
  agent can answer "base mismatch" without reading anything. Exceptions raised by the caller's
  `read_base` propagate unchanged.
- Memory stays bounded whatever the blob says: the header and the whole op list are checked
  before the first chunk is yielded, copies are read in pieces of at most `READ_PIECE` bytes,
  inflation is capped per step, and no output beyond the declared `result_size` is produced.
- The delta does not authenticate its result: applied to the wrong base it can yield wrong
  bytes. The agent hashes what it wrote and compares with the message's `result_hash`.

Format (all integers are unsigned LEB128 varints unless said otherwise)::

    blob    := version:u8 kind:u8 base_size result_size body
    version := 1
    kind 1, BLOCK:  body := ops_len ops[ops_len] literals
        ops      := op*                       (consumed exactly; lengths sum to result_size)
        op       := h                         h = length << 1 | t, length >= 1
                    t = 0 COPY:    h zigzag(delta)   base_offset = previous copy end + delta
                                                     (the "previous copy end" starts at 0)
                    t = 1 LITERAL: h                 next `length` bytes of the literal data
        literals := raw deflate stream (zlib wbits=-15) of all literal bytes in op order;
                    absent (zero bytes) when there are no literals; nothing may follow it.
    kind 2, ZDICT:  body := dict_offset dict_len stream
        dictionary := base[dict_offset : dict_offset + dict_len], dict_len <= 32768
        stream     := raw deflate stream of the whole result, compressed with that
                      dictionary preset (zlib.compressobj(wbits=-15, zdict=dictionary));
                      nothing may follow it.

    kind 3, ZSTD_DICT (only where both ends have zstd: the "zstd" packing was negotiated):
        body := dict_offset dict_len frame
        dictionary := base[dict_offset : dict_offset + dict_len] (raw content),
                      dict_len <= ZSTD_MAX_DICT
        frame      := one zstd frame of the whole result (its header states the result
                      size), compressed with that dictionary; nothing may follow it.
                      result_size <= ZSTD_MAX_RESULT (the result is built in memory).

Kinds 4 and up are reserved; this version rejects them. Raw deflate omits zlib's header and
Adler-32 (6-10 bytes): integrity comes from the agent's result hash.
"""

import zlib
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from lsync.protocol import packing
from lsync.protocol.errors import ErrorCode

FORMAT_VERSION = 1
KIND_BLOCK = 1
KIND_ZDICT = 2
KIND_ZSTD_DICT = 3
KIND_NAMES = {KIND_BLOCK: "block", KIND_ZDICT: "zdict", KIND_ZSTD_DICT: "zstd-dict"}

ZSTD_MAX_DICT = 1 << 20
ZSTD_MAX_RESULT = 1 << 20

ZDICT_MAX_DICT = 32768
"""Largest preset dictionary: deflate's window. zlib uses at most this many bytes anyway."""

READ_PIECE = 1 << 20
"""Largest single `read_base` request, and the size apply_delta gathers output chunks to."""

INFLATE_PIECE = 1 << 18
"""Largest amount of data inflated in one step."""

_FEED_PIECE = 1 << 16
_WBITS = -15
_MAX_VARINT_BYTES = 10


class DeltaError(ValueError):
    """A delta blob cannot be applied. `code` is `BAD_DELTA` or `BASE_MISMATCH`."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_DELTA) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeltaInfo(NamedTuple):
    """What a delta's header declares."""

    kind: int
    base_size: int
    result_size: int


ReadBase = Callable[[int, int], bytes]
"""read_base(offset, length) -> exactly `length` bytes of the base starting at `offset`."""


# ----------------------------------------------------------------------------- varints


def _put_uvarint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("negative varint")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_svarint(out: bytearray, value: int) -> None:
    _put_uvarint(out, (value << 1) if value >= 0 else ((-value << 1) - 1))


def _get_uvarint(buf: bytes, pos: int, end: int, what: str) -> Tuple[int, int]:
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise DeltaError("truncated varint ({})".format(what))
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if pos - start >= _MAX_VARINT_BYTES:
            raise DeltaError("varint too long ({})".format(what))


def _unzigzag(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


# ----------------------------------------------------------------------------- encoding


def _header(kind: int, base_size: int, result_size: int) -> bytearray:
    out = bytearray((FORMAT_VERSION, kind))
    _put_uvarint(out, base_size)
    _put_uvarint(out, result_size)
    return out


def encode_block_delta(
    base_size: int, new: bytes, copies: Sequence[Tuple[int, int, int]], level: int = 9
) -> bytes:
    """A BLOCK delta building `new` from a base of `base_size` bytes.

    `copies` lists (new_offset, base_offset, length) triples, sorted by new_offset and not
    overlapping: new[new_offset:new_offset+length] equals that range of the base. Every byte of
    `new` outside them travels as a literal. Raises ValueError for copies that do not fit.
    """
    ops = bytearray()
    literal = zlib.compressobj(level=level, wbits=_WBITS, memLevel=9)
    literal_parts = []
    has_literals = False
    view = memoryview(new)
    pos = 0
    copy_end = 0
    for new_offset, base_offset, length in copies:
        if length <= 0 or new_offset < pos or new_offset + length > len(new):
            raise ValueError(
                "copy ({}, {}, {}) out of order or range".format(new_offset, base_offset, length)
            )
        if base_offset < 0 or base_offset + length > base_size:
            raise ValueError(
                "copy ({}, {}, {}) outside the base".format(new_offset, base_offset, length)
            )
        if new_offset > pos:
            _put_uvarint(ops, ((new_offset - pos) << 1) | 1)
            literal_parts.append(literal.compress(view[pos:new_offset]))
            has_literals = True
        _put_uvarint(ops, length << 1)
        _put_svarint(ops, base_offset - copy_end)
        copy_end = base_offset + length
        pos = new_offset + length
    if pos < len(new):
        _put_uvarint(ops, ((len(new) - pos) << 1) | 1)
        literal_parts.append(literal.compress(view[pos:]))
        has_literals = True
    out = _header(KIND_BLOCK, base_size, len(new))
    _put_uvarint(out, len(ops))
    out += ops
    if has_literals:
        literal_parts.append(literal.flush())
        for part in literal_parts:
            out += part
    return bytes(out)


def encode_zdict_delta(
    base_size: int, new: bytes, dict_offset: int, dictionary: bytes, level: int = 9
) -> bytes:
    """A ZDICT delta: `new` deflated with base[dict_offset:dict_offset+len(dictionary)] preset.

    The caller passes the dictionary bytes themselves (the encoder must know the base content);
    at most `ZDICT_MAX_DICT` of them. Raises ValueError when the range does not fit the base.
    """
    if len(dictionary) > ZDICT_MAX_DICT:
        raise ValueError("dictionary larger than {} bytes".format(ZDICT_MAX_DICT))
    if dict_offset < 0 or dict_offset + len(dictionary) > base_size:
        raise ValueError("dictionary range outside the base")
    if dictionary:
        compressor = zlib.compressobj(level=level, wbits=_WBITS, memLevel=9, zdict=dictionary)
    else:
        compressor = zlib.compressobj(level=level, wbits=_WBITS, memLevel=9)
    out = _header(KIND_ZDICT, base_size, len(new))
    _put_uvarint(out, dict_offset)
    _put_uvarint(out, len(dictionary))
    out += compressor.compress(new)
    out += compressor.flush()
    return bytes(out)


def encode_zstd_dict_delta(
    base_size: int, new: bytes, dict_offset: int, dictionary: bytes, level: int = 9
) -> bytes:
    """A ZSTD_DICT delta: `new` as a zstd frame with base[dict_offset:][:len(dictionary)] as
    raw-content dictionary. Raises ValueError when the sizes or the range do not fit, and
    PackingError where zstd is not available."""
    if len(dictionary) > ZSTD_MAX_DICT or len(new) > ZSTD_MAX_RESULT:
        raise ValueError("dictionary or result too large for a zstd-dict delta")
    if dict_offset < 0 or dict_offset + len(dictionary) > base_size:
        raise ValueError("dictionary range outside the base")
    out = _header(KIND_ZSTD_DICT, base_size, len(new))
    _put_uvarint(out, dict_offset)
    _put_uvarint(out, len(dictionary))
    out += packing.zstd_dict_pack(new, level, dictionary)
    return bytes(out)


# ----------------------------------------------------------------------------- decoding


def _as_bytes(delta: object) -> bytes:
    if isinstance(delta, bytes):
        return delta
    if isinstance(delta, (bytearray, memoryview)):
        return bytes(delta)
    raise DeltaError("delta is {}, not bytes".format(type(delta).__name__))


def _parse_header(blob: bytes) -> Tuple[DeltaInfo, int]:
    if len(blob) < 2:
        raise DeltaError("truncated header")
    if blob[0] != FORMAT_VERSION:
        raise DeltaError("unknown delta format version {}".format(blob[0]))
    kind = blob[1]
    if kind not in KIND_NAMES:
        raise DeltaError("unknown delta kind {}".format(kind))
    base_size, pos = _get_uvarint(blob, 2, len(blob), "base size")
    result_size, pos = _get_uvarint(blob, pos, len(blob), "result size")
    return DeltaInfo(kind, base_size, result_size), pos


def read_delta_info(delta: bytes) -> DeltaInfo:
    """The kind, base size and result size a delta declares (checks the header only)."""
    return _parse_header(_as_bytes(delta))[0]


def apply_delta(
    delta: bytes, read_base: ReadBase, base_size: int, max_result_size: int
) -> Iterator[bytes]:
    """Check `delta` against a base of `base_size` bytes; return an iterator of result chunks.

    The header and, for BLOCK deltas, every op are validated before this returns, so a
    malformed op list or a base-size mismatch raises here, before anything is read or
    written. Errors found later (bad deflate data, a base that reads short) raise `DeltaError`
    from the iterator: the caller must discard what it wrote. The chunks concatenate to
    exactly the declared result size, which is at most `max_result_size`.
    """
    blob = _as_bytes(delta)
    info, pos = _parse_header(blob)
    if info.base_size != base_size:
        raise DeltaError(
            "delta is for a base of {} bytes, the base has {}".format(info.base_size, base_size),
            ErrorCode.BASE_MISMATCH,
        )
    if info.result_size > max_result_size:
        raise DeltaError(
            "result of {} bytes exceeds the limit of {}".format(info.result_size, max_result_size)
        )
    if info.kind == KIND_BLOCK:
        ops_len, ops_start = _get_uvarint(blob, pos, len(blob), "ops length")
        ops_end = ops_start + ops_len
        if ops_end > len(blob):
            raise DeltaError("truncated op list")
        literal_total = _check_ops(blob, ops_start, ops_end, base_size, info.result_size)
        if literal_total == 0 and ops_end != len(blob):
            raise DeltaError("data after the op list of a delta without literals")
        if literal_total and ops_end == len(blob):
            raise DeltaError("literal data missing")
        return _apply_block(blob, ops_start, ops_end, read_base)
    dict_offset, pos = _get_uvarint(blob, pos, len(blob), "dictionary offset")
    dict_len, pos = _get_uvarint(blob, pos, len(blob), "dictionary length")
    if info.kind == KIND_ZSTD_DICT:
        if dict_len > ZSTD_MAX_DICT or info.result_size > ZSTD_MAX_RESULT:
            raise DeltaError("zstd-dict delta with a dictionary of {} bytes and a result of "
                             "{}: too large".format(dict_len, info.result_size))
        if dict_offset + dict_len > base_size:
            raise DeltaError("dictionary range outside the base")
        return _apply_zstd_dict(blob, pos, dict_offset, dict_len, info.result_size,
                                read_base)
    if dict_len > ZDICT_MAX_DICT:
        raise DeltaError("dictionary of {} bytes exceeds {}".format(dict_len, ZDICT_MAX_DICT))
    if dict_offset + dict_len > base_size:
        raise DeltaError("dictionary range outside the base")
    return _apply_zdict(blob, pos, dict_offset, dict_len, info.result_size, read_base)


def apply_delta_to_bytes(delta: bytes, base: bytes, max_result_size: int) -> bytes:
    """`apply_delta` against a base held in memory, joined into one bytes object."""
    view = memoryview(base)

    def read_base(offset: int, length: int) -> bytes:
        return bytes(view[offset : offset + length])

    return b"".join(apply_delta(delta, read_base, len(base), max_result_size))


def _check_ops(blob: bytes, pos: int, end: int, base_size: int, result_size: int) -> int:
    """Validate the op list without storing it; return the total literal length."""
    total = 0
    literal_total = 0
    copy_end = 0
    while pos < end:
        head, pos = _get_uvarint(blob, pos, end, "op")
        length = head >> 1
        if length == 0:
            raise DeltaError("op of length 0")
        total += length
        if total > result_size:
            raise DeltaError("ops produce more than the declared {} bytes".format(result_size))
        if head & 1:
            literal_total += length
            continue
        step, pos = _get_uvarint(blob, pos, end, "copy offset")
        offset = copy_end + _unzigzag(step)
        if offset < 0 or offset + length > base_size:
            raise DeltaError(
                "copy of {} bytes at {} outside a base of {} bytes".format(
                    length, offset, base_size
                )
            )
        copy_end = offset + length
    if total != result_size:
        raise DeltaError("ops produce {} bytes, {} declared".format(total, result_size))
    return literal_total


def _read_exact(read_base: ReadBase, offset: int, length: int) -> bytes:
    data = read_base(offset, length)
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != length:
        raise DeltaError(
            "base read of {} bytes at {} came back short".format(length, offset),
            ErrorCode.BASE_MISMATCH,
        )
    return bytes(data)


class _Inflater(object):
    """Pulls bounded pieces out of a raw deflate stream stored in blob[start:]."""

    def __init__(self, blob: bytes, start: int, zdict: Optional[bytes] = None) -> None:
        self._blob = blob
        self._in = start
        try:
            if zdict:
                self._z = zlib.decompressobj(wbits=_WBITS, zdict=zdict)
            else:
                self._z = zlib.decompressobj(wbits=_WBITS)
        except (zlib.error, ValueError) as e:  # pragma: no cover - zlib refusing a dictionary
            raise DeltaError("cannot start inflating: {}".format(e)) from e
        self._pending = b""
        self._pending_pos = 0

    def _step(self, limit: int) -> bytes:
        z = self._z
        if z.unconsumed_tail:
            data = z.unconsumed_tail
        else:
            data = self._blob[self._in : self._in + _FEED_PIECE]
            self._in += len(data)
        try:
            return z.decompress(data, limit)
        except zlib.error as e:
            raise DeltaError("bad deflate data: {}".format(e)) from e

    def read(self, n: int) -> bytes:
        """Between 1 and `n` bytes of output; DeltaError if the stream ends first."""
        while self._pending_pos >= len(self._pending):
            if self._z.eof:
                raise DeltaError("compressed data ends early")
            if not self._z.unconsumed_tail and self._in >= len(self._blob):
                # No input left: give zlib one chance to flush what it holds.
                out = self._step(INFLATE_PIECE)
                if not out:
                    raise DeltaError("truncated compressed data")
            else:
                out = self._step(INFLATE_PIECE)
            self._pending = out
            self._pending_pos = 0
        start = self._pending_pos
        piece = self._pending[start : start + n]
        self._pending_pos = start + len(piece)
        return piece

    def _at_eof(self) -> bool:
        # A method, not the attribute: the flag changes under _step().
        return bool(self._z.eof)

    def finish(self) -> None:
        """Require that the stream ends here with nothing after it."""
        if self._pending_pos < len(self._pending):
            raise DeltaError("more compressed data than the delta uses")
        while not self._at_eof():
            if not self._z.unconsumed_tail and self._in >= len(self._blob):
                if self._step(1):
                    raise DeltaError("more compressed data than the delta uses")
                if not self._at_eof():
                    raise DeltaError("truncated compressed data")
                break
            if self._step(1):
                raise DeltaError("more compressed data than the delta uses")
        if self._z.unused_data or self._z.unconsumed_tail or self._in < len(self._blob):
            raise DeltaError("data after the end of the compressed stream")


class _Output(object):
    """Gathers small pieces into chunks of at most READ_PIECE bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def add(self, piece: bytes) -> List[bytes]:
        """Take a piece of at most READ_PIECE bytes; return the chunks now ready."""
        ready = []
        if self.buf and len(self.buf) + len(piece) > READ_PIECE:
            ready.append(self.take())
        if len(piece) >= READ_PIECE:
            ready.append(piece)
        else:
            self.buf += piece
        return ready

    def take(self) -> bytes:
        out = bytes(self.buf)
        del self.buf[:]
        return out


def _apply_block(blob: bytes, pos: int, end: int, read_base: ReadBase) -> Iterator[bytes]:
    inflater = _Inflater(blob, end)
    output = _Output()
    copy_end = 0
    while pos < end:
        head, pos = _get_uvarint(blob, pos, end, "op")
        remaining = head >> 1
        if head & 1:
            while remaining:
                piece = inflater.read(min(remaining, READ_PIECE))
                remaining -= len(piece)
                for ready in output.add(piece):
                    yield ready
            continue
        step, pos = _get_uvarint(blob, pos, end, "copy offset")
        offset = copy_end + _unzigzag(step)
        copy_end = offset + remaining
        while remaining:
            length = min(remaining, READ_PIECE)
            for ready in output.add(_read_exact(read_base, offset, length)):
                yield ready
            offset += length
            remaining -= length
    if end < len(blob):
        inflater.finish()
    if output.buf:
        yield output.take()


def _apply_zstd_dict(
    blob: bytes, pos: int, dict_offset: int, dict_len: int, result_size: int, read_base: ReadBase
) -> Iterator[bytes]:
    dictionary = _read_exact(read_base, dict_offset, dict_len)
    try:
        result = packing.zstd_dict_unpack(blob[pos:], dictionary, result_size)
    except packing.PackingError as exc:
        raise DeltaError("zstd-dict delta: {}".format(exc))
    if result:
        yield result


def _apply_zdict(
    blob: bytes, pos: int, dict_offset: int, dict_len: int, result_size: int, read_base: ReadBase
) -> Iterator[bytes]:
    dictionary = _read_exact(read_base, dict_offset, dict_len) if dict_len else None
    inflater = _Inflater(blob, pos, dictionary)
    output = _Output()
    remaining = result_size
    while remaining:
        piece = inflater.read(min(remaining, READ_PIECE))
        remaining -= len(piece)
        for ready in output.add(piece):
            yield ready
    inflater.finish()
    if output.buf:
        yield output.take()
