"""The agent's driver: a plain blocking loop between stdin/stdout and `AgentService`.

It reads whatever bytes arrive, lets the sans-IO `Connection` turn them into messages,
hands each to the service, and writes the answers out before it blocks again. A protocol
error from the client ends the session with a `Goodbye` carrying the code; an unexpected
exception in a handler becomes an `Error(INTERNAL)` reply for that operation, and its
traceback goes to ~/.cache/lsync/agent.log, never over the wire.
"""

import os
import select
import sys
import time
import traceback
from typing import Optional

from lsync.agent.service import AgentService, SessionEnd
from lsync.agent.writer import WritePool
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, Connection
from lsync.protocol.errors import ErrorCode, ProtocolError

READ_SIZE = 1 << 20
SAVE_INTERVAL_NS = 30 * 10 ** 9


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def serve(in_fd: int = 0, out_fd: int = 1, use_cache: bool = True, initial: bytes = b"",
          threads: bool = True) -> int:
    """Run one session; returns the process exit status.

    `initial` is the start of the client's stream when it arrived some other way (on the
    command line, see lsync.client.bootstrap); stdin carries the rest.
    """
    conn = Connection(AGENT)

    def flush() -> None:
        data = conn.data_to_send()
        if data:
            _write_all(out_fd, data)

    pool = WritePool() if threads else None
    service = AgentService(conn.send, flush, time.time_ns if hasattr(time, "time_ns")
                           else lambda: int(time.time() * 1e9), use_cache, pool, _log_internal)
    last_save = time.monotonic()
    status = 0
    pending = initial
    try:
        while True:
            if pending:
                data, pending = pending, b""
            else:
                if pool is not None and pool.outstanding:
                    # Answer finished writes while waiting for input.
                    while pool.outstanding:
                        ready = select.select([in_fd, pool.wakeup_fd], [], [])[0]
                        service.collect_pool()
                        flush()
                        if in_fd in ready:
                            break
                data = os.read(in_fd, READ_SIZE)
            if not data:
                conn.receive_eof()
                break
            conn.receive_data(data)
            while True:
                message: Optional[m.Message] = conn.next_message()
                if message is None:
                    break
                try:
                    service.handle(message)
                except (SessionEnd, ProtocolError):
                    raise
                except Exception as exc:
                    _log_internal("handling {}".format(type(message).__name__))
                    seq = getattr(message, "seq", None)
                    if seq is None:
                        raise
                    conn.send(m.Error(seq, int(ErrorCode.INTERNAL),
                                      "internal agent error: {}".format(type(exc).__name__)))
            service.collect_pool()
            flush()
            if time.monotonic() - last_save > SAVE_INTERVAL_NS / 1e9:
                service.maybe_save_record()
                last_save = time.monotonic()
    except SessionEnd as end:
        status = 0 if end.code == 0 else 1
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
        try:
            service.drain_pool()
            flush()
        except (OSError, ProtocolError):
            pass
        service.close()
    return status


def main(initial: bytes = b"") -> None:
    sys.exit(serve(initial=initial))


if __name__ == "__main__":
    main()
