"""End to end over a real sshd: bytes on the wire for edits, moves and copies (issue 3).

One `lsync connect` runs for the module through a byte-counting proxy (no delay) in front of
the private sshd on 127.0.0.1. Each test lets lsync settle, resets the proxy's counters, makes
one change locally, waits (bounded) until the remote tree equals the local one and the
traffic has stopped, and then bounds the bytes sent client -> server: a one-line edit of a
2 MB file costs a few KB (a delta against the acknowledged version), and a directory rename,
a `cp` and a `mv` cost no content at all (the agent moves or copies what it already has).
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import (
    CountingLink,
    LsyncProcess,
    assert_trees_equal,
    counting_link_to,
    save_atomically,
    wait_steady,
)

DIR_FILES = 1000
DIR_FILE_SIZE = 5000  # 1,000 files of incompressible bytes: ~5 MB
BIG_TEXT = 2 * 1024 * 1024
COPIED = 1024 * 1024


@dataclass
class Metered:
    local: Path
    remote: Path
    link: CountingLink
    lsync: LsyncProcess

    def settle(self) -> None:
        """Wait until the trees are equal and lsync has stopped sending, then reset counts."""
        assert_trees_equal(self.local, self.remote, timeout=60)
        wait_steady(self.link.bytes_up)
        self.link.proxy.reset_counters()

    def cost_of_converging(self) -> int:
        """Bytes client -> server from the last `settle` until the trees are equal again."""
        assert_trees_equal(self.local, self.remote, timeout=60)
        return wait_steady(self.link.bytes_up)


def c_like_text(rng: random.Random, size: int) -> bytes:
    """Lines that look like C: compressible a few times, but not trivially repetitive."""
    words = ["int", "return", "struct", "static", "unsigned", "if", "else", "for", "while",
             "const", "char", "void", "size_t", "u32", "->", "NULL", "err", "dev", "buf"]
    lines: list[str] = []
    total = 0
    while total < size:
        line = "\t" * rng.randint(0, 3) + " ".join(
            rng.choice(words) if rng.random() < 0.7 else f"v{rng.getrandbits(24):x}"
            for _ in range(rng.randint(2, 12))) + ";\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


@pytest.fixture(scope="module")
def metered(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    base = tmp_path_factory.mktemp("delta")
    local, remote = base / "local", base / "remote"
    rng = random.Random(3)
    tree = local / "drivers" / "net"
    tree.mkdir(parents=True)
    for i in range(DIR_FILES):
        (tree / f"file{i:04d}.bin").write_bytes(rng.randbytes(DIR_FILE_SIZE))
    (local / "big.c").write_bytes(c_like_text(rng, BIG_TEXT))
    (local / "blob.bin").write_bytes(rng.randbytes(COPIED))
    (local / "moved.bin").write_bytes(rng.randbytes(COPIED))
    with counting_link_to(sshd) as link:
        lsync = LsyncProcess(link.connect_args(remote, "-v"), cwd=local)
        lsync.wait_for_line(" ready ", timeout=60)
        yield Metered(local, remote, link, lsync)
        assert lsync.interrupt() == 0, lsync.stderr


def test_one_line_edit_of_a_2mb_file_costs_a_few_kilobytes(metered: Metered) -> None:
    path = metered.local / "big.c"
    metered.settle()
    content = path.read_bytes()
    middle = content.index(b"\n", len(content) // 2) + 1
    edited = content[:middle] + b"\tpr_info(\"lsync was here: %d\\n\", err);\n" + content[middle:]
    save_atomically(path, edited)  # as vim saves: never seen half written
    sent = metered.cost_of_converging()
    assert (metered.remote / "big.c").read_bytes() == edited
    assert sent <= 4 * 1024, f"a one-line edit of a 2 MB file sent {sent} bytes"


def test_directory_rename_of_1000_files_sends_under_one_percent_of_its_bytes(
        metered: Metered) -> None:
    metered.settle()
    (metered.local / "drivers" / "net").rename(metered.local / "drivers" / "network")
    sent = metered.cost_of_converging()
    total = DIR_FILES * DIR_FILE_SIZE
    assert not (metered.remote / "drivers" / "net").exists()
    assert len(list((metered.remote / "drivers" / "network").iterdir())) == DIR_FILES
    assert sent <= total // 100, f"renaming a {total}-byte directory sent {sent} bytes"


def test_copied_file_costs_no_content(metered: Metered) -> None:
    metered.settle()
    subprocess.run(["cp", str(metered.local / "blob.bin"), str(metered.local / "copy.bin")],
                   check=True)
    sent = metered.cost_of_converging()
    assert (metered.remote / "copy.bin").read_bytes() == (metered.local / "blob.bin").read_bytes()
    assert sent <= COPIED // 100, f"a cp of a {COPIED}-byte file sent {sent} bytes"


def test_file_renamed_by_mv_costs_no_content(metered: Metered) -> None:
    metered.settle()
    subprocess.run(["mv", str(metered.local / "moved.bin"), str(metered.local / "renamed.bin")],
                   check=True)
    sent = metered.cost_of_converging()
    assert not (metered.remote / "moved.bin").exists()
    assert sent <= COPIED // 100, f"an mv of a {COPIED}-byte file sent {sent} bytes"


def test_file_moved_into_another_directory_costs_no_content(metered: Metered) -> None:
    # The directory exists remotely first, so the watcher reports the move itself; a move
    # into a directory created just before is covered at the engine level (see
    # test_sync_properties.test_file_moved_into_a_new_directory_is_copied_not_resent).
    (metered.local / "sub").mkdir()
    metered.settle()
    shutil.move(metered.local / "renamed.bin", metered.local / "sub" / "renamed.bin")
    sent = metered.cost_of_converging()
    assert (metered.remote / "sub" / "renamed.bin").exists()
    assert sent <= COPIED // 100, f"moving a {COPIED}-byte file sent {sent} bytes"


def test_first_edit_after_a_restart_is_a_delta(sshd: PrivateSshd, tmp_path: Path) -> None:
    """The signature of the remote's version outlives the session (lsync.client.sigstore):
    the first edit of a big file after lsync starts again needs no whole-file send."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    path = local / "restart.c"
    content = c_like_text(random.Random(5), BIG_TEXT)
    path.write_bytes(content)
    with counting_link_to(sshd) as link:
        first = LsyncProcess(link.connect_args(remote, "-v"), cwd=local)
        first.wait_for_line(" ready ", timeout=60)
        assert first.interrupt() == 0, first.stderr
        second = LsyncProcess(link.connect_args(remote, "-v"), cwd=local)
        second.wait_for_line(" ready ", timeout=60)
        wait_steady(link.bytes_up)
        link.proxy.reset_counters()
        middle = content.index(b"\n", len(content) // 3) + 1
        edited = content[:middle] + b"\treturn -EAGAIN; /* after a restart */\n" + content[middle:]
        save_atomically(path, edited)
        assert_trees_equal(local, remote, timeout=60)
        sent = wait_steady(link.bytes_up)
        assert (remote / "restart.c").read_bytes() == edited
        assert sent <= 4 * 1024, f"the first edit after a restart sent {sent} bytes"
        assert second.interrupt() == 0, second.stderr


def test_first_edit_of_a_file_lsync_did_not_send_is_a_delta(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    """A tree already in sync by other means (here a copy): lsync verifies it by digest and
    then signs the big files in the background, so their first edit is a delta."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    path = local / "copied.c"
    content = c_like_text(random.Random(8), BIG_TEXT)
    path.write_bytes(content)
    shutil.copytree(local, remote)
    with counting_link_to(sshd) as link:
        lsync = LsyncProcess(link.connect_args(remote, "-v"), cwd=local)
        lsync.wait_for_line(" ready ", timeout=60)
        lsync.wait_for_line("signed", timeout=30)
        wait_steady(link.bytes_up)
        link.proxy.reset_counters()
        middle = content.index(b"\n", len(content) // 2) + 1
        edited = content[:middle] + b"\tgoto out; /* first edit */\n" + content[middle:]
        save_atomically(path, edited)
        assert_trees_equal(local, remote, timeout=60)
        sent = wait_steady(link.bytes_up)
        assert (remote / "copied.c").read_bytes() == edited
        assert sent <= 4 * 1024, f"the first edit of a verified file sent {sent} bytes"
        assert lsync.interrupt() == 0, lsync.stderr
