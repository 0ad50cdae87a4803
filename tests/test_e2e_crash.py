"""End to end over a real sshd: lsync (and its agent) killed in the middle of work, restarted.

Issue 15, defect 10: after a crash the restarted lsync must still delete, on the remote,
every file lsync wrote there that is gone locally, and must never delete a remote file it
did not write. Ownership across a restart comes only from the agent's record of what lsync
wrote (the manifest's `written` field), so the holes are in operations in flight at the
crash: applied by an agent killed before it recorded them, or recorded by an agent that
outlived its client while the next one listed the tree and kept its own record.

The burst test: each attempt (seeded, LSYNC_CRASH_SEED; the moment of the kill varies) makes
a burst of creates, edits, editor saves, renames, copies and deletes, SIGKILLs lsync at a
random point of it (mid-burst with the burst going on while lsync is down, or right after
its end with the writes in flight), in half the attempts its agent too, starts lsync again
(at once or after the burst), and once it says `in-sync as-of=N` for a moment after the
burst (or ` ready ` when it started after it), compares once: the remote must equal the
local tree, apart from the files lsync never wrote (made on the remote by "the user" before
lsync started), which must all still be there unchanged. The frozen-link test: lsync
killed while its link is frozen leaves its agent running; the next session must not lose
what it wrote to that agent's last snapshot once the frozen link breaks.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import (
    LsyncProcess,
    counting_link_to,
    fresh_dirs,
    tree_differences,
    wait_until,
)

Start = Callable[..., LsyncProcess]

BURST = 650
ATTEMPTS = int(os.environ.get("LSYNC_CRASH_ATTEMPTS", "6"))
SEED = int(os.environ.get("LSYNC_CRASH_SEED", "10"))
READY_WAIT = 30.0
IN_SYNC_WAIT = 30.0


def _user_files(remote: Path) -> dict[str, bytes]:
    """Remote files lsync did not write: outputs of a build, notes, in their own places."""
    made = {}
    for i in range(12):
        made[f"build/out{i}.o"] = f"object {i}\n".encode()
        made[f"src/d{i % 4}/user{i}.txt"] = f"the user's notes {i}\n".encode()
    for rel, data in made.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_bytes(data)
    return made


def _burst(local: Path, rng: random.Random, files: list[str], events: dict[int, Callable[[], None]],
           pause_every: int, tag: str) -> None:
    """BURST operations on `files` (kept up to date): creates (named after `tag`), edits
    (some as an editor saves: a temporary file renamed over), renames, copies and deletes.
    `events[i]()` runs before operation i (BURST: after the last one)."""
    for step in range(BURST + 1):
        if step in events:
            events[step]()
        if step == BURST:
            break
        roll = rng.random()
        serial = step
        if roll < 0.3 or len(files) < 20:
            rel = f"src/d{rng.randrange(4)}/{tag}-{serial}.c"
            if rng.random() < 0.2:  # in a new directory
                rel = f"src/d{rng.randrange(4)}/{tag}-dir{serial}/f.c"
                (local / rel).parent.mkdir()
            (local / rel).write_bytes(rng.randbytes(rng.randrange(10, 3000)))
            files.append(rel)
        elif roll < 0.55:
            rel = rng.choice(files)
            (local / rel).write_bytes(rng.randbytes(rng.randrange(10, 3000)))
        elif roll < 0.65:
            rel = rng.choice(files)
            temp = local / f"{rel}.swp"
            temp.write_bytes(rng.randbytes(rng.randrange(10, 3000)))
            temp.rename(local / rel)
        elif roll < 0.72:
            rel = rng.choice([rel for rel in files if "-dir" not in rel] or files)
            new = f"src/d{rng.randrange(4)}/{tag}-{serial}.c"
            (local / rel).rename(local / new)
            files[files.index(rel)] = new
        elif roll < 0.77:
            new = f"src/d{rng.randrange(4)}/{tag}-{serial}.c"
            (local / new).write_bytes((local / rng.choice(files)).read_bytes())
            files.append(new)
        else:
            # Mostly files of this burst: lsync may still be writing them.
            recent = files[-40:]
            rel = rng.choice(recent if rng.random() < 0.7 else files)
            files.remove(rel)
            (local / rel).unlink()
            if "-dir" in rel:
                (local / rel).parent.rmdir()
        if pause_every and step % pause_every == 0:
            time.sleep(0.002)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rpartition(b")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _agents(sshd: PrivateSshd) -> list[int]:
    """The lsync agents our sshd runs (not the data lanes' pumps)."""
    assert sshd.pid is not None
    agents = []
    for pid in _descendants(sshd.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"lsync.agent.main" in cmdline:
            agents.append(pid)
    return agents


@dataclass
class Crashes:
    """One run's lsync processes and its kills (of the client, and maybe of its agent)."""

    sshd: PrivateSshd
    args: list[str]
    local: Path
    run_lsync: Start
    lsync: LsyncProcess
    delay: float = 0.0  # seconds between the burst's kill point and the kill
    agent_too: bool = False  # SIGKILL the agent as well, right after the client
    agents_killed: int = 0

    def kill(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        agents = _agents(self.sshd) if self.agent_too else []
        self.lsync.proc.kill()
        for pid in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.agents_killed += 1
        self.lsync.finish(timeout=10)
        # Dead and reaped: a zombie still "runs" for the next agent, which then keeps its
        # temporary files (reported separately; not what this test is about).
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in agents),
                          timeout=10)

    def restart(self) -> None:
        self.lsync = self.run_lsync(*self.args, cwd=self.local)

    def kill_and_restart(self) -> None:
        self.kill()
        self.restart()


def test_client_killed_mid_burst_then_restarted_deletes_what_it_wrote_and_nothing_else(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    local, remote = fresh_dirs(tmp_path)
    remote.mkdir()
    user = _user_files(remote)
    files = []
    for i in range(120):
        rel = f"src/d{i % 4}/f{i}.c"
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(f"int f{i}(void) {{ return {i}; }}\n" * 20)
        files.append(rel)
    delay = float(os.environ.get("LSYNC_CRASH_DELAY", "0"))
    with counting_link_to(sshd, delay) as link:
        args = link.connect_args(remote)
        lsync = run_lsync(*args, cwd=local)
        lsync.wait_for_line(" ready ", READY_WAIT)
        crashes = Crashes(sshd, args, local, run_lsync, lsync)
        failures = [problem for attempt in range(ATTEMPTS)
                    if (problem := _attempt(attempt, crashes, files, user, remote))]
        assert crashes.lsync.interrupt() == 0, crashes.lsync.stderr
    assert not failures, "\n".join(failures)


def _attempt(attempt: int, crashes: Crashes, files: list[str], user: dict[str, bytes],
             remote: Path) -> str:
    """A burst with a kill and a restart in it; what is wrong afterwards ("": nothing)."""
    rng = random.Random(SEED * 1000 + attempt)
    kill_at = rng.choice([rng.randrange(50, BURST), BURST])
    crashes.delay = rng.choice([0.0, 0.01, 0.05, 0.2]) if kill_at == BURST else 0.0
    crashes.agent_too = rng.random() < 0.5
    restart_at = rng.choice([BURST, min(BURST, kill_at + rng.randrange(0, 200))])
    pause_every = rng.choice([0, 5, 25])
    if restart_at == kill_at:
        events = {kill_at: crashes.kill_and_restart}
    else:
        events = {kill_at: crashes.kill, restart_at: crashes.restart}
    _burst(crashes.local, rng, files, events, pause_every, f"new{attempt}")
    done = time.time_ns()
    lsync = crashes.lsync
    lsync.wait_for_line(" ready ", READY_WAIT)
    if restart_at < BURST:  # else ` ready ` covers the whole burst
        lsync.wait_in_sync(done, IN_SYNC_WAIT)
    differences = tree_differences(crashes.local, remote,
                                   skip=lambda rel: rel in user or rel == "build")
    lost = [rel for rel, data in user.items()
            if not (remote / rel).is_file() or (remote / rel).read_bytes() != data]
    if not differences and not lost:
        return ""
    return (f"attempt {attempt} (kill before op {kill_at} + {crashes.delay} s, agent killed "
            f"too: {crashes.agent_too}, restart before op {restart_at}, pause every "
            f"{pause_every}): {len(differences)} differences, {len(lost)} user files "
            "lost:\n  " + "\n  ".join(differences[:10] + lost[:10]))


def test_agent_left_behind_a_frozen_link_never_hides_what_the_next_session_wrote(
        sshd: PrivateSshd, tmp_path: Path, run_lsync: Start) -> None:
    """lsync is killed while its link is frozen: its agent lives on (no EOF reaches it)
    while a new lsync starts and writes. When the old link finally breaks, the old agent
    must not save its stale record over the new one (it is ended when the new agent
    starts), so files the new session wrote and that are deleted while lsync is stopped
    are deleted at the next start."""
    local, remote = fresh_dirs(tmp_path)
    remote.mkdir()
    user = _user_files(remote)
    (local / "src").mkdir()
    (local / "src" / "a.c").write_text("int a;\n")
    with counting_link_to(sshd) as link:
        args = link.connect_args(remote)
        first = run_lsync(*args, cwd=local)
        first.wait_for_line(" ready ", READY_WAIT)
        (local / "src" / "b.c").write_text("int b;\n")  # the old agent's record changes
        first.wait_in_sync(time.time_ns())
        assert link.proxy.freeze() == 1
        first.proc.kill()
        first.finish(timeout=10)
        second = run_lsync(*args, cwd=local)
        second.wait_for_line(" ready ", READY_WAIT)
        made = [f"src/new{i}.c" for i in range(20)]
        for rel in made:
            (local / rel).write_text(f"/* {rel} */\n")
        second.wait_in_sync(time.time_ns())
        second.proc.kill()
        second.finish(timeout=10)
        link.proxy.cut()  # the frozen link breaks at last: the old agent sees its input end
        assert wait_until(lambda: not _agents(sshd), timeout=10)
        for rel in made:
            (local / rel).unlink()
        third = run_lsync(*args, cwd=local)
        third.wait_for_line(" ready ", READY_WAIT)
        theirs = set(user) | {str(Path(rel).parent) for rel in user}  # and their dirs
        differences = tree_differences(local, remote, skip=lambda rel: rel in theirs)
        assert third.interrupt() == 0, third.stderr
    assert not differences, "\n".join(differences)
    assert all((remote / rel).read_bytes() == data for rel, data in user.items())

