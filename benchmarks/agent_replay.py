"""The agent alone on an initial sync's stream: its CPU per 1,000 files, without SSH or client.

    python -m benchmarks.agent_replay --python A=/path/to/venv-a/bin/python \\
        --python B=.venv/bin/python --rounds 2 --trash /tmp/lsync-trash

The client's side of an initial sync of a tree (default: the real kernel's cached work
tree, its .git left out) is encoded once into `--stream` (about the tree's size): a Hello,
a Mkdir per directory before what it holds, the files of up to 256 KiB in WriteBatches of up
to 1 MiB / 1,024 files, bigger ones in WriteFiles of 4 MiB pieces, a Symlink per link, all
raw (the packing of a short link that keeps up; see client/remote/sender.py and
client/transport/outbox.py),
and a Goodbye. Each run starts the agent of a variant (`python -c` its
lsync.agent.main.serve, the record in ~/.cache/lsync as usual) with that stream arriving on
its stdin through a pipe (`cat`, so reads come in pipe-sized pieces as from sshd), its
answers to /dev/null, into an empty directory; the agent's user and system CPU come from
its rusage once it exits. The written tree is then counted against the source (every
file, sizes summed). Variants alternate, A B A B ...; `--trash DIR` moves each written
tree there instead of deleting it (see benchmarks/agent_cpu.py for why).

What it leaves out: the answers' flow control (the agent never waits for the client),
the data lanes (everything comes on stdin) and compression (raw only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bench import agent_record_files, default_cache_dir
from benchmarks.bench_trees import count_tree
from benchmarks.kernel_material import TAGS
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from lsync.protocol.connection import CLIENT, Connection

BATCH_BYTES = 1 << 20
BATCH_FILES = 1024
BATCH_FILE_MAX = 256 << 10
CHUNK = 4 << 20
AGENT = "import sys; from lsync.agent.main import serve; sys.exit(serve())"
ROOT = Path(tempfile.gettempdir()) / "lsync-replay-root"  # the stream's root, one run at a time


def messages(tree: Path, root: str) -> Iterator[m.Message]:
    """The client's messages of an initial sync of `tree` into `root`."""
    # blake2b only: the remote's python3 has no xxhash (the standard library only).
    yield m.Hello(PROTOCOL_VERSION, {"hash": ["blake2b-128"], "compression": ["zlib"]}, root,
                  {"create_root": True})
    seq = 0
    files: list[list[object]] = []
    contents: list[bytes] = []
    size = 0

    def batch() -> m.WriteBatch:
        return m.WriteBatch(list(files), b"".join(contents), 0)

    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        if dirpath == str(tree) and ".git" in dirnames:
            dirnames.remove(".git")
        rel_dir = os.path.relpath(dirpath, tree)
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else rel_dir + "/" + name
            if os.path.islink(full):
                dirnames.remove(name)
                seq += 1
                yield m.Symlink(seq, rel, os.readlink(full))
            else:
                seq += 1
                yield m.Mkdir(seq, rel, stat.S_IMODE(os.lstat(full).st_mode))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else rel_dir + "/" + name
            st = os.lstat(full)
            seq += 1
            if stat.S_ISLNK(st.st_mode):
                yield m.Symlink(seq, rel, os.readlink(full))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            data = Path(full).read_bytes()
            mode = stat.S_IMODE(st.st_mode)
            if len(data) > BATCH_FILE_MAX:
                pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
                for index, piece in enumerate(pieces):
                    yield m.WriteFile(seq, rel, mode, index * CHUNK, piece,
                                      index == len(pieces) - 1, 0)
                continue
            if files and (size + len(data) > BATCH_BYTES or len(files) >= BATCH_FILES):
                yield batch()
                files, contents, size = [], [], 0
            files.append([seq, rel, mode, len(data)])
            contents.append(data)
            size += len(data)
    if files:
        yield batch()
    yield m.Goodbye(0, "done")


def write_stream(tree: Path, root: Path, out: Path) -> None:
    """Encode the stream of an initial sync of `tree` into `root` into `out`."""
    conn = Connection(CLIENT)
    with open(out, "wb") as handle:
        for message in messages(tree, str(root)):
            conn.send(message)
            handle.write(conn.data_to_send())


