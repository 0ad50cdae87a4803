"""Unit tests of the parts of a run over several targets that need no link: the shared
reporter (lsync.client.fleet.FleetReporter), the output prefixes and request routing of
lsync.client.buildloop.fleetloop, and the reads shared between targets
(lsync.client.local.localside)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lsync.client.buildloop.control import (
    ClientLine,
    ControlError,
    JsonObject,
    RunRequest,
    SendLine,
    Signal,
    decode_output,
    output_lines,
)
from lsync.client.buildloop.fleetloop import FleetLoop, _Prefixer
from lsync.client.fleet import FleetReporter
from lsync.client.local.localentry import LocalEntry
from lsync.client.local.localside import SharedReads

BOUND = 10.0  # seconds any wait of these tests may take


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


def test_one_target_reports_through_the_users_reporter_unchanged() -> None:
    inner = Recorder()
    fleet = FleetReporter(inner, ["box"])
    assert fleet.for_host(0) is inner


def test_in_sync_is_said_for_all_targets_as_of_the_oldest_report() -> None:
    inner = Recorder()
    fleet = FleetReporter(inner, ["a", "b"])
    a, b = fleet.for_host(0), fleet.for_host(1)
    a.in_sync(100, 1, 10)
    assert not [c for c in inner.calls if c[0] == "in_sync"]  # b has not reported yet
    b.in_sync(50, 2, 20)
    a.in_sync(200, 3, 30)  # b's 50 still bounds what is on every target
    b.in_sync(150, 4, 40)
    assert [c for c in inner.calls if c[0] == "in_sync"] == [
        ("in_sync", 50, 3, 30), ("in_sync", 150, 7, 70)]


def test_ready_comes_once_every_target_is_ready_and_lines_say_the_target() -> None:
    inner = Recorder()
    fleet = FleetReporter(inner, ["a", "b"])
    a, b = fleet.for_host(0), fleet.for_host(1)
    a.state("syncing")
    a.ready(10, 100, 1.5)
    assert not [c for c in inner.calls if c[0] == "ready"]
    b.ready(12, 120, 2.5)
    b.note("hello")
    b.failed("x.c", "refused")
    assert ("state", "a: syncing") in inner.calls
    assert ("ready", 22, 220, 2.5) in inner.calls
    assert ("note", "b: hello") in inner.calls
    assert ("failed", "b: x.c", "refused") in inner.calls


def test_the_live_line_shows_the_largest_queue_and_the_slowest_initial_sync() -> None:
    inner = Recorder()
    fleet = FleetReporter(inner, ["a", "b"])
    a, b = fleet.for_host(0), fleet.for_host(1)
    a.queue(5, 1)
    b.queue(2, 7)
    assert list(inner.calls[-1]) == ["queue", 5, 7]
    a.progress(90, 100, 9, 10)
    b.progress(10, 100, 1, 10)
    a.progress(95, 100, 9, 10)
    assert list(inner.calls[-1]) == ["progress", 10, 100, 1, 10]


def test_prefixed_output_keeps_partial_lines_until_their_end() -> None:
    sent: list[JsonObject] = []

    async def send(line: JsonObject) -> None:
        sent.append(line)

    async def scenario() -> None:
        prefixer = _Prefixer("arm", send)
        for part in (b"one\ntw", b"o\nthr", b"ee"):
            for line in output_lines("out", part):
                await prefixer.send(line)
        await prefixer.send({"note": "waiting"})
        await prefixer.flush()

    asyncio.run(scenario())
    data = b"".join(out[1] for line in sent if (out := decode_output(line)) is not None)
    assert data == b"[arm] one\n[arm] two\n[arm] three\n"
    assert {"note": "arm: waiting"} in sent


class FakeLoop:
    def __init__(self, status: int | ControlError) -> None:
        self.status = status
        self.signals: list[str] = []

    async def run(self, request: RunRequest, send_line: SendLine,
                  incoming: AsyncIterator[ClientLine]) -> int:
        await send_line(output_lines("out", b"hi\n")[0])
        async for line in incoming:
            if isinstance(line, Signal):
                self.signals.append(line.name)
        if isinstance(self.status, ControlError):
            raise self.status
        return self.status


class FakeTarget:
    def __init__(self, name: str, loop: FakeLoop) -> None:
        self.name = name
        self.buildloop = loop


def test_run_on_all_exits_with_the_worst_status_and_gives_every_target_the_signals() -> None:
    loops = [FakeLoop(0), FakeLoop(3), FakeLoop(ControlError("closed", "link down"))]
    fleet = FleetLoop([FakeTarget(n, loop) for n, loop in  # type: ignore[misc]
                       zip(("a", "b", "c"), loops, strict=True)])
    sent: list[JsonObject] = []

    async def send(line: JsonObject) -> None:
        sent.append(line)

    async def client() -> AsyncIterator[ClientLine]:
        yield Signal("INT")

    status = asyncio.run(fleet.run(RunRequest(("make",), all=True), send, client()))
    assert status == 125  # c could not run it; worse than b's 3
    assert all(loop.signals == ["INT"] for loop in loops)
    data = b"".join(out[1] for line in sent if (out := decode_output(line)) is not None)
    assert sorted(data.splitlines()) == [b"[a] hi", b"[b] hi", b"[c] hi"]
    assert {"note": "c: link down"} in sent


def test_an_unknown_target_name_is_a_bad_request() -> None:
    fleet = FleetLoop([FakeTarget("a", FakeLoop(0)), FakeTarget("b", FakeLoop(0))])  # type: ignore[list-item]
    with pytest.raises(ControlError, match="no target named 'z'"):
        asyncio.run(fleet.flush(1.0, "z"))


def test_a_shared_read_is_made_once_and_forgotten_when_the_path_changes(
        tmp_path: Path) -> None:
    hosts = 3
    reads = SharedReads(lambda: hosts)
    path = tmp_path / "f"
    path.write_text("x")
    st = os.stat(path)
    made: list[int] = []

    async def read() -> tuple[bytes, LocalEntry]:
        made.append(1)
        await asyncio.sleep(0)
        return b"x", LocalEntry("file", 1, 0, 0o644, b"d" * 16)

    async def scenario() -> None:
        got = await asyncio.gather(*(reads.read("f", st, read) for _ in range(hosts)))
        assert [g[0] for g in got] == [b"x"] * hosts
        assert len(made) == 1
        await reads.read("f", st, read)  # every target took it: read again
        assert len(made) == 2
        reads.forget(["f"])  # an event for the path: the held read is not handed on
        await reads.read("f", st, read)
        assert len(made) == 3

    asyncio.run(scenario())
    assert reads.files_read == 3


def test_a_scan_no_target_waits_for_any_more_is_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent chose another hash than the one guessed: the guessed scan's waiter is
    cancelled, and its walk (a worker thread: not cancellable) is told to stop."""
    import threading

    from lsync.client.buildloop.pullrules import PullRules, PushRules
    from lsync.client.local import localside
    from lsync.client.local.localentry import ScanStopped

    entered = threading.Event()
    stopped: list[bool] = []

    def walking(*args: Any, stop: threading.Event, **kwargs: Any) -> dict[str, LocalEntry]:
        entered.set()
        stopped.append(stop.wait(BOUND))
        raise ScanStopped("", "the scan was stopped")

    monkeypatch.setattr(localside, "scan_tree", walking)
    side = localside.LocalSide(tmp_path, PushRules(tmp_path, [], False, pull=PullRules([])),
                               5, 20, lambda text: None)

    async def scenario() -> None:
        waiter = asyncio.ensure_future(side.scan("xxh3-128", 0.0, lambda p, e: None))
        assert await asyncio.to_thread(entered.wait, BOUND)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND
        while not stopped:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert stopped == [True]


