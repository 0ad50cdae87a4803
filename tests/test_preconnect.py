"""The early TCP connection (lsync.client.transport.preconnect): the address it guesses from
the SSH configuration, when the SSH handshake takes it over, and end to end: one TCP
connection per session through the delay proxy, and a clear error when nothing listens."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.target import Target
from lsync.client.transport import preconnect, ssh
from lsync.client.transport.preconnect import Preconnect, guess_address
from tests.conftest import CountingLink, LsyncProcess, fresh_dirs, wait_until

Start = Callable[..., LsyncProcess]


def _config(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return [str(path)]


def test_without_a_configuration_the_host_as_written_on_port_22(tmp_path: Path) -> None:
    assert guess_address("build-box", [str(tmp_path / "missing")]) == ("build-box", 22)


def test_a_host_block_gives_its_host_name_and_port_first_value_wins(tmp_path: Path) -> None:
    files = _config(tmp_path, "Host other\n  Port 1\n"
                              "Host build*  !build-old\n  HostName 10.0.0.%h.x\n  Port=2222\n"
                              "Host *\n  Port 2200\n  HostName ignored\n")
    assert guess_address("build-box", files) == ("10.0.0.build-box.x", 2222)
    assert guess_address("build-old", files) == ("ignored", 2200)  # negated: not that block
    assert guess_address("elsewhere", files) == ("ignored", 2200)


def test_options_before_the_first_host_block_apply_to_every_host(tmp_path: Path) -> None:
    assert guess_address("a", _config(tmp_path, "Port 2022\nHost b\n  Port 1\n")) == ("a", 2022)


@pytest.mark.parametrize("text", [
    "Match host a\n  Port 1\n",
    "Include other.conf\n",
    "Host a\n  ProxyJump jump\n",
    "Host a\n  ProxyCommand nc %h %p\n",
    "Host a\n  BindAddress 10.0.0.1\n",
    "Host a\n  AddressFamily inet6\n",
    "Host a\n  CanonicalizeHostname yes\n",
    "Host a\n  HostName %r.example\n",
    "Host a\n  Port twenty\n",
    'Host a\n  HostName "unclosed\n',
])
def test_what_this_reader_cannot_evaluate_gives_no_guess(tmp_path: Path, text: str) -> None:
    assert guess_address("a", _config(tmp_path, text)) is None


def test_a_proxy_for_another_host_does_not_stop_the_guess(tmp_path: Path) -> None:
    files = _config(tmp_path, "Host other\n  ProxyJump jump\nHost a\n  Port 2\n")
    assert guess_address("a", files) == ("a", 2)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server
    server.close()


def _options(host: str, port: int, **other: object) -> SimpleNamespace:
    fields: dict[str, object] = {"host": host, "port": port, "tunnel": None,
                                 "proxy_command": None, "local_addr": None,
                                 "family": socket.AF_UNSPEC, "canonicalize_hostname": False,
                                 "canonical_domains": ()}
    fields.update(other)
    return SimpleNamespace(**fields)


def _started(tmp_path: Path, port: int) -> list[str]:
    files = _config(tmp_path, f"Host box\n  HostName 127.0.0.1\n  Port {port}\n")
    preconnect.start("box", files)
    return files


def test_the_handshake_takes_the_early_socket_when_asyncssh_goes_to_the_same_address(
        tmp_path: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    files = _started(tmp_path, port)
    early = preconnect.take("box", files, _options("127.0.0.1", port))
    assert early is not None and early.done.wait(10)
    sock = early.result()
    accepted, _ = listener.accept()
    try:
        assert sock.getpeername() == ("127.0.0.1", port)
        sock.sendall(b"SSH-2.0-test\r\n")
        assert accepted.recv(64) == b"SSH-2.0-test\r\n"
    finally:
        sock.close()
        accepted.close()
    assert preconnect.take("box", files, _options("127.0.0.1", port)) is None  # once only


@pytest.mark.parametrize("other", [
    {"port": 1}, {"host": "127.0.0.2"}, {"proxy_command": "nc %h %p"}, {"tunnel": "jump"},
    {"local_addr": ("127.0.0.1", 0)}, {"family": socket.AF_INET},
    {"canonicalize_hostname": True, "canonical_domains": ["example.com"]},
])
def test_the_early_socket_is_closed_unused_when_asyncssh_connects_otherwise(
        tmp_path: Path, listener: socket.socket, other: dict[str, object]) -> None:
    port = listener.getsockname()[1]
    files = _started(tmp_path, port)
    options = _options("127.0.0.1", port)
    for name, value in other.items():
        setattr(options, name, value)
    assert preconnect.take("box", files, options) is None
    accepted, _ = listener.accept()
    accepted.settimeout(10)
    try:
        assert accepted.recv(64) == b""  # closed by the client, nothing sent
    finally:
        accepted.close()


def test_a_refused_early_connection_raises_its_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    early = Preconnect(("127.0.0.1", port))
    early.start()
    assert early.done.wait(10)
    with pytest.raises(ConnectionRefusedError):
        early.result()


def test_closing_before_the_connection_is_made_leaves_no_socket_behind(
        listener: socket.socket) -> None:
    early = Preconnect(listener.getsockname())
    gate = threading.Event()
    original = early._connect

    def slow_connect() -> None:
        gate.wait(10)
        original()

    early._connect = slow_connect  # type: ignore[method-assign]
    early.start()
    early.close()
    gate.set()
    assert early.done.wait(10)
    assert early.sock is None
    accepted, _ = listener.accept()
    accepted.settimeout(10)
    try:
        assert accepted.recv(64) == b""
    finally:
        accepted.close()


def test_the_ssh_handshake_runs_on_the_early_connection(sshd: PrivateSshd) -> None:
    files = [str(sshd.client_config)]
    preconnect.start(sshd.alias, files)
    early = preconnect._started[(sshd.alias, tuple(files))]
    assert early.done.wait(10) and early.sock is not None
    made_early = early.sock.getsockname()

    async def go() -> tuple[object, str]:
        conn = await ssh.connect(Target(host=sshd.alias, user=None, tree="x"), files,
                                 accept_new=False)
        try:
            result = await conn.run("echo handshake-ok", check=True)
            return conn.get_extra_info("sockname"), str(result.stdout)
        finally:
            conn.close()
            await conn.wait_closed()

    assert asyncio.run(go()) == (made_early, "handshake-ok\n")
    assert not preconnect._started


def test_a_session_through_the_link_opens_one_tcp_connection(
        tmp_path: Path, run_lsync: Start, counting_link: CountingLink) -> None:
    local, remote = fresh_dirs(tmp_path)
    (local / "a.c").write_text("int a;\n")
    lsync = run_lsync(*counting_link.connect_args(remote), cwd=local)
    lsync.wait_for_line(" ready ")
    assert wait_until(lambda: (remote / "a.c").exists(), timeout=10)
    counters = counting_link.proxy.counters()
    assert counters.connections_total == 1, counters
    assert lsync.interrupt() == 0, lsync.log_tail()


def test_nothing_listening_is_a_clear_error_without_a_traceback(
        tmp_path: Path, run_lsync: Start, counting_link: CountingLink) -> None:
    local, remote = fresh_dirs(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = counting_link.sshd.write_client_config(port=port)
    lsync = run_lsync("connect", "-F", str(config),
                                f"{counting_link.sshd.alias}:{remote}", cwd=local)
    assert lsync.finish(timeout=30) != 0
    assert "cannot connect" in lsync.stderr and "refused" in lsync.stderr, lsync.stderr
    assert "Traceback" not in lsync.stderr
