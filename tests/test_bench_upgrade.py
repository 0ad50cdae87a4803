"""The benchmark harness's pieces for issue 16: the upgrade scenario (u) and its material,
lsync's in-sync lines as the runner reads them, CPU per 1,000 files, and work trees whose
`.git` is never compared or mirrored; then scenario u end to end in short mode (the
generated tree: no download)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import kernel_material, scenario_upgrade
from benchmarks.bench_rows import CpuUse
from benchmarks.bench_trees import count_tree, mirror, same_files, tree_files
from benchmarks.lsync_runner import LsyncWatcher
from benchmarks.peers import Link
from benchmarks.testbed import trees
from benchmarks.testbed.sshd import SSHD_BINARY

IN_CI = bool(os.environ.get("CI"))
needs_sshd = pytest.mark.skipif(
    not IN_CI and (not os.path.exists(SSHD_BINARY) or shutil.which("ssh") is None),
    reason="OpenSSH server/client not installed",
)


def test_synthetic_upgrade_repository_edits_removes_and_adds_files(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    trees.generate("tiny", source)
    repo = tmp_path / "repo"
    scenario_upgrade.synthetic_repo(source, repo)
    old, new = scenario_upgrade.SYNTH_OLD, scenario_upgrade.SYNTH_NEW
    changed = kernel_material.changed_paths(repo, old, new)
    status = kernel_material.git("diff", "--name-status", "--no-renames", old, new,
                                 cwd=repo).stdout.split("\n")
    kinds = {line.split("\t")[0] for line in status if line}
    assert kinds == {"A", "D", "M"}
    assert any(rel.startswith("upgrade-new-dir/") for rel in changed)
    # The work tree is left at the old revision, identical to the source.
    assert same_files(source, repo) == ""
    assert tree_files(repo) == tree_files(source)


def test_expected_after_an_upgrade_names_what_differs_remotely(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    trees.generate("tiny", source)
    repo = tmp_path / "repo"
    scenario_upgrade.synthetic_repo(source, repo)
    up_changed = tuple(kernel_material.changed_paths(repo, scenario_upgrade.SYNTH_OLD,
                                                     scenario_upgrade.SYNTH_NEW))
    remote = tmp_path / "remote"
    mirror(repo, remote, checksum=False, vcs=False)
    assert not (remote / ".git").exists()
    scenario_upgrade.checkout(repo, scenario_upgrade.SYNTH_NEW)
    expected = scenario_upgrade.Expected.of(repo, up_changed)
    assert expected.gone and expected.present
    problem = expected.problem(remote)
    assert "changed paths differ" in problem and "removed paths remain" in problem
    mirror(repo, remote, checksum=True, vcs=False)
    assert expected.problem(remote) == ""
    assert same_files(repo, remote) == ""  # the work tree's .git is not compared
    start = time.perf_counter()
    assert scenario_upgrade.wait_remote(remote, expected, start, 1.0) is not None


def test_same_files_and_counts_leave_a_top_level_git_out(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "src").mkdir(parents=True)
        (root / "src" / "x.c").write_text("int x;\n")
    (a / ".git").mkdir()
    (a / ".git" / "index").write_bytes(b"DIRC")
    (b / "src" / ".git").write_text("gitdir: elsewhere\n")  # not top-level: compared
    assert same_files(a, b) == "1 extra (e.g. src/.git)"
    (a / "link-to-src").symlink_to("src")  # a symlink to a directory is one entry
    assert same_files(a, b) == "1 missing (e.g. link-to-src); 1 extra (e.g. src/.git)"
    stats = count_tree(a, "t", 0.0)
    assert (stats.files, stats.dirs, stats.bytes) == (2, 1, 7 + len("src"))
    assert tree_files(a) == ["src/x.c"]


def test_cpu_per_thousand_files_is_computed_from_the_totals() -> None:
    cpu = CpuUse(24.5, 11.0, 78_667)
    assert cpu.per_thousand(cpu.client) == "0.31 s"
    assert cpu.text == "CPU per 1,000 files: client 0.31 s, agent 0.14 s (24.5 s, 11.0 s)"
    unknown = CpuUse(None, 2.0, 0, "changed paths")
    assert unknown.text == "CPU per 1,000 changed paths: client ?, agent ? (?, 2.0 s)"


class _Printer(LsyncWatcher):
    """An LsyncWatcher whose process prints given log lines, then waits for stdin's end."""

    def __init__(self, workdir: Path, lines: list[str]) -> None:
        super().__init__(workdir, Link(workdir / "cfg", "host", workdir), workdir)
        self.lines = lines

    def argv(self) -> list[str]:
        # (SIGINT may be ignored where the suite runs: the script ends on it itself.)
        script = ("import signal, sys, time\n"
                  "signal.signal(signal.SIGINT, lambda *_: sys.exit(0))\n"
                  f"for line in {self.lines!r}:\n"
                  "    print(line, flush=True)\n"
                  "time.sleep(30)\n")
        return [sys.executable, "-c", script]