def run_agent(python: str, stream: Path) -> dict[str, object]:
    """One agent run on the stream: its rusage and exit status."""
    read_end, write_end = os.pipe()
    feeder = subprocess.Popen(["cat", str(stream)], stdout=write_end)
    os.close(write_end)
    # msgpack's pure-Python modules, as the bundle the client sends to a remote has them.
    agent = subprocess.Popen([python, "-c", AGENT], stdin=read_end,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             cwd=tempfile.gettempdir(),
                             env=dict(os.environ, MSGPACK_PUREPYTHON="1"))
    os.close(read_end)
    started = time.perf_counter()
    assert agent.stderr is not None
    err = agent.stderr.read().decode(errors="replace")  # until the agent exits
    _, status, usage = os.wait4(agent.pid, 0)
    wall = time.perf_counter() - started
    agent.returncode = os.waitstatus_to_exitcode(status)
    feeder.wait()
    return {"user": usage.ru_utime, "system": usage.ru_stime, "wall_s": wall,
            "exit": agent.returncode, "stderr": err[-500:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_replay",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tree = default_cache_dir() / "trees" / f"kernel-real-{TAGS[0]}"
    parser.add_argument("--local", type=Path, default=default_tree, help="the tree")
    parser.add_argument("--stream", type=Path,
                        default=Path(tempfile.gettempdir()) / "lsync-replay-stream.bin",
                        help="the encoded stream (made once, reused while it exists)")
    parser.add_argument("--python", action="append", default=[], metavar="NAME=PYTHON",
                        help="a variant: its name and an interpreter with its lsync")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trash", type=Path, help="move each written tree here")
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = parser.parse_args(argv)
    variants = [spec.split("=", 1) for spec in args.python]
    variants = [[v[0], os.path.abspath(v[1])] if len(v) == 2 else v for v in variants]
    if not variants or any(len(v) != 2 for v in variants):
        raise SystemExit("give at least one --python NAME=PYTHON")
    tree = count_tree(args.local, "replayed", 0.0)
    if not args.stream.exists():
        write_stream(args.local, ROOT, args.stream)
    runs: dict[str, list[dict[str, object]]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, python in variants:
            if ROOT.exists():
                raise SystemExit(f"{ROOT} exists: another replay runs, or move it away")
            load = os.getloadavg()[0]
            started = time.strftime("%H:%M:%S", time.gmtime())
            try:
                run = run_agent(python, args.stream)
                got = count_tree(ROOT, "remote", 0.0)
                run.update(variant=name, round=round_ + 1, started_utc=started,
                           files=tree.files, load_start=load, load_end=os.getloadavg()[0],
                           complete=got.files == tree.files and got.bytes == tree.bytes)
            finally:
                if args.trash is not None and ROOT.exists():
                    args.trash.mkdir(parents=True, exist_ok=True)
                    ROOT.rename(Path(tempfile.mkdtemp(prefix="replay-", dir=args.trash))
                                / "remote")
                shutil.rmtree(ROOT, ignore_errors=True)
                for record in agent_record_files(ROOT):
                    record.unlink(missing_ok=True)
            runs[name].append(run)
            line = json.dumps(run)
            print(line, flush=True)
            if args.out is not None:
                with open(args.out, "a") as out:
                    out.write(line + "\n")
    print("\n| variant | run | agent user / 1,000 | agent system / 1,000 | agent total / 1,000 "
          "| wall s | load | complete |")
    print("|---|---|---|---|---|---|---|---|")
    for name, done in runs.items():
        totals = []
        for run in done:
            user = 1000 * float(run["user"]) / tree.files  # type: ignore[arg-type]
            system = 1000 * float(run["system"]) / tree.files  # type: ignore[arg-type]
            totals.append(user + system)
            print(f"| {name} | {run['round']} ({run['started_utc']}) | {user:.3f} | "
                  f"{system:.3f} | {user + system:.3f} | {float(run['wall_s']):.1f} | "  # type: ignore[arg-type]
                  f"{float(run['load_start']):.1f}-{float(run['load_end']):.1f} | "  # type: ignore[arg-type]
                  f"{'yes' if run['complete'] else 'NO'} |")
        if totals:
            print(f"| {name} | median | | | {statistics.median(totals):.3f} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
