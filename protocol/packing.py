"""How whole-file chunks are compressed on the wire, and the negotiation of it.

"zlib" is always there (the standard library). "zstd" is used where both ends have it: the
standard library's `compression.zstd` from Python 3.14, or the `zstandard` package. The
client offers its list in order of preference; the agent picks the first it can unpack
(`choose_packing`). A `WriteFile` names its chunk's packing with one of the PACK_* codes.

zlib's burst levels (1 to 4) are made by ISA-L's deflate where the `isal` package is
installed (a dependency of the client; never needed to unpack): ISA-L's levels 1, 2, 3 and
3, a plain zlib stream that any zlib inflates. On the kernel's sources ISA-L's level 1 costs
a quarter of zlib's level 1 for a slightly better ratio (3.59 against 3.54), its level 3 a
third of zlib's level 4 for 7% more bytes (3.78 against 4.05).

`unpack` is the one place compressed input is opened: it inflates to at most `limit` bytes
and raises `PackingError` for anything malformed, truncated, trailing or too large, never
another exception. This module only transforms bytes (no I/O).
"""

import zlib
from typing import Any, Callable, Dict, List, Optional

ZLIB = "zlib"
ZSTD = "zstd"

PACK_RAW = 0
PACK_ZLIB = 1
PACK_ZSTD = 2
PACK_ZLIB_DICT = 3  # zlib with the preset dictionary the client set for the session
CODES = {ZLIB: PACK_ZLIB, ZSTD: PACK_ZSTD}


class PackingError(Exception):
    """Compressed data that is malformed or inflates beyond its limit."""


Backend = Dict[str, Callable[..., Any]]


def _std_backend() -> Optional[Backend]:
    try:
        from compression import zstd as std_zstd  # type: ignore[import-not-found]
    except ImportError:
        return None

    def std_pack(data: bytes, level: int) -> bytes:
        return bytes(std_zstd.compress(data, level=level))

    def std_unpack(data: bytes, limit: int) -> bytes:
        decompressor = std_zstd.ZstdDecompressor()
        out = decompressor.decompress(data, max_length=limit)
        if not decompressor.eof or decompressor.unused_data or len(out) > limit:
            raise PackingError("zstd frame is truncated, has trailing data or exceeds "
                               "{} bytes".format(limit))
        return bytes(out)

    def std_dict_pack(data: bytes, level: int, dictionary: bytes) -> bytes:
        zdict = std_zstd.ZstdDict(dictionary, is_raw=True)
        return bytes(std_zstd.compress(data, level=level, zstd_dict=zdict))

    def std_dict_unpack(data: bytes, dictionary: bytes, size: int) -> bytes:
        zdict = std_zstd.ZstdDict(dictionary, is_raw=True)
        decompressor = std_zstd.ZstdDecompressor(zstd_dict=zdict)
        out = decompressor.decompress(data, max_length=size)
        if not decompressor.eof or decompressor.unused_data or len(out) != size:
            raise PackingError("zstd frame is truncated, has trailing data or is not "
                               "{} bytes".format(size))
        return bytes(out)

    return {"pack": std_pack, "unpack": std_unpack, "dict_pack": std_dict_pack,
            "dict_unpack": std_dict_unpack}


def _package_backend() -> Optional[Backend]:
    try:
        import zstandard  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None

    def pkg_pack(data: bytes, level: int) -> bytes:
        return bytes(zstandard.ZstdCompressor(level=level).compress(data))

    def frame_size(data: bytes) -> int:
        try:
            return int(zstandard.frame_content_size(data))
        except zstandard.ZstdError as exc:
            raise PackingError("bad zstd data: {}".format(exc))

    def decompress(data: bytes, size: int, zdict: Any = None) -> bytes:
        # The frame header states the content size and zstd checks the content against it,
        # so nothing beyond `size` (checked by the caller) is ever inflated.
        maker = zstandard.ZstdDecompressor(dict_data=zdict) if zdict is not None \
            else zstandard.ZstdDecompressor()
        decompressor = maker.decompressobj()
        try:
            out = decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            raise PackingError("bad zstd data: {}".format(exc))
        if len(out) != size or not decompressor.eof or decompressor.unused_data:
            raise PackingError("zstd frame is truncated or has trailing data")
        return bytes(out)

    def pkg_unpack(data: bytes, limit: int) -> bytes:
        size = frame_size(data)
        if size < 0 or size > limit:
            raise PackingError("zstd frame of unknown size or over {} bytes".format(limit))
        return decompress(data, size)

    def raw_dict(dictionary: bytes) -> Any:
        return zstandard.ZstdCompressionDict(dictionary,
                                             dict_type=zstandard.DICT_TYPE_RAWCONTENT)

    def pkg_dict_pack(data: bytes, level: int, dictionary: bytes) -> bytes:
        compressor = zstandard.ZstdCompressor(level=level, dict_data=raw_dict(dictionary))
        return bytes(compressor.compress(data))

    def pkg_dict_unpack(data: bytes, dictionary: bytes, size: int) -> bytes:
        declared = frame_size(data)
        if declared != size:
            raise PackingError("zstd frame of {} bytes, expected {}".format(declared, size))
        return decompress(data, size, raw_dict(dictionary))

    return {"pack": pkg_pack, "unpack": pkg_unpack, "dict_pack": pkg_dict_pack,
            "dict_unpack": pkg_dict_unpack}


