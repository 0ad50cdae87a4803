"""Opening the one SSH connection and starting the agent on it.

`connect` honours ~/.ssh/config (or the files given with -F): Host aliases, HostName,
User, Port, IdentityFile, ProxyJump, UserKnownHostsFile; it uses the ssh agent and verifies
the host key against known_hosts. An unknown key is refused unless the user asked to accept
a new key on first use, in which case it is appended to the user's known_hosts; a changed
key, and a key marked @revoked, are always refused; `UserKnownHostsFile none` means no key
is known (every key is unknown), never "do not verify". Channel windows are sized so that a
long link is not window-bound.

Authentication takes three round trips fewer than asyncssh's default (issue 10; see
`_shorten_auth`): no `none` probe when public-key auth comes first anyway, and the signed
request straight away, without asking first whether the server would take the key, for
keys held in this process (key files). RFC 4252 allows both; a refused key costs one round
trip, as the question did, and the next key or method is tried as before. Towards OpenSSH
the first request also goes right behind the service request, without waiting for its
accept (`_pipeline_auth`), and the CHANNEL_OPEN of the agent's session right behind a
signed request (`_open_session_early`; RFC 4252 5.1 has the server pass it to the service
once that request succeeds): its confirmation comes with the USERAUTH_SUCCESS, and the exec
request leaves one round trip earlier. A refused request makes the server refuse that open
too; the session is then opened as asyncssh opens it. The connection's writes of one
event-loop step go out together (lsync.client.transport.coalesce). And the TCP connection
is not opened here when `lsync connect` opened it early, while this code was still being
imported (lsync.client.transport.preconnect): the handshake runs on that one when
asyncssh's reading of the configuration leads to the very same address.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.packet import Boolean, SSHPacket, String, UInt32

from lsync.client.errors import ConnectError, HostKeyError
from lsync.client.target import Target as Target  # (re-exported: callers say ssh.Target)
from lsync.client.transport import coalesce, preconnect
from lsync.client.transport.bootstrap import MAX_INITIAL, remote_command
from lsync.client.transport.streams import SshAgentStream

# 64 MiB: at 300 ms round trip one channel then carries > 200 MiB/s before its window stalls.
CHANNEL_WINDOW = 64 << 20
_DEFAULT_CIPHERS = list(asyncssh.encryption.get_default_encryption_algs())
MAX_PACKET = 256 << 10


# -- shorter authentication -------------------------------------------------------------------
#
# asyncssh starts with a `none` request (to learn the server's methods), then for each key asks
# whether the server would accept it (publickey without signature, answered PK_OK) before
# sending the signed request: three round trips where one does. There is no option for either,
# so the two shortcuts below reach into asyncssh; each checks that it finds what it expects and
# otherwise leaves asyncssh's own behaviour untouched (tests/test_e2e_handshake.py counts the
# requests, so an asyncssh that changes underneath shows up there).

try:
    from asyncssh.auth import _ClientPublicKeyAuth as _PublicKeyAuth
except ImportError:  # pragma: no cover - another asyncssh: keep its handshake
    _PublicKeyAuth = None  # type: ignore[assignment,misc]

_SIGNED_FIRST_USABLE = _PublicKeyAuth is not None and all(
    callable(getattr(_PublicKeyAuth, name, None))
    for name in ("_start", "_send_signed_request", "send_request"))

# Methods asyncssh may prefer to publickey, and how to tell that this connection cannot use
# them (then publickey is what it would try first once the `none` probe answered).
_UNUSABLE_BEFORE_PUBLICKEY: dict[bytes, Callable[[Any], bool]] = {
    b"gssapi-keyex": lambda conn: conn._gss is None,
    b"gssapi-with-mic": lambda conn: conn._gss is None,
    b"hostbased": lambda conn: not (conn._host_based_auth and conn._client_host_keys),
}


def _signs_unasked(keypair: Any) -> bool:
    """Whether to send the signed request for `keypair` without asking first: only for keys
    whose private half is in this process. An agent (or a PKCS#11 token) may ask the user to
    confirm or touch for every signature, and should not be asked for a key the server then
    refuses; so may a security key (`sk-*`) even when its handle is in a file."""
    try:
        return bool(keypair.get_key_type() == "local"
                    and b"sk-" not in bytes(keypair.algorithm))
    except (AttributeError, TypeError):
        return False


if _SIGNED_FIRST_USABLE:
    class _SignedFirstPublicKeyAuth(_PublicKeyAuth):
        """asyncssh's public-key auth, with the question "would you take this key?" replaced
        by the signed request itself for `_signs_unasked` keys. A refusal comes back as the
        same USERAUTH_FAILURE the question would have had, and asyncssh moves on to the next
        key or method as usual; an accepted key saves the round trip of PK_OK."""

        async def send_request(self, *args: bytes, key: Any = None,
                               trivial: bool = True) -> None:
            keypair = getattr(self, "_keypair", None)
            if (key is None and keypair is not None and _signs_unasked(keypair)
                    and args == (Boolean(False), String(keypair.algorithm),
                                 String(keypair.public_data))):
                await self._send_signed_request()
                _open_session_early(self._conn)
                return
            await super().send_request(*args, key=key, trivial=trivial)


def _publickey_comes_first(conn: Any) -> bool:
    """Whether asyncssh, after the `none` probe, would try publickey before anything else."""
    preferred = list(conn._preferred_auth)
    if b"publickey" not in preferred or not conn._public_key_auth:
        return False
    return all(method in _UNUSABLE_BEFORE_PUBLICKEY and _UNUSABLE_BEFORE_PUBLICKEY[method](conn)
               for method in preferred[:preferred.index(b"publickey")])


def _shorten_auth(conn: Any) -> None:
    """Just before asyncssh begins authenticating `conn`: start with publickey instead of the
    `none` probe, and let key-file keys go signed at once.

    The method list becomes [publickey, none]: the server's first USERAUTH_FAILURE replaces
    it with the methods the server offers (in the client's preferred order), exactly as the
    answer to `none` would have, and when there is no key to offer at all, asyncssh moves on
    to `none` and everything continues as without the shortcut. As long as `none` has not been
    tried, it stays last in the list (a server may accept it, as OpenSSH does for an account
    with an empty password and PermitEmptyPasswords): whatever authenticated before still does.
    Does nothing unless asyncssh's internals look as expected (asyncssh 2.x: `_auth_methods` is
    [b"none"] at this point, and `try_next_auth` starts `_auth_methods[0]`)."""
    try:
        if conn._auth_methods != [b"none"] or conn._auth is not None:
            return
        none_skipped = _publickey_comes_first(conn)
        original = conn.try_next_auth
    except (AttributeError, TypeError):
        return
    if none_skipped:
        conn._auth_methods = [b"publickey", b"none"]

    def try_next_auth(*, next_method: bool = False) -> None:
        nonlocal none_skipped
        methods = conn._auth_methods
        if none_skipped and b"none" not in methods:
            methods.append(b"none")
        original(next_method=next_method)
        auth = conn._auth
        if auth is not None and conn._auth_methods[:1] == [b"none"]:
            none_skipped = False  # `none` is being tried now: asyncssh's own sequence again
        # The new auth's task has not started yet: its requests go through the subclass.
        if _SIGNED_FIRST_USABLE and type(auth) is _PublicKeyAuth:
            auth.__class__ = _SignedFirstPublicKeyAuth

    conn.try_next_auth = try_next_auth


_MSG_SERVICE_ACCEPT = 6  # RFC 4253
_MSG_EXT_INFO = 7  # RFC 8308
_USERAUTH = b"ssh-userauth"


def _pipeline_auth(conn: Any) -> None:
    """Send the first authentication request right behind the service request, one round
    trip earlier: asyncssh waits for SERVICE_ACCEPT first.

    Only towards OpenSSH, which takes the requests in order (the service request sets up
    the handler of the authentication request that follows it), and only once the server's
    EXT_INFO (its signature algorithms, which decide an RSA key's signature) has been read:
    the accept is then handled at once, as if it had come, and the real one is dropped when
    it comes. Any other server, or an asyncssh that looks different, gets asyncssh's own
    sequence."""
    try:
        handlers = dict(type(conn)._packet_handlers)
        on_accept, on_ext_info = handlers[_MSG_SERVICE_ACCEPT], handlers[_MSG_EXT_INFO]
        send_request = conn.send_service_request
        if conn._next_service is not None:
            return
    except (AttributeError, KeyError, TypeError):
        return
    state = {"requested": False, "ext_info": False, "early": False, "dropped": False}

    def start_early() -> None:
        if not (state["requested"] and state["ext_info"]) or state["early"]:
            return
        if conn._next_service != _USERAUTH or not bytes(
                getattr(conn, "_server_version", b"")).startswith(b"SSH-2.0-OpenSSH_"):
            return
        state["early"] = True
        on_accept(conn, _MSG_SERVICE_ACCEPT, 0, SSHPacket(String(_USERAUTH)))

    def send_service_request(service: bytes) -> None:
        send_request(service)
        state["requested"] = service == _USERAUTH
        start_early()

    def ext_info(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        on_ext_info(self, pkttype, pktid, packet)
        state["ext_info"] = True
        start_early()

    def service_accept(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        if state["early"] and not state["dropped"]:
            state["dropped"] = True  # (the accept already handled)
            if bytes(packet.get_string()) == _USERAUTH:
                packet.check_end()
                return
            packet = SSHPacket(String(b"?"))  # another service accepted: asyncssh refuses it
        on_accept(self, pkttype, pktid, packet)

    handlers[_MSG_EXT_INFO] = ext_info
    handlers[_MSG_SERVICE_ACCEPT] = service_accept
    conn._packet_handlers = handlers  # (an instance attribute: this connection only)
    conn.send_service_request = send_service_request


# -- the session channel opened behind the authentication request ----------------------------

_MSG_USERAUTH_FAILURE = 51  # RFC 4252
_MSG_CHANNEL_OPEN = 90  # RFC 4254
_EARLY_USABLE = all(callable(getattr(asyncssh.SSHClientChannel, name, None))
                    for name in ("create", "_open", "process_open_confirmation")) and len(
    inspect.signature(asyncssh.SSHClientChannel.create).parameters) == 14  # (self + 13)


class _EarlySession:
    """A session channel whose CHANNEL_OPEN went right behind the signed authentication
    request: RFC 4252 (section 5.1) has the server pass what follows a request that succeeds
    to the service after it, and OpenSSH does. `lost`: a USERAUTH_FAILURE came after it (the
    server saw it before authenticating, and refused it): a session is then opened as usual."""

    def __init__(self, chan: Any, opened: asyncio.Future[Any]) -> None:
        self.chan = chan
        self.opened = opened
        self.lost = False
        opened.add_done_callback(_retrieved)


_early_sessions: weakref.WeakKeyDictionary[Any, _EarlySession] = weakref.WeakKeyDictionary()
EARLY_OPEN_WAIT = 10.0  # seconds for an answer to the early open, then opened as usual


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (an early open the session never used: not logged)


def _plain_session(conn: Any) -> bool:
    """Whether asyncssh would open our exec session with nothing but the exec request: no
    environment, no terminal, no X11 or agent forwarding asked by the configuration, and no
    compression that starts after authentication (its first packets would be compressed)."""
    options = conn._options
    request_pty = options.request_pty
    pty = (request_pty == "force" or (request_pty and request_pty != "auto"
                                      and bool(options.term_type)))
    return (conn._compressor is None and not options.env and not options.send_env
            and not pty and not options.x11_forwarding and not conn._agent_forward_path)


def _open_session_early(conn: Any) -> None:
    """Right after the signed authentication request: send the CHANNEL_OPEN of the agent's
    session behind it, so that its confirmation comes with the USERAUTH_SUCCESS, one round
    trip earlier than asyncssh's own sequence (which holds channel messages back until
    authentication completes). Only towards OpenSSH, once per connection, and when nothing
    but the exec request would follow the open; does nothing if asyncssh's internals look
    different."""
    if conn in _early_sessions or not _EARLY_USABLE:
        return
    try:
        if conn._auth_complete or not bytes(
                getattr(conn, "_server_version", b"")).startswith(b"SSH-2.0-OpenSSH_"):
            return
        if not _plain_session(conn):
            return
        handlers = conn._packet_handlers
        on_failure = handlers[_MSG_USERAUTH_FAILURE]
        conn._update_recv_pktlen(MAX_PACKET)
        chan: Any = asyncssh.SSHClientChannel(conn, conn._loop, conn._utf8_decode_errors,
                                              None, "strict", CHANNEL_WINDOW, MAX_PACKET)
    except (AttributeError, KeyError, TypeError):
        return
    opened: asyncio.Future[Any] = conn._loop.create_future()
    chan._open_waiter = opened
    early = _early_sessions[conn] = _EarlySession(chan, opened)
    conn._auth_complete = True  # (asyncssh's gate for channel messages, for this one send)
    try:
        conn.send_packet(_MSG_CHANNEL_OPEN, String(b"session"), UInt32(chan._recv_chan),
                         UInt32(chan._recv_window), UInt32(chan._recv_pktsize), handler=chan)
    finally:
        conn._auth_complete = False

    def failure(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        early.lost = True
        on_failure(self, pkttype, pktid, packet)

    handlers = dict(handlers)
    handlers[_MSG_USERAUTH_FAILURE] = failure
    conn._packet_handlers = handlers  # (an instance attribute: this connection only)


async def _create_session(conn: asyncssh.SSHClientConnection, factory: Callable[[], Any],
                          command: str, window: int, max_pktsize: int) -> None:
    """The agent's exec session: on the channel opened early when there is one and the
    server took it, else as asyncssh opens one."""
    early = _early_sessions.pop(conn, None)
    if early is not None and not early.lost and (window, max_pktsize) == (CHANNEL_WINDOW,
                                                                           MAX_PACKET):
        try:
            # (Its answer came with the USERAUTH_SUCCESS, or right behind it.)
            packet = await asyncio.wait_for(asyncio.shield(early.opened), EARLY_OPEN_WAIT)
        except asyncssh.ChannelOpenError:
            pass  # (opened as usual below: the server says why it refuses)
        except asyncio.TimeoutError:
            early.opened.add_done_callback(lambda _: early.chan.close())  # (if ever opened)
        else:
            async def already_opened(_chantype: bytes, *_args: bytes) -> Any:
                return packet

            chan: Any = early.chan
            chan._open = already_opened
            await chan.create(factory, command, None, {}, False, None, (), {}, False, None,
                              None, False, False)
            return
    await conn.create_session(factory, command, encoding=None, window=window,
                              max_pktsize=max_pktsize)


class _TofuClient(asyncssh.SSHClient):
    """Accepts a host key only when asked to and the host has no key on record at all; and
    shortens authentication (`_shorten_auth`)."""

    def __init__(self, accept_new: bool, known_hosts_files: list[str]) -> None:
        self.accept_new = accept_new
        self.known_hosts_files = known_hosts_files
        self.accepted: tuple[str, int, asyncssh.SSHKey] | None = None
        self.rejected_reason = ""
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        coalesce.coalesce_writes(conn)
        _pipeline_auth(conn)

    def begin_auth(self, username: str) -> None:
        if self.conn is not None:
            _shorten_auth(self.conn)

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        if _is_revoked(self.known_hosts_files, host, addr, port, key):
            self.rejected_reason = (
                f"the host key of {host} ({key.get_fingerprint()}) is marked @revoked in "
                "known_hosts; refusing to connect.")
            return False
        if _host_has_keys(self.known_hosts_files, host, addr, port):
            self.rejected_reason = (
                f"the host key of {host} has CHANGED (it is not the one in known_hosts); "
                "refusing to connect. If the change is expected, remove the old key with "
                f"`ssh-keygen -R {host}`.")
            return False
        if not self.accept_new:
            self.rejected_reason = (
                f"the host key of {host} is unknown ({key.get_fingerprint()}); refusing to "
                "connect. Connect once with ssh to check and record it, or pass "
                "--accept-new-host-key to trust it on first use.")
            return False
        self.accepted = (host, port, key)
        return True


def _matches(files: list[str], host: str, addr: str, port: int | None) -> list[Any]:
    """asyncssh's known_hosts match for each readable file in `files`."""
    found = []
    for name in files:
        path = Path(name).expanduser()
        if not path.exists():
            continue
        try:
            known = asyncssh.read_known_hosts(str(path))
        except (OSError, ValueError):
            continue
        found.append(known.match(host, addr, port))
    return found


def _no_known_keys(host: str, addr: str, port: int | None) -> tuple[list[Any], ...]:
    """known_hosts as a callable that knows no key (asyncssh then asks the client)."""
    return [], [], []


def _host_has_keys(files: list[str], host: str, addr: str, port: int) -> bool:
    return any(match[0] or match[1] for match in _matches(files, host, addr, port))


def _is_revoked(files: list[str], host: str, addr: str, port: int,
                key: asyncssh.SSHKey) -> bool:
    """Whether known_hosts marks `key` @revoked for this host. (asyncssh's own lookup
    drops the `[host]:port` entries when they hold only revoked keys and retries without the
    port, so those entries are looked up here by their literal names too.)"""
    wanted = key.export_public_key()
    matches = _matches(files, host, addr, port)
    if port and port != 22:
        for name in {f"[{host}]:{port}", f"[{addr}]:{port}"}:
            matches += _matches(files, name, "", None)
    return any(revoked.export_public_key() == wanted
               for match in matches for revoked in match[2])


def _record_key(path: str, host: str, port: int, key: asyncssh.SSHKey) -> None:
    name = host if port == 22 else f"[{host}]:{port}"
    line = f"{name} {key.export_public_key().decode('ascii').strip()}\n"
    target = Path(path).expanduser()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(target, "a", encoding="ascii") as handle:
        handle.write(line)


def _known_hosts_files(options: asyncssh.SSHClientConnectionOptions) -> list[str]:
    """The known_hosts files asyncssh will check: UserKnownHostsFile, else the default;
    none at all for `UserKnownHostsFile none`."""
    configured = getattr(options, "known_hosts", ())
    if configured is None:
        return []
    if isinstance(configured, (list, tuple)) and configured and all(
            isinstance(f, str) for f in configured):
        return [os.path.expanduser(f) for f in configured]
    return [os.path.expanduser("~/.ssh/known_hosts")]


def _preferred_ciphers(configured: list[bytes]) -> list[str] | None:
    """AES-GCM ahead of ChaCha20-Poly1305 where the CPU has AES instructions and the user
    chose no ciphers (asyncssh's defaults): asyncssh spends less Python per packet on it,
    and bulk transfers are thousands of packets. None: leave the choice as it is."""
    if configured != _DEFAULT_CIPHERS or not _cpu_has_aes():
        return None
    first = [b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com"]
    return [alg.decode("ascii") for alg in [*first, *(a for a in configured if a not in first)]]


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[-1].split()
    except OSError:
        pass
    return False


async def connect(target: Target, config_files: list[str] | None, accept_new: bool,
                  connect_timeout: float = 30.0) -> asyncssh.SSHClientConnection:
    assert target.host is not None
    config: list[str] | tuple[()] = list(config_files) if config_files else ()
    # SSH keepalives notice a dead TCP path even when the agent link is quiet.
    kwargs: dict[str, Any] = {"config": config, "connect_timeout": connect_timeout,
                              "keepalive_interval": 10, "keepalive_count_max": 3}
    if target.user:
        kwargs["username"] = target.user
    try:
        options = asyncssh.SSHClientConnectionOptions(host=target.host, **kwargs)
        preferred = _preferred_ciphers(list(options.encryption_algs))
        if preferred is not None:  # (built afresh: layering options would add keys twice)
            options = asyncssh.SSHClientConnectionOptions(host=target.host, **kwargs,
                                                          encryption_algs=preferred)
    except (OSError, asyncssh.Error, ValueError) as exc:
        raise ConnectError(f"cannot read the SSH configuration: {exc}") from None
    known_files = _known_hosts_files(options)
    if options.known_hosts is None:
        # `UserKnownHostsFile none`: asyncssh would skip host-key checking altogether.
        # OpenSSH still verifies (against no known key): so do we.
        options = asyncssh.SSHClientConnectionOptions(options=options, known_hosts=_no_known_keys)
    client = _TofuClient(accept_new, known_files)
    try:
        sock = await _early_socket(target.host, config_files, options, connect_timeout)
        conn = await asyncssh.connect(target.host, options=options,
                                      client_factory=lambda: client, sock=sock)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyError(client.rejected_reason or f"host key not verified: {exc}") from None
    except asyncssh.PermissionDenied as exc:
        raise ConnectError(f"SSH authentication to {target.host} failed: {exc}") from None
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise ConnectError(f"cannot connect to {target.host}: {exc}") from None
    if client.accepted is not None and known_files:
        host, port, key = client.accepted
        _record_key(known_files[0], host, port, key)
    return conn


async def _early_socket(host: str, config_files: list[str] | None, options: Any,
                        wait: float) -> socket.socket | None:
    """The TCP connection `lsync connect` opened early to this very address, if any
    (lsync.client.transport.preconnect); OSError when it failed."""
    early = preconnect.take(host, config_files, options)
    if early is None:
        return None
    if not early.done.is_set():
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, early.done.wait, wait)
        except BaseException:  # cancelled: the socket is nobody's
            early.close()
            raise
        if not early.done.is_set():
            early.close()
            raise TimeoutError(f"connecting to {early.address[0]} port {early.address[1]} "
                               f"timed out")
    return early.result()


async def start_agent(conn: asyncssh.SSHClientConnection, stream: SshAgentStream) -> None:
    """Open the exec channel that runs the bootstrap loader and, through it, the agent.

    Whatever was written to `stream` before this call travels inside the exec request.
    """
    try:
        await stream.open(conn, remote_command, MAX_INITIAL, CHANNEL_WINDOW, MAX_PACKET,
                          _create_session)
    except (OSError, asyncssh.Error) as exc:
        raise ConnectError(f"cannot start the agent: {exc}") from None
