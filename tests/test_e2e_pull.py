"""End to end: pulls (issue 18, part 1) against the private sshd, with data lanes.

- The CMake recipe of the issue: a small C project whose configure step makes a header
  (configure_file) and a compile database; `lsync run -- cmake ...` twice, after which the
  local `compile_commands.json` is JSON naming the local tree and never the remote one,
  the generated header is here, and `clangd --check=src/main.c` run locally passes. The
  pulled files are not sent back: the remote database still names the remote tree.
- `lsync pull PATTERN` of a big file the build changed in place comes as a delta (fewer
  bytes on the wire than the file), byte for byte; a pulled file that is changed locally
  is kept by the next pull, which says so; `--delete` leaves remote paths that the pull
  rules select alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LSYNC, CountingLink, LsyncProcess, counting_link_to, wait_until

CMAKELISTS = """\
cmake_minimum_required(VERSION 3.13)
project(hello C)
configure_file(src/config.h.in ${CMAKE_BINARY_DIR}/generated/config.h)
add_executable(hello src/main.c)
target_include_directories(hello PRIVATE ${CMAKE_BINARY_DIR}/generated)
"""
CONFIG_IN = '#define GREETING "@PROJECT_NAME@ from cmake"\n'
MAIN_C = """\
#include <stdio.h>
#include "config.h"

