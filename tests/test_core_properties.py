"""The client core against the real agent through in-memory byte streams (issue 8).

The rig (tests/corerig.py): a `SyncEngine` is wired as `lsync.client.session` wires it —
an `AgentLink` over a `MemoryAgentStream` (tests/memagent.py: the real `AgentService` in
this process, no subprocess, no sockets), an in-memory `HashCache`, `IgnoreRules` over a
root `.gitignore` that ignores `*.o` and `build/`, the local tree scanned by `scan_tree`,
the manifest from `list_tree`, `initial_sync`, then `run` — and the test plays the watcher:
after each local change it hands the paths an inotify watcher would report to the real
session's batch handler (`Session._on_batch`), or, for a lost event, nothing at all. A
simulated clock (monotonic time plus a skew the test can advance) lets the test reach the
engine's periodic whole-tree check without waiting ten minutes. The changes and other steps,
and their hypothesis strategies, are in tests/corechanges.py.

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
during a slow read, a big half-rewritten file), and the property test runs its own
reduced failing sequences first, as explicit examples. The reduced reproduction of each
defect the property found (each with its diagnosis; the core fixes are in 0fc9d6a) is in
tests/test_core_regressions.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lsync.client.remote.passes as passes_module
from lsync.client.local import stableread
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import LocalEntry
from lsync.protocol.framing import MAX_FRAME
from tests.corechanges import (
    STEPS,
    BuildOutput,
    Change,
    Chmod,
    Cut,
    MoveDir,
    Overflow,
    Quiet,
    Restart,
    Step,
    Turns,
    _make_start,
    _pick,
    _remote_dirs,
    _remove,
)
from tests.corerig import EXAMPLE_TIMEOUT, STEP_TIMEOUT, Rig, _check, _view
from tests.corerig import home as home  # (a fixture)
from tests.corerig import rig as rig  # (a fixture)


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
