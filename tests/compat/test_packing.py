"""Chunk packing: negotiation, round trips, and refusal of malformed or oversized input."""

import zlib

from lsync.protocol import packing


def _codes():
    return [packing.CODES[name] for name in packing.available_packings()]


def test_zlib_is_always_available_and_chosen_when_nothing_else_is_common():
    assert packing.ZLIB in packing.available_packings()
    assert packing.choose_packing([]) == packing.ZLIB
    assert packing.choose_packing(["brotli", "zlib"]) == packing.ZLIB
    assert packing.choose_packing(["brotli"]) == packing.ZLIB


def test_zstd_is_chosen_first_when_this_end_has_it():
    chosen = packing.choose_packing([packing.ZSTD, packing.ZLIB])
    assert chosen == (packing.ZSTD if packing.ZSTD in packing.available_packings()
                      else packing.ZLIB)


def test_every_available_packing_round_trips():
    data = b"static int lsync_counter = 0;\n" * 3000 + bytes(range(256))
    for code in _codes():
        for level in (1, 3, 6):
            packed = packing.pack(data, code, level)
            assert len(packed) < len(data)
            assert packing.unpack(packed, code, len(data)) == data
    assert packing.unpack(b"raw", packing.PACK_RAW, 10) == b"raw"


def test_malformed_truncated_trailing_and_oversized_input_raise_packing_error():
    data = b"x" * 100000
    for code in _codes():
        packed = packing.pack(data, code, 3)
        bad_inputs = [
            (b"definitely not compressed", len(data)),
            (packed[:len(packed) // 2], len(data)),
            (packed + b"trailing", len(data)),
            (packed, len(data) - 1),  # inflates beyond the limit
            (b"", len(data)),
        ]
        for blob, limit in bad_inputs:
            try:
                packing.unpack(blob, code, limit)
            except packing.PackingError:
                continue
            raise AssertionError("accepted bad input for code {}: {!r}".format(code, blob[:20]))


def test_unknown_packing_code_is_refused():
    known = (packing.PACK_RAW, packing.PACK_ZLIB, packing.PACK_ZSTD, packing.PACK_ZLIB_DICT)
    for code in (4, 99, 2 ** 31):
        assert code not in known
        try:
            packing.unpack(zlib.compress(b"x"), code, 10)
        except packing.PackingError:
            continue
        raise AssertionError("accepted code {}".format(code))


def test_dictionary_packing_round_trips_and_needs_its_dictionary():
    zdict = b"/* SPDX-License-Identifier: GPL-2.0 */\n#include <linux/kernel.h>\n" * 100
    data = b"/* SPDX-License-Identifier: GPL-2.0 */\n#include <linux/kernel.h>\nint x;\n"
    packed = packing.pack(data, packing.PACK_ZLIB_DICT, 6, zdict)
    assert len(packed) < len(packing.pack(data, packing.PACK_ZLIB, 6))
    assert packing.unpack(packed, packing.PACK_ZLIB_DICT, 1000, zdict) == data
    for wrong in (b"", b"another dictionary entirely" * 10):
        try:
            packing.unpack(packed, packing.PACK_ZLIB_DICT, 1000, wrong)
        except packing.PackingError:
            continue
        raise AssertionError("inflated without the right dictionary")


def test_zstd_dict_delta_is_applied_or_refused_cleanly_whatever_this_python_has():
    from lsync.protocol import delta as wire
    base = b"static int probe(struct device *dev);\n" * 3
    garbage = bytes([wire.FORMAT_VERSION, wire.KIND_ZSTD_DICT, len(base), 5, 0, 10]) + b"junk"
    try:
        wire.apply_delta_to_bytes(garbage, base, 1000)
    except wire.DeltaError:
        pass
    else:
        raise AssertionError("a malformed zstd-dict delta was applied")
    if packing.ZSTD in packing.available_packings():
        new = base.replace(b"probe", b"remove", 2)
        delta = wire.encode_zstd_dict_delta(len(base), new, 0, base)
        assert wire.apply_delta_to_bytes(delta, base, 10000) == new


def test_fast_levels_make_plain_zlib_streams_with_isal_where_it_is_installed():
    data = b"static int lsync_counter = 0;\n" * 3000 + bytes(range(256))
    try:
        from isal import isal_zlib  # type: ignore[import-not-found,unused-ignore]
        fast = isal_zlib.compress
    except ImportError:
        fast = None
    assert packing.fast_zlib() == (fast is not None)
    for level in (1, 2, 4, 6):
        packed = packing.pack(data, packing.PACK_ZLIB, level)
        assert zlib.decompress(packed) == data
        assert packing.unpack(packed, packing.PACK_ZLIB, len(data)) == data
        if level in packing.FAST_ZLIB_LEVELS and fast is not None:
            assert packed == fast(data, packing.FAST_ZLIB_LEVELS[level])
        else:
            assert packed == zlib.compress(data, level)
        zdict = data[:500]
        packed = packing.pack(data, packing.PACK_ZLIB_DICT, level, zdict)
        assert packing.unpack(packed, packing.PACK_ZLIB_DICT, len(data), zdict) == data
        inflater = zlib.decompressobj(zdict=zdict)
        assert inflater.decompress(packed) == data and inflater.eof
