"""End to end: one `lsync connect` to three build hosts (issue 17).

Three targets through three delay proxies to the private sshd, each under its own alias
(`x86`, `arm`, `box3`) in one ssh config, each syncing to its own remote directory: one
watcher and one scan for all three, every save on every host, `lsync flush` a barrier
across them (or `--target NAME` for one), `lsync status` a line per host (`--json`: a list),
`lsync run` on the first target, `--on NAME`, or `--all` with prefixed output and the worst
exit status. One host cut (its proxy refusing new connections) or frozen must not hold
the others up, and must catch up once it can.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LsyncProcess, assert_same_now, assert_trees_equal, wait_until
from tests.gitrepo import is_build_output, make_repo
from tests.loopsession import lsync_cli

NAMES = ("x86", "arm", "box3")


@dataclass
class Fleet:
    local: Path
    remotes: dict[str, Path]
    proxies: dict[str, ThreadedProxy]
    config: Path
    lsync: LsyncProcess


@contextlib.contextmanager
def fleet(sshd: PrivateSshd, base: Path, delay: float = 0.0) -> Iterator[Fleet]:
    """Three targets syncing `base/local` (made here unless it exists)."""
    local = base / "local"
    if not local.exists():
        local.mkdir()
        (local / "README").write_text("fleet tests\n")
        (local / "src").mkdir()
        for i in range(20):
            (local / "src" / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i}; }}\n")
    remotes = {name: base / f"remote-{name}" for name in NAMES}
    with contextlib.ExitStack() as stack:
        proxies = {name: stack.enter_context(
            ThreadedProxy(("127.0.0.1", sshd.port), delay, handshake=delay > 0))
            for name in NAMES}
        parts = [sshd.write_client_config(base / f"ssh_config.{name}", port=proxy.port,
                                          alias=name).read_text()
                 for name, proxy in proxies.items()]
        config = base / "ssh_config"
        config.write_text("\n".join(parts))
        lsync = LsyncProcess(["connect", "-F", str(config),
                              *(f"{name}:{remotes[name]}" for name in NAMES)], cwd=local)
        try:
            lsync.wait_for_line(" ready ", timeout=90)
            yield Fleet(local, remotes, proxies, config, lsync)
        finally:
            if lsync.proc.poll() is None:
                assert lsync.interrupt() == 0, lsync.log_tail() + lsync.stderr
            else:
                lsync.finish(timeout=5)


@pytest.fixture(scope="module")
def three(sshd: PrivateSshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(sshd, tmp_path_factory.mktemp("fleet")) as running:
        yield running


def test_the_initial_sync_reaches_every_host_from_one_scan(three: Fleet) -> None:
    for remote in three.remotes.values():
        assert_same_now(three.local, remote)
    # One ready line for the run, one note per host; the tree was scanned once.
    assert three.lsync.count(" ready files=") == 1
    for name in NAMES:
        assert three.lsync.saw(f"note {name}: ready,"), three.lsync.log_tail()


def test_flush_is_a_barrier_across_every_host(three: Fleet) -> None:
    for round_ in range(3):
        (three.local / "src" / "saved.c").write_text(f"int saved = {round_};\n")
        flushed = lsync_cli("flush", "--timeout", "30", cwd=three.local)
        assert flushed.returncode == 0, flushed.stderr
        for remote in three.remotes.values():
            assert (remote / "src" / "saved.c").read_text() == f"int saved = {round_};\n"


def test_flush_of_one_target_and_an_unknown_name(three: Fleet) -> None:
    flushed = lsync_cli("flush", "--target", "arm", "--timeout", "30", cwd=three.local)
    assert flushed.returncode == 0, flushed.stderr
    unknown = lsync_cli("flush", "--target", "nope", cwd=three.local)
    assert unknown.returncode == 1
    assert "no target named 'nope'" in unknown.stderr and "x86, arm, box3" in unknown.stderr


def test_status_has_a_line_per_host_and_json_is_a_list(three: Fleet) -> None:
    shown = lsync_cli("status", cwd=three.local)
    assert shown.returncode == 0, shown.stderr
    for name in NAMES:
        assert f"{name}: " in shown.stdout
    listed = lsync_cli("status", "--json", cwd=three.local)
    hosts = json.loads(listed.stdout)
    assert [h["name"] for h in hosts] == list(NAMES)
    assert all(h["connected"] for h in hosts)
    assert [h["target"] for h in hosts] == [f"{n}:{three.remotes[n]}" for n in NAMES]


def test_run_goes_to_the_first_target_or_the_one_named(three: Fleet) -> None:
    first = lsync_cli("run", "--no-map-paths", "--", "pwd", cwd=three.local)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(three.remotes["x86"])
    on_arm = lsync_cli("run", "--on", "arm", "--no-map-paths", "--", "pwd", cwd=three.local)
    assert on_arm.returncode == 0, on_arm.stderr
    assert on_arm.stdout.strip() == str(three.remotes["arm"])


def test_pull_comes_from_the_first_target_or_the_one_named(three: Fleet) -> None:
    made = three.remotes["arm"] / "pulled-from-arm.log"  # (a build output of arm's alone)
    made.write_text("arm's build\n")
    here = three.local / "pulled-from-arm.log"
    try:
        first = lsync_cli("pull", "pulled-from-arm.log", cwd=three.local)
        assert first.returncode == 0, first.stderr
        assert "0 listed" in first.stderr and not here.exists()
        on_arm = lsync_cli("pull", "--on", "arm", "pulled-from-arm.log", cwd=three.local)
        assert on_arm.returncode == 0, on_arm.stderr
        assert here.read_text() == "arm's build\n"
        # Pulled, never pushed: after a flush of every target, the others do not have it.
        assert lsync_cli("flush", cwd=three.local).returncode == 0
        assert not (three.remotes["x86"] / "pulled-from-arm.log").exists()
        unknown = lsync_cli("pull", "--on", "nope", "pulled-from-arm.log", cwd=three.local)
        assert unknown.returncode == 1 and "no target named 'nope'" in unknown.stderr
    finally:
        made.unlink()
        here.unlink(missing_ok=True)


def test_run_on_all_prefixes_each_line_and_exits_with_the_worst(three: Fleet) -> None:
    # A file only arm's remote tree holds (lsync did not make it: it stays) makes the
    # command fail there.
    (three.remotes["arm"] / "only-here").write_text("x")
    try:
        ran = lsync_cli("run", "--all", "--", "sh", "-c",
                        "echo one; echo two; test -e only-here && exit 3; exit 0",
                        cwd=three.local)
    finally:
        (three.remotes["arm"] / "only-here").unlink()
    assert ran.returncode == 3, ran.stderr
    lines = ran.stdout.splitlines()
    for name in NAMES:
        assert [line for line in lines if line.startswith(f"[{name}] ")] == [
            f"[{name}] one", f"[{name}] two"], ran.stdout


def test_a_host_that_is_cut_and_refused_does_not_hold_up_the_others(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    with fleet(sshd, tmp_path) as running:
        down = running.proxies["box3"]
        down.set_accepting(False)
        down.cut()
        for i in range(5):
            (running.local / "src" / f"new{i}.c").write_text(f"int new{i};\n")
            for name in ("x86", "arm"):
                flushed = lsync_cli("flush", "--target", name, "--timeout", "20",
                                    cwd=running.local)
                assert flushed.returncode == 0, flushed.stderr
                assert (running.remotes[name] / "src" / f"new{i}.c").exists()
        waiting = lsync_cli("flush", "--timeout", "1", cwd=running.local)
        assert waiting.returncode == 1
        assert "box3: not connected" in waiting.stderr, waiting.stderr
        down.set_accepting(True)
        flushed = lsync_cli("flush", "--timeout", "60", cwd=running.local)
        assert flushed.returncode == 0, flushed.stderr + running.lsync.log_tail()
        for remote in running.remotes.values():
            assert_same_now(running.local, remote)


def test_a_frozen_host_catches_up_while_saves_keep_landing_on_the_others(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    with fleet(sshd, tmp_path) as running:
        running.proxies["arm"].freeze()
        started = time.monotonic()
        (running.local / "src" / "during.c").write_text("int during;\n")
        for name in ("x86", "box3"):
            flushed = lsync_cli("flush", "--target", name, "--timeout", "20",
                                cwd=running.local)
            assert flushed.returncode == 0, flushed.stderr
        assert time.monotonic() - started < 20
        # The frozen link is found dead (liveness) and the host reconnects through the
        # proxy, which takes new connections: then the barrier over every host passes.
        flushed = lsync_cli("flush", "--timeout", "90", cwd=running.local)
        assert flushed.returncode == 0, flushed.stderr + running.lsync.log_tail()
        for remote in running.remotes.values():
            assert_trees_equal(running.local, remote)
        assert wait_until(lambda: running.lsync.saw("arm: disconnected"), 5), \
            running.lsync.log_tail()


def test_a_checkout_reaches_every_host_also_one_frozen_while_it_lands(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "local")  # a real repository with history
    repo.checkout("v1")
    with fleet(sshd, tmp_path) as running:
        running.proxies["box3"].freeze()
        repo.checkout("v3")  # renames of directories, links retargeted, a file -> a dir
        for name in ("x86", "arm"):
            flushed = lsync_cli("flush", "--target", name, "--timeout", "60",
                                cwd=running.local)
            assert flushed.returncode == 0, flushed.stderr
            assert_same_now(running.local, running.remotes[name], is_build_output)
        flushed = lsync_cli("flush", "--timeout", "120", cwd=running.local)
        assert flushed.returncode == 0, flushed.stderr + running.lsync.log_tail()
        for remote in running.remotes.values():
            assert_same_now(running.local, remote, is_build_output)
