"""Error codes shared by both ends, and the one exception the decoder raises.

Every failure that crosses the wire is a code from `ErrorCode` plus a short human message;
tracebacks never travel. `ProtocolError` is the only exception that decoding hostile or
malformed bytes can raise.
"""

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by `Error` replies, `Goodbye` messages and `ProtocolError`."""

    # Protocol level: the connection cannot go on.
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNEXPECTED_MESSAGE = 3
    VERSION_MISMATCH = 4
    NO_MAGIC = 5
    CONNECTION_LOST = 6
    # Operation level: one operation failed, the connection goes on.
    BAD_PATH = 20
    NOT_FOUND = 21
    PERMISSION_DENIED = 22
    NO_SPACE = 23
    BASE_MISMATCH = 24
    DIGEST_MISMATCH = 25
    TYPE_CONFLICT = 26
    IO_ERROR = 27
    BAD_DELTA = 28
    ROOT_UNAVAILABLE = 29
    INTERNAL = 30  # a fault of the agent itself, never of the request
    BAD_REQUEST = 31  # well-formed but not acceptable: too many paths, chunks out of order


class AckStatus(enum.IntEnum):
    """Outcomes of an operation that succeeded, carried by `Ack`."""

    OK = 0
    KEPT_NOT_EMPTY = 1  # a directory was not removed: it holds files lsync did not sync
    ALREADY_ABSENT = 2  # a delete found nothing to delete
    SUPERSEDED = 3  # a newer write of the same path came first: this one was not applied


class ProtocolError(Exception):
    """The peer sent something this end cannot accept; the connection must end."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__("{} ({}): {}".format(code.name, int(code), message))
        self.code = code
        self.message = message
