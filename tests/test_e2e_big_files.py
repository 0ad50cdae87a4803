"""End to end over a real sshd: big files edited after they were synced (issue 8, symptoms 7, 9).

lsync runs through the byte-counting proxy (`counting_link`) in front of the private sshd on
127.0.0.1. Each test waits for lsync's `in-sync as-of=<N>` log line (N at or after the moment
the edit was done: every local change made before N is acknowledged) and then, without
polling, requires the remote file to equal the local one.

- Half of a synced 40 MiB file of incompressible bytes is rewritten: the delta is bigger than
  a protocol frame, and lsync must split it or send the file whole in chunks — not die.
- A synced 10 MB text file is rewritten in place with a one-line change, five times, by a
  writer that pauses between the truncate and the write (Python's `open(path, "w")`, then
  one `write` of the whole str, as an editor that encodes a big buffer does). Each edit must
  cost < 16 KB client -> server up to the in-sync line (a delta, not the file), and a
  sampler reading the remote file all along must never see an empty or partial version.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import (
    ContentSampler,
    CountingLink,
    LsyncProcess,
    c_like_text,
    digest,
    fresh_dirs,
    wait_steady,
)

Start = Callable[..., LsyncProcess]

MIB = 1024 * 1024
HALF_EDIT_WAIT = 60.0  # seconds: a 20 MiB change of a 40 MiB file on 127.0.0.1
EDIT_WAIT = 10.0  # seconds: a one-line change of a 10 MB file
TEXT_SIZE = 10 * 1000 * 1000
EDITS = 5
EDIT_BUDGET = 16 * 1024  # bytes client -> server per one-line edit, SSH framing included
WRITER_PAUSE = 0.2  # seconds between the truncate and the write (a slow writer's encode)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def assert_same_file(local: Path, remote: Path, when: str) -> None:
    """The remote file has the local file's content right now (no waiting)."""
    want = local.read_bytes()
    try:
        have = remote.read_bytes()
    except FileNotFoundError:
        raise AssertionError(f"{when}: {remote.name} is not on the remote at all") from None
    assert len(have) == len(want) and _digest(have) == _digest(want), (
        f"{when}: the remote {remote.name} ({len(have)} B) is not the local one ({len(want)} B)")


def test_editing_half_of_a_synced_40_mib_file_keeps_lsync_running_and_syncs_it(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    rng = random.Random(40)
    path = local / "disk.img"
    path.write_bytes(rng.randbytes(40 * MIB))
    lsync = run_lsync(*counting_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ", timeout=60)
    assert_same_file(path, remote / "disk.img", "at ' ready '")
    with open(path, "r+b") as handle:  # 20 MiB in the middle, in place
        handle.seek(10 * MIB)
        handle.write(rng.randbytes(20 * MIB))
    edited_ns = time.time_ns()
    lsync.wait_in_sync(edited_ns, HALF_EDIT_WAIT)
    assert lsync.proc.poll() is None, f"lsync exited {lsync.proc.returncode}: {lsync.stderr}"
    assert_same_file(path, remote / "disk.img", "after half of it was rewritten")
    assert lsync.interrupt() == 0, lsync.stderr


def test_one_line_edits_of_a_10_mb_file_rewritten_in_place_with_a_pause_send_deltas(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    rng = random.Random(10)
    path = local / "big.c"
    versions = [c_like_text(rng, TEXT_SIZE).decode()]
    path.write_text(versions[0])
    lsync = run_lsync(*counting_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ", timeout=60)
    assert_same_file(path, remote / "big.c", "at ' ready '")
    for i in range(1, EDITS + 1):  # each edit changes one line, at another place
        lines = versions[-1].splitlines(keepends=True)
        lines[len(lines) * i // (EDITS + 1)] = f"\tpr_info(\"edit {i}: %d\\n\", err);\n"
        versions.append("".join(lines))
    sent: list[int] = []
    with ContentSampler([remote / "big.c"]) as sampler:
        for version in versions[1:]:
            wait_steady(counting_link.bytes_up)  # nothing left from the previous step
            counting_link.proxy.reset_counters()
            with open(path, "w") as handle:  # truncates
                handle.flush()
                time.sleep(WRITER_PAUSE)  # the writer is busy: the file stays empty meanwhile
                handle.write(version)
            edited_ns = time.time_ns()
            lsync.wait_in_sync(edited_ns, EDIT_WAIT)
            sent.append(counting_link.bytes_up())
            assert_same_file(path, remote / "big.c", f"edit {len(sent)} (bytes up {sent})")
    assert sampler.samples > 0
    wrong = sampler.unexpected(remote / "big.c", [v.encode() for v in versions])
    assert not wrong, (f"the remote big.c held {len(wrong)} version(s) no save had (the empty "
                       f"file among them: {digest(b'') in wrong}); bytes up per edit: {sent}")
    assert max(sent) < EDIT_BUDGET, f"bytes client -> server per one-line edit: {sent}"
    assert lsync.interrupt() == 0, lsync.stderr
