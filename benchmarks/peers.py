"""Runners for the systems lsync is compared with, on the same (simulated) link.

The peers, all from Debian's packages: one-shot ``rsync -az -e "ssh -F cfg"`` (an initial
sync, or a given set of changed files); the original blog script (``inotifywait -r -m -e
close_write`` piped into one ``rsync -az`` per file), with an OpenSSH ControlMaster already
open and without one; and lsyncd (``default.rsyncssh`` with ``delay = 0``) from a generated
config. Every peer reaches the "remote" through an ssh client config (`Link`), so putting a
delay proxy's config there puts the peer on the slow link.

The remote tree lives on this same machine, so "synced" is observed directly: `save_file`
saves a file the way an editor does (truncate-and-write, or write-temp-then-rename) and
`wait_identical` polls the remote copy every ~1 ms until it is byte-identical. Continuous
peers (`BlogScript`, `Lsyncd`) share the `Watcher` shape: ``start()`` returns once they watch
(and finished their own initial sync), ``stop()`` ends every process they started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

SaveMode = Literal["truncate", "rename"]
SAVE_MODES: tuple[SaveMode, ...] = ("truncate", "rename")

POLL_SECONDS = 0.001
# Re-read a remote file whose metadata looks unchanged at least this often (timestamps on
# ext4 move in clock ticks, so an in-place rewrite can keep the same mtime).
FORCED_REREAD_SECONDS = 0.05

# Debian packages that provide the peers and the testbed's sshd.
PEER_PACKAGES = ("openssh-server", "openssh-client", "rsync", "inotify-tools", "lsyncd")
PEER_BINARIES = {
    "/usr/sbin/sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",
    "inotifywait": "inotify-tools",
    "lsyncd": "lsyncd",
}


class PeerError(RuntimeError):
    """A peer could not be set up, started or run. `code` says which:

    "missing-tool", "install", "start-timeout", "exited", "control-master", "rsync".
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


def missing_tools() -> list[str]:
    """Binaries the peers need that are not installed (by the name checked)."""
    missing = []
    for binary in PEER_BINARIES:
        found = os.path.exists(binary) if binary.startswith("/") else shutil.which(binary)
        if not found:
            missing.append(binary)
    return missing


