"""`lsync flush`, `lsync run` and `lsync status`: clients of a running session's control
socket (`lsync.client.buildloop.control`), found from the current directory (or `--local`).

Exit statuses (also in the README):

- flush: 0 every change made before it was called is acknowledged by the remote; 1 the
  timeout passed first (what is still pending is printed); 3 no running `lsync connect`
  for this tree.
- run: the command's own status (128 + N when signal N ended it); 124 the flush before it
  timed out; 125 lsync could not run it (no session for this tree, the link broke).
- status: 0; 3 no running session.
- pull: 0 every selected file is here (pulled or already the same); 1 some failed or were
  kept because they changed locally (each named), or the session failed the request; 3 no
  running session.

`run` relays the command's output as it comes (stdout to stdout, stderr to stderr; with a
pty, which it asks for when its own stdout is a terminal, both come as one stream). The
first Ctrl-C is sent to the remote command (on a pty, as the terminal's own ^C), a second
one ends it hard. With `--watch` the command runs again after each batch of changes is in
sync remotely, and a run that a newer change made stale is interrupted first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from lsync.client.buildloop.control import (
    ControlError,
    JsonObject,
    decode_output,
    request,
    stream,
)
from lsync.client.buildloop.controlpath import find_socket
from lsync.client.status import terminal_safe

NO_SESSION = 3
FLUSH_TIMEOUT = 124
RUN_FAILED = 125
WATCH_POLL = 0.2  # seconds between looks at the session's in-sync time with --watch


def _socket(start: Path) -> Path:
    found = find_socket(start)
    if found is None:
        raise ControlError("no-session", f"no running `lsync connect` for {start} "
                           "(start one in this tree)")
    return found


def _say(text: str) -> None:
    print(f"lsync: {terminal_safe(text)}", file=sys.stderr)


async def flush(start: Path, timeout: float | None, target: str | None = None) -> int:
    message: JsonObject = {"v": 1, "op": "flush", "timeout": timeout}
    if target is not None:
        message["target"] = target
    try:
        path = _socket(start)
        reply = await request(path, message,
                              None if timeout is None else timeout + 10, tree=start)
    except ControlError as exc:
        _say(str(exc))
        return NO_SESSION if exc.code == "no-session" else 1
    waited = reply.get("waited_ms")
    if waited is not None and os.environ.get("LSYNC_VERBOSE"):
        _say(f"flushed in {waited} ms")
    _say_skipped(reply)
    return 0


def _say_skipped(reply: JsonObject) -> None:
    """Files too big for lsync are never on the remote: a flush says so every time."""
    skipped = reply.get("skipped")
    if isinstance(skipped, list) and skipped:
        count = reply.get("skipped_count", len(skipped))
        _say(f"note: {count} files too big to sync are not on the remote: "
             + ", ".join(str(p) for p in skipped[:5]) + (" ..." if count != len(skipped[:5])
                                                          else ""))


async def status(start: Path, as_json: bool) -> int:
    try:
        reply = await request(_socket(start), {"v": 1, "op": "status"}, 10, tree=start)
    except ControlError as exc:
        _say(str(exc))
        return NO_SESSION if exc.code == "no-session" else 1
    reply = {k: v for k, v in reply.items() if k not in ("v", "ok")}
    hosts = reply.get("hosts")
    if as_json:  # several targets: a list, one object each
        print(json.dumps(hosts if isinstance(hosts, list) else reply, indent=2,
                         sort_keys=True))
        return 0
    if isinstance(hosts, list):
        print("\n\n".join(_status_lines(h, f"{h.get('name')}: ") for h in hosts
                           if isinstance(h, dict)))
    else:
        print(_status_lines(reply, ""))
    return 0


def _status_lines(reply: JsonObject, name: str) -> str:
    """One target's status, for a terminal."""
    lines = [f"{name}{reply.get('state')}: {reply.get('local')} -> {reply.get('target')}"]
    if reply.get("connected"):
        latency = reply.get("last_latency_ms")
        lines.append(f"synced {reply.get('files')} files, {reply.get('bytes')} bytes; "
                     f"queue {reply.get('queued')}+{reply.get('in_flight')}; "
                     f"last {'-' if latency is None else f'{latency} ms'}")
        failing = reply.get("failing_paths")
        if reply.get("failing") and isinstance(failing, dict):
            lines.append(f"{reply.get('failing')} paths failing: "
                         + ", ".join(f"{p} ({why})" for p, why in failing.items()))
        skipped = reply.get("skipped_paths")
        if reply.get("skipped") and isinstance(skipped, list):
            lines.append(f"{reply.get('skipped')} files too big to sync (not on the remote): "
                         + ", ".join(str(p) for p in skipped))
    if reply.get("ignored"):
        lines.append(f"{reply['ignored']} paths ignored (files, links, and directories not "
                     "entered)")
    for key, label in (("last_error", "last error"), ("last_check", "last check")):
        if reply.get(key):
            lines.append(f"{label}: {reply.get(key)}")
    kept = reply.get("kept_remote_edits")
    if isinstance(kept, list) and kept:
        shown = [f"{e.get('path')} as {e.get('kept_as')}" for e in kept[:5] if isinstance(e, dict)]
        lines.append(f"{len(kept)} remote edits kept aside, newest first: " + ", ".join(shown)
                     + (" ..." if len(kept) > len(shown) else ""))
    running = reply.get("commands")
    if isinstance(running, list) and running:
        lines.append("running: " + "; ".join(str(command) for command in running))
    return "\n".join(terminal_safe(line) for line in lines)


