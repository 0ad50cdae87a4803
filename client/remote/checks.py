"""When to check convergence, and how much: the schedule of the client's rescans.

The watcher is a hint, not the truth. Once the queue is idle after work (or, for them, once
nothing is queued and only answers are awaited: `take_ahead`), the directories the
watcher's events touched are compared again with the model (a cheap stat walk of each, its
direct entries only); the whole tree is compared after events were lost (an overflow), when
very many directories were touched, and on a slow timer while idle. `CheckSchedule` keeps
what is due and answers "what now?" given the time; the engine scans and compares
(`lsync.client.remote.planner.differences`). No I/O, time passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_EVERY = 600.0  # seconds between whole-tree checks while idle
# More touched directories than this: check the whole tree. (A checkout between two kernel
# releases touches ~500 of its ~5,000 directories: their listings cost a tenth of the whole
# tree's stat walk, which took the in-sync line 1.4-2 s past the remote being right.)
TOUCHED_LIMIT = 2048


@dataclass(frozen=True, slots=True)
class Due:
    """What to check now: the whole tree (`whole`, with `reason`) or `directories`; a Due
    with neither means nothing needs checking, and `report` says whether the engine worked
    since its last in-sync report (then it reports again)."""

    whole: bool = False
    reason: str = ""
    directories: tuple[str, ...] = ()
    report: bool = False


class CheckSchedule:
    def __init__(self, now: float, full_every: float = FULL_EVERY,
                 touched_limit: int = TOUCHED_LIMIT) -> None:
        self.full_every = full_every
        self.touched_limit = touched_limit
        self._touched: set[str] = set()
        self._whole: str | None = None  # why the whole tree must be checked, if it must
        self._last_whole = now
        self._worked = False

    def touched(self, path: str) -> None:
        """The watcher reported `path`: its directory is checked once the queue is idle."""
        self._touched.add(path.rpartition("/")[0])

    def gone(self, directory: str) -> None:
        """`directory` vanished before its check: its parent's check covers it."""
        if directory:
            self._touched.add(directory.rpartition("/")[0])

    def whole(self, reason: str) -> None:
        """Events were lost: check the whole tree once the queue is idle."""
        self._whole = reason

    def worked(self) -> None:
        """The engine sent something: report in-sync again after the next checks."""
        self._worked = True

    def take(self, now: float) -> Due:
        """The queue is idle: what to check now (and forget, as taken)."""
        report, self._worked = self._worked, False
        if (self._whole is not None or now - self._last_whole >= self.full_every
                or len(self._touched) > self.touched_limit):
            reason = self._whole or ("many directories changed" if self._touched
                                     else "periodic check")
            self._whole, self._last_whole = None, now
            self._touched.clear()
            return Due(whole=True, reason=reason, report=True)
        if self._touched:
            directories = tuple(sorted(self._touched))
            self._touched.clear()
            return Due(directories=directories, report=True)
        return Due(report=report)

    def take_ahead(self) -> tuple[str, ...]:
        """Nothing is queued but answers are still to come: the touched directories, to
        check now rather than once the last answer came (forgotten, as taken; whether the
        engine worked is kept for the report). Nothing when the whole tree is due."""
        if not self.ahead_due:
            return ()
        directories = tuple(sorted(self._touched))
        self._touched.clear()
        return directories

    @property
    def ahead_due(self) -> bool:
        """Whether `take_ahead` has directories to give."""
        return self._whole is None and 0 < len(self._touched) <= self.touched_limit

    @property
    def pending(self) -> bool:
        """Whether a check is due once the queue is idle (the periodic one aside)."""
        return bool(self._touched) or self._whole is not None

    def next_time(self) -> float:
        """When the next periodic whole-tree check is due."""
        return self._last_whole + self.full_every
