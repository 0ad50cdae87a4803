"""A session's process policies (lsync.client.cli): the garbage collector's
(`collect_garbage_seldom`: young collections wait for many more new objects, what the
imports made is frozen, and cycles of garbage still go) and the interpreter lock's switch
interval (`switch_threads_often`)."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from lsync.client import cli


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None
        self.payload = bytearray(1 << 20)


def test_the_policy_freezes_what_exists_and_raises_the_thresholds(restored_gc: None) -> None:
    gc.unfreeze()
    cli.collect_garbage_seldom()
    assert gc.get_freeze_count() > 1000  # (the modules imported by then)
    assert gc.get_threshold() == (cli.GC_YOUNG, *cli.GC_OLDER)


def test_cycles_of_garbage_still_go_under_the_policy(restored_gc: None) -> None:
    cli.collect_garbage_seldom()
    gc.collect(0)  # (counts from zero)
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone cannot free it
    young = cli.GC_YOUNG * (cli.GC_OLDER[0] + 1)
    made: list[list[int]] = [[] for _ in range(young)]  # new tracked objects
    assert gone() is None
    del made


def test_a_session_switches_threads_every_fifth_of_a_millisecond() -> None:
    interval = sys.getswitchinterval()
    try:
        cli.switch_threads_often()
        assert sys.getswitchinterval() == pytest.approx(cli.SWITCH_INTERVAL)
    finally:
        sys.setswitchinterval(interval)
