"""Bulk transfers (issue 10): small new files of a burst travel in WriteBatch messages (fewer
messages, one compression context, one answer), and data lanes (extra channels) carry
saves and batches beside the main stream, in no order against it; nothing about
convergence changes.

The core runs against the real agent service through in-memory byte streams
(tests/memagent.py), as in tests/test_core_properties.py, whose rig (tests/corerig.py)
this module reuses.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest

from lsync.client.remote.pathqueue import PathQueue
from lsync.client.remote.remoteside import BURST_WINDOW, URGENT_MAX, RemoteSide
from lsync.client.remote.sender import Packing
from lsync.client.reporter import Reporter
from lsync.client.transport.link import AgentLink
from lsync.protocol import hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode
from tests.conftest import c_like_text
from tests.corerig import STEP_TIMEOUT, Rig
from tests.corerig import home as home  # (a fixture)
from tests.corerig import rig as rig  # (a fixture)
from tests.memagent import open_link


def _count_messages(rig: Rig) -> Counter[str]:
    """Count, by type, the messages the current agent handles from now on."""
    counts: Counter[str] = Counter()
    service = rig.stream.service
    handle = service.handle

    def counting(message: m.Message, bulk: bool = False) -> None:
        counts[type(message).__name__] += 1
        handle(message, bulk)

    service.handle = counting  # type: ignore[method-assign]
    return counts


def _many_files(rig: Rig, n: int) -> dict[str, bytes]:
    rng = random.Random(n)
    files = {f"d{i % 7}/s{i % 3}/f{i}.c": c_like_text(rng, rng.randrange(0, 6000))
             for i in range(n)}
    for rel, data in files.items():
        (rig.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.local / rel).write_bytes(data)
    return files


def test_initial_sync_of_many_small_files_travels_in_a_few_batches(rig: Rig) -> None:
    files = _many_files(rig, 600)

    async def scenario() -> None:
        await rig.connect()
        counts = _count_messages(rig)
        await rig.converged()
        assert not rig.problems(), rig.problems()
        for rel, data in files.items():
            assert (rig.remote / rel).read_bytes() == data
        # 600 files: a handful of batches, not 600 messages (a few may go alone at the
        # end of the burst, when the queue is short again).
        assert counts["WriteBatch"] >= 1
        assert counts["WriteBatch"] + counts["WriteFile"] < 150, counts
        await rig.close()

    asyncio.run(scenario())


def test_a_file_refused_inside_a_batch_fails_alone_and_converges_once_possible(
        rig: Rig) -> None:
    files = _many_files(rig, 300)
    blocked = sorted(files)[150]
    (rig.remote / blocked).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(rig.remote / blocked)  # not in the manifest; the agent refuses to replace it

    async def scenario() -> None:
        await rig.connect()
        await rig.quiet()
        failing = rig.engine.queue.failing()
        assert list(failing) == [blocked], failing
        for rel, data in files.items():
            if rel != blocked:
                assert (rig.remote / rel).read_bytes() == data
        (rig.remote / blocked).unlink()
        await rig.converged()
        assert (rig.remote / blocked).read_bytes() == files[blocked]
        assert not rig.engine.queue.failing()
        await rig.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("after", [1, 3])
def test_link_cut_while_batches_are_in_flight_converges_after_reconnecting(
        rig: Rig, after: int) -> None:
    files = _many_files(rig, 800)

    async def scenario() -> None:
        await rig.connect()
        await rig.cut(after)
        await rig.converged()
        assert not rig.problems(), rig.problems()
        assert len(rig.streams) == 2
        for rel, data in files.items():
            assert (rig.remote / rel).read_bytes() == data
        await rig.close()

    asyncio.run(scenario())


def test_a_message_sent_after_batched_files_is_never_applied_before_them(
        home: Path) -> None:
    """The batch is compressed in a worker thread; what is sent meanwhile waits for it."""
    remote = home.parent / "order-remote"

    async def scenario() -> None:
        _, link = await open_link(remote, STEP_TIMEOUT)
        content = b"int x;\n" * 20000
        written = [link.submit_batched(link.next_seq(), f"f{i}", 0o644, content,
                                       packing.PACK_ZLIB, 9) for i in range(3)]
        renamed = link.submit(m.Rename(link.next_seq(), "f2", "g2"))
        missing = link.submit(m.Rename(link.next_seq(), "nothing", "g3"))
        replies = await asyncio.wait_for(asyncio.gather(*written, renamed, missing),
                                         STEP_TIMEOUT)
        assert all(isinstance(r, m.Ack) for r in replies[:4]), replies
        assert isinstance(replies[4], m.Error) and replies[4].code == ErrorCode.NOT_FOUND
        assert (remote / "g2").read_bytes() == content and not (remote / "f2").exists()
        assert (remote / "f0").read_bytes() == content
        await link.close()

    asyncio.run(scenario())


# -- data lanes ---------------------------------------------------------------------------------


@pytest.fixture
def lane_rig(home: Path) -> Rig:
    base = home.parent / "lane-rig"
    base.mkdir()
    return Rig(base, lanes=4)


async def _synced(rig: Rig, files: dict[str, bytes]) -> None:
    """Connect, converge without problems, and find every file remotely as it is locally."""
    await rig.connect()
    await rig.converged()
    assert not rig.problems(), rig.problems()
    for rel, data in files.items():
        assert (rig.remote / rel).read_bytes() == data


def test_initial_sync_over_lanes_converges_and_uses_them(lane_rig: Rig) -> None:
    rig = lane_rig
    files = _many_files(rig, 700)

    async def scenario() -> None:
        await _synced(rig, files)
        # The batches went on the bulk lanes (2 to 4), not on the main stream.
        assert sum(lane.handled for lane in rig.stream.lanes[1:]) > 0
        await rig.close()

    asyncio.run(scenario())


def test_big_files_of_an_initial_sync_take_the_bulk_lanes(lane_rig: Rig) -> None:
    """Over a long link one channel carries at most the server's window per round trip:
    a burst's big files, like its batches, go on the bulk lanes, not all on the main one."""
    rig = lane_rig
    rng = random.Random(5)
    files = _many_files(rig, 300)  # (a burst: more than BULK_QUEUE paths queued)
    big = {f"big/f{i}.h": c_like_text(rng, 700_000) for i in range(6)}
    files.update(big)
    for rel, data in big.items():
        (rig.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.local / rel).write_bytes(data)

    async def scenario() -> None:
        await _synced(rig, files)
        assert sum(lane.kinds["WriteFile"] for lane in rig.stream.lanes[1:]) >= len(big)
        await rig.close()

    asyncio.run(scenario())


