"""Where a restart's time goes: ``python -m benchmarks.restart_phases [--rtt-ms 300]``.

Syncs a tree (default: the real kernel's cached work tree, see benchmarks/bench.py) into a
fresh remote through the private sshd at RTT 0, then restarts lsync on the unchanged tree
`--restarts` times through the delay proxy at `--rtt-ms`, each time stopping it at its
`ready` line. Each lsync runs under a wrapper (this module with `--traced`) that marks, on
stderr, the moments the start-up path reaches: interpreter up, imports done, the SSH
connection's start and end, the agent's start, its welcome, the manifest's end, the local
scan, the initial comparison, and `ready` (the session's modules are wrapped when the
command imports them, after it has opened its TCP connection early, as `lsync connect`
does). The table gives each mark's median over the restarts after the first, in seconds
from the spawn, and the first restart's (right after the initial sync, as in d); the gaps
between marks say what to work on (SSH round trips, the agent's record and walk, the
client's imports). Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MARK = "PHASE"
ORDER = ("python up", "imports done", "ssh.connect start", "ssh.connect end",
         "agent started", "welcome", "scan end", "manifest", "comparison end", "ready")


def _traced(argv: list[str]) -> None:
    """Run `lsync argv` with the marks (see the module docstring) on stderr, in seconds
    from the spawn (the wall clock the parent passed in LSYNC_PHASE_SPAWN)."""
    t0 = float(os.environ.get("LSYNC_PHASE_SPAWN") or time.time())

    def mark(name: str) -> None:
        sys.stderr.write(f"{MARK} {time.time() - t0:.4f} {name}\n")
        sys.stderr.flush()

    mark("python up")
    from lsync.client import cli

    def wrap(owner: Any, name: str, start: str | None, end: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(owner, name)

        @functools.wraps(original)
        async def traced(*args: Any, **kwargs: Any) -> Any:
            if start is not None:
                mark(start)
            try:
                return await original(*args, **kwargs)
            finally:
                mark(end)
        setattr(owner, name, traced)

    def install() -> None:
        from lsync.client import session
        from lsync.client.remote import engine, remotelisting
        from lsync.client.transport import link, ssh
        mark("imports done")
        wrap(ssh, "connect", "ssh.connect start", "ssh.connect end")
        wrap(ssh, "start_agent", None, "agent started")
        wrap(link.AgentLink, "welcome", None, "welcome")
        wrap(remotelisting, "fetch", None, "manifest")
        wrap(session.Session, "_scan", None, "scan end")
        wrap(engine.SyncEngine, "initial_sync", None, "comparison end")

    # The session's modules are imported where the command imports them (after the early
    # TCP connection starts, lsync.client.transport.preconnect), and wrapped then.
    options = cli._options

    @functools.wraps(options)
    def options_then_wraps(*args: Any, **kwargs: Any) -> Any:
        if "lsync.client.session" not in sys.modules:
            install()
        return options(*args, **kwargs)
    cli._options = options_then_wraps
    sys.argv[0] = "lsync"
    cli.main(argv)


def _restart(python: str, argv: list[str], env: dict[str, str], timeout: float
             ) -> dict[str, float]:
    """One lsync run until its ready line (then Ctrl-C): its marks."""
    spawned = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "benchmarks.restart_phases", "--traced", *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**env, "LSYNC_PHASE_SPAWN": repr(time.time())},
                            start_new_session=True)
    marks: dict[str, float] = {}
    assert proc.stdout is not None
    deadline = spawned + timeout
    for line in proc.stdout:
        if line.startswith(MARK + " "):
            _, seconds, name = line.rstrip("\n").split(" ", 2)
            marks.setdefault(name, float(seconds))
        elif " ready " in line and "ready" not in marks:
            marks["ready"] = time.perf_counter() - spawned
            proc.send_signal(2)
        if time.perf_counter() > deadline:
            proc.kill()
            break
    proc.wait()
    return marks


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--traced"]:
        _traced(args_in[1:])
        return 0
    # (Imported here: the traced lsync above starts with the standard library alone.)
    from benchmarks.bench import default_cache_dir
    from benchmarks.kernel_material import TAGS
    from benchmarks.testbed.proxy import ThreadedProxy
    from benchmarks.testbed.sshd import PrivateSshd

    parser = argparse.ArgumentParser(prog="python -m benchmarks.restart_phases",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tree = default_cache_dir() / "trees" / f"kernel-real-{TAGS[0]}"
    parser.add_argument("--local", type=Path, default=default_tree, help="the tree to sync")
    parser.add_argument("--rtt-ms", type=float, default=300.0)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(args_in)
    if not args.local.is_dir():
        raise SystemExit(f"{args.local} does not exist: run `python -m benchmarks.run "
                         f"--issue16` once, or give --local")
    work = Path(tempfile.mkdtemp(prefix="lsync-restart-"))
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
    sshd = PrivateSshd(work / "sshd")
    sshd.start()
    remote = work / "remote"
    runs: list[dict[str, float]] = []
    first: dict[str, float] = {}
    try:
        def connect(port: int) -> list[str]:
            cfg = sshd.write_client_config(port=port)
            return ["connect", "-F", str(cfg), f"{sshd.alias}:{remote}", "--local",
                    str(args.local)]
        with ThreadedProxy(("127.0.0.1", sshd.port), 0.0) as fast:
            first = _restart(sys.executable, connect(fast.port), env, args.timeout)
            if "ready" not in first:
                raise SystemExit("the initial sync did not reach ready")
        with ThreadedProxy(("127.0.0.1", sshd.port), args.rtt_ms / 2000.0) as slow:
            # The first restart comes right after the initial sync, as in the benchmarks'
            # d: files written less than 2 s before the agent saved its record have digests
            # it does not trust, and the client asks for them again. It has its own column.
            first = _restart(sys.executable, connect(slow.port), env, args.timeout)
            for _ in range(args.restarts):
                runs.append(_restart(sys.executable, connect(slow.port), env, args.timeout))
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"restarts of {args.local} at RTT {args.rtt_ms:g} ms, {len(runs)} runs; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| mark | median s from spawn | min | max | first restart |")
    print("|---|---|---|---|---|")
    for name in ORDER:
        seen = [run[name] for run in runs if name in run]
        if seen:
            once = f"{first[name]:.2f}" if name in first else "—"
            print(f"| {name} | {statistics.median(seen):.2f} | {min(seen):.2f} | "
                  f"{max(seen):.2f} | {once} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
