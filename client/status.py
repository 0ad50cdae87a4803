"""What the user sees: one live status line on a terminal, or timestamped log lines.

`LiveStatus` redraws a single line (connection state, files and bytes synced, queue depth,
last save-to-acknowledgement latency, and `in sync HH:MM:SS` once a convergence check
found nothing left to send) at most every 100 ms; an update that comes sooner is
drawn when those 100 ms are over (the line never stays behind the last event); notes and
errors are printed above it. `LogStatus` writes `<iso time> <event> ...` lines, for when
stdout is not a terminal: `ready files=N bytes=M` once the initial sync is acknowledged
and, with -v, one `ack <path> ms=<latency>` line per acknowledged write; after each burst of
work, once a convergence check found nothing left, `in-sync as-of=<unix ns> files=N
bytes=M`: every local change made before that instant is on the remote. -q keeps errors
only.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import sys
import time
from typing import TextIO

QUIET, NORMAL, VERBOSE = 0, 1, 2
REDRAW_INTERVAL = 0.1  # seconds: the live line is redrawn at most this often


# C0 and C1 controls (DEL too) and the bidirectional-text controls: text that came over the
# wire (agent errors, goodbye reasons) or from file names must not drive the terminal.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` with every control character shown as an escape (\\x1b, \\u202e)."""
    return _UNSAFE.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"),
                       text)


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class _Base:
    def __init__(self, out: TextIO, verbosity: int) -> None:
        self.out = out
        self.verbosity = verbosity
        self.state_text = "starting"
        self.files = 0
        self.bytes = 0
        self.errors = 0
        self.queued = 0
        self.in_flight = 0
        self.last_latency: float | None = None

    def _count_ack(self, latency: float | None, nbytes: int) -> None:
        if nbytes:
            self.files += 1
            self.bytes += nbytes
            self.last_latency = latency


class LogStatus(_Base):
    """Plain timestamped lines (stdout is not a terminal)."""

    def _line(self, text: str) -> None:
        stamp = datetime.datetime.now().isoformat(timespec="microseconds")
        self.out.write(f"{stamp} {terminal_safe(text)}\n")
        self.out.flush()

    def state(self, text: str) -> None:
        self.state_text = text
        if self.verbosity >= NORMAL:
            self._line(f"state {text}")

    def acked(self, path: str, latency: float | None, nbytes: int) -> None:
        self._count_ack(latency, nbytes)
        if self.verbosity >= VERBOSE and latency is not None:
            self._line(f"ack {path} ms={latency * 1000:.1f}")

    def failed(self, path: str, message: str) -> None:
        self.errors += 1
        self._line(f"error {path}: {message}")

    def note(self, message: str) -> None:
        if self.verbosity >= NORMAL:
            self._line(f"note {message}")

    def queue(self, queued: int, in_flight: int) -> None:
        self.queued, self.in_flight = queued, in_flight

    def progress(self, done_bytes: int, total_bytes: int, done_files: int,
                 total_files: int) -> None:
        if self.verbosity >= VERBOSE and (done_files == total_files or done_files % 1000 == 0):
            self._line(f"progress files={done_files}/{total_files} "
                       f"bytes={done_bytes}/{total_bytes}")

    def ready(self, files: int, nbytes: int, seconds: float) -> None:
        if self.verbosity >= NORMAL:
            self._line(f"ready files={files} bytes={nbytes} seconds={seconds:.2f}")

    def in_sync(self, as_of_ns: int, files: int, nbytes: int) -> None:
        if self.verbosity >= NORMAL:
            self._line(f"in-sync as-of={as_of_ns} files={files} bytes={nbytes}")

    def close(self) -> None:
        pass


class LiveStatus(_Base):
    """One line redrawn in place on a terminal."""

    def __init__(self, out: TextIO, verbosity: int) -> None:
        super().__init__(out, verbosity)
        self._drawn = 0.0
        self._progress = ""
        self._synced = ""  # when the last convergence check found everything in sync
        self._late: asyncio.TimerHandle | None = None

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        wait = REDRAW_INTERVAL - (now - self._drawn)
        if not force and wait > 0:
            self._draw_later(wait)
            return
        if self._late is not None:
            self._late.cancel()
            self._late = None
        self._drawn = now
        latency = f"{self.last_latency * 1000:.0f} ms" if self.last_latency is not None else "-"
        parts = [self.state_text]
        if self._progress:
            parts.append(self._progress)
        parts += [f"{self.files} files", _size(self.bytes),
                  f"queue {self.queued}+{self.in_flight}", f"last {latency}"]
        if self.errors:
            parts.append(f"{self.errors} errors")
        if self._synced:
            parts.append(f"in sync {self._synced}")
        self.out.write("\r\x1b[2K" + terminal_safe(" | ".join(parts)))
        self.out.flush()

    def _draw_later(self, wait: float) -> None:
        """Draw once `wait` seconds have passed, so that a throttled update still shows."""
        if self._late is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not called from the event loop: the next draw shows the update
        self._late = loop.call_later(wait, self._draw_late)

    def _draw_late(self) -> None:
        self._late = None
        self._draw(force=True)

    def _above(self, text: str) -> None:
        self.out.write("\r\x1b[2K" + terminal_safe(text) + "\n")
        self._draw(force=True)

    def state(self, text: str) -> None:
        self.state_text = text
        self._draw(force=True)

    def acked(self, path: str, latency: float | None, nbytes: int) -> None:
        self._count_ack(latency, nbytes)
        if self.verbosity >= VERBOSE and latency is not None:
            self._above(f"synced {path} in {latency * 1000:.0f} ms")
        else:
            self._draw()

    def failed(self, path: str, message: str) -> None:
        self.errors += 1
        self._above(f"error: {path}: {message}")

    def note(self, message: str) -> None:
        if self.verbosity >= NORMAL:
            self._above(message)

    def queue(self, queued: int, in_flight: int) -> None:
        self.queued, self.in_flight = queued, in_flight
        if queued or in_flight:
            self._synced = ""  # work again: no longer known to be in sync
        self._draw()

    def progress(self, done_bytes: int, total_bytes: int, done_files: int,
                 total_files: int) -> None:
        share = done_bytes / total_bytes if total_bytes else 1.0
        width = 20
        filled = int(share * width)
        self._progress = (f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%} "
                          f"{done_files}/{total_files}")
        if done_files >= total_files:
            self._progress = ""
        self._draw(force=done_files >= total_files)

    def ready(self, files: int, nbytes: int, seconds: float) -> None:
        self._progress = ""
        if self.verbosity >= NORMAL:
            self._above(f"in sync: {files} files, {_size(nbytes)} in {seconds:.1f} s; watching")

    def in_sync(self, as_of_ns: int, files: int, nbytes: int) -> None:
        self._synced = datetime.datetime.fromtimestamp(as_of_ns / 1e9).strftime("%H:%M:%S")
        self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)  # also cancels a pending late draw
        self.out.write("\n")
        self.out.flush()


def make_status(verbosity: int, out: TextIO | None = None) -> LogStatus | LiveStatus:
    stream = out or sys.stdout
    if stream.isatty() and verbosity > QUIET:
        return LiveStatus(stream, verbosity)
    return LogStatus(stream, verbosity)