def test_a_directory_renamed_right_after_a_save_in_it_waits_for_the_saves_lane(
        lane_rig: Rig) -> None:
    """The save of d/f.c travels on the fast lane (which lags the main stream here); the
    rename of d that follows goes on the main stream and must not overtake it, or the
    late write would make d/f.c again after d moved away."""
    rig = lane_rig
    (rig.local / "d").mkdir()
    (rig.local / "d" / "f.c").write_bytes(b"one\n")

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "d" / "f.c").write_bytes(b"two\n")
        rig.changed(["d/f.c"])
        for _ in range(2):
            await asyncio.sleep(0)
        (rig.local / "d").rename(rig.local / "e")
        rig.changed(["d", "e"])
        await rig.converged()
        assert not rig.problems(), rig.problems()
        assert not (rig.remote / "d").exists()
        assert (rig.remote / "e" / "f.c").read_bytes() == b"two\n"
        assert not rig.reporter.failures
        await rig.close()

    asyncio.run(scenario())


def test_a_file_deleted_right_after_it_was_saved_stays_deleted(lane_rig: Rig) -> None:
    rig = lane_rig
    (rig.local / "g.c").write_bytes(b"one\n")

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        for round_ in range(5):
            (rig.local / "g.c").write_bytes(b"again %d\n" % round_)
            rig.changed(["g.c"])
            for _ in range(round_):
                await asyncio.sleep(0)
            (rig.local / "g.c").unlink()
            rig.changed(["g.c"])
            await rig.converged()
            assert not (rig.remote / "g.c").exists(), round_
            (rig.local / "g.c").write_bytes(b"back\n")
            rig.changed(["g.c"])
            await rig.converged()
        assert not rig.problems(), rig.problems()
        await rig.close()

    asyncio.run(scenario())


