"""End to end over a real sshd: everyday git workflows on a real repository converge (issue 8).

Each test generates a git repository with real history (tests/gitrepo.py: a few hundred C
sources, headers, Makefiles and scripts, 33 commits with renames of files and directories, a
symlink to an in-tree directory, tags `v1`, `v2`, `v3` and a side branch `topic`), runs the
real `lsync connect` from its working tree to a remote tree behind the private sshd on
127.0.0.1, runs `make` in the REMOTE tree (build outputs lsync did not make: `*.o` next to the
sources, `.depend/*.o.d`, `build/objects.txt`, all ignored by the `.gitignore`), then does
what a developer does: checkouts between distant tags both ways, `git stash` and `pop`,
`git rebase`, `git clean -fdx`, directory moves and renames over another directory, a
directory of remote build outputs replaced by a file, a restart after deleting files and
checking out another tag while lsync was stopped, a burst of 2,000 new files past a lowered
inotify queue. Also the reduced case of symptom 1: a symlink to an in-tree directory removed,
then a file in that directory edited.

After each step the test takes `time.time_ns()` and waits (bounded) for lsync's log line
`in-sync as-of=<N>` with N at or after that moment: lsync's promise that every local change
made before N is on the remote and acknowledged. Right then, without polling, the remote must
equal the local tree (content, mode, links; `.git/` and ignored paths aside), except
directories that lsync kept because they still hold build outputs, and every remote build
output made so far must still exist somewhere in the remote tree (moved along with its
directory is fine, deleted is not: checked by a content-addressed inventory). After the
restart the check is made right after ` ready ` (the initial sync is done).
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LsyncProcess, snapshot
from tests.gitrepo import GitRepo, is_build_output, make_repo

Start = Callable[..., LsyncProcess]

IN_SYNC_WAIT = 10.0  # seconds: a few hundred files on 127.0.0.1, verification rescan included
BURST_WAIT = 30.0  # seconds: the overflow test's 2,000 files and its rescan
READY_WAIT = 60.0
MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


# -- what every test checks -------------------------------------------------------------------


def _describe(entry: object) -> str:
    if entry is None:
        return "absent"
    assert isinstance(entry, tuple)
    if entry[0] == "file":
        return f"file {len(entry[1])} B mode {entry[2]:o} {hashlib.sha1(entry[1]).hexdigest()[:8]}"
    if entry[0] == "dir":
        return f"dir mode {entry[1]:o}"
    return f"link -> {entry[1]}"


def output_holders(remote: Path) -> set[str]:
    """Every remote directory (relative) that holds a build output somewhere below it."""
    holders: set[str] = set()
    for top, dirs, files in os.walk(remote):
        for name in dirs + files:
            rel = (Path(top) / name).relative_to(remote).as_posix()
            if is_build_output(rel) and ".git" not in rel.split("/"):
                parts = rel.split("/")
                holders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return holders


def tree_differences(local: Path, remote: Path, kept: Collection[str] = ()) -> list[str]:
    """How the remote differs from the local tree, one line per path.

    Ignored paths and `.git/` are left out on both sides. Not differences: a remote directory
    absent locally that still holds build outputs (lsync must keep it, or the outputs moved
    there), and the paths in `kept` (checked by the caller)."""
    want = snapshot(local, is_build_output)
    have = snapshot(remote, is_build_output)
    holders = output_holders(remote)
    found = []
    for rel in sorted(set(want) | set(have)):
        mine, theirs = want.get(rel), have.get(rel)
        if mine == theirs or rel in kept or any(rel.startswith(k + "/") for k in kept):
            continue
        if mine is None and isinstance(theirs, tuple) and theirs[0] == "dir" and rel in holders:
            continue
        found.append(f"{rel}: local {_describe(mine)}, remote {_describe(theirs)}")
    return found


def assert_converged(local: Path, remote: Path, what: str, kept: Collection[str] = ()) -> None:
    """The remote equals the local tree NOW (no waiting): see `tree_differences`."""
    found = tree_differences(local, remote, kept)
    if found:
        raise AssertionError(f"after {what}: {len(found)} paths differ:\n  "
                             + "\n  ".join(found[:40]))


def build_outputs(remote: Path) -> dict[str, bytes]:
    """Every remote build output (ignored file) by relative path -> digest of its content."""
    found = {}
    for top, dirs, files in os.walk(remote):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            full = Path(top) / name
            rel = full.relative_to(remote).as_posix()
            if is_build_output(rel) and not full.is_symlink():
                found[rel] = hashlib.blake2b(full.read_bytes(), digest_size=16).digest()
    return found


def assert_outputs_kept(before: dict[str, bytes], remote: Path, what: str) -> None:
    """Every build output in `before` still exists somewhere under `remote` (by content)."""
    now = collections.Counter(build_outputs(remote).values())
    missing = collections.Counter(before.values()) - now
    if missing:
        lost = sorted(rel for rel, d in before.items() if d in missing)
        raise AssertionError(f"after {what}: {sum(missing.values())} of {len(before)} remote "
                             f"build outputs are gone, e.g. {lost[:15]}")


# -- a generated repository synced by a running lsync ------------------------------------------


@dataclass
class RealTree:
    repo: GitRepo
    local: Path
    remote: Path
    sshd: PrivateSshd
    start: Start
    lsync: LsyncProcess | None = None
    outputs: dict[str, bytes] = field(default_factory=dict)

    def connect(self) -> LsyncProcess:
        """Start `lsync connect` in the working tree and wait for ` ready `."""
        self.lsync = self.start("connect", "-F", str(self.sshd.client_config),
                                f"{self.sshd.alias}:{self.remote}", cwd=self.local)
        self.lsync.wait_for_line(" ready ", timeout=READY_WAIT)
        return self.lsync

    def stop(self) -> None:
        assert self.lsync is not None
        status = self.lsync.interrupt()
        assert status == 0, (status, self.lsync.stderr)

    def make_remotely(self) -> None:
        """Run `make` in the remote tree; remember every build output it holds."""
        done = subprocess.run(["make", "-s", "-j4", "-C", str(self.remote)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"remote make failed:\n{done.stdout}{done.stderr}"
        self.outputs = build_outputs(self.remote)
        assert any(rel.endswith(".o") for rel in self.outputs)

    def converged(self, since_ns: int, what: str, timeout: float = IN_SYNC_WAIT) -> None:
        """lsync says in-sync as of after `since_ns`; right then the trees are equal and no
        remote build output is lost."""
        assert self.lsync is not None
        self.lsync.wait_in_sync(since_ns, timeout)
        assert_converged(self.local, self.remote, what)
        assert_outputs_kept(self.outputs, self.remote, what)

    def git(self, *args: str) -> int:
        """Run a git command in the working tree; return the time right after it."""
        self.repo.git(*args)
        return time.time_ns()


@pytest.fixture
def real_tree(sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> RealTree:
    repo = make_repo(tmp_path / "local")
    return RealTree(repo, repo.path, tmp_path / "remote", sshd, run_lsync)


# -- scenarios --------------------------------------------------------------------------------


def test_checkout_between_distant_tags_both_ways_converges_and_keeps_build_outputs(
        real_tree: RealTree) -> None:
    t = real_tree
    changed = t.repo.changed_paths("v1", "v3")
    # The checkout touches the targets of both in-tree directory links.
    assert any(p.startswith("gui/") for p in changed)
    assert any(p.startswith("arch/arm/dts/") for p in changed)
    t.git("checkout", "-q", "v1")
    t.connect()
    t.make_remotely()
    t.converged(t.git("checkout", "-q", "v3"), "checkout v1 -> v3")
    t.make_remotely()
    t.converged(t.git("checkout", "-q", "v1"), "checkout v3 -> v1")
    t.converged(t.git("checkout", "-q", "v3"), "checkout v1 -> v3 again")


def test_stash_and_stash_pop_of_edits_across_many_files_converge(real_tree: RealTree) -> None:
    t = real_tree
    t.connect()
    t.make_remotely()
    files = [rel for rel in t.repo.tracked() if "/" in rel and not (t.local / rel).is_symlink()]
    for i, rel in enumerate(files[::3]):  # edits in about a hundred files
        with open(t.local / rel, "a") as handle:
            handle.write(f"/* work in progress {i} */\n" if rel.endswith((".c", ".h"))
                         else f"# work in progress {i}\n")
    for rel in files[1:60:10]:
        (t.local / rel).unlink()
    for i in range(3):
        (t.local / "core" / f"wip{i}.c").write_text(f"int wip{i}(void) {{ return {i}; }}\n")
    t.repo.git("add", "core")
    t.converged(time.time_ns(), "edits across many files")
    t.converged(t.git("stash", "-q"), "git stash")
    t.make_remotely()
    t.converged(t.git("stash", "pop", "-q"), "git stash pop")


def test_rebase_of_a_side_branch_and_its_undo_converge(real_tree: RealTree) -> None:
    t = real_tree
    t.git("checkout", "-q", "topic")
    t.connect()
    t.make_remotely()
    t.converged(t.git("rebase", "-q", "main"), "git rebase main (topic from v2 onto v3)")
    t.make_remotely()
    t.converged(t.git("reset", "-q", "--hard", "ORIG_HEAD"), "git reset --hard ORIG_HEAD")


def test_git_clean_fdx_deletes_what_lsync_synced_and_keeps_remote_build_outputs(
        real_tree: RealTree) -> None:
    t = real_tree
    t.connect()
    # Local build outputs (ignored, never synced) and untracked files lsync does sync.
    done = subprocess.run(["make", "-s", "-j4", "-C", str(t.local)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (t.local / "scratch").mkdir()
    (t.local / "scratch" / "notes.txt").write_text("try the other lock order\n")
    (t.local / "core" / "experiment.c").write_text("int experiment(void) { return 42; }\n")
    (t.local / "drivers" / "net" / "wip.h").write_text("#define WIP 1\n")
    t.converged(time.time_ns(), "local make and untracked files")
    assert (t.remote / "scratch" / "notes.txt").exists()
    assert not (t.remote / "core" / "core0.o").exists(), "a local build output was synced"
    t.make_remotely()
    assert (t.remote / "core" / "experiment.o").exists()
    t.converged(t.git("clean", "-q", "-f", "-d", "-x"), "git clean -fdx")
    assert not (t.local / "core" / "core0.o").exists()
    assert not (t.remote / "scratch").exists()
    assert not (t.remote / "core" / "experiment.c").exists()


def test_edit_in_a_directory_after_removing_a_symlink_to_it_reaches_the_remote(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "a").mkdir(parents=True)
    (local / "a" / "f.c").write_text("int f(void) { return 1; }\n")
    (local / "s").mkdir()
    (local / "s" / "link").symlink_to("../a")
    lsync = run_lsync("connect", "-F", str(sshd.client_config), f"{sshd.alias}:{remote}",
                      cwd=local)
    lsync.wait_for_line(" ready ", timeout=READY_WAIT)
    assert_converged(local, remote, "the initial sync")
    assert (remote / "s" / "link").is_symlink()
    (local / "s" / "link").unlink()
    lsync.wait_in_sync(time.time_ns(), IN_SYNC_WAIT)
    assert_converged(local, remote, "rm s/link")
    (local / "a" / "f.c").write_text("int f(void) { return 2; }\n")
    lsync.wait_in_sync(time.time_ns(), IN_SYNC_WAIT)
    assert_converged(local, remote, "an edit of a/f.c")
    (local / "a" / "g.c").write_text("int g(void) { return 3; }\n")
    lsync.wait_in_sync(time.time_ns(), IN_SYNC_WAIT)
    assert_converged(local, remote, "a new file a/g.c")


def test_restart_deletes_what_lsync_wrote_and_was_deleted_while_stopped(
        real_tree: RealTree) -> None:
    t = real_tree
    t.connect()
    t.make_remotely()
    v1 = set(t.repo.git("ls-tree", "-r", "--name-only", "v1").splitlines())
    common = sorted(rel for rel in t.repo.tracked() if rel in v1 and rel.startswith("docs/")
                    and not (t.local / rel).is_symlink())
    changed_remotely = common[0]
    (t.remote / changed_remotely).write_text("edited on the build machine\n")
    t.stop()
    # While lsync is stopped: another distant tag, then deletions of files and directories.
    t.repo.git("checkout", "-q", "v1")
    deleted = [rel for rel in sorted(v1) if rel.startswith(("core/", "include/linux/"))
               and not (t.local / rel).is_symlink()][::4]
    for rel in [changed_remotely, *deleted]:
        (t.local / rel).unlink()
    assert not [rel for rel in t.outputs if rel.startswith("t/")]
    shutil.rmtree(t.local / "t")  # test scripts only: no build outputs there
    shutil.rmtree(t.local / "drivers" / "gpu")  # holds remote build outputs
    assert (t.remote / "drivers" / "gpu" / "gpu0.o").exists()
    t.connect()
    assert_converged(t.local, t.remote, "a restart after deletions and a checkout",
                     kept=[changed_remotely])
    assert (t.remote / changed_remotely).read_text() == "edited on the build machine\n", \
        f"{changed_remotely}, changed on the remote since lsync wrote it, was not kept"
    assert_outputs_kept(t.outputs, t.remote, "a restart after deletions and a checkout")
    assert (t.remote / "drivers" / "gpu" / "gpu0.o").exists()
    assert not (t.remote / "drivers" / "gpu" / "gpu0.c").exists()
    assert not (t.remote / "t").exists()


def test_remote_build_outputs_survive_directory_moves_and_renames_over(
        real_tree: RealTree) -> None:
    t = real_tree
    t.connect()
    t.make_remotely()
    net = t.local / "drivers" / "net"
    assert (t.remote / "drivers" / "net" / ".depend" / "net0.o.d").exists()
    assert (t.remote / "drivers" / "net" / "phy" / ".depend").is_dir()

    os.rename(net, t.local / "lib" / "net")
    t.converged(time.time_ns(), "mv drivers/net lib/net (another parent)")
    os.rename(t.local / "lib" / "net", net)
    t.converged(time.time_ns(), "mv lib/net drivers/net (and back)")
    os.rename(net, t.local / "drivers" / "net-old")
    os.rename(t.local / "drivers" / "usb-core", net)
    t.converged(time.time_ns(), "mv drivers/net drivers/net-old; mv drivers/usb-core drivers/net")
    (t.local / "lib" / "empty").mkdir()
    t.converged(time.time_ns(), "mkdir lib/empty")
    os.rename(t.local / "drivers" / "net-old", t.local / "lib" / "empty")  # over an empty dir
    t.converged(time.time_ns(), "rename drivers/net-old over the empty lib/empty")


def test_directory_of_remote_build_outputs_replaced_by_a_file_converges_and_keeps_them(
        real_tree: RealTree) -> None:
    t = real_tree
    t.connect()
    t.make_remotely()
    gpu = t.local / "drivers" / "gpu"
    assert (t.remote / "drivers" / "gpu" / ".depend").is_dir()
    shutil.rmtree(gpu)
    gpu.write_text("the gpu driver moved out of tree\n")
    # The remote drivers/gpu holds build outputs: to put the file there, lsync has to move
    # them elsewhere in the remote tree; it may not delete them, nor stay different.
    t.converged(time.time_ns(), "drivers/gpu replaced by a file")
    assert (t.remote / "drivers" / "gpu").read_text() == "the gpu driver moved out of tree\n"


@pytest.fixture
def small_inotify_queue() -> Iterator[Callable[[], None]]:
    """Lower fs.inotify.max_queued_events to 64 for inotify instances created from now on;
    yields a function that puts the old value back (also done at the end, whatever happens).

    The limit is global: the test restores it as soon as lsync's watcher exists."""
    reason = ""
    try:
        old = MAX_QUEUED_EVENTS.read_text()
        MAX_QUEUED_EVENTS.write_text("64\n")
    except OSError as exc:
        reason = f"cannot lower {MAX_QUEUED_EVENTS} ({exc}; uid {os.getuid()})"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must run this test: {reason}")
        pytest.skip(reason)

    def restore() -> None:
        MAX_QUEUED_EVENTS.write_text(old)

    try:
        yield restore
    finally:
        restore()


def test_burst_past_a_small_inotify_queue_converges(
        real_tree: RealTree, small_inotify_queue: Callable[[], None]) -> None:
    t = real_tree
    t.connect()  # its watcher is created with a 64-event queue
    small_inotify_queue()
    t.make_remotely()
    # Deletions and edits outside the targets of the in-tree directory links (gui/ and
    # arch/arm/dts/), so that only lost events can leave a difference behind.
    # The top-level files (.gitignore, Makefile) stay.
    files = [rel for rel in t.repo.tracked() if "/" in rel and not (t.local / rel).is_symlink()
             and not rel.startswith(("gui/", "arch/arm/dts/"))]
    assert len(files) >= 240
    for i in range(2000):
        directory = t.local / ("burst" if i < 1000 else "core") / f"d{i % 40:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:04d}.c").write_text(f"int burst{i}(void) {{ return {i}; }}\n")
    for rel in files[0:240:2]:
        (t.local / rel).unlink()
    for rel in files[1:240:2]:
        with open(t.local / rel, "a") as handle:
            handle.write("\n")
    t.converged(time.time_ns(), "2,000 new files, 120 deleted, 120 changed",
                timeout=BURST_WAIT)