async def pull(start: Path, patterns: Sequence[str], timeout: float | None,
               kept: Sequence[str] = (), on: str | None = None) -> int:
    message: JsonObject = {"v": 1, "op": "pull", "patterns": list(patterns),
                           "timeout": timeout}
    if kept:
        message["kept"] = [path.strip("/") for path in kept]
    if on is not None:
        message["on"] = on
    try:
        reply = await request(_socket(start), message, None, tree=start)
    except ControlError as exc:
        _say(str(exc))
        return NO_SESSION if exc.code == "no-session" else 1
    pulled, count = reply.get("pulled"), reply.get("pulled_count")
    if isinstance(pulled, list):
        for path in pulled:
            print(terminal_safe(str(path)))
        if isinstance(count, int) and count > len(pulled):
            print(f"... and {count - len(pulled)} more")
    trouble = 0
    for key, label in (("skipped", "kept the local file"), ("failed", "failed")):
        found = reply.get(key)
        if isinstance(found, dict):
            for path, why in found.items():
                _say(f"{label}: {path}: {why}")
                trouble += 1
    _say(f"{reply.get('listed')} listed, {count} pulled, {reply.get('unchanged')} unchanged, "
         f"{reply.get('bytes')} bytes in {reply.get('seconds')} s")
    return 1 if trouble else 0


async def run(start: Path, argv: Sequence[str], timeout: float | None, map_paths: bool,
              watch: bool, pull: bool = False, on: str | None = None,
              on_all: bool = False) -> int:
    """`lsync run`: on the first target, the one named `on`, or every one (`on_all`)."""
    try:
        path = _socket(start)
    except ControlError as exc:
        _say(str(exc))
        return RUN_FAILED
    where: JsonObject = {"on": on} if on is not None else {"all": True} if on_all else {}
    if not watch:
        return await _run_once(path, start, argv, timeout, map_paths, pull=pull, where=where)
    return await _run_watching(path, start, argv, timeout, map_paths, pull, where)


