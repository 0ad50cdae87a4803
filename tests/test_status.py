"""Unit tests of the status display (lsync.client.status), without a terminal or a link.

The live line is redrawn at most every 100 ms, but it must never stay behind: an update
that arrives within those 100 ms (an acknowledgement right after the save was queued) is
drawn when they are over. Log lines carry the `ready` and `ack` events the end-to-end tests
and scripts rely on.
"""

from __future__ import annotations

import asyncio
import io
import time

from lsync.client.status import NORMAL, VERBOSE, LiveStatus, LogStatus, make_status


def _shown(out: io.StringIO) -> str:
    """What a terminal shows on the status line now: the text after the last redraw."""
    return out.getvalue().rpartition("\r\x1b[2K")[2]


def test_live_line_catches_up_with_updates_throttled_by_the_redraw_interval() -> None:
    async def scenario() -> str:
        out = io.StringIO()
        status = LiveStatus(out, NORMAL)
        status.state("watching")  # drawn now; what follows comes within 100 ms
        status.queue(1, 0)
        status.acked("src/a.c", 0.004, 120)
        status.queue(0, 0)
        deadline = time.monotonic() + 5
        while "last 4 ms" not in _shown(out) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return _shown(out)  # before close(), which draws anyway

    shown = asyncio.run(scenario())
    assert shown.strip() == "watching | 1 files | 120 B | queue 0+0 | last 4 ms"


def test_live_line_closes_cleanly_after_the_event_loop_ended() -> None:
    out = io.StringIO()
    status = LiveStatus(out, NORMAL)

    async def scenario() -> None:
        status.state("syncing")
        status.queue(3, 1)  # throttled: a late redraw is pending when the loop ends

    asyncio.run(scenario())
    status.close()
    assert out.getvalue().endswith("syncing | 0 files | 0 B | queue 3+1 | last -\n")


def test_live_line_outside_an_event_loop_draws_on_the_next_event() -> None:
    out = io.StringIO()
    status = LiveStatus(out, NORMAL)
    status.state("watching")
    status.queue(2, 0)  # throttled, and no loop to draw it later
    status.state("stopped")
    assert _shown(out) == "stopped | 0 files | 0 B | queue 2+0 | last -"


def test_log_lines_carry_ready_and_ack_events() -> None:
    out = io.StringIO()
    status = LogStatus(out, VERBOSE)
    status.ready(3, 4096, 0.25)
    status.acked("src/a.c", 0.0123, 10)
    status.failed("src/b.c", "not the expected base")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" ready files=3 bytes=4096 seconds=0.25")
    assert lines[1].endswith(" ack src/a.c ms=12.3")
    assert lines[2].endswith(" error src/b.c: not the expected base")


def test_status_is_log_lines_when_stdout_is_not_a_terminal() -> None:
    assert isinstance(make_status(NORMAL, io.StringIO()), LogStatus)


def test_text_from_the_wire_cannot_drive_the_terminal() -> None:
    """Agent error messages, goodbye reasons and file names are shown with their control
    characters escaped (issue 11 item 4): no colour, cursor or bidi trick reaches the
    terminal, on the live line or in the log."""
    hostile = "evil\x1b[2J\x1b]0;title\x07\u202egnp.exe\r\nfake line"
    for status in (LogStatus(io.StringIO(), NORMAL), LiveStatus(io.StringIO(), NORMAL)):
        status.failed(hostile, hostile)
        status.note(hostile)
        status.state(hostile)
        out = status.out.getvalue()  # type: ignore[attr-defined]
        written = out.replace("\r\x1b[2K", "").replace("\n", "")  # the line's own redraws
        assert "\x1b" not in written and "\x07" not in written and "\u202e" not in written
        assert "\r" not in written and "\\x1b" in out and "\\u202e" in out
