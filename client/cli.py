"""The `lsync` command line.

    lsync connect [[user@]host:tree]   keep `tree` on `host` in sync with this directory
    lsync connect box1:tree box2:tree  the same on several hosts from one watcher and scan
    lsync connect /some/dir            the same against a local directory (no SSH)
    lsync flush [--timeout S]          wait until every change made so far is on the remote
                                       (every target; --target NAME: that one)
    lsync run [options] -- CMD ARGS    flush, then run CMD in the remote tree (the first
                                       target; --on NAME, or --all in parallel)
    lsync status [--json]              the running session's state
    lsync pull [PATTERN...]            bring remote files back (the [pull] paths by default;
                                       from the first target, or --on NAME)
    lsync pull --kept PATH             bring back a remote edit lsync kept aside, for a merge

`connect` reads `.lsync.toml` at the root of the tree (see `lsync.client.project`); an
option on the command line overrides the file. Errors are printed as one line and map to
exit statuses (see `lsync.client.errors` and `lsync.client.buildloop.commands`); Ctrl-C drains
in-flight writes and exits 0. This module is the last exception boundary: anything
unexpected becomes an `InternalError` line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsync.agent.lanes import MAX_LANES
from lsync.client.buildloop import commands
from lsync.client.buildloop.controlpath import find_socket
from lsync.client.errors import LsyncError, internal_error
from lsync.client.local.watcher import DEFAULT_DEBOUNCE_MS, DEFAULT_STEP_MS
from lsync.client.project import (
    DEFAULT_LANES,
    ConnectSettings,
    find_project,
    load_project,
    merge,
)
from lsync.client.status import NORMAL, QUIET, VERBOSE, make_status, terminal_safe
from lsync.client.transport import preconnect

if TYPE_CHECKING:
    from lsync.client.fleet import Fleet
    from lsync.client.session import Options
    from lsync.client.target import Target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsync", description="Low-latency continuous one-way sync over one SSH connection.")
    commands_ = parser.add_subparsers(dest="command", required=True)
    connect = commands_.add_parser(
        "connect", help="sync this tree to [user@]host:tree (or a local directory) until stopped")
    connect.add_argument("target", nargs="*", default=None,
                         help="[user@]host:tree, or a local directory path; several for "
                              "several build hosts (default: the `target` of .lsync.toml)")
    _tree_option(connect)
    connect.add_argument("-F", dest="ssh_config", metavar="FILE", action="append", default=None,
                         help="SSH client config file (default ~/.ssh/config)")
    connect.add_argument("--delete", action="store_true", default=None,
                         help="also delete remote files that do not exist locally")
    connect.add_argument("--exclude", metavar="PATTERN", action="append", default=None,
                         help="ignore paths matching PATTERN (gitignore syntax); repeatable")
    connect.add_argument("--include-vcs", action="store_true", default=None,
                         help="sync the .git directory too (excluded by default)")
    connect.add_argument("--accept-new-host-key", action="store_true", default=None,
                         help="trust and record an unknown host key (never a changed one)")
    connect.add_argument("--step-ms", type=int, default=None,
                         help=f"watcher quiet period before a batch (default {DEFAULT_STEP_MS})")
    connect.add_argument("--debounce-ms", type=int, default=None,
                         help=f"longest a batch collects (default {DEFAULT_DEBOUNCE_MS})")
    connect.add_argument("--lanes", type=int, default=None, metavar="N",
                         choices=range(0, MAX_LANES + 1),
                         help=f"extra SSH channels for data, 0 to {MAX_LANES} (default "
                              f"{DEFAULT_LANES}: one for single saves, the rest for bulk)")
    connect.add_argument("--no-reconnect", action="store_true", default=None,
                         help="exit when the connection breaks instead of reconnecting")
    level = connect.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    level.add_argument("-v", "--verbose", action="store_true", help="print every write")

    flush = commands_.add_parser(
        "flush", help="return once every change made so far is acknowledged by the remote")
    _tree_option(flush)
    flush.add_argument("--timeout", type=float, default=None, metavar="S",
                       help="give up after S seconds (exit 1, printing what is pending)")
    flush.add_argument("--target", default=None, metavar="NAME",
                       help="wait for this target only (default: every target)")

    run = commands_.add_parser(
        "run", help="flush, then run a command in the remote tree over the same connection")
    _tree_option(run)
    run.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="give up if the flush before the command takes more than S seconds")
    run.add_argument("--no-map-paths", action="store_true", default=None,
                     help="do not rewrite remote paths in the output to local ones")
    run.add_argument("--watch", action="store_true",
                     help="run again after each batch of changes lands (a stale run is "
                          "interrupted)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--on", default=None, metavar="NAME",
                       help="run on this target (default: the first)")
    where.add_argument("--all", action="store_true",
                       help="run on every target in parallel, output lines prefixed with "
                            "its name; the exit status is the worst")
    run.add_argument("--connect", action="store_true",
                     help="without a running session for this tree: sync it once (target "
                          "from .lsync.toml), run the command, and stop")
    run.add_argument("--pull", action=argparse.BooleanOptionalAction, default=None,
                     help="after the command, pull what the [pull] paths of .lsync.toml "
                          "select and it changed (default: [pull] after_run, when paths "
                          "are set)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="the command to run remotely")

    pull = commands_.add_parser(
        "pull", help="bring remote files back into the local tree over the session's link")
    _tree_option(pull)
    pull.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="give up if the link is not up within S seconds")
    pull.add_argument("--kept", action="append", default=[], metavar="PATH",
                      help="bring back the newest remote edit of PATH (relative to the tree) "
                           "that lsync kept aside, as PATH.lsync-remote-N beside it "
                           "(repeatable; `lsync status` lists them)")
    pull.add_argument("--on", default=None, metavar="NAME",
                      help="pull from this target (default: the first)")
    pull.add_argument("patterns", nargs="*", metavar="PATTERN",
                      help="gitignore patterns relative to the tree (default: the [pull] "
                           "paths of .lsync.toml)")

    status = commands_.add_parser("status", help="show the running session's state")
    _tree_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _tree_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", metavar="DIR", default=None,
                        help="the local tree (default: the tree of the current directory)")


def _connect_options(args: argparse.Namespace) -> tuple[list[Options], int]:
    """One session's options per target (names made unique), and the verbosity."""
    # (The session and SSH are imported here only: flush, run and status start faster.)
    from lsync.client.target import Target, target_name, unique_names

    start = Path(args.local or os.getcwd()).expanduser()
    found = find_project(start)
    project = load_project(found) if found is not None else None
    settings = merge(project, args)
    verbosity = {"quiet": QUIET, "normal": NORMAL, "verbose": VERBOSE}[settings.log]
    targets = [(Target.parse(text), name) for text, name in settings.targets]
    for target, _ in targets:  # their TCP connections open while the session code imports
        if target.host is not None:
            preconnect.start(target.host, settings.ssh_config)
    names = unique_names([name or target_name(target) for target, name in targets])
    return [_options(settings, target, name)
            for (target, _), name in zip(targets, names, strict=True)], verbosity


