"""The build loop's pulls: `lsync pull` and the pull after `lsync run`'s command.

`lsync pull --kept PATH` brings back the newest remote edit of PATH that the agent kept
aside (lsync.agent.keeping), as PATH.lsync-remote-N beside it, for a merge: a pulled file,
never pushed (lsync.client.buildloop.pullrules).

All wait for the session's link (a bounded time), then pull with lsync.client.buildloop.pull over
the current engine's link, with the session's rules: `pull_request` what the request's
patterns (or the `[pull] paths`) select, whatever its age; `pull_after_command` what they
select and changed on the remote since the command started (PULL_MARGIN before it, on the
agent's clock: the request carries an age, not a time, so clocks need not agree), keeping
any local file changed since the command started. Failures are ControlErrors for the
control socket; after a command they become a note line instead (the exit status stays
the command's).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from lsync.client.buildloop.control import ControlError, JsonObject, PullRequest, SendLine
from lsync.client.buildloop.pull import Puller, PullReport
from lsync.client.buildloop.pullrules import KEPT_COPY_MARK, wire_rules
from lsync.client.errors import LinkBroken
from lsync.protocol.messages import KEPT_DIR

if TYPE_CHECKING:
    from lsync.client.buildloop.loop import SessionView
    from lsync.client.remote.engine import SyncEngine

PULL_MARGIN = 2.0  # seconds before the command's start a file may have changed and be pulled
PULL_LINK_WAIT = 30.0  # seconds the pull after a command waits for a link that went down


async def pull_request(session: SessionView, request: PullRequest) -> JsonObject:
    if request.kept:
        report = await _pull_kept(session, list(request.kept), request.timeout)
    else:
        report = await _pull(session, list(request.patterns), 0, request.timeout)
    session.reporter.note(report.summary())
    return report.as_json()


async def pull_after_command(session: SessionView, started: float, started_ns: int,
                             send_line: SendLine) -> None:
    """`started`: time.monotonic() when the command started; `started_ns`: Unix time."""
    if not session.rules.pull:
        await send_line({"note": "nothing to pull: no [pull] paths in .lsync.toml"})
        return
    age_ns = int((time.monotonic() - started + PULL_MARGIN) * 1e9)
    try:
        report = await _pull(session, [], age_ns, PULL_LINK_WAIT, started_ns)
    except ControlError as exc:
        await send_line({"note": f"pull failed: {exc}"})
        return
    session.reporter.note(report.summary())
    if report.listed:
        await send_line({"note": report.summary()})


def kept_copies(session: SessionView, paths: list[str]) -> list[tuple[str, str]]:
    """(where the newest kept remote edit of each path is on the remote, where its copy goes
    locally: beside the path, PATH.lsync-remote-N, N the keep's number)."""
    pairs: list[tuple[str, str]] = []
    for path in paths:
        found = next((e for e in session.progress.kept_edits if e.get("path") == path), None)
        kept_as = found.get("kept_as") if found is not None else None
        if not isinstance(kept_as, str):
            raise ControlError("not-found", f"no remote edit of {path} was kept in this "
                               "session's list (lsync status lists them)")
        number = kept_as[len(KEPT_DIR) + 1:].partition("/")[0]
        pairs.append((kept_as, f"{path}{KEPT_COPY_MARK}{number}"))
    return pairs


async def _pull_kept(session: SessionView, paths: list[str],
                     timeout: float | None) -> PullReport:
    pairs = kept_copies(session, paths)
    puller = _puller(await _engine(session, timeout), session, None)
    try:
        return await puller.pull_as(pairs)
    except LinkBroken as exc:
        raise ControlError("closed", f"the link broke during the pull: {exc}") from None


async def _pull(session: SessionView, patterns: list[str], age_ns: int,
                timeout: float | None, changed_after_ns: int | None = None) -> PullReport:
    rules = wire_rules(patterns) if patterns else session.rules.pull.wire()
    if not rules:
        raise ControlError("bad-request", "nothing to pull: give patterns, or set [pull] "
                           "paths in .lsync.toml")
    puller = _puller(await _engine(session, timeout), session, changed_after_ns)
    try:
        return await puller.pull(rules, age_ns)
    except LinkBroken as exc:
        raise ControlError("closed", f"the link broke during the pull: {exc}") from None


async def _engine(session: SessionView, timeout: float | None) -> SyncEngine:
    """The session's engine once its link is up (ControlError after `timeout`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while session.engine is None or not session.engine_ready:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise ControlError("disconnected", f"not connected ({session.progress.state})")
        session.engine_changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session.engine_changed.wait(), left)
    return session.engine


def _puller(engine: SyncEngine, session: SessionView, changed_after_ns: int | None) -> Puller:
    return Puller(engine.link, session.root, session.remote_root or "",
                  engine.cache.algorithm, session.rules, session.rewrite_rules,
                  session.pulled_digests, changed_after_ns)
