"""The client core against the real agent through in-memory byte streams (issue 8).

A `SyncEngine` is wired as `lsync.client.session` wires it — an `AgentLink` over a
`MemoryAgentStream` (tests/memagent.py: the real `AgentService` in this process, no
subprocess, no sockets), an in-memory `HashCache`, `IgnoreRules` over a root `.gitignore`
that ignores `*.o` and `build/`, the local tree scanned by `scan_tree`, the manifest from
`list_tree`, `initial_sync`, then `run` — and the test plays the watcher: after each local
change it hands the paths an inotify watcher would report to the real session's batch
handler (`Session._on_batch`), or, for a lost event, nothing at all. A simulated clock
(monotonic time plus a skew the test can advance) lets the test reach the engine's periodic
whole-tree check without waiting ten minutes.

Hypothesis generates sequences of local changes (file creates, edits in place or by
rename, deletes, chmods; directory creates, removals, moves to other parents and back,
renames over other entries; type changes between file, directory and symlink; symlinks to
in-tree directories and files), lost watcher events (followed by an overflow signal or by
nothing until the end), link cuts in the middle of a burst (reconnect as the session does:
pending paths and owned set carried over), clean restarts with changes made while stopped
(a fresh engine and session: ownership can only come from the agent's record), and remote
build outputs (`*.o`, `build/…`) written behind lsync's back. After the last step the test
waits until the engine reports that a convergence check found nothing left after the last
change it was told about (its `in_sync` report, or its "idle; N paths failing" note; paths
failing for another reason than a directory kept for build outputs get their retry at
once, the clock jumping past their backoff), and checks:

(a) the remote equals the local tree on every path not ignored locally (files by content
    and mode, links by target, directories by existence), except that a remote directory
    that holds build outputs may stay where the local tree has nothing (lsync deletes what
    it made, and keeps the directory, possibly moved aside), and where the local tree has
    a file or a link (then lsync must have reported an error for that path);
(b) every build output ever written remotely still exists, with its content, somewhere
    under the remote root (it may have moved along with its directory);
(c) no `.lsync-tmp-*` file is left on the remote;
(d) no failure was reported, except for a path where the remote held a directory with
    build outputs when the failure was reported (or a copy from such a directory); and the
    agent hit no internal error.

Deterministic tests follow: the symptoms of issue 8 at core level (a symlink to an in-tree
directory, a restart with deletions, build outputs through directory moves, `wait_idle`
during a slow read, a big half-rewritten file), then one reduced reproduction of each defect
the property found (each with its diagnosis; the core fixes are in 0fc9d6a), and the
property test runs its own reduced failing sequences first, as explicit examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lsync.client.remote.passes as passes_module
from lsync.client.errors import LinkBroken
from lsync.client.local import scanner, stableread
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
from lsync.protocol.framing import MAX_FRAME
from tests.memagent import MemoryAgentStream, open_link

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
        return Session(options, self.reporter)

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


# -- local changes ----------------------------------------------------------------------------

NAMES = ("a", "b", "f.c", "g.h")
MAX_DEPTH = 3


def content(version: int) -> bytes:
    """Few distinct contents, so that files often share one (copies on the remote)."""
    return f"/* version {version} */\n".encode() * (1 + version % 4)


def _entries(root: Path) -> dict[str, str]:
    """Local entries the changes may pick, by kind ("" is the root directory)."""
    found = {"": "dir"}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(top, name)
            rel = full.relative_to(root).as_posix()
            if rel == ".gitignore":
                continue
            found[rel] = ("link" if full.is_symlink() else "dir" if full.is_dir() else "file")
    return dict(sorted(found.items()))


def _pick(items: list[str], index: int) -> str | None:
    return items[index % len(items)] if items else None


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _depth(rel: str) -> int:
    return 0 if not rel else rel.count("/") + 1


def _remove(root: Path, rel: str) -> list[str]:
    """Remove what is at `rel` (a whole tree); returns the removed paths, deepest first, as
    inotify reports them."""
    path = root / rel
    gone: list[str] = []
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path, topdown=False):
            for name in files + dirs:
                gone.append(Path(top, name).relative_to(root).as_posix())
        shutil.rmtree(path)
    else:
        path.unlink()
    return [*gone, rel]


def _write(root: Path, rel: str, data: bytes, by_rename: bool) -> list[str]:
    path = root / rel
    if by_rename:  # how vim and many editors save
        temp = path.with_name(f".{path.name}.swp")
        temp.write_bytes(data)
        if path.exists():
            os.chmod(temp, stat.S_IMODE(path.stat().st_mode))
        os.rename(temp, path)
        return [rel, temp.relative_to(root).as_posix()]
    path.write_bytes(data)
    return [rel]


@dataclass(frozen=True)
class Write:
    """Create a file (or edit one) at directory `where` / `name`."""

    where: int
    name: str
    version: int
    by_rename: bool
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        parent = _pick([p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH],
                       self.where)
        assert parent is not None
        rel = _join(parent, self.name)
        if kinds.get(rel, "file") != "file":
            return []
        return _write(root, rel, content(self.version), self.by_rename)


@dataclass(frozen=True)
class Edit:
    which: int
    version: int
    by_rename: bool
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k == "file"], self.which)
        if rel is None:
            return []
        return _write(root, rel, content(self.version) + b"edited\n", self.by_rename)


@dataclass(frozen=True)
class Chmod:
    which: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k == "file"], self.which)
        if rel is None:
            return []
        path = root / rel
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) ^ 0o100)
        return [rel]


@dataclass(frozen=True)
class Delete:
    """Delete a file or a symlink."""

    which: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k in ("file", "link")],
                    self.which)
        return [] if rel is None else _remove(root, rel)


@dataclass(frozen=True)
class MakeDir:
    """Create a directory holding one file."""

    where: int
    name: str
    version: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        parent = _pick([p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH],
                       self.where)
        assert parent is not None
        rel = _join(parent, self.name)
        if rel in kinds:
            return []
        (root / rel).mkdir()
        return [rel, *_write(root, f"{rel}/f.c", content(self.version), False)]


@dataclass(frozen=True)
class RemoveDir:
    which: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        rel = _pick([p for p, k in _entries(root).items() if k == "dir" and p], self.which)
        return [] if rel is None else _remove(root, rel)


@dataclass(frozen=True)
class MoveDir:
    """Rename a directory to `where` / `name` (another parent, or over another entry),
    and with `back`, afterwards back where it was."""

    which: int
    where: int
    name: str
    back: bool
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        src = _pick([p for p, k in kinds.items() if k == "dir" and p], self.which)
        if src is None:
            return []
        parents = [p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH
                   and p != src and not p.startswith(src + "/")]
        parent = _pick(parents, self.where)
        assert parent is not None
        dst = _join(parent, self.name)
        if dst == src or src.startswith(dst + "/"):
            return []
        reported: list[str] = []
        if dst in kinds:  # renamed over: what was there goes first (rm -rf; mv)
            reported += _remove(root, dst)
        os.rename(root / src, root / dst)
        reported = [dst, *reported, src]
        if self.back and (root / src).parent.is_dir():
            os.rename(root / dst, root / src)
            reported += [src, dst]
        return reported


@dataclass(frozen=True)
class Retype:
    """Replace an entry by one of another kind (file, directory or symlink)."""

    which: int
    to: str
    version: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        rel = _pick([p for p, k in kinds.items() if p and k != self.to], self.which)
        if rel is None:
            return []
        removed = _remove(root, rel)
        path = root / rel
        if self.to == "file":
            return [*_write(root, rel, content(self.version), False), *removed]
        if self.to == "dir":
            path.mkdir()
            return [rel, *_write(root, f"{rel}/f.c", content(self.version), False), *removed]
        os.symlink("f.c" if self.version % 2 else "..", path)
        return [rel, *removed]


@dataclass(frozen=True)
class MakeLink:
    """A symlink at `where` / `name` to an existing entry (`s/link -> ../a`)."""

    where: int
    name: str
    target: int
    lost: bool = False

    def apply(self, root: Path) -> list[str]:
        kinds = _entries(root)
        parent = _pick([p for p, k in kinds.items() if k == "dir" and _depth(p) < MAX_DEPTH],
                       self.where)
        assert parent is not None
        rel = _join(parent, self.name)
        target = _pick([p for p, k in kinds.items() if k in ("dir", "file") and p != rel],
                       self.target)
        if rel in kinds or target is None:
            return []
        os.symlink(os.path.relpath(root / target if target else root, root / parent),
                   root / rel)
        return [rel]


Change = Write | Edit | Chmod | Delete | MakeDir | RemoveDir | MoveDir | Retype | MakeLink


@dataclass(frozen=True)
class BuildOutput:
    """A build on the remote writes an output into one of its directories."""

    where: int
    kind: str  # "obj": <dir>/oN.o; "build": <dir>/build/outN.bin


@dataclass(frozen=True)
class Turns:
    """Let the engine (and the agent) run this many event loop turns."""

    count: int


@dataclass(frozen=True)
class Quiet:
    """Wait until the engine is idle."""


@dataclass(frozen=True)
class Overflow:
    """The watcher reports lost events."""


@dataclass(frozen=True)
class Cut:
    """The link drops after the agent handled `after` more messages."""

    after: int


@dataclass(frozen=True)
class Restart:
    """lsync is stopped, the tree changes, lsync starts again."""

    changes: tuple[Change, ...]


Step = Change | BuildOutput | Turns | Quiet | Overflow | Cut | Restart

LOST = st.integers(0, 5).map(lambda n: n == 5)
INDEX = st.integers(0, 15)
NAME = st.sampled_from(NAMES)
VERSION = st.integers(0, 7)

CHANGES: st.SearchStrategy[Change] = st.one_of(
    st.builds(Write, INDEX, NAME, VERSION, st.booleans(), LOST),
    st.builds(Edit, INDEX, VERSION, st.booleans(), LOST),
    st.builds(Chmod, INDEX, LOST),
    st.builds(Delete, INDEX, LOST),
    st.builds(MakeDir, INDEX, NAME, VERSION, LOST),
    st.builds(RemoveDir, INDEX, LOST),
    st.builds(MoveDir, INDEX, INDEX, NAME, st.booleans(), LOST),
    st.builds(Retype, INDEX, st.sampled_from(["file", "dir", "link"]), VERSION, LOST),
    st.builds(MakeLink, INDEX, NAME, INDEX, LOST),
)
STEPS: st.SearchStrategy[list[Step]] = st.lists(st.one_of(
    CHANGES, CHANGES, CHANGES, CHANGES,
    st.builds(BuildOutput, INDEX, st.sampled_from(["obj", "build"])),
    st.builds(Turns, st.integers(1, 20)),
    st.just(Quiet()),
    st.just(Overflow()),
    st.builds(Cut, st.integers(0, 8)),
    st.builds(Restart, st.lists(CHANGES, max_size=4).map(tuple)),
), min_size=1, max_size=14)

# Where the examples start: a small tree with a symlink to an in-tree directory.
START = {"a/f.c": content(1), "a/d/g.h": content(2), "b/f.c": content(3), "g.h": content(4)}


def _make_start(root: Path) -> None:
    for rel, data in START.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "b" / "a").symlink_to("../a")


def _remote_dirs(root: Path) -> list[str]:
    rules = IgnoreRules(root)
    return ["", *sorted(rel for rel, entry in _view(root, rules).items() if entry[0] == "dir")]


async def _run_example(base: Path, steps: list[Step], final_overflow: bool,
                       lanes: int = 0) -> None:
    rig = Rig(base, EXAMPLE_TIMEOUT, lanes=lanes)
    _make_start(rig.local)
    lost = False
    try:
        await rig.connect()
        await rig.quiet()
        for step in steps:
            if isinstance(step, BuildOutput):
                directory = _pick(_remote_dirs(rig.remote), step.where)
                assert directory is not None
                rig.make_output(directory, step.kind)
            elif isinstance(step, Turns):
                for _ in range(step.count):
                    await asyncio.sleep(0)
            elif isinstance(step, Quiet):
                await rig.quiet()
            elif isinstance(step, Overflow):
                rig.overflow()
                lost = False
            elif isinstance(step, Cut):
                await rig.cut(step.after)
            elif isinstance(step, Restart):
                def while_stopped(changes: tuple[Change, ...] = step.changes) -> None:
                    for change in changes:
                        change.apply(rig.local)
                await rig.restart(while_stopped)
            else:
                paths = step.apply(rig.local)
                if step.lost:
                    lost = lost or bool(paths)
                elif paths:
                    rig.changed(paths)
        if lost:  # only an overflow signal or the periodic check can find these
            if final_overflow:
                rig.overflow()
            else:
                rig.periodic_check()
        await rig.converged()
        problems = rig.problems()
        assert not problems, "\n".join(problems)
    finally:
        await rig.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME for the agent's record of what lsync wrote (~/.cache/lsync)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# Reduced sequences that failed before the core fixes of 0fc9d6a (moved subtrees):
@example(steps=[Chmod(0), MoveDir(0, 1, "a", back=False)], final_overflow=False,
         batched=False, lanes=False)
@example(steps=[MoveDir(0, 3, "a", back=False), MoveDir(3, 9, "a", back=False)],
         final_overflow=False, batched=False, lanes=False)
@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(steps=STEPS, final_overflow=st.booleans(), batched=st.booleans(), lanes=st.booleans())
def test_remote_converges_to_local_and_keeps_build_outputs_whatever_happens(
        home: Path, steps: list[Step], final_overflow: bool, batched: bool,
        lanes: bool) -> None:
    """Properties (a)-(d) of the module docstring after any sequence of steps; `batched`:
    every new small file travels in a WriteBatch, as in a burst (whatever the queue);
    `lanes`: four data lanes, each lagging the main stream differently, carry saves and
    batches (so writes and other operations arrive out of the order they were sent)."""
    base = Path(tempfile.mkdtemp(dir=home.parent))
    bulk_queue = passes_module.BULK_QUEUE
    try:
        if batched:
            passes_module.BULK_QUEUE = 0
        asyncio.run(_run_example(base, steps, final_overflow, 4 if lanes else 0))
    finally:
        passes_module.BULK_QUEUE = bulk_queue
        shutil.rmtree(base, ignore_errors=True)


# -- the symptoms of issue 8, one by one --------------------------------------------------------


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


def test_edit_in_a_directory_after_a_symlink_to_it_is_removed_reaches_the_remote(
        rig: Rig) -> None:
    """Issue 8, symptom 1 reduced: a/f.c, s/link -> ../a; rm s/link; edit a/f.c."""
    (rig.local / "a").mkdir()
    (rig.local / "a" / "f.c").write_bytes(b"int f;\n")
    (rig.local / "s").mkdir()
    (rig.local / "s" / "link").symlink_to("../a")

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        assert os.readlink(rig.remote / "s" / "link") == "../a"
        (rig.local / "s" / "link").unlink()
        rig.changed(["s/link"])
        (rig.local / "a" / "f.c").write_bytes(b"int f = 1;\n")
        rig.changed(["a/f.c"])
        await rig.converged()
        assert (rig.remote / "a" / "f.c").read_bytes() == b"int f = 1;\n"
        assert not os.path.lexists(rig.remote / "s" / "link")
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_restart_deletes_exactly_what_lsync_wrote_and_was_deleted_while_stopped(
        rig: Rig) -> None:
    """Issue 8, symptom 4: ownership comes from the agent's record on a fresh start. Files
    and directories lsync wrote and that were deleted while it was stopped are deleted;
    a file modified remotely since lsync wrote it, a remote file lsync never made, build
    outputs and the directory holding them stay."""
    files = {"keep.c": b"keep\n", "gone.c": b"gone\n", "mod.c": b"mod\n",
             "d/e.c": b"e\n", "d/sub/h.c": b"h\n", "lib/a.c": b"a\n"}
    for rel, data in files.items():
        (rig.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.local / rel).write_bytes(data)
    rig.remote.mkdir()
    (rig.remote / "theirs.txt").write_bytes(b"made on the remote\n")

    def while_stopped() -> None:
        for rel in ("gone.c", "mod.c"):
            (rig.local / rel).unlink()
        shutil.rmtree(rig.local / "d")
        (rig.local / "lib" / "a.c").unlink()

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        rig.make_output("lib", "obj")
        rig.make_output("", "obj")
        (rig.remote / "mod.c").write_bytes(b"changed on the remote\n")
        before = set(_view(rig.remote, IgnoreRules(rig.remote)))
        await rig.restart(while_stopped)
        await rig.converged()
        after = set(_view(rig.remote, IgnoreRules(rig.remote)))
        assert before - after == {"gone.c", "d", "d/e.c", "d/sub", "d/sub/h.c", "lib/a.c"}
        assert after - before == set()
        assert (rig.remote / "mod.c").read_bytes() == b"changed on the remote\n"
        assert (rig.remote / "theirs.txt").read_bytes() == b"made on the remote\n"
        assert not rig.reporter.failures
        await rig.close()

    asyncio.run(scenario())


def _library(rig: Rig) -> None:
    for rel in ("lib/a.c", "lib/sub/b.c", "other/c.c", "lib2/z.c"):
        (rig.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.local / rel).write_bytes(f"/* {rel} */\n".encode())


async def _library_with_outputs(rig: Rig) -> None:
    await rig.connect()
    await rig.converged()
    rig.make_output("lib", "obj")
    rig.make_output("lib", "build")
    rig.make_output("lib/sub", "obj")


def test_build_outputs_survive_a_directory_moved_to_another_parent_and_back(
        rig: Rig) -> None:
    _library(rig)

    async def scenario() -> None:
        await _library_with_outputs(rig)
        os.rename(rig.local / "lib", rig.local / "other" / "lib")
        rig.changed(["other/lib", "lib"])
        await rig.converged()
        _check(rig)
        os.rename(rig.local / "other" / "lib", rig.local / "lib")
        rig.changed(["lib", "other/lib"])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_build_outputs_survive_a_directory_renamed_over(rig: Rig) -> None:
    _library(rig)

    async def scenario() -> None:
        await _library_with_outputs(rig)
        removed = _remove(rig.local, "lib")
        os.rename(rig.local / "lib2", rig.local / "lib")  # rm -rf lib; mv lib2 lib
        rig.changed(["lib", *removed, "lib2"])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_build_outputs_survive_a_directory_replaced_by_a_file(rig: Rig) -> None:
    """The outputs stay somewhere under the remote root; the file is synced, or (if the
    directory stays in its way) an error is reported for it (`Rig.problems`)."""
    _library(rig)

    async def scenario() -> None:
        await _library_with_outputs(rig)
        removed = _remove(rig.local, "lib")
        (rig.local / "lib").write_bytes(b"now a file\n")
        rig.changed(["lib", *removed])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_engine_is_not_idle_while_a_file_is_being_read(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 8, symptom 6: a path taken off the queue and still being read (a big file,
    read in a worker thread) keeps `wait_idle` from returning."""
    entered = threading.Event()
    release = threading.Event()
    original = stableread.read_file_stable

    def slow_read(root: Path, rel: str, cache: HashCache, *, limit: int = 1 << 30,
                  ) -> tuple[bytes, LocalEntry]:
        if rel == "big.bin":
            entered.set()
            release.wait(STEP_TIMEOUT)
        return original(root, rel, cache, limit=limit)

    monkeypatch.setattr("lsync.client.remote.passes.read_file_stable", slow_read)
    data = os.urandom(passes_module.SETTLE_SIZE + 4096)  # read in a thread, not inline

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "big.bin").write_bytes(data)
        rig.changed(["big.bin"])
        assert await asyncio.to_thread(entered.wait, STEP_TIMEOUT)
        assert not rig.engine.idle
        idle = asyncio.ensure_future(rig.engine.wait_idle())
        # A negative check: give wait_idle a bounded chance to return too early.
        done, _ = await asyncio.wait({idle}, timeout=0.2)
        assert not done, "wait_idle returned while big.bin was being read"
        assert not rig.engine.idle
        release.set()
        await asyncio.wait_for(idle, STEP_TIMEOUT)
        assert (rig.remote / "big.bin").read_bytes() == data
        await rig.converged()
        _check(rig)
        await rig.close()

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_half_of_a_synced_40_mib_file_edited_is_sent_within_the_frame_limit(
        rig: Rig) -> None:
    """Issue 8, symptom 7: the delta of a half-rewritten 40 MiB file exceeds a frame; it
    must travel whole (in chunks) or as a delta that fits, without killing the engine."""
    size = 40 << 20
    old = os.urandom(size)
    new = old[:size // 2] + os.urandom(size - size // 2)
    assert size // 2 > MAX_FRAME  # the literal part of any delta exceeds one frame
    (rig.local / "huge.bin").write_bytes(old)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        assert (rig.remote / "huge.bin").read_bytes() == old
        (rig.local / "huge.bin").write_bytes(new)
        rig.changed(["huge.bin"])
        await rig.converged()
        assert (rig.remote / "huge.bin").read_bytes() == new
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


# -- what the property found; each test reproduces one defect of the core -------------------
#
# Each test below is the reduced form of a failing sequence of the property test, named
# after what must hold, with the diagnosis of the defect it caught (fixed in 0fc9d6a).

def test_overflow_reported_while_a_convergence_check_runs_gets_its_whole_tree_check(
        quick_rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 0fc9d6a: client/engine.py SyncEngine.run: the loop clears `_changed` just before
    waiting, so a poke that arrived while it awaited check_if_due (a convergence check's scan
    in its thread) is lost: check_all (a watcher overflow) then waits for the next periodic
    check (FULL_EVERY, 10 min); wait_idle clears the same event. Clear at the top of the loop,
    with an event of the loop's own."""
    rig = quick_rig
    entered = threading.Event()
    release = threading.Event()
    original = scanner.scan_dir

    def slow_scan_dir(root: Path, rel: str, rules: IgnoreRules,
                      cache: HashCache) -> dict[str, LocalEntry] | None:
        entered.set()
        release.wait(STEP_TIMEOUT)
        return original(root, rel, rules, cache)

    monkeypatch.setattr("lsync.client.remote.convergence.scan_dir", slow_scan_dir)
    _files(rig, {"a/f.c": b"one\n", "b/f.c": b"two\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "a" / "g.c").write_bytes(b"three\n")
        rig.changed(["a/g.c"])  # once synced, directory a is checked (the scan blocks)
        assert await asyncio.to_thread(entered.wait, STEP_TIMEOUT)
        (rig.local / "b" / "h.c").write_bytes(b"lost\n")  # its event is lost ...
        rig.overflow()  # ... and the watcher says so, while the check of a runs
        release.set()
        await rig.converged()
        _check(rig)
        await rig.close()

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_copy_refused_by_a_directory_kept_for_build_outputs_is_retried_with_backoff(
        quick_rig: Rig) -> None:
    """Before 0fc9d6a: client/window.py verdict: every failed Copy is looked at again at once
    (look_again of source and target, the source's digest forgotten, and no error reported);
    when the destination cannot be written (TYPE_CONFLICT: a remote directory with build
    outputs that the model does not know, made after the manifest) that is an endless, silent,
    hot loop re-sending the source and the copy (thousands of messages a second). Only
    DIGEST_MISMATCH means the source changed; other codes should be reported and retried later
    (backoff), as WriteFile's are."""
    rig = quick_rig
    _files(rig, {"a/f.c": b"same\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        rig.make_output("x.c", "obj")  # a build makes directory x.c (unknown to the model)
        handled = rig.stream.handled
        (rig.local / "x.c").write_bytes(b"same\n")  # the remote has it: a Copy onto x.c
        rig.changed(["x.c"])
        await rig.converged()
        _check(rig)  # x.c kept for its outputs, and an error reported for it
        assert rig.stream.handled - handled < 50, "operations sent in a loop"
        await rig.close()

    asyncio.run(scenario())


def test_file_changed_just_before_its_directory_moved_is_synced_at_the_new_place(
        rig: Rig) -> None:
    """Before 0fc9d6a: client/passes.py _make_dir / _reconcile_listing: a directory the watcher
    reports (moved in, or swapped for another one) is compared with the model by child names
    only, and after a directory rename only its direct children are marked: a file deeper in a
    moved directory changed just before the move (event under the old path), or a file of a
    directory swapped in under an existing name, keeps its old remote content until the
    periodic check."""
    _files(rig, {"a/f.c": b"f\n", "a/d/g.h": b"old\n", "c/k.c": b"k\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "a" / "d" / "g.h").write_bytes(b"new\n")
        rig.changed(["a/d/g.h"])
        os.rename(rig.local / "a", rig.local / "c" / "a")
        rig.changed(["c/a", "a"])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_directories_swapped_by_two_renames_are_compared_file_by_file(rig: Rig) -> None:
    """Before 0fc9d6a: client/passes.py _make_dir / _reconcile_listing: a directory the watcher
    reports (moved in, or swapped for another one) is compared with the model by child names
    only, and after a directory rename only its direct children are marked: a file deeper in a
    moved directory changed just before the move (event under the old path), or a file of a
    directory swapped in under an existing name, keeps its old remote content until the
    periodic check."""
    _files(rig, {"x/f.c": b"x\n", "y/f.c": b"y\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        os.rename(rig.local / "x", rig.local / "z")
        rig.changed(["z", "x"])
        os.rename(rig.local / "y", rig.local / "x")
        rig.changed(["x", "y"])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_goodbye_while_the_engine_still_sends_ends_it_with_link_broken(rig: Rig) -> None:
    """Session stops by saying goodbye and then cancelling the engine: a change that comes
    in between must end the engine with LinkBroken, never a raw ProtocolError."""
    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "late.c").write_bytes(b"saved during the drain\n")
        rig.changed(["late.c"])
        link, runner = rig._link, rig.runner
        assert link is not None
        await link.close("user stopped lsync")  # as Session does after the drain
        runner.cancel()
        outcome = (await asyncio.gather(runner, return_exceptions=True))[0]
        assert outcome is None or isinstance(outcome, LinkBroken | asyncio.CancelledError), (
            f"the engine ended with {outcome!r}")

    asyncio.run(scenario())


def test_after_lost_events_a_file_below_a_link_turned_directory_syncs_without_error(
        rig: Rig) -> None:
    """Before 0fc9d6a: client/passes.py: a pass sends operations for a path whose parent the
    model holds as a link or a file (the parent's type change not handled yet: its events
    lost, or its pass retried later); the agent refuses (BAD_PATH / TYPE_CONFLICT, reported),
    the model keeps a phantom owned entry under the link, whose Delete fails again when the
    parent is fixed; the paths end FAILED with backoff. The planner should queue the parent
    first."""
    _files(rig, {"a/f.c": b"f\n"})
    (rig.local / "s").symlink_to("a")

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "s").unlink()
        (rig.local / "s").mkdir()  # these two events are lost
        (rig.local / "s" / "g.c").write_bytes(b"g\n")
        rig.changed(["s/g.c"])
        rig.overflow()
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_entries_below_a_directory_just_replaced_by_a_symlink_are_not_read_through_it(
        home: Path) -> None:
    """Before 0fc9d6a: client/passes.py _parent_is_real: the 'this parent is no symlink' answer
    is reused for REAL_PARENT_TTL, so a pass over a/x right after `a` was replaced by a
    symlink lstat()s through the new link and syncs what it finds there (here a Symlink a/x,
    refused by the agent and reported); lstat relative to a parent opened with O_NOFOLLOW
    (scanner._open_parent) would not."""
    base = home.parent / "frozen-rig"
    base.mkdir()
    rig = Rig(base, frozen_clock=True)  # the engine's clock moves only when told to
    for top in ("a", "b"):
        (rig.local / top).mkdir()
        (rig.local / top / "l").symlink_to(f"target-in-{top}")

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        removed = _remove(rig.local, "a")
        (rig.local / "a").symlink_to("b")
        rig.changed(["a", *removed])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_file_replaced_by_a_directory_while_being_read_is_looked_at_again(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 0fc9d6a: client/passes.py _sync_file: NotRegularFileError (the file became a
    directory or a link between the pass's lstat and its read) is reported as 'cannot read'
    and the path FAILED, where FileNotFoundError is looked at again; it is the same race."""
    original = stableread.read_file_stable
    raced: list[str] = []

    def racing_read(root: Path, rel: str, cache: HashCache, *, limit: int = 1 << 30,
                    ) -> tuple[bytes, LocalEntry]:
        if rel == "x.c" and not raced:  # the race, made to happen: a new directory
            raced.append(rel)
            (root / rel).unlink()
            (root / rel).mkdir()
            (root / rel / "f.c").write_bytes(b"inside\n")
            asyncio.get_running_loop().call_soon(rig.changed, [rel, f"{rel}/f.c"])
        return original(root, rel, cache, limit=limit)

    monkeypatch.setattr("lsync.client.remote.passes.read_file_stable", racing_read)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "x.c").write_bytes(b"a file for now\n")
        rig.changed(["x.c"])
        await rig.converged()
        assert raced
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


def test_directory_whose_remote_rename_is_refused_does_not_stay_on_the_remote(
        rig: Rig) -> None:
    """Before 0fc9d6a: client/window.py verdict (RENAME) and client/engine.py _apply_reply: the
    model moved the source subtree to the destination when the Rename was sent; when the agent
    refuses it the source stays on the remote (the note says so) but is gone from the model,
    so lsync no longer owns it and never deletes it: files lsync wrote stay remotely for good
    (until a restart reads the agent's record)."""
    _files(rig, {"a/f.c": b"f\n", "d/g.h": b"g\n"})
    (rig.local / "s").symlink_to("a")

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "s").unlink()
        (rig.local / "s").mkdir()  # lost: remotely s is still a symlink
        os.rename(rig.local / "d", rig.local / "s" / "d")
        rig.changed(["s/d", "d"])  # the Rename d -> s/d is refused (s is a symlink)
        rig.overflow()
        await rig.converged()
        assert not os.path.lexists(rig.remote / "d"), (
            f"stale remote files lsync wrote: {sorted(os.listdir(rig.remote / 'd'))}")
        await rig.close()

    asyncio.run(scenario())


def test_file_saved_into_a_moved_directory_before_its_move_is_handled_leaves_no_stale_copy(
        rig: Rig) -> None:
    """Before 0fc9d6a: client/passes.py _sync_file / model: a file written into a directory the
    model does not hold yet made the agent create that directory (ConfinedRoot.parent_fd,
    create=True) without the model knowing it; the directory's own pass then took it for a
    new directory moved from elsewhere (_moved_here), and the Rename onto the now non-empty
    directory was refused (ENOTEMPTY, reported); the refused rename also lost the source
    from the model (see the test above), so lsync's files stayed there for good."""
    _files(rig, {"a/f.c": b"a\n", "a/d/g.h": b"g\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        os.rename(rig.local / "a", rig.local / "c")
        rig.changed(["c", "a"])
        _files(rig, {"a/x.c": b"x\n"})  # a is a directory again: c is no rename of it
        rig.changed(["a", "a/x.c"])
        (rig.local / "c" / "d" / "new.c").write_bytes(b"new\n")
        rig.changed(["c/d/new.c"])
        await rig.converged()
        _check(rig)
        await rig.close()

    asyncio.run(scenario())


# -- the in-memory agent itself --------------------------------------------------------------


def test_memory_stream_cut_breaks_the_link_and_keeps_what_the_agent_applied(
        home: Path) -> None:
    """`cut_after(n)`: the agent applies n messages, their answers are lost, the link
    breaks with LinkBroken, and the agent's session is closed."""
    remote = home.parent / "cut-remote"

    async def scenario() -> None:
        stream, link = await open_link(remote, STEP_TIMEOUT)
        stream.cut_after(1)
        first = link.submit(m.Mkdir(link.next_seq(), "one", 0o755))
        second = link.submit(m.Mkdir(link.next_seq(), "two", 0o755))
        await asyncio.wait_for(link.closed, STEP_TIMEOUT)
        for future in (first, second):
            with pytest.raises(LinkBroken):
                future.result()
        assert (remote / "one").is_dir() and not (remote / "two").exists()
        assert stream.session_over and stream.exit_status() == 2
        with pytest.raises(ConnectionResetError):
            stream.write(b"more")
        await link.close()

    asyncio.run(scenario())
