"""The agent's driver: a plain blocking loop between stdin/stdout and `AgentService`.

It reads whatever bytes arrive, lets the sans-IO `Connection` turn them into messages,
hands each to the service, and writes the answers out before it blocks again. What the
lane of saves brings is handled first in a turn and answered at once, and looked at again
between the messages of a long turn; what a bulk lane brings is marked bulk, so that the
service may hand its deltas to the write pool (lsync.agent.lanes). A protocol error from
the client ends the session with a `Goodbye` carrying the code; an unexpected exception
in a handler becomes an `Error(INTERNAL)` reply for that operation, and its traceback goes
to ~/.cache/lsync/agent.log, never over the wire.

The record of what lsync wrote is journaled before any answer is written out, so an agent
killed by a dropped link loses no ownership it acknowledged; the full snapshot of the
record (which grows with the tree) is written when the input has been quiet for
`QUIET_NS`, at most every 30 s, and at the end of the session.

SIGTERM ends the session cleanly: the message being handled is finished, the pooled writes
are waited for and recorded, the client is told (Goodbye) and the record saved. A newer
agent of the same root sends it to take over (lsync.agent.rootlock.RootLock): an agent whose
client died may still be reading what that client sent.
"""

import os
import select
import signal
import sys
import time
import traceback
from typing import List, Optional

from lsync.agent.lanes import LaneServer, open_lanes
from lsync.agent.pull import PullService
from lsync.agent.service import AgentService, SessionEnd
from lsync.agent.writer import WritePool
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, Connection
from lsync.protocol.errors import ErrorCode, ProtocolError

READ_SIZE = 1 << 20
SAVE_LOOK = 0.002  # s: how often a long turn looks at the lane of saves (serve_saves)
QUIET_NS = 10 ** 9  # no input for this long: a good moment for a snapshot of the record


def _log_internal(context: str, trace: Optional[str] = None) -> None:
    try:
        directory = os.path.join(os.path.expanduser("~"), ".cache", "lsync")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(os.path.join(directory, "agent.log"), "a", encoding="utf-8") as log:
            log.write("{} pid {}: {}\n{}\n".format(
                time.strftime("%Y-%m-%dT%H:%M:%S"), os.getpid(), context,
                trace if trace is not None else traceback.format_exc()))
    except OSError:
        pass


