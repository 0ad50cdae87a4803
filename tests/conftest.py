"""Shared fixtures: a private sshd on 127.0.0.1, and a running `lsync connect` to drive.

End-to-end tests start the real `lsync` command as a subprocess (stdout piped, so it writes
timestamped log lines), against the private OpenSSH sshd of `benchmarks.testbed.sshd` or
against a local directory, and trust what lsync promises: right after its ` ready ` line,
and right after an `in-sync as-of=N` line with N at or after the moment a local change was
made (`LsyncProcess.wait_in_sync`), the two trees are compared once (`assert_same_now`),
with no polling: a difference then is a broken promise. `Synced` is one lsync shared by the
tests of a module, each working in its own directory (`own_dir`). `counting_link` puts a
byte-counting proxy (benchmarks.testbed.proxy, no delay unless asked) between lsync and
sshd, for tests that measure bytes on the wire or cut the connection; `ContentSampler`
watches remote files in a thread and remembers every content it ever saw (torn or wrongly
built files would show up there).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The tests' support modules assert too: pytest explains their failures as it does a test's.
pytest.register_assert_rewrite("tests.corerig", "tests.corechanges", "tests.loopsession",
                               "tests.controlrig", "tests.memagent")

from benchmarks.testbed.proxy import ThreadedProxy  # noqa: E402
from benchmarks.testbed.sshd import PrivateSshd  # noqa: E402

LSYNC = [sys.executable, "-m", "lsync.client.cli"]
WAIT = 20.0
IN_SYNC = re.compile(r" in-sync as-of=(\d+)\b")
LOG_TAIL = 40  # log lines shown when a wait fails


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI") and not Path("/usr/sbin/sshd").exists():
        raise pytest.UsageError("CI needs /usr/sbin/sshd (openssh-server) for end-to-end tests")


@pytest.fixture(scope="session", autouse=True)
def _private_client_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The lsync processes the tests start keep their caches (hashes, remote listings,
    signatures, the control sockets' fallback directory) with the run's temporary files,
    not in the user's ~/.cache/lsync (unless the caller chose an $XDG_CACHE_HOME)."""
    if os.environ.get("XDG_CACHE_HOME"):
        yield
        return
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    try:
        yield
    finally:
        os.environ.pop("XDG_CACHE_HOME", None)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    if not Path("/usr/sbin/sshd").exists() and not os.environ.get("CI"):
        pytest.skip("openssh-server is not installed (tests/run.sh installs it)")
    # The sessions' $HOME is the run's own: the agent's records of the tests' remote trees
    # go with the run's temporary files instead of piling up in the user's ~/.cache/lsync.
    work = tmp_path_factory.mktemp("sshd")
    with PrivateSshd(work, home=work / "home") as server:
        server.write_client_config()
        yield server


KEPT_TOP = ".lsync"  # the remote edits the agent kept aside are below it (.lsync/kept)


