"""Tests of delta encoding (lsync.client.remote.delta) and application (lsync.protocol.delta).

The properties: for any old and new content, every delta the client builds applies to the old
content to give the new one byte for byte (block kind with and without the base content,
zdict kind, and `make_delta` whenever it returns bytes); any malformed blob raises
`DeltaError` and nothing else; a delta applied to the wrong base raises `DeltaError` or
yields content whose hash differs from the intended result (so the agent's result check
refuses it), unless the bytes it yields are the intended result anyway.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsync.client.remote import delta as cdelta
from lsync.protocol import delta as wire
from lsync.protocol.errors import ErrorCode

LIMIT = 1 << 30
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_WORDS = [
    b"int",
    b"static",
    b"return",
    b"struct",
    b"unsigned long",
    b"if (",
    b") {",
    b"}",
    b"NULL",
    b"->",
    b"kfree(",
    b"spin_lock(&",
    b"/* comment */",
    b"#include <linux/",
    b"0x1f",
]


def _text(size: int, rng: random.Random) -> bytes:
    out = bytearray()
    while len(out) < size:
        words = rng.choices(_WORDS, k=rng.randint(1, 8))
        out += b"\t" * rng.randint(0, 3) + b" ".join(words) + b"\n"
    return bytes(out[:size])


def make_content(kind: str, size: int, seed: int) -> bytes:
    """Deterministic content of a given flavour: text, random bytes, zeros, repeats."""
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    if kind == "repeats":
        block = rng.randbytes(rng.randint(1, 3000))
        return (block * (size // len(block) + 1))[:size]
    return _text(size, rng)


EDIT_OPS = ("replace", "insert", "delete", "truncate", "append", "move", "prepend")


def apply_edits(data: bytes, edits: list[tuple[str, int, int, int]]) -> bytes:
    """Apply (op, where, length, seed) edits; `where` is taken modulo the current size."""
    for op, where, length, seed in edits:
        rng = random.Random(seed)
        payload = rng.randbytes(length) if seed % 2 else _text(length, rng)
        pos = where % (len(data) + 1)
        if op == "replace":
            data = data[:pos] + payload + data[pos + length :]
        elif op == "insert":
            data = data[:pos] + payload + data[pos:]
        elif op == "delete":
            data = data[:pos] + data[pos + length :]
        elif op == "truncate":
            data = data[:pos]
        elif op == "append":
            data = data + payload
        elif op == "prepend":
            data = payload + data
        else:  # move a block elsewhere
            block = data[pos : pos + length * 8]
            rest = data[:pos] + data[pos + length * 8 :]
            to = (where // 7) % (len(rest) + 1)
            data = rest[:to] + block + rest[to:]
    return data


contents = st.builds(
    make_content,
    st.sampled_from(["text", "random", "zeros", "repeats"]),
    st.one_of(st.integers(0, 64), st.integers(0, 40_000)),
    st.integers(0, 2**32 - 1),
)
edit_lists = st.lists(
    st.tuples(
        st.sampled_from(EDIT_OPS),
        st.integers(0, 2**31),
        st.integers(0, 3000),
        st.integers(0, 2**32 - 1),
    ),
    max_size=4,
)
small_contents = st.one_of(
    st.binary(max_size=300),
    st.builds(
        make_content,
        st.sampled_from(["text", "random", "repeats"]),
        st.integers(0, 6000),
        st.integers(0, 2**32 - 1),
    ),
)


def apply(delta: bytes, base: bytes, limit: int = LIMIT) -> bytes:
    """Apply through the streaming interface, checking the reads and chunks it promises."""
    view = memoryview(base)

    def read_base(offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(base)
        assert length <= wire.READ_PIECE
        return bytes(view[offset : offset + length])

    chunks = list(wire.apply_delta(delta, read_base, len(base), limit))
    assert all(0 < len(c) <= wire.READ_PIECE for c in chunks)
    return b"".join(chunks)


def digest(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


# --------------------------------------------------------------------------- round trips


@FAST
@given(old=contents, edits=edit_lists)
def test_block_delta_rebuilds_new_content_exactly(
    old: bytes, edits: list[tuple[str, int, int, int]]
) -> None:
    new = apply_edits(old, edits)
    sig = cdelta.signature(old)
    assert apply(cdelta.block_delta(sig, new), old) == new
    assert apply(cdelta.block_delta(sig, new, old), old) == new


@FAST
@given(old=contents, edits=edit_lists)
def test_zdict_delta_rebuilds_new_content_exactly(
    old: bytes, edits: list[tuple[str, int, int, int]]
) -> None:
    new = apply_edits(old, edits)
    assert apply(cdelta.zdict_delta(old, new), old) == new


@FAST
@given(old=contents, edits=edit_lists)
def test_zstd_dict_delta_rebuilds_new_content_exactly(
    old: bytes, edits: list[tuple[str, int, int, int]]
) -> None:
    new = apply_edits(old, edits)
    if len(new) > wire.ZSTD_MAX_RESULT or len(old) > wire.ZSTD_MAX_DICT:
        return
    assert apply(cdelta.zstd_dict_delta(old, new), old) == new


def test_zstd_dict_delta_wins_on_scattered_edits_of_a_small_file() -> None:
    old = _big_text(20_000, 11)
    new = old.replace(b"struct", b"union", 4)  # a rename in 4 places
    plain = cdelta.make_delta(cdelta.signature(old), new, old)
    delta, _ = cdelta.make_delta_and_signature(cdelta.signature(old), new, old, zstd=True)
    assert plain is not None and delta is not None
    assert wire.read_delta_info(delta).kind == wire.KIND_ZSTD_DICT
    assert len(delta) < len(plain)
    assert apply(delta, old) == new


@FAST
@given(old=contents, edits=edit_lists, with_base=st.booleans())
def test_make_delta_rebuilds_new_content_or_declines(
    old: bytes, edits: list[tuple[str, int, int, int]], with_base: bool
) -> None:
    new = apply_edits(old, edits)
    delta, new_sig = cdelta.make_delta_and_signature(
        cdelta.signature(old), new, old if with_base else None
    )
    assert new_sig == cdelta.signature(new)
    if delta is not None:
        assert apply(delta, old) == new
        assert len(delta) < max(1, len(new))


@FAST
@given(old=small_contents, new=small_contents)
def test_unrelated_contents_round_trip(old: bytes, new: bytes) -> None:
    sig = cdelta.signature(old)
    assert apply(cdelta.block_delta(sig, new), old) == new
    assert apply(cdelta.block_delta(sig, new, old), old) == new
    assert apply(cdelta.zdict_delta(old, new), old) == new
    delta = cdelta.make_delta(sig, new, old)
    if delta is not None:
        assert apply(delta, old) == new


def test_empty_files() -> None:
    empty = cdelta.signature(b"")
    assert empty.chunk_count == 0 and empty.size == 0
    assert cdelta.make_delta(empty, b"") is None
    assert cdelta.make_delta(empty, b"", b"") is None
    assert apply(cdelta.block_delta(empty, b"abc"), b"") == b"abc"
    assert apply(cdelta.block_delta(cdelta.signature(b"xyz"), b""), b"xyz") == b""
    assert apply(cdelta.zdict_delta(b"", b"hello"), b"") == b"hello"
    assert apply(cdelta.zdict_delta(b"hello", b""), b"hello") == b""


def test_large_copies_are_read_and_yielded_in_bounded_pieces() -> None:
    old = make_content("random", 3 * wire.READ_PIECE + 12345, 7)
    new = old[:100] + b"changed" + old[107:]
    assert apply(cdelta.block_delta(cdelta.signature(old), new), old) == new


def test_base_content_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="base_content"):
        cdelta.make_delta(cdelta.signature(b"abc"), b"abcd", b"ab")


# --------------------------------------------------------------------------- sizes


def _big_text(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    pool = [_text(rng.randint(10, 90), rng) for _ in range(4000)]
    return b"".join(rng.choices(pool, k=size // 40 + 1))[:size]


def _edit_line(data: bytes, fraction: float) -> bytes:
    at = data.index(b"\n", int(len(data) * fraction)) + 1
    end = data.index(b"\n", at)
    return data[:at] + data[at:end].replace(b" ", b"  ", 1) + b" /* fixed */" + data[end:]


def test_one_line_edit_of_a_10_mb_file_costs_at_most_4_kb() -> None:
    old = _big_text(10_000_000, 1)
    sig = cdelta.signature(old)
    for fraction in (0.1, 0.5, 0.9):
        new = _edit_line(old, fraction)
        delta = cdelta.make_delta(sig, new)
        assert delta is not None and len(delta) <= 4096
        assert apply(delta, old) == new
        with_base = cdelta.make_delta(sig, new, old)
        assert with_base is not None and len(with_base) <= 200


def test_insertion_at_the_start_of_a_10_mb_file_costs_at_most_8_kb() -> None:
    old = make_content("random", 10_000_000, 2)
    new = b"#include <linux/compiler.h>\n" * 40 + old
    delta = cdelta.make_delta(cdelta.signature(old), new)
    assert delta is not None and len(delta) <= 8192
    assert apply(delta, old) == new


def test_one_line_edit_of_a_small_file_with_base_content_costs_under_150_bytes() -> None:
    old = _big_text(20_000, 3)
    new = _edit_line(old, 0.5)
    delta = cdelta.make_delta(cdelta.signature(old), new, old)
    assert delta is not None and len(delta) < 150
    assert apply(delta, old) == new


def test_scattered_edits_of_a_small_file_pick_the_zdict_kind() -> None:
    old = _big_text(20_000, 12)
    new = old.replace(b"struct", b"union")
    delta = cdelta.make_delta(cdelta.signature(old), new, old)
    assert delta is not None
    assert wire.read_delta_info(delta).kind == wire.KIND_ZDICT
    assert len(delta) < len(cdelta.block_delta(cdelta.signature(old), new, old))
    assert apply(delta, old) == new


def test_signature_follows_the_chunk_size_of_the_new_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cdelta, "MAX_CHUNKS_PER_FILE", 8)  # sizes double past 4 KiB
    old = make_content("text", 3000, 13)
    new = old + make_content("text", 4000, 14)
    base = cdelta.signature(old)
    delta, new_sig = cdelta.make_delta_and_signature(base, new)
    assert base.avg_chunk == cdelta.MIN_AVG_CHUNK
    assert new_sig == cdelta.signature(new) and new_sig.avg_chunk == 2 * cdelta.MIN_AVG_CHUNK
    assert delta is not None and apply(delta, old) == new
    newer = new[:5000] + b"edit" + new[5000:]
    again = cdelta.make_delta(new_sig, newer)
    assert again is not None and apply(again, new) == newer


def test_rewritten_file_is_sent_whole() -> None:
    old = make_content("random", 50_000, 4)
    new = make_content("random", 50_000, 5)
    assert cdelta.make_delta(cdelta.signature(old), new) is None
    assert cdelta.make_delta(cdelta.signature(old), new, old) is None


# --------------------------------------------------------------------------- signatures


def test_signature_is_compact_and_serializes() -> None:
    content = make_content("text", 200_000, 6)
    sig = cdelta.signature(content)
    assert sig.chunk_count > 100
    assert sig.memory_size() <= 12 * sig.chunk_count + 200
    assert sum(sig.lengths()) == len(content)
    assert cdelta.Signature.from_bytes(sig.to_bytes()) == sig
    with pytest.raises(ValueError):
        cdelta.Signature.from_bytes(sig.to_bytes()[:-1])


def test_chunk_size_grows_past_16_mib_to_bound_chunk_count() -> None:
    assert cdelta.chunk_size_for(0) == cdelta.MIN_AVG_CHUNK
    assert cdelta.chunk_size_for(10_000_000) == cdelta.MIN_AVG_CHUNK
    assert cdelta.chunk_size_for(1 << 30) * cdelta.MAX_CHUNKS_PER_FILE >= 1 << 30


# --------------------------------------------------------------------------- hostile blobs


def _consume(delta: bytes, base: bytes, limit: int = 1 << 20) -> bytes:
    """Apply to completion, checking the output promise; DeltaError propagates."""
    info = wire.read_delta_info(delta)
    out = b"".join(wire.apply_delta(delta, lambda o, n: base[o : o + n], len(base), limit))
    assert len(out) == info.result_size <= limit
    return out


@st.composite
def mutated_deltas(draw: st.DrawFn) -> tuple[bytes, bytes]:
    old = draw(small_contents)
    new = apply_edits(old, draw(edit_lists))
    kind = draw(st.sampled_from(["block", "block+base", "zdict", "zstd-dict"]))
    if kind == "zdict":
        delta = bytearray(cdelta.zdict_delta(old, new))
    elif kind == "zstd-dict":
        delta = bytearray(cdelta.zstd_dict_delta(old, new))
    else:
        base_content = old if kind == "block+base" else None
        delta = bytearray(cdelta.block_delta(cdelta.signature(old), new, base_content))
    mutations = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
                st.integers(0, 2**20),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=4,
        )
    )
    for op, where, value in mutations:
        pos = where % (len(delta) + 1)
        if op == "truncate":
            del delta[pos:]
        elif op == "insert":
            delta[pos:pos] = bytes([value]) * (1 + where % 3)
        elif pos < len(delta):
            if op == "flip":
                delta[pos] ^= 1 << (value % 8)
            elif op == "set":
                delta[pos] = value
            else:
                del delta[pos]
    return bytes(delta), old


@settings(max_examples=400, deadline=None)
@given(case=mutated_deltas())
def test_mutated_deltas_raise_only_delta_error(case: tuple[bytes, bytes]) -> None:
    delta, base = case
    with contextlib.suppress(wire.DeltaError):
        _consume(delta, base)


@settings(max_examples=300, deadline=None)
@given(
    header=st.sampled_from([b"", b"\x01\x01", b"\x01\x02", b"\x01\x01\x05", b"\x01\x02\x05"]),
    body=st.binary(max_size=200),
    base=st.binary(max_size=64),
)
def test_random_bytes_raise_only_delta_error(header: bytes, body: bytes, base: bytes) -> None:
    blob = header + body
    if header.count(b"\x05"):  # pretend the base has the declared size
        base = (base * 5 + bytes(5))[:5]
    with contextlib.suppress(wire.DeltaError):
        _consume(blob, base)


def _block(base_size: int, result_size: int, ops: bytes, tail: bytes = b"") -> bytes:
    out = bytearray((wire.FORMAT_VERSION, wire.KIND_BLOCK))
    for value in (base_size, result_size, len(ops)):
        wire._put_uvarint(out, value)
    return bytes(out + ops + tail)


def _deflate(data: bytes) -> bytes:
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return comp.compress(data) + comp.flush()


MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("one byte", b"\x01"),
    ("unknown version", b"\x02\x01\x00\x00\x00"),
    ("unknown kind", b"\x01\x07\x00\x00\x00"),
    ("truncated varint", b"\x01\x01\x80"),
    ("overlong varint", b"\x01\x01" + b"\xff" * 11),
    ("copy past the base", _block(4, 4, b"\x08\x02")),  # copy 4 at offset 1
    ("copy before the base", _block(4, 2, b"\x04\x01")),  # copy 2 at offset -1
    ("zero-length op", _block(4, 0, b"\x00\x00")),
    ("ops short of the result", _block(4, 5, b"\x08\x00")),
    ("ops beyond the result", _block(4, 3, b"\x08\x00")),
    ("op list past the end", _block(4, 4, b"\x08")[:-1]),
    ("literal without data", _block(4, 2, b"\x05")),
    ("literal data too short", _block(4, 4, b"\x09", _deflate(b"abc"))),
    ("literal data too long", _block(4, 2, b"\x05", _deflate(b"abc"))),
    ("garbage after literals", _block(4, 2, b"\x05", _deflate(b"ab") + b"x")),
    ("garbage after copies", _block(4, 4, b"\x08\x00", b"x")),
    ("bad deflate", _block(4, 2, b"\x05", b"\xff\xff\xff")),
    ("truncated deflate", _block(4, 2, b"\x05", _deflate(b"ab")[:-1])),
    ("dictionary past the base", b"\x01\x02\x04\x01\x00\x05"),
    ("dictionary too large", b"\x01\x02\x04\x01\x00\x81\x80\x02"),
    ("zdict stream truncated", b"\x01\x02\x04\x02\x00\x00"),
    ("zdict stream too long", b"\x01\x02\x04\x02\x00\x00" + _deflate(b"abc")),
    ("zdict stream garbage after", b"\x01\x02\x04\x02\x00\x00" + _deflate(b"ab") + b"!"),
]


@pytest.mark.parametrize(("name", "blob"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_blob_raises_delta_error(name: str, blob: bytes) -> None:
    with pytest.raises(wire.DeltaError) as caught:
        _consume(blob, b"base")
    assert caught.value.code == ErrorCode.BAD_DELTA
    assert caught.value.message


def test_non_bytes_delta_raises_delta_error() -> None:
    with pytest.raises(wire.DeltaError):
        wire.apply_delta("text", lambda o, n: b"", 0, LIMIT)  # type: ignore[arg-type]


def test_result_over_the_limit_is_refused_before_reading_the_base() -> None:
    old = make_content("text", 20_000, 8)
    new = old + b"more"
    reads: list[tuple[int, int]] = []

    def read_base(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return old[offset : offset + length]

    for delta in (cdelta.block_delta(cdelta.signature(old), new), cdelta.zdict_delta(old, new)):
        with pytest.raises(wire.DeltaError, match="limit"):
            wire.apply_delta(delta, read_base, len(old), len(new) - 1)
    assert reads == []


def test_deflate_bomb_stops_at_the_declared_size() -> None:
    bomb = _deflate(bytes(50_000_000))
    blobs = [_block(0, 1000, b"\xd1\x0f", bomb), b"\x01\x02\x00\xe8\x07\x00\x00" + bomb]
    for blob in blobs:
        produced = 0
        with pytest.raises(wire.DeltaError):
            for chunk in wire.apply_delta(blob, lambda o, n: b"", 0, LIMIT):
                produced += len(chunk)
        assert produced <= 1000


# --------------------------------------------------------------------------- wrong base


def test_base_of_another_size_is_a_base_mismatch() -> None:
    old = make_content("text", 5000, 9)
    delta = cdelta.block_delta(cdelta.signature(old), old + b"x")
    with pytest.raises(wire.DeltaError) as caught:
        wire.apply_delta(delta, lambda o, n: old[o : o + n], len(old) + 1, LIMIT)
    assert caught.value.code == ErrorCode.BASE_MISMATCH


def test_base_that_reads_short_is_a_base_mismatch() -> None:
    old = make_content("text", 5000, 10)
    delta = cdelta.block_delta(cdelta.signature(old), old + b"x")
    with pytest.raises(wire.DeltaError) as caught:
        b"".join(wire.apply_delta(delta, lambda o, n: old[o : o + n - 1], len(old), LIMIT))
    assert caught.value.code == ErrorCode.BASE_MISMATCH


def _copied_ranges(delta: bytes) -> Iterator[tuple[int, int]]:
    """The (base_offset, length) of each copy op of a block delta."""
    _, pos = wire._parse_header(delta)
    ops_len, pos = wire._get_uvarint(delta, pos, len(delta), "ops")
    end = pos + ops_len
    copy_end = 0
    while pos < end:
        head, pos = wire._get_uvarint(delta, pos, end, "op")
        if not head & 1:
            step, pos = wire._get_uvarint(delta, pos, end, "offset")
            offset = copy_end + wire._unzigzag(step)
            copy_end = offset + (head >> 1)
            yield offset, head >> 1


@FAST
@given(
    old=contents,
    edits=edit_lists,
    corrupt=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1),
    kind=st.sampled_from(["block", "block+base", "zdict"]),
)
def test_wrong_base_is_caught_by_the_result_hash(
    old: bytes,
    edits: list[tuple[str, int, int, int]],
    corrupt: list[tuple[int, int]],
    kind: str,
) -> None:
    new = apply_edits(old, edits)
    if not old:
        return
    wrong = bytearray(old)
    for where, xor in corrupt:
        wrong[where % len(wrong)] ^= xor
    if kind == "zdict":
        delta = cdelta.zdict_delta(old, new)
    else:
        base_content = old if kind == "block+base" else None
        delta = cdelta.block_delta(cdelta.signature(old), new, base_content)
    try:
        out = apply(delta, bytes(wrong))
    except wire.DeltaError:
        return
    # The agent accepts the result only if its hash is the intended one: then it must be
    # the intended content.
    assert out == new or digest(out) != digest(new)
    if kind != "zdict":
        touched = {i for i in range(len(old)) if old[i] != wrong[i]}
        if any(o <= t < o + n for o, n in _copied_ranges(delta) for t in touched):
            assert out != new


def test_delta_applied_to_a_same_size_wrong_base_changes_the_result() -> None:
    old = make_content("text", 30_000, 11)
    new = _edit_line(old, 0.5)
    wrong = old[:1000] + b"X" + old[1001:]
    for delta in (
        cdelta.block_delta(cdelta.signature(old), new),
        cdelta.block_delta(cdelta.signature(old), new, old),
    ):
        assert apply(delta, old) == new
        assert digest(apply(delta, wrong)) != digest(new)
