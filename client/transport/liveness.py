"""Whether the link to the agent is alive, judged by progress (sans-IO: `now` is passed in).

The link is alive while the agent shows progress, in one of two ways:

- bytes arrive from it (replies, manifests, answers to our pings);
- bytes we wrote that were waiting in a channel's write buffer leave it. Data waits in an SSH
  channel's buffer only while the channel's flow-control window is used up, and leaves it
  only when the far end replenishes the window, which sshd does as the agent reads (a pipe
  to a local agent likewise drains only as the agent reads). So a write buffer that was not
  empty at one look and has shrunk by the next proves that the remote took our bytes.
  Bytes written into an open window prove nothing (they may sit in a frozen TCP path), so a
  channel with nothing buffered is no evidence either way.

A big file on a slow link is therefore alive for as long as it moves, however long it takes:
no deadline grows with a file's size, and none is set per operation. When no progress was
seen for `ping_every` seconds the driver is told to ping (the answer is progress; a producer
slower than the link leaves the buffers empty, and then the pongs carry the proof). When
something is awaited (a reply, or bytes still buffered) and no progress was seen for `stall`
seconds, the link is stalled: a frozen network path or a stopped agent.

SSH keepalives (asyncssh's, see lsync.client.transport.ssh) are no part of this: sshd answers them
while the agent is stopped, so they prove the path, not the agent.

Time the driver did not get to look (its event loop kept busy by other work) counts at most
`max_gap` per look: the link is not blamed for the watcher's own absence.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

# One channel as the driver sees it at a look: (bytes written to it so far, bytes of those
# still in its write buffer).
ChannelReading = tuple[int, int]


class Verdict(enum.Enum):
    ALIVE = "alive"
    PING = "ping"  # send a ping now (nothing moved for a while)
    STALLED = "stalled"  # something is awaited and nothing moved for `stall` seconds


class Liveness:
    def __init__(self, now: float, ping_every: float, stall: float,
                 max_gap: float = 2.0) -> None:
        self.ping_every = ping_every
        self.stall = stall
        self.max_gap = max_gap
        self._looked_at = now
        self._received: int | None = None
        self._channels: list[ChannelReading] = []
        self.quiet = 0.0  # seconds (counted while looking) since the last progress
        self.silent = 0.0  # the same, counted only while something was awaited
        self._since_ping = ping_every  # seconds since the last ping asked for

    def observe(self, now: float, received: int, channels: Sequence[ChannelReading],
                awaiting: bool) -> Verdict:
        """One look: `received` is every byte that arrived from the agent so far, `channels`
        the reading of each channel (in a fixed order; new ones are appended), `awaiting`
        whether anything is expected from the agent (a reply, or buffered bytes taken)."""
        elapsed = min(max(now - self._looked_at, 0.0), self.max_gap)
        self._looked_at = now
        progress = received != self._received or self._took(channels)
        self._received = received
        self._channels = list(channels)
        if progress:
            self.quiet = self.silent = 0.0
        else:
            self.quiet += elapsed
            self.silent = self.silent + elapsed if awaiting else 0.0
        self._since_ping += elapsed
        if self.silent >= self.stall:
            return Verdict.STALLED
        if self.quiet >= self.ping_every and self._since_ping >= self.ping_every:
            self._since_ping = 0.0
            return Verdict.PING
        return Verdict.ALIVE

    def _took(self, channels: Sequence[ChannelReading]) -> bool:
        """Whether a channel that had bytes buffered at the last look has sent some since."""
        for (written, buffered), (was_written, was_buffered) in zip(channels, self._channels,
                                                                    strict=False):
            if was_buffered > 0 and written - buffered > was_written - was_buffered:
                return True
        return False
