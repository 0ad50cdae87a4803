"""What ran where, for the heading of a benchmark's report: the machine, lsync's commit, and
the installed lsync.

`machine_description()` is one line: host, CPU, CPUs, RAM, kernel, Python, and the versions
of ssh, rsync and lsyncd. `lsync_commit()` is this working tree's commit, with a note when
client/, agent/ or protocol/ have uncommitted changes. `installed_lsync()` is a digest of
the lsync package that runs (others may reinstall it while a benchmark runs) and whether it
is this working tree's. They run a few short commands (ssh, rsync and lsyncd for their
versions: at most 10 s each, one not installed is "missing"; git for the commit). Split from
benchmarks/run.py; shared by benchmarks.run, benchmarks.fleet, benchmarks.pull and
benchmarks.slow_link.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import subprocess
from pathlib import Path


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "missing"
    return ((proc.stdout + proc.stderr).strip().splitlines() or ["?"])[0]


def machine_description() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {mem}, Linux "
            f"{platform.release()}, Python {platform.python_version()}; "
            f"{_first_line(['ssh', '-V'])}; {_first_line(['rsync', '--version'])}; "
            f"lsyncd {_first_line(['lsyncd', '--version'])}")


def lsync_commit() -> str:
    """`git rev-parse --short HEAD` of this working tree, with " + uncommitted changes in
    client/agent/protocol" when `git status` lists any there."""
    root = Path(__file__).resolve().parent.parent
    head = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "client",
                            "agent", "protocol"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return head + (" + uncommitted changes in client/agent/protocol" if dirty else "")


def _py_digest(dirs: dict[str, Path]) -> str:
    """sha256 over the .py files (relative path and bytes) of each named directory."""
    h = hashlib.sha256()
    for name, base in sorted(dirs.items()):
        for path in sorted(base.rglob("*.py")):
            h.update(f"{name}/{path.relative_to(base).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def installed_lsync() -> str:
    """A digest of the lsync that runs (the installed package, which others may reinstall
    while the benchmark runs), and whether it is this working tree's client/agent/protocol."""
    try:
        spec = importlib.util.find_spec("lsync.client")
    except ImportError:
        return "not installed"
    if spec is None or not spec.submodule_search_locations:
        return "not installed"
    installed = Path(next(iter(spec.submodule_search_locations))).parent
    root = Path(__file__).resolve().parent.parent
    names = ("client", "agent", "protocol")
    digest = _py_digest({n: installed / n for n in names})
    same = digest == _py_digest({n: root / n for n in names})
    return f"{digest} ({'same as' if same else 'differs from'} the working tree)"
