"""The agent's CPU per file in an initial sync, code A against code B, alternated.

    python -m benchmarks.agent_cpu --python A=/path/to/venv-a/bin/python \\
        --python B=.venv/bin/python --rounds 2 --trash /tmp/lsync-trash

Each variant is an interpreter in whose environment lsync is installed (an editable install
of the code to measure: the client bundles the agent from there). Per round, every variant
runs one initial sync of a tree (default: the real kernel's cached work tree) into an empty
remote through the private sshd and the delay proxy (RTT 0 unless `--rtt-ms`), without a
sampler, in the order given (A B A B ...). At lsync's "ready" line the client's and the
agent's user and system CPU seconds are read from /proc, and the remote is counted (every
file there, sizes summed) against the tree. One JSON line per run goes to stdout and to
`--out`, then a table per variant.

`--trash DIR` moves each remote there instead of deleting it: deleting 78,667 files makes
ext4 pass over the freed inodes for a while, and the next run's agent pays for it in system
time (see benchmarks/README.md, "CPU per file: the steps").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import procstat
from benchmarks.bench import agent_record_files, default_cache_dir
from benchmarks.bench_trees import count_tree
from benchmarks.kernel_material import TAGS
from benchmarks.lsync_runner import LsyncWatcher
from benchmarks.peers import Link
from benchmarks.profile_sync import _agent_interpreter
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd

HERE = Path(__file__).resolve().parent.parent


def _perf(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """`perf record` of process `pid` (all its threads, kernel stacks included)."""
    exe = shutil.which("perf")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "-F", "499", "-g", "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_run(local: Path, rtt_ms: float, trash: Path | None,
            perf: Path | None = None) -> dict[str, object]:
    """One initial sync with this interpreter's lsync: CPU at "ready" and the remote's count
    (with `perf`, the agent recorded by `perf record` into that file)."""
    tree = count_tree(local, "measured", 0.0)
    work = Path(tempfile.mkdtemp(prefix="lsync-agentcpu-"))
    sshd = PrivateSshd(work / "sshd")
    sshd.start()
    remote = work / "remote"
    remote.mkdir()
    load = os.getloadavg()[0]
    result: dict[str, object] = {"files": tree.files, "load_start": load}
    try:
        with ThreadedProxy(("127.0.0.1", sshd.port), rtt_ms / 2000.0) as proxy:
            cfg = sshd.write_client_config(port=proxy.port)
            w = LsyncWatcher(local, Link(cfg, sshd.alias, remote), work / "lsync",
                             verbose=False, cache_home=work / "cache")
            w.spawn()
            assert sshd.pid is not None
            recorder = None
            if perf is not None:
                agent = None
                deadline = time.monotonic() + 60
                while agent is None and time.monotonic() < deadline and not w.is_ready():
                    agent = _agent_interpreter(sshd.pid)
                    time.sleep(0.005)
                if agent is not None:
                    recorder = _perf(agent, perf)
            w.wait_ready(timeout=1800)
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=120)
            assert w.pid is not None
            agent = _agent_interpreter(sshd.pid)
            result["client"] = procstat.cpu_split(w.pid)
            if agent is not None:
                result["agent"] = procstat.cpu_split(agent)
            result["ready_s"] = w.startup_seconds
            result["load_end"] = os.getloadavg()[0]
            w.stop()
        got = count_tree(remote, "remote", 0.0)
        result["remote_files"] = got.files
        result["remote_bytes"] = got.bytes
        result["tree_bytes"] = tree.bytes
    finally:
        sshd.stop()
        if trash is not None:
            trash.mkdir(parents=True, exist_ok=True)
            remote.rename(trash / work.name)
        for record in agent_record_files(remote):
            record.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return result


def per_thousand(run: dict[str, object], side: str) -> tuple[float, float]:
    pair = run[side]
    assert isinstance(pair, (list, tuple))
    files = run["files"]
    assert isinstance(files, int)
    return 1000 * float(pair[0]) / files, 1000 * float(pair[1]) / files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tree = default_cache_dir() / "trees" / f"kernel-real-{TAGS[0]}"
    parser.add_argument("--local", type=Path, default=default_tree, help="the tree to sync")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--python", action="append", default=[], metavar="NAME=PYTHON",
                        help="a variant: its name and an interpreter with its lsync")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trash", type=Path, help="move each remote here (see above)")
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    parser.add_argument("--perf", type=Path, help="record the agent with `perf record -g` "
                        "into DIR/<variant>-<round>.data (perf's own cost is counted too)")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.local.is_dir():
        raise SystemExit(f"{args.local} does not exist: run `python -m benchmarks.run "
                         f"--issue16` once, or give --local")
    if args.once:
        print(json.dumps(one_run(args.local, args.rtt_ms, args.trash, args.perf)))
        return 0
    variants = [spec.split("=", 1) for spec in args.python]
    if not variants or any(len(v) != 2 for v in variants):
        raise SystemExit("give at least one --python NAME=PYTHON")
    runs: dict[str, list[dict[str, object]]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, python in variants:
            argv_once = [python, "-m", "benchmarks.agent_cpu", "--once", "--local",
                         str(args.local), "--rtt-ms", str(args.rtt_ms)]
            if args.trash is not None:
                argv_once += ["--trash", str(args.trash)]
            if args.perf is not None:
                args.perf.mkdir(parents=True, exist_ok=True)
                argv_once += ["--perf", str(args.perf / f"{name}-{round_ + 1}.data")]
            started = time.strftime("%H:%M:%S", time.gmtime())
            proc = subprocess.run(argv_once, cwd=HERE, capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                print(f"{name} round {round_ + 1} failed:\n{proc.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run.update(variant=name, round=round_ + 1, started_utc=started)
            runs[name].append(run)
            line = json.dumps(run)
            print(line, flush=True)
            if args.out is not None:
                with open(args.out, "a") as out:
                    out.write(line + "\n")
    print("\n| variant | run | agent user / 1,000 | agent system / 1,000 | agent total "
          "/ 1,000 | client total / 1,000 | ready s | load | remote complete |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, done in runs.items():
        totals = []
        for run in done:
            au, asys = per_thousand(run, "agent")
            cu, csys = per_thousand(run, "client")
            totals.append(au + asys)
            complete = (run["remote_files"] == run["files"]
                        and run["remote_bytes"] == run["tree_bytes"])
            print(f"| {name} | {run['round']} ({run['started_utc']}) | {au:.3f} | {asys:.3f} | "
                  f"{au + asys:.3f} | {cu + csys:.3f} | {float(run['ready_s']):.1f} | "  # type: ignore[arg-type]
                  f"{float(run['load_start']):.1f}-{float(run['load_end']):.1f} | "  # type: ignore[arg-type]
                  f"{'yes' if complete else 'NO'} |")
        if totals:
            print(f"| {name} | median | | | {statistics.median(totals):.3f} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
