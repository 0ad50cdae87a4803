"""Two targets from one local side, against two real agents in memory (issue 17).

The rig of tests/corerig.py, twice over one local tree: two `Session`s share
one `LocalSide` (lsync.client.local.localside) — the watcher's batches reach both through it, and
a save's read is shared — each with its own engine, in-memory agent and remote tree. The
second target lags: its four data lanes hand their frames to the agent 0 to 6 loop turns
late, so it runs behind the first. Hypothesis generates the same local changes as the
single-target property test (creates, edits in place and by rename, deletes, chmods,
directory moves, type changes, symlinks, lost events), build outputs written on either
remote, and link cuts of either target in the middle of its work; after the last step both
targets must report in sync and both remotes must satisfy properties (a)-(d) of that test
(equal to the local tree, every build output kept, no temporary file, no failure).

Then: a save to two targets is read from disk once, and an edit made while one target is
cut still reaches it once it reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsync.client.buildloop.pullrules import PullRules, PushRules
from lsync.client.local import stableread
from lsync.client.local.localside import LocalSide
from lsync.client.session import Options, Session
from lsync.client.target import Target
from tests.corechanges import (
    CHANGES,
    INDEX,
    BuildOutput,
    Change,
    Overflow,
    Quiet,
    Turns,
    _make_start,
    _pick,
    _remote_dirs,
)
from tests.corerig import (
    EXAMPLE_TIMEOUT,
    GITIGNORE,
    STEP_TIMEOUT,
    RecordingReporter,
    Rig,
    SimClock,
    WatcherClock,
)
from tests.corerig import home as home  # (a fixture: $HOME for the records)

BURST_FILES = 200  # new files of the burst to two targets


class HostRig(Rig):
    """One target of two: its own remote, agent and engine; the local tree, the local
    side, the clock and the watcher's clock are shared with the other."""

    def __init__(self, local: Path, remote: Path, side: LocalSide, clock: SimClock,
                 watcher: WatcherClock, timeout: float, lanes: int) -> None:
        self.timeout = timeout
        self.lanes = lanes
        self.local = local
        self.remote = remote
        self.side = side
        self.clock = clock
        self.watcher = watcher
        self.reporter = RecordingReporter(watcher, self.remote_dir_holds_outputs)
        self.outputs = {}
        self.streams = []
        self.session = self._new_session()
        self._engine = None
        self._link = None
        self._runner = None
        self.quiet_as_of = -1

    def _new_session(self) -> Session:
        options = Options(Target(None, None, str(self.remote)), self.local)
        return Session(options, self.reporter, local=self.side)


class Pair:
    def __init__(self, base: Path, timeout: float) -> None:
        self.local = base / "local"
        self.local.mkdir()
        (self.local / ".gitignore").write_text(GITIGNORE)
        rules = PushRules(self.local, [], False, pull=PullRules([]))
        self.side = LocalSide(self.local, rules, 5, 20, lambda text: None)
        clock, watcher = SimClock(), WatcherClock()
        # The second target lags: its lanes deliver 0 to 6 loop turns late.
        self.rigs = [HostRig(self.local, base / f"remote{i}", self.side, clock, watcher,
                             timeout, lanes) for i, lanes in enumerate((0, 4))]

    async def connect(self) -> None:
        for rig in self.rigs:
            await rig.connect()

    def changed(self, paths: list[str]) -> None:
        self.rigs[0].changed(paths)  # through the shared local side: to both targets

    async def close(self) -> None:
        for rig in self.rigs:
            await rig.close()


@dataclass(frozen=True)
class CutHost:
    """Target `which`'s link drops after its agent handled `after` more messages."""

    which: int
    after: int


@dataclass(frozen=True)
class OutputOn:
    which: int
    where: int
    kind: str


STEPS = st.lists(st.one_of(
    CHANGES, CHANGES, CHANGES, CHANGES,
    st.builds(OutputOn, st.integers(0, 1), INDEX, st.sampled_from(["obj", "build"])),
    st.builds(Turns, st.integers(1, 20)),
    st.just(Quiet()),
    st.just(Overflow()),
    st.builds(CutHost, st.integers(0, 1), st.integers(0, 8)),
), min_size=1, max_size=12)

Step = Change | OutputOn | Turns | Quiet | Overflow | CutHost | BuildOutput


