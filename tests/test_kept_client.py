"""The client's side of kept remote edits: the link passes `Kept` messages on and refuses
bad paths in them; the session notes each keep once and keeps the list `lsync status`
shows, newest first, replaced by the agent's listing at the start of a connection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lsync.client.errors import LinkBroken
from lsync.client.session import Options, Session
from lsync.client.target import Target
from lsync.protocol import messages as m
from tests.memagent import open_link
from tests.test_sync_properties import RecordingReporter as Reporter

KEPT = m.KEPT_DIR


def _session(tmp_path: Path) -> tuple[Session, Reporter]:
    reporter = Reporter()
    options = Options(Target(None, None, str(tmp_path / "remote")), tmp_path)
    return Session(options, reporter), reporter


def test_session_notes_each_keep_and_lists_them_newest_first(tmp_path: Path) -> None:
    async def run() -> None:
        session, reporter = _session(tmp_path)
        session._on_kept([["old", f"{KEPT}/1/old", "f", 3, 5]], True)
        assert reporter.notes == []  # a listing is no news
        session._on_kept([["a.c", f"{KEPT}/2/a.c", "f", 10, 7],
                          ["l", f"{KEPT}/3/l", "l", 4, 8]], False)
        assert reporter.notes == [f"kept remote edit of a.c as {KEPT}/2/a.c",
                                  f"kept remote edit of l as {KEPT}/3/l"]
        assert [e["kept_as"] for e in session.progress.kept_edits] == [
            f"{KEPT}/3/l", f"{KEPT}/2/a.c", f"{KEPT}/1/old"]
        assert session.progress.kept_edits[0] == {
            "path": "l", "kept_as": f"{KEPT}/3/l", "kind": "link", "size": 4, "mtime_ns": 8}
        session._on_kept([], True)  # a new connection's agent lists nothing kept
        assert session.progress.kept_edits == []

    asyncio.run(run())


@pytest.mark.parametrize("entry", [
    ["../escape", f"{KEPT}/1/x", "f", 1, 1],
    ["x", "x", "f", 1, 1],
    ["x", f"{KEPT}/../../etc/passwd", "f", 1, 1],
    ["x", "/etc/passwd", "f", 1, 1],
])
def test_a_kept_message_with_a_bad_path_breaks_the_link(tmp_path: Path,
                                                        entry: list[Any]) -> None:
    async def run() -> None:
        stream, link = await open_link(tmp_path / "remote", 10)
        told: list[Any] = []
        link.on_kept = lambda entries, listing: told.append(entries)
        stream.conn.send(m.Kept([entry], False))
        stream._flush()
        await asyncio.wait_for(link.closed, 10)
        assert isinstance(link.failure, LinkBroken) and told == []
        await link.close("test over")

    asyncio.run(run())


def test_the_link_hands_kept_messages_to_its_listener(tmp_path: Path) -> None:
    async def run() -> None:
        stream, link = await open_link(tmp_path / "remote", 10)
        told: list[tuple[list[list[Any]], bool]] = []
        link.on_kept = lambda entries, listing: told.append((entries, listing))
        entry = ["src/a.c", f"{KEPT}/4/src/a.c", "f", 1, 2]
        stream.conn.send(m.Kept([entry], False))
        stream._flush()
        await asyncio.wait_for(link.ping(), 10)  # answered after the Kept was read
        assert told == [([entry], False)]
        await link.close("test over")

    asyncio.run(run())
