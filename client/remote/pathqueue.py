"""Every local path that lsync still has to make true on the remote, each in one state.

This is the heart of the client core: no asyncio, no file I/O, time passed in. A path is
known here from the moment something says it may have changed (a watcher hint, a scan
difference, a reply that failed) until the remote has acknowledged every operation sent
for it. Its record is in exactly one state:

- QUEUED: to be looked at, in the order paths were marked (`take` hands them out);
- HELD: its writer still has it open (the watcher saw a write and no close yet), or it
  could not be read consistently: looked at again at `due`, or as soon as `release` says
  the writer closed it;
- READING: taken by the engine, which is looking at the local path, reading it, and
  sending operations;
- WAITING: operations were sent for it and some are not answered yet;
- FAILED: its last operation failed; marked again at `due`, with a growing backoff.

A path changed again while READING or WAITING goes back to QUEUED (`again` for READING:
the engine's current pass may have read an old version), while its unanswered operations
stay counted (`inflight`). "Idle" is "no record except FAILED ones". Each change gets a
tick from one counter; `flushed(tick)` is the flush watermark: whether every change with a
smaller tick has been acknowledged by the remote (a failed one has not, and keeps its tick
through every retry until one succeeds; `failing` lists those paths).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

RETRY_FIRST = 1.0  # seconds before a failed path is tried again; doubles up to RETRY_MAX
RETRY_MAX = 60.0


class State(Enum):
    QUEUED = "queued"
    HELD = "held"
    READING = "reading"
    WAITING = "waiting"
    FAILED = "failed"


_TIMED = (State.HELD, State.FAILED)  # states that end at a time (`due`)


@dataclass(slots=True)
class PathRecord:
    path: str
    state: State
    tick: int  # the oldest change of this path not yet acknowledged
    since: float  # when that change was seen: the save, as far as we can tell (latency)
    inflight: int = 0  # operations sent for this path and not answered
    again: bool = False  # READING: changed again meanwhile, look once more when done
    due: float = 0.0  # HELD, FAILED: when to look again
    deferred: bool = False  # READING: was put back behind the queue once already
    failures: int = 0  # consecutive failed attempts (backoff)
    reason: str = ""  # FAILED: what went wrong, for the user
    urgent: bool = False  # a save the user just made: queued ahead of bulk work


class PathQueue:
    def __init__(self, hold_max: float = 2.0) -> None:
        self.hold_max = hold_max  # longest a path waits for its writer to close it
        self.records: dict[str, PathRecord] = {}
        # QUEUED paths, in order (an OrderedDict: taking from the front of a plain dict
        # walks over the slots of every key deleted before, quadratic in a long burst).
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._urgent: OrderedDict[str, None] = OrderedDict()  # the same for urgent records
        self._timed: set[str] = set()  # HELD and FAILED paths: what `wake` looks at
        self._failed = 0  # FAILED records (so that `idle` is one comparison)
        # Records in the order they were made, which is the order of their ticks (a record
        # keeps its tick for life), lazily pruned of records gone: the watermark.
        self._ticks: deque[PathRecord] = deque()
        self._tick = 0

    def _to(self, record: PathRecord, state: State) -> None:
        """Every change of a record's state goes through here (it keeps the indexes)."""
        old = record.state
        if old is state:
            return
        if old in _TIMED:
            self._timed.discard(record.path)
        if old is State.FAILED:
            self._failed -= 1
        record.state = state
        if state in _TIMED:
            self._timed.add(record.path)
        if state is State.FAILED:
            self._failed += 1

    # -- questions ---------------------------------------------------------------------------
    def __contains__(self, path: str) -> bool:
        return path in self.records

    def waiting(self, path: str, urgent: bool = False) -> bool:
        """Whether `path` is queued, not yet taken, and urgent if `urgent`: marking it again
        (so) would change nothing."""
        record = self.records.get(path)
        return (record is not None and record.state is State.QUEUED
                and (record.urgent or not urgent))

    def state(self, path: str) -> State | None:
        record = self.records.get(path)
        return None if record is None else record.state

    @property
    def idle(self) -> bool:
        """Nothing to do and nothing unanswered (failing paths aside)."""
        return len(self.records) == self._failed

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._urgent)

    @property
    def urgent(self) -> int:
        """Urgent paths queued (taken before the others)."""
        return len(self._urgent)

    def failing(self) -> dict[str, str]:
        return {p: self.records[p].reason for p in sorted(self._timed)
                if self.records[p].state is State.FAILED}

    def now_tick(self) -> int:
        """The tick the next change will get: a flush taken now waits for every change
        with a smaller one."""
        return self._tick + 1

    def flushed(self, tick: int) -> bool:
        """Every change older than `tick` is acknowledged (failed ones do not count)."""
        self._prune()
        return not self._ticks or self._ticks[0].tick >= tick

    def _forget(self, path: str) -> None:
        del self.records[path]
        self._prune()

    def _prune(self) -> None:
        """Drop the records gone from the front of `_ticks` (whatever is behind the oldest
        living record waits for it: in a burst, records end roughly in the order made)."""
        ticks, records = self._ticks, self.records
        while ticks and records.get(ticks[0].path) is not ticks[0]:
            ticks.popleft()

    def next_due(self) -> float | None:
        dues = [self.records[p].due for p in self._timed]
        return min(dues) if dues else None

    # -- changes -----------------------------------------------------------------------------
    def mark(self, paths: Iterable[str], now: float, since: float | None = None,
             retry_failed: bool = True, urgent: bool = False) -> int:
        """These paths may have changed (at `since`, default `now`); returns how many were
        not queued already. A FAILED path is queued at once only with `retry_failed` (a
        watcher hint: the user may have fixed the cause); otherwise it waits for its due
        time. `urgent` paths (a save) are taken before every path that is not, in the order
        they were marked, now and whenever they are queued again."""
        added = 0
        when = now if since is None else since
        for path in paths:
            record = self.records.get(path)
            if record is None:
                self._tick += 1
                record = self.records[path] = PathRecord(path, State.QUEUED, self._tick, when,
                                                         urgent=urgent)
                self._ticks.append(record)
                self._enqueue(record)
                added += 1
                continue
            if urgent and not record.urgent:
                record.urgent = True
                if self._queue.pop(path, 0) is None:  # it was queued: now with the urgent
                    self._urgent[path] = None
            if record.state is State.READING:
                record.again = True
            elif record.state is State.WAITING or (record.state is State.FAILED
                                                   and retry_failed):
                self._requeue(record, when)
                added += 1
            # QUEUED stays where it is; HELD waits for its writer or its deadline.
        return added

    def _enqueue(self, record: PathRecord) -> None:
        (self._urgent if record.urgent else self._queue)[record.path] = None

    def _dequeue(self, path: str) -> None:
        if self._queue.pop(path, 0) == 0:  # (None when it was there)
            self._urgent.pop(path, None)

    def hold(self, paths: Iterable[str], now: float) -> None:
        """Their writers have them open: do not read them before `release` or hold_max."""
        for path in paths:
            record = self.records.get(path)
            if record is None:
                self.mark([path], now)
                record = self.records[path]
            if record.state is State.QUEUED:
                self._dequeue(path)
                self._to(record, State.HELD)
                record.due = now + self.hold_max
            elif record.state is State.READING:
                record.again = True  # the pass finishing now will be followed by a hold

    def release(self, paths: Iterable[str], now: float) -> None:
        """Their writers closed them: queue the held ones now."""
        for path in paths:
            record = self.records.get(path)
            if record is not None and record.state is State.HELD and record.due > now:
                record.due = now
        self.wake(now)

    def wake(self, now: float) -> int:
        """Queue every HELD or FAILED path whose time has come; returns how many."""
        woken = 0
        for path in [p for p in self._timed if self.records[p].due <= now]:
            self._requeue(self.records[path], now)
            woken += 1
        return woken

    def _requeue(self, record: PathRecord, when: float) -> None:
        """Back to the end of the queue. A failed path keeps its tick: its retry carries
        the same unacknowledged change, so a flush barrier taken before the failure waits
        for the retry to succeed (a retry that fails again holds it still)."""
        if record.state is State.FAILED:
            record.since = when
        self._to(record, State.QUEUED)
        self._enqueue(record)

    # -- the engine's passes -----------------------------------------------------------------
    def take(self) -> tuple[str, PathRecord] | None:
        """The next QUEUED path, now READING."""
        while self._urgent or self._queue:
            path, _ = (self._urgent or self._queue).popitem(last=False)
            record = self.records[path]
            if record.state is State.QUEUED:
                self._to(record, State.READING)
                record.again = False
                return path, record
        return None

    def peek(self, limit: int) -> list[str]:
        """The next `limit` QUEUED paths, for reading ahead."""
        out: list[str] = []
        for queue in (self._urgent, self._queue):
            for path in queue:
                if len(out) >= limit:
                    return out
                out.append(path)
        return out

    def defer(self, path: str) -> None:
        """READING → QUEUED at the end of the queue (a delete waits behind the paths marked
        with it, one of which may be where its content went)."""
        record = self.records[path]
        self._to(record, State.QUEUED)
        record.deferred = True
        self._enqueue(record)

    def retry(self, path: str, now: float, delay: float) -> None:
        """READING → HELD for `delay` (the file kept changing while read, or vanished)."""
        record = self.records[path]
        record.deferred = False
        if record.again:
            record.again = False
            self._to(record, State.QUEUED)
            self._enqueue(record)
            return
        self._to(record, State.HELD)
        record.due = now + delay

    def done(self, path: str, now: float) -> None:
        """The engine's pass over `path` is over: whatever it sent is counted in flight."""
        record = self.records[path]
        record.deferred = False
        if record.again:
            record.again = False
            self._to(record, State.QUEUED)
            self._enqueue(record)
        elif record.inflight:
            self._to(record, State.WAITING)
        else:
            self._forget(path)

    def fail(self, path: str, now: float, reason: str, own_pass: bool = False) -> None:
        """The path cannot be synced now: a remote operation for it failed, or (`own_pass`)
        the engine's pass over it, which is READING it, could not read it."""
        record = self.records.get(path)
        if record is None:
            self._tick += 1
            record = self.records[path] = PathRecord(path, State.WAITING, self._tick, now)
            self._ticks.append(record)
        if own_pass and record.state is State.READING:
            if record.again:  # changed meanwhile: look again at once
                record.again = False
                self._to(record, State.QUEUED)
                self._enqueue(record)
                return
        elif record.state in (State.QUEUED, State.READING):
            if record.state is State.READING:
                record.again = True  # the pass under way looks again, what failed forgotten
            record.reason = reason
            return  # a newer pass is coming anyway
        if record.state is State.FAILED:
            # Another operation of the same attempt failed (a tree's deletes, say): one
            # failed attempt, one step of backoff, whatever number of operations it sent.
            record.reason = reason
            return
        self._dequeue(path)
        record.failures += 1
        record.reason = reason
        record.again = False
        self._to(record, State.FAILED)
        record.due = now + min(RETRY_MAX, RETRY_FIRST * 2 ** (record.failures - 1))

    # -- the window's replies ----------------------------------------------------------------
    def sent(self, path: str) -> None:
        """An operation for `path` went out (during its pass)."""
        record = self.records.get(path)
        if record is None:
            self._tick += 1
            record = self.records[path] = PathRecord(path, State.WAITING, self._tick, 0.0)
            self._ticks.append(record)
        record.inflight += 1

    def answered(self, path: str, ok: bool) -> None:
        """One operation for `path` was answered (`ok`: acknowledged)."""
        record = self.records.get(path)
        if record is None:
            return
        record.inflight -= 1
        if ok and record.state is State.FAILED and record.inflight == 0:
            return  # an older failure still stands until its retry
        if ok:
            record.failures = 0 if record.inflight == 0 else record.failures
        if record.state is State.WAITING and record.inflight == 0:
            self._forget(path)
