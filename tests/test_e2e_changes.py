"""End to end over a real sshd: every kind of change reaches the remote tree.

One `lsync connect -v` runs for the whole module against the private sshd on 127.0.0.1.
Each test works in its own directory (`own_dir`, named after the test), so that it needs
nothing another test made and runs alone or in any order (a failed test gets lsync restarted
after it). It makes one kind of change locally, notes the time right after it
(`time.time_ns()`), waits for lsync's `in-sync as-of=N` line with N at or after that time,
and then compares the whole local and remote trees once (content, mode and links): lsync has
promised they are equal, so there is nothing to wait for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import Synced


@pytest.fixture(scope="module")
def synced(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synced]:
    base = tmp_path_factory.mktemp("changes")
    local, remote = base / "local", base / "remote"
    local.mkdir()
    (local / "initial" / "src").mkdir(parents=True)
    (local / "initial" / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (local / "initial" / "README").write_text("hello\n")
    os.chmod(local / "initial" / "README", 0o600)
    (local / "initial" / "link").symlink_to("src/main.c")
    synced = Synced(["connect", "-F", str(sshd.client_config), "-v", f"{sshd.alias}:{remote}"],
                    local, remote)
    yield synced
    status = synced.stop()
    assert status == 0, synced.lsync.stderr


def test_initial_sync_copies_the_tree(synced: Synced) -> None:
    assert synced.differences_at_ready == [], "trees differ right after ready:\n" + "\n".join(
        synced.differences_at_ready)
    assert (synced.remote / "initial" / "link").is_symlink()


def test_create_file(synced: Synced, own_dir: Path) -> None:
    (own_dir / "new.c").write_text("/* new */\n")
    synced.converged(time.time_ns())


def test_modify_by_truncate_and_write(synced: Synced, own_dir: Path) -> None:
    (own_dir / "main.c").write_text("int main(void) { return 0; }\n")
    synced.converged(time.time_ns())
    with open(own_dir / "main.c", "w") as handle:
        handle.write("int main(void) { return 1; }\n")
    synced.converged(time.time_ns())


def test_vim_style_save_writes_temp_then_renames(synced: Synced, own_dir: Path) -> None:
    target = own_dir / "main.c"
    target.write_text("int main(void) { return 0; }\n")
    synced.converged(time.time_ns())
    temp = own_dir / ".main.c.swp"
    temp.write_text("int main(void) { return 2; } /* vim */\n")
    os.chmod(temp, 0o644)
    os.rename(temp, target)
    synced.converged(time.time_ns())
    assert (synced.remote / own_dir.name / "main.c").read_text().endswith("/* vim */\n")


def test_repeated_saves_end_with_the_newest_content(synced: Synced, own_dir: Path) -> None:
    path = own_dir / "README"
    for i in range(50):
        path.write_text(f"version {i}\n")
    synced.converged(time.time_ns())
    assert (synced.remote / own_dir.name / "README").read_text() == "version 49\n"


def test_delete_file(synced: Synced, own_dir: Path) -> None:
    (own_dir / "doomed.c").write_text("/* soon gone */\n")
    (own_dir / "stays.c").write_text("/* stays */\n")
    synced.converged(time.time_ns())
    (own_dir / "doomed.c").unlink()
    synced.converged(time.time_ns())
    assert not (synced.remote / own_dir.name / "doomed.c").exists()


def test_rename_file(synced: Synced, own_dir: Path) -> None:
    (own_dir / "README").write_text("hello\n")
    synced.converged(time.time_ns())
    (own_dir / "README").rename(own_dir / "README.md")
    synced.converged(time.time_ns())


def test_rename_directory(synced: Synced, own_dir: Path) -> None:
    (own_dir / "src" / "sub").mkdir(parents=True)
    (own_dir / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (own_dir / "src" / "sub" / "deep.h").write_text("#define X 1\n")
    synced.converged(time.time_ns())
    (own_dir / "src").rename(own_dir / "source")
    synced.converged(time.time_ns())
    assert not (synced.remote / own_dir.name / "src").exists()


def test_empty_directories_created_and_removed(synced: Synced, own_dir: Path) -> None:
    (own_dir / "empty" / "nested").mkdir(parents=True)
    synced.converged(time.time_ns())
    (own_dir / "empty" / "nested").rmdir()
    (own_dir / "empty").rmdir()
    synced.converged(time.time_ns())


def test_symlinks_are_synced_as_links_never_followed(synced: Synced, own_dir: Path) -> None:
    (own_dir / "source").mkdir()
    (own_dir / "source" / "main.c").write_text("int main(void) { return 0; }\n")
    (own_dir / "README.md").write_text("hello\n")
    (own_dir / "link-to-file").symlink_to("README.md")
    (own_dir / "link-to-dir").symlink_to("source")
    (own_dir / "dangling").symlink_to("/nonexistent/target")
    synced.converged(time.time_ns())
    assert (synced.remote / own_dir.name / "link-to-dir").is_symlink()
    (own_dir / "link-to-file").unlink()
    (own_dir / "link-to-file").symlink_to("source/main.c")
    synced.converged(time.time_ns())


def test_executable_bit_and_mode(synced: Synced, own_dir: Path) -> None:
    script = own_dir / "build.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    (own_dir / "source").mkdir()
    synced.converged(time.time_ns())
    os.chmod(script, 0o755)
    synced.converged(time.time_ns())
    os.chmod(own_dir / "source", 0o750)
    synced.converged(time.time_ns())


def test_file_replaced_by_directory_and_back(synced: Synced, own_dir: Path) -> None:
    path = own_dir / "thing"
    path.write_text("file\n")
    synced.converged(time.time_ns())
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x\n")
    synced.converged(time.time_ns())
    (path / "inside").unlink()
    path.rmdir()
    path.write_text("file again\n")
    synced.converged(time.time_ns())


def test_large_file_in_several_chunks(synced: Synced, own_dir: Path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 123)
    (own_dir / "big.bin").write_bytes(data)
    synced.converged(time.time_ns(), timeout=40)
    assert (synced.remote / own_dir.name / "big.bin").read_bytes() == data


def test_acknowledgements_are_logged_with_latency(synced: Synced, own_dir: Path) -> None:
    (own_dir / "acked.c").write_text("/* acknowledged */\n")
    synced.converged(time.time_ns())
    path = f"{own_dir.name}/acked.c"
    assert any(f" ack {path} ms=" in line for line in synced.lsync.lines), (
        synced.lsync.log_tail())