def test_runner_waits_for_an_in_sync_line_as_of_a_given_moment(tmp_path: Path) -> None:
    lines = ["2026-01-01T00:00:00 ready files=3 bytes=10",
             "2026-01-01T00:00:01 in-sync as-of=1000 files=3 bytes=10",
             "2026-01-01T00:00:02 in-sync as-of=5000 files=4 bytes=12"]
    w = _Printer(tmp_path, lines)
    try:
        w.start(timeout=30)
        assert w.ready_files == 3
        assert w.wait_in_sync(4000, timeout=30) is not None
        first = w.wait_in_sync(500, timeout=1)
        later = w.wait_in_sync(4000, timeout=1)
        assert first is not None and later is not None and first <= later
        assert w.wait_in_sync(6000, timeout=0.2) is None
    finally:
        w.stop()


@needs_sshd
def test_benchmark_short_mode_measures_the_upgrade_scenario(tmp_path: Path) -> None:
    if not IN_CI and shutil.which("rsync") is None:
        pytest.skip("rsync not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--short", "--rtt-ms", "0",
         "--systems", "lsync,rsync", "--scenarios", "u", "--no-readme",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    row = next(line for line in out.splitlines()
               if line.startswith("| u. upgrade by git checkout while running (tiny tree"))
    assert "in-sync line" in row and "identical" in row and "CPU per 1,000 changed paths" in row
    assert "remote differs" not in row
    assert "(`--delete`)" in row and "local rsync + ssh" in row  # rsync's cell, its CPU
    goal = next(line for line in out.splitlines()
                if line.startswith("| upgrade by git checkout while running, tiny tree"))
    assert "(per 1,000 changed paths)" in goal


def test_profile_reader_counts_self_inclusive_and_threads(tmp_path: Path) -> None:
    from benchmarks.profile_sync import Profile, table

    raw = tmp_path / "raw.txt"
    raw.write_text("Thread 0x7f01 (active);main (a.py:10);work (a.py:20);hash (b.py:5) 30\n"
                   "Thread 0x7f01 (active);main (a.py:11);work (a.py:21) 10\n"
                   "Thread 0x7f02 (active);worker (c.py:1);hash (b.py:6) 60\n")
    prof = Profile.read(raw)
    assert prof.samples == 100
    assert prof.self_counts()["hash (b.py)"] == 90
    assert prof.inclusive_counts()["work (a.py)"] == 40
    assert prof.thread_counts() == {"Thread 0x7f01 (active)": 40, "Thread 0x7f02 (active)": 60}
    text = table(prof.self_counts(), 1000, 1, "self")
    assert text.splitlines()[2] == "| `hash (b.py)` | 0.900 | 90 |"


def test_profile_shares_each_threads_cpu_over_its_samples(tmp_path: Path) -> None:
    from benchmarks.profile_sync import Profile

    raw = tmp_path / "raw.txt"
    raw.write_text("thread (11): MainThread;main (a.py:1);pack (p.py:2) 30\n"
                   "thread (11): MainThread;main (a.py:1);select (s.py:3) 10\n"
                   "thread (12): read_0;worker (w.py:1);hash (h.py:2) 50\n"
                   "thread (11);main (a.py:1);pack (p.py:2) 40\n")  # the same thread, unnamed
    prof = Profile.read(raw)
    weighted = prof.cpu_weighted("self", {11: 8.0, 12: 2.0})
    assert weighted["pack (p.py)"] == pytest.approx(7.0)
    assert weighted["select (s.py)"] == pytest.approx(1.0)
    assert weighted["hash (h.py)"] == pytest.approx(2.0)
    inclusive = prof.cpu_weighted("inclusive", {11: 8.0, 12: 2.0})
    assert inclusive["main (a.py)"] == pytest.approx(8.0)


def test_cpu_follower_reads_the_cpu_of_matching_descendants_until_they_exit() -> None:
    from benchmarks import procstat

    marker = f"cpu-follower-{os.getpid()}"
    script = ("import sys, time\n"
              "end = time.process_time() + 0.3\n"
              "while time.process_time() < end:\n"
              "    pass\n"
              "sys.stdin.read()\n")
    children = [subprocess.Popen([sys.executable, "-c", script, marker], stdin=subprocess.PIPE)
                for _ in range(2)]
    follower = procstat.CpuFollower(os.getpid(), marker, scan_every=1)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                len(follower.last) < 2 or (follower.seconds or 0.0) < 0.5):
            follower.poll()
            time.sleep(0.02)
        assert sorted(follower.last) == sorted(c.pid for c in children)
        assert (follower.seconds or 0.0) >= 0.5
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=10)
    seen = follower.seconds
    follower.poll()  # the processes are gone: their last readings stay
    assert follower.seconds == seen
    assert procstat.find_descendants(os.getpid(), marker) == []