def test_a_new_file_in_a_directory_being_renamed_waits_for_the_rename(lane_rig: Rig) -> None:
    """A save into e/ while the rename d -> e is unanswered on the main stream may not take
    a lane: the lane could make e/ before the rename arrives, and the rename would fail."""
    rig = lane_rig
    (rig.local / "d").mkdir()
    for i in range(5):
        (rig.local / "d" / f"f{i}.c").write_bytes(b"x%d\n" % i)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        (rig.local / "d").rename(rig.local / "e")
        rig.changed(["d", "e"])
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        (rig.local / "e" / "new.c").write_bytes(b"new\n")
        rig.changed(["e/new.c"])
        await rig.converged()
        assert not rig.problems(), rig.problems()
        assert (rig.remote / "e" / "new.c").read_bytes() == b"new\n"
        assert not rig.reporter.failures, rig.reporter.failures
        await rig.close()

    asyncio.run(scenario())


# -- saves made during bulk work ----------------------------------------------------------------


def test_urgent_paths_are_taken_first_in_the_order_they_were_marked() -> None:
    queue = PathQueue()
    queue.mark([f"bulk/{i}" for i in range(5)], 0.0)
    queue.mark(["save/a", "save/b"], 1.0, urgent=True)
    queue.mark(["bulk/3"], 2.0, urgent=True)  # queued already: joins the urgent ones
    assert queue.peek(4) == ["save/a", "save/b", "bulk/3", "bulk/0"]
    path, _ = queue.take() or ("", None)
    assert path == "save/a"
    queue.defer("save/a")  # behind the other urgent paths, still ahead of the bulk
    assert queue.peek(10) == ["save/b", "bulk/3", "save/a", "bulk/0", "bulk/1", "bulk/2",
                              "bulk/4"]
    assert queue.queued == 7


def test_a_save_made_during_an_initial_sync_overtakes_it(lane_rig: Rig) -> None:
    rig = lane_rig
    files = _many_files(rig, 3000)
    first = sorted(files)[0]

    async def scenario() -> None:
        await rig.connect()
        # The initial sync has just begun: most files are still queued.
        while not (rig.remote / first).exists():
            await asyncio.sleep(0)
        assert rig.engine.queue.queued > 1000
        saved = sorted(files)[-1]  # the last one the bulk would reach
        (rig.local / saved).write_bytes(b"saved during the initial sync\n")
        rig.changed([saved])
        while (not (rig.remote / saved).exists()
               or (rig.remote / saved).read_bytes() != b"saved during the initial sync\n"):
            await asyncio.sleep(0)
        assert rig.engine.queue.queued > 500, "the save waited for the bulk"
        await rig.converged()
        assert not rig.problems(), rig.problems()
        await rig.close()

    asyncio.run(scenario())


class _QuietReporter:
    def queue(self, queued: int, in_flight: int) -> None:
        pass


def test_a_burst_in_small_watcher_batches_goes_the_bulk_way_but_a_save_stays_first() -> None:
    """A checkout reaches lsync in watcher batches of a few paths: once more than
    URGENT_MAX paths came within BURST_WINDOW, a batch of a few paths is bulk work, while
    a batch of one or two (an editor's save) still goes first; after a quiet BURST_WINDOW
    a few paths are a save again."""
    now = [100.0]
    side = RemoteSide(cast(AgentLink, None), cast(Reporter, _QuietReporter()),
                      lambda: now[0], Packing(packing.ZLIB, long_link=True), False)

    def urgent(path: str) -> bool:
        return side.queue.records[path].urgent

    side.mark_dirty([f"a/{i}" for i in range(10)])
    assert all(urgent(f"a/{i}") for i in range(10))  # (alone: a save of several files)
    now[0] += 0.1
    side.mark_dirty([f"b/{i}" for i in range(10)])  # 20 paths within the window: a burst
    assert not any(urgent(f"b/{i}") for i in range(10))
    now[0] += 0.1
    side.mark_dirty(["src/main.c"])  # an editor's save in the middle of it
    assert urgent("src/main.c")
    now[0] += 0.1
    side.mark_dirty([f"c/{i}" for i in range(3)])
    assert not any(urgent(f"c/{i}") for i in range(3))
    now[0] += BURST_WINDOW + 0.01  # quiet again
    side.mark_dirty([f"d/{i}" for i in range(5)])
    assert all(urgent(f"d/{i}") for i in range(5))
    side.mark_dirty([f"e/{i}" for i in range(URGENT_MAX + 1)])  # one big batch: a burst
    assert not any(urgent(f"e/{i}") for i in range(URGENT_MAX + 1))


