"""The convergence checks of one target, and its in-sync reports.

The watcher is a hint, not the truth: once the target's queue is idle, `check_if_due`
compares with the model of the remote what may have changed — the directories the last
watcher batches touched, or the whole tree after lost events and on a slow timer (the
schedule is the remote side's `CheckSchedule`) — and queues what differs. The touched
directories are checked earlier when they can be (`check_ahead`: nothing queued, only the
answers to the last writes awaited), so that the report need not wait for their walk.
When a check finds nothing and nothing is queued, it says so: an in-sync report as of the
moment the watcher (and git's index) had delivered everything. When that moment lags the
check (a walk of a big new subtree, an index being read), the report is given again
shortly (`report_due`), until it is as of the check itself: else the last word would stay
a report older than the last change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import LocalEntry
from lsync.client.local.scanner import scan_dir, scan_tree
from lsync.client.remote import planner
from lsync.client.remote.passes import LocalInputs
from lsync.client.remote.remoteside import RemoteSide

REPORT_LAG_NS = 1_000_000  # an in-sync report this far behind its check is given again
REPORT_AGAIN = 0.05  # seconds later


class Convergence:
    def __init__(self, side: RemoteSide, local: LocalInputs,
                 check_root: Callable[[], None]) -> None:
        self.side = side
        self.local = local
        # Raises SafetyStop when the local root vanished or is suddenly empty (a failed
        # listing may mean that).
        self.check_root = check_root
        self.report_due: float | None = None  # when to check and report in-sync again
        self._report_due_set = False  # the last report lagged: the next says only news
        self._reported_as_of = 0
        self.checking = False  # a check is under way

    @property
    def settled(self) -> bool:
        """Idle, with no check due or under way: background work (signing ahead) may use
        the CPU without delaying an in-sync report."""
        return (self.side.queue.idle and not self.checking and self.report_due is None
                and not self.side.checks.pending)

    async def check_ahead(self) -> None:
        """Nothing is queued, only answers are awaited: check the directories the watcher
        touched now, while the last writes travel (the model already holds them), so that
        the in-sync report follows the last answer instead of a stat walk begun after it.
        What differs is queued; the report itself waits for `check_if_due` at idle. The
        engine runs it as a task and goes on with its passes: a path changed after the walk
        and synced meanwhile is at worst queued again, and looked at for nothing."""
        directories = self.side.checks.take_ahead()
        if not directories:
            return
        self.checking = True
        try:
            if await self._check_dirs(directories):
                self.side.checks.worked()
        finally:
            self.checking = False
            self.side.poke()  # (the engine takes its result)

    async def check_if_due(self, now: float) -> None:
        """The queue is idle: check what may have changed, and say so when all is in sync.
        An in-sync report is as of the moment the watcher (and git's index) had delivered
        everything; when that lagged behind (a walk of a big new subtree, an index being
        read), the report is given again shortly, until it is as of the check itself —
        else the last word would stay a report older than the last change."""
        self.checking = True
        try:
            await self._check_if_due(now)
        finally:
            self.checking = False
            self.side.changed.set()

    async def _check_if_due(self, now: float) -> None:
        if self.report_due is not None and now >= self.report_due:
            self.report_due = None
            self.side.checks.worked()
        checked_ns = time.time_ns()
        as_of = self.local.seen_until()
        due = self.side.checks.take(now)
        found = 0
        if due.whole:
            found = await self._check(None, due.reason)
        if due.directories:
            found += await self._check_dirs(due.directories)
        if due.report and not found and self.side.queue.idle:
            if as_of > self._reported_as_of or not self._report_due_set:
                self._report_in_sync(as_of)
                self._reported_as_of = max(self._reported_as_of, as_of)
            # (Looked at again while the watcher lags, or when the report is older than a
            # change the watcher delivered — a lag of under REPORT_LAG_NS right after the
            # change was taken for none, and the report stayed the last word; said again
            # only once it moved.)
            self._report_due_set = (checked_ns - as_of > REPORT_LAG_NS
                                    or as_of < self.side.marked_ns)
            if self._report_due_set:
                self.report_due = now + REPORT_AGAIN
        elif found:
            self.side.checks.worked()

    def _report_in_sync(self, as_of: int) -> None:
        failing = self.side.queue.failing()
        if failing:
            self.side.reporter.note(f"idle; {len(failing)} paths failing, retried with backoff "
                               f"(first: {next(iter(failing))}: {next(iter(failing.values()))})")
            return
        self.side.reporter.in_sync(as_of, self.side.counters.files, self.side.counters.bytes)

    async def _check(self, directory: str | None, reason: str) -> int:
        """Compare the local tree (all of it, or one directory's entries) with the model and
        queue what differs; returns how many paths."""
        self.side.counters.checks += 1
        try:
            local: dict[str, LocalEntry] | None
            if directory is None:
                local = await asyncio.to_thread(scan_tree, self.local.root, self.local.rules,
                                                self.local.cache,
                                                on_error=lambda rel, exc: None)
            else:
                local = await asyncio.to_thread(scan_dir, self.local.root, directory,
                                                self.local.rules, self.local.cache)
        except OSError as exc:
            self.check_root()
            self.side.reporter.note(f"convergence check of {directory or 'the tree'} failed: {exc}")
            return 0
        return self._compare(directory, local, reason)

    async def _check_dirs(self, directories: tuple[str, ...]) -> int:
        """`_check` of each directory, listed in one trip to a worker thread (a checkout
        touches hundreds)."""
        self.side.counters.checks += 1
        listed = await asyncio.to_thread(_scan_dirs, self.local.root, directories, self.local.rules,
                                         self.local.cache)
        found = 0
        for directory, local in listed:
            if isinstance(local, OSError):
                self.check_root()
                self.side.reporter.note(f"convergence check of {directory or 'the root'} failed: "
                                   f"{local}")
                continue
            found += self._compare(directory, local, "")
        return found

    def _compare(self, directory: str | None, local: dict[str, LocalEntry] | None,
                 reason: str) -> int:
        if local is None:  # the directory is gone: its parent's check covers it
            self.side.checks.gone(directory or "")
            return 0
        found = planner.differences(local, self.side.model, self.local.rules.is_ignored,
                                    self.side.delete_extra, under=directory,
                                    shallow=directory is not None)
        skipped = self.side.skipped
        found = [p for p in found if p not in self.side.queue
                 and not (p in skipped and (e := local.get(p)) is not None
                          and e.local_key == skipped[p])]
        if found:
            self.side.counters.found += len(found)
            where = "the tree" if directory is None else (directory or "the root")
            why = f" ({reason})" if reason else ""
            self.side.reporter.note(f"check of {where}{why}: {len(found)} paths differ, "
                               f"syncing them (first: {found[0]})")
            self.side.mark_dirty(found, hint=False)
        return len(found)



def _scan_dirs(root: Path, directories: tuple[str, ...], rules: IgnoreRules, cache: HashCache
               ) -> list[tuple[str, dict[str, LocalEntry] | OSError | None]]:
    """For a worker thread: `scan_dir` of each directory (an OSError in place of one that
    could not be listed)."""
    out: list[tuple[str, dict[str, LocalEntry] | OSError | None]] = []
    for directory in directories:
        try:
            out.append((directory, scan_dir(root, directory, rules, cache)))
        except OSError as exc:
            out.append((directory, exc))
    return out
