"""Delta encoding on the client: signatures of acknowledged versions and deltas against them.

The client is the only writer of the files it syncs, so the remote holds exactly the last
version the agent acknowledged. For every synced file the client keeps a `Signature` of that
version -- the xxh3-64 hash and length of each content-defined chunk (FastCDC), packed in one
bytes object of 12 bytes per chunk -- and, when a file changes, `make_delta` names the chunks
the remote already has and sends the rest as compressed literals, with no round trip.

Promises:
- `apply_delta(make_delta(signature(old), new), old) == new` whenever `make_delta` returns
  bytes, for any `old` and `new` (the format and the decoder are in `lsync.protocol.delta`).
  A 64-bit chunk-hash collision could build a wrong file; the agent's check of the result hash
  catches it and the client then sends the whole file.
- `make_delta` returns None when the delta would not beat sending the whole file compressed
  with zlib (see the threshold rules below); the caller then sends the whole file.
- Memory: a signature costs 12 bytes per chunk plus ~120 bytes of object overhead. Chunks
  average about 640 bytes (FastCDC's average is `avg + min` = 512 + 128), so a 1 GB tree
  of 80,000 files needs ~19 MB of chunk tables and ~10 MB of overhead. A file keeps at most
  about `MAX_CHUNKS_PER_FILE` chunks: past 16 MiB the average chunk size doubles with size.
  512 rather than 1 KiB halves the cost of a one-line edit of a small file without
  `base_content` (mean ~0.6 KB instead of ~1 KB for 20 KB of C) for ~10 MB more memory.
- Speed: ~1 ms per MB to sign a version or to cut the new one (pyfastcdc + xxh3), plus the
  compression of the literals.

Threshold rules: when a delta is worth it (sizes are bytes on the wire):
1. An empty new file: never (the whole file is empty).
2. Block delta: matched chunks become copies. With `base_content` (the acknowledged bytes,
   when the caller still has them) each copy is also extended byte by byte into the
   neighbouring unmatched region, so a one-line edit leaves about one line of literal.
   If less than `MIN_MATCHED_FRACTION` of the new file is matched, the block delta is not
   even built: it could save too little to be worth a second compression.
3. Zdict delta: only with `base_content`, when the new file is at most `ZDICT_MAX_NEW` bytes:
   the new file deflated with the base (its first `ZDICT_DICT_SIZE` bytes) as preset
   dictionary. Where both ends have zstd, also the new file as a zstd frame with the whole
   base as raw-content dictionary (smaller than zdict on scattered edits: ~50 bytes against
   ~200 for a rename in 4 places of a 20 KB file). The smallest candidate wins.
4. The winner is returned only if it is smaller than the whole file would be: for files up to
   `WHOLE_MEASURE_LIMIT` that cost is measured (`min(len(new), len(zlib.compress(new, 6)))`,
   about 2 ms at that size); above it, it is estimated from the compression ratio of three
   16 KiB samples of the new file, and the delta must come under `ESTIMATE_MARGIN` of it.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Final

import xxhash
from pyfastcdc import FastCDC

from lsync.protocol import delta as wire

MIN_AVG_CHUNK: Final = 512
"""FastCDC average chunk size for files up to MIN_AVG_CHUNK * MAX_CHUNKS_PER_FILE bytes."""
MAX_AVG_CHUNK: Final = 1 << 20
MAX_CHUNKS_PER_FILE: Final = 32768
NORMALIZED_CHUNKING: Final = 1
"""FastCDC's NC level (pyfastcdc's default). NC 2 gave slightly smaller mean deltas on text
but much larger worst cases on binary data (up to ~9 KB for a one-byte edit of 10 MB)."""

WHOLE_LEVEL: Final = 6
"""zlib level the whole-file path is assumed to use when deciding whether a delta is worth it."""
DELTA_LEVEL: Final = 9
WHOLE_MEASURE_LIMIT: Final = 64 * 1024
ESTIMATE_MARGIN: Final = 0.9
MIN_MATCHED_FRACTION: Final = 1 / 8
ZDICT_MAX_NEW: Final = 64 * 1024
ZDICT_DICT_SIZE: Final = 32 * 1024 - 512
"""Deflate reaches back at most 32 KiB - 262 bytes, so a longer dictionary would be wasted."""
_SAMPLE: Final = 16 * 1024

_HASH_FMT: Final = "Q"
_LEN_FMT: Final = "I"
_BIG_ENDIAN: Final = sys.byteorder == "big"
_TABLE_VERSION: Final = 1


def chunk_size_for(size: int) -> int:
    """The FastCDC average chunk size used for a file of `size` bytes."""
    avg = MIN_AVG_CHUNK
    while avg < MAX_AVG_CHUNK and size > avg * MAX_CHUNKS_PER_FILE:
        avg *= 2
    return avg


_chunkers: dict[int, FastCDC] = {}


def _chunker(avg: int) -> FastCDC:
    chunker = _chunkers.get(avg)
    if chunker is None:
        chunker = FastCDC(avg, normalized_chunking=NORMALIZED_CHUNKING)
        _chunkers[avg] = chunker
    return chunker


@dataclass(frozen=True, slots=True)
class Signature:
    """Chunk hashes and lengths of one file version, packed for a small memory footprint.

    `table` holds `chunk_count` little-endian uint64 xxh3-64 hashes followed by as many
    little-endian uint32 chunk lengths; `avg_chunk` is the FastCDC average it was cut with.
    """

    size: int
    avg_chunk: int
    table: bytes

    @property
    def chunk_count(self) -> int:
        return len(self.table) // 12

    def hashes(self) -> array[int]:
        out = array(_HASH_FMT)
        out.frombytes(self.table[: 8 * self.chunk_count])
        if _BIG_ENDIAN:
            out.byteswap()
        return out

    def lengths(self) -> array[int]:
        out = array(_LEN_FMT)
        out.frombytes(self.table[8 * self.chunk_count :])
        if _BIG_ENDIAN:
            out.byteswap()
        return out

    def memory_size(self) -> int:
        """Approximate bytes of memory this signature holds (object, table, size)."""
        return sys.getsizeof(self) + sys.getsizeof(self.table) + sys.getsizeof(self.size)

    def to_bytes(self) -> bytes:
        """A portable serialization (for an on-disk cache), read back by `from_bytes`."""
        head = bytearray((_TABLE_VERSION,))
        head += self.size.to_bytes(8, "little")
        head += self.avg_chunk.to_bytes(4, "little")
        return bytes(head) + self.table

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        """Read `to_bytes` output back; ValueError if it is not one."""
        if len(data) < 13 or data[0] != _TABLE_VERSION or (len(data) - 13) % 12:
            raise ValueError("not a serialized signature")
        size = int.from_bytes(data[1:9], "little")
        avg_chunk = int.from_bytes(data[9:13], "little")
        sig = cls(size, avg_chunk, bytes(data[13:]))
        if sum(sig.lengths()) != size:
            raise ValueError("serialized signature lengths do not add up to its size")
        return sig


def _cut(content: bytes, avg: int) -> tuple[array[int], array[int]]:
    hashes = array(_HASH_FMT)
    lengths = array(_LEN_FMT)
    digest = xxhash.xxh3_64_intdigest
    for chunk in _chunker(avg).cut_buf(content):
        hashes.append(digest(chunk.data))
        lengths.append(chunk.length)
    return hashes, lengths


def _pack(size: int, avg: int, hashes: array[int], lengths: array[int]) -> Signature:
    if _BIG_ENDIAN:
        hashes = array(_HASH_FMT, hashes)
        hashes.byteswap()
        lengths = array(_LEN_FMT, lengths)
        lengths.byteswap()
    return Signature(size, avg, hashes.tobytes() + lengths.tobytes())


def signature(content: bytes) -> Signature:
    """The signature of one file version."""
    avg = chunk_size_for(len(content))
    hashes, lengths = _cut(content, avg)
    return _pack(len(content), avg, hashes, lengths)


Copy = tuple[int, int, int]
"""(new_offset, base_offset, length): new[new_offset:][:length] == base[base_offset:][:length]."""


def _match(base: Signature, hashes: array[int], lengths: array[int]) -> list[Copy]:
    """Copies for the new chunks whose hash and length appear in `base`, coalesced."""
    base_hashes = base.hashes()
    base_lengths = base.lengths()
    count = len(base_hashes)
    if not count:
        return []
    base_offsets = [0, *accumulate(base_lengths)]
    # First occurrence wins: lower indices come later in the reversed zip and overwrite.
    index = dict(zip(reversed(base_hashes), range(count - 1, -1, -1), strict=True))
    copies: list[list[int]] = []
    pos = 0
    expect = -1  # the base chunk after the last match: the likeliest next match
    for digest, length in zip(hashes, lengths, strict=True):
        if 0 <= expect < count and base_hashes[expect] == digest:
            found = expect
        else:
            found = index.get(digest, -1)
        if found >= 0 and base_lengths[found] == length:
            base_offset = base_offsets[found]
            last = copies[-1] if copies else None
            if last and last[0] + last[2] == pos and last[1] + last[2] == base_offset:
                last[2] += length
            else:
                copies.append([pos, base_offset, length])
            expect = found + 1
        pos += length
    return [(c[0], c[1], c[2]) for c in copies]


def _common_prefix(a: bytes, a_start: int, b: bytes, b_start: int, limit: int) -> int:
    """Length of the common prefix of a[a_start:] and b[b_start:], at most `limit`."""
    limit = min(limit, len(a) - a_start, len(b) - b_start)
    matched = 0
    step = 64
    while matched < limit:
        size = min(step, limit - matched)
        i, j = a_start + matched, b_start + matched
        if a[i : i + size] == b[j : j + size]:
            matched += size
            step *= 2
        elif size > 8:
            step = size // 2
        else:
            k = 0
            while a[i + k] == b[j + k]:
                k += 1
            return matched + k
    return matched


def _common_suffix(a: bytes, a_end: int, b: bytes, b_end: int, limit: int) -> int:
    """Length of the common suffix of a[:a_end] and b[:b_end], at most `limit`."""
    limit = min(limit, a_end, b_end)
    matched = 0
    step = 64
    while matched < limit:
        size = min(step, limit - matched)
        i, j = a_end - matched, b_end - matched
        if a[i - size : i] == b[j - size : j]:
            matched += size
            step *= 2
        elif size > 8:
            step = size // 2
        else:
            k = 0
            while a[i - 1 - k] == b[j - 1 - k]:
                k += 1
            return matched + k
    return matched


def _extend(copies: list[Copy], new: bytes, base: bytes) -> list[Copy]:
    """Grow copies byte by byte into the gaps between them, using the base content.

    The starts of the two versions and their ends act as zero-length copies, so an edit near
    either end also shrinks to the bytes that really changed.
    """
    out: list[list[int]] = []

    def add(new_offset: int, base_offset: int, length: int) -> None:
        last = out[-1] if out else None
        if last and last[0] + last[2] == new_offset and last[1] + last[2] == base_offset:
            last[2] += length
        else:
            out.append([new_offset, base_offset, length])

    prev_new_end = prev_base_end = 0
    for new_offset, base_offset, length in [*copies, (len(new), len(base), 0)]:
        gap = new_offset - prev_new_end
        if gap > 0:
            head = _common_prefix(new, prev_new_end, base, prev_base_end, gap)
            if head:
                add(prev_new_end, prev_base_end, head)
            tail = _common_suffix(new, new_offset, base, base_offset, gap - head)
            if tail:
                add(new_offset - tail, base_offset - tail, tail)
        if length:
            add(new_offset, base_offset, length)
        prev_new_end, prev_base_end = new_offset + length, base_offset + length
    return [(c[0], c[1], c[2]) for c in out]


def _copies(
    base: Signature,
    new: bytes,
    hashes: array[int],
    lengths: array[int],
    base_content: bytes | None,
) -> list[Copy]:
    copies = _match(base, hashes, lengths)
    if base_content is not None:
        copies = _extend(copies, new, base_content)
    return copies


def _check_base_content(base: Signature, base_content: bytes | None) -> None:
    if base_content is not None and len(base_content) != base.size:
        raise ValueError(f"base_content has {len(base_content)} bytes, the signature {base.size}")


def block_delta(base: Signature, new: bytes, base_content: bytes | None = None) -> bytes:
    """The block delta from `base` to `new`, whatever its size (no threshold)."""
    _check_base_content(base, base_content)
    hashes, lengths = _cut(new, base.avg_chunk)
    copies = _copies(base, new, hashes, lengths, base_content)
    return wire.encode_block_delta(base.size, new, copies, DELTA_LEVEL)


def zdict_delta(base_content: bytes, new: bytes) -> bytes:
    """`new` deflated with the start of `base_content` as preset dictionary (no threshold)."""
    dictionary = base_content[:ZDICT_DICT_SIZE]
    return wire.encode_zdict_delta(len(base_content), new, 0, dictionary, DELTA_LEVEL)


def zstd_dict_delta(base_content: bytes, new: bytes) -> bytes:
    """`new` as a zstd frame with the whole base as raw-content dictionary (no threshold;
    only where both ends have zstd)."""
    return wire.encode_zstd_dict_delta(len(base_content), new, 0, base_content)


def whole_cost(new: bytes) -> float:
    """Bytes the whole file would cost: measured up to WHOLE_MEASURE_LIMIT, else estimated.

    The estimate already includes `ESTIMATE_MARGIN`: a delta must be smaller than it.
    """
    if len(new) <= WHOLE_MEASURE_LIMIT:
        return min(len(new), len(zlib.compress(new, WHOLE_LEVEL)))
    step = len(new) // 4
    sample = b"".join(new[i * step : i * step + _SAMPLE] for i in (1, 2, 3))
    ratio = min(1.0, len(zlib.compress(sample, WHOLE_LEVEL)) / len(sample))
    return len(new) * ratio * ESTIMATE_MARGIN


def _best_delta(
    base: Signature,
    new: bytes,
    hashes: array[int],
    lengths: array[int],
    base_content: bytes | None,
    zstd: bool = False,
) -> bytes | None:
    if not new:
        return None
    candidates: list[bytes] = []
    copies = _copies(base, new, hashes, lengths, base_content)
    matched = sum(c[2] for c in copies)
    if matched and matched >= len(new) * MIN_MATCHED_FRACTION:
        candidates.append(wire.encode_block_delta(base.size, new, copies, DELTA_LEVEL))
    if base_content and len(new) <= ZDICT_MAX_NEW:
        candidates.append(zdict_delta(base_content, new))
        if zstd:
            candidates.append(zstd_dict_delta(base_content, new))
    if not candidates:
        return None
    best = min(candidates, key=len)
    return best if len(best) < whole_cost(new) else None


def make_delta_and_signature(
    base: Signature, new: bytes, base_content: bytes | None = None, zstd: bool = False
) -> tuple[bytes | None, Signature]:
    """`make_delta` plus the signature of `new`, reusing the chunking done for the delta.

    Once the agent acknowledges the write (delta or whole file), the returned signature
    describes the remote's version.
    """
    _check_base_content(base, base_content)
    hashes, lengths = _cut(new, base.avg_chunk)
    delta = _best_delta(base, new, hashes, lengths, base_content, zstd)
    if chunk_size_for(len(new)) == base.avg_chunk:
        new_signature = _pack(len(new), base.avg_chunk, hashes, lengths)
    else:
        new_signature = signature(new)
    return delta, new_signature


def make_delta(base: Signature, new: bytes, base_content: bytes | None = None) -> bytes | None:
    """A delta turning the version `base` describes into `new`, or None to send it whole.

    `base_content`, when given, must be the bytes `base` was computed from; it enables the
    byte-exact extension of copies and the zdict kind. Raises ValueError if its length
    differs from the signature's size.
    """
    _check_base_content(base, base_content)
    hashes, lengths = _cut(new, base.avg_chunk)
    return _best_delta(base, new, hashes, lengths, base_content)
