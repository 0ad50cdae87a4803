"""Where features meet failures (issue 15), on the client core against the real agent
service through in-memory streams (tests/memagent.py, the rig of tests/corerig.py):
a branch switch that queues the root with thousands of files, a bug on one path, a path
that keeps failing under a flush barrier, deletes the remote refuses, operations in flight
when the link breaks, files too big to send.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lsync.agent.confined import ConfinedRoot
from lsync.agent.refusals import OpError
from lsync.client.remote import convergence, passes, planner, sender
from lsync.client.remote.model import RemoteModel
from lsync.client.remote.pathqueue import RETRY_MAX, State
from lsync.protocol.errors import ErrorCode
from tests.conftest import c_like_text
from tests.corerig import Rig
from tests.corerig import home as home  # (a fixture)
from tests.corerig import rig as rig  # (a fixture)


def _write_many(root: Path, names: list[str], seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {name: c_like_text(rng, rng.randrange(0, 4000)) for name in names}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_a_checkout_that_queues_the_root_with_many_files_converges(rig: Rig) -> None:
    """The root is queued (its listing is checked) among thousands of paths: it is never
    a file to read ahead (that killed the session with `not a relative path: ''`)."""

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        names = [f"top{i}.c" for i in range(300)] + [f"sub/f{i}.c" for i in range(300)]
        files = _write_many(rig.local, names, 1)
        rig.engine.mark_dirty(["top0.c", "", *names], hint=False)
        rig.changed([])
        await rig.converged()
        assert not rig.problems(), rig.problems()
        for rel, data in files.items():
            assert (rig.remote / rel).read_bytes() == data
        await rig.close()

    asyncio.run(scenario())


def test_a_bug_while_reading_one_file_ahead_fails_that_file_alone(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that raises on one path leaves the rest of its read-ahead group, and the
    session, unharmed; the path is read again on its own turn."""
    real = sender._prepare
    broken = "f7.c"

    def flaky(root: Path, path: str, *args: object) -> sender.Prepared | None:
        if path == broken:
            raise RuntimeError("a bug in a worker")
        return real(root, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sender, "_prepare", flaky)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        names = [f"f{i}.c" for i in range(200)]
        files = _write_many(rig.local, names, 2)
        rig.changed(names)
        await rig.converged()
        assert not rig.problems(), rig.problems()
        for rel, data in files.items():
            assert (rig.remote / rel).read_bytes() == data
        await rig.close()

    asyncio.run(scenario())


