"""PathMapper: remote-root paths in a command's output become local paths, as a stream.

The reference for every streamed case is the same text fed whole and flushed; splitting it
anywhere (every byte position, one byte at a time) must give the same bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lsync.client.buildloop.pathmap import PathMapper

REMOTE = "/home/u/src/linux"
LOCAL = "/Users/me/work/linux"


def mapped(data: bytes, remote: str = REMOTE, local: str = LOCAL) -> bytes:
    mapper = PathMapper(remote, local)
    return mapper.feed(data) + mapper.flush()


def mapped_in_pieces(pieces: list[bytes]) -> bytes:
    mapper = PathMapper(REMOTE, LOCAL)
    return b"".join(mapper.feed(piece) for piece in pieces) + mapper.flush()


GCC = (b"\x1b[01m\x1b[K/home/u/src/linux/drivers/net/x.c:12:3:\x1b[m\x1b[K "
       b"\x1b[01;31m\x1b[Kerror: \x1b[m\x1b[K'foo' undeclared\n")
MAKE = (b"make[1]: Entering directory '/home/u/src/linux'\n"
        b"  CC      drivers/net/x.o\n"
        b"In file included from /home/u/src/linux/include/linux/kernel.h:5,\n"
        b"gcc -I/home/u/src/linux/include -Wp,-MD,/home/u/src/linux/.x.o.d -c x.c\n"
        b"/home/u/src/linux2/y.c: not ours\n"
        b"/mnt/home/u/src/linux/z.c: not ours either\n"
        b"relative drivers/net/x.c:1: left alone\n"
        b"make[1]: Leaving directory '/home/u/src/linux'")


def test_error_line_is_rewritten_and_colours_kept() -> None:
    assert mapped(GCC) == GCC.replace(b"/home/u/src/linux/", b"/Users/me/work/linux/")


def test_make_output() -> None:
    assert mapped(MAKE) == (
        b"make[1]: Entering directory '/Users/me/work/linux'\n"
        b"  CC      drivers/net/x.o\n"
        b"In file included from /Users/me/work/linux/include/linux/kernel.h:5,\n"
        b"gcc -I/Users/me/work/linux/include -Wp,-MD,/Users/me/work/linux/.x.o.d -c x.c\n"
        b"/home/u/src/linux2/y.c: not ours\n"
        b"/mnt/home/u/src/linux/z.c: not ours either\n"
        b"relative drivers/net/x.c:1: left alone\n"
        b"make[1]: Leaving directory '/Users/me/work/linux'")


def test_longer_name_starting_with_the_root_is_not_rewritten() -> None:
    for text in (b"/home/u/src/linux2/x.c", b"/home/u/src/linux.old/x.c",
                 b"/home/u/src/linux-6.1/x.c", b"/home/u/src/linux_x"):
        assert mapped(text) == text
        assert mapped(text + b"\n") == text + b"\n"


def test_root_alone_at_end_of_stream_and_before_separators() -> None:
    assert mapped(b"/home/u/src/linux") == LOCAL.encode()
    for after in (b" ", b":", b"'", b'"', b")", b"\n", b"\x1b[m", b",", b"\t"):
        assert mapped(b"cd /home/u/src/linux" + after) == b"cd " + LOCAL.encode() + after


def test_everything_else_is_byte_identical() -> None:
    data = bytes(range(256)) * 3 + b"/home/u/src/lin" + b"\xff\xfe/home/u/src\n"
    assert mapped(data) == data


def test_trailing_slash_in_roots_is_ignored() -> None:
    assert mapped(b"/home/u/src/linux/a.c\n", REMOTE + "/", LOCAL + "/") == (
        LOCAL.encode() + b"/a.c\n")


def test_splits_at_every_byte_position() -> None:
    data = MAKE + b"\n" + GCC + b"/home/u/src/linux"
    whole = mapped(data)
    for cut in range(len(data) + 1):
        assert mapped_in_pieces([data[:cut], data[cut:]]) == whole, cut
    assert mapped_in_pieces([data[i:i + 1] for i in range(len(data))]) == whole
    for cut in range(0, len(data), 7):  # three pieces
        assert mapped_in_pieces([data[:cut], data[cut:cut + 11], data[cut + 11:]]) == whole


def test_a_complete_line_is_never_delayed() -> None:
    mapper = PathMapper(REMOTE, LOCAL)
    for line in (MAKE + b"\n" + GCC + b"cd /home/u/src/linux\n").splitlines(keepends=True):
        assert mapper.feed(line) == mapped(line)  # all of it, at once
    mapper = PathMapper(REMOTE, LOCAL)
    out = mapper.feed(b"x /home/u/src/li")
    assert out == b"x "  # a possible start of the root is held...
    out = mapper.feed(b"nux/a.c:1: error\n")
    assert out == LOCAL.encode() + b"/a.c:1: error\n"
    assert mapper.flush() == b""


def test_held_bytes_are_at_most_the_root() -> None:
    mapper = PathMapper(REMOTE, LOCAL)
    assert mapper.feed(b"abc /home/u/src/linux") == b"abc "  # the root waits for one byte
    assert mapper.feed(b"2") == b"/home/u/src/linux2"
    assert mapper.feed(b"/home/u") == b""
    assert mapper.feed(b"/x") == b"/home/u/x"
    assert mapper.flush() == b""


def test_held_prefix_is_released_by_a_newline() -> None:
    mapper = PathMapper(REMOTE, LOCAL)
    assert mapper.feed(b"see /home/u/sr") == b"see "
    assert mapper.feed(b"\n") == b"/home/u/sr\n"


def test_flush_releases_a_partial_prefix_unchanged_and_the_root_mapped() -> None:
    mapper = PathMapper(REMOTE, LOCAL)
    assert mapper.feed(b"cd /home/u/src/lin") == b"cd "
    assert mapper.flush() == b"/home/u/src/lin"
    assert mapper.feed(b" /home/u/src/linux") == b" "
    assert mapper.flush() == LOCAL.encode()
    assert mapper.flush() == b""


def test_root_inside_a_longer_path_across_a_chunk_boundary() -> None:
    data = b"x" * 5000 + b" /mnt" + b"/home/u/src/linux/a.c\n"
    whole = mapped(data)
    assert whole == data
    for cut in range(4990, len(data)):
        assert mapped_in_pieces([data[:cut], data[cut:]]) == whole, cut


def test_repeated_and_adjacent_roots() -> None:
    data = b"/home/u/src/linux/home/u/src/linux /home/u/src/linux:/home/u/src/linux\n"
    assert mapped(data) == (LOCAL.encode() + b"/home/u/src/linux " + LOCAL.encode() + b":"
                            + LOCAL.encode() + b"\n")


def test_bad_roots_are_refused() -> None:
    for root in ("relative/dir", "/", "", "/a\nb"):
        with pytest.raises(ValueError):
            PathMapper(root, LOCAL)


SEPARATORS = b" \t\n\r\v\f'\"`()[]{}<>:,;=|&" + bytes(range(0x20)) + b"\x7f"


def reference(data: bytes) -> bytes:
    """The rule, written plainly for a whole text (no streaming, no look-back bound)."""
    root, local = REMOTE.encode(), LOCAL.encode()
    out = bytearray()
    i = 0
    while i < len(data):
        end = i + len(root)
        if data.startswith(root, i) and (end == len(data) or data[end] in SEPARATORS + b"/"):
            k = i - 1
            while k >= 0 and data[k] not in SEPARATORS and data[k] != ord("/"):
                k -= 1
            if k < 0 or data[k] != ord("/"):
                out += local
                i = end
                continue
        out.append(data[i])
        i += 1
    return bytes(out)


PIECES = [REMOTE.encode(), REMOTE.encode()[:7], b"/", b"2", b" ", b"\n", b":", b"x", b"/mnt",
          b"\x1b[K", b"'", b"-I", b"\xc3\xa9"]


@given(st.lists(st.sampled_from(PIECES), max_size=30),
       st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_streaming_matches_the_plain_rule(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    bounds = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    assert mapped_in_pieces(chunks) == reference(data)
