"""The fast manifest encoder writes exactly what msgpack writes (under every Python)."""

import os
import random

import msgpack

from lsync.protocol import fastpack
from lsync.protocol import messages as m


def _values(rng):
    ints = [0, 1, 31, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1,
            -1, -32, -33, -128, -129, -32768, -32769, -2 ** 31, -2 ** 31 - 1, -2 ** 63,
            rng.randrange(2 ** 62)]
    names = ["", "a", "x" * 31, "x" * 32, "y" * 255, "z" * 256, "é" * 40, "d/" * 40000,
             "naïve/日本/" + "n" * rng.randrange(100)]
    blobs = [None, b"", os.urandom(16), b"\x00" * 255, b"\x01" * 256, b"\x02" * 70000]
    return ints, names, blobs


def test_manifest_batches_encode_byte_for_byte_as_msgpack_does():
    rng = random.Random(5)
    ints, names, blobs = _values(rng)
    for round_ in range(60):
        entries = []
        for _ in range(rng.choice([0, 1, 15, 16, 17, 300])):
            entries.append([rng.choice(names), rng.choice(["f", "d", "l"]), rng.choice(ints),
                            rng.choice(ints), rng.choice(ints), rng.choice(blobs),
                            rng.choice([None] + names), rng.choice(blobs)])
        batch = m.ManifestBatch(rng.choice(ints[:8]), entries, round_ % 2 == 0)
        expected = msgpack.packb([m.code_of(m.ManifestBatch)] + list(batch), use_bin_type=True)
        assert fastpack.manifest_batch(batch) == expected == m.encode_message(batch)
    big = m.ManifestBatch(7, [["p", "f", 1, 2, 3, None, None, None]] * 70000, True)
    assert fastpack.manifest_batch(big) == m.encode_message(big)


def test_entries_of_another_shape_take_the_generic_encoder():
    odd = m.ManifestBatch(1, [["p", "f", 1, 2, 3, None, None, None, "extra"],
                              ["q", "f", True, 2, 3, None, None, None]], False)
    assert fastpack.manifest_batch(odd) == m.encode_message(odd)