class _TakenOver(Exception):
    """SIGTERM arrived: another agent takes over this root, or the system asks us to end."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def serve(in_fd: int = 0, out_fd: int = 1, use_cache: bool = True, initial: bytes = b"",
          threads: bool = True) -> int:
    """Run one session; returns the process exit status.

    `initial` is the start of the client's stream when it arrived some other way (on the
    command line, see lsync.client.transport.bootstrap); stdin carries the rest.
    """
    conn = Connection(AGENT)
    now_ns = time.time_ns if hasattr(time, "time_ns") else lambda: int(time.time() * 1e9)

    def flush() -> None:
        data = conn.data_to_send()
        if data:
            service.journal()  # what the answers acknowledge is on disk before they leave
            _write_all(out_fd, data)

    pool = WritePool() if threads else None
    lanes: List[LaneServer] = []

    def offer_lanes() -> str:
        if not lanes:
            server = open_lanes()
            if server is None:
                return ""
            lanes.append(server)
        return lanes[0].path

    service = AgentService(conn.send, flush, now_ns, use_cache, pool, _log_internal,
                           offer_lanes=offer_lanes)
    # Pulls (lsync.agent.pull) run beside the service, in their own threads.
    puller = PullService(lambda: service.root, lambda: service.hash_name, now_ns,
                         _log_internal)
    terminated: List[int] = []
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        try:
            os.write(wake_write, b"!")
        except OSError:
            pass

    def check_terminated() -> None:
        if terminated:
            raise _TakenOver()

    try:
        previous: object = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (tests): no handler, as before
        previous = None

    def wait_for_input() -> List[int]:
        """Block until stdin or a data lane is readable (those descriptors are returned),
        answering finished pooled writes meanwhile and saving the record once the input has
        been quiet long enough."""
        while True:
            fds = [in_fd, wake_read, puller.wakeup_fd] + (lanes[0].fds() if lanes else [])
            if pool is not None and pool.outstanding:
                fds.append(pool.wakeup_fd)
            due = service.snapshot_wanted(quiet=True)
            timeout: Optional[float] = None
            if due is not None:
                timeout = min(max(QUIET_NS, due - now_ns()), 30 * QUIET_NS) / 1e9
            ready = select.select(fds, [], [], timeout)[0]
            check_terminated()
            if pool is not None and pool.outstanding:
                service.collect_pool()
                flush()
            if puller.wakeup_fd in ready:
                send_pulled()
            inputs = [fd for fd in ready if fd not in (wake_read, puller.wakeup_fd)
                      and (pool is None or fd != pool.wakeup_fd)]
            if inputs:
                return inputs
            if not ready:
                service.save_record_if_due(quiet=True)

    def send_pulled() -> None:
        for pulled in puller.take_outbox():
            conn.send(pulled)
        flush()

    def dispatch(message: m.Message, bulk: bool = False) -> None:
        try:
            if puller.handles(message):
                puller.handle(message)
                return
            service.handle(message, bulk)
        except (SessionEnd, ProtocolError):
            raise
        except Exception as exc:
            _log_internal("handling {}".format(type(message).__name__))
            seq = getattr(message, "seq", None)
            if seq is None:
                raise
            conn.send(m.Error(seq, int(ErrorCode.INTERNAL),
                              "internal agent error: {}".format(type(exc).__name__)))

    def handle_lane(fd: int) -> None:
        """What lane `fd` brought: the lane of saves answered at once, a bulk lane's
        messages with a look at the lane of saves between them."""
        messages = lanes[0].readable(fd)
        urgent = lanes[0].urgent(fd)  # (known once the lane's first bytes were read)
        for lane_message in messages:
            if isinstance(lane_message, m.PullFetch):
                puller.handle(lane_message, lanes[0].socket_of(fd))
                continue  # (answered on its lane)
            dispatch(lane_message, bulk=not urgent)
            check_terminated()
            if not urgent:
                serve_saves()
        if urgent:
            flush()

    looked = [time.monotonic()]

    def serve_saves() -> None:
        """Between two messages of other input: what the lane of saves has brought, if
        anything, when it was last looked at SAVE_LOOK ago (a save then waits for one
        message, not for a whole turn; a look is a system call, and each costs this thread
        the interpreter lock while the write pool works)."""
        now = time.monotonic()
        if not lanes or now - looked[0] < SAVE_LOOK:
            return
        looked[0] = now
        fds = lanes[0].urgent_fds()
        if fds:
            for fd in select.select(fds, [], [], 0)[0]:
                handle_lane(fd)

    status = 0
    pending = initial
    try:
        ended = False
        while not ended:
            ready = [in_fd] if pending else wait_for_input()
            if lanes:  # the lane of saves first, answered before the rest is looked at
                ready.sort(key=lambda fd: not lanes[0].urgent(fd))
                looked[0] = time.monotonic()
            for fd in ready:
                if fd != in_fd:
                    handle_lane(fd)
                    continue
                if pending:
                    data, pending = pending, b""
                else:
                    data = os.read(in_fd, READ_SIZE)
                if not data:
                    conn.receive_eof()
                    ended = True
                    break
                conn.receive_data(data)
                while True:
                    message: Optional[m.Message] = conn.next_message()
                    if message is None:
                        break
                    dispatch(message)
                    check_terminated()
                    serve_saves()
            service.collect_pool()
            flush()
            service.save_record_if_due(quiet=False)
    except SessionEnd as end:
        status = 0 if end.code == 0 else 1
    except _TakenOver:
        status = 5
        try:
            conn.send(m.Goodbye(int(ErrorCode.ROOT_UNAVAILABLE),
                                "the agent was asked to end (another lsync session took "
                                "over this tree?)"))
        except ProtocolError:
            pass
    except ProtocolError as exc:
        status = 2
        if exc.code != ErrorCode.CONNECTION_LOST:
            try:
                conn.send(m.Goodbye(int(exc.code), exc.message))
            except ProtocolError:
                pass
        sys.stderr.write("lsync agent: {}\n".format(exc))
    except (BrokenPipeError, ConnectionResetError):
        status = 3
    except Exception as exc:
        _log_internal("session")
        status = 4
        try:
            conn.send(m.Goodbye(int(ErrorCode.INTERNAL), "internal agent error: {}".format(
                type(exc).__name__)))
        except ProtocolError:
            pass
    finally:
        puller.close()  # (its threads read through the service's root)
        try:
            service.drain_pool()
            flush()
        except (OSError, ProtocolError):
            pass
        service.close()
        for server in lanes:
            server.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]
        os.close(wake_read)
        os.close(wake_write)
    return status


def main(initial: bytes = b"") -> None:
    sys.exit(serve(initial=initial))


if __name__ == "__main__":
    main()
