"""Tests of the benchmark testbed: delay proxy, private sshd, tree generator, peer runners.

The proxy must delay each direction by exactly d (an echo at d = 150 ms reads 300 ms ± 3 ms),
count bytes, keep order, honour a bandwidth cap and drop connections on `cut()`. The private
sshd must run commands for `ssh -F cfg alias` and asyncssh, and ssh must refuse it when its
host key is unknown or different. Trees must be the same for the same seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import peers, procstat
from benchmarks.testbed import trees
from benchmarks.testbed.proxy import DelayProxy, ThreadedProxy, self_check
from benchmarks.testbed.sshd import SSHD_BINARY, PrivateSshd, generate_key

# Outside CI a machine without these tools skips; in CI (tests/run.sh installs them) a
# missing tool must fail, not hide behind a skip.
IN_CI = bool(os.environ.get("CI"))
needs_sshd = pytest.mark.skipif(
    not IN_CI and (not os.path.exists(SSHD_BINARY) or shutil.which("ssh") is None),
    reason="OpenSSH server/client not installed",
)


# -- helpers ------------------------------------------------------------------------------------


GREETING = b"greeting from the server\n" * 5


class _GreetingEcho(asyncio.Protocol):
    """Sends GREETING on connect, then echoes (so the two directions differ in size)."""

    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class _Sink(asyncio.Protocol):
    """Counts what it receives and when the last byte came."""

    def __init__(self, record: dict[str, float]) -> None:
        self.record = record

    def data_received(self, data: bytes) -> None:
        self.record["bytes"] = self.record.get("bytes", 0) + len(data)
        self.record["last"] = time.perf_counter()


class _Echo(asyncio.Protocol):
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def _serve_echo_in_thread() -> tuple[socket.socket, int]:
    """A blocking echo server on 127.0.0.1 in a daemon thread; returns (listener, port)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return listener, listener.getsockname()[1]


# -- proxy --------------------------------------------------------------------------------------


def test_proxy_echo_at_150ms_one_way_measures_300ms_round_trip() -> None:
    result = asyncio.run(self_check(0.150, rounds=4))
    # Never early: the delay is really paid. Late by at most 15 ms as a rule; one echo may
    # be later on a loaded machine (a timer that fired late is the machine, not the proxy).
    errors = sorted(rtt - 0.300 for rtt in result.echo_rtts)
    assert errors[0] >= -0.003, result.describe()
    assert errors[-2] <= 0.015, result.describe()
    # The first echo also pays the handshake: upstream connects after 3d, reply back at 4d.
    # It is one sample, so it gets the loaded machine's margin (CI once measured 620.4 ms
    # at the end of a full run); a handshake not charged (300) or charged twice (750) is far
    # outside it either way.
    assert -0.006 <= result.first_echo - 0.600 <= 0.050, result.describe()


def test_proxy_counts_bytes_each_way_and_keeps_them_in_order() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_GreetingEcho, "127.0.0.1", 0)
        target = ("127.0.0.1", server.sockets[0].getsockname()[1])
        async with DelayProxy(target, 0.002) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            rng = random.Random(7)
            sent = b""
            for _ in range(50):
                chunk = rng.randbytes(rng.randint(1, 5000))
                sent += chunk
                writer.write(chunk)
            await writer.drain()
            received = await reader.readexactly(len(GREETING) + len(sent))
            assert received == GREETING + sent
            counters = proxy.counters()
            assert counters.bytes_up == len(sent)
            assert counters.bytes_down == len(GREETING) + len(sent)
            assert counters.connections_total == 1
            writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_proxy_delivers_a_stream_unchanged_through_a_capped_link() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Echo, "127.0.0.1", 0)
        target = ("127.0.0.1", server.sockets[0].getsockname()[1])
        async with DelayProxy(target, 0.001, rate_bps=200e6) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = random.Random(3).randbytes(1_000_000)
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            assert echoed == payload
            writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_proxy_bandwidth_cap_is_roughly_honoured() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        record: dict[str, float] = {}
        server = await loop.create_server(lambda: _Sink(record), "127.0.0.1", 0)
        target = ("127.0.0.1", server.sockets[0].getsockname()[1])
        size = 500_000
        async with DelayProxy(target, 0.005, rate_bps=4e6, handshake=False) as proxy:
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            t0 = time.perf_counter()
            writer.write(b"x" * size)
            await writer.drain()
            deadline = t0 + 10
            while record.get("bytes", 0) < size and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            assert record.get("bytes") == size
            writer.close()
        server.close()
        await server.wait_closed()
        return record["last"] - t0

    elapsed = asyncio.run(scenario())
    expected = 500_000 * 8 / 4e6 + 0.005  # 1.0 s at 4 Mbit/s, plus the delay
    assert 0.85 * expected <= elapsed <= 1.2 * expected, elapsed