def _two_read_aheads(root: Path) -> tuple[Any, Any, Any]:
    from lsync.client.local.hashcache import HashCache
    from lsync.client.remote.sender import ReadAhead

    reads = SharedReads(lambda: 2)
    cache = HashCache("xxh3-128", root=root)
    return reads, ReadAhead(root, cache, reads.ahead), ReadAhead(root, cache, reads.ahead)


def test_what_one_targets_read_ahead_read_is_taken_by_the_others(tmp_path: Path) -> None:
    from lsync.client.remote.sender import prepared_of, still_current

    (tmp_path / "f.c").write_text("int f;\n")
    _reads, first, second = _two_read_aheads(tmp_path)
    packer = (0, 0, b"")

    async def scenario() -> None:
        first.start(["f.c"], packer)
        second.start(["f.c"], packer)  # the same version: no second read
        mine, theirs = first.take("f.c"), second.take("f.c")
        assert mine is not None and theirs is not None and theirs.source is mine
        a, b = await prepared_of(mine), await prepared_of(theirs)
        assert a is not None and b is a and a.content == b"int f;\n"
        assert still_current(b, os.lstat(tmp_path / "f.c")) is b
        assert second.shared == 1

    try:
        asyncio.run(scenario())
    finally:
        first.close()
        second.close()


def test_a_read_ahead_begun_before_an_event_for_the_path_is_not_handed_on(
        tmp_path: Path) -> None:
    (tmp_path / "f.c").write_text("int f;\n")
    reads, first, second = _two_read_aheads(tmp_path)
    packer = (0, 0, b"")

    async def scenario() -> None:
        first.start(["f.c", "g.c"], packer)
        second.start(["f.c", "g.c"], packer)
        reads.forget(["f.c"])  # a watcher event for f.c after both read-aheads began
        assert second.take("f.c") is None  # it reads the file at its turn instead
        assert second.take("g.c") is not None  # (no event for g.c)
        assert first.take("f.c") is not None  # its own: still checked against its lstat
        second.start(["f.c"], packer)  # a read-ahead begun after the event is not shared
        assert second.futures["f.c"].source is None

    try:
        asyncio.run(scenario())
    finally:
        first.close()
        second.close()