def snapshot(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, object]:
    """Every entry below root: files by content and mode, links by target, dirs by mode;
    not the remote edits the agent kept aside (README: "Remote edits are kept")."""
    found: dict[str, object] = {}
    for top, dirs, files in os.walk(root):
        if Path(top) == root and KEPT_TOP in dirs:
            dirs.remove(KEPT_TOP)
        for name in dirs + files:
            full = Path(top) / name
            rel = full.relative_to(root).as_posix()
            if skip(rel):
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                found[rel] = ("file", full.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class LsyncProcess:
    """A running `lsync connect`; its log lines are collected by a reader thread.

    Only the reader threads read its pipes (stdout into `lines`, stderr into `stderr` once
    it has finished), so no line is lost to another reader, also after an interrupt."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            LSYNC + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._stderr_parts: list[str] = []
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        self.stderr = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_parts.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def count(self, text: str) -> int:
        """How many log lines so far contain `text`."""
        return sum(text in line for line in list(self.lines))

    def wait_for_count(self, text: str, count: int, timeout: float = WAIT) -> None:
        """Wait until at least `count` log lines contain `text` (lsync must keep running)."""
        if not wait_until(lambda: self.count(text) >= count or self.proc.poll() is not None,
                          timeout) or self.count(text) < count:
            raise AssertionError(f"{self.count(text)} of {count} {text!r} lines (exit "
                                 f"{self.proc.poll()}):\n" + "\n".join(self.lines))

    def wait_for_line(self, text: str, timeout: float = WAIT) -> None:
        if not wait_until(lambda: self.saw(text) or self.proc.poll() is not None, timeout):
            raise AssertionError(f"no {text!r} in lsync output:\n" + "\n".join(self.lines))
        if not self.saw(text):
            self.finish(timeout=1)  # lsync has exited: every line it wrote is read now
        if not self.saw(text):
            raise AssertionError(f"lsync exited {self.proc.returncode} before {text!r}:\n"
                                 + "\n".join(self.lines) + "\n" + self.stderr)

    def in_sync_as_of(self) -> int | None:
        """The newest N of the `in-sync as-of=N` lines so far (None: no such line yet)."""
        found = [int(match.group(1)) for line in list(self.lines)
                 if (match := IN_SYNC.search(line)) is not None]
        return max(found, default=None)

    def wait_in_sync(self, after_ns: int, timeout: float = WAIT) -> None:
        """Wait (at most `timeout` s) for lsync's promise that every local change made before
        `after_ns` (Unix ns, `time.time_ns()`) is on the remote and acknowledged: a log line
        `in-sync as-of=N` with N >= after_ns. Fails with the log if lsync exits first."""
        def reached() -> bool:
            newest = self.in_sync_as_of()
            return newest is not None and newest >= after_ns

        if wait_until(lambda: reached() or self.proc.poll() is not None, timeout) and reached():
            return
        state = "still running"
        if self.proc.poll() is not None:
            self.finish(timeout=1)  # lsync has exited: every line it wrote is read now
            if reached():
                return
            state = f"exited {self.proc.returncode}"
        raise AssertionError(
            f"no 'in-sync as-of=N' with N >= {after_ns} within {timeout} s (newest: "
            f"{self.in_sync_as_of()}; lsync {state}); last lines:\n" + self.log_tail()
            + (f"\n{self.stderr}" if self.stderr else ""))

    def log_tail(self, count: int = LOG_TAIL) -> str:
        return "\n".join(list(self.lines)[-count:])

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.finish()

    def finish(self, timeout: float = 30) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        self.stderr = "".join(self._stderr_parts)
        return self.proc.returncode


@pytest.fixture
def run_lsync() -> Iterator[Callable[..., LsyncProcess]]:
    started: list[LsyncProcess] = []

    def start(*args: str, cwd: Path) -> LsyncProcess:
        process = LsyncProcess(list(args), cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.finish(timeout=5)


def describe(entry: object) -> str:
    """One entry of a `snapshot`, in words (content by size and digest)."""
    if entry is None:
        return "absent"
    assert isinstance(entry, tuple)
    if entry[0] == "file":
        return f"file of {len(entry[1])} B, mode {entry[2]:o}, {digest(entry[1]).hex()[:8]}"
    if entry[0] == "dir":
        return f"dir, mode {entry[1]:o}"
    return f"link -> {entry[1]}"


def tree_differences(local: Path, remote: Path,
                     skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Every path whose entry differs between the two trees, with both entries in words."""
    want, have = snapshot(local, skip), snapshot(remote, skip)
    return [f"{rel}: local {describe(want.get(rel))}, remote {describe(have.get(rel))}"
            for rel in sorted(set(want) | set(have)) if want.get(rel) != have.get(rel)]


def assert_same_now(local: Path, remote: Path, skip: Callable[[str], bool] = lambda r: False,
                    lsync: LsyncProcess | None = None) -> None:
    """Compare the two trees once, now (after a promise of lsync: no waiting, no retry), and
    fail listing every differing path (and the end of lsync's log, when given)."""
    differences = tree_differences(local, remote, skip)
    if differences:
        log = f"\nlsync's last lines:\n{lsync.log_tail()}" if lsync is not None else ""
        raise AssertionError(f"trees differ at {len(differences)} paths:\n"
                             + "\n".join(differences[:30]) + log)


def assert_trees_equal(local: Path, remote: Path, skip: Callable[[str], bool] = lambda r: False,
                       timeout: float = WAIT) -> None:
    """Wait (bounded) until the trees are equal; `timeout=0` compares once, now
    (`assert_same_now`). Only for a tree lsync makes no promise about: after ` ready ` or an
    `in-sync` line, compare once."""
    if timeout <= 0:
        assert_same_now(local, remote, skip)
        return

    def same() -> bool:
        try:
            return snapshot(local, skip) == snapshot(remote, skip)
        except FileNotFoundError:
            return False  # an entry vanished while we looked: still changing

    if not wait_until(same, timeout):
        differences = tree_differences(local, remote, skip)
        raise AssertionError(f"trees differ after {timeout} s at {len(differences)} paths:\n"
                             + "\n".join(differences[:20]))


def fresh_dirs(tmp_path: Path) -> tuple[Path, Path]:
    local = tmp_path / "local"
    remote = tmp_path / "remote"
    local.mkdir()
    return local, remote


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def wait_steady(read: Callable[[], int], quiet: float = 0.3, timeout: float = WAIT) -> int:
    """Poll `read()` until it has not changed for `quiet` seconds; return that value."""
    deadline = time.monotonic() + timeout
    value = read()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now_value = read()
        if now_value != value:
            value, since = now_value, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"value still changing after {timeout} s (last {value})")


