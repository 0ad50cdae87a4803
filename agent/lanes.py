"""Data lanes: extra streams of content writes from the client, joined through a socket.

One SSH session channel has its own flow-control window (2 MiB in OpenSSH's sshd), which
caps what a long link carries per round trip, and everything on it is delivered in order:
a save queues behind the bulk data of an initial sync. The client therefore opens more
channels, each running a tiny pump (`PUMP`: stdin to a Unix socket) that joins this agent
through `LaneServer`'s socket. The agent reads their frames next to its stdin and answers
everything on stdout; which writes may take a lane is the client's rule (they never
depend on the order against the main stream).

Each pump names its lane's role in the first byte it sends (`URGENT` or `BULK`, from its
command line): the client's first lane carries single saves, and the agent handles what
comes on it before anything else in a turn and answers it at once (lsync.agent.main);
what comes on a bulk lane may be applied in the write pool (lsync.agent.service).

The socket lives in a fresh directory of mode 0700 (only this user can reach it) and each
peer's credentials are checked where the platform tells them (SO_PEERCRED); the directory
is removed when the agent ends. Nothing here writes into the tree.
"""

import os
import shutil
import socket
import struct
import tempfile
from typing import Dict, List, Optional

from lsync.protocol import messages as m
from lsync.protocol.connection import Lane

MAX_LANES = 8
READ_SIZE = 1 << 20
URGENT = "u"  # a lane's role, the first byte its pump sends: single saves
BULK = "b"  # the bulk of a sync: batches, a burst's deltas

# The program a lane's channel runs (python3 -c PUMP SOCKET ROLE): the role's byte, then
# stdin to the socket, and the socket to stdout in a thread (pulled files come back that
# way, see lsync.agent.pull).
PUMP = (
    "import os,socket,sys,threading\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(sys.argv[2].encode()[:1])\n"
    "def back():\n"
    " while True:\n"
    "  d=memoryview(s.recv(262144))\n"
    "  if not d:break\n"
    "  while d:d=d[os.write(1,d):]\n"
    "threading.Thread(target=back,daemon=True).start()\n"
    "while True:\n"
    " d=os.read(0,262144)\n"
    " if not d:break\n"
    " s.sendall(d)\n"
)


class LaneServer:
    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="lsync-lanes-")
        self.path = os.path.join(self.directory, "s")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(MAX_LANES)
        self.listener.setblocking(False)
        self.lanes: Dict[int, "_Joined"] = {}

    def fds(self) -> List[int]:
        return [self.listener.fileno()] + list(self.lanes)

    def socket_of(self, fd: int) -> Optional[socket.socket]:
        """The socket of the lane read from `fd` (pulled files go back to the client on
        the lane their fetch came on); None once that lane is gone."""
        joined = self.lanes.get(fd)
        return joined.sock if joined is not None else None

    def urgent_fds(self) -> List[int]:
        """The descriptors of the lanes of saves."""
        return [fd for fd, joined in self.lanes.items() if joined.role == URGENT]

    def urgent(self, fd: int) -> bool:
        """Whether the lane read from `fd` carries single saves (see the module docstring)."""
        joined = self.lanes.get(fd)
        return joined is not None and joined.role == URGENT

    def readable(self, fd: int) -> List[m.Message]:
        """Handle one readable descriptor: a new lane, or data (the messages it completed).
        A lane that breaks the protocol raises ProtocolError; one that ends is dropped."""
        if fd == self.listener.fileno():
            self._accept()
            return []
        joined = self.lanes.get(fd)
        if joined is None:  # (dropped earlier in this turn, when the lane of saves was read)
            return []
        try:
            data = joined.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            joined.lane.receive_eof()
            return []
        if joined.role is None:
            joined.role = data[:1].decode("ascii", "replace")
            data = data[1:]
        joined.lane.receive_data(data)
        out: List[m.Message] = []
        while True:
            message = joined.lane.next_message()
            if message is None:
                return out
            out.append(message)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.lanes) >= MAX_LANES or not _same_user(sock):
            sock.close()
            return
        sock.setblocking(False)
        self.lanes[sock.fileno()] = _Joined(sock)

    def _drop(self, fd: int) -> None:
        joined = self.lanes.pop(fd, None)
        if joined is not None:
            joined.sock.close()

    def close(self) -> None:
        for fd in list(self.lanes):
            self._drop(fd)
        self.listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class _Joined:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lane = Lane()
        self.role: Optional[str] = None  # its pump's first byte (URGENT, BULK), once read


def _same_user(sock: socket.socket) -> bool:
    """Whether the peer runs as this user (True where the platform cannot tell: the
    socket's directory admits only this user anyway)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return False
    _, uid, _ = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def open_lanes() -> Optional[LaneServer]:
    """A lane server, or None when this host cannot offer one (no Unix sockets, no
    writable temporary directory)."""
    try:
        return LaneServer()
    except (OSError, AttributeError):
        return None
