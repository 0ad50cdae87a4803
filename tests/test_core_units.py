"""Unit tests of the client core's pure parts: PathQueue, Window/verdict, planner, the check
schedule, and the HashCache's thread contract.

No sockets, no event loop: time is a number passed in.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from lsync.client.local.hashcache import HashCache
from lsync.client.local.localentry import LocalEntry
from lsync.client.remote import planner
from lsync.client.remote.checks import CheckSchedule, Due
from lsync.client.remote.model import DIR, FILE, LINK, RemoteEntry, RemoteModel
from lsync.client.remote.pathqueue import PathQueue, State
from lsync.client.remote.window import InFlight, Op, Window, verdict
from lsync.protocol import messages as m
from lsync.protocol.errors import AckStatus, ErrorCode

D1 = b"1" * 16
D2 = b"2" * 16


def never_ignored(path: str, is_dir: bool) -> bool:
    return False


# -- PathQueue ---------------------------------------------------------------------------------


def idle(queue: PathQueue) -> bool:
    return queue.idle  # (a call: mypy would narrow the property between asserts)


def test_queue_is_idle_only_when_no_path_is_queued_read_or_unanswered() -> None:
    queue = PathQueue()
    assert queue.flushed(queue.now_tick())  # nothing pending
    queue.mark(["a"], 0.0)
    assert queue.state("a") is State.QUEUED
    taken = queue.take()
    assert taken is not None and taken[0] == "a" and queue.state("a") is State.READING
    assert not idle(queue)  # being read: not idle (the `ready` printed too early, issue 8.6)
    queue.sent("a")
    queue.done("a", 0.0)
    assert queue.state("a") is State.WAITING and not idle(queue)
    queue.answered("a", ok=True)
    assert idle(queue) and "a" not in queue


def test_change_during_a_read_queues_the_path_again_when_the_pass_ends() -> None:
    queue = PathQueue()
    queue.mark(["a"], 0.0)
    queue.take()
    queue.mark(["a"], 1.0)  # saved again while being read
    queue.done("a", 1.0)
    assert queue.state("a") is State.QUEUED


def test_flush_watermark_waits_for_every_older_change_only() -> None:
    queue = PathQueue()
    queue.mark(["a"], 0.0)
    barrier = queue.now_tick()
    queue.mark(["b"], 0.0)
    assert not queue.flushed(barrier)
    taken = queue.take()
    assert taken is not None and taken[0] == "a"
    queue.sent("a")
    queue.done("a", 0.0)
    assert not queue.flushed(barrier)  # sent, not acknowledged
    queue.answered("a", ok=True)
    assert queue.flushed(barrier)  # b is newer than the barrier
    assert not idle(queue)


def test_the_watermark_keeps_no_record_of_paths_that_are_done() -> None:
    # A burst of 1,000 paths synced without any flush asking: what the watermark remembers
    # does not grow with every path ever changed, only with what is still pending.
    queue = PathQueue()
    paths = [f"f{i}" for i in range(1000)]
    queue.mark(paths, 0.0)
    barrier = queue.now_tick()
    queue.mark(["late"], 0.0)
    for _ in paths:
        taken = queue.take()
        assert taken is not None
        queue.sent(taken[0])
        queue.done(taken[0], 0.0)
        queue.answered(taken[0], ok=True)
    assert len(queue._ticks) == 1  # "late" alone
    assert queue.flushed(barrier) and not queue.flushed(queue.now_tick())
    # A path changed again after it was done gets a new tick: an old barrier is not held.
    queue.mark(["f0"], 0.0)
    assert queue.flushed(barrier)


def test_held_path_waits_for_its_writer_to_close_or_for_the_bound() -> None:
    queue = PathQueue(hold_max=2.0)
    queue.mark(["big"], 0.0)
    queue.hold(["big"], 0.0)
    assert queue.take() is None and queue.state("big") is State.HELD
    assert not idle(queue)
    queue.release(["big"], 0.5)
    assert queue.state("big") is State.QUEUED
    queue.take()
    queue.done("big", 0.5)
    queue.hold(["big"], 1.0)  # a writer that never closes
    queue.wake(2.9)
    assert queue.state("big") is State.HELD
    queue.wake(3.0)
    assert queue.state("big") is State.QUEUED


def test_failed_path_is_retried_with_backoff_and_not_counted_as_busy() -> None:
    queue = PathQueue()
    queue.mark(["x"], 0.0)
    queue.take()
    queue.sent("x")
    queue.done("x", 0.0)
    queue.answered("x", ok=False)
    queue.fail("x", 0.0, "no space left on device")
    assert queue.state("x") is State.FAILED and idle(queue)
    assert queue.failing() == {"x": "no space left on device"}
    assert not queue.flushed(queue.now_tick())  # a failed change is not flushed
    queue.mark(["x"], 0.5, retry_failed=False)  # a convergence check: waits for its time
    assert queue.state("x") is State.FAILED
    queue.wake(1.0)
    assert queue.state("x") is State.QUEUED
    queue.take()
    queue.fail("x", 1.0, "still full", own_pass=True)
    assert queue.state("x") is State.FAILED
    assert queue.next_due() == 1.0 + 2.0  # doubled


def test_a_flush_barrier_waits_through_the_retries_of_a_failing_path() -> None:
    """A path that failed before a barrier holds it while its retry is queued, read,
    sent and fails again (issue 15: the retry got a new tick and the barrier passed)."""
    queue = PathQueue()
    queue.mark(["x"], 0.0)
    queue.take()
    queue.sent("x")
    queue.done("x", 0.0)
    queue.fail("x", 0.0, "read-only file system")
    queue.answered("x", ok=False)
    barrier = queue.now_tick()
    now = 0.0
    for _ in range(3):
        due = queue.next_due()
        assert due is not None
        now = due
        queue.wake(now)
        assert not queue.flushed(barrier)  # queued for its retry
        queue.take()
        queue.sent("x")
        queue.done("x", now)
        assert not queue.flushed(barrier)  # retried, unanswered
        queue.fail("x", now, "read-only file system")
        queue.answered("x", ok=False)
        assert not queue.flushed(barrier)  # failed again
    queue.wake(queue.next_due() or 0.0)
    queue.take()
    queue.sent("x")
    queue.done("x", now)
    queue.answered("x", ok=True)
    assert queue.flushed(barrier) and idle(queue)


def test_deferred_delete_goes_behind_the_queue_once() -> None:
    queue = PathQueue()
    queue.mark(["gone", "new"], 0.0)
    taken = queue.take()
    assert taken is not None and taken[0] == "gone" and not taken[1].deferred
    queue.defer("gone")
    taken = queue.take()
    assert taken is not None and taken[0] == "new"
    queue.done("new", 0.0)
    taken = queue.take()
    assert taken is not None and taken[0] == "gone" and taken[1].deferred


# -- Window and verdicts -----------------------------------------------------------------------


def test_window_bounds_operations_and_wire_bytes() -> None:
    window = Window(max_ops=2, max_bytes=100)
    window.add(1, InFlight("a", Op.WRITE, "a", 0.0, wire=60))
    assert window.has_space()
    window.add(2, InFlight("b", Op.WRITE, "b", 0.0, wire=60))
    assert not window.has_space()
    flight = window.answer(1)
    assert flight is not None and flight.owner == "a"
    assert window.has_space() and window.wire_bytes == 60
    assert window.answer(1) is None  # answered twice: not in flight


def test_verdicts_say_what_each_reply_implies() -> None:
    write = InFlight("f", Op.WRITE, "f", 0.0, nbytes=10)
    assert verdict(write, m.Ack(1, int(AckStatus.OK), "")).synced_file
    kept = verdict(InFlight("d", Op.DELETE, "d", 0.0),
                   m.Ack(1, int(AckStatus.KEPT_NOT_EMPTY), "kept d"))
    assert kept.ok and kept.note == "kept d" and not kept.synced_file
    base = verdict(write, m.Error(1, int(ErrorCode.BASE_MISMATCH), "changed"))
    assert base.look_again == ["f"] and base.unknown == ["f"] and not base.retry_later
    full = verdict(write, m.Error(1, int(ErrorCode.IO_ERROR), "no space"))
    assert full.retry_later and full.failure == "no space"
    copy = verdict(InFlight("g", Op.COPY, "g", 0.0, src="f"),
                   m.Error(1, int(ErrorCode.DIGEST_MISMATCH), "changed"))
    assert set(copy.look_again) == {"f", "g"}
    rename = verdict(InFlight("b", Op.RENAME, "b", 0.0, src="a"),
                     m.Error(1, int(ErrorCode.IO_ERROR), "busy"), below=["b/x", "b"])
    assert rename.unknown == ["b/x", "b"] and "a stays on the remote" in rename.note
    dictionary = verdict(InFlight("", Op.DICTIONARY, "", 0.0),
                         m.Error(1, int(ErrorCode.BAD_DELTA), "no"))
    assert dictionary.drop_dictionary and not dictionary.failure


# -- planner ----------------------------------------------------------------------------------


def _file(digest: bytes | None, size: int = 3, mode: int = 0o644) -> LocalEntry:
    return LocalEntry("file", size, 0, mode, digest)


def test_manifest_ownership_comes_from_what_lsync_wrote() -> None:
    entries = [
        ["mine.c", FILE, 3, 0, 0o644, D1, None, D1],  # unchanged since lsync wrote it
        ["changed.c", FILE, 3, 0, 0o644, D2, None, D1],  # changed remotely since
        ["unknown.c", FILE, 3, 0, 0o644, None, None, D1],  # digest to be asked
        ["theirs.o", FILE, 3, 0, 0o644, D1, None, None],  # a build output
        ["dir", DIR, 0, 0, 0o755, None, None, b""],
        ["link", LINK, 0, 0, 0, None, "dir", b"dir"],
        ["moved-link", LINK, 0, 0, 0, None, "elsewhere", b"dir"],
    ]
    model, need_hash = planner.load_manifest(entries, {}, never_ignored)
    owned = {path for path, entry in model.entries.items() if entry.owned}
    assert owned == {"mine.c", "dir", "link"}
    assert need_hash == ["unknown.c"]


def test_relearning_a_refused_subtree_makes_the_model_say_what_the_agent_lists() -> None:
    """After a refused operation the model's guess of `d` is replaced by the listing:
    entries it forgot come back, entries gone go, ownership comes from the agent's record
    or stays where the model owned the same content; what is outside `d` is untouched."""
    model = RemoteModel()
    model.put("d", RemoteEntry(DIR, 0o755, owned=True))
    model.put("d/guess.c", RemoteEntry(FILE, 0o644, D1, owned=True))  # not really there
    model.put("d/verified.c", RemoteEntry(FILE, 0o644, D2, owned=True))  # equal, not written
    model.put("d/refused.c", RemoteEntry(FILE, 0o644, None, owned=True))  # write refused
    model.put("d/link", RemoteEntry(LINK, 0, target="x", owned=True))
    model.put("other.c", RemoteEntry(FILE, 0o644, D1, owned=True))
    listing = [
        ["d", FILE, 3, 0, 0o644, D1, None, None],  # oops: "d" is a file there
    ]
    need = planner.relearn(model, "d", listing, never_ignored)
    assert need == [] and sorted(model.entries) == ["d", "other.c"]
    entry = model.get("d")
    assert entry is not None and entry.kind == FILE and not entry.owned
    assert model.child_names("d") == set()

    model.put("d", RemoteEntry(DIR, 0o755, owned=True))
    for path, entry in [("d/verified.c", RemoteEntry(FILE, 0o644, D2, owned=True)),
                        ("d/refused.c", RemoteEntry(FILE, 0o644, None, owned=True)),
                        ("d/link", RemoteEntry(LINK, 0, target="x", owned=True))]:
        model.put(path, entry)
    listing = [
        ["d", DIR, 0, 0, 0o755, None, None, b""],
        ["d/forgotten.c", FILE, 3, 0, 0o644, D1, None, D1],  # lsync wrote it
        ["d/verified.c", FILE, 3, 0, 0o644, D2, None, None],
        ["d/refused.c", FILE, 3, 0, 0o644, None, None, None],  # digest to be asked
        ["d/link", LINK, 0, 0, 0, None, "y", None],  # someone else's link now
        ["d/theirs.o", FILE, 3, 0, 0o644, D1, None, None],
    ]
    need = planner.relearn(model, "d", listing, never_ignored)
    assert [path for path, _ in need] == ["d/refused.c"]
    planner.relearned_digest(model, "d/refused.c", D2, need[0][1])
    owned = {path for path, entry in model.entries.items() if entry.owned}
    assert owned == {"d", "d/forgotten.c", "d/verified.c", "d/refused.c", "other.c"}
    assert model.holder_of(D2) in ("d/verified.c", "d/refused.c")
    assert "d/theirs.o" in model.entries and "d/guess.c" not in model.entries


def test_differences_delete_only_what_lsync_owns_and_is_not_ignored() -> None:
    model = RemoteModel()
    model.put("a.c", RemoteEntry(FILE, 0o644, D1, owned=True))
    model.put("gone.c", RemoteEntry(FILE, 0o644, D1, owned=True))
    model.put("out.o", RemoteEntry(FILE, 0o644, D2, owned=True))  # ignored locally now
    model.put("theirs.txt", RemoteEntry(FILE, 0o644, D2, owned=False))
    local = {"a.c": _file(D1), "new.c": _file(D2)}

    def ignored(path: str, is_dir: bool) -> bool:
        return path.endswith(".o")

    assert planner.differences(local, model, ignored, delete_extra=False) == ["gone.c",
                                                                               "new.c"]
    assert planner.differences(local, model, ignored, delete_extra=True) == [
        "gone.c", "new.c", "theirs.txt"]


def test_differences_of_one_directory_look_at_its_children_only() -> None:
    model = RemoteModel()
    model.put("d", RemoteEntry(DIR, 0o755, owned=True))
    model.put("d/x", RemoteEntry(FILE, 0o644, D1, owned=True))
    model.put("d/sub", RemoteEntry(DIR, 0o755, owned=True))
    model.put("d/sub/deep", RemoteEntry(FILE, 0o644, D1, owned=True))
    model.put("other", RemoteEntry(FILE, 0o644, D1, owned=True))
    local = {"d/x": _file(D2), "d/sub": LocalEntry("dir", 0, 0, 0o755)}
    assert planner.differences(local, model, never_ignored, False, under="d",
                               shallow=True) == ["d/x"]


# -- HashCache under threads (issue 8.8) -------------------------------------------------------


def test_hash_cache_saved_while_threads_store_always_loads(tmp_path: Path) -> None:
    files = []
    for i in range(200):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x")
        os.utime(path, ns=(10**9, 10**9))  # old: not racy, so it is remembered
        files.append((f"f{i}", path.stat()))
    cache = HashCache(path=tmp_path / "cache.bin", clock=lambda: 10**19)

    def store_many(offset: int) -> None:
        for n in range(100_000):
            _, st = files[(n + offset) % len(files)]
            cache.store(f"w{offset}/{n}", st, D1, 10**19)
            cache.discard(f"w{offset}/{n - 50}")

    workers = [threading.Thread(target=store_many, args=(i * 7,)) for i in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: a save between two stores is likely
    for worker in workers:
        worker.start()
    saves = 0
    try:
        while any(worker.is_alive() for worker in workers) or saves < 5:
            cache.save(force=True)
            saves += 1
            loaded = HashCache(path=tmp_path / "cache.bin")
            assert loaded.load(), loaded.load_problem
    finally:
        for worker in workers:
            worker.join()
        sys.setswitchinterval(interval)
    assert saves >= 5


# -- planner: one pass ------------------------------------------------------------------------


def _plan(seen: planner.Seen, remote: RemoteEntry | None, behind: bool = False,
          others: bool = False, deferred: bool = False) -> planner.Plan:
    return planner.plan_path(seen, remote, watcher_behind=behind, others_queued=others,
                             deferred=deferred)


def test_a_gone_path_waits_for_the_watcher_then_for_the_queue_then_is_removed() -> None:
    remote = RemoteEntry(FILE, 0o644, D1, owned=True)
    gone = planner.Seen(None)
    assert _plan(gone, None).step is planner.Step.NOTHING
    assert _plan(gone, remote, behind=True, others=True).step is planner.Step.WAIT
    assert _plan(gone, remote, others=True).step is planner.Step.DEFER
    assert _plan(gone, remote, others=True, deferred=True).step is planner.Step.REMOVE
    assert _plan(planner.Seen("", ignored=True), remote).step is planner.Step.FORGET


def test_type_changes_remove_the_other_kind_first() -> None:
    a_dir = RemoteEntry(DIR, 0o755, owned=True)
    a_file = RemoteEntry(FILE, 0o644, D1, owned=True)
    link_plan = _plan(planner.Seen(LINK, target="x"), a_dir)
    assert link_plan.step is planner.Step.LINK and link_plan.remove_first
    dir_plan = _plan(planner.Seen(DIR, 0o755), a_file)
    assert dir_plan.step is planner.Step.DIR and dir_plan.remove_first and dir_plan.may_be_moved
    assert _plan(planner.Seen(DIR, 0o755), a_dir) == planner.Plan(planner.Step.DIR)
    assert _plan(planner.Seen(LINK, target="x"),
                 RemoteEntry(LINK, 0, target="x")).step is planner.Step.NOTHING


def test_a_file_is_read_unless_the_cache_proves_the_remote_has_it() -> None:
    remote = RemoteEntry(FILE, 0o644, D1, owned=True)
    assert _plan(planner.Seen(FILE, 0o644, cached_digest=D1), remote).step is planner.Step.NOTHING
    for seen in (planner.Seen(FILE, 0o644), planner.Seen(FILE, 0o644, cached_digest=D2),
                 planner.Seen(FILE, 0o755, cached_digest=D1)):
        assert _plan(seen, remote).step is planner.Step.READ


def test_content_already_remote_is_copied_not_sent() -> None:
    model = RemoteModel()
    model.put("a", RemoteEntry(FILE, 0o644, D1, owned=True))
    model.put("d", RemoteEntry(DIR, 0o755, owned=True))
    assert planner.plan_content("a", D1, 0o644, model).action is planner.Content.SAME
    assert planner.plan_content("a", D1, 0o755, model).action is planner.Content.SET_MODE
    copy = planner.plan_content("b", D1, 0o644, model)
    assert copy.action is planner.Content.COPY and copy.source == "a"
    over_dir = planner.plan_content("d", D2, 0o644, model)
    assert over_dir.action is planner.Content.SEND and over_dir.remove_first


def test_a_directory_holding_most_of_a_vanished_ones_files_is_its_move() -> None:
    model = RemoteModel()
    model.put("old", RemoteEntry(DIR, 0o755, owned=True))
    model.put("old/x.c", RemoteEntry(FILE, 0o644, D1, owned=True))
    model.put("old/y.c", RemoteEntry(FILE, 0o644, D2, owned=True))
    assert planner.moved_from({"x.c": D1, "y.c": D2}, ["old"], model, 0.5) == "old"
    assert planner.moved_from({"x.c": D2, "z.c": D1}, ["old"], model, 0.5) is None


# -- check schedule ---------------------------------------------------------------------------


def test_checks_look_at_touched_directories_then_the_whole_tree_when_events_were_lost() -> None:
    checks = CheckSchedule(0.0, full_every=100.0, touched_limit=2)
    assert checks.take(1.0) == Due()
    checks.touched("a/b/f.c")
    checks.touched("top.c")
    checks.worked()
    assert checks.take(2.0) == Due(directories=("", "a/b"), report=True)
    checks.whole("inotify queue overflowed")
    assert checks.take(3.0) == Due(whole=True, reason="inotify queue overflowed", report=True)
    for name in ("a/1", "b/1", "c/1"):
        checks.touched(name)
    assert checks.take(4.0).whole  # too many directories: the whole tree at once
    assert checks.next_time() == 104.0
    assert checks.take(104.0) == Due(whole=True, reason="periodic check", report=True)


def test_touched_directories_are_taken_ahead_of_idle_and_the_report_still_follows() -> None:
    checks = CheckSchedule(0.0, full_every=100.0, touched_limit=2)
    assert (checks.take_ahead(), checks.pending) == ((), False)
    checks.touched("a/b/f.c")
    checks.worked()
    assert (checks.ahead_due, checks.pending) == (True, True)
    assert checks.take_ahead() == ("a/b",)
    assert (checks.ahead_due, checks.pending) == (False, False)
    assert checks.take(1.0) == Due(report=True)  # the engine's work is still reported
    checks.touched("c/f.c")
    checks.whole("inotify queue overflowed")
    assert (checks.take_ahead(), checks.pending) == ((), True)  # the whole tree: at idle
    assert checks.take(2.0).whole
    for name in ("a/1", "b/1", "c/1"):
        checks.touched(name)
    assert checks.take_ahead() == ()  # too many: the whole tree, at idle
    assert checks.take(3.0).whole


def test_a_path_whose_operation_keeps_failing_backs_off_more_each_time() -> None:
    queue = PathQueue()
    queue.mark(["d"], 0.0)
    now = 0.0
    dues = []
    for _ in range(4):
        taken = queue.take()
        assert taken is not None and taken[0] == "d"
        queue.sent("d")
        queue.done("d", now)
        queue.fail("d", now, "is a directory")  # the engine counts the failure first
        queue.answered("d", ok=False)
        assert queue.state("d") is State.FAILED
        due = queue.next_due()
        assert due is not None
        dues.append(due - now)
        now = due
        queue.wake(now)
    assert dues == [1.0, 2.0, 4.0, 8.0]


def test_one_failed_attempt_is_one_step_of_backoff_whatever_it_sent() -> None:
    """A pass that sent 20 deletes (a directory tree) to a read-only remote failed once:
    its retry comes after the first backoff step, not after 2**19 s capped at a minute."""
    queue = PathQueue()
    queue.mark(["tree"], 0.0)
    queue.take()
    for _ in range(20):
        queue.sent("tree")
    queue.done("tree", 0.0)
    for _ in range(20):
        queue.fail("tree", 0.0, "read-only file system")
        queue.answered("tree", ok=False)
    assert queue.state("tree") is State.FAILED
    assert queue.next_due() == 1.0