def test_what_is_made_of_a_content_is_made_once_for_every_target() -> None:
    targets = 3
    reads = SharedReads(lambda: targets)
    made: list[bytes] = []

    async def make() -> bytes:
        made.append(b"x")
        await asyncio.sleep(0)
        return b"packed"

    async def scenario() -> None:
        key = ("pieces", b"d" * 16, (1, 6, b""))
        got = await asyncio.gather(*(reads.made(key, make) for _ in range(targets)))
        assert got == [b"packed"] * targets and len(made) == 1
        await reads.made(("pieces", b"d" * 16, (1, 1, b"")), make)  # another packing
        assert len(made) == 2

    asyncio.run(scenario())
    assert reads.made_count == 2


def test_a_paths_lstat_serves_the_other_targets_until_the_next_watcher_batch(
        tmp_path: Path) -> None:
    reads = SharedReads(lambda: 3)
    st = os.lstat(tmp_path)
    reads.stats.put("f", (st, None), 123)
    assert reads.stats.take("f") == ((st, None), 123)  # as seen then, by another target
    reads.forget([])  # a watcher batch, whatever paths it names
    assert reads.stats.take("f") is None
    reads.stats.put("f", None, 456)
    assert reads.stats.take("f") == (None, 456)
    assert reads.stats.take("f") == (None, 456)
    assert reads.stats.take("f") is None  # both other targets took it
    one = SharedReads(lambda: 1)
    one.stats.put("f", None, 1)
    assert one.stats.take("f") is None  # one target: nothing held


def test_after_an_overflow_no_lstat_is_shared_any_more(tmp_path: Path) -> None:
    """A directory that could not be watched comes with an overflow and stays unwatched:
    a change there brings no event, so an lstat held for the others could be stale."""
    reads = SharedReads(lambda: 2)
    reads.stats.overflowed()
    reads.stats.put("f", None, 1)
    assert reads.stats.take("f") is None
    lossy = SharedReads(lambda: 2)
    lossy.stats.trusted = lambda: False  # (watchfiles: no overflow reported)
    lossy.stats.put("f", None, 1)
    assert lossy.stats.take("f") is None


def test_targets_whose_agents_chose_other_hashes_read_for_themselves(tmp_path: Path) -> None:
    """A read's digest is of the reading target's hash: it is never handed to a target of
    another hash (whose agent records the digest a batch carries)."""
    from lsync.client.local.hashcache import HashCache
    from lsync.client.remote.sender import ReadAhead

    (tmp_path / "f.c").write_text("int f;\n")
    reads = SharedReads(lambda: 2)
    xxh = ReadAhead(tmp_path, HashCache("xxh3-128", root=tmp_path), reads.ahead)
    blake = ReadAhead(tmp_path, HashCache("blake2b-128", root=tmp_path), reads.ahead)
    packer = (0, 0, b"")
    got: list[str] = []

    async def read(name: str) -> Any:
        got.append(name)
        return b"int f;\n", None

    async def scenario() -> None:
        xxh.start(["f.c"], packer)
        blake.start(["f.c"], packer)
        assert blake.futures["f.c"].source is None  # read again, hashed with its own hash
        st = os.lstat(tmp_path / "f.c")
        await reads.read("f.c", st, lambda: read("xxh"), "xxh3-128")
        await reads.read("f.c", st, lambda: read("blake"), "blake2b-128")
        assert got == ["xxh", "blake"]  # (of one version: the same hash's would be shared)

    try:
        asyncio.run(scenario())
    finally:
        xxh.close()
        blake.close()


def _scan_instead(side: Any, guess: str, chosen: str) -> Any:
    """LocalSide.scan_instead: the scan for `chosen` after one for `guess` (what a session
    does when the agent chose another hash than it guessed)."""
    async def scenario() -> Any:
        guessed = asyncio.ensure_future(side.scan(guess, 0.0, lambda p, e: None))
        return await side.scan_instead(guessed, chosen, 0.0, lambda p, e: None)

    return asyncio.run(scenario())


def _side(root: Path) -> Any:
    from lsync.client.buildloop.pullrules import PullRules, PushRules
    from lsync.client.local import localside

    return localside.LocalSide(root, PushRules(root, [], False, pull=PullRules([])), 5, 20,
                               lambda text: None)


def test_at_first_contact_the_guessed_scan_serves_another_hash_without_a_second_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "a.c").write_text("int a;\n")
    side = _side(tree)
    cache, local = _scan_instead(side, "xxh3-128", "blake2b-128")
    assert side.scans == 1
    assert cache.algorithm == "blake2b-128"
    assert set(local) == {"d", "d/a.c"} and local["d/a.c"].digest is None


def test_a_known_digest_of_the_chosen_hash_makes_the_tree_scanned_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lsync.client.local.hashcache import HashCache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    tree.mkdir()
    path = tree / "a.c"
    path.write_text("int a;\n")
    known = HashCache("blake2b-128", root=tree)
    digest = known.digest_of(b"int a;\n")
    # (Read "10 s later": past the racy window of its ctime, so it is remembered.)
    assert known.store("a.c", os.lstat(path), digest, time.time_ns() + 10**10)
    known.save()
    side = _side(tree)
    _cache, local = _scan_instead(side, "xxh3-128", "blake2b-128")
    assert side.scans == 2
    assert local["a.c"].digest == digest
