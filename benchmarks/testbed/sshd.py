"""A private OpenSSH sshd on 127.0.0.1 for tests and benchmarks.

`PrivateSshd` generates its own host key and client key in a directory it is given, writes an
sshd_config that accepts only that client key for the current user, starts
``/usr/sbin/sshd -D -e -f CONFIG`` on a free loopback port and stops it again. It also writes
a known_hosts file and an ssh client config (``Host <alias>``) that work both with OpenSSH
(``ssh -F cfg alias``) and with asyncssh (``asyncssh.connect(alias, config=[cfg])``). Extra
client configs can point the same alias at another port (a delay proxy in front of sshd);
their known_hosts entries are added for that port. Nothing listens beyond 127.0.0.1, and host
keys are always checked strictly.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

SSHD_BINARY = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
LOOPBACK = "127.0.0.1"
DEFAULT_ALIAS = "lsync-testbed"

# Options that newer OpenSSH releases understand and older ones reject: each is kept only if
# `sshd -t` accepts it. PerSourcePenalties (9.8+) would otherwise penalise 127.0.0.1 after a
# test deliberately aborts a connection, and refuse the next ones.
_OPTIONAL_SSHD_LINES = ("PerSourcePenalties no",)


class SshdError(RuntimeError):
    """The private sshd could not be set up, started or stopped.

    `code` says which step failed: "keygen", "config", "start", "timeout" or "stop".
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


