"""Length-prefixed frames and the magic marker that opens each direction of a stream.

Each direction starts with `MAGIC`; then come frames, each a 4-byte big-endian payload
length followed by that many bytes. `FrameDecoder` skips stray bytes before the magic (a
remote shell may print a banner on the channel) up to a bound, and checks every length
against its limit as soon as the header arrives, before waiting for the payload.
"""

import struct
from typing import List, Optional

from lsync.protocol.errors import ErrorCode, ProtocolError

MAGIC = b"\x00LSYNC\x00\x01"
MAX_FRAME = 16 * 1024 * 1024
MAX_JUNK_BEFORE_MAGIC = 64 * 1024
_HEADER = struct.Struct(">I")


def encode_frame(payload: bytes, limit: int = MAX_FRAME) -> bytes:
    """Prefix `payload` with its length; refuses payloads the peer would reject."""
    if len(payload) > limit:
        raise ValueError("frame of {} bytes exceeds the limit of {}".format(len(payload), limit))
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frame payloads.

    Feed bytes with `feed`; collect complete payloads with `next_frame` until it returns
    None. Raises `ProtocolError` (NO_MAGIC, FRAME_TOO_LARGE) and nothing else.
    """

    def __init__(self, limit: int = MAX_FRAME, expect_magic: bool = True) -> None:
        self.limit = limit
        self._seen_magic = not expect_magic
        self._junk = bytearray()  # bytes skipped before the magic, shown in errors
        self._buffer = bytearray()
        self._pos = 0  # start of unread bytes in _buffer; compacted lazily

    @property
    def skipped(self) -> bytes:
        """Bytes that arrived before the magic marker (e.g. a login banner)."""
        return bytes(self._junk)

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos >= len(self._buffer) // 2:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer) - self._pos

    def _find_magic(self) -> bool:
        index = self._buffer.find(MAGIC)
        if index < 0:
            # Keep a tail that could be the start of the magic; the rest is junk.
            keep = len(MAGIC) - 1
            if len(self._buffer) > keep:
                self._junk += self._buffer[: len(self._buffer) - keep]
                del self._buffer[: len(self._buffer) - keep]
            if len(self._junk) > MAX_JUNK_BEFORE_MAGIC:
                raise ProtocolError(ErrorCode.NO_MAGIC, "no lsync stream start in {} bytes: {!r}"
                                    .format(len(self._junk), bytes(self._junk[:200])))
            return False
        self._junk += self._buffer[:index]
        del self._buffer[: index + len(MAGIC)]
        self._seen_magic = True
        return True

    def next_frame(self) -> Optional[bytes]:
        """The next complete payload, or None when more bytes are needed."""
        if not self._seen_magic and not self._find_magic():
            return None
        start = self._pos
        if len(self._buffer) - start < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer, start)
        if length > self.limit:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, "frame of {} bytes exceeds {}".format(
                length, self.limit))
        end = start + _HEADER.size + length
        if len(self._buffer) < end:
            return None
        with memoryview(self._buffer) as view:  # one copy, not a slice and a copy of it
            payload = bytes(view[start + _HEADER.size:end])
        self._pos = end
        return payload

    def frames(self) -> List[bytes]:
        """All complete payloads now available."""
        out: List[bytes] = []
        while True:
            frame = self.next_frame()
            if frame is None:
                return out
            out.append(frame)
