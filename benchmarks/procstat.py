"""CPU time and memory of running processes, read from Linux's /proc.

`cpu_seconds(pid)` is the user + system time a process (all its threads) has used so far,
from fields 14 and 15 of ``/proc/<pid>/stat`` in clock ticks (1/100 s here);
`memory(pid)` reads ``VmRSS`` and ``VmHWM`` (peak resident set) from ``/proc/<pid>/status``;
`idle_cpu(pid, seconds)` is the share of one core a process used over a window in which the
caller does nothing to it. `find_descendant(root_pid, needle)` finds the newest living
process below `root_pid` whose command line contains `needle` — this is how the benchmark
finds lsync's agent, a ``python3 -c <loader>`` process spawned by the private sshd.
`CpuFollower` follows such processes' CPU until they exit (rsync's server side).
`load_average()` and `machine_busy(seconds)` say how loaded the machine is (other users'
work on a shared machine skews every figure).
Every function raises `ProcessGone` when the process has exited.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessGone(RuntimeError):
    """The process exited (or never existed) while it was being measured."""


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(path) from exc


def _stat_fields(pid: int) -> list[str]:
    text = _read(f"/proc/{pid}/stat")
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by `pid` so far (all threads; not its children)."""
    fields = _stat_fields(pid)
    # After the name: field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used by `pid` so far (all threads)."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def parent_pid(pid: int) -> int:
    return int(_stat_fields(pid)[1])


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks after boot (field 22)."""
    return int(_stat_fields(pid)[19])


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes resident now (VmRSS)
    peak: int  # bytes resident at most so far (VmHWM)


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    if "VmRSS" not in values or "VmHWM" not in values:
        raise ProcessGone(f"/proc/{pid}/status has no VmRSS/VmHWM (a zombie?)")
    return Memory(rss=values["VmRSS"], peak=values["VmHWM"])


def idle_cpu(pid: int, seconds: float) -> float:
    """Share of one core (0.0-1.0) that `pid` used over the next `seconds` of wall time."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    deadline = t0 + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessGone(f"process {pid} exited while idle")
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return (c1 - c0) / (t1 - t0)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _descends_from(pid: int, root_pid: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root_pid:
            return True
        try:
            pid = parent_pid(pid)
        except (ProcessGone, ValueError, IndexError):
            return False
        seen += 1
    return pid == root_pid


def _matching(root_pid: int, needle: str) -> list[tuple[int, int]]:
    """(start ticks, pid) of the living processes below `root_pid` whose command line
    contains `needle`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == root_pid or needle not in _cmdline(pid):
            continue
        try:
            if not _descends_from(pid, root_pid):
                continue
            found.append((start_ticks(pid), pid))
        except (ProcessGone, ValueError, IndexError):
            continue
    return found


def find_descendant(root_pid: int, needle: str) -> int | None:
    """The newest living process below `root_pid` whose command line contains `needle`."""
    found = _matching(root_pid, needle)
    return max(found)[1] if found else None


def find_descendants(root_pid: int, needle: str) -> list[int]:
    """Every living process below `root_pid` whose command line contains `needle`."""
    return sorted(pid for _, pid in _matching(root_pid, needle))


def load_average() -> float:
    """The machine's 1-minute load average (/proc/loadavg)."""
    return float(_read("/proc/loadavg").split()[0])


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat's first line)."""
    values = [int(v) for v in _read("/proc/stat").splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def machine_busy(seconds: float) -> float:
    """Share (0.0-1.0) of all CPUs busy over the next `seconds`: what other processes use
    while the caller waits (the benchmark measures it before it starts anything)."""
    b0, t0 = _busy_ticks()
    time.sleep(seconds)
    b1, t1 = _busy_ticks()
    return (b1 - b0) / max(1, t1 - t0)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each living thread of `pid`, by thread id (the ids a
    sampling profiler such as py-spy names its threads by)."""
    return {tid: user + system for tid, (user, system) in thread_cpu_split(pid).items()}


def thread_cpu_split(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each living thread of `pid`, by thread id."""
    out: dict[int, tuple[float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(str(pid)) from exc
    for name in tids:
        try:
            text = _read(f"/proc/{pid}/task/{name}/stat")
        except ProcessGone:
            continue  # the thread ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        out[int(name)] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    return out


class CpuFollower:
    """Follows the CPU of the processes below `root_pid` whose command line contains
    `needle` (say rsync's server, which forks a receiver and a generator, below the sshd)
    while the caller waits for something else: `poll()` now and then (it looks for new such
    processes every `scan_every` polls), `seconds` is the sum of their last CPU readings
    (so at most one poll interval of each one's CPU is missed)."""

    def __init__(self, root_pid: int, needle: str, scan_every: int = 3) -> None:
        self.root_pid = root_pid
        self.needle = needle
        self.scan_every = scan_every
        self.last: dict[int, float] = {}
        self._polls = 0

    @property
    def seconds(self) -> float | None:
        return sum(self.last.values()) if self.last else None

    def poll(self) -> None:
        if self._polls % self.scan_every == 0:
            for pid in find_descendants(self.root_pid, self.needle):
                self.last.setdefault(pid, 0.0)
        self._polls += 1
        for pid in list(self.last):
            with contextlib.suppress(ProcessGone):
                self.last[pid] = cpu_seconds(pid)
