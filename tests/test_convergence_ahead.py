"""The convergence check of the touched directories runs while the last answers travel.

Once nothing is queued, the engine checks the directories the watcher touched without
waiting for the answers to its last writes (`Convergence.check_ahead`): on a long link the
in-sync report then follows the last answer instead of a stat walk begun after it. Here the
in-memory agent's answers are held back (`MemoryAgentStream.hold_answers`) while the check
must already have found a file whose event was lost; and background signing waits for the
checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.corerig import STEP_TIMEOUT, Rig, _check, _files
from tests.corerig import home as home  # (a fixture)
from tests.corerig import quick_rig as quick_rig  # (a fixture)


async def _until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT
    while not condition():
        assert loop.time() < deadline, f"not within {STEP_TIMEOUT} s: {what}"
        await asyncio.sleep(0.005)


def test_a_lost_event_is_found_while_the_last_answers_are_still_awaited(
        quick_rig: Rig) -> None:
    rig = quick_rig
    _files(rig, {"d/a.c": b"one\n", "e/b.c": b"two\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        rig.stream.hold_answers()
        (rig.local / "d" / "a.c").write_bytes(b"one, edited\n")
        (rig.local / "d" / "lost.c").write_bytes(b"its event is lost\n")
        rig.changed(["d/a.c"])
        # Directory d is checked while a.c's answer is held: lost.c is found and sent.
        await _until(lambda: (rig.remote / "d" / "lost.c").exists(),
                     "lost.c synced before the answers came")
        # (No signing ahead meanwhile: not settled.)
        assert (rig.engine.idle, rig.engine.convergence.settled) == (False, False)
        assert rig.stream.answers_held
        rig.stream.release_answers()
        await rig.converged()
        assert rig.engine.convergence.settled
        await rig.close()

    asyncio.run(scenario())
    _check(rig)


def test_a_check_ahead_that_finds_nothing_lets_the_report_follow_the_last_answer(
        quick_rig: Rig) -> None:
    rig = quick_rig
    _files(rig, {"d/a.c": b"one\n"})

    async def scenario() -> None:
        await rig.connect()
        await rig.converged()
        rig.stream.hold_answers()
        checks = rig.engine.side.counters.checks
        (rig.local / "d" / "a.c").write_bytes(b"one, edited\n")
        rig.changed(["d/a.c"])
        await _until(lambda: rig.engine.side.counters.checks > checks,
                     "the check of d while the answer is held")
        assert not rig.engine.side.checks.pending and not rig.engine.idle
        reports = rig.reporter.in_sync_as_of
        rig.stream.release_answers()
        await rig.converged()
        assert rig.reporter.in_sync_as_of > reports
        assert rig.engine.side.counters.checks == checks + 1  # no second walk at idle
        await rig.close()

    asyncio.run(scenario())
    _check(rig)
