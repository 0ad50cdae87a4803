"""Shared fixtures: a private sshd on 127.0.0.1, and a running `lsync connect` to drive.

End-to-end tests start the real `lsync` command as a subprocess (stdout piped, so it writes
timestamped log lines), against the private OpenSSH sshd of `benchmarks.testbed.sshd` or
against a local directory, and compare the two trees with a bounded wait.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd

LSYNC = [sys.executable, "-m", "lsync.client.cli"]
WAIT = 20.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI") and not Path("/usr/sbin/sshd").exists():
        raise pytest.UsageError("CI needs /usr/sbin/sshd (openssh-server) for end-to-end tests")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    if not Path("/usr/sbin/sshd").exists() and not os.environ.get("CI"):
        pytest.skip("openssh-server is not installed (tests/run.sh installs it)")
    with PrivateSshd(tmp_path_factory.mktemp("sshd")) as server:
        server.write_client_config()
        yield server


def snapshot(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, object]:
    """Every entry below root: files by content and mode, links by target, dirs by mode."""
    found: dict[str, object] = {}
    for top, dirs, files in os.walk(root):
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
    """A running `lsync connect`; its log lines are collected by a reader thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            LSYNC + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for_line(self, text: str, timeout: float = WAIT) -> None:
        if not wait_until(lambda: self.saw(text) or self.proc.poll() is not None, timeout):
            raise AssertionError(f"no {text!r} in lsync output:\n" + "\n".join(self.lines))
        if not self.saw(text):
            self.finish(timeout=1)
            raise AssertionError(f"lsync exited {self.proc.returncode} before {text!r}:\n"
                                 + "\n".join(self.lines) + "\n" + self.stderr)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.finish()

    def finish(self, timeout: float = 30) -> int:
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
        self._reader.join(timeout=5)
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


def assert_trees_equal(local: Path, remote: Path, skip: Callable[[str], bool] = lambda r: False,
                       timeout: float = WAIT) -> None:
    def same() -> bool:
        return snapshot(local, skip) == snapshot(remote, skip)

    if not wait_until(same, timeout):
        want, have = snapshot(local, skip), snapshot(remote, skip)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise AssertionError(f"trees differ after {timeout} s at: {diff[:20]}")


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
