"""End to end over a real sshd: a dropped link, and remote files changed behind lsync's back.

Dropped link: lsync runs through a proxy in front of the private sshd; `cut()` resets the
connection (with writes in flight, or idle), edits are made while it is down, and lsync must
reconnect by itself (its log says so), resync, and say ` ready ` again: right then the remote
tree equals the local one (compared once) — nothing lost, nothing torn, no temporary file
left behind. After a later edit, the trees are compared once lsync's `in-sync as-of=N` line
covers the moment of the edit.

Base mismatch (issue 3): a synced file is changed on the remote (same size, other size,
same size with the mtime put back, replaced by another inode, removed) and then edited
locally, so lsync sends a delta against a base the remote no longer has. The agent must
refuse it (base mismatch, or a result whose hash is wrong), write nothing, and the client
must fall back to the whole file: once lsync says it is in sync as of the edit, the remote is
byte-identical to the local file, and a sampler reading the remote file all along never sees
a version built from the wrong base. Each case uses its own directory (`own_dir`) of the
module's shared `lsync connect`, so that it runs alone or in any order.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import (
    ContentSampler,
    CountingLink,
    LsyncProcess,
    Synced,
    assert_same_now,
    fresh_dirs,
    save_atomically,
    wait_until,
)

Start = Callable[..., LsyncProcess]


def _populate(local: Path, rng: random.Random) -> None:
    for directory in ("src", "docs", "include/linux"):
        (local / directory).mkdir(parents=True)
    for i in range(20):
        (local / "src" / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i}; }}\n" * 50)
    (local / "docs" / "README").write_text("docs\n")
    (local / "include" / "linux" / "types.h").write_text("typedef int s32;\n")
    (local / "big.bin").write_bytes(rng.randbytes(2 << 20))


# -- dropped link -----------------------------------------------------------------------------


def test_dropped_link_reconnects_by_itself_and_syncs_edits_made_while_down(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    rng = random.Random(1)
    _populate(local, rng)
    lsync = run_lsync(*counting_link.connect_args(remote, "-v"), cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    proxy = counting_link.proxy
    proxy.set_accepting(False)
    assert proxy.cut() >= 1
    lsync.wait_for_line("reconnecting in")
    # Edits of every kind while the link is down.
    (local / "src" / "f0.c").write_text("int f0(void) { return 100; }\n")
    (local / "src" / "new.c").write_text("/* new while down */\n")
    (local / "src" / "f1.c").unlink()
    (local / "docs").rename(local / "doc")
    (local / "big.bin").write_bytes(rng.randbytes(3 << 20))
    (local / "empty").mkdir()
    (local / "link").symlink_to("src/f2.c")
    os.chmod(local / "src" / "f3.c", 0o755)
    # The first attempt to reconnect is refused too; lsync keeps trying.
    lsync.wait_for_count("reconnecting in", 2)
    assert not (remote / "src" / "new.c").exists()
    proxy.set_accepting(True)
    lsync.wait_for_count(" ready ", 2, timeout=40)
    assert_same_now(local, remote, lsync=lsync)
    (local / "src" / "after.c").write_text("/* after the reconnection */\n")
    lsync.wait_in_sync(time.time_ns())
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0, lsync.stderr


def test_local_tree_emptied_while_the_link_is_down_stops_without_deleting_remotely(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    for i in range(20):
        (local / f"f{i}.c").write_text(f"{i}\n")
    lsync = run_lsync(*counting_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    counting_link.proxy.set_accepting(False)
    assert counting_link.proxy.cut() >= 1
    lsync.wait_for_line("reconnecting in")
    for child in local.iterdir():
        child.unlink()
    counting_link.proxy.set_accepting(True)
    status = lsync.finish(timeout=40)
    assert status == 6, (status, lsync.stderr)
    assert "suddenly empty" in lsync.stderr
    assert len(list(remote.iterdir())) == 20


def test_writes_in_flight_at_the_cut_arrive_after_reconnection(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    rng = random.Random(2)
    _populate(local, rng)
    lsync = run_lsync(*counting_link.connect_args(remote, "-v"), cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    proxy = counting_link.proxy
    old_f5 = (local / "src" / "f5.c").read_bytes()
    new_f5 = b"int f5(void) { return -5; }\n" * 60
    big = rng.randbytes(4 << 20)
    watched = [remote / "in-flight.bin", remote / "src" / "f5.c"]
    with ContentSampler(watched) as sampler:
        # Everything sent from now on stays 1 s inside the proxy, then the cut drops it.
        proxy.set_delay(1.0)
        proxy.reset_counters()
        save_atomically(local / "in-flight.bin", big)
        save_atomically(local / "src" / "f5.c", new_f5)
        for i in range(30):
            (local / "src" / f"queued{i}.c").write_text(f"/* {i} */\n")
        (local / "src" / "f6.c").unlink()
        (local / "include").rename(local / "inc")
        assert wait_until(lambda: counting_link.bytes_up() >= 1 << 20, timeout=10)
        proxy.set_delay(0.0)
        assert not lsync.saw("ack in-flight.bin"), "the write was acknowledged before the cut"
        assert proxy.cut() >= 1
        lsync.wait_for_line("reconnecting in")
        lsync.wait_for_count(" ready ", 2, timeout=40)
        assert_same_now(local, remote, lsync=lsync)
    assert sampler.samples > 0
    assert not sampler.unexpected(watched[0], [None, big]), "in-flight.bin was seen torn"
    assert not sampler.unexpected(watched[1], [old_f5, new_f5]), "f5.c was seen torn"
    assert lsync.interrupt() == 0, lsync.stderr


def test_reconnection_backoff_starts_again_after_a_successful_reconnection(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a.c").write_text("a\n")
    lsync = run_lsync(*counting_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    for drop in (1, 2, 3):
        assert counting_link.proxy.cut() >= 1
        lsync.wait_for_count("reconnecting in", drop)
        lsync.wait_for_count(" ready ", drop + 1)
        assert_same_now(local, remote, lsync=lsync)
        (local / "a.c").write_text(f"a after drop {drop}\n")
        lsync.wait_in_sync(time.time_ns())
        assert_same_now(local, remote, lsync=lsync)
    waits = [line.rpartition("reconnecting in ")[2] for line in lsync.lines
             if "reconnecting in" in line]
    assert waits == ["1 s", "1 s", "1 s"], waits
    assert lsync.interrupt() == 0, lsync.stderr


def test_link_dropped_during_the_initial_sync_is_resumed_after_reconnection(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    rng = random.Random(4)
    for i in range(6):
        (local / f"part{i}.bin").write_bytes(rng.randbytes(1 << 20))
    proxy = counting_link.proxy
    proxy.set_delay(0.5)
    lsync = run_lsync(*counting_link.connect_args(remote, "-v"), cwd=local)
    assert wait_until(lambda: counting_link.bytes_up() >= 2 << 20, timeout=30)
    assert not lsync.saw(" ready "), "the initial sync finished before the cut"
    proxy.set_delay(0.0)
    assert proxy.cut() >= 1
    lsync.wait_for_line("reconnecting in")
    lsync.wait_for_line(" ready ", timeout=40)
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0, lsync.stderr


def test_ctrl_c_drains_writes_in_flight_before_exiting(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a.c").write_text("a\n")
    lsync = run_lsync(*counting_link.connect_args(remote, "-v"), cwd=local)
    lsync.wait_for_line(" ready ")
    counting_link.proxy.set_delay(0.5)  # every ack comes back a second later
    counting_link.proxy.reset_counters()
    content = random.Random(5).randbytes(300_000)
    save_atomically(local / "saved-just-before.bin", content)
    assert wait_until(lambda: counting_link.bytes_up() >= 250_000, timeout=10)
    assert not lsync.saw("ack saved-just-before.bin")
    assert lsync.interrupt() == 0, lsync.stderr
    assert lsync.saw("ack saved-just-before.bin"), "lsync exited before the write was acked"
    assert (remote / "saved-just-before.bin").read_bytes() == content


def test_ctrl_c_while_the_link_is_down_exits_promptly(
        counting_link: CountingLink, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a.c").write_text("a\n")
    lsync = run_lsync(*counting_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ")
    counting_link.proxy.set_accepting(False)
    assert counting_link.proxy.cut() >= 1
    lsync.wait_for_line("reconnecting in")
    started = time.monotonic()
    assert lsync.interrupt() == 0, lsync.stderr
    assert time.monotonic() - started < 5


# -- base mismatch ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synced(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synced]:
    base = tmp_path_factory.mktemp("mismatch")
    local, remote = base / "local", base / "remote"
    local.mkdir()
    (local / "keep").write_text("keep\n")
    synced = Synced(["connect", "-F", str(sshd.client_config), "-v", f"{sshd.alias}:{remote}"],
                    local, remote)
    assert synced.differences_at_ready == [], synced.differences_at_ready
    yield synced
    assert synced.stop() == 0, synced.lsync.stderr


def _text(rng: random.Random, size: int) -> bytes:
    lines = []
    total = 0
    while total < size:
        line = f"static int value_{rng.getrandbits(32):08x} = {rng.getrandbits(16)};\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def _edit_line(content: bytes, at: float, text: bytes) -> bytes:
    """`content` with the line at fraction `at` of it replaced by `text` (another length)."""
    start = content.rindex(b"\n", 0, int(len(content) * at)) + 1
    end = content.index(b"\n", start) + 1
    return content[:start] + text + content[end:]


def _flip_byte(path: Path, offset: int, restore_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x20]))
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _tamper(path: Path, how: str) -> None:
    if how == "same-size":
        _flip_byte(path, 100, restore_mtime=False)
    elif how == "same-size-mtime-restored":
        _flip_byte(path, 100, restore_mtime=True)
    elif how == "other-size":
        with open(path, "ab") as handle:
            handle.write(b"/* appended on the remote */\n")
    elif how == "new-inode-same-size-and-mtime":
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[100] ^= 0x20
        temp = path.with_name(path.name + ".tmp")
        temp.write_bytes(bytes(data))
        os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(temp, path)
    elif how == "removed":
        path.unlink()
    else:
        raise AssertionError(how)


TAMPERS = ["same-size", "same-size-mtime-restored", "other-size",
           "new-inode-same-size-and-mtime", "removed"]
SIZES = {"20KB": 20_000, "300KB": 300_000}  # a zdict delta, a block delta


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("tamper", TAMPERS)
def test_delta_against_a_remote_changed_behind_our_back_falls_back_to_the_whole_file(
        synced: Synced, own_dir: Path, tamper: str, size: str) -> None:
    rel = f"{own_dir.name}/file.c"
    local, remote = synced.local / rel, synced.remote / rel
    rng = random.Random(f"{tamper}-{size}")
    original = _text(rng, SIZES[size])
    save_atomically(local, original)
    synced.converged(time.time_ns())
    _tamper(remote, tamper)
    tampered = remote.read_bytes() if remote.exists() else None
    edited = _edit_line(original, 0.6, b"static int lsync_was_here = 1;\n")
    again = _edit_line(edited, 0.3, b"static int and_here_too = 2;\n")
    with ContentSampler([remote]) as sampler:
        save_atomically(local, edited)
        synced.converged(time.time_ns())
        assert remote.read_bytes() == edited
        # The remote's own version was kept aside, not overwritten without a word.
        kept_dir = synced.remote / ".lsync" / "kept"
        kept = [d / rel for d in kept_dir.iterdir() if (d / rel).exists()] \
            if kept_dir.exists() else []
        assert tampered is None or [p.read_bytes() for p in kept] == [tampered], kept
        # The delta was refused, not applied: the agent said so, and lsync logged it.
        assert synced.lsync.count(f"error {rel}: ") == 1, synced.lsync.log_tail()
        # The whole file re-established a base: the next edit is a delta that applies.
        save_atomically(local, again)
        synced.converged(time.time_ns())
        assert remote.read_bytes() == again
    assert synced.lsync.count(f"error {rel}: ") == 1, synced.lsync.log_tail()
    assert not sampler.unexpected(remote, [original, tampered, edited, again]), (
        "the remote file held a version that was never written locally")