def test_a_batchs_files_carry_the_digests_of_the_bytes_sent(rig: Rig) -> None:
    """The agent records the client's digest of each batched file instead of hashing it
    again (WriteBatch): each must be the digest, under the session's hash, of exactly the
    content in the batch."""
    files = _many_files(rig, 200)
    entries: list[list[Any]] = []

    async def scenario() -> None:
        await rig.connect()
        service = rig.stream.service
        handle = service.handle

        def keeping(message: m.Message, bulk: bool = False) -> None:
            if isinstance(message, m.WriteBatch):
                entries.extend(message.files)
            handle(message, bulk)

        service.handle = keeping  # type: ignore[method-assign]
        await rig.converged()
        assert not rig.problems(), rig.problems()
        await rig.close()

    asyncio.run(scenario())
    algorithm = rig.engine.cache.algorithm
    assert len(entries) > 100
    for _seq, path, _mode, size, digest in entries:
        data = files.get(path) or (rig.local / path).read_bytes()  # (and the rig's .gitignore)
        assert size == len(data) and digest == hashing.digest_of(algorithm, data)


def test_a_save_at_the_end_of_a_burst_in_small_watcher_batches_goes_first(rig: Rig) -> None:
    """The last watcher batch of a burst that came in small batches holds its tail and a
    save made right after it: that batch is bulk work (RemoteSide._is_save), but its last
    path (the save) is taken first."""
    from lsync.client.local.inotify import WatchBatch

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        session, queue = rig.session, rig.engine.queue
        now = time.monotonic()
        for n in range(4):  # 40 paths within the burst window, 10 by 10
            batch = [f"burst/{n}/{i}.c" for i in range(10)]
            session.take_batch(batch, WatchBatch(batch, frozenset(), frozenset(),
                                                 latest=tuple(batch[-4:])), now)
        tail = [f"burst/4/{i}.c" for i in range(5)] + ["src/main.c"]
        session.take_batch(tail, WatchBatch(tail, frozenset(), frozenset(),
                                            latest=tuple(tail[-4:])), now)
        assert queue.records["src/main.c"].urgent
        assert not any(queue.records[p].urgent for p in tail[:-1])
        await rig.close()

    asyncio.run(scenario())


def test_the_newest_paths_of_a_bursts_watcher_batch_go_first_newest_first(rig: Rig) -> None:
    """A big watcher batch's last events may be a save made right after the burst: they
    are taken before the rest of the batch, the newest (most likely the save) first."""
    from lsync.client.local.inotify import WatchBatch

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        session, queue = rig.session, rig.engine.queue
        batch = [f"burst/{i}.c" for i in range(30)] + ["src/main.c"]
        session.take_batch(batch, WatchBatch(batch, frozenset(), frozenset(),
                                             latest=tuple(batch[-4:])), time.monotonic())
        assert queue.peek(5) == ["src/main.c", "burst/29.c", "burst/28.c", "burst/27.c",
                                 "burst/0.c"]
        await rig.close()

    asyncio.run(scenario())


def test_bulk_work_waits_for_the_lanes_being_opened_but_not_past_its_bound() -> None:
    """Sent on the main channel while the lanes open, a burst's data would be ahead of
    every save made meanwhile (saves go: the engine does not hold urgent work)."""
    from types import SimpleNamespace

    from lsync.client.remote.engine import LANES_HOLD_MAX, SyncEngine

    async def scenario() -> None:
        opening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pokes: list[int] = []
        stub = SimpleNamespace(link=SimpleNamespace(lanes_opening=opening),
                               side=SimpleNamespace(poke=lambda: pokes.append(1)),
                               _lanes_hold_until=None)
        held = SyncEngine._held_for_lanes
        assert held(stub, 100.0)  # type: ignore[arg-type]
        assert held(stub, 100.0 + LANES_HOLD_MAX - 0.01)  # type: ignore[arg-type]
        assert not held(stub, 100.0 + LANES_HOLD_MAX)  # type: ignore[arg-type]
        opening.set_result(3)
        await asyncio.sleep(0)
        assert pokes == [1]  # the engine wakes when the lanes are there
        assert not held(stub, 100.5)  # type: ignore[arg-type]
        stub.link.lanes_opening = None  # a link without lanes: nothing to wait for
        assert not held(stub, 100.5)  # type: ignore[arg-type]

    asyncio.run(scenario())