def _options(settings: ConnectSettings, target: Target, name: str) -> Options:
    from lsync.client.session import Options

    return Options(
        target=target,
        name=name,
        local_root=settings.local_root,
        ssh_config=settings.ssh_config,
        delete=settings.delete,
        excludes=settings.exclude,
        include_vcs=settings.include_vcs,
        accept_new_host_key=settings.accept_new_host_key,
        step_ms=settings.step_ms,
        debounce_ms=settings.debounce_ms,
        reconnect=settings.reconnect,
        lanes=settings.lanes,
        pull_paths=list(settings.pull_paths),
        pull_rewrite=list(settings.pull_rewrite),
    )


def _run_map_paths(args: argparse.Namespace, start: Path) -> bool:
    found = find_project(start)
    project = load_project(found) if found is not None else None
    return not args.no_map_paths and (project is None or project.map_paths)


def _run_pull(args: argparse.Namespace, start: Path) -> bool:
    """Whether `lsync run` pulls afterwards: --pull/--no-pull, else the project's
    [pull] after_run when it sets paths."""
    if args.pull is not None:
        return bool(args.pull)
    found = find_project(start)
    project = load_project(found) if found is not None else None
    return project is not None and project.pull_after_run and bool(project.pull_paths)


GC_YOUNG = 20_000  # net new container objects between two young collections (Python's: 700)
GC_OLDER = (20, 100)  # young collections per middle one, middle ones per full one