def test_a_bug_in_the_pass_over_one_path_fails_that_path_not_the_session(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception while syncing one path makes that path fail (reported,
    retried with backoff, traceback in the client log); the others sync, and once the
    bug is gone the path converges too."""
    broken = {"f3.c"}
    real = planner.plan_content

    def buggy(path: str, *args: object) -> planner.ContentPlan:
        if path in broken:
            raise ValueError("a bug in the planner")
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(planner, "plan_content", buggy)
    monkeypatch.setenv("XDG_CACHE_HOME", str(rig.local.parent / "cache"))

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        names = [f"f{i}.c" for i in range(20)]
        files = _write_many(rig.local, names, 3)
        rig.changed(names)
        await rig.quiet()
        failing = rig.engine.queue.failing()
        assert list(failing) == ["f3.c"] and "internal error" in failing["f3.c"]
        assert rig.engine.queue.state("f3.c") is State.FAILED
        for rel in names:
            if rel != "f3.c":
                assert (rig.remote / rel).read_bytes() == files[rel]
        broken.clear()
        await rig.converged()
        assert not rig.engine.queue.failing()
        assert [p for p in rig.problems() if not p.startswith("(d)")] == []
        assert (rig.remote / "f3.c").read_bytes() == files["f3.c"]
        await rig.close()

    asyncio.run(scenario())


def test_deletes_the_remote_refused_are_retried_until_they_succeed(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only remote refuses deletes (of files and of the directory holding them);
    once it is writable again the retries delete them (they stayed on the remote for good:
    the model had dropped them when the delete was sent)."""
    refusing = True
    real = ConfinedRoot.remove

    def remove(self: ConfinedRoot, path: str) -> tuple[bool, bool]:
        if refusing:
            raise OpError(ErrorCode.PERMISSION_DENIED, f"remove {path}: read-only file system")
        return real(self, path)

    monkeypatch.setattr(ConfinedRoot, "remove", remove)

    async def scenario() -> None:
        nonlocal refusing
        _write_many(rig.local, ["keep.c", "gone.c", "olddir/a.c", "olddir/sub/b.c"], 4)
        refusing = False
        await rig.connect()
        await rig.converged()
        refusing = True
        (rig.local / "gone.c").unlink()
        shutil.rmtree(rig.local / "olddir")
        rig.changed(["gone.c", "olddir"])
        await rig.quiet()
        assert set(rig.engine.queue.failing()) == {"gone.c", "olddir"}
        assert (rig.remote / "gone.c").exists() and (rig.remote / "olddir/sub/b.c").exists()
        refusing = False
        await rig.converged()
        assert not rig.engine.queue.failing()
        assert not (rig.remote / "gone.c").exists()
        assert not (rig.remote / "olddir").exists()
        assert (rig.remote / "keep.c").exists()
        await rig.close()

    asyncio.run(scenario())


def test_deletes_in_flight_when_the_link_breaks_are_redone_after_the_reconnect(
        rig: Rig) -> None:
    """Files lsync verified (equal on both sides from the start, not written by it) are
    deleted locally; the link breaks after the agent handled the first delete. What lsync
    owned, and the deletes left unanswered, are carried to the next connection, which
    deletes the rest (the carried ownership was always empty: each failed reply was taken
    out of the window before the session looked)."""
    names = [f"v/f{i}.c" for i in range(12)]
    files = _write_many(rig.local, names, 5)
    for rel, data in files.items():
        (rig.remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.remote / rel).write_bytes(data)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        for rel in names:
            (rig.local / rel).unlink()
        rig.changed(names)
        await rig.cut(1)
        assert rig.stream.cuts == 0 and rig.streams[-2].cuts == 1
        await rig.converged()
        left = sorted(p.name for p in (rig.remote / "v").iterdir())
        assert left == [], left
        await rig.close()

    asyncio.run(scenario())


def test_a_file_too_big_to_send_is_skipped_and_reported_not_retried_for_ever(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over the size lsync reads whole is reported once and left alone: not a
    failure retried for ever, and an in-sync report still comes (convergence checks pass
    over it while it stays that version); once it is small enough it is synced."""
    monkeypatch.setattr(passes, "MAX_FILE", 64 << 10)

    async def scenario() -> None:
        _write_many(rig.local, ["small.c"], 6)
        (rig.local / "huge.bin").write_bytes(os.urandom(100 << 10))
        await rig.connect()
        await rig.converged()
        assert not rig.engine.queue.failing()
        assert list(rig.engine.skipped) == ["huge.bin"]
        assert not (rig.remote / "huge.bin").exists()
        assert sum("skipped huge.bin" in n for n in rig.reporter.notes) == 1
        rig.periodic_check()  # a whole-tree check passes over it, reports nothing new
        await rig.converged()
        assert sum("skipped huge.bin" in n for n in rig.reporter.notes) == 1
        assert not any("paths differ" in n for n in rig.reporter.notes)
        (rig.local / "huge.bin").write_bytes(b"small now\n")
        rig.changed(["huge.bin"])
        await rig.converged()
        assert (rig.remote / "huge.bin").read_bytes() == b"small now\n"
        assert not rig.engine.skipped
        await rig.close()

    asyncio.run(scenario())


def test_big_file_work_and_the_scan_of_a_moved_in_tree_stay_off_the_event_loop(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading, signing, delta-encoding and compressing a big file, and listing and hashing
    a directory that moved in, run in worker threads: the loop keeps answering replies,
    pings, the watcher and the control socket (they ran on it: a 100 MB file stalled it)."""
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    called: set[str] = set()

    def watched(name: str, size_of: Callable[..., int]) -> None:
        real = getattr(passes, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            called.add(name)
            if threading.get_ident() == loop_thread and size_of(*args) >= passes.OFF_LOOP:
                on_loop.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(passes, name, wrapper)

    watched("signature", lambda content: len(content))
    watched("pieces_of", lambda content, packer: len(content))
    watched("delta_message", lambda *args: len(args[6]))
    watched("read_file_stable", lambda root, path, *rest: (root / path).stat().st_size)
    watched("scan_tree", lambda *args: passes.OFF_LOOP)  # never on the loop, whatever size
    rng = random.Random(7)
    big = c_like_text(rng, 3 << 20)

    async def scenario() -> None:
        _write_many(rig.local, [f"old/f{i}.c" for i in range(8)], 7)
        await rig.connect()
        await rig.converged()
        (rig.local / "big.c").write_bytes(big)
        rig.changed(["big.c"])
        await rig.converged()
        (rig.local / "big.c").write_bytes(big[:1000] + b"/* edit */" + big[1000:])
        rig.changed(["big.c"])
        await rig.converged()
        (rig.local / "old").rename(rig.local / "new")
        rig.changed(["old", "new"])
        await rig.converged()
        assert not rig.problems(), rig.problems()
        assert (rig.remote / "big.c").read_bytes() == (rig.local / "big.c").read_bytes()
        await rig.close()

    asyncio.run(scenario())
    assert on_loop == []
    assert called == {"signature", "pieces_of", "delta_message", "read_file_stable",
                      "scan_tree"}, called


@pytest.mark.parametrize("refused", ["symlink", "mkdir"])
def test_a_refused_link_or_directory_holds_the_flush_and_is_retried(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, refused: str) -> None:
    """The model believed a link or directory was there from the moment it was sent;
    refused, the retry found nothing to do and the path counted as flushed while the remote
    lacked it (found by the torture run: `lsync flush` returned 0 with symlinks missing).
    (A refused mode change needs nothing of the kind: the file's content counts as unknown
    then, and the retry sends it whole, mode included.)"""
    refusing = True
    real = getattr(ConfinedRoot, refused)

    def refuse(self: ConfinedRoot, path: str, *args: Any) -> Any:
        if refusing:
            raise OpError(ErrorCode.PERMISSION_DENIED, f"{refused} {path}: read-only")
        return real(self, path, *args)

    monkeypatch.setattr(ConfinedRoot, refused, refuse)

    async def scenario() -> None:
        nonlocal refusing
        _write_many(rig.local, ["f.c"], 8)
        refusing = False
        await rig.connect()
        await rig.converged()
        refusing = True
        if refused == "symlink":
            (rig.local / "link").symlink_to("f.c")
            changed = ["link"]
        else:
            (rig.local / "d").mkdir()
            changed = ["d"]
        rig.changed(changed)
        barrier = rig.engine.queue.now_tick()  # (a flush taken right after the change)
        await rig.quiet()
        for _ in range(3):  # retries while the remote refuses: the barrier holds
            rig.clock.advance(RETRY_MAX + 1)
            rig.changed([])
            await rig.quiet()
            assert not rig.engine.queue.flushed(barrier)
        refusing = False
        await rig.converged()
        assert rig.engine.queue.flushed(barrier)
        if refused == "symlink":
            assert os.readlink(rig.remote / "link") == "f.c"
        else:
            assert (rig.remote / "d").is_dir()
        await rig.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("tiny_lag", [False, True])
def test_an_in_sync_report_behind_a_lagging_watcher_is_given_again_once_it_caught_up(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, tiny_lag: bool) -> None:
    """The watcher lags (a walk of a big new subtree after an overflow): the in-sync report
    is as of its last clean moment, older than the last change. Once it catches up, with no
    new event, a new report covers the change (the old one stayed the last word: found by
    the torture run, no in-sync line after an inotify overflow). `tiny_lag`: the report's
    lag behind its check is below the threshold taken for "no lag" (as when the change and
    its check took under a millisecond: CI saw it once in five runs), yet it is older than
    the change the watcher delivered."""
    if tiny_lag:
        monkeypatch.setattr(convergence, "REPORT_LAG_NS", 1 << 62)
    held: list[int] = []
    real = rig.watcher.seen_until

    def lagging() -> int:
        return held[0] if held else real()

    monkeypatch.setattr(rig.watcher, "seen_until", lagging)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        held.append(time.time_ns())  # the watcher is busy from here on
        _write_many(rig.local, ["late.c"], 9)
        changed_at = time.time_ns()
        rig.changed(["late.c"])
        await rig.quiet()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while rig.reporter.in_sync_as_of < held[0]:  # the report as of the watcher's lag
            assert loop.time() < deadline, "no in-sync report at all"
            await asyncio.sleep(0.01)
        assert rig.reporter.in_sync_as_of < changed_at
        held.clear()  # caught up: nothing else happens
        deadline = loop.time() + 20
        while rig.reporter.in_sync_as_of < changed_at:
            assert loop.time() < deadline, "the lagging report stayed the last word"
            await asyncio.sleep(0.01)
        await rig.close()

    asyncio.run(scenario())


def test_signatures_to_save_are_taken_from_the_model_on_the_event_loop(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The model is changed by passes on the event loop: a worker thread that walked it to
    save the signatures died of "dictionary changed size during iteration" (torture run,
    long mode) and ended the session. It is read on the loop; only the writing is off it."""
    readers: list[threading.Thread] = []
    real = RemoteModel.signatures_to_keep

    def spy(self: RemoteModel, min_size: int) -> Any:
        readers.append(threading.current_thread())
        return real(self, min_size)

    monkeypatch.setattr(RemoteModel, "signatures_to_keep", spy)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        await rig.session._save_caches(rig.engine.cache, tmp_path / "signatures", rig.engine)
        assert readers == [threading.main_thread()]
        await rig.close()

    asyncio.run(scenario())