def _zstd_backend() -> Optional[Backend]:
    """The first zstd implementation that passes a round trip here (an interpreter whose
    module behaves unlike what this code expects offers zlib only, rather than failing)."""
    sample = b"lsync zstd self-test\n" * 64
    for make in (_std_backend, _package_backend):
        try:
            backend = make()
            if backend is None:
                continue
            packed = backend["dict_pack"](sample, 3, sample[:100])
            if backend["unpack"](backend["pack"](sample, 3), len(sample)) == sample and \
                    backend["dict_unpack"](packed, sample[:100], len(sample)) == sample:
                return backend
        except Exception:  # any surprise means: not usable here
            continue
    return None


_ZSTD = _zstd_backend()

# zlib's levels made by ISA-L's deflate where it is installed, and ISA-L's level for each
FAST_ZLIB_LEVELS = {1: 1, 2: 2, 3: 3, 4: 3}


def _fast_zlib() -> Optional[Callable[[bytes, int, bytes], bytes]]:
    """ISA-L's zlib-format deflate (the `isal` package), with a preset dictionary or
    without, if installed and it makes streams that this zlib inflates; None otherwise."""
    try:
        from isal import isal_zlib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None

    def deflate(data: bytes, zlib_level: int, zdict: bytes) -> bytes:
        level = FAST_ZLIB_LEVELS[zlib_level]
        if not zdict:
            return isal_zlib.compress(data, level)  # type: ignore[no-any-return,unused-ignore]
        packer = isal_zlib.compressobj(level, isal_zlib.DEFLATED, isal_zlib.MAX_WBITS, 9,
                                       isal_zlib.Z_DEFAULT_STRATEGY, zdict)
        return packer.compress(data) + packer.flush()  # type: ignore[no-any-return,unused-ignore]

    sample = b"lsync isal self-test\n" * 64 + bytes(range(256))
    try:
        for level in FAST_ZLIB_LEVELS:
            if zlib.decompress(deflate(sample, level, b"")) != sample:
                return None
            inflater = zlib.decompressobj(zdict=sample[:100])
            if inflater.decompress(deflate(sample, level, sample[:100])) != sample:
                return None
    except Exception:  # any surprise means: not usable here
        return None
    return deflate


_FAST_ZLIB = _fast_zlib()


def fast_zlib() -> bool:
    """Whether zlib's fastest levels are made by ISA-L here."""
    return _FAST_ZLIB is not None


def available_packings() -> List[str]:
    """Packings this process can both produce and unpack, best first."""
    return [ZSTD, ZLIB] if _ZSTD is not None else [ZLIB]


def choose_packing(offered: List[str]) -> str:
    """The first offered packing this process supports; zlib when none is."""
    mine = available_packings()
    for name in offered:
        if name in mine:
            return name
    return ZLIB


def zstd_dict_pack(data: bytes, level: int, dictionary: bytes) -> bytes:
    """`data` as one zstd frame compressed with `dictionary` (raw content) preset."""
    if _ZSTD is None:
        raise PackingError("zstd is not available here")
    return _ZSTD["dict_pack"](data, level, dictionary)  # type: ignore[no-any-return]


def zstd_dict_unpack(data: bytes, dictionary: bytes, size: int) -> bytes:
    """The `size` bytes a `zstd_dict_pack` frame holds; PackingError for anything else."""
    if _ZSTD is None:
        raise PackingError("zstd is not available here")
    try:
        return _ZSTD["dict_unpack"](data, dictionary, size)  # type: ignore[no-any-return]
    except PackingError:
        raise
    except Exception as exc:  # the backend's own error types
        raise PackingError("bad zstd data: {}".format(exc))


def pack(data: bytes, code: int, level: int, zdict: bytes = b"") -> bytes:
    """Compress `data` with the packing `code` at `level` (`zdict`: the preset dictionary
    of PACK_ZLIB_DICT)."""
    if code == PACK_ZLIB:
        if _FAST_ZLIB is not None and level in FAST_ZLIB_LEVELS:
            return _FAST_ZLIB(data, level, b"")
        return zlib.compress(data, level)
    if code == PACK_ZLIB_DICT and zdict:
        if _FAST_ZLIB is not None and level in FAST_ZLIB_LEVELS:
            return _FAST_ZLIB(data, level, zdict)
        packer = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9,
                                  zlib.Z_DEFAULT_STRATEGY, zdict)
        return packer.compress(data) + packer.flush()
    if code == PACK_ZSTD and _ZSTD is not None:
        return _ZSTD["pack"](data, level)  # type: ignore[no-any-return]
    raise PackingError("packing {} is not available here".format(code))


def unpack(data: bytes, code: int, limit: int, zdict: bytes = b"") -> bytes:
    """The content of a packed chunk, at most `limit` bytes; PackingError otherwise."""
    if code == PACK_RAW:
        return data
    if code in (PACK_ZLIB, PACK_ZLIB_DICT):
        if code == PACK_ZLIB_DICT and not zdict:
            raise PackingError("chunk needs the session's dictionary, and none was set")
        inflater = zlib.decompressobj(zdict=zdict) if code == PACK_ZLIB_DICT \
            else zlib.decompressobj()
        try:
            out = inflater.decompress(data, limit)
        except (zlib.error, ValueError) as exc:
            raise PackingError("bad zlib data: {}".format(exc))
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise PackingError("zlib stream is truncated, has trailing data or exceeds "
                               "{} bytes".format(limit))
        return out
    if code == PACK_ZSTD and _ZSTD is not None:
        try:
            return _ZSTD["unpack"](data, limit)  # type: ignore[no-any-return]
        except PackingError:
            raise
        except Exception as exc:  # the backend's own error types
            raise PackingError("bad zstd data: {}".format(exc))
    raise PackingError("unknown or unavailable packing {}".format(code))
