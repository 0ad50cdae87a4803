"""An agent that floods its stderr costs bounded memory and linear time (issue 15, defect 8).

Both agent streams (lsync.client.transport.streams) and the data lanes keep what the agent prints on
stderr in one bounded tail (`_StderrTail`). Before, the SSH stream joined each chunk to
the whole unfinished line: a flood without newlines kept the client at 99% CPU and 336 MB.
Checked on the SSH stream's own callback, and end to end over the private sshd with a
remote program that writes 64 MiB to stderr and nothing else.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.target import Target
from lsync.client.transport import ssh
from lsync.client.transport.streams import SshAgentStream, _StderrTail

MIB = 1 << 20
PEAK_BOUND = 4 * MIB  # bytes allocated at most while the flood is taken in
FLOOD_SECONDS = 30.0


def _peak_while(run: object) -> int:
    """The peak of traced allocations while `run` (a callable) runs."""
    tracemalloc.start()
    try:
        run()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ssh_stream_takes_a_stderr_flood_without_newlines_in_bounded_memory_and_time() -> None:
    stream = SshAgentStream()
    chunk = b"x" * (32 << 10)  # an SSH packet's worth

    def flood() -> None:
        for _ in range((16 * MIB) // len(chunk)):
            stream._stderr_received(chunk)

    started = time.perf_counter()
    peak = _peak_while(flood)
    took = time.perf_counter() - started
    assert peak < PEAK_BOUND, f"{peak} bytes held for a 16 MiB flood"
    assert took < 5.0, f"a 16 MiB flood took {took:.1f} s"
    stream._ended(None)
    assert stream.stderr_tail() == "x" * _StderrTail.LINE_MAX


def test_stderr_tail_keeps_the_last_lines_and_the_end_of_an_unfinished_one() -> None:
    tail = _StderrTail()
    for i in range(100):
        tail.feed(f"line {i}\n".encode())
    tail.feed(b"y" * 5000 + b"\n" + b"partial")
    tail.feed(b" end")
    tail.end()
    lines = tail.text().split("\n")
    assert len(lines) == _StderrTail.MAX_LINES
    assert lines[-3:] == ["line 99", "y" * _StderrTail.LINE_MAX, "partial end"]


FLOOD = ("import os\n"
         "b = b'x' * 65536\n"
         "for _ in range(1024): os.write(2, b)\n")


def test_an_agent_flooding_stderr_over_ssh_costs_bounded_memory_and_time(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    """64 MiB on stderr, no newline, no protocol: the stream ends in bounded time and the
    client holds a bounded tail of it."""
    async def run() -> tuple[str, int]:
        config = sshd.write_client_config(path=tmp_path / "ssh_config")
        conn = await ssh.connect(Target(host=sshd.alias, user=None, tree="x"), [str(config)],
                                 accept_new=False)
        try:
            stream = SshAgentStream()
            await stream.open(conn, lambda _: f"python3 -c \"{FLOOD}\"", 0,
                              ssh.CHANNEL_WINDOW, ssh.MAX_PACKET)
            tracemalloc.start()
            try:
                while await stream.read():
                    pass
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            await stream.close(wait=5)
            return stream.stderr_tail(), peak
        finally:
            conn.close()
            await conn.wait_closed()

    started = time.monotonic()
    tail, peak = asyncio.run(asyncio.wait_for(run(), FLOOD_SECONDS))
    took = time.monotonic() - started
    assert peak < 64 * MIB // 4, f"{peak} bytes held while 64 MiB of stderr came in"
    assert took < FLOOD_SECONDS / 2, f"64 MiB of stderr took {took:.1f} s"
    assert tail == "x" * _StderrTail.LINE_MAX, f"{len(tail)} characters kept"
