"""What the core property test found: one reduced reproduction of each defect it caught.

Each test is the reduced form of a failing sequence of the property test of
tests/test_core_properties.py, on the same rig (tests/corerig.py: the client core against
the real agent through in-memory streams), named after what must hold, with the
diagnosis of the defect it caught (fixed in 0fc9d6a). Last, a test of the in-memory agent
itself (tests/memagent.py): a cut in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from lsync.client.errors import LinkBroken
from lsync.client.local import scanner, stableread
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import LocalEntry
from lsync.protocol import messages as m
from tests.corechanges import _remove
from tests.corerig import STEP_TIMEOUT, Rig, _check, _files
from tests.corerig import home as home  # (a fixture)
from tests.corerig import quick_rig as quick_rig  # (a fixture)
from tests.corerig import rig as rig  # (a fixture)
from tests.memagent import open_link


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
