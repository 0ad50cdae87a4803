"""The control socket's handler over every target of a run (lsync.client.fleet).

Each target's session has its own build loop (lsync.client.buildloop.loop: flush, status, run
and pull against that one target); this spreads the requests over them:

- **flush** waits until every target has every change made before the call, the targets
  in parallel (`target`: that one only). A failure says which target (`arm-box: 3 paths
  still pending`); its details are that target's, with `target` set to its name.
- **status**: with one target, its status as it always was (plus `name`); with several,
  `hosts`, a list of the targets' statuses, and a summary (`state`: the first target's that
  is not watching, else "watching"; `connected`: all of them; `in_sync_as_of_ns` and
  `in_sync_changes`: the oldest, the smallest).
- **run** runs on the first target, on the one named by `on`, or with `all` on every
  target at once: no pty, each output line prefixed with `[NAME] `, the client's signals
  and stdin given to every command, the exit status the worst (the highest) of them; a
  target that cannot run the command counts as 125.
- **pull** pulls from the first target, or from the one named by `on`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from lsync.client.buildloop.control import (
    ClientLine,
    ControlError,
    JsonObject,
    PullRequest,
    RunRequest,
    SendLine,
    decode_output,
    output_lines,
)
from lsync.client.buildloop.loop import BuildLoop

RUN_FAILED = 125  # a target where the command could not run (as `lsync run` exits)


class Target(Protocol):
    name: str
    buildloop: BuildLoop | None


class FleetLoop:
    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)

    def _loop(self, target: Target) -> BuildLoop:
        assert target.buildloop is not None  # the fleet gives every target one
        return target.buildloop

    def _named(self, name: str | None) -> list[Target]:
        if name is None:
            return self.targets
        found = [t for t in self.targets if t.name == name]
        if not found:
            known = ", ".join(t.name for t in self.targets)
            raise ControlError("bad-request", f"no target named {name!r} (targets: {known})")
        return found

    async def close(self) -> None:
        for target in self.targets:
            await self._loop(target).close()

    # -- flush ----------------------------------------------------------------------------
    async def flush(self, timeout: float | None, target: str | None = None,
                    notify: SendLine | None = None) -> JsonObject:
        chosen = self._named(target)
        if len(self.targets) == 1:
            return await self._loop(chosen[0]).flush(timeout, notify)
        started = time.monotonic()
        results = await asyncio.gather(
            *(self._loop(t).flush(timeout, _prefixed_notes(t.name, notify)) for t in chosen),
            return_exceptions=True)
        for t, result in zip(chosen, results, strict=True):
            if isinstance(result, ControlError):
                raise ControlError(result.code, f"{t.name}: {result}",
                                   details={**result.details, "target": t.name}) from None
            if isinstance(result, BaseException):
                raise result
        answer: JsonObject = {"waited_ms": round((time.monotonic() - started) * 1000, 1)}
        skipped = sorted({p for r in results if isinstance(r, dict)
                          for p in r.get("skipped", [])})  # type: ignore[attr-defined]
        if skipped:
            answer["skipped"] = skipped[:20]
            answer["skipped_count"] = len(skipped)
        return answer

    # -- status ---------------------------------------------------------------------------
    async def status(self) -> JsonObject:
        statuses = [{"name": t.name, **await self._loop(t).status()} for t in self.targets]
        if len(statuses) == 1:
            return statuses[0]
        busy = [s for s in statuses if s.get("state") != "watching"]
        in_sync = [s.get("in_sync_as_of_ns") or 0 for s in statuses]
        return {
            "state": f"{busy[0]['name']}: {busy[0]['state']}" if busy else "watching",
            "connected": all(bool(s.get("connected")) for s in statuses),
            "target": ", ".join(str(s.get("target")) for s in statuses),
            "local": statuses[0].get("local"),
            "in_sync_as_of_ns": min(in_sync),  # type: ignore[type-var]
            # (`lsync run --watch` runs again once this grows: the slowest target's count)
            "in_sync_changes": min(s.get("in_sync_changes") or 0  # type: ignore[type-var]
                                   for s in statuses),
            "hosts": statuses,
        }

    # -- pull -----------------------------------------------------------------------------
    async def pull(self, request: PullRequest) -> JsonObject:
        target = self._named(request.on)[0] if request.on else self.targets[0]
        return await self._loop(target).pull(request)

    # -- run ------------------------------------------------------------------------------
    async def run(self, request: RunRequest, send_line: SendLine,
                  incoming: AsyncIterator[ClientLine]) -> int:
        if not request.all or len(self.targets) == 1:
            target = self._named(request.on)[0] if request.on else self.targets[0]
            return await self._loop(target).run(request, send_line, incoming)
        if request.on:
            raise ControlError("bad-request", "'on' and 'all' exclude each other")
        one = dataclasses.replace(request, pty=False, all=False)
        queues: list[asyncio.Queue[ClientLine | None]] = [asyncio.Queue()
                                                          for _ in self.targets]
        fanning = asyncio.ensure_future(_fan_out(incoming, queues))
        runs = [asyncio.ensure_future(self._run_one(t, one, send_line, q))
                for t, q in zip(self.targets, queues, strict=True)]
        try:
            statuses = await asyncio.gather(*runs)
        finally:
            fanning.cancel()
            for task in runs:
                task.cancel()
            await asyncio.gather(fanning, *runs, return_exceptions=True)
        return max(statuses)

    async def _run_one(self, target: Target, request: RunRequest, send_line: SendLine,
                       queue: asyncio.Queue[ClientLine | None]) -> int:
        prefix = _Prefixer(target.name, send_line)
        try:
            return await self._loop(target).run(request, prefix.send, _drain(queue))
        except ControlError as exc:
            await send_line({"note": f"{target.name}: {exc}"})
            return RUN_FAILED
        finally:
            await prefix.flush()


async def _fan_out(incoming: AsyncIterator[ClientLine],
                   queues: list[asyncio.Queue[ClientLine | None]]) -> None:
    """Every line the client sends, to every target's command (None: the client is done)."""
    try:
        async for line in incoming:
            for queue in queues:
                queue.put_nowait(line)
    finally:
        for queue in queues:
            queue.put_nowait(None)


