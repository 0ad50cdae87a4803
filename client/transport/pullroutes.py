"""Where the link delivers pull messages (lsync.client.buildloop.pull): one callback per pull's seq.

The agent answers a pull on the main stream (listings) or on the data lane its fetch took
(`PullData` pieces and a `PullDone`); `PullRoutes` decodes what a lane carries back (frames
after the lane's magic, only `messages.PULL_LANE_MESSAGES`), and hands each message to the
callback of its seq. A message for a seq nobody opened, or anything else on a lane's way
back, is the agent breaking the protocol: `ProtocolError`, which ends the link. `end()`
tells every open pull, once, that the link ended (None).
"""

from __future__ import annotations

from collections.abc import Callable

from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode, ProtocolError
from lsync.protocol.framing import FrameDecoder

OnMessage = Callable[[m.Message | None], None]


class PullRoutes:
    def __init__(self) -> None:
        self._routes: dict[int, OnMessage] = {}
        self._lanes: dict[int, FrameDecoder] = {}  # lane number -> its stream back

    def __bool__(self) -> bool:
        """Whether a pull waits for the agent (liveness counts it as awaited)."""
        return bool(self._routes)

    def __contains__(self, seq: int) -> bool:
        return seq in self._routes

    def open(self, seq: int, on_message: OnMessage) -> None:
        self._routes[seq] = on_message

    def close(self, seq: int) -> None:
        self._routes.pop(seq, None)

    def deliver(self, message: m.Message) -> None:
        """A PullListing, PullData, PullDone, or an Error of a pull's seq."""
        seq = getattr(message, "seq", None)
        target = self._routes.get(seq) if isinstance(seq, int) else None
        if target is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                f"{type(message).__name__} for unknown pull {seq}")
        target(message)

    def lane_data(self, number: int, data: bytes) -> None:
        """Bytes that data lane `number` carried back: delivered as they complete."""
        decoder = self._lanes.setdefault(number, FrameDecoder())
        decoder.feed(data)
        while (payload := decoder.next_frame()) is not None:
            message = m.decode_message(payload, "a")
            if not isinstance(message, m.PULL_LANE_MESSAGES):
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"{type(message).__name__} on data lane {number}")
            self.deliver(message)

    def end(self) -> None:
        routes, self._routes = list(self._routes.values()), {}
        for on_message in routes:
            on_message(None)