def current_user() -> str:
    """Name of the user this process runs as (the account sshd lets the test key log into)."""
    return pwd.getpwuid(os.getuid()).pw_name


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def generate_key(path: Path, comment: str) -> Path:
    """Write an ed25519 key pair without passphrase at `path` (+ ``.pub``); return `path`."""
    if path.exists():
        path.unlink()
    pub = path.with_name(path.name + ".pub")
    if pub.exists():
        pub.unlink()
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SshdError("keygen", f"ssh-keygen failed for {path}: {proc.stderr.strip()}")
    path.chmod(0o600)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600 (ssh refuses group/world-writable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class PrivateSshd:
    """A private sshd listening on 127.0.0.1, with its keys and client files in `workdir`.

    Use as a context manager or call `start()` / `stop()`. After `start()`:
    `port` is sshd's port, `client_config` is an ssh client config for `alias` pointing at it,
    `known_hosts` holds the host key for every port a client config was written for.
    """

    def __init__(
        self,
        workdir: Path | str,
        alias: str = DEFAULT_ALIAS,
        user: str | None = None,
        start_timeout: float = 10.0,
        home: Path | str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        # $HOME of the sessions (`SetEnv`): where a remote tree given relative lives, and
        # the agent's records; None: the user's own.
        self.home = Path(home).resolve() if home is not None else None
        self.alias = alias
        self.user = user if user is not None else current_user()
        self.start_timeout = start_timeout
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.sshd_config = self.workdir / "sshd_config"
        self.client_config = self.workdir / "ssh_config"
        self.known_hosts = self.workdir / "known_hosts"
        self.pid_file = self.workdir / "sshd.pid"
        self.log_file = self.workdir / "sshd.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._known_ports: set[int] = set()

    # -- keys and files ---------------------------------------------------------------------

    @property
    def host_public_key(self) -> str:
        """The host's public key line (``ssh-ed25519 AAAA... comment``)."""
        return self.host_key.with_name(self.host_key.name + ".pub").read_text().strip()

    @property
    def client_public_key_file(self) -> Path:
        return self.client_key.with_name(self.client_key.name + ".pub")

    def _make_keys(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.home is not None:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.host_key.exists():
            generate_key(self.host_key, "lsync-testbed-host")
        if not self.client_key.exists():
            generate_key(self.client_key, "lsync-testbed-client")

    def _sshd_config_text(self, port: int, optional: tuple[str, ...]) -> str:
        lines = [
            "# private sshd for lsync tests and benchmarks (generated)",
            f"Port {port}",
            f"ListenAddress {LOOPBACK}",
            "AddressFamily inet",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.client_public_key_file}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "PermitEmptyPasswords no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PermitTunnel no",
            "MaxStartups 200",
            "MaxSessions 200",
            "MaxAuthTries 6",
            "LoginGraceTime 30",
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
            *([f"SetEnv HOME={self.home}"] if self.home is not None else []),
            *optional,
        ]
        return "\n".join(lines) + "\n"

    def _config_accepted(self) -> tuple[bool, str]:
        proc = subprocess.run(
            [SSHD_BINARY, "-t", "-f", str(self.sshd_config)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode == 0, proc.stderr.strip()

    def _write_sshd_config(self, port: int) -> None:
        kept: list[str] = []
        for line in _OPTIONAL_SSHD_LINES:
            _write_private(self.sshd_config, self._sshd_config_text(port, (*kept, line)))
            ok, _ = self._config_accepted()
            if ok:
                kept.append(line)
        _write_private(self.sshd_config, self._sshd_config_text(port, tuple(kept)))
        ok, err = self._config_accepted()
        if not ok:
            raise SshdError("config", f"sshd -t rejects {self.sshd_config}: {err}")

    def _write_known_hosts(self) -> None:
        key = " ".join(self.host_public_key.split()[:2])
        lines = []
        for port in sorted(self._known_ports):
            lines.append(f"[{LOOPBACK}]:{port},[{self.alias}]:{port} {key}")
        lines.append(f"{self.alias} {key}")
        _write_private(self.known_hosts, "\n".join(lines) + "\n")

    def write_client_config(
        self,
        path: Path | str | None = None,
        port: int | None = None,
        alias: str | None = None,
        known_hosts: Path | str | None = None,
        extra: dict[str, str] | None = None,
    ) -> Path:
        """Write an ssh client config for `alias` that connects to 127.0.0.1:`port`.

        `port` defaults to sshd's own; pass a delay proxy's port to go through the proxy (its
        known_hosts entry is added). `known_hosts` overrides the file checked (tests use it to
        see an unknown host key refused). `extra` adds options (``{"ControlPath": ...}``).
        Returns the path written (default: ``workdir/ssh_config`` for sshd's own port, else
        ``workdir/ssh_config.<port>``).
        """
        if port is None:
            if not self.port:
                raise SshdError("config", "sshd has no port yet: call start() first")
            port = self.port
        alias = alias or self.alias
        if path is None:
            path = self.client_config if port == self.port else self.workdir / f"ssh_config.{port}"
        path = Path(path)
        kh = Path(known_hosts) if known_hosts is not None else self.known_hosts
        if known_hosts is None and port not in self._known_ports:
            self._known_ports.add(port)
            self._write_known_hosts()
        options: dict[str, str] = {
            "HostName": LOOPBACK,
            "Port": str(port),
            "User": self.user,
            "IdentityFile": str(self.client_key),
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "UserKnownHostsFile": str(kh),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no",
            "CheckHostIP": "no",
            "BatchMode": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PreferredAuthentications": "publickey",
            "LogLevel": "ERROR",
            "ConnectTimeout": "30",
        }
        if extra:
            options.update(extra)
        body = "".join(f"    {k} {v}\n" for k, v in options.items())
        _write_private(path, f"# generated by benchmarks.testbed.sshd\nHost {alias}\n{body}")
        return path

    # -- process ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> PrivateSshd:
        """Generate keys and config, start sshd, wait until it listens; returns self."""
        if self.running:
            return self
        if not os.path.exists(SSHD_BINARY):
            raise SshdError("start", f"{SSHD_BINARY} not found (install openssh-server)")
        if shutil.which("ssh-keygen") is None:
            raise SshdError("keygen", "ssh-keygen not found (install openssh-client)")
        if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._make_keys()
        last_error = ""
        for _attempt in range(5):
            port = free_port()
            self._write_sshd_config(port)
            ok, last_error = self._spawn_and_wait(port)
            if ok:
                self.port = port
                self.write_client_config()
                return self
        raise SshdError("start", f"sshd did not start: {last_error}")

    def _spawn_and_wait(self, port: int) -> tuple[bool, str]:
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            start_offset = log.tell()
            proc = subprocess.Popen(
                [SSHD_BINARY, "-D", "-e", "-f", str(self.sshd_config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        self._proc = proc
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                return False, self._log_since(start_offset)
            if self._accepts(port):
                return True, ""
            time.sleep(0.005)
        self._terminate(proc)
        self._proc = None
        raise SshdError("timeout", f"sshd did not listen within {self.start_timeout}s")

    def _log_since(self, offset: int) -> str:
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").strip()

    @staticmethod
    def _accepts(port: int) -> bool:
        """True once sshd answers on `port` with an SSH banner."""
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
                return sock.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop the listening sshd (sessions already open end when their clients go)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)

    def __enter__(self) -> PrivateSshd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers for callers ----------------------------------------------------------------

    def ssh_command(self, *remote: str, config: Path | str | None = None) -> list[str]:
        """argv for ``ssh -F CONFIG alias REMOTE...`` (default: the direct client config)."""
        cfg = Path(config) if config is not None else self.client_config
        return ["ssh", "-F", str(cfg), self.alias, *remote]

    def rsh(self, config: Path | str | None = None) -> str:
        """The ``-e`` / ``--rsh`` string for rsync: ``ssh -F CONFIG``."""
        cfg = Path(config) if config is not None else self.client_config
        return f"ssh -F {cfg}"
