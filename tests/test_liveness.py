"""The liveness decision (lsync.client.transport.liveness) on its own: time is passed in,
nothing sleeps.

Looks happen every second, as the link's watcher does them. A "link" here is the numbers
the watcher would read: bytes received, and per channel (written, still buffered).
"""

from __future__ import annotations

import itertools

from lsync.client.transport.liveness import ChannelReading, Liveness, Verdict

PING_EVERY = 5.0
STALL = 15.0
MIB = 1 << 20


class Watched:
    """The numbers a watcher reads off a link, moved by the test, and the verdicts so far."""

    def __init__(self, channels: int = 1) -> None:
        self.now = 0.0
        self.received = 0
        self.written = [0] * channels
        self.buffered = [0] * channels
        self.pending = False
        self.liveness = Liveness(self.now, PING_EVERY, STALL)
        self.verdicts: list[tuple[float, Verdict]] = []

    def readings(self) -> list[ChannelReading]:
        return list(zip(self.written, self.buffered, strict=True))

    def look(self, after: float = 1.0) -> Verdict:
        self.now += after
        awaiting = self.pending or any(self.buffered)
        verdict = self.liveness.observe(self.now, self.received, self.readings(), awaiting)
        self.verdicts.append((self.now, verdict))
        return verdict

    def write(self, channel: int, size: int, window_left: int) -> None:
        """Write `size` bytes: what fits into the window leaves at once, the rest waits."""
        passes = min(size, window_left)
        self.written[channel] += size
        self.buffered[channel] += size - passes

    def take(self, channel: int, size: int) -> None:
        """The remote replenished the window: `size` buffered bytes leave."""
        self.buffered[channel] -= min(size, self.buffered[channel])

    def stalled_at(self) -> float | None:
        return next((t for t, v in self.verdicts if v is Verdict.STALLED), None)

    def pings(self) -> list[float]:
        return [t for t, v in self.verdicts if v is Verdict.PING]


def test_a_transfer_that_keeps_moving_is_never_stalled_however_long_it_takes() -> None:
    """A 100 MB file at 10 Mbit/s (80 s; 1.25 MB/s taken off the buffer) with its only reply
    at the end: nothing arrives for 80 s, yet the window keeps draining."""
    link = Watched()
    link.pending = True
    link.write(0, 8 * MIB, window_left=2 * MIB)
    sent = 8 * MIB
    for _ in range(80):
        link.take(0, 1_250_000)
        if link.buffered[0] < 2 * MIB and sent < 100 * MIB:  # the sender refills (drain)
            link.write(0, 6 * MIB, window_left=0)
            sent += 6 * MIB
        assert link.look() is not Verdict.STALLED
    assert link.pings() == []  # progress all along: no ping needed


def test_a_link_frozen_in_the_middle_of_a_transfer_is_stalled_after_the_bound() -> None:
    link = Watched()
    link.pending = True
    link.write(0, 8 * MIB, window_left=2 * MIB)
    for _ in range(10):
        link.take(0, 500_000)
        link.look()
    frozen_at = link.now
    for _ in range(30):
        if link.look() is Verdict.STALLED:
            break
    stalled = link.stalled_at()
    assert stalled is not None and STALL <= stalled - frozen_at <= STALL + 1


def test_pings_on_a_frozen_idle_link_are_no_progress_and_it_stalls_within_20_s() -> None:
    """An idle link: the watcher pings after PING_EVERY quiet seconds. The ping enters the
    open window at once (written, never buffered): that proves nothing, and with no answer
    the link is stalled about PING_EVERY + STALL after the freeze."""
    link = Watched()
    for _ in range(40):
        verdict = link.look()
        if verdict is Verdict.PING:
            link.write(0, 30, window_left=2 * MIB)
            link.pending = True  # its pong is awaited, and never comes
        if verdict is Verdict.STALLED:
            break
    stalled = link.stalled_at()
    assert stalled is not None and stalled <= PING_EVERY + STALL + 1
    assert link.pings()[0] <= PING_EVERY + 1  # (the first look only reads the counters)
    assert all(b - a >= PING_EVERY for a, b in itertools.pairwise(link.pings()))


def test_an_idle_link_whose_pings_are_answered_is_pinged_every_few_seconds_and_lives() -> None:
    link = Watched()
    for _ in range(120):
        verdict = link.look()
        assert verdict is not Verdict.STALLED
        if verdict is Verdict.PING:
            link.written[0] += 30
            link.received += 30  # the pong, within the second
    assert 120 / (PING_EVERY + 1) - 1 <= len(link.pings()) <= 120 / PING_EVERY


def test_a_producer_slower_than_the_link_is_kept_alive_by_answered_pings() -> None:
    """A file written slower than the link takes it (compression bound): the buffer stays
    empty, so the window says nothing; the pings sent when nothing moved are answered."""
    link = Watched()
    link.pending = True
    for _ in range(100):
        link.write(0, 300_000, window_left=2 * MIB)
        if link.look() is Verdict.PING:
            link.received += 30  # pong, behind at most a window of data
    assert link.stalled_at() is None
    assert link.pings()


def test_a_stopped_agent_with_a_full_window_is_stalled_after_the_bound() -> None:
    """The agent stops reading: the window is used up, the bytes wait in the buffer, and
    more writes (pings too) only add to them."""
    link = Watched()
    link.pending = True
    link.write(0, 3 * MIB, window_left=2 * MIB)
    for _ in range(STALL_LOOKS):
        verdict = link.look()
        if verdict is Verdict.PING:
            link.write(0, 30, window_left=0)
        if verdict is Verdict.STALLED:
            break
    assert link.stalled_at() == STALL + 1  # the first look saw the counters (progress)


STALL_LOOKS = int(STALL) + 5


def test_progress_on_a_data_lane_alone_keeps_the_link_alive() -> None:
    """The bulk crosses on lane 2; the main channel is idle; only lane 2's buffer drains."""
    link = Watched(channels=3)
    link.pending = True
    link.write(2, 20 * MIB, window_left=2 * MIB)
    for _ in range(60):
        link.take(2, 300_000)
        assert link.look() is not Verdict.STALLED


def test_a_lane_that_joins_later_counts_from_its_first_reading() -> None:
    link = Watched(channels=1)
    link.pending = True
    link.look()
    link.written.append(10 * MIB)  # a lane opened, already holding buffered data
    link.buffered.append(8 * MIB)
    for _ in range(30):
        link.take(1, 200_000)
        assert link.look() is not Verdict.STALLED


def test_silence_with_nothing_awaited_is_no_stall() -> None:
    link = Watched()
    for _ in range(100):
        assert link.look() is not Verdict.STALLED  # pings unanswered, but never awaited


def test_time_the_watcher_did_not_look_counts_at_most_the_gap() -> None:
    """The event loop was kept busy for 60 s: the first look after it does not hold those
    60 s against the link."""
    link = Watched()
    link.pending = True
    link.write(0, 4 * MIB, window_left=2 * MIB)
    link.look()
    assert link.look(after=60.0) is not Verdict.STALLED
    link.take(0, MIB)
    assert link.look() is Verdict.ALIVE
    assert link.liveness.silent == 0.0
