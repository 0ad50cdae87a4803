"""End to end: build-loop sessions that start, end or are refused — a session that refuses
another user even through a loosened socket, the stale socket of a killed session, the
commands without a session (`lsync run --connect` syncs once, runs and stops), and
`lsync connect` from the project file `.lsync.toml` and its errors — against the private
sshd.

Each test starts (or fails to start) its own `lsync connect`; the session and the helpers
are in tests/loopsession.py.
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LsyncProcess
from tests.loopsession import Session, connect_as_nobody, lsync_cli, needs_root, running_session
from tests.loopsession import own_session as own_session  # (a fixture)


@needs_root
def test_session_refuses_another_user_even_through_a_world_writable_socket(
        sshd: PrivateSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="lsync-xdg-", dir="/tmp"))  # reachable by nobody
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        with running_session(sshd, tmp_path) as s:
            path = s.socket()
            assert path.parent == runtime / "lsync"
            # Loosen everything a mode can loosen: only the session's own check is left.
            runtime.chmod(0o711)
            path.parent.chmod(0o711)
            path.chmod(0o666)
            got = connect_as_nobody(path)
            assert got.startswith("OK "), got
            assert json.loads(got[3:]) == {
                "v": 1, "ok": False, "done": True, "code": "refused",
                "error": "this lsync session belongs to another user"}
            assert s.request({"op": "hello"})["pid"] == s.lsync.proc.pid  # still serving
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_stale_socket_of_a_killed_session_is_replaced_by_the_next_session(
        own_session: Session) -> None:
    s = own_session
    path = s.socket()
    s.lsync.proc.kill()  # SIGKILL: no clean-up
    s.lsync.finish(timeout=10)
    assert stat.S_ISSOCK(path.lstat().st_mode), "nothing stale left: the test proves nothing"
    flushed = lsync_cli("flush", cwd=s.local)
    assert flushed.returncode == 3, flushed.stderr
    successor = LsyncProcess(s.link.connect_args(s.remote), cwd=s.local)
    try:
        successor.wait_for_line(" ready ", timeout=60)
        assert s.socket() == path
        assert s.request({"op": "hello"})["pid"] == successor.proc.pid
        assert lsync_cli("flush", cwd=s.local).returncode == 0
    finally:
        successor.interrupt()


def test_without_a_session_run_exits_125_flush_and_status_exit_3(tmp_path: Path) -> None:
    ran = lsync_cli("run", "--", "true", cwd=tmp_path)
    assert ran.returncode == 125
    assert ran.stdout == "" and len(ran.stderr.splitlines()) == 1, ran.stderr
    assert "no running `lsync connect`" in ran.stderr
    flushed = lsync_cli("flush", cwd=tmp_path)
    assert flushed.returncode == 3, flushed.stderr
    assert lsync_cli("status", cwd=tmp_path).returncode == 3


def test_run_connect_without_a_session_syncs_once_runs_and_stops(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / "a.c").write_text("int a;\n")
    (local / ".lsync.toml").write_text(
        f'target = "{sshd.alias}:{remote}"\nssh_config = "{sshd.client_config}"\n')
    ran = lsync_cli("run", "--connect", "--", "sh", "-c", "cat a.c; exit 5", cwd=local)
    assert ran.returncode == 5, ran.stderr
    assert ran.stdout == "int a;\n"
    assert (remote / "a.c").read_text() == "int a;\n"
    assert lsync_cli("status", cwd=local).returncode == 3  # nothing left running


# -- the project file -------------------------------------------------------------------------


def test_connect_without_arguments_uses_the_project_file(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / "a.c").write_text("int a;\n")
    (local / "scratch.tmp").write_text("not synced\n")
    (local / ".lsync.toml").write_text(
        f'target = "{sshd.alias}:{remote}"\n'
        f'ssh_config = "{sshd.client_config}"\n'
        'exclude = ["*.tmp"]\n'
        "\n[run]\nmap_paths = false\n")
    lsync = LsyncProcess(["connect"], cwd=local)
    try:
        lsync.wait_for_line(" ready ", timeout=60)
        assert (remote / "a.c").read_text() == "int a;\n"
        assert not (remote / "scratch.tmp").exists()
        shown = lsync_cli("run", "--", "sh", "-c", 'echo "$PWD/a.c:1:"', cwd=local)
        assert shown.stdout == f"{remote}/a.c:1:\n", shown.stdout  # [run] map_paths = false
    finally:
        lsync.interrupt()


@pytest.mark.parametrize(("text", "line", "says"), [
    ('target = "host:tree"\n\ninclude-vcs = true\n', 3,
     "unknown key `include-vcs` (did you mean `include_vcs`?)"),
    ('target = "host:tree"\nstep_ms = "fast"\n', 2, "step_ms"),
], ids=["unknown-key", "bad-value"])
def test_project_file_error_exits_2_naming_the_line(tmp_path: Path, text: str, line: int,
                                                     says: str) -> None:
    (tmp_path / ".lsync.toml").write_text(text)
    done = lsync_cli("connect", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    said = done.stderr.strip().splitlines()
    assert len(said) == 1, done.stderr
    assert f"{tmp_path}/.lsync.toml, line {line}: " in said[0] and says in said[0], said[0]
