"""End to end: lsync authenticates in fewer round trips than asyncssh does by default (issue 10).

Against the private sshd on 127.0.0.1, `lsync.client.transport.ssh.connect` is watched
through asyncssh's packet log: which USERAUTH_REQUESTs it sends (`none`, a public-key query
without signature, or a signed public-key request) and whether the server had to answer
PK_OK. With a key file the first request is already the signed one (one round trip instead
of three); a key the server refuses costs one request and lsync goes on to the next key; an
ssh-agent key is asked about first (an agent may want a confirmation or a touch per
signature) but still without the `none` probe; `none` is still tried, last, when nothing
else worked; with no usable key at all, asyncssh's own sequence runs and ends in a clean
refusal. Towards OpenSSH the first request leaves right behind the service request, before
the SERVICE_ACCEPT, and the agent's session channel is opened right behind a signed
request, before the USERAUTH_SUCCESS (and opened again, as asyncssh does, when that request
was refused); towards another server (asyncssh's own, here) each only after the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import SSHPacket

from benchmarks.testbed.sshd import PrivateSshd, generate_key
from lsync.client.errors import ConnectError
from lsync.client.target import Target
from lsync.client.transport import ssh
from lsync.client.transport.coalesce import CoalescingTransport
from tests.conftest import counting_link_to

NONE, QUERY, SIGNED = "none", "query", "signed"


class _AuthLog(logging.Handler):
    """The USERAUTH_REQUESTs asyncssh sends, by kind, and the USERAUTH answers it receives."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.requests: list[str] = []
        self.received: list[str] = []
        self.order: list[str] = []  # "request" sent and "accept" (SERVICE_ACCEPT) received
        self.session: list[str] = []  # "channel open" sent and "auth success" received

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().split("\n")[0]
        if message.startswith("["):  # asyncssh's context: "[conn=0, pktid=3] Sent ..."
            message = message.partition("] ")[2]
        if message.startswith("Received MSG_USERAUTH_"):
            self.received.append(message.split()[1])
        if message.startswith("Received MSG_SERVICE_ACCEPT"):
            self.order.append("accept")
        if message.startswith("Received MSG_USERAUTH_SUCCESS"):
            self.session.append("auth success")
        if message.startswith("Sent MSG_CHANNEL_OPEN ("):
            self.session.append("channel open")
        if not message.startswith("Sent MSG_USERAUTH_REQUEST"):
            return
        self.order.append("request")
        packet = SSHPacket(bytes(getattr(record, "packet", b""))[1:])
        packet.get_string()  # user
        packet.get_string()  # service
        method = packet.get_string()
        if method == b"publickey":
            self.requests.append(SIGNED if packet.get_boolean() else QUERY)
        else:
            self.requests.append(method.decode("ascii"))


@contextlib.contextmanager
def auth_log() -> Iterator[_AuthLog]:
    logger = logging.getLogger("asyncssh")
    handler = _AuthLog()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    asyncssh.set_debug_level(3)
    try:
        yield handler
    finally:
        asyncssh.set_debug_level(1)
        logger.setLevel(old_level)
        logger.removeHandler(handler)


