"""The build loop's pulls: `lsync pull` and the pull after `lsync run`'s command.

Both wait for the session's link (a bounded time), then pull with lsync.client.pull over
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

from lsync.client.control import ControlError, JsonObject, PullRequest, SendLine
from lsync.client.errors import LinkBroken
from lsync.client.pull import Puller, PullReport
from lsync.client.pullrules import wire_rules

if TYPE_CHECKING:
    from lsync.client.buildloop import SessionView

PULL_MARGIN = 2.0  # seconds before the command's start a file may have changed and be pulled
PULL_LINK_WAIT = 30.0  # seconds the pull after a command waits for a link that went down


async def pull_request(session: SessionView, request: PullRequest) -> JsonObject:
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


async def _pull(session: SessionView, patterns: list[str], age_ns: int,
                timeout: float | None, changed_after_ns: int | None = None) -> PullReport:
    rules = wire_rules(patterns) if patterns else session.rules.pull.wire()
    if not rules:
        raise ControlError("bad-request", "nothing to pull: give patterns, or set [pull] "
                           "paths in .lsync.toml")
    deadline = None if timeout is None else time.monotonic() + timeout
    while session.engine is None or not session.engine_ready:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise ControlError("disconnected", f"not connected ({session.progress.state})")
        session.engine_changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session.engine_changed.wait(), left)
    engine = session.engine
    puller = Puller(engine.link, session.root, session.remote_root or "",
                    engine.cache.algorithm, session.rules, session.rewrite_rules,
                    session.pulled_digests, changed_after_ns)
    try:
        return await puller.pull(rules, age_ns)
    except LinkBroken as exc:
        raise ControlError("closed", f"the link broke during the pull: {exc}") from None
