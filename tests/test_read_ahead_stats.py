"""The read-ahead's lstats stand for the passes' own (lsync.client.remote.passes `_look`).

A file of a burst is read ahead in a worker thread; its pass then takes the lstat the
worker took before the read, instead of a confined lstat of its own, while no watcher batch
came since the read began (lsync.client.local.localside `SharedReads.stat_epoch`) and every
change brings an event (inotify). Checked here: a burst syncs on those lstats alone; a
watcher batch after the read makes the pass look again and send what is there now; and
without a complete watcher (watchfiles, or after an overflow) every pass looks itself.
The client core runs against the real agent through in-memory streams (tests/corerig.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, cast

from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localside import SharedReads
from lsync.client.local.stableread import SiblingReader
from lsync.client.remote.passes import LocalInputs, PathPasses
from lsync.client.remote.sender import Prepared
from tests.corerig import Rig, _check, _files
from tests.corerig import home as home  # (a fixture)
from tests.corerig import rig as rig  # (a fixture)

BURST = {f"d{d}/f{n}.c": f"int f{d}_{n};\n".encode() * (1 + n % 7)
         for d in range(4) for n in range(60)}


def _sync_burst(rig: Rig) -> None:
    """The initial sync of BURST, to convergence; the remote checked."""
    _files(rig, BURST)

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()

    asyncio.run(scenario())
    _check(rig)


def test_a_bursts_files_are_passed_on_the_lstats_the_read_ahead_took(rig: Rig) -> None:
    _sync_burst(rig)
    looked = rig.engine.passes.looked_ahead
    assert looked >= len(BURST) // 2, looked  # (a path's first pass may come before its read)


def test_without_a_complete_watcher_every_pass_takes_its_own_lstat(rig: Rig) -> None:
    rig.session.local.reads.complete = lambda: False  # watchfiles: events may be lost unsaid
    _sync_burst(rig)
    assert rig.engine.passes.looked_ahead == 0


def test_after_an_overflow_every_pass_takes_its_own_lstat(rig: Rig) -> None:
    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        rig.overflow()
        _files(rig, BURST)
        rig.changed(sorted({p.partition("/")[0] for p in BURST}))
        await rig.converged()

    asyncio.run(scenario())
    _check(rig)
    assert rig.engine.passes.looked_ahead == 0


def _passes(root: Path, reads: SharedReads) -> PathPasses:
    cache = HashCache("xxh3-128", root=root)
    local = LocalInputs(root, IgnoreRules(root), cache, time.time_ns, True, reads,
                        reads.stat_epoch)
    return PathPasses(cast(Any, None), local)  # (`_look` asks the local side only)


def _read_ahead(root: Path, rel: str, reads: SharedReads) -> Prepared:
    epoch = reads.stat_epoch()
    assert epoch is not None
    seen = (epoch, time.time_ns())
    with SiblingReader(root, HashCache("xxh3-128", root=root)) as reader:
        content, entry, st = reader.read_stat(rel)
    return Prepared(content, entry, (0, 0, b""), None, None, st, seen)


def test_a_watcher_batch_after_the_read_makes_the_pass_look_again(tmp_path: Path) -> None:
    (tmp_path / "f.c").write_bytes(b"one\n")
    reads = SharedReads(lambda: 1)
    reads.complete = lambda: True
    passes = _passes(tmp_path, reads)
    prepared = _read_ahead(tmp_path, "f.c", reads)

    found, _ = passes._look("f.c", prepared)  # nothing came since the read: its lstat
    assert found is not None and found[0] is prepared.st and passes.looked_ahead == 1

    (tmp_path / "f.c").write_bytes(b"two, longer\n")
    reads.forget(["f.c"])  # the watcher's batch for it
    found, _ = passes._look("f.c", prepared)
    assert found is not None and found[0].st_size == len(b"two, longer\n")
    assert passes.looked_ahead == 1

    reads.forget(["elsewhere.c"])  # any batch: a directory swapped for a link says no more
    prepared = _read_ahead(tmp_path, "f.c", reads)
    reads.forget(["elsewhere.c"])
    found, _ = passes._look("f.c", prepared)
    assert found is not None and found[0] is not prepared.st and passes.looked_ahead == 1


def test_a_change_whose_event_is_still_to_come_is_sent_once_it_comes(rig: Rig) -> None:
    """The pass plans as of the read (as if it had looked just before the change); the
    event that follows brings the path back, and the remote ends with the new content."""
    _files(rig, {"a/f.c": b"one\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        prepared = _read_ahead(rig.local, "a/f.c", rig.session.local.reads)
        (rig.local / "a" / "f.c").write_bytes(b"two, longer\n")
        found, _ = rig.engine.passes._look("a/f.c", prepared)
        assert found is not None and found[0] is prepared.st  # (its event is not out yet)
        rig.changed(["a/f.c"])
        await rig.converged()

    asyncio.run(scenario())
    _check(rig)
    assert (rig.remote / "a" / "f.c").read_bytes() == b"two, longer\n"
    assert os.path.getsize(rig.remote / "a" / "f.c") == len(b"two, longer\n")