class Synced:
    """A running `lsync connect` shared by the tests of a module, and the two trees it keeps
    in sync.

    The tests sharing it each work in their own directory (`own_dir`), so that none needs
    what another made. When one fails, lsync is replaced by a fresh one on the same trees
    before the next test runs: a test that failed because lsync broke its promise (a path
    failing for ever, say, so that no in-sync line comes) does not fail the tests after it.
    """

    def __init__(self, args: list[str], local: Path, remote: Path,
                 ready_timeout: float = WAIT) -> None:
        self.args = args
        self.local = local
        self.remote = remote
        self.ready_timeout = ready_timeout
        self.lsync = self._start()
        # Compared once, right after ` ready `: lsync's promise is that this list is empty.
        self.differences_at_ready = tree_differences(local, remote)

    def _start(self) -> LsyncProcess:
        lsync = LsyncProcess(self.args, self.local)
        lsync.wait_for_line(" ready ", self.ready_timeout)
        return lsync

    def converged(self, mark: int, timeout: float = WAIT) -> None:
        """lsync says in sync as of `mark` (taken right after a local change), and right then
        the two trees are equal."""
        self.lsync.wait_in_sync(mark, timeout)
        assert_same_now(self.local, self.remote, lsync=self.lsync)

    def restart(self) -> None:
        """Stop this lsync (whatever state it is in) and start a fresh one on the same trees;
        right after its ` ready ` the trees are equal."""
        self.lsync.interrupt()
        self.lsync = self._start()
        assert_same_now(self.local, self.remote, lsync=self.lsync)

    def stop(self) -> int:
        """Ctrl-C: lsync drains and exits; its exit status."""
        return self.lsync.interrupt()


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item,
        call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember on the test item that it failed (for `own_dir`)."""
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
def own_dir(synced: Synced, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The calling test's own local directory in the module's shared tree (`synced`), named
    after the test; if the test fails, the shared lsync is restarted after it."""
    directory = synced.local / str(request.node.name)
    directory.mkdir()
    yield directory
    if request.node.stash.get(FAILED, False):
        synced.restart()


@dataclass
class CountingLink:
    """A proxy between lsync and the private sshd, and an ssh config that goes through it."""

    sshd: PrivateSshd
    proxy: ThreadedProxy
    config: Path

    def connect_args(self, remote: Path | str, *extra: str) -> list[str]:
        return ["connect", "-F", str(self.config), *extra, f"{self.sshd.alias}:{remote}"]

    def bytes_up(self) -> int:
        """Bytes client -> server since the last reset."""
        return self.proxy.counters().bytes_up


@contextlib.contextmanager
def counting_link_to(sshd: PrivateSshd, delay: float = 0.0) -> Iterator[CountingLink]:
    """A `CountingLink` (one-way delay `delay`, default none) for as long as the block runs."""
    proxy = ThreadedProxy(("127.0.0.1", sshd.port), delay, handshake=delay > 0)
    with proxy:
        config = sshd.write_client_config(port=proxy.port)
        yield CountingLink(sshd, proxy, config)


@pytest.fixture
def counting_link(sshd: PrivateSshd) -> Iterator[CountingLink]:
    with counting_link_to(sshd) as link:
        yield link


def save_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by a complete new version at once (write a temp file, rename it over),
    so that a watcher never sees it empty or half written."""
    temp = path.with_name(f".{path.name}.save")
    temp.write_bytes(data)
    os.rename(temp, path)


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class ContentSampler:
    """Reads some files over and over in a thread and remembers every content seen.

    `seen[path]` holds the digests of all contents observed (None: the file was absent).
    Writes are atomic renames, so each read sees one whole version; a torn or wrongly built
    file would appear here as a digest that no local version ever had.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.seen: dict[Path, set[bytes | None]] = {path: set() for path in paths}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.paths:
                try:
                    self.seen[path].add(digest(path.read_bytes()))
                except FileNotFoundError:
                    self.seen[path].add(None)
            self.samples += 1

    def __enter__(self) -> ContentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def unexpected(self, path: Path, allowed: list[bytes | None]) -> set[bytes | None]:
        """Digests seen at `path` that are none of the `allowed` contents (None: absent)."""
        ok = {None if item is None else digest(item) for item in allowed}
        return self.seen[path] - ok


def c_like_text(rng: random.Random, size: int) -> bytes:
    """Lines that look like C: compressible a few times, but not trivially repetitive."""
    words = ["int", "return", "struct", "static", "unsigned", "if", "else", "for", "while",
             "const", "char", "void", "size_t", "u32", "->", "NULL", "err", "dev", "buf"]
    lines: list[str] = []
    total = 0
    while total < size:
        line = "\t" * rng.randint(0, 3) + " ".join(
            rng.choice(words) if rng.random() < 0.7 else f"v{rng.getrandbits(24):x}"
            for _ in range(rng.randint(2, 12))) + ";\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]