def collect_garbage_seldom() -> None:
    """The garbage collector's policy of a session's process (once its code is imported).

    A session holds one object per path (scan entries, remote models, queue records: about
    a million objects for the Linux kernel) and allocates a few dozen more per file it
    sends. With Python's thresholds, the collector ran about 1,200 times during the
    kernel's initial sync, the full collections traversing all of it while holding the
    interpreter lock: 0.8 s of CPU, and every thread stopped meanwhile. Now the objects
    made by the imports are frozen (never traversed again: they live as long as the
    process), and a young collection waits for GC_YOUNG new objects: about 100
    collections, 0.15 s, in that sync. Cycles of garbage still go, a little later: the
    client's peak memory (f, 195 MB) was measured with this policy."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *GC_OLDER)


SWITCH_INTERVAL = 0.0002  # seconds a thread waits for the interpreter lock before asking


def switch_threads_often() -> None:
    """The interpreter lock's switch interval in a session's process: 0.2 ms (Python's:
    5 ms). The event loop's thread runs Python between short system calls; the reader
    threads need the lock about eight times per file they read ahead, once after each
    system call. With 5 ms, a reader that asked for the lock while the loop ran Python
    could wait up to that long, the loop then waited for the files read ahead (6.4 s of
    the kernel's initial sync at RTT 300), and a save's pass for the loop. Measured on
    that sync, in alternated runs: ready 0.4-0.6 s sooner, 0.2 s more CPU; at 0.05 ms,
    2 s more CPU."""
    sys.setswitchinterval(SWITCH_INTERVAL)


def _guarded(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except (LsyncError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the last boundary: a bug, in one line, never a traceback
        raise internal_error("running the command", exc) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    status = None
    try:
        if args.command == "connect":
            options, verbosity = _connect_options(args)
            status = make_status(verbosity)
            from lsync.client.fleet import Fleet

            collect_garbage_seldom()
            switch_threads_often()
            fleet = Fleet(options, status)
            _guarded(_session(fleet))
            code = 0
        else:
            start = Path(args.local or os.getcwd()).expanduser().absolute()
            if args.command == "flush":
                code = _guarded(commands.flush(start, args.timeout, args.target))
            elif args.command == "status":
                code = _guarded(commands.status(start, args.json))
            elif args.command == "pull":
                code = _guarded(commands.pull(start, list(args.patterns), args.timeout,
                                              list(args.kept), args.on))
            else:
                argv_ = list(args.argv)
                if argv_[:1] == ["--"]:
                    argv_ = argv_[1:]
                if not argv_:
                    print("lsync: run needs a command: lsync run -- CMD ARGS", file=sys.stderr)
                    sys.exit(2)
                map_paths = _run_map_paths(args, start)
                pull = _run_pull(args, start)
                if args.connect and find_socket(start) is None:
                    options, _ = _connect_options(argparse.Namespace(local=args.local))
                    collect_garbage_seldom()
                    switch_threads_often()
                    code = _guarded(_run_connected(options, start, argv_, map_paths, pull,
                                                   args.on, args.all))
                else:
                    code = _guarded(commands.run(start, argv_, args.timeout, map_paths,
                                                 args.watch, pull, args.on, args.all))
    except LsyncError as exc:
        if status is not None:
            status.close()
        print(f"lsync: {terminal_safe(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        if status is not None:
            status.close()
        sys.exit(130)
    finally:
        preconnect.close_all()  # an early connection no session took (lsync failed first)
    if status is not None:
        status.close()
    sys.exit(code)


async def _run_connected(options: list[Options], start: Path, argv: list[str],
                         map_paths: bool, pull: bool = False, on: str | None = None,
                         on_all: bool = False) -> int:
    """`lsync run --connect`: a session of our own (no control socket), the command once
    the initial sync is acknowledged (by every target), then a clean stop."""
    from lsync.client.buildloop.control import RunRequest, decode_output
    from lsync.client.fleet import Fleet

    status = make_status(QUIET, sys.stderr)  # errors only: stdout is the command's
    fleet = Fleet(options, status, control=False)
    running = asyncio.ensure_future(fleet.run())
    try:
        for session in fleet.sessions:
            while not session.engine_ready:
                if running.done():
                    running.result()  # raises what stopped the session
                    return commands.RUN_FAILED
                session.engine_changed.clear()
                changed = asyncio.ensure_future(session.engine_changed.wait())
                await asyncio.wait({changed, running}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()

        async def send_line(line: dict[str, object]) -> None:
            output = decode_output(line)
            if "note" in line:
                print(f"lsync: {terminal_safe(str(line['note']))}", file=sys.stderr)
            if output is not None:
                out = sys.stdout if output[0] == "out" else sys.stderr
                out.buffer.write(output[1])
                out.buffer.flush()

        async def nothing() -> AsyncIterator[Any]:
            return
            yield

        request = RunRequest(tuple(argv), map_paths=map_paths, cwd=str(start.resolve()),
                             pull=pull, on=on, all=on_all)
        return await fleet.loop.run(request, send_line, nothing())
    finally:
        fleet.stop.set()
        with contextlib.suppress(LsyncError):
            await running
        status.close()


async def _session(fleet: Fleet) -> int:
    await fleet.run()
    return 0


if __name__ == "__main__":
    main()