def test_proxy_cut_drops_every_open_connection() -> None:
    listener, port = _serve_echo_in_thread()
    try:
        with ThreadedProxy(("127.0.0.1", port), delay=0.001, handshake=False) as proxy:
            socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
            for s in socks:
                s.settimeout(5)
                s.sendall(b"hello")
                assert s.recv(5) == b"hello"
            assert proxy.counters().connections_open == 3
            assert proxy.cut() == 3
            for s in socks:
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(5) == b""
                s.close()
            assert proxy.counters().connections_open == 0
            assert proxy.counters().connections_cut == 3
            # The listener stays: a new connection works after a cut.
            with socket.create_connection(("127.0.0.1", proxy.port)) as s:
                s.settimeout(5)
                s.sendall(b"again")
                assert s.recv(5) == b"again"
    finally:
        listener.close()


def test_proxy_refuses_new_connections_while_not_accepting() -> None:
    listener, port = _serve_echo_in_thread()
    try:
        with ThreadedProxy(("127.0.0.1", port), delay=0.001, handshake=False) as proxy:
            proxy.set_accepting(False)
            with socket.create_connection(("127.0.0.1", proxy.port)) as s:
                s.settimeout(5)
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    s.sendall(b"x")
                    assert s.recv(1) == b""
    finally:
        listener.close()


def test_proxy_command_line_self_check_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.testbed.proxy", "--self-check", "--delay-ms", "20"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK ")


