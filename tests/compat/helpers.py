"""Wiring for compat tests: a client `Connection` talking to an in-process `AgentService`."""

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, List, Optional

from lsync.agent.service import AgentService, SessionEnd
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, CLIENT, Connection


class Pair:
    """Client connection and agent core joined by byte buffers.

    `pump` moves bytes both ways until nothing moves; with byte_at_a_time every byte is
    fed separately, which exercises every partial-frame path of the decoder.
    """

    def __init__(self, root: str, byte_at_a_time: bool = False, use_cache: bool = False,
                 now_ns: Optional[Callable[[], int]] = None,
                 hashes: Optional[List[str]] = None) -> None:
        self.client = Connection(CLIENT)
        self.agent_conn = Connection(AGENT)
        self.byte_at_a_time = byte_at_a_time
        self.service = AgentService(self.agent_conn.send, lambda: None,
                                    now_ns or (lambda: 10 ** 18), use_cache=use_cache)
        self.received: List[m.Message] = []
        self.ended: Optional[SessionEnd] = None
        self.client.send(m.Hello(PROTOCOL_VERSION,
                                 {"hash": hashes or ["xxh3-128", "blake2b-128"]},
                                 root, {"create_root": True}))

    def _feed(self, conn: Connection, data: bytes) -> None:
        if self.byte_at_a_time:
            for i in range(len(data)):
                conn.receive_data(data[i:i + 1])
        else:
            conn.receive_data(data)

    def pump(self) -> List[m.Message]:
        moved = True
        while moved:
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                self._feed(self.agent_conn, data)
                while True:
                    msg = self.agent_conn.next_message()
                    if msg is None:
                        break
                    try:
                        self.service.handle(msg)
                    except SessionEnd as end:
                        self.ended = end
            self.service.journal()  # as the agent's driver does before answers leave
            back = self.agent_conn.data_to_send()
            if back:
                moved = True
                self._feed(self.client, back)
                while True:
                    msg = self.client.next_message()
                    if msg is None:
                        break
                    self.received.append(msg)
        out, self.received = self.received, []
        return out

    def op(self, message: Any) -> Any:
        """Send one operation and return its single reply."""
        self.client.send(message)
        replies = [r for r in self.pump() if not isinstance(r, m.Welcome)]
        assert len(replies) == 1, replies
        return replies[0]


def manifest(pair: Pair, seq: int) -> Any:
    """The remote manifest as {path: entry}."""
    pair.client.send(m.ListTree(seq))
    return {e[0]: e for b in pair.pump() for e in b.entries}


@contextlib.contextmanager
def home_at(path: str) -> Iterator[None]:
    """HOME (where the agent keeps its record) set to `path` for a while."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old


class TempTree:
    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="lsync-compat-")
        self.root = os.path.join(self.base, "root")
        os.mkdir(self.root)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def read(self, rel: str) -> bytes:
        with open(self.path(rel), "rb") as handle:
            return handle.read()

    def write(self, rel: str, data: bytes) -> None:
        full = self.path(rel)
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            os.makedirs(parent)
        with open(full, "wb") as handle:
            handle.write(data)

    def listing(self) -> List[str]:
        found = []
        for top, dirs, files in os.walk(self.base):
            for name in dirs + files:
                found.append(os.path.relpath(os.path.join(top, name), self.base))
        return sorted(found)

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