def ensure_peer_tools(install: bool = True) -> None:
    """Make sure sshd, ssh, rsync, inotifywait and lsyncd exist; apt-get them if allowed."""
    missing = missing_tools()
    if not missing:
        return
    packages = sorted({PEER_BINARIES[b] for b in missing})
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PeerError("missing-tool", f"missing {missing}: install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                         *packages]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PeerError("install", f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
    still = missing_tools()
    if still:
        raise PeerError("install", f"still missing after apt-get: {still}")


@dataclass(frozen=True)
class Link:
    """How a peer reaches the remote tree: ``ssh -F ssh_config alias``, tree at remote_dir."""

    ssh_config: Path
    alias: str
    remote_dir: Path

    @property
    def rsh(self) -> str:
        """The ssh command line for rsync's ``-e`` (and RSYNC_RSH)."""
        return f"ssh -F {self.ssh_config}"

    def dest(self, rel: str = "") -> str:
        """rsync destination ``alias:/remote/dir/rel``."""
        base = str(self.remote_dir).rstrip("/")
        return f"{self.alias}:{base}/{rel}" if rel else f"{self.alias}:{base}/"


# -- saving and observing ---------------------------------------------------------------------


def save_file(path: Path, data: bytes, mode: SaveMode = "truncate", fsync: bool = False) -> float:
    """Save `data` to `path` like an editor; return time.perf_counter() when the save is done.

    "truncate": open the file with O_TRUNC and write it (close_write fires on it).
    "rename": write ``.<name>.tmp`` beside it, then rename it over the original.
    """
    if mode == "truncate":
        with open(path, "wb") as f:
            f.write(data)
            if fsync:
                os.fsync(f.fileno())
    elif mode == "rename":
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        raise ValueError(f"unknown save mode {mode!r}")
    return time.perf_counter()


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RemoteFile:
    """Checks whether one remote file holds the expected bytes, reading it only when needed."""

    def __init__(self, path: Path, expected: bytes) -> None:
        self.path = path
        self.expected = expected
        self.last_key: tuple[int, int, int, int] | None = None
        self.last_read = 0.0

    def identical(self, now: float) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if st.st_size != len(self.expected):
            self.last_key = None
            return False
        key = _stat_key(st)
        if key == self.last_key and now - self.last_read < FORCED_REREAD_SECONDS:
            return False
        self.last_key, self.last_read = key, now
        try:
            with open(self.path, "rb") as f:
                return f.read() == self.expected
        except FileNotFoundError:
            return False


def wait_identical(
    remote_path: Path, expected: bytes, timeout: float, poll: float = POLL_SECONDS
) -> float | None:
    """Poll until `remote_path` holds exactly `expected`; return perf_counter() then, or None."""
    remote = RemoteFile(remote_path, expected)
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if remote.identical(now):
            return now
        if now >= deadline:
            return None
        time.sleep(poll)


@dataclass(frozen=True)
class BurstResult:
    seconds: float | None  # until every file was identical; None if the timeout hit first
    done: int  # files identical by the end
    total: int


def wait_all_identical(
    expected: Sequence[tuple[Path, bytes]], t0: float, timeout: float, poll: float = POLL_SECONDS
) -> BurstResult:
    """Poll until every remote path holds its bytes; times are measured from `t0`."""
    pending = [RemoteFile(p, data) for p, data in expected]
    deadline = t0 + timeout
    while True:
        now = time.perf_counter()
        pending = [r for r in pending if not r.identical(now)]
        if not pending:
            return BurstResult(time.perf_counter() - t0, len(expected), len(expected))
        if now >= deadline:
            return BurstResult(None, len(expected) - len(pending), len(expected))
        time.sleep(poll)


def measure_save(
    local_path: Path,
    remote_path: Path,
    data: bytes,
    mode: SaveMode = "truncate",
    timeout: float = 30.0,
) -> float | None:
    """Save `data` locally; seconds from the end of the save until the remote copy is
    identical, or None if it never was within `timeout` (e.g. a peer that misses renames)."""
    t0 = save_file(local_path, data, mode)
    t1 = wait_identical(remote_path, data, timeout)
    return None if t1 is None else t1 - t0


# -- process helpers --------------------------------------------------------------------------


def _wait_for_text(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float,
                   what: str) -> None:
    """Poll the log file `path` until it contains `needle`; fail if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if needle in path.read_text(errors="replace"):
                return
        if proc.poll() is not None:
            raise PeerError("exited", f"{what} exited with {proc.returncode}: {_tail(path)}")
        time.sleep(0.01)
    raise PeerError("start-timeout", f"{what} not ready after {timeout}s: {_tail(path)}")


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except FileNotFoundError:
        return "(no log)"


def _stop_group(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM the process group we created for `proc` (then SIGKILL), and reap `proc`."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None and pgid == proc.pid:  # only a group this module created
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if pgid is not None and pgid == proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(timeout=timeout)
    if pgid is not None and pgid == proc.pid:
        # Children (rsync, ssh) may outlive the leader for a moment: make sure they go.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


class Watcher(Protocol):
    """A continuous syncer: start() once it watches (and its initial sync is done)."""

    name: str

    def start(self, timeout: float = 300.0) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


# -- rsync (one shot) -------------------------------------------------------------------------


@dataclass(frozen=True)
class RsyncResult:
    seconds: float
    returncode: int
    stderr: str


def rsync_push(
    local_dir: Path,
    link: Link,
    files: Iterable[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    check: bool = True,
) -> RsyncResult:
    """``rsync -az -e "ssh -F cfg" local_dir/ alias:remote_dir/`` and its wall time.

    With `files` (paths relative to `local_dir`), only those are sent (``--files-from``),
    as for "the changed set" after a burst.
    """
    argv = ["rsync", "-az", "-e", link.rsh, *extra_args]
    stdin: bytes | None = None
    if files is not None:
        argv += ["--from0", "--files-from=-"]
        stdin = b"\0".join(f.encode() for f in files)
    argv += [f"{str(local_dir).rstrip('/')}/", link.dest()]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    err = proc.stderr.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        raise PeerError("rsync", f"rsync exited {proc.returncode}: {err[-500:]}")
    return RsyncResult(seconds, proc.returncode, err)


# -- OpenSSH ControlMaster --------------------------------------------------------------------


class ControlMaster:
    """An ``ssh -M -N`` master connection that later ssh runs reuse through `control_path`."""

    def __init__(self, link: Link) -> None:
        self.link = link
        # sun_path is 108 bytes and ssh adds a suffix while binding: keep the path short.
        self._dir = Path(tempfile.mkdtemp(prefix="lscm", dir="/tmp"))
        self.control_path = self._dir / "cm"
        self._proc: subprocess.Popen[bytes] | None = None

    def ssh_options(self) -> list[str]:
        """Options that make an ssh run use this master (never become one itself)."""
        return ["-o", f"ControlPath={self.control_path}", "-o", "ControlMaster=no"]

    @property
    def rsh(self) -> str:
        return f"{self.link.rsh} {' '.join(self.ssh_options())}"

    def _check(self) -> bool:
        proc = subprocess.run(
            ["ssh", "-F", str(self.link.ssh_config), "-o", f"ControlPath={self.control_path}",
             "-O", "check", self.link.alias],
            capture_output=True, check=False,
        )
        return proc.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        log = self._dir / "master.log"
        with open(log, "wb") as out:
            self._proc = subprocess.Popen(
                ["ssh", "-F", str(self.link.ssh_config), "-N",
                 "-o", "ControlMaster=yes", "-o", f"ControlPath={self.control_path}",
                 "-o", "ControlPersist=no", self.link.alias],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PeerError("control-master", f"ssh master exited: {_tail(log)}")
            if self.control_path.exists() and self._check():
                return
            time.sleep(0.02)
        self.stop()
        raise PeerError("control-master", f"master not ready after {timeout}s: {_tail(log)}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            subprocess.run(
                ["ssh", "-F", str(self.link.ssh_config), "-o",
                 f"ControlPath={self.control_path}", "-O", "exit", self.link.alias],
                capture_output=True, check=False, timeout=30,
            )
        _stop_group(self._proc)
        self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ControlMaster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- the original blog script -----------------------------------------------------------------

# The loop from the write-up that started lsync, as published (plus quoting): one rsync per
# closed-for-writing file. It does no initial sync of its own.
BLOG_SCRIPT = r"""
if [ -z "$DEST" ]; then exit 1; fi
inotifywait -r -m -e close_write --format '%w%f' . |
while read file
do
    echo "$file"
    rsync -az "$file" "${DEST}/$file"
    echo -n 'Completed at '
    date
done
"""


class BlogScript:
    """``inotifywait | while read; rsync -az`` run in `local_dir`, as the write-up had it.

    With `control_master`, an OpenSSH master connection is opened first and every rsync's
    ssh reuses it (the write-up's ``ControlMaster auto`` setup); without it, every file pays
    a new SSH connection.
    """

    def __init__(self, local_dir: Path, link: Link, workdir: Path,
                 control_master: bool = True) -> None:
        self.local_dir = local_dir
        self.link = link
        self.workdir = workdir
        self.control_master = control_master
        self.name = "script+CM" if control_master else "script"
        self.log = workdir / f"blog-script{'-cm' if control_master else ''}.log"
        self._master: ControlMaster | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        rsh = self.link.rsh
        if self.control_master:
            self._master = ControlMaster(self.link)
            self._master.start()
            rsh = self._master.rsh
        env = dict(os.environ, DEST=f"{self.link.alias}:{str(self.link.remote_dir).rstrip('/')}",
                   RSYNC_RSH=rsh)
        with open(self.log, "wb") as out:
            self._proc = subprocess.Popen(
                ["bash", "-c", BLOG_SCRIPT], cwd=self.local_dir, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        try:
            _wait_for_text(self.log, "Watches established", self._proc, timeout, self.name)
        except PeerError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None
        if self._master is not None:
            self._master.stop()
            self._master = None

    def __enter__(self) -> BlogScript:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- lsyncd -----------------------------------------------------------------------------------


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lsyncd_config(local_dir: Path, link: Link, workdir: Path, delay: float = 0) -> str:
    """A default.rsyncssh config: rsync and ssh both go through ``ssh -F link.ssh_config``."""
    cfg = str(link.ssh_config)
    return f"""-- generated by benchmarks.peers
settings {{
    logfile = {_lua_string(str(workdir / "lsyncd.log"))},
    statusFile = {_lua_string(str(workdir / "lsyncd.status"))},
    nodaemon = true,
    insist = true,
}}
sync {{
    default.rsyncssh,
    source = {_lua_string(str(local_dir))},
    host = {_lua_string(link.alias)},
    targetdir = {_lua_string(str(link.remote_dir))},
    delay = {delay:g},
    delete = false,
    rsync = {{
        archive = true,
        compress = true,
        rsh = {_lua_string("/usr/bin/ssh -F " + cfg)},
    }},
    ssh = {{
        _extra = {{ "-F", {_lua_string(cfg)} }},
    }},
}}
"""


class Lsyncd:
    """lsyncd with ``default.rsyncssh`` and ``delay = 0``; start() waits for its startup sync."""

    def __init__(self, local_dir: Path, link: Link, workdir: Path, delay: float = 0) -> None:
        self.local_dir = local_dir
        self.link = link
        self.workdir = workdir
        self.delay = delay
        self.name = "lsyncd"
        self.config = workdir / "lsyncd.conf.lua"
        self.log = workdir / "lsyncd.log"
        self.console = workdir / "lsyncd.console"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.log, self.console):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.config.write_text(lsyncd_config(self.local_dir, self.link, self.workdir,
                                             self.delay))
        with open(self.console, "wb") as out:
            self._proc = subprocess.Popen(
                ["lsyncd", str(self.config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )
        try:
            _wait_for_text(self.log, "finished", self._proc, timeout, "lsyncd startup")
        except PeerError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None

    def __enter__(self) -> Lsyncd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
