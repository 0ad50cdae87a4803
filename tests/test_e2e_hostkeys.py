"""End to end: host keys mean no, whatever the ssh config says (issue 11 items 1 and 2).

Against the private sshd on 127.0.0.1 (a non-default port): `UserKnownHostsFile none` must
not turn verification off (OpenSSH refuses an unknown key then too), and a key marked
`@revoked` in known_hosts is refused even with --accept-new-host-key, and never recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LsyncProcess, fresh_dirs

Start = Callable[..., LsyncProcess]


def test_known_hosts_file_none_still_refuses_an_unknown_key(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a").write_text("a\n")
    config = sshd.write_client_config(path=tmp_path / "ssh_config", known_hosts="none")
    lsync = run_lsync("connect", "-F", str(config), f"{sshd.alias}:{remote}", cwd=local)
    assert lsync.finish() == 4, lsync.stderr
    assert "unknown" in lsync.stderr
    assert not remote.exists()


def test_revoked_host_key_is_refused_even_with_accept_new(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a").write_text("a\n")
    known = tmp_path / "known_hosts"
    kind, key = sshd.host_public_key.split()[:2]
    known.write_text(f"@revoked [127.0.0.1]:{sshd.port} {kind} {key}\n")
    before = known.read_text()
    config = sshd.write_client_config(path=tmp_path / "ssh_config", known_hosts=known)
    lsync = run_lsync("connect", "-F", str(config), "--accept-new-host-key",
                      f"{sshd.alias}:{remote}", cwd=local)
    assert lsync.finish() == 4, lsync.stderr
    assert "revoked" in lsync.stderr
    assert not remote.exists()
    assert known.read_text() == before  # not recorded as trusted