async def _run_once(path: Path, start: Path, argv: Sequence[str], timeout: float | None,
                    map_paths: bool, stale: asyncio.Event | None = None,
                    pull: bool = False, where: JsonObject | None = None) -> int:
    where = where or {}
    tty = sys.stdout.isatty() and not where.get("all")  # a pty only for one target
    cols, rows = _size()
    message: dict[str, object] = {
        "v": 1, "op": "run", "argv": list(argv), "pty": tty,
        "term": os.environ.get("TERM") if tty else None, "cols": cols, "rows": rows,
        "map_paths": map_paths, "cwd": str(start.resolve()), "timeout": timeout,
        "pull": pull, **where}
    loop = asyncio.get_running_loop()
    interrupts = 0
    try:
        async with stream(path, message, tree=start) as lines:
            sending: set[asyncio.Future[None]] = set()  # owned until sent

            def send_soon(line: Coroutine[Any, Any, None]) -> None:
                task = asyncio.ensure_future(line)
                sending.add(task)
                task.add_done_callback(sending.discard)

            def on_int() -> None:
                nonlocal interrupts
                interrupts += 1
                send_soon(lines.signal("INT" if interrupts == 1 else "KILL"))

            def on_winch() -> None:
                send_soon(lines.resize(*_size()))

            loop.add_signal_handler(signal.SIGINT, on_int)
            if tty:
                loop.add_signal_handler(signal.SIGWINCH, on_winch)
            stopper = asyncio.ensure_future(_interrupt_when(stale, lines.signal))
            try:
                if not sys.stdin.isatty():
                    # A quick command may be over, and the session's side closed, before
                    # this is sent: its answer is still there to read.
                    with contextlib.suppress(ControlError):
                        await lines.close_stdin()
                async for line in lines:
                    output = decode_output(line)
                    if output is not None:
                        out = sys.stdout if output[0] == "out" else sys.stderr
                        out.buffer.write(output[1])
                        out.buffer.flush()
                    elif "note" in line:
                        _say(str(line["note"]))
                    elif "ok" in line:
                        exit_status = line.get("exit")
                        return exit_status if isinstance(exit_status, int) else RUN_FAILED
            finally:
                stopper.cancel()
                for task in (stopper, *sending):
                    with contextlib.suppress(asyncio.CancelledError, ControlError):
                        await task
                loop.remove_signal_handler(signal.SIGINT)
                if tty:
                    loop.remove_signal_handler(signal.SIGWINCH)
    except ControlError as exc:
        _say(str(exc))
        return FLUSH_TIMEOUT if exc.code == "timeout" else RUN_FAILED
    _say("the session ended the command without an exit status")
    return RUN_FAILED


async def _interrupt_when(stale: asyncio.Event | None, send: object) -> None:
    if stale is None:
        return
    await stale.wait()
    assert callable(send)
    with contextlib.suppress(ControlError):
        await send("INT")


async def _run_watching(path: Path, start: Path, argv: Sequence[str], timeout: float | None,
                        map_paths: bool, pull: bool = False,
                        where: JsonObject | None = None) -> int:
    """Run, then run again each time the session is in sync after newer changes; a run
    still going when a newer batch lands is interrupted (it is stale)."""
    seen = await _synced_changes(path, start)
    while True:
        stale = asyncio.Event()
        watcher = asyncio.ensure_future(_wait_newer(path, start, seen, stale))
        try:
            code = await _run_once(path, start, argv, timeout, map_paths, stale, pull, where)
            _say(f"exit {code}; waiting for changes (Ctrl-C to stop)")
            await watcher
        except ControlError as exc:
            _say(str(exc))
            return RUN_FAILED
        finally:
            watcher.cancel()
        seen = await _synced_changes(path, start)


async def _synced_changes(path: Path, start: Path) -> int:
    """How many changes the session has synced, as of its last in-sync report (0: none)."""
    reply = await request(path, {"v": 1, "op": "status"}, 10, tree=start)
    value = reply.get("in_sync_changes")
    return value if isinstance(value, int) else 0


async def _wait_newer(path: Path, start: Path, seen: int, event: asyncio.Event) -> None:
    while await _synced_changes(path, start) <= seen:
        await asyncio.sleep(WATCH_POLL)  # the session has no change feed: look again
    event.set()


def _size() -> tuple[int, int]:
    """The terminal's (columns, rows); 80x24 where it does not say (not a terminal, or a
    pty whose size was never set: 0x0, which the session would refuse)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24
