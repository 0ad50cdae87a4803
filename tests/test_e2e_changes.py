"""End to end over a real sshd: every kind of change reaches the remote tree.

One `lsync connect` runs for the whole module against the private sshd on 127.0.0.1; each
test makes one kind of change locally and waits (bounded) until the remote tree equals the
local one in content, mode and links.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LsyncProcess, Synced, assert_trees_equal, snapshot


@pytest.fixture(scope="module")
def synced(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synced]:
    base = tmp_path_factory.mktemp("changes")
    local, remote = base / "local", base / "remote"
    local.mkdir()
    (local / "src").mkdir()
    (local / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (local / "README").write_text("hello\n")
    lsync = LsyncProcess(["connect", "-F", str(sshd.client_config), "-v",
                          f"{sshd.alias}:{remote}"], cwd=local)
    lsync.wait_for_line(" ready ")
    yield Synced(local, remote, lsync)
    status = lsync.interrupt()
    assert status == 0, lsync.stderr


def test_initial_sync_copies_the_tree(synced: Synced) -> None:
    assert_trees_equal(synced.local, synced.remote)


def test_create_file(synced: Synced) -> None:
    (synced.local / "src" / "new.c").write_text("/* new */\n")
    assert_trees_equal(synced.local, synced.remote)


def test_modify_by_truncate_and_write(synced: Synced) -> None:
    with open(synced.local / "src" / "main.c", "w") as handle:
        handle.write("int main(void) { return 1; }\n")
    assert_trees_equal(synced.local, synced.remote)


def test_vim_style_save_writes_temp_then_renames(synced: Synced) -> None:
    target = synced.local / "src" / "main.c"
    temp = synced.local / "src" / ".main.c.swp"
    temp.write_text("int main(void) { return 2; } /* vim */\n")
    os.chmod(temp, 0o644)
    os.rename(temp, target)
    assert_trees_equal(synced.local, synced.remote)
    assert (synced.remote / "src" / "main.c").read_text().endswith("/* vim */\n")


def test_repeated_saves_end_with_the_newest_content(synced: Synced) -> None:
    path = synced.local / "README"
    for i in range(50):
        path.write_text(f"version {i}\n")
    assert_trees_equal(synced.local, synced.remote)
    assert (synced.remote / "README").read_text() == "version 49\n"


def test_delete_file(synced: Synced) -> None:
    (synced.local / "src" / "new.c").unlink()
    assert_trees_equal(synced.local, synced.remote)


def test_rename_file(synced: Synced) -> None:
    (synced.local / "README").rename(synced.local / "README.md")
    assert_trees_equal(synced.local, synced.remote)


def test_rename_directory(synced: Synced) -> None:
    (synced.local / "src" / "sub").mkdir()
    (synced.local / "src" / "sub" / "deep.h").write_text("#define X 1\n")
    assert_trees_equal(synced.local, synced.remote)
    (synced.local / "src").rename(synced.local / "source")
    assert_trees_equal(synced.local, synced.remote)


def test_empty_directories_created_and_removed(synced: Synced) -> None:
    (synced.local / "empty" / "nested").mkdir(parents=True)
    assert_trees_equal(synced.local, synced.remote)
    (synced.local / "empty" / "nested").rmdir()
    (synced.local / "empty").rmdir()
    assert_trees_equal(synced.local, synced.remote)


def test_symlinks_are_synced_as_links_never_followed(synced: Synced) -> None:
    (synced.local / "link-to-file").symlink_to("README.md")
    (synced.local / "link-to-dir").symlink_to("source")
    (synced.local / "dangling").symlink_to("/nonexistent/target")
    assert_trees_equal(synced.local, synced.remote)
    assert (synced.remote / "link-to-dir").is_symlink()
    (synced.local / "link-to-file").unlink()
    (synced.local / "link-to-file").symlink_to("source/main.c")
    assert_trees_equal(synced.local, synced.remote)


def test_executable_bit_and_mode(synced: Synced) -> None:
    script = synced.local / "build.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert_trees_equal(synced.local, synced.remote)
    os.chmod(script, 0o755)
    assert_trees_equal(synced.local, synced.remote)
    os.chmod(synced.local / "source", 0o750)
    assert_trees_equal(synced.local, synced.remote)


def test_file_replaced_by_directory_and_back(synced: Synced) -> None:
    path = synced.local / "thing"
    path.write_text("file\n")
    assert_trees_equal(synced.local, synced.remote)
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x\n")
    assert_trees_equal(synced.local, synced.remote)
    (path / "inside").unlink()
    path.rmdir()
    path.write_text("file again\n")
    assert_trees_equal(synced.local, synced.remote)


def test_large_file_in_several_chunks(synced: Synced) -> None:
    data = os.urandom(9 * 1024 * 1024 + 123)
    (synced.local / "big.bin").write_bytes(data)
    assert_trees_equal(synced.local, synced.remote, timeout=40)


def test_acknowledgements_are_logged_with_latency(synced: Synced) -> None:
    assert any(" ack " in line and " ms=" in line for line in synced.lsync.lines)
    assert snapshot(synced.remote)  # the remote is not empty
