"""The agent's batch writes alone, in one thread: CPU per 1,000 files, without SSH or client.

    python -m benchmarks.agent_writes [--local TREE] [--trash DIR] [--limit N]

Writes the regular files of a tree (default: the real kernel's cached work tree, its .git
left out) into an empty directory the way the agent's write pool does in an initial sync:
WriteBatches of up to 1 MiB / 1,024 files in walk order (bigger files one per batch, up to
the protocol's chunk limit; bigger ones are left out), each through `write_batch` with the
record's intents and the keeper guard as the service sets them up, then `record_batch` and
the journal's append, as the main thread does. The batches' contents are read before the
clock runs; the thread's own user and system CPU (RUSAGE_THREAD) is taken around the
agent's work only. Prints one JSON line. Run it with the interpreter whose lsync is to be
measured; `--trash` moves the written tree there instead of deleting it (see
benchmarks/agent_cpu.py for why).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import stat
import tempfile
import time
from pathlib import Path

from benchmarks.bench import default_cache_dir
from benchmarks.kernel_material import TAGS
from lsync.agent.confined import ConfinedRoot
from lsync.agent.keeping import Keeper
from lsync.agent.records import DigestRecord
from lsync.agent.writer import record_batch, unpack_chunk, write_batch
from lsync.protocol import hashing, packing
from lsync.protocol import messages as m

BATCH_BYTES = 1 << 20
BATCH_FILES = 1024


def tree_files(root: Path, limit: int) -> list[tuple[str, int, int]]:
    """(path, mode, size) of the regular files below `root` in walk order, .git left out."""
    found: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if dirpath == str(root) and ".git" in dirnames:
            dirnames.remove(".git")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_size <= m.MAX_CHUNK:
                found.append((os.path.relpath(full, root), stat.S_IMODE(st.st_mode),
                              st.st_size))
                if len(found) >= limit:
                    return found
    return found


def batches(files: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    out: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    size = 0
    for item in files:
        if current and (size + item[2] > BATCH_BYTES or len(current) >= BATCH_FILES):
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += item[2]
    if current:
        out.append(current)
    return out


def thread_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_writes",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tree = default_cache_dir() / "trees" / f"kernel-real-{TAGS[0]}"
    parser.add_argument("--local", type=Path, default=default_tree)
    parser.add_argument("--trash", type=Path)
    parser.add_argument("--limit", type=int, default=10 ** 9, help="at most this many files")
    args = parser.parse_args(argv)
    files = tree_files(args.local, args.limit)
    work = Path(tempfile.mkdtemp(prefix="lsync-agentwrites-"))
    remote = work / "remote"
    remote.mkdir()
    hash_name = hashing.choose_hash(hashing.available_hashes()) or "blake2b-128"
    record = DigestRecord(str(work / "agent.json"), hash_name)
    root = ConfinedRoot(str(remote))
    root.guard = Keeper(root.fd, record, lambda: hashing.new_hasher(hash_name))
    record.ready_for_intents(time.time_ns())
    user = system = 0.0
    written = 0
    seq = 0
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        for group in batches(files):
            wire: list[list[object]] = []
            parts = []
            for path, mode, size in group:
                seq += 1
                wire.append([seq, path, mode, size])
                parts.append((args.local / path).read_bytes())
            data = b"".join(parts)
            u0, s0 = thread_cpu()
            content = unpack_chunk("a batch", data, packing.PACK_RAW, b"")
            results = write_batch(root, wire, content, hash_name, set(), record)
            record_batch(record, results)
            record.journal(time.time_ns())
            u1, s1 = thread_cpu()
            user += u1 - u0
            system += s1 - s0
            written += sum(1 for r in results if r[2] is not None)
    finally:
        root.close()
        if args.trash is not None:
            args.trash.mkdir(parents=True, exist_ok=True)
            remote.rename(args.trash / work.name)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "files": len(files), "written": written, "user_s": round(user, 3),
        "system_s": round(system, 3),
        "per_1000_user": round(1000 * user / max(written, 1), 4),
        "per_1000_system": round(1000 * system / max(written, 1), 4),
        "wall_s": round(time.perf_counter() - started, 1), "load_start": load}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
