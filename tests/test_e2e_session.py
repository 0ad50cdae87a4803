"""End to end: ignores, remote-only files, safety stops, path escapes, host keys, local target.

Each test starts its own `lsync connect` against the private sshd (or a local directory).
Right after lsync's ` ready ` line, and right after an `in-sync as-of=N` line with N at or
after the moment of a local change, the trees are compared once: lsync has promised they are
equal. What is not such a promise (an error line, an exit status) is waited for, bounded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LsyncProcess, assert_same_now, fresh_dirs

Start = Callable[..., LsyncProcess]


def _connect(start: Start, sshd: PrivateSshd, local: Path, remote: Path | str,
             *extra: str) -> LsyncProcess:
    return start("connect", "-F", str(sshd.client_config), "-v", *extra,
                 f"{sshd.alias}:{remote}", cwd=local)


def test_gitignore_keeps_ignored_files_local_and_remote_build_outputs_untouched(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / ".gitignore").write_text("*.o\n/build/\n")
    (local / "drivers").mkdir()
    (local / "drivers" / ".gitignore").write_text("generated.h\n")
    (local / "drivers" / "a.c").write_text("a\n")
    (local / "drivers" / "a.o").write_text("local object\n")
    (local / "drivers" / "generated.h").write_text("gen\n")
    (local / "build").mkdir()
    (local / "build" / "out").write_text("out\n")
    (local / ".git").mkdir()
    (local / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (remote / "drivers").mkdir(parents=True)
    (remote / "drivers" / "a.o").write_text("remote object\n")
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")

    def ignored(rel: str) -> bool:
        return rel.endswith((".o", "generated.h")) or rel.startswith(("build", ".git"))

    assert_same_now(local, remote, skip=ignored, lsync=lsync)
    assert not (remote / "build").exists() and not (remote / ".git").exists()
    assert (remote / "drivers" / "a.o").read_text() == "remote object\n"
    # Deleting the directory locally removes what lsync synced there, keeps the build output.
    shutil.rmtree(local / "drivers")
    lsync.wait_in_sync(time.time_ns())
    assert (remote / "drivers" / "a.o").read_text() == "remote object\n"
    assert lsync.saw("kept drivers"), lsync.log_tail()
    assert_same_now(local, remote, skip=lambda rel: ignored(rel) or rel == "drivers",
                    lsync=lsync)
    assert lsync.interrupt() == 0


def test_remote_only_files_are_kept_without_delete_and_removed_with_it(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "mine.c").write_text("mine\n")
    (remote / "theirs").mkdir(parents=True)
    (remote / "theirs" / "notes.txt").write_text("keep me\n")
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, skip=lambda rel: rel.startswith("theirs"), lsync=lsync)
    assert lsync.interrupt() == 0
    assert (remote / "theirs" / "notes.txt").read_text() == "keep me\n"
    lsync = _connect(run_lsync, sshd, local, remote, "--delete")
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0


def test_vanished_local_root_stops_without_deleting_remotely(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    for i in range(20):
        (local / f"f{i}.c").write_text(f"{i}\n")
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    shutil.rmtree(local)
    status = lsync.finish(timeout=20)
    assert status == 6, (status, lsync.stderr)
    assert "stopped without deleting anything" in lsync.stderr
    assert len(list(remote.iterdir())) == 20


def test_emptied_local_root_stops_without_deleting_remotely(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    for i in range(20):
        (local / f"f{i}.c").write_text(f"{i}\n")
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    for child in local.iterdir():
        child.unlink()
    status = lsync.finish(timeout=20)
    assert status == 6, (status, lsync.stderr)
    assert "suddenly empty" in lsync.stderr
    assert len(list(remote.iterdir())) == 20


def test_write_through_a_remote_symlinked_directory_is_refused(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    remote.mkdir()
    (remote / "sneaky").symlink_to(outside)
    (local / "sneaky").mkdir()
    (local / "sneaky" / "payload.txt").write_text("must not escape\n")
    (local / "ok.txt").write_text("fine\n")
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, skip=lambda rel: rel.startswith("sneaky"), lsync=lsync)
    assert list(outside.iterdir()) == []
    lsync.wait_for_line("is a symlink")
    # A path that keeps failing is no convergence: lsync says so instead of "in-sync".
    lsync.wait_for_line("paths failing")
    assert not lsync.saw(" in-sync "), lsync.log_tail()
    assert list(outside.iterdir()) == []
    assert lsync.interrupt() == 0


def test_unknown_host_key_is_refused_and_accepted_only_when_asked(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a").write_text("a\n")
    empty_known = tmp_path / "known_hosts"
    empty_known.write_text("")
    config = sshd.write_client_config(path=tmp_path / "ssh_config", known_hosts=empty_known)
    lsync = run_lsync("connect", "-F", str(config), f"{sshd.alias}:{remote}", cwd=local)
    assert lsync.finish() == 4
    assert "host key" in lsync.stderr and "unknown" in lsync.stderr
    assert not remote.exists()
    lsync = run_lsync("connect", "-F", str(config), "--accept-new-host-key",
                      f"{sshd.alias}:{remote}", cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0
    assert sshd.host_public_key.split()[1] in empty_known.read_text()


def test_changed_host_key_is_refused_even_with_accept_new(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    wrong = tmp_path / "known_hosts"
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other}\n"
                     f"[{sshd.alias}]:{sshd.port} ssh-ed25519 {other}\n")
    config = sshd.write_client_config(path=tmp_path / "ssh_config", known_hosts=wrong)
    lsync = run_lsync("connect", "-F", str(config), "--accept-new-host-key",
                      f"{sshd.alias}:{remote}", cwd=local)
    assert lsync.finish() == 4
    assert "CHANGED" in lsync.stderr


def test_local_target_syncs_without_ssh(tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "x.c").write_text("x\n")
    lsync = run_lsync("connect", "-v", str(remote), cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    (local / "y.c").write_text("y\n")
    lsync.wait_in_sync(time.time_ns())
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0


def test_relative_remote_tree_is_under_the_remote_home(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, _ = fresh_dirs(tmp_path)
    (local / "x.c").write_text("x\n")
    name = f"lsync-e2e-{time.time_ns()}"
    assert sshd.home is not None
    tree = sshd.home / name
    try:
        lsync = _connect(run_lsync, sshd, local, name)
        lsync.wait_for_line(" ready ")
        assert_same_now(local, tree, lsync=lsync)
        assert lsync.interrupt() == 0
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def test_restart_with_nothing_changed_sends_no_file(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    for i in range(30):
        (local / f"f{i}.c").write_text(f"content {i}\n" * 100)
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0
    lsync = _connect(run_lsync, sshd, local, remote)
    lsync.wait_for_line(" ready ")
    assert lsync.saw("ready files=0 bytes=0"), lsync.log_tail()
    assert_same_now(local, remote, lsync=lsync)
    assert lsync.interrupt() == 0
