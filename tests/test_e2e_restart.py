"""A restart over the real sshd hears only what changed on the remote since the last session.

The client keeps a copy of the remote's listing (lsync.client.remote.remotelisting) and the agent
its own (lsync.agent.listing); a restart on an unchanged tree costs a few bytes of manifest,
and remote edits made by others between sessions are still seen and repaired.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lsync.client.remote import remotelisting
from lsync.protocol.messages import KEPT_DIR
from tests.conftest import (
    CountingLink,
    LsyncProcess,
    assert_same_now,
    fresh_dirs,
)

Start = Callable[..., LsyncProcess]
FILES = 2000


def _session(run_lsync: Start, link: CountingLink, local: Path, remote: Path) -> int:
    """One `lsync connect` until ready and stopped; bytes the agent sent meanwhile."""
    link.proxy.reset_counters()
    lsync = run_lsync(*link.connect_args(remote, "-v"), cwd=local)
    lsync.wait_for_line(" ready ")
    assert_same_now(local, remote, lsync=lsync, skip=_not_synced)
    down = link.proxy.counters().bytes_down
    assert lsync.interrupt() == 0, lsync.log_tail()
    return down


def _not_synced(rel: str) -> bool:
    return rel == "theirs.txt" or rel == KEPT_DIR.partition("/")[0] or rel.startswith(
        KEPT_DIR.partition("/")[0] + "/")


def test_restart_lists_only_changes_and_sees_remote_edits_made_between_sessions(
        tmp_path: Path, run_lsync: Start, counting_link: CountingLink,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local, remote = fresh_dirs(tmp_path)
    for i in range(FILES):
        path = local / f"d{i % 20}" / f"file_with_a_longish_name_{i}.c"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"int f{i};\n" * 20)
    copy = remotelisting.default_path(local, f"{counting_link.sshd.alias}:{remote}")
    _session(run_lsync, counting_link, local, remote)
    assert copy.exists()
    # Right after the sync, the agent still trusts the digests of the files it wrote a
    # moment before its record was saved (their mtimes are older than the file system's
    # clock then): the restart hears no change and asks for no hash. (With a 2 s racy
    # window, every file here would come again, with its hash asked for: > 28 B each.)
    right_after = _session(run_lsync, counting_link, local, remote)
    unchanged = _session(run_lsync, counting_link, local, remote)
    assert right_after < unchanged + 5 * FILES, (right_after, unchanged)
    copy.unlink()  # the next start holds no copy: the whole manifest comes
    whole = _session(run_lsync, counting_link, local, remote)
    # A whole manifest of these 2,020 entries takes about 12 bytes each, compressed.
    assert whole - unchanged > 5 * FILES, (whole, unchanged)

    # Between sessions, others edit the remote: a synced file changed, one deleted, one
    # made; and a local file changes too.
    edited = remote / "d3" / "file_with_a_longish_name_3.c"
    edited.write_text("changed on the remote, longer than before\n")
    (remote / "d4" / "file_with_a_longish_name_4.c").unlink()
    (remote / "theirs.txt").write_text("made on the remote\n")
    (local / "d5" / "file_with_a_longish_name_5.c").write_text("changed locally\n")
    _session(run_lsync, counting_link, local, remote)  # (checks the trees after ready)
    assert edited.read_text() == (local / "d3" / "file_with_a_longish_name_3.c").read_text()
    assert (remote / "theirs.txt").read_text() == "made on the remote\n"
    kept = [name for _, _, names in os.walk(remote / KEPT_DIR) for name in names]
    assert kept, "the remote edit of a synced file was not kept aside"
