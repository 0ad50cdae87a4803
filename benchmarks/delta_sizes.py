"""Bytes on the wire for small edits: lsync's deltas next to whole-file zlib and rsync.

Prints two tables. The first has one row per case -- a one-line edit of a 20 KB C-like file,
a one-line edit and an insertion at the start of a 10 MB file (C-like text and random bytes),
and optionally the mean over real C files (`--corpus DIR`) -- with the whole file deflated,
the block delta from the signature alone, the block delta with the base content, the zdict
delta, what `make_delta` picks in each situation (None = whole file), and rsync's literal
data (before compression) and bytes sent and received for the same update
(`rsync -az --no-whole-file -I --stats` between two local directories; "received" is
mostly the block signature lsync never sends). Targets: <= 4 KB for the one-line edit and
<= 8 KB for the insertion in 10 MB, from the signature alone.

The second table compares zstd with the previous version as dictionary (`zstandard`
package, raw-content dictionary) against zlib with a preset dictionary, for the 20 KB case.

Run from the repository root: `python -m benchmarks.delta_sizes [--corpus /usr/include]`.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.testbed.trees import one_line_edit, text_of_size
from lsync.client.remote import delta as cdelta
from lsync.protocol import delta as wire

TEN_MB = 10_000_000
RENAMES = ((b"count", b"total"), (b"return", b"RETURN"))
"""Scattered edits of the 20 KB file, where the zdict kind beats block deltas."""


@dataclass
class Row:
    """Sizes in bytes for one case (means when averaged over a corpus)."""

    case: str
    size: float
    whole: float
    block: float
    block_base: float
    zdict: float | None
    pick_sig: float | None
    pick_base: float | None
    rsync_literal: float | None
    rsync_sent: float | None
    rsync_received: float | None
    encode_ms: float


def _checked(delta: bytes | None, old: bytes, new: bytes) -> int | None:
    if delta is None:
        return None
    if wire.apply_delta_to_bytes(delta, old, len(new)) != new:
        raise AssertionError("delta did not rebuild the new content")
    return len(delta)


def rsync_stats(old: bytes, new: bytes) -> tuple[int, int, int] | None:
    """(literal data, bytes sent, bytes received) for `rsync -az` updating `old` locally."""
    rsync = shutil.which("rsync")
    if rsync is None:
        return None
    with tempfile.TemporaryDirectory(prefix="lsync-delta-bench-") as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        src.mkdir()
        dst.mkdir()
        (src / "f").write_bytes(new)
        (dst / "f").write_bytes(old)
        result = subprocess.run(
            [rsync, "-az", "--no-whole-file", "-I", "--stats", f"{src}/", f"{dst}/"],
            capture_output=True,
            text=True,
            check=True,
        )

    def number(label: str) -> int:
        match = re.search(rf"{label}: ([\d,]+)", result.stdout)
        if match is None:
            raise RuntimeError(f"rsync --stats printed no {label!r}")
        return int(match.group(1).replace(",", ""))

    return number("Literal data"), number("Total bytes sent"), number("Total bytes received")


def measure(case: str, old: bytes, new: bytes, use_rsync: bool = True) -> Row:
    """Every size for one old -> new update."""
    sig = cdelta.signature(old)
    start = time.perf_counter()
    pick_sig = cdelta.make_delta(sig, new)
    encode_ms = (time.perf_counter() - start) * 1000
    pick_base = cdelta.make_delta(sig, new, old)
    small = len(new) <= cdelta.ZDICT_MAX_NEW
    stats = rsync_stats(old, new) if use_rsync else None
    block = _checked(cdelta.block_delta(sig, new), old, new)
    block_base = _checked(cdelta.block_delta(sig, new, old), old, new)
    assert block is not None and block_base is not None
    return Row(
        case=case,
        size=len(new),
        whole=len(zlib.compress(new, cdelta.WHOLE_LEVEL)),
        block=block,
        block_base=block_base,
        zdict=_checked(cdelta.zdict_delta(old, new), old, new) if small else None,
        pick_sig=_checked(pick_sig, old, new),
        pick_base=_checked(pick_base, old, new),
        rsync_literal=stats[0] if stats else None,
        rsync_sent=stats[1] if stats else None,
        rsync_received=stats[2] if stats else None,
        encode_ms=encode_ms,
    )


def mean_row(case: str, rows: list[Row]) -> Row:
    """Field-by-field means (None when any row has None)."""

    def avg(get: Callable[[Row], float | None]) -> float | None:
        values = [get(r) for r in rows]
        if any(v is None for v in values):
            return None
        return statistics.mean(v for v in values if v is not None)

    def must(get: Callable[[Row], float | None]) -> float:
        value = avg(get)
        assert value is not None
        return value

    return Row(
        case=f"{case} (mean of {len(rows)})",
        size=must(lambda r: r.size),
        whole=must(lambda r: r.whole),
        block=must(lambda r: r.block),
        block_base=must(lambda r: r.block_base),
        zdict=avg(lambda r: r.zdict),
        pick_sig=avg(lambda r: r.pick_sig),
        pick_base=avg(lambda r: r.pick_base),
        rsync_literal=avg(lambda r: r.rsync_literal),
        rsync_sent=avg(lambda r: r.rsync_sent),
        rsync_received=avg(lambda r: r.rsync_received),
        encode_ms=must(lambda r: r.encode_ms),
    )


def corpus_files(root: Path, limit: int) -> Iterator[Path]:
    """Up to `limit` C files of 10-40 KB under `root`, in a stable order."""
    found = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix not in (".c", ".h") or path.is_symlink():
                continue
            if 10_000 <= path.stat().st_size <= 40_000:
                yield path
                found += 1
                if found >= limit:
                    return


def cases(corpus: Path | None, corpus_limit: int) -> Iterator[Row]:
    """The rows of the first table."""
    small = text_of_size(20_000, seed=1, name="small.c")
    yield measure("one-line edit, 20 KB C", small, one_line_edit(small))
    for word, renamed in RENAMES:
        count = small.count(word)
        yield measure(f"rename in {count} places, 20 KB C", small, small.replace(word, renamed))
    if corpus is not None:
        rows = []
        for path in corpus_files(corpus, corpus_limit):
            old = path.read_bytes()
            rows.append(measure(path.name, old, one_line_edit(old)))
        if rows:
            yield mean_row(f"one-line edit, real C in {corpus}", rows)
    big = text_of_size(TEN_MB, seed=2)
    yield measure("one-line edit, 10 MB C", big, one_line_edit(big))
    yield measure("insert 1 line at start, 10 MB C", big, b"#include <linux/compiler.h>\n" + big)
    yield measure("insert 4 KB at start, 10 MB C", big, text_of_size(4096, seed=3) + big)
    binary = random.Random(4).randbytes(TEN_MB)
    mid = TEN_MB // 2
    yield measure(
        "change 40 bytes, 10 MB binary", binary, binary[:mid] + bytes(40) + binary[mid + 40 :]
    )
    yield measure("insert 40 bytes at start, 10 MB binary", binary, bytes(40) + binary)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}"


def print_table(rows: list[Row]) -> None:
    headers = [
        "case",
        "new size",
        "whole zlib",
        "block sig",
        "block +base",
        "zdict",
        "pick sig",
        "pick +base",
        "rsync lit",
        "rsync sent",
        "rsync recv",
        "enc ms",
    ]
    lines = [
        [
            r.case,
            _cell(r.size),
            _cell(r.whole),
            _cell(r.block),
            _cell(r.block_base),
            _cell(r.zdict),
            _cell(r.pick_sig),
            _cell(r.pick_base),
            _cell(r.rsync_literal),
            _cell(r.rsync_sent),
            _cell(r.rsync_received),
            f"{r.encode_ms:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    for line in lines:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def zstd_sizes(old: bytes, new: bytes) -> list[int]:
    """zstd frames of `new` with `old` as raw-content dictionary, at levels 3 and 19."""
    import zstandard

    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    sizes = []
    for level in (3, 19):
        frame = zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(new)
        assert zstandard.ZstdDecompressor(dict_data=dictionary).decompress(frame) == new
        sizes.append(len(frame))
    return sizes


def print_zstd_table() -> None:
    """zstd with the base as raw-content dictionary against lsync's kinds, on the 20 KB file."""
    old = text_of_size(20_000, seed=1, name="small.c")
    edits = [("one-line edit", one_line_edit(old))]
    edits += [(f"rename in {old.count(w)} places", old.replace(w, r)) for w, r in RENAMES]
    print("\nThe previous version as dictionary, 20 KB C (bytes; zstd: whole frame):")
    print(f"  {'edit':<22} {'block+base':>10} {'zlib zdict':>10} {'zstd -3':>8} {'zstd -19':>8}")
    sig = cdelta.signature(old)
    for name, new in edits:
        cells = [len(cdelta.block_delta(sig, new, old)), len(cdelta.zdict_delta(old, new))]
        try:
            cells += zstd_sizes(old, new)
        except ImportError:
            cells += [-1, -1]
        line = " ".join(f"{c:>{w}}" for c, w in zip(cells, (10, 10, 8, 8), strict=True))
        print(f"  {name:<22} {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="directory of real C files (10-40 KB used)")
    parser.add_argument("--corpus-limit", type=int, default=100)
    args = parser.parse_args(argv)
    rows = list(cases(args.corpus, args.corpus_limit))
    print("Bytes per update. whole zlib: level 6. pick sig / pick +base: what make_delta")
    print("returns from the signature alone / with the base content ('-' there: it declined,")
    print(
        "the whole file goes). rsync -az: literal data (before -z), bytes sent, bytes received.\n"
    )
    print_table(rows)
    print_zstd_table()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