# -- sshd ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    server = PrivateSshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@needs_sshd
def test_private_sshd_runs_a_command_for_ssh_with_its_config(sshd: PrivateSshd) -> None:
    proc = subprocess.run(sshd.ssh_command("echo", "hi"), capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hi\n"


@needs_sshd
def test_ssh_refuses_the_private_sshd_when_its_host_key_is_unknown(
    sshd: PrivateSshd, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    cfg = sshd.write_client_config(tmp_path / "cfg", known_hosts=empty)
    proc = subprocess.run(sshd.ssh_command("true", config=cfg), capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


@needs_sshd
def test_ssh_refuses_the_private_sshd_when_its_host_key_differs(
    sshd: PrivateSshd, tmp_path: Path
) -> None:
    other = generate_key(tmp_path / "other_host_key", "impostor")
    key = " ".join(other.with_name(other.name + ".pub").read_text().split()[:2])
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {key}\n")
    cfg = sshd.write_client_config(tmp_path / "cfg", known_hosts=wrong)
    proc = subprocess.run(sshd.ssh_command("true", config=cfg), capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


@needs_sshd
def test_asyncssh_connects_with_the_generated_client_config(sshd: PrivateSshd) -> None:
    asyncssh = pytest.importorskip("asyncssh")

    async def run() -> str:
        async with asyncssh.connect(sshd.alias, config=[str(sshd.client_config)]) as conn:
            result = await conn.run("echo hi", check=True)
            return str(result.stdout)

    assert asyncio.run(run()) == "hi\n"


@needs_sshd
def test_ssh_through_the_delay_proxy_pays_the_delay_and_is_counted(sshd: PrivateSshd) -> None:
    with ThreadedProxy(("127.0.0.1", sshd.port), delay=0.020) as proxy:
        cfg = sshd.write_client_config(port=proxy.port)
        t0 = time.perf_counter()
        proc = subprocess.run(sshd.ssh_command("echo", "hi", config=cfg), capture_output=True,
                              text=True, timeout=30, check=False)
        elapsed = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "hi\n"
        counters = proxy.counters()
        assert counters.bytes_up > 0 and counters.bytes_down > 0
        assert counters.connections_total == 1
        # Handshake, key exchange, auth and the command take several round trips of 40 ms.
        assert elapsed > 0.2


# -- trees --------------------------------------------------------------------------------------


def test_tree_generator_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = trees.generate("tiny", tmp_path / "a", seed=1)
    b = trees.generate("tiny", tmp_path / "b", seed=1)
    trees.generate("tiny", tmp_path / "c", seed=2)
    assert (a.files, a.bytes) == (b.files, b.bytes)
    assert trees.tree_digest(tmp_path / "a") == trees.tree_digest(tmp_path / "b")
    assert trees.tree_digest(tmp_path / "a") != trees.tree_digest(tmp_path / "c")


def test_tiny_tree_on_disk_matches_its_plan(tmp_path: Path) -> None:
    plan = trees.plan("tiny", seed=0)
    trees.generate("tiny", tmp_path, seed=0)
    on_disk = {rel: (tmp_path / rel).stat().st_size for rel in trees.walk_files(tmp_path)}
    assert on_disk == {f.path: f.size for f in plan.files}
    assert len(plan.files) == trees.PRESETS["tiny"].files


def test_kernel_plan_is_shaped_like_a_kernel_tree() -> None:
    plan = trees.plan("kernel", seed=0)
    sizes = sorted(f.size for f in plan.files)
    assert len(plan.files) == 80_000 and len(plan.dirs) == 5_000
    assert 0.95e9 <= sum(sizes) <= 1.05e9
    assert sizes[-1] >= 2_000_000  # a few files of several MB
    assert sizes[len(sizes) // 2] < 10_000  # most files are small


def test_one_line_edit_changes_a_single_line() -> None:
    data = trees.text_of_size(20_000, seed=4)
    edited = trees.one_line_edit(data, seed=1)
    old, new = data.split(b"\n"), edited.split(b"\n")
    assert len(old) == len(new)
    assert sum(1 for x, y in zip(old, new, strict=True) if x != y) == 1


# -- peers --------------------------------------------------------------------------------------


@needs_sshd
def test_rsync_push_and_blog_script_sync_through_the_private_sshd(
    sshd: PrivateSshd, tmp_path: Path
) -> None:
    if not IN_CI and (shutil.which("rsync") is None or shutil.which("inotifywait") is None):
        pytest.skip("rsync or inotify-tools not installed")
    local, remote = tmp_path / "local", tmp_path / "remote"
    trees.generate("tiny", local)
    remote.mkdir()
    link = peers.Link(sshd.client_config, sshd.alias, remote)
    peers.rsync_push(local, link)
    assert trees.tree_digest(local) == trees.tree_digest(remote)
    rel = next(iter(trees.walk_files(local)))
    with peers.BlogScript(local, link, tmp_path / "work", control_master=True):
        data = (local / rel).read_bytes() + b"/* saved */\n"
        seconds = peers.measure_save(local / rel, remote / rel, data, "truncate", timeout=20)
        assert seconds is not None


# -- /proc readings and the benchmark command -----------------------------------------------------


def test_procstat_reads_cpu_time_and_peak_memory_of_a_process() -> None:
    pid = os.getpid()
    before = procstat.cpu_seconds(pid)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn 50 ms of CPU
        pass
    assert procstat.cpu_seconds(pid) - before >= 0.03
    mem = procstat.memory(pid)
    assert 0 < mem.rss <= mem.peak


def test_procstat_finds_a_descendant_by_its_command_line() -> None:
    marker = f"lsync-procstat-marker-{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", marker],
                             stdin=subprocess.PIPE)
    try:
        found = None
        deadline = time.monotonic() + 10
        while found is None and time.monotonic() < deadline:
            found = procstat.find_descendant(os.getpid(), marker)
        assert found == child.pid
        assert procstat.find_descendant(os.getpid(), marker + "-absent") is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    with pytest.raises(procstat.ProcessGone):
        procstat.cpu_seconds(child.pid)


def test_a_burst_stopped_by_its_timeout_reports_progress_and_an_estimate() -> None:
    from benchmarks.scenarios import bounded

    cell = bounded(peers.BurstResult(None, 25, 1000), 60.0)
    assert cell.text == "> 60 s (25/1000 done; all in ~40 min at that rate)"
    assert cell.value is None


@needs_sshd
def test_benchmark_short_mode_runs_every_scenario_and_prints_the_tables(tmp_path: Path) -> None:
    if not IN_CI and shutil.which("rsync") is None:
        pytest.skip("rsync not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--short", "--rtt-ms", "0",
         "--systems", "lsync,rsync", "--no-readme", "--idle-seconds", "1",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "| scenario | link | target (lsync) | lsync | rsync |" in out
    for row in ("| a. one save, truncate", "| a. one save, rename", "| b. burst of 40 files",
                "| c. initial sync, tiny tree (s) | RTT 0 ms |",
                "| d. restart, nothing changed, tiny tree", "| e. one-line edit, 10 MB file",
                "| f. idle CPU while watching, tiny tree", "| f. peak RSS, tiny tree",
                "| one-line edit, 20 KB C file | RTT 0 ms |",
                "| directory of 1,000 files renamed | RTT 0 ms |"):
        assert row in out, row
    assert "### The watcher's step" in out
    assert "\n| 50 | " in out  # a row of the watcher table


def test_the_remote_image_is_a_journaled_file_system_and_leaves_nothing(tmp_path: Path) -> None:
    from benchmarks.testbed import remotefs

    usable, why = remotefs.available()
    if not usable:
        pytest.skip(f"no journaled image here: {why} (the full benchmark then says so)")
    try:
        image = remotefs.journaled_fs(tmp_path, size=256 << 20)
        mount_point = image.__enter__()
    except subprocess.CalledProcessError as exc:  # e.g. a container without loop mounts
        pytest.skip(f"no journaled image here: {exc} {exc.stderr!r} (the full benchmark "
                    "then says so)")
    with contextlib.ExitStack() as stack:
        stack.push(image)
        (mount_point / "f").write_text("x")
        device = next(line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
                      if line.split()[1] == str(mount_point))
        journals = os.listdir("/proc/fs/jbd2")
        assert any(name.startswith(Path(device).name + "-") for name in journals), journals
    assert str(mount_point) not in Path("/proc/mounts").read_text()
    assert not (tmp_path / "remote-fs.img").exists()
