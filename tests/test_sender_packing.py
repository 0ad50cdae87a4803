"""How bursts are packed: raw over a short link while it keeps up, zlib otherwise."""

from __future__ import annotations

import itertools
import zlib

import pytest

from lsync.client.remote import sender
from lsync.client.remote.sender import RAW, Packing, content_messages, pieces_of
from lsync.client.transport import outbox
from lsync.client.transport.outbox import SharedBatches, pack_batch
from lsync.protocol import packing

SOURCE = b"".join(b"static int lsync_%d(void) { return %d; }\n" % (i, i) for i in range(5000))


@pytest.fixture
def without_isal(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where the `isal` package is not installed."""
    monkeypatch.setattr(sender, "_SHORT_LINK_BULK", {packing.ZLIB: (RAW, 1)})


def test_a_short_link_goes_raw_only_where_zlib_level_1_is_zlib_s_own() -> None:
    short = Packing(packing.ZLIB, long_link=False)
    if packing.fast_zlib():
        assert (short.bulk, short.long_bulk) == (1, 4)  # ISA-L: cheaper than the bytes
    else:
        assert (short.bulk, short.long_bulk) == (RAW, 1)


@pytest.mark.usefixtures("without_isal")
def test_a_burst_over_a_short_link_travels_raw_until_the_link_falls_behind() -> None:
    short = Packing(packing.ZLIB, long_link=False)
    assert short.bulk == RAW and short.long_bulk == 1
    code, level, _ = short.packer(burst=True)
    assert level == RAW
    pieces = pieces_of(SOURCE, short.packer(burst=True))
    assert [piece for piece, _ in pieces] == [SOURCE]
    assert {code for _, code in pieces} == {packing.PACK_RAW}
    assert pack_batch(SOURCE, code, short.bulk) == (SOURCE, packing.PACK_RAW)
    packed, used = pack_batch(SOURCE, code, short.long_bulk)  # the link fell behind
    assert used == packing.PACK_ZLIB and zlib.decompress(packed) == SOURCE


def test_a_burst_over_a_long_link_and_a_single_save_are_compressed() -> None:
    long = Packing(packing.ZLIB, long_link=True)
    assert (long.bulk, long.long_bulk, long.single) == (1, 4, 6)
    short = Packing(packing.ZLIB, long_link=False)
    for packer in (long.packer(burst=True), short.packer(burst=False)):
        assert packer[1] != RAW
        [(data, code)] = pieces_of(SOURCE, packer)
        assert code == packing.PACK_ZLIB and len(data) < len(SOURCE) // 4
        [message] = content_messages(1, "a.c", 0o644, [(data, code)])
        assert packing.unpack(message.data, message.packing, len(SOURCE)) == SOURCE


def test_a_burst_compresses_harder_only_once_its_data_waits_for_the_link() -> None:
    """On a long link too (the big files of a burst as its batches): the CPU, not the link,
    bounds an initial sync over an uncapped long link."""
    long = Packing(packing.ZLIB, long_link=True)
    assert long.packer(burst=True)[1] == long.bulk
    assert long.packer(burst=True, backlogged=True)[1] == long.long_bulk
    assert long.packer(burst=False, backlogged=True)[1] == long.single
    # What a file read ahead was compressed with travels if it is a burst level of now.
    assert long.of_burst(long.packer(burst=True))
    assert long.of_burst(long.packer(burst=True, backlogged=True))
    assert not long.of_burst(long.packer(burst=False))
    before = long.packer(burst=True)
    long.dictionary = b"int lsync;\n" * 200
    assert not long.of_burst(before)  # made without the preset dictionary that came since
    assert long.of_burst(long.packer(burst=True))


@pytest.mark.usefixtures("without_isal")
def test_the_burst_levels_follow_a_later_verdict_on_the_link() -> None:
    packer = Packing(packing.ZLIB, long_link=True)
    packer.set_long_link(False)
    assert (packer.bulk, packer.long_bulk, packer.single) == (RAW, 1, 6)
    packer.set_long_link(True)
    assert (packer.bulk, packer.long_bulk, packer.single) == (1, 4, 6)
    zstd = Packing(packing.ZSTD, long_link=False)  # zstd is cheap: compressed on any link
    assert (zstd.bulk, zstd.long_bulk) == (3, 6)


def test_a_batch_given_as_its_files_contents_is_joined_and_packed_alike() -> None:
    contents = [SOURCE[:1000], b"", SOURCE[1000:]]
    for level in (RAW, 1, 4):
        assert pack_batch(contents, packing.PACK_ZLIB, level) == \
            pack_batch(SOURCE, packing.PACK_ZLIB, level)


def test_with_several_targets_a_batch_is_one_zlib_stream_of_segments_the_targets_share(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The second target's batch holds the same file versions (the same bytes objects:
    read once) but starts and ends elsewhere: it takes the segments the first packed
    (but the few at its edges), and both inflate to their files with plain zlib."""
    monkeypatch.setattr(packing, "fast_zlib", lambda: False)  # (segments are zlib's own)
    monkeypatch.setattr(packing, "_FAST_ZLIB", None)  # (and so is the whole batch's packing)
    shared = SharedBatches()
    shared.sharers = lambda: 2
    files = [b"".join(b"static int f_%d_%d(void) { return %d; }\n" % (n, i, i * n)
                      for i in range(40 + n % 300)) for n in range(600)]
    first = files[:500]
    second = files[7:480]  # cut elsewhere
    made = []
    for batch in (first, second):
        data, code = pack_batch(batch, packing.PACK_ZLIB, 4, shared)
        assert code == packing.PACK_ZLIB
        assert zlib.decompress(data) == b"".join(batch)
        assert packing.unpack(data, code, 1 << 30) == b"".join(batch)
        alone = len(pack_batch(b"".join(batch), packing.PACK_ZLIB, 4)[0])
        assert len(data) < alone * 1.02  # (each segment's dictionary: what precedes it)
        made.append(shared.made)
    packed_again = made[1] - made[0]  # by the second target: the segments at its edges
    # Those are its last segment and the ones that begin within its first window's worth of
    # bytes (their dictionary, what precedes them, is cut short by the batch's start). Cuts
    # follow the files' objects, so how many that is varies from run to run (1 to 6).
    starts = [0, *outbox._cuts(second)[:-1]]
    offsets = list(itertools.accumulate(map(len, second), initial=0))
    at_edges = sum(1 for start in starts if offsets[start] < outbox._WINDOW) + 1
    assert shared.taken > 10 and packed_again <= at_edges
    one = SharedBatches()  # with one target: packed whole, as before
    assert pack_batch(first, packing.PACK_ZLIB, 4, one) == pack_batch(
        b"".join(first), packing.PACK_ZLIB, 4)
    assert one.made == 0
