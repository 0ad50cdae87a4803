"""Agent hardening: special files never block nor get replaced, hostile requests get a
clear refusal (never INTERNAL), and a tree changing under the agent's feet (a directory or
file swapped for a symlink to outside) never makes it act outside the root."""

import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import lsync.agent
from lsync.agent import confined
from lsync.agent.service import AgentService
from lsync.agent.writer import WritePool
from lsync.protocol import PROTOCOL_VERSION, hashing
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, CLIENT, Connection
from lsync.protocol.errors import AckStatus, ErrorCode, ProtocolError
from lsync.protocol.framing import MAGIC, encode_frame
from tests.compat.helpers import Pair, TempTree, manifest

DEAD_PID = 2 ** 22 + 12345  # above any pid_max default: never a live process


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: SIGALRM interrupts a blocked open()."""
    def fire(signum, frame):
        raise AssertionError("blocked for more than {} s".format(seconds))
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _session(tree):
    pair = Pair(tree.root)
    welcome = pair.pump()
    assert isinstance(welcome[0], m.Welcome), welcome
    return pair, welcome[0].chosen["hash"]


def _is_fifo(path):
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def _refused(reply, code, *words):
    assert isinstance(reply, m.Error) and reply.code == code, reply
    for word in words:
        assert word in reply.message, (word, reply)


def test_a_fifo_at_a_synced_path_is_refused_never_replaced_and_never_blocks():
    tree = TempTree()
    try:
        pair, algorithm = _session(tree)
        os.mkfifo(tree.path("p"))
        tree.write("f", b"file")
        digest = hashing.digest_of(algorithm, b"file")
        with deadline(10):
            _refused(pair.op(m.WriteFile(1, "p", 0o644, 0, b"x", True)),
                     ErrorCode.TYPE_CONFLICT, "p", "FIFO")
            pair.client.send(m.WriteFile(2, "p", 0o644, 0, b"x" * 10, False))
            assert pair.pump() == []
            _refused(pair.op(m.WriteFile(2, "p", 0o644, 10, b"y", True)),
                     ErrorCode.TYPE_CONFLICT, "FIFO")
            _refused(pair.op(m.WriteDelta(3, "p", 0o644, digest, digest, b"")),
                     ErrorCode.BASE_MISMATCH, "FIFO")
            _refused(pair.op(m.Copy(4, "f", "p", 0o644, digest)), ErrorCode.TYPE_CONFLICT)
            _refused(pair.op(m.Copy(5, "p", "g", 0o644, digest)), ErrorCode.DIGEST_MISMATCH)
            _refused(pair.op(m.Symlink(6, "p", "f")), ErrorCode.TYPE_CONFLICT, "FIFO")
            _refused(pair.op(m.Rename(7, "f", "p")), ErrorCode.TYPE_CONFLICT, "FIFO")
            _refused(pair.op(m.Rename(13, "p", "moved")), ErrorCode.TYPE_CONFLICT, "FIFO")
            _refused(pair.op(m.Delete(14, "p")), ErrorCode.TYPE_CONFLICT, "FIFO")
            _refused(pair.op(m.SetMode(8, "p", 0o600)), ErrorCode.TYPE_CONFLICT, "FIFO")
            _refused(pair.op(m.Mkdir(9, "p", 0o755)), ErrorCode.TYPE_CONFLICT)
            _refused(pair.op(m.WriteFile(10, "p/inside", 0o644, 0, b"x", True)),
                     ErrorCode.TYPE_CONFLICT)
            pair.client.send(m.HashPaths(11, ["p", "f"]))
            assert pair.pump() == [m.Hashes(11, [None, digest])]
            assert "p" not in manifest(pair, 12)
        assert _is_fifo(tree.path("p")) and tree.read("f") == b"file"
        assert not os.path.exists(tree.path("g"))
        assert [n for n in os.listdir(tree.root) if n.startswith(confined.TEMP_PREFIX)] == []
    finally:
        tree.cleanup()


def test_a_pooled_write_over_a_fifo_is_refused_too():
    tree = TempTree()
    sent = []
    service = AgentService(sent.append, lambda: None, lambda: 10 ** 18, use_cache=False,
                           pool=WritePool(2))
    try:
        service.handle(m.Hello(PROTOCOL_VERSION, {"hash": ["blake2b-128"]}, tree.root, {}))
        os.mkfifo(tree.path("p"))
        with deadline(10):
            service.handle(m.WriteFile(1, "p", 0o644, 0, b"x", True))
            service.drain_pool()
        assert sent[-1].code == ErrorCode.TYPE_CONFLICT and "FIFO" in sent[-1].message
        assert _is_fifo(tree.path("p"))
    finally:
        service.close()
        tree.cleanup()


def test_nul_bytes_in_the_root_end_the_session_with_bad_path():
    tree = TempTree()
    try:
        pair = Pair(tree.root + "/x\x00y")
        replies = pair.pump()
        assert len(replies) == 1 and isinstance(replies[0], m.Goodbye), replies
        assert replies[0].code == ErrorCode.BAD_PATH and "NUL" in replies[0].reason
        assert pair.ended is not None and pair.ended.code == ErrorCode.BAD_PATH
    finally:
        tree.cleanup()


def test_the_agent_process_answers_a_nul_root_cleanly():
    tree = TempTree()
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        lsync.agent.__file__))))
    env = dict(os.environ, HOME=tree.base, PYTHONPATH=top)
    try:
        client = Connection(CLIENT)
        client.send(m.Hello(PROTOCOL_VERSION, {"hash": ["blake2b-128"]}, "r\x00oot", {}))
        result = subprocess.run([sys.executable, "-m", "lsync.agent"],
                                input=client.data_to_send(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, timeout=30)
        client.receive_data(result.stdout)
        goodbye = client.next_message()
        assert isinstance(goodbye, m.Goodbye) and goodbye.code == ErrorCode.BAD_PATH, goodbye
        assert result.returncode == 1, (result.returncode, result.stderr)
        assert not os.path.exists(os.path.join(tree.base, ".cache", "lsync", "agent.log"))
    finally:
        tree.cleanup()


def test_bad_link_targets_are_refused_with_bad_path():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _refused(pair.op(m.Symlink(1, "l", "a\x00b")), ErrorCode.BAD_PATH, "NUL")
        _refused(pair.op(m.Symlink(2, "l", "")), ErrorCode.BAD_PATH, "empty")
        _refused(pair.op(m.Symlink(3, "l", "x" * 5000)), ErrorCode.BAD_PATH, "too long")
        _refused(pair.op(m.Symlink(4, "l\x00", "x")), ErrorCode.BAD_PATH, "NUL")
        _refused(pair.op(m.WriteFile(5, "a\x00b", 0o644, 0, b"", True)), ErrorCode.BAD_PATH)
        assert pair.op(m.Symlink(6, "l", "../anywhere/at/all")).status == AckStatus.OK
        assert os.listdir(tree.root) == ["l"]
    finally:
        tree.cleanup()


def test_hash_paths_is_bounded():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        started = time.monotonic()
        _refused(pair.op(m.HashPaths(1, ["x"] * (m.MAX_HASH_PATHS + 1))),
                 ErrorCode.BAD_REQUEST, str(m.MAX_HASH_PATHS))
        reply = pair.op(m.HashPaths(2, ["x"] * m.MAX_HASH_PATHS))
        assert reply.digests == [None] * m.MAX_HASH_PATHS
        assert time.monotonic() - started < 20
        # Far more: refused while unpacking, before any list is built.
        payload = m.encode_message(m.HashPaths(3, ["x"] * (m.MAX_ARRAY_LEN + 1)))
        conn = Connection(AGENT)
        conn.receive_data(MAGIC + encode_frame(payload))
        try:
            conn.next_message()
        except ProtocolError as exc:
            assert exc.code == ErrorCode.MALFORMED_FRAME
        else:
            raise AssertionError("an oversized array was accepted")
    finally:
        tree.cleanup()


def test_client_mistakes_in_chunked_writes_are_bad_requests_not_internal():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _refused(pair.op(m.WriteFile(1, "f", 0o644, 5, b"late", True)),
                 ErrorCode.BAD_REQUEST, "offset 5")
        pair.client.send(m.WriteFile(2, "g", 0o644, 0, b"abc", False))
        assert pair.pump() == []
        _refused(pair.op(m.WriteFile(2, "g", 0o644, 7, b"gap", False)),
                 ErrorCode.BAD_REQUEST, "out of order")
        pair.client.send(m.WriteFile(2, "g", 0o644, 10, b"end", True))
        assert pair.pump() == []  # later chunks of a failed write get no second answer
        assert os.listdir(tree.root) == []
    finally:
        tree.cleanup()


def test_modes_are_set_on_unreadable_entries_through_o_path():
    if not hasattr(os, "O_PATH") or not os.path.isdir("/proc/self/fd"):
        return  # Linux only; elsewhere such a chmod is refused with PERMISSION_DENIED
    tree = TempTree()
    try:
        tree.write("f", b"x")
        os.chmod(tree.path("f"), 0)
        dfd = os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = confined._chmod_unreadable(dfd, "f", "f", 0o640, False)
            os.symlink("f", tree.path("l"))
            assert confined._chmod_unreadable(dfd, "l", "l", 0o600, False) is None
        finally:
            os.close(dfd)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert stat.S_IMODE(os.stat(tree.path("f")).st_mode) == 0o640
    finally:
        tree.cleanup()


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_swapping_entries_for_symlinks_to_outside_never_reaches_outside():
    tree = TempTree()
    stop = threading.Event()
    swaps = [0]
    try:
        outside = os.path.join(tree.base, "outside")
        os.mkdir(outside, 0o751)
        os.chmod(outside, 0o751)
        with open(os.path.join(outside, "victim"), "wb") as handle:
            handle.write(b"secret")
        os.chmod(os.path.join(outside, "victim"), 0o644)
        os.mkdir(os.path.join(outside, "inner"))
        os.chmod(os.path.join(outside, "inner"), 0o755)
        stale = "{}{}-1".format(confined.TEMP_PREFIX, DEAD_PID)
        for name in ("outside_only", stale, "inner/" + stale):
            with open(os.path.join(outside, name), "wb") as handle:
                handle.write(b"not lsync's")
        before = {name: _mode(os.path.join(outside, name))
                  for name in ["."] + sorted(os.listdir(outside))}
        os.mkdir(tree.path("d"))
        os.mkdir(tree.path("d/inner"))
        tree.write("f", b"ours")
        pair, _ = _session(tree)

        def swap(name, target):
            real, link = tree.path(name), tree.path(name + ".real")
            try:
                os.rename(real, link)
                os.symlink(target, real)
                time.sleep(0.0002)
                os.unlink(real)
                os.rename(link, real)
                swaps[0] += 1
            except OSError:
                if os.path.lexists(link) and not os.path.lexists(real):
                    os.rename(link, real)

        def swapper():
            while not stop.is_set():
                swap("d", outside)
                swap("f", os.path.join(outside, "victim"))

        thread = threading.Thread(target=swapper)
        thread.start()
        try:
            seq = 0
            seen = set()
            ends = time.monotonic() + 1.5
            while time.monotonic() < ends:
                for message in (m.SetMode(seq + 1, "d", 0o700), m.Mkdir(seq + 2, "d", 0o700),
                                m.SetMode(seq + 3, "f", 0o600), m.SetMode(seq + 4, "d/inner",
                                                                         0o700)):
                    pair.op(message)
                seen.update(manifest(pair, seq + 5))
                seq += 5
        finally:
            stop.set()
            thread.join(10)
        assert swaps[0] > 50, swaps
        after = {name: _mode(os.path.join(outside, name))
                 for name in ["."] + sorted(os.listdir(outside))}
        assert after == before
        assert os.path.exists(os.path.join(outside, stale))
        assert os.path.exists(os.path.join(outside, "inner", stale))
        assert not [p for p in seen if "outside_only" in p or "victim" in p], seen
        with open(os.path.join(outside, "victim"), "rb") as handle:
            assert handle.read() == b"secret"
    finally:
        stop.set()
        tree.cleanup()
