"""The crash faults of the torture test (`benchmarks.torture`): lsync, and maybe its agent,
killed with work in flight; the next lsync must still delete on the remote every file lsync
wrote there that is gone locally, and nothing else (issue 15, defect 10).

- `client_kill`: SIGKILL in the middle of a burst of 650 operations, with new files in
  flight that are deleted while lsync is down; half the time the agents are killed too (a
  crash of both sides); half the time lsync is started again at once, while its old agent
  may still be applying what it had received (then the files are deleted under the new
  session), else after the burst.
- `client_kill_frozen`: lsync (started afresh, its agent holding journaled changes that
  are in no snapshot yet) killed while its link is frozen: its agent lives on, behind the
  frozen link, with no EOF. A second lsync starts, writes new files and is stopped;
  then the frozen link breaks at last (the old agent sees its input end), the new files
  are deleted, and a third lsync starts. The old agent must not have saved its stale record
  over the second one's (the second agent ends it when it starts), or the third lsync does
  not know that lsync wrote the new files and leaves them on the remote.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

from benchmarks.bench import agent_record_files
from benchmarks.torture_faults import agent_pids
from tests.conftest import wait_until

if TYPE_CHECKING:
    from benchmarks.torture import Torture

BURST = 650
AGENTS_GONE = 15.0  # s for killed or ended agents to be gone


def kill_agents(torture: Torture) -> int:
    pids = agent_pids(torture.sshd.pid or 0)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def client_kill(torture: Torture) -> None:
    rng = torture.rng
    kill_at = rng.randint(BURST // 4, 3 * BURST // 4)
    at_once = rng.random() < 0.5
    work = torture.workload
    for i in range(BURST):
        if i == kill_at:
            # New files in flight when lsync dies, deleted while it is down (or under the
            # next session): lsync (or its agent) must still know which of them it wrote.
            before = len(work.created)
            work.create(rng.randint(10, 40))
            doomed = work.created[before:]
            del work.created[before:]
            time.sleep(rng.uniform(0.0, 0.2))  # how far the writes got
            torture.commander.transition()
            torture.client.kill()
            agents = kill_agents(torture) if rng.random() < 0.5 else 0
            torture.step(f"SIGKILL lsync (and {agents} agent processes) after {i} of "
                         f"{BURST} operations")
            if at_once:
                torture.new_client()
                torture.step("lsync started again at once")
            torture.step(work.delete_paths(doomed))
        roll = rng.random()
        if roll < 0.1:  # (not of the first-contact files: lsync did not write them)
            work.delete(1, spare=torture.first_contact)
        elif roll < 0.2:
            work.delete_created(1)
        elif roll < 0.35:
            work.create(1)
        else:
            work.edit(1)
    torture.step(f"burst of {BURST} edits, creates and deletes")
    if not at_once:
        torture.new_client()
        torture.step("lsync started again")


def _snapshot_mtime(torture: Torture) -> int:
    """When the agent's record snapshot of this run's remote tree was last written (0: none)."""
    times = [path.stat().st_mtime_ns for path in agent_record_files(torture.remote)
             if path.suffix == ".json" and path.exists()]
    return max(times, default=0)


def _wait_in_sync(torture: Torture, why: str, timeout: float = 60.0) -> None:
    """Wait (not a check: the round's end checks) for an in-sync line after a marker."""
    (torture.local / "torture-marker.txt").write_text(f"{why} {torture.rng.getrandbits(64):x}\n")
    mark = time.time_ns()
    client = torture.client
    wait_until(lambda: (client.in_sync_as_of() or 0) >= mark or not client.alive(), timeout)


def client_kill_frozen(torture: Torture) -> None:
    """See the module docstring. The first agent must hold changes not yet in a snapshot
    when its link freezes (it snapshots when its input has been quiet, at most every 30 s):
    so a fresh lsync, a first batch of files and the agent's snapshot after it, then a
    second batch (journaled, no snapshot due for 30 s), then the freeze."""
    rng = torture.rng
    work = torture.workload
    torture.restart_client()
    torture.step("lsync restarted (a fresh agent)")
    before = _snapshot_mtime(torture)
    torture.step(work.create(rng.randint(3, 10)))
    _wait_in_sync(torture, "first")
    wait_until(lambda: _snapshot_mtime(torture) != before, 10)
    torture.step(work.create(rng.randint(5, 20)))  # journaled by the first agent
    _wait_in_sync(torture, "journaled")
    frozen = torture.proxy.freeze()
    torture.commander.transition()
    torture.client.kill()
    torture.step(f"froze {frozen} connections, SIGKILL lsync (its agent lives on)")
    torture.new_client()
    torture.step("a second lsync started")
    before = len(work.created)
    torture.step(work.create(rng.randint(10, 30)))
    made = work.created[before:]
    del work.created[before:]
    _wait_in_sync(torture, "second")
    torture.commander.transition()
    torture.client.kill()
    torture.step("SIGKILL the second lsync after its writes")
    dropped = torture.proxy.cut()  # the frozen link breaks at last
    gone = wait_until(lambda: not agent_pids(torture.sshd.pid or 0), AGENTS_GONE)
    left = 0 if gone else kill_agents(torture)
    torture.step(f"cut {dropped} connections (the frozen one among them); "
                 f"{left} agents had to be killed")
    torture.step(work.delete_paths(made))
    torture.new_client()
    torture.step("a third lsync started")
