"""Operations in flight, and what each reply means: the pure half of the ack path.

`Window` maps the sequence number of every operation sent and not yet answered to what it
was about (`InFlight`), and bounds how many operations and how many wire bytes may be
unanswered at once (backpressure and bounded memory). It also keeps the rule of the data
lanes (extra channels that carry content writes beside the main stream, in no order
against it): a content write may take a side lane only when nothing in flight on the main
stream touches its path or a directory above it (`lane_for`), and an operation for the
main stream must wait while side-lane writes at or below its path are unanswered
(`side_busy`). Content writes of one path may travel on different lanes: the agent applies
them in sequence order (an older one arriving late is answered SUPERSEDED, not applied),
so every path still ends as the last write sent says. `verdict` turns one reply into what
the engine must do about it — count a synced file, forget what the model believed about some
remote paths, look at some local paths again, report a failure, retry later — without
touching anything itself. No asyncio, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from lsync.client.remote.model import RemoteEntry
from lsync.protocol import messages as m
from lsync.protocol.errors import AckStatus, ErrorCode

WINDOW_OPS = 16384
WINDOW_BYTES = 32 << 20  # of content in operations not yet acknowledged (memory at long RTTs)


class Op(Enum):
    WRITE = "write"  # WriteFile or WriteDelta: content
    COPY = "copy"
    RENAME = "rename"
    DELETE = "delete"
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    SET_MODE = "set-mode"
    DICTIONARY = "dictionary"


@dataclass(slots=True)
class InFlight:
    owner: str  # the local path whose pass sent it (its PathQueue record counts it)
    op: Op
    target: str  # the remote path it changes (the destination of a copy or rename)
    since: float  # when the change it carries was seen (latency)
    src: str = ""  # copy, rename: the remote path the content comes from
    nbytes: int = 0  # content bytes it syncs
    wire: int = 0  # bytes it takes on the wire: what the window bounds
    lane: int = 0  # 0: the main stream; else the data lane that carries it
    # A delete: the model's entry it dropped when sent, put back if the delete is refused
    # (so that the retry deletes it again).
    dropped: RemoteEntry | None = None


class Window:
    def __init__(self, max_ops: int = WINDOW_OPS, max_bytes: int = WINDOW_BYTES) -> None:
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.flights: dict[int, InFlight] = {}
        self.wire_bytes = 0
        self._main_at: dict[str, int] = {}  # path -> main-stream ops on it (not Mkdir)
        self._side_under: dict[str, int] = {}  # path -> side-lane writes at or below it

    def __len__(self) -> int:
        return len(self.flights)

    def has_space(self) -> bool:
        return len(self.flights) < self.max_ops and self.wire_bytes < self.max_bytes

    def add(self, seq: int, flight: InFlight) -> None:
        self.flights[seq] = flight
        self.wire_bytes += flight.wire
        self._count(flight, 1)

    def answer(self, seq: int) -> InFlight | None:
        """The operation `seq` was answered: its record, or None if it was not in flight."""
        flight = self.flights.pop(seq, None)
        if flight is not None:
            self.wire_bytes -= flight.wire
            self._count(flight, -1)
        return flight

    # -- data lanes -------------------------------------------------------------------------
    def lane_for(self, path: str, wanted: int) -> int:
        """The lane a content write of `path` may take, given the one `wanted` (0: main):
        main when a main-stream operation on it or a directory above it is unanswered,
        else `wanted`."""
        if wanted and self._main_at:
            probe = path
            while probe:
                if probe in self._main_at:
                    return 0
                probe = probe.rpartition("/")[0]
        return wanted

    def side_busy(self, path: str) -> bool:
        """Whether side-lane writes at or below `path` are unanswered ("": anywhere)."""
        if not path:
            return bool(self._side_under)
        return path in self._side_under

    def _count(self, flight: InFlight, step: int) -> None:
        if flight.lane == 0:
            if flight.op is not Op.MKDIR and flight.op is not Op.DICTIONARY:
                _bump(self._main_at, flight.target, step)
                if flight.src:
                    _bump(self._main_at, flight.src, step)
            return
        path = flight.target
        while path:
            _bump(self._side_under, path, step)
            path = path.rpartition("/")[0]


def _bump(counts: dict[str, int], key: str, step: int) -> None:
    value = counts.get(key, 0) + step
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)



@dataclass(slots=True)
class Verdict:
    """What one reply means for the engine."""

    ok: bool  # the operation did what was asked
    synced_file: bool = False  # count it as a file synced (content written)
    note: str = ""  # tell the user this (not an error)
    failure: str = ""  # report this as a failure of `InFlight.target`
    unknown: list[str] = field(default_factory=list)  # remote paths whose content is unknown now
    look_again: list[str] = field(default_factory=list)  # local paths to look at again now
    retry_later: bool = False  # the owner's path failed: retry it with backoff
    drop_dictionary: bool = False  # the agent refused the preset dictionary


# Errors after which looking again at once fixes things (the content is sent whole).
_FALLBACKS = (ErrorCode.BASE_MISMATCH, ErrorCode.DIGEST_MISMATCH)


def verdict(flight: InFlight, reply: m.Ack | m.Error, dictionary_failed: bool = False,
            below: list[str] | None = None) -> Verdict:
    """What `reply` to `flight` implies. `below`: for a rename, the model's paths at and
    below its destination; `dictionary_failed`: the preset dictionary was refused earlier."""
    if isinstance(reply, m.Ack):
        note = reply.detail if reply.status == AckStatus.KEPT_NOT_EMPTY else ""
        applied = reply.status != AckStatus.SUPERSEDED  # a newer write of it came first
        return Verdict(True, synced_file=flight.op is Op.WRITE and applied, note=note)
    if flight.op is Op.DICTIONARY:
        # Chunks packed with it are refused: those are sent again without it.
        return Verdict(False, drop_dictionary=True)
    if dictionary_failed and flight.op is Op.WRITE and reply.code == ErrorCode.BAD_DELTA:
        return Verdict(False, unknown=[flight.target], look_again=[flight.target])
    if flight.op is Op.RENAME:
        moved = below if below is not None else [flight.target]
        return Verdict(False, failure=reply.message, unknown=moved, look_again=moved,
                       note=f"{flight.src} stays on the remote (the rename failed); "
                            f"{flight.target} is sent whole")
    if flight.op is Op.COPY and reply.code in (*_FALLBACKS, ErrorCode.NOT_FOUND):
        # Its source was not what we thought (changed, or gone): look at both again; with
        # the source's digest forgotten, the retry sends the content. Not an error for the
        # user: lsync's own guess (the content is there) was stale. Any other refusal (the
        # destination cannot be written) is a failure like a write's, retried with backoff.
        return Verdict(False, unknown=[flight.src, flight.target],
                       look_again=[flight.src, flight.target])
    if reply.code in _FALLBACKS:
        return Verdict(False, failure=reply.message, unknown=[flight.target],
                       look_again=[flight.target])
    return Verdict(False, failure=reply.message, unknown=[flight.target], retry_later=True)