def _config(sshd: PrivateSshd, path: Path, identity_files: list[Path],
            extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The testbed's client config for `sshd`, with `identity_files` (in order) as its keys."""
    sshd.write_client_config(path=path, extra=extra)
    lines = [line for line in path.read_text().splitlines()
             if line.split()[:1] not in (["IdentityFile"], *([name] for name in drop))]
    lines += [f"    IdentityFile {name}" for name in identity_files]
    path.write_text("\n".join(lines) + "\n")
    return path


def _connect_and_run(sshd: PrivateSshd, config: Path) -> str:
    async def go() -> str:
        conn = await ssh.connect(Target(host=sshd.alias, user=None, tree="x"), [str(config)],
                                 accept_new=False)
        try:
            result = await conn.run("echo handshake-ok", check=True)
            return str(result.stdout)
        finally:
            conn.close()
            await conn.wait_closed()
    return asyncio.run(go())


def test_a_key_file_authenticates_with_one_signed_request(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    config = _config(sshd, tmp_path / "ssh_config", [sshd.client_key])
    with auth_log() as log:
        assert _connect_and_run(sshd, config) == "handshake-ok\n"
    assert log.requests == [SIGNED]  # no `none` probe, no query answered by PK_OK
    assert log.received == ["MSG_USERAUTH_SUCCESS"]


def test_with_asyncssh_default_method_order_publickey_still_goes_first(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    # No PreferredAuthentications: asyncssh prefers gssapi and hostbased, unusable here.
    config = _config(sshd, tmp_path / "ssh_config", [sshd.client_key],
                     drop=("PreferredAuthentications", "PasswordAuthentication",
                           "KbdInteractiveAuthentication"))
    with auth_log() as log:
        assert _connect_and_run(sshd, config) == "handshake-ok\n"
    if log.requests[:1] == [NONE]:
        pytest.skip("GSS-API is usable on this machine: asyncssh's order is kept")
    assert log.requests == [SIGNED]


def test_a_refused_first_key_falls_through_to_the_next(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "id_stranger", "not authorized")
    config = _config(sshd, tmp_path / "ssh_config", [stranger, sshd.client_key])
    with auth_log() as log:
        assert _connect_and_run(sshd, config) == "handshake-ok\n"
    assert log.requests == [SIGNED, SIGNED]
    assert log.received == ["MSG_USERAUTH_FAILURE", "MSG_USERAUTH_SUCCESS"]


def _encrypted_copy(key: Path, path: Path) -> Path:
    """A passphrase-protected copy of `key` (and its public half) at `path`: asyncssh skips an
    encrypted IdentityFile it has no passphrase for, so this is a key lsync cannot use."""
    shutil.copy(key, path)
    shutil.copy(key.with_name(key.name + ".pub"), path.with_name(path.name + ".pub"))
    path.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", "not-given", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return path


def test_no_usable_key_ends_in_a_clean_refusal(sshd: PrivateSshd, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "id_stranger", "not authorized")
    config = _config(sshd, tmp_path / "ssh_config", [stranger])
    with auth_log() as log, pytest.raises(ConnectError, match="authentication"):
        _connect_and_run(sshd, config)
    # `none`, skipped at first, is still tried last (a server may accept it): as asyncssh does
    assert log.requests == [SIGNED, NONE]

    locked = _encrypted_copy(sshd.client_key, tmp_path / "id_locked")
    nothing = _config(sshd, tmp_path / "ssh_config_none", [locked])
    with auth_log() as log, pytest.raises(ConnectError, match="authentication"):
        _connect_and_run(sshd, nothing)
    assert log.requests == [NONE]  # no key to lead with: asyncssh's own `none` probe


@contextlib.contextmanager
def ssh_agent() -> Iterator[str]:
    """A private ssh-agent for the block; yields its socket path."""
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs ssh-agent and ssh-add (openssh-client)")
        pytest.skip("ssh-agent is not installed (tests/run.sh installs openssh-client)")
    directory = Path(tempfile.mkdtemp(prefix="lsync-agent-", dir="/tmp"))  # short socket path
    socket = directory / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert agent.poll() is None, "ssh-agent exited"
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        yield str(socket)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def test_an_agent_key_is_asked_about_first_but_without_the_none_probe(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    with ssh_agent() as socket:
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)],
                       env={**os.environ, "SSH_AUTH_SOCK": socket}, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        # The config names the same key, encrypted: the agent is the only way to sign.
        locked = _encrypted_copy(sshd.client_key, tmp_path / "id_locked")
        config = _config(sshd, tmp_path / "ssh_config", [locked],
                         extra={"IdentityAgent": socket})
        with auth_log() as log:
            assert _connect_and_run(sshd, config) == "handshake-ok\n"
    assert log.requests == [QUERY, SIGNED]
    assert log.received == ["MSG_USERAUTH_PK_OK", "MSG_USERAUTH_SUCCESS"]


def test_aes_gcm_leads_only_when_the_user_chose_no_ciphers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lsync.client.transport import ssh as ssh_module
    defaults = list(ssh_module._DEFAULT_CIPHERS)
    monkeypatch.setattr(ssh_module, "_cpu_has_aes", lambda: True)
    preferred = ssh_module._preferred_ciphers(defaults)
    assert preferred is not None and preferred[0] == "aes128-gcm@openssh.com"
    assert sorted(preferred) == sorted(alg.decode() for alg in defaults)  # only reordered
    assert ssh_module._preferred_ciphers([b"aes256-ctr"]) is None  # the user's choice stands
    monkeypatch.setattr(ssh_module, "_cpu_has_aes", lambda: False)
    assert ssh_module._preferred_ciphers(defaults) is None


def test_towards_openssh_the_first_request_leaves_before_the_service_accept(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    with counting_link_to(sshd, delay=0.03) as link:  # (the accept is 60 ms away)
        config = _config(sshd, tmp_path / "ssh_config", [sshd.client_key],
                         extra={"Port": str(link.proxy.port)})
        with auth_log() as log:
            assert _connect_and_run(sshd, config) == "handshake-ok\n"
    assert log.order == ["request", "accept"]
    assert log.requests == [SIGNED] and log.received == ["MSG_USERAUTH_SUCCESS"]


def _answer(process: asyncssh.SSHServerProcess[str]) -> None:
    process.stdout.write("handshake-ok\n")
    process.exit(0)


class _KeyServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True


def test_another_server_gets_the_request_after_its_service_accept(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    host_key = generate_key(tmp_path / "host_key", "asyncssh-server")

    async def go() -> tuple[str, list[str], list[str]]:
        server = await asyncssh.create_server(
            _KeyServer, "127.0.0.1", 0, server_host_keys=[str(host_key)],
            authorized_client_keys=str(sshd.client_key) + ".pub",
            process_factory=_answer)
        port = server.sockets[0].getsockname()[1]
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} "
                         f"{(tmp_path / 'host_key.pub').read_text().split()[0]} "
                         f"{(tmp_path / 'host_key.pub').read_text().split()[1]}\n")
        config = _config(sshd, tmp_path / "ssh_config", [sshd.client_key],
                         extra={"Port": str(port), "UserKnownHostsFile": str(known)})
        try:
            with auth_log() as log:
                conn = await ssh.connect(Target(host=sshd.alias, user=None, tree="x"),
                                         [str(config)], accept_new=False)
                try:
                    result = await conn.run("anything", check=True)
                finally:
                    conn.close()
                    await conn.wait_closed()
            return str(result.stdout), log.order, log.session
        finally:
            server.close()
            await server.wait_closed()

    stdout, order, session = asyncio.run(go())
    assert stdout == "handshake-ok\n"
    assert order == ["accept", "request"]
    assert session == ["auth success", "channel open"]  # no session opened early either


class _Output(asyncssh.SSHClientSession[bytes]):
    """A session's standard output, whole once the command exits."""

    def __init__(self) -> None:
        self.data = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.data)


def _agent_session_output(sshd: PrivateSshd, config: Path) -> tuple[bytes, bool, bool]:
    """Connect as lsync does, open the agent's session as lsync does (running `echo`): its
    output, whether it ran on the channel opened behind the authentication request, and
    whether such a channel was known lost (refused) by then."""
    async def go() -> tuple[bytes, bool, bool]:
        conn = await ssh.connect(Target(host=sshd.alias, user=None, tree="x"), [str(config)],
                                 accept_new=False)
        try:
            early = ssh._early_sessions.get(conn)
            lost = early is not None and early.lost
            sessions: list[_Output] = []

            def factory() -> _Output:
                sessions.append(_Output())
                return sessions[-1]

            await ssh._create_session(conn, factory, "echo agent-session-ok",
                                      ssh.CHANNEL_WINDOW, ssh.MAX_PACKET)
            output = await asyncio.wait_for(sessions[0].done, 30)
            return output, early is not None and sessions[0].chan is early.chan, lost
        finally:
            conn.close()
            await conn.wait_closed()
    return asyncio.run(go())


def test_towards_openssh_the_agents_session_opens_behind_the_signed_request(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    """Its confirmation comes with the USERAUTH_SUCCESS: the exec request leaves one round
    trip earlier (RFC 4252, 5.1: what follows a request that succeeds goes to the service)."""
    with counting_link_to(sshd, delay=0.03) as link:
        config = _config(sshd, tmp_path / "ssh_config", [sshd.client_key],
                         extra={"Port": str(link.proxy.port)})
        with auth_log() as log:
            output, early, lost = _agent_session_output(sshd, config)
    assert output == b"agent-session-ok\n"
    assert early and not lost
    assert log.session == ["channel open", "auth success"]


def test_a_session_opened_behind_a_refused_request_is_opened_again(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    """The server saw that CHANNEL_OPEN before anyone was authenticated and refused it: the
    session is opened as asyncssh opens it, once the next key was accepted."""
    stranger = generate_key(tmp_path / "id_stranger", "not authorized")
    config = _config(sshd, tmp_path / "ssh_config", [stranger, sshd.client_key])
    with auth_log() as log:
        output, early, lost = _agent_session_output(sshd, config)
    assert output == b"agent-session-ok\n"
    assert lost and not early  # (known at once: no wait for an answer that never comes)
    assert log.received == ["MSG_USERAUTH_FAILURE", "MSG_USERAUTH_SUCCESS"]
    assert log.session == ["channel open", "auth success", "channel open"]


def test_a_big_write_reaches_sshd_whole_in_fewer_socket_writes_than_packets(
        sshd: PrivateSshd, tmp_path: Path) -> None:
    """The connection writes through CoalescingTransport (lsync.client.transport.coalesce):
    4 MiB through `cat` come back intact, and the writes to the socket are far fewer than
    the SSH packets (at most 32 KiB of data each, every one behind an ignore packet)."""
    config = _config(sshd, tmp_path / "ssh_config", [sshd.client_key])
    data = os.urandom(4 << 20)

    async def go() -> tuple[bytes, int]:
        conn = await ssh.connect(Target(host=sshd.alias, user=None, tree="x"), [str(config)],
                                 accept_new=False)
        try:
            transport: object = conn._transport
            assert isinstance(transport, CoalescingTransport)
            before = transport.flushes
            result = await conn.run("cat", input=data, encoding=None, check=True)
            assert isinstance(result.stdout, bytes)
            return result.stdout, transport.flushes - before
        finally:
            conn.close()
            await conn.wait_closed()

    echoed, flushes = asyncio.run(go())
    assert echoed == data
    assert flushes < len(data) // (32 << 10)  # (one per packet without the coalescing)
