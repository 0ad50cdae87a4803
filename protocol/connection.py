"""The sans-IO connection: one object per end that turns bytes into messages and back.

A driver (the asyncio client or the blocking agent loop) feeds received bytes with
`receive_data`, takes messages with `next_message`, queues messages with `send` and writes
out `data_to_send()`. The connection enforces the conversation's order with the table
`_TRANSITIONS` below; anything it does not allow raises `ProtocolError`:

    client: START --send Hello--> HELLO_SENT --recv Welcome--> OPEN
    agent:  START --recv Hello--> HELLO_RECEIVED --send Welcome--> OPEN
    either: any state --send/recv Goodbye--> CLOSED

The client may pipeline operations right behind its Hello (the agent handles them after
answering Welcome), so a first write costs no extra round trip.
"""

from typing import Optional

from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode, ProtocolError
from lsync.protocol.framing import MAGIC, MAX_FRAME, FrameDecoder, encode_frame

START = "START"
HELLO_SENT = "HELLO_SENT"
HELLO_RECEIVED = "HELLO_RECEIVED"
OPEN = "OPEN"
CLOSED = "CLOSED"

CLIENT = "client"
AGENT = "agent"

# (role, state, direction, message class) -> next state. `None` as class means "any
# message other than Hello, Welcome and Goodbye" (the ordinary traffic).
_TRANSITIONS = {
    (CLIENT, START, "send", m.Hello): HELLO_SENT,
    (CLIENT, HELLO_SENT, "recv", m.Welcome): OPEN,
    (CLIENT, HELLO_SENT, "send", None): HELLO_SENT,
    (CLIENT, OPEN, "send", None): OPEN,
    (CLIENT, OPEN, "recv", None): OPEN,
    (AGENT, START, "recv", m.Hello): HELLO_RECEIVED,
    (AGENT, HELLO_RECEIVED, "send", m.Welcome): OPEN,
    (AGENT, HELLO_RECEIVED, "recv", None): HELLO_RECEIVED,
    (AGENT, OPEN, "send", None): OPEN,
    (AGENT, OPEN, "recv", None): OPEN,
}

_HANDSHAKE_TYPES = (m.Hello, m.Welcome, m.Goodbye)


class Connection:
    """One end of an lsync conversation. `role` is "client" or "agent"."""

    def __init__(self, role: str, frame_limit: int = MAX_FRAME) -> None:
        if role not in (CLIENT, AGENT):
            raise ValueError("role must be 'client' or 'agent'")
        self.role = role
        self.state = START
        self.frame_limit = frame_limit
        self._peer_code = "a" if role == CLIENT else "c"
        self._decoder = FrameDecoder(frame_limit)
        self._outgoing = bytearray(MAGIC)

    # -- the order of the conversation ------------------------------------------------
    def _advance(self, direction: str, message: m.Message) -> None:
        if isinstance(message, m.Goodbye):
            self.state = CLOSED
            return
        if self.state == CLOSED:
            if direction == "send":
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "connection is closed")
            return  # late messages after a goodbye are dropped
        kind = type(message) if isinstance(message, _HANDSHAKE_TYPES) else None
        following = _TRANSITIONS.get((self.role, self.state, direction, kind))
        if following is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "{} cannot {} {} in state {}".format(
                self.role, direction, type(message).__name__, self.state))
        self.state = following

    # -- outgoing -----------------------------------------------------------------------
    def send(self, message: m.Message) -> None:
        """Queue one message; raises ProtocolError if the conversation does not allow it."""
        self._advance("send", message)
        self._outgoing += encode_frame(m.encode_message(message), self.frame_limit)

    def data_to_send(self) -> bytes:
        """Bytes the driver must write to the peer now (and forget)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -- incoming -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer. Decoding happens in `next_message`."""
        self._decoder.feed(data)

    def next_message(self) -> Optional[m.Message]:
        """The next complete message from the peer, or None. Raises only ProtocolError."""
        payload = self._decoder.next_frame()
        if payload is None:
            return None
        message = m.decode_message(payload, self._peer_code)
        self._advance("recv", message)
        return message

    def receive_eof(self) -> None:
        """The peer's stream ended; raises ProtocolError unless it ended cleanly."""
        if self.state == CLOSED:
            return
        if self._decoder.pending:
            raise ProtocolError(ErrorCode.CONNECTION_LOST, "stream ended inside a frame")
        raise ProtocolError(ErrorCode.CONNECTION_LOST, "stream ended without a goodbye")

    @property
    def skipped_output(self) -> bytes:
        """Whatever the peer printed before its stream started (shell banners)."""
        return self._decoder.skipped


# What a data lane may carry: content writes, whose order against the main stream the
# client guarantees does not matter (see lsync.client.remote.window), and pull fetches, which the
# agent answers on the lane they came on (lsync.agent.pull).
LANE_MESSAGES = (m.WriteFile, m.WriteDelta, m.WriteBatch, m.PullFetch)


class Lane:
    """A data lane: an extra one-way stream of content writes from the client to the agent
    (another SSH channel, joined to the agent through a local socket). It starts with
    `MAGIC` like the main stream, carries only `LANE_MESSAGES`, and is answered on the main
    stream (a PullFetch on the lane itself). Raises only `ProtocolError`."""

    def __init__(self, frame_limit: int = MAX_FRAME) -> None:
        self._decoder = FrameDecoder(frame_limit)

    @staticmethod
    def encode(message: m.Message, frame_limit: int = MAX_FRAME) -> bytes:
        """The bytes of one message on a lane (the client's side)."""
        if not isinstance(message, LANE_MESSAGES):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                "{} may not travel on a data lane".format(type(message).__name__))
        return encode_frame(m.encode_message(message), frame_limit)

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_message(self) -> Optional[m.Message]:
        payload = self._decoder.next_frame()
        if payload is None:
            return None
        message = m.decode_message(payload, "c")
        if not isinstance(message, LANE_MESSAGES):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                "{} arrived on a data lane".format(type(message).__name__))
        return message

    def receive_eof(self) -> None:
        """The lane ended: cleanly only between frames."""
        if self._decoder.pending:
            raise ProtocolError(ErrorCode.CONNECTION_LOST, "a data lane ended inside a frame")