async def _run_example(base: Path, steps: list[Step]) -> None:
    pair = Pair(base, EXAMPLE_TIMEOUT)
    _make_start(pair.local)
    lost = False
    try:
        await pair.connect()
        for step in steps:
            if isinstance(step, OutputOn):
                rig = pair.rigs[step.which]
                directory = _pick(_remote_dirs(rig.remote), step.where)
                assert directory is not None
                rig.make_output(directory, step.kind)
            elif isinstance(step, Turns):
                for _ in range(step.count):
                    await asyncio.sleep(0)
            elif isinstance(step, Quiet):
                for rig in pair.rigs:
                    await rig.quiet()
            elif isinstance(step, Overflow):
                pair.rigs[0].overflow()
                lost = False
            elif isinstance(step, CutHost):
                await pair.rigs[step.which].cut(step.after)
            elif isinstance(step, Change):
                paths = step.apply(pair.local)
                if step.lost:
                    lost = lost or bool(paths)
                elif paths:
                    pair.changed(paths)
        if lost:
            pair.rigs[0].overflow()
        for rig in pair.rigs:
            await rig.converged()
        problems = [f"target {i}: {p}" for i, rig in enumerate(pair.rigs)
                    for p in rig.problems()]
        assert not problems, "\n".join(problems)
    finally:
        await pair.close()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(steps=STEPS)
def test_both_targets_converge_to_the_local_tree_whatever_happens_to_either(
        home: Path, steps: list[Step]) -> None:
    base = Path(tempfile.mkdtemp(dir=home.parent))
    try:
        asyncio.run(_run_example(base, steps))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_save_to_two_targets_is_read_from_disk_once(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once to send it (shared by both engines), and not again by either target's check of
    its directory afterwards (which found the digest of the version read)."""
    hashed: list[str] = []
    real = stableread._read_stable

    def counted(dir_fd: int, name: str, rel: str, *args: Any, **kwargs: Any) -> Any:
        hashed.append(rel)
        return real(dir_fd, name, rel, *args, **kwargs)

    monkeypatch.setattr(stableread, "_read_stable", counted)

    async def scenario() -> None:
        pair = Pair(tmp_path, STEP_TIMEOUT)
        _make_start(pair.local)
        try:
            await pair.connect()
            for rig in pair.rigs:
                await rig.converged()
            before = pair.side.reads.files_read
            hashed.clear()
            for version in range(5):
                (pair.local / "a" / "f.c").write_text(f"int f = {version};\n")
                pair.changed(["a/f.c"])
                for rig in pair.rigs:
                    await rig.converged()
                    assert (rig.remote / "a" / "f.c").read_text() == f"int f = {version};\n"
            assert pair.side.reads.files_read - before == 5  # not 10
            # Read for sending only: the checks of a/ did not read it again (each of the
            # two read every save before the hash cache was told of the read).
            assert hashed.count("a/f.c") == 5
        finally:
            await pair.close()

    asyncio.run(scenario())


def test_an_edit_made_while_one_target_is_cut_reaches_it_after_the_reconnect(
        home: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path, STEP_TIMEOUT)
        _make_start(pair.local)
        try:
            await pair.connect()
            cut = pair.rigs[1]
            cut.stream.cut()
            (pair.local / "a" / "f.c").write_text("int while_cut;\n")
            pair.changed(["a/f.c"])
            await pair.rigs[0].converged()
            assert (pair.rigs[0].remote / "a" / "f.c").read_text() == "int while_cut;\n"
            await cut.cut(0)  # ends the broken connection and reconnects, as the session does
            await cut.converged()
            for rig in pair.rigs:
                assert not rig.problems(), rig.problems()
        finally:
            await pair.close()

    asyncio.run(scenario())


def test_a_burst_of_new_files_to_two_targets_reads_each_file_from_disk_once(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst goes through each target's read-ahead: what one target's read-ahead read the
    other's takes (and the compressed pieces of the bigger files are made once too)."""
    hashed: list[str] = []
    real = stableread._read_stable

    def counted(dir_fd: int, name: str, rel: str, *args: Any, **kwargs: Any) -> Any:
        hashed.append(rel)
        return real(dir_fd, name, rel, *args, **kwargs)

    monkeypatch.setattr(stableread, "_read_stable", counted)
    files = {f"burst/d{i // 50}/f{i:03d}.c": f"int f{i} = {i};\n" * (1 + i % 7)
             for i in range(BURST_FILES)}

    async def scenario() -> None:
        pair = Pair(tmp_path, STEP_TIMEOUT)
        _make_start(pair.local)
        try:
            await pair.connect()
            for rig in pair.rigs:
                await rig.converged()
            hashed.clear()
            for rel, text in files.items():
                (pair.local / rel).parent.mkdir(parents=True, exist_ok=True)
                (pair.local / rel).write_text(text)
            pair.changed(["burst", *sorted({rel.rpartition("/")[0] for rel in files}),
                          *files])
            for rig in pair.rigs:
                await rig.converged()
                for rel, text in files.items():
                    assert (rig.remote / rel).read_text() == text
            reads = collections.Counter(rel for rel in hashed if rel in files)
            assert set(reads) == set(files)
            assert [rel for rel, count in reads.items() if count != 1] == []  # not 2
            assert sum(rig.engine.read_ahead.shared for rig in pair.rigs) > 0
            assert pair.side.reads.stats.taken > 0  # the other target's lstats too
        finally:
            await pair.close()

    asyncio.run(scenario())