int main(void)
{
    puts(GREETING);
    return 0;
}
"""
PROJECT_FILE = """\
[pull]
paths = ["compile_commands.json", "build/generated/**", "build/*.bin"]
"""


def lsync(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LSYNC + list(args), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)


@contextlib.contextmanager
def started(sshd: PrivateSshd, local: Path, remote: Path, *extra: str
            ) -> Iterator[tuple[LsyncProcess, CountingLink]]:
    with counting_link_to(sshd) as link:
        process = LsyncProcess(link.connect_args(remote, *extra), cwd=local)
        try:
            process.wait_for_line(" ready ", timeout=60)
            yield process, link
        finally:
            if process.proc.poll() is None:
                process.interrupt()
            else:
                process.finish(timeout=5)


def make_project(local: Path) -> None:
    (local / "src").mkdir(parents=True)
    (local / "CMakeLists.txt").write_text(CMAKELISTS)
    (local / "src" / "config.h.in").write_text(CONFIG_IN)
    (local / "src" / "main.c").write_text(MAIN_C)
    (local / ".lsync.toml").write_text(PROJECT_FILE)


@pytest.mark.skipif((shutil.which("cmake") is None or shutil.which("clangd") is None)
                    and not os.environ.get("CI"),
                    reason="cmake and clangd are installed by tests/run.sh (never skipped in CI)")
def test_cmake_build_pulls_a_compile_database_clangd_can_use_locally(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    make_project(local)
    with started(sshd, local, remote):
        configure = lsync("run", "--", "cmake", "-S", ".", "-B", "build",
                          "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", cwd=local)
        assert configure.returncode == 0, configure.stderr
        build = lsync("run", "--", "cmake", "--build", "build", cwd=local)
        assert build.returncode == 0, build.stdout + build.stderr
        assert "pulled" in configure.stderr, configure.stderr
        database = local / "build" / "compile_commands.json"
        text = database.read_text()
        entries = json.loads(text)
        assert str(remote) not in text
        assert entries and all(e["directory"].startswith(str(local)) for e in entries)
        assert any(e["file"] == str(local / "src" / "main.c") for e in entries)
        header = local / "build" / "generated" / "config.h"
        assert header.read_text() == (remote / "build" / "generated" / "config.h").read_text()
        checked = subprocess.run(["clangd", f"--check={local / 'src' / 'main.c'}"],
                                 cwd=local, capture_output=True, text=True, timeout=120,
                                 check=False)
        assert checked.returncode == 0, checked.stderr[-3000:]
        assert "config.h" not in checked.stderr or "not found" not in checked.stderr
        # Not bounced: a flush passes, and the remote database still names the remote tree.
        assert lsync("flush", "--timeout", "30", cwd=local).returncode == 0
        remote_entries = json.loads((remote / "build" / "compile_commands.json").read_text())
        assert all(e["directory"].startswith(str(remote)) for e in remote_entries)


def test_pull_of_a_big_file_changed_in_place_comes_as_a_delta_and_local_edits_are_kept(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / ".lsync.toml").write_text(PROJECT_FILE)
    with started(sshd, local, remote) as (process, link):
        (remote / "build").mkdir()
        artefact = bytearray(os.urandom(4 << 20))
        (remote / "build" / "app.bin").write_bytes(artefact)
        first = lsync("pull", cwd=local)
        assert first.returncode == 0, first.stderr
        assert (local / "build" / "app.bin").read_bytes() == artefact
        artefact[1_000_000:1_000_100] = b"x" * 100  # a relink that changes a few bytes
        (remote / "build" / "app.bin").write_bytes(artefact)
        before = link.proxy.counters().bytes_down
        second = lsync("pull", "build/app.bin", cwd=local)
        assert second.returncode == 0, second.stderr
        assert (local / "build" / "app.bin").read_bytes() == artefact
        down = link.proxy.counters().bytes_down - before
        assert down < len(artefact) // 4, f"{down} bytes came for a 100-byte change"
        # A pull with nothing changed brings nothing.
        again = lsync("pull", cwd=local)
        assert again.returncode == 0 and ", 0 pulled, 1 unchanged" in again.stderr, again.stderr
        # Never synced back: the remote keeps its version after the session is flushed.
        assert lsync("flush", "--timeout", "30", cwd=local).returncode == 0
        assert (remote / "build" / "app.bin").read_bytes() == artefact
        # A local edit of a pulled file is kept, and said, whatever the remote does.
        (local / "build" / "app.bin").write_bytes(b"mine")
        (remote / "build" / "app.bin").write_bytes(b"theirs")
        kept = lsync("pull", cwd=local)
        assert kept.returncode == 1 and "kept the local file: build/app.bin" in kept.stderr, \
            kept.stderr
        assert (local / "build" / "app.bin").read_bytes() == b"mine"
        assert (remote / "build" / "app.bin").read_bytes() == b"theirs"
        (local / "build" / "app.bin").unlink()
        assert lsync("pull", cwd=local).returncode == 0
        assert (local / "build" / "app.bin").read_bytes() == b"theirs"
        assert process.proc.poll() is None


def test_delete_leaves_remote_paths_the_pull_rules_select(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / ".lsync.toml").write_text(PROJECT_FILE)
    (remote / "build" / "generated").mkdir(parents=True)
    (remote / "build" / "generated" / "version.h").write_text("#define V 1\n")
    (remote / "stray.txt").write_text("not here locally\n")
    with started(sshd, local, remote, "--delete"):
        (local / "new.c").write_text("int x;\n")
        assert lsync("flush", "--timeout", "30", cwd=local).returncode == 0
        assert wait_until(lambda: not (remote / "stray.txt").exists())
        assert (remote / "build" / "generated" / "version.h").exists()
        assert lsync("pull", cwd=local).returncode == 0
        assert (local / "build" / "generated" / "version.h").read_text() == "#define V 1\n"
        assert lsync("flush", "--timeout", "30", cwd=local).returncode == 0
        assert (remote / "build" / "generated" / "version.h").read_text() == "#define V 1\n"


def test_against_a_local_target_pulls_travel_on_the_main_stream(tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (local / ".lsync.toml").write_text(PROJECT_FILE)
    process = LsyncProcess(["connect", str(remote)], cwd=local)
    try:
        process.wait_for_line(" ready ", timeout=60)
        (remote / "out").mkdir()
        database = [{"directory": f"{remote}/out", "file": f"{remote}/main.c",
                     "arguments": ["cc", "-c", f"{remote}/main.c"]}]
        (remote / "out" / "compile_commands.json").write_text(json.dumps(database))
        pulled = lsync("pull", cwd=local)
        assert pulled.returncode == 0, pulled.stderr
        entries = json.loads((local / "out" / "compile_commands.json").read_text())
        assert entries == [{"directory": f"{local}/out", "file": f"{local}/main.c",
                            "arguments": ["cc", "-c", f"{local}/main.c"]}]
        again = lsync("pull", cwd=local)  # the rewritten copy is known: nothing comes
        assert again.returncode == 0 and ", 0 pulled, 1 unchanged" in again.stderr, again.stderr
    finally:
        if process.proc.poll() is None:
            process.interrupt()