async def _drain(queue: asyncio.Queue[ClientLine | None]) -> AsyncIterator[ClientLine]:
    while (line := await queue.get()) is not None:
        yield line


def _prefixed_notes(name: str, notify: SendLine | None) -> SendLine | None:
    if notify is None:
        return None
    inner = notify

    async def send(line: JsonObject) -> None:
        if "note" in line:
            line = {**line, "note": f"{name}: {line['note']}"}
        await inner(line)

    return send


class _Prefixer:
    """Output lines of one target's command, each line prefixed with `[NAME] ` (a line
    is kept until its end comes, per stream; what is left at the end goes as a line)."""

    def __init__(self, name: str, send_line: SendLine) -> None:
        self.prefix = f"[{name}] ".encode()
        self.name = name
        self.send_line = send_line
        self.partial: dict[str, bytes] = {}

    async def send(self, line: JsonObject) -> None:
        output = decode_output(line)
        if output is None:
            if "note" in line:
                line = {**line, "note": f"{self.name}: {line['note']}"}
            await self.send_line(line)
            return
        stream, data = output
        data = self.partial.pop(stream, b"") + data
        whole, newline, rest = data.rpartition(b"\n")
        if rest:
            self.partial[stream] = rest
        if newline:
            await self._send(stream, whole + newline)

    async def _send(self, stream: str, data: bytes) -> None:
        lines = data.splitlines(keepends=True)
        for out in output_lines(stream, b"".join(self.prefix + line for line in lines)):
            await self.send_line(out)

    async def flush(self) -> None:
        for stream, rest in list(self.partial.items()):
            with contextlib.suppress(ControlError):
                await self._send(stream, rest + b"\n")
        self.partial.clear()
