"""The rig of the core tests: the client core against the real agent through in-memory streams.

`Rig` wires a `SyncEngine` as `lsync.client.session` wires it — an `AgentLink` over a
`MemoryAgentStream` (tests/memagent.py: the real `AgentService` in this process, no
subprocess, no sockets), an in-memory `HashCache`, `IgnoreRules` over a root `.gitignore`
that ignores `*.o` and `build/`, the local tree scanned by `scan_tree`, the manifest from
`list_tree`, `initial_sync`, then `run` — and lets the test play the watcher: `changed`
hands the paths an inotify watcher would report to the real session's batch handler
(`Session._on_batch`), `overflow` says events were lost. A simulated clock (monotonic time
plus a skew the test can advance, `SimClock`) lets the test reach the engine's periodic
whole-tree check without waiting ten minutes. `RecordingReporter` keeps what the engine
reports; `Rig.problems` lists what breaks properties (a)-(d) of tests/test_core_properties.py.

The fixtures `home` ($HOME for the agent's record of what lsync wrote), `rig` and
`quick_rig` are imported by the test modules that use them (tests/test_core_*.py,
tests/test_fleet_properties.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lsync.client.errors import LinkBroken
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import LocalEntry
from lsync.client.local.scanner import scan_tree
from lsync.client.local.watcher import WatchBatch
from lsync.client.remote.checks import FULL_EVERY
from lsync.client.remote.engine import SyncEngine
from lsync.client.remote.pathqueue import RETRY_MAX
from lsync.client.session import Options, Session
from lsync.client.target import Target
from lsync.client.transport.link import AgentLink
from lsync.protocol import PROTOCOL_VERSION, hashing, packing
from lsync.protocol import messages as m
from tests.memagent import MemoryAgentStream

LANE_DELAYS = (3, 0, 6, 1)  # turns of the event loop each in-memory data lane lags
STEP_TIMEOUT = 30.0  # seconds any wait for the engine may take before the test fails
QUICK_TIMEOUT = 3.0  # the same where the failure looked for is a hang or an endless loop
EXAMPLE_TIMEOUT = 5.0  # the same in generated examples (tiny trees; shrinking repeats them)
GITIGNORE = "*.o\nbuild/\n"
TEMP_PREFIX = ".lsync-tmp-"


# -- what the engine reports ----------------------------------------------------------------


@dataclass
class Failure:
    path: str
    message: str
    over_outputs: bool  # the remote held a directory with build outputs at `path` then


class SimClock:
    """Monotonic time plus a skew the test advances (the engine's timers, without waits);
    `frozen` stops the monotonic part (time then moves only when the test says so)."""

    def __init__(self, frozen: bool = False) -> None:
        self.skew = 0.0
        self.base: float | None = time.monotonic() if frozen else None

    def __call__(self) -> float:
        return (time.monotonic() if self.base is None else self.base) + self.skew

    def advance(self, seconds: float) -> None:
        self.skew += seconds


class WatcherClock:
    """The watcher's side of `seen_until`. The test delivers each change right after making
    it, so every change before now has been delivered: `seen_until` is the wall clock (ns),
    and `delivered_at` is when the last batch was handed over. An `in_sync` report as of a
    time after `delivered_at` comes from a convergence check begun after that batch."""

    def __init__(self) -> None:
        self.delivered_at = time.time_ns()
        self.asked = 0  # what the engine was last told

    def seen_until(self) -> int:
        self.asked = time.time_ns()
        return self.asked

    def delivered(self) -> None:
        self.delivered_at = time.time_ns()


class RecordingReporter:
    """A `Reporter` that keeps failures, notes, and how far the engine reported in sync."""

    def __init__(self, watcher: WatcherClock, over_outputs: Callable[[str], bool]) -> None:
        self.watcher = watcher
        self.over_outputs = over_outputs
        self.failures: list[Failure] = []
        self.notes: list[str] = []
        self.in_sync_as_of = -1  # the newest moment a convergence report covered (ns)
        self.reported = asyncio.Event()

    def state(self, text: str) -> None:
        pass

    def acked(self, path: str, latency: float | None, nbytes: int) -> None:
        pass

    def failed(self, path: str, message: str) -> None:
        # A copy whose source became a directory kept for its build outputs (its write
        # failed, and the copy was already on its way) fails for the same reason.
        source, sep, _ = message.partition(" no longer has the expected content")
        over = self.over_outputs(path) or bool(sep and self.over_outputs(source))
        self.failures.append(Failure(path, message, over))

    def note(self, message: str) -> None:
        self.notes.append(message)
        if message.startswith("idle; "):  # the in-sync report when some paths are failing
            self._covered(self.watcher.asked)

    def queue(self, queued: int, in_flight: int) -> None:
        pass

    def progress(self, done_bytes: int, total_bytes: int, done_files: int,
                 total_files: int) -> None:
        pass

    def ready(self, files: int, nbytes: int, seconds: float) -> None:
        pass

    def in_sync(self, as_of_ns: int, files: int, nbytes: int) -> None:
        self._covered(as_of_ns)

    def _covered(self, as_of: int) -> None:
        self.in_sync_as_of = max(self.in_sync_as_of, as_of)
        self.reported.set()


# -- one lsync "process" against one remote tree ---------------------------------------------


async def _collect(batches: AsyncIterator[list[list[Any]]]) -> list[list[Any]]:
    entries: list[list[Any]] = []
    async for batch in batches:
        entries.extend(batch)
    return entries


class Rig:
    """A local tree, a remote tree, and the engine currently syncing one to the other.

    `connect` makes one connection as `Session._one_connection` does; `cut` breaks it and
    reconnects as `Session._connect_loop` does (`_carry_over`, then `_adopt_owned` and the
    buffered paths on the new engine); `restart` stops cleanly and starts a new session
    with nothing carried over."""

    def __init__(self, base: Path, timeout: float = STEP_TIMEOUT,
                 frozen_clock: bool = False, lanes: int = 0) -> None:
        self.timeout = timeout  # the longest the engine may take for any one wait
        self.lanes = lanes  # data lanes per connection, each slower than the main stream
        self.local = base / "local"
        self.remote = base / "remote"
        self.local.mkdir()
        (self.local / ".gitignore").write_text(GITIGNORE)
        self.clock = SimClock(frozen_clock)
        self.watcher = WatcherClock()
        self.reporter = RecordingReporter(self.watcher, self.remote_dir_holds_outputs)
        self.outputs: dict[bytes, str] = {}  # build output content -> where it was made
        self.streams: list[MemoryAgentStream] = []
        self.session = self._new_session()
        self._engine: SyncEngine | None = None
        self._link: AgentLink | None = None
        self._runner: asyncio.Task[None] | None = None
        self.quiet_as_of = -1  # when a connection found the trees equal (ns)

    def _new_session(self) -> Session:
        options = Options(Target(None, None, str(self.remote)), self.local)
        session = Session(options, self.reporter)
        # The test plays an inotify watcher: every change brings an event unless the step
        # says it is lost (the read-ahead's lstats then serve the passes, as with inotify).
        session.local.reads.complete = lambda: True
        return session

    @property
    def engine(self) -> SyncEngine:
        assert self._engine is not None
        return self._engine

    @property
    def runner(self) -> asyncio.Task[None]:
        assert self._runner is not None
        return self._runner

    @property
    def stream(self) -> MemoryAgentStream:
        return self.streams[-1]

    # -- connections ---------------------------------------------------------------------
    async def connect(self) -> None:
        stream = MemoryAgentStream()
        self.streams.append(stream)
        link = AgentLink(stream)
        hello = m.Hello(PROTOCOL_VERSION,
                        {"hash": [hashing.XXH3_128, hashing.BLAKE2B_128],
                         "compression": packing.available_packings()},
                        str(self.remote), {"create_root": True})
        link.start(hello)
        manifest = asyncio.ensure_future(_collect(link.list_tree()))
        welcome = await link.welcome(self.timeout)
        for number in range(self.lanes):
            # Lanes that lag the main stream by different turns: they overtake each other.
            link.add_lane(stream.open_lane(LANE_DELAYS[number % len(LANE_DELAYS)]))
        session = self.session
        cache = HashCache(welcome.chosen["hash"])  # in memory only
        local: dict[str, LocalEntry] = await asyncio.to_thread(
            scan_tree, self.local, session.rules, cache, on_error=self._scan_problem,
            hash_files=False)
        entries = await asyncio.wait_for(manifest, self.timeout)
        engine = SyncEngine(link, self.local, session.rules, cache, session.reporter,
                            clock=self.clock,
                            compression=welcome.chosen.get("compression", packing.ZLIB),
                            seen_until=self.watcher.seen_until, close_events=True,
                            reads=self.session.local.reads)
        await engine.initial_sync(local, entries)
        gone = session._adopt_owned(engine, local)
        session._set_engine(engine)
        engine.mark_dirty(sorted(gone))
        buffered, session._buffered = session._buffered, {}
        for path, since in buffered.items():
            engine.mark_dirty([path], since)
        self._engine, self._link = engine, link
        if engine.idle:  # the initial comparison found nothing: no report will follow
            self.quiet_as_of = time.time_ns()
        self._runner = asyncio.ensure_future(engine.run())

    def _scan_problem(self, path: str, exc: Exception) -> None:
        self.reporter.failed(path, f"not synced for now: {exc}")

    async def _end_connection(self, reason: str) -> None:
        """What the session's `finally` does: close the link, end the engine's task."""
        assert self._link is not None
        if reason:
            await self._link.close(reason)
        runner = self.runner
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, LinkBroken):
            await runner
        await self._link.close("client ending")
        self.session._set_engine(None)

    async def cut(self, after: int) -> None:
        """Cut the link once the agent has handled `after` more messages (or when the
        engine goes idle first), then reconnect as the session does."""
        self.stream.cut_after(after)
        if not self.stream.is_cut:
            assert self._link is not None
            idle = asyncio.ensure_future(self.engine.wait_idle())
            closed = asyncio.ensure_future(self._link.closed)
            await asyncio.wait({idle, closed, self.runner}, timeout=self.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            closed.cancel()
            self._raise_unexpected()
            if not self.stream.is_cut:
                self.stream.cut()
        await self._end_connection("")
        self.session._carry_over(self.engine)
        await self.connect()

    async def restart(self, while_stopped: Callable[[], None]) -> None:
        """Stop as after Ctrl-C (drain, goodbye), change the tree, start afresh."""
        await self.quiet()
        await self._end_connection("user stopped lsync")
        while_stopped()
        self.session = self._new_session()
        await self.connect()

    async def close(self) -> None:
        if self._runner is not None and self._link is not None:
            await self._end_connection("test over")

    # -- what the watcher would say ------------------------------------------------------
    def changed(self, paths: list[str]) -> None:
        """A watcher batch: these paths changed (their writers have closed them)."""
        files = frozenset(p for p in paths if (self.local / p).is_file())
        self.session._on_batch(WatchBatch(list(paths), frozenset(), files))
        self.watcher.delivered()

    def overflow(self) -> None:
        """A watcher batch saying events were lost (inotify's IN_Q_OVERFLOW)."""
        self.session._on_batch(WatchBatch([], frozenset(), frozenset(), True,
                                          "event queue overflowed"))
        self.watcher.delivered()

    def periodic_check(self) -> None:
        """Let the clock reach the engine's slow whole-tree check, and wake the engine
        with an empty watcher batch (as every batch does)."""
        self.clock.advance(FULL_EVERY + 1)
        self.session._on_batch(WatchBatch([], frozenset(), frozenset()))
        self.watcher.delivered()

    # -- waiting -------------------------------------------------------------------------
    def _raise_unexpected(self) -> None:
        runner = self.runner
        if runner.done() and not runner.cancelled():
            exc = runner.exception()
            if exc is not None and not (self.stream.is_cut and isinstance(exc, LinkBroken)):
                raise exc

    def describe(self) -> str:
        engine = self.engine
        records = {p: (r.state.value, r.inflight) for p, r in engine.queue.records.items()}
        return f"records {records}, in flight {len(engine.window)}"

    async def quiet(self) -> None:
        """Wait until the engine is idle (bounded)."""
        idle = asyncio.ensure_future(self.engine.wait_idle())
        done, _ = await asyncio.wait({idle, self.runner}, timeout=self.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if idle not in done:
            idle.cancel()
            self._raise_unexpected()
            raise AssertionError(f"the engine is not idle after {self.timeout} s: "
                                 f"{self.describe()}")

    async def converged(self) -> None:
        """Wait until the engine reports that a convergence check begun after the last
        watcher batch found nothing left to do, and is idle (bounded). Paths failing for
        another reason than a directory kept for its build outputs are retried at once:
        the clock jumps past their backoff (see `problems` (d) for why they failed)."""
        await self._reported_since(self.watcher.delivered_at)
        for _ in range(3):
            if all(self.remote_dir_holds_outputs(p) for p in self.engine.queue.failing()):
                return
            self.clock.advance(RETRY_MAX + 1)
            self.changed([])  # an empty watcher batch wakes the engine
            await self._reported_since(self.watcher.delivered_at)

    async def _reported_since(self, moment: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not self.engine.idle or (self.reporter.in_sync_as_of < moment
                                       and self.quiet_as_of < moment):
            if self.runner.done():
                self._raise_unexpected()
                raise AssertionError("the engine stopped")
            self.reporter.reported.clear()
            reported = asyncio.ensure_future(self.reporter.reported.wait())
            idle = asyncio.ensure_future(self.engine.wait_idle())
            waits = {reported, self.runner} if self.engine.idle else {idle, self.runner}
            done, _ = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            reported.cancel()
            idle.cancel()
            self._raise_unexpected()
            if not done:
                raise AssertionError(
                    f"no in-sync report after the last batch within {self.timeout} s: "
                    f"{self.describe()}; notes {self.reporter.notes[-5:]}")

    # -- the remote side -----------------------------------------------------------------
    def make_output(self, directory: str, kind: str) -> str:
        """Write a build output into the remote directory `directory`."""
        number = len(self.outputs)
        content = f"build output {number}\n".encode()
        rel = (f"{directory}/" if directory else "") + (
            f"o{number}.o" if kind == "obj" else f"build/out{number}.bin")
        path = self.remote / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        self.outputs[content] = rel
        return rel

    def remote_dir_holds_outputs(self, rel: str) -> bool:
        top = self.remote / rel
        if top.is_symlink() or not top.is_dir():
            return False
        return any(content in self.outputs for content in _file_contents(top))

    # -- the checks ----------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What is wrong with the remote now, by properties (a) to (d)."""
        rules = IgnoreRules(self.local)
        local = _view(self.local, rules)
        remote = _view(self.remote, rules)
        failed = {f.path for f in self.reporter.failures}
        out: list[str] = []
        conflicts: list[str] = []
        for rel, want in sorted(local.items()):
            have = remote.get(rel)
            if have == want or (want[0] == "dir" and have is not None and have[0] == "dir"):
                continue
            if (have is not None and have[0] == "dir"
                    and self.remote_dir_holds_outputs(rel) and rel in failed):
                conflicts.append(rel)  # kept for its build outputs, and reported
                continue
            out.append(f"(a) {rel}: local {_show(want)}, remote {_show(have)}")
        for rel, have in sorted(remote.items()):
            if rel in local or any(rel.startswith(c + "/") for c in conflicts):
                continue
            if have[0] == "dir" and self.remote_dir_holds_outputs(rel) and not any(
                    other.startswith(rel + "/") and kind[0] != "dir"
                    and other not in local for other, kind in remote.items()):
                continue  # a directory lsync did not delete because it holds build outputs
            out.append(f"(a) {rel}: only on the remote: {_show(have)}")
        contents = set(_file_contents(self.remote))
        for content, rel in self.outputs.items():
            if content not in contents:
                out.append(f"(b) the build output made as {rel} is gone")
        for top, dirs, files in os.walk(self.remote):
            for name in dirs + files:
                if name.startswith(TEMP_PREFIX):
                    out.append(f"(c) temporary file left: {Path(top, name)}")
        for failure in self.reporter.failures:
            if not failure.over_outputs:
                out.append(f"(d) failure reported: {failure.path}: {failure.message}")
        for stream in self.streams:
            out.extend(f"(d) agent internal error: {e}" for e in stream.internal_errors)
        return out


Entry = tuple[Any, ...]


def _view(root: Path, rules: IgnoreRules) -> dict[str, Entry]:
    """Every entry below `root` not ignored: files by content and mode, links by target,
    directories by existence. Symlinks are never followed."""
    found: dict[str, Entry] = {}
    stack = [""]
    while stack:
        top = stack.pop()
        with os.scandir(root / top if top else root) as listing:
            for item in listing:
                rel = f"{top}/{item.name}" if top else item.name
                is_dir = item.is_dir(follow_symlinks=False)
                if item.name.startswith(TEMP_PREFIX) or rules.is_ignored(rel, is_dir):
                    continue
                if item.is_symlink():
                    found[rel] = ("link", os.readlink(item.path))
                elif is_dir:
                    found[rel] = ("dir",)
                    stack.append(rel)
                else:
                    st_ = item.stat(follow_symlinks=False)
                    found[rel] = ("file", Path(item.path).read_bytes(), stat.S_IMODE(st_.st_mode))
    return found


def _file_contents(top: Path) -> Iterator[bytes]:
    for directory, _, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                yield path.read_bytes()


def _show(entry: Entry | None) -> str:
    if entry is None:
        return "nothing"
    if entry[0] == "file":
        return f"file {entry[1][:40]!r} mode {entry[2]:o}"
    return " ".join(str(part) for part in entry)


# -- fixtures and helpers of the tests ------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME for the agent's record of what lsync wrote (~/.cache/lsync)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home



@pytest.fixture
def rig(home: Path) -> Rig:
    base = home.parent / "rig"
    base.mkdir()
    return Rig(base)


@pytest.fixture
def quick_rig(home: Path) -> Rig:
    """A rig whose waits give up after a few seconds (for tests of hangs and loops)."""
    base = home.parent / "quick-rig"
    base.mkdir()
    return Rig(base, timeout=QUICK_TIMEOUT)


def _files(rig: Rig, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (rig.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.local / rel).write_bytes(data)


def _check(rig: Rig) -> None:
    problems = rig.problems()
    assert not problems, "\n".join(problems)
