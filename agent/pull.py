"""Pulls: remote files the client asked for, listed and sent back (`lsync pull`, `run --pull`).

`PullService` answers the pull messages of lsync.protocol.messages next to `AgentService`
(the driver hands them here; the service knows nothing of pulls). It promises:

- Nothing outside the root is read or listed: the listing walks from directory descriptors
  without following symlinks (as lsync.agent.manifest does), and files are opened through
  `ConfinedRoot.open_read` (O_NOFOLLOW at every component, regular files only).
- The main loop never waits for a pull: listings and fetches run in worker threads. A fetch
  that came on a data lane is answered on that lane (lanes joined through
  lsync.agent.lanes carry data back to the client too; the client keeps its lane of single
  saves out of it), any other through the main stream: queued for the main loop to send
  (`outbox`, bounded: a worker waits while it is full). Saves arriving meanwhile are read
  and answered by the main loop as usual.
- Each fetch ends with exactly one `PullDone` on the stream its data took: its outcome,
  the size of the payload, the file's mode and the digest of what was sent (failures too:
  outcome PULL_FAILED with an error code). A listing is `PullListing` batches, or one
  `Error` when its rules cannot be compiled.
- Deltas reuse the push direction's BLOCK format (lsync.protocol.delta): the client sends
  hashes of fixed blocks of its copy, and every block of the remote file that hashes the
  same becomes a copy. Blocks are aligned (no rolling checksum: one in pure Python would
  cost more than the link saves), so content that moved by a few bytes travels again.

Standard library only, Python 3.6 syntax.
"""

import collections
import hashlib
import os
import queue
import re
import select
import socket
import stat
import threading
import zlib
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union

from lsync.agent.confined import DIR_FLAGS, ConfinedRoot, iter_fd
from lsync.agent.refusals import OpError
from lsync.agent.tempfiles import TEMP_PREFIX
from lsync.protocol import hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.delta import encode_block_delta
from lsync.protocol.errors import ErrorCode
from lsync.protocol.framing import MAGIC, encode_frame
from lsync.protocol.paths import relpath_problem

LISTING_BATCH = 2000
PIECE = 1 << 20  # bytes of content per PullData
DELTA_MAX = 256 << 20  # bigger files are always sent whole (a delta is built in memory)
DELTA_MIN_MATCHED = 0.5  # a delta must reuse at least this share of the new file
OUTBOX_LIMIT = 16  # messages queued for the main loop before a worker waits
WORKERS = 4
COMPRESS_LEVEL = 1
INCOMPRESSIBLE_SKIP = 8  # pieces sent raw after one that did not compress

Send = Callable[[m.Message], None]


def block_hash(data: Union[bytes, memoryview]) -> bytes:
    """The hash of one block, as both ends compute it."""
    return hashlib.blake2b(data, digest_size=m.PULL_BLOCK_HASH).digest()


# -- which paths the rules select ------------------------------------------------------------

class PullSelector(object):
    """Gitignore semantics for one list of rules at the root: the last matching rule
    decides; a selected directory selects everything below it; a `dir_only` rule matches
    directories only. Raises ValueError for a rule that does not compile."""

    def __init__(self, rules: List[List[Any]]) -> None:
        self.rules: List[Tuple[Any, bool, bool, bool]] = []
        self.prefixes: List[str] = []
        self.everywhere = False  # a positive name rule: any directory may hold a match
        for regex, flags, prefix in rules:
            try:
                compiled = re.compile(regex, re.DOTALL)
            except (re.error, OverflowError, RecursionError) as exc:
                raise ValueError("pull rule {!r}: {}".format(regex[:80], exc))
            negative = bool(flags & m.PULL_RULE_NEGATIVE)
            basename = bool(flags & m.PULL_RULE_BASENAME)
            self.rules.append((compiled, negative, bool(flags & m.PULL_RULE_DIR_ONLY),
                               basename))
            if not negative:
                if basename or not prefix:
                    self.everywhere = True
                else:
                    self.prefixes.append(prefix.rstrip("/") + "/")

    def _verdict(self, rel: str, is_dir: bool) -> Optional[bool]:
        name = rel.rpartition("/")[2]
        for compiled, negative, dir_only, basename in reversed(self.rules):
            if dir_only and not is_dir:
                continue
            if compiled.fullmatch(name if basename else rel):
                return not negative
        return None

    def selects(self, rel: str, is_dir: bool = False) -> bool:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if self._verdict("/".join(parts[:i]), True):
                return True
        return bool(self._verdict(rel, is_dir))

    def may_reach(self, dir_rel: str) -> bool:
        """Whether some rule may select a path below the directory `dir_rel`."""
        if self.everywhere:
            return True
        here = dir_rel + "/"
        return any(prefix.startswith(here) or here.startswith(prefix)
                   for prefix in self.prefixes)


def list_selected(root_fd: int, selector: PullSelector, since_ns: int
                  ) -> Iterator[List[Any]]:
    """Entries [path, size, mtime_ns, mode] of the regular files below `root_fd` that the
    selector selects and that were modified at or after `since_ns` (walked from directory
    descriptors, never through a symlink; directories no rule can reach are skipped)."""
    stack: List[Tuple[int, str, bool]] = [(os.dup(root_fd), "", False)]
    try:
        while stack:
            dfd, rel_dir, inside = stack.pop()
            try:
                names = sorted(os.listdir(dfd))
            except OSError:
                names = []
            subdirs = []
            for name in names:
                if name.startswith(TEMP_PREFIX):
                    continue
                rel = rel_dir + "/" + name if rel_dir else name
                if relpath_problem(rel):
                    continue
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if rel == m.KEPT_DIR:
                        continue  # remote edits kept aside (lsync.agent.keeping): no output
                    selected = inside or selector.selects(rel, True)
                    if selected or selector.may_reach(rel):
                        subdirs.append((name, rel, selected))
                elif stat.S_ISREG(st.st_mode) and st.st_mtime_ns >= since_ns and (
                        inside or selector.selects(rel)):
                    yield [rel, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)]
            for name, rel, selected in reversed(subdirs):
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=dfd)
                except OSError:
                    continue  # gone, or a symlink now: never followed
                stack.append((child, rel, selected))
            os.close(dfd)
    finally:
        for dfd, _, _ in stack:
            os.close(dfd)


# -- deltas against the client's copy --------------------------------------------------------

def block_copies(content: bytes, base_size: int, block_size: int, blocks: bytes
                 ) -> List[Tuple[int, int, int]]:
    """(new_offset, base_offset, length) copies of the aligned blocks of `content` whose
    hash is one of the client's blocks (of the same length), adjacent ones merged."""
    index: Dict[bytes, int] = {}
    count = len(blocks) // m.PULL_BLOCK_HASH
    for i in range(count):
        index.setdefault(blocks[i * m.PULL_BLOCK_HASH:(i + 1) * m.PULL_BLOCK_HASH],
                         i * block_size)
    copies: List[Tuple[int, int, int]] = []
    view = memoryview(content)
    for offset in range(0, len(content), block_size):
        piece = view[offset:offset + block_size]
        base = index.get(block_hash(piece))
        if base is None or min(block_size, base_size - base) != len(piece):
            continue
        if copies:
            new_at, base_at, length = copies[-1]
            if new_at + length == offset and base_at + length == base:
                copies[-1] = (new_at, base_at, length + len(piece))
                continue
        copies.append((offset, base, len(piece)))
    return copies


def delta_for(content: bytes, msg: m.PullFetch) -> Optional[bytes]:
    """A BLOCK delta turning the client's copy into `content`, or None when it would not
    reuse enough of it."""
    if not msg.blocks or not content:
        return None
    copies = block_copies(content, msg.base_size, msg.block_size, msg.blocks)
    if sum(c[2] for c in copies) < DELTA_MIN_MATCHED * len(content):
        return None
    return encode_block_delta(msg.base_size, content, copies, level=COMPRESS_LEVEL)


# -- where a fetch's messages go -------------------------------------------------------------

class LaneSink(object):
    """Messages to the client on one data lane's socket (written whole, one writer at a
    time; the stream back starts with MAGIC)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.started = False
        self.broken = False

    def send(self, message: m.Message, stop: threading.Event) -> None:
        data = encode_frame(m.encode_message(message))
        with self.lock:
            if not self.started:
                data = MAGIC + data
                self.started = True
            self._write_all(data, stop)

    def _write_all(self, data: bytes, stop: threading.Event) -> None:
        view = memoryview(data)
        fd = self.sock.fileno()
        while view and not stop.is_set():
            if self.broken or fd < 0:
                raise OSError("the data lane is closed")
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                select.select([], [fd], [], 0.5)
                continue
            except OSError:
                self.broken = True
                raise
            view = view[sent:]


class Outbox(object):
    """Messages for the main loop to send (no lane): bounded, with a wake-up descriptor."""

    def __init__(self) -> None:
        self.items: Deque[m.Message] = collections.deque()
        self.lock = threading.Condition()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def send(self, message: m.Message, stop: threading.Event, wait: bool = True) -> None:
        """Queue `message`; a worker (`wait`) waits while the outbox is full, the main
        thread (which empties it) never does."""
        with self.lock:
            while wait and len(self.items) >= OUTBOX_LIMIT and not stop.is_set():
                self.lock.wait(0.5)
            self.items.append(message)
        try:
            os.write(self.write_fd, b"!")
        except OSError:
            pass  # the pipe is full: wake-ups enough

    def take(self) -> List[m.Message]:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass
        with self.lock:
            out = list(self.items)
            self.items.clear()
            self.lock.notify_all()
        return out

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


# -- the service -----------------------------------------------------------------------------

class PullService(object):
    """Pull messages in, answers out (see the module docstring). `root` gives the session's
    confined root (None before the Hello), `hash_name` its digest. A fetch that came on a
    data lane is answered on it (`handle`'s `lane`), any other message on the main stream."""

    def __init__(self, root: Callable[[], Optional[ConfinedRoot]],
                 hash_name: Callable[[], str],
                 now_ns: Callable[[], int],
                 log_internal: Optional[Callable[[str, Optional[str]], None]] = None) -> None:
        self.root = root
        self.hash_name = hash_name
        self.now_ns = now_ns
        self.log_internal = log_internal
        self.outbox = Outbox()
        self.stop = threading.Event()
        self.jobs: "queue.Queue[Optional[Tuple[Callable[[], None], Any]]]" = queue.Queue()
        self.sinks: Dict[int, LaneSink] = {}  # by descriptor (the stream back of each lane)
        self.threads: List[threading.Thread] = []

    @staticmethod
    def handles(message: m.Message) -> bool:
        return isinstance(message, (m.PullList, m.PullFetch))

    @property
    def wakeup_fd(self) -> int:
        """Readable when messages wait in the outbox (select on it next to the input)."""
        return self.outbox.read_fd

    def take_outbox(self) -> List[m.Message]:
        return self.outbox.take()

    def handle(self, message: m.Message, lane: Optional[socket.socket] = None) -> None:
        root = self.root()
        if isinstance(message, m.PullList):
            if root is None:
                self.outbox.send(m.Error(message.seq, int(ErrorCode.ROOT_UNAVAILABLE),
                                         "no root is open"), self.stop, wait=False)
                return
            try:
                selector = PullSelector(message.rules)
            except ValueError as exc:
                self.outbox.send(m.Error(message.seq, int(ErrorCode.BAD_REQUEST),
                                         str(exc)[:1000]), self.stop, wait=False)
                return
            since = self.now_ns() - message.age_ns if message.age_ns else 0
            self._submit(lambda: self._list(root, message.seq, selector, since),
                         lambda why: self.outbox.send(m.Error(
                             message.seq, int(ErrorCode.INTERNAL), why), self.stop))
        elif isinstance(message, m.PullFetch):
            sink = self._sink(lane)
            problem = m.request_problem(message)
            if root is None or problem is not None:
                code, text = problem or (ErrorCode.ROOT_UNAVAILABLE, "no root is open")
                self._submit(lambda: self._failed(sink, message.seq, code, text))
                return
            self._submit(lambda: self._fetch(root, message, sink),
                         lambda why: self._failed(sink, message.seq, ErrorCode.INTERNAL, why))

    def _sink(self, lane: Optional[socket.socket]) -> Any:
        """Where a fetch's answer goes: its lane's stream back, else the outbox."""
        if lane is None or lane.fileno() < 0:
            return self.outbox
        sink = self.sinks.get(lane.fileno())
        if sink is None or sink.sock is not lane:
            sink = self.sinks[lane.fileno()] = LaneSink(lane)
        return sink

    def _submit(self, job: Callable[[], None],
                failed: Optional[Callable[[str], None]] = None) -> None:
        """Run `job` in a worker; a bug in it is logged and answered through `failed`."""
        while len(self.threads) < WORKERS:  # started with the first pull
            thread = threading.Thread(target=self._work, name="lsync-pull", daemon=True)
            self.threads.append(thread)
            thread.start()
        self.jobs.put((job, failed))

    def _work(self) -> None:
        while not self.stop.is_set():
            item = self.jobs.get()
            if item is None:
                return
            job, failed = item
            try:
                job()
            except Exception as exc:  # a bug: logged, and its request answered
                if self.log_internal is not None:
                    self.log_internal("pulling", None)
                if failed is not None:
                    try:
                        failed("internal agent error: {}".format(type(exc).__name__))
                    except Exception:
                        pass  # (the lane is gone: so is the client's link)

    def close(self) -> None:
        self.stop.set()
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(2.0)
        self.outbox.close()

    # -- the jobs -------------------------------------------------------------------------
    def _list(self, root: ConfinedRoot, seq: int, selector: PullSelector,
              since: int) -> None:
        batch: List[List[Any]] = []
        for entry in list_selected(root.fd, selector, since):
            batch.append(entry)
            if len(batch) >= LISTING_BATCH:
                self.outbox.send(m.PullListing(seq, batch, False), self.stop)
                batch = []
        self.outbox.send(m.PullListing(seq, batch, True), self.stop)

    def _failed(self, sink: Any, seq: int, code: ErrorCode, text: str) -> None:
        sink.send(m.PullDone(seq, m.PULL_FAILED, 0, 0, b"", int(code), text[:1000]),
                  self.stop)

    def _fetch(self, root: ConfinedRoot, msg: m.PullFetch, sink: Any) -> None:
        try:
            fd = root.open_read(msg.path)
        except OpError as exc:
            self._failed(sink, msg.seq, exc.code, exc.message)
            return
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if msg.base is not None and st.st_size <= DELTA_MAX:
                content = b"".join(iter_fd(fd))
                self._send_content(content, msg, mode, sink)
                return
            if msg.base is not None:
                hasher = hashing.new_hasher(self.hash_name())
                for piece in iter_fd(fd):
                    hasher.update(piece)
                if hasher.digest() == msg.base:
                    sink.send(m.PullDone(msg.seq, m.PULL_SAME, 0, mode, msg.base, 0, ""),
                              self.stop)
                    return
                os.lseek(fd, 0, os.SEEK_SET)
            self._stream(iter_fd(fd), msg.seq, mode, sink)
        except OSError as exc:
            if isinstance(sink, LaneSink) and sink.broken:
                return  # the lane is gone: so is the client's link
            self._failed(sink, msg.seq, ErrorCode.IO_ERROR, "read {}: {}".format(
                msg.path, exc.strerror or exc))
        finally:
            os.close(fd)

    def _send_content(self, content: bytes, msg: m.PullFetch, mode: int, sink: Any) -> None:
        hasher = hashing.new_hasher(self.hash_name())
        for piece in _pieces(content):  # (in pieces: the main thread gets the GIL between)
            hasher.update(piece)
        digest = hasher.digest()
        if digest == msg.base:
            sink.send(m.PullDone(msg.seq, m.PULL_SAME, 0, mode, digest, 0, ""), self.stop)
            return
        delta = delta_for(content, msg)
        if delta is None or len(delta) >= len(content):
            self._stream(_pieces(content), msg.seq, mode, sink, digest)
            return
        for offset in range(0, len(delta), PIECE):
            sink.send(m.PullData(msg.seq, offset, delta[offset:offset + PIECE],
                                 packing.PACK_RAW), self.stop)
        sink.send(m.PullDone(msg.seq, m.PULL_DELTA, len(delta), mode, digest, 0, ""),
                  self.stop)

    def _stream(self, pieces: Iterator[bytes], seq: int, mode: int, sink: Any,
                digest: Optional[bytes] = None) -> None:
        """Send content piece by piece (each compressed when that pays), then PullDone."""
        hasher = hashing.new_hasher(self.hash_name()) if digest is None else None
        offset = 0
        raw_for = 0
        for piece in pieces:
            if self.stop.is_set():
                return
            if hasher is not None:
                hasher.update(piece)
            data, code = piece, packing.PACK_RAW
            if raw_for:
                raw_for -= 1
            else:
                packed = zlib.compress(piece, COMPRESS_LEVEL)
                if len(packed) < len(piece) * 0.9:
                    data, code = packed, packing.PACK_ZLIB
                else:
                    raw_for = INCOMPRESSIBLE_SKIP
            sink.send(m.PullData(seq, offset, data, code), self.stop)
            offset += len(piece)
        if hasher is not None:
            digest = hasher.digest()
        assert digest is not None
        sink.send(m.PullDone(seq, m.PULL_WHOLE, offset, mode, digest, 0, ""), self.stop)


def _pieces(content: bytes) -> Iterator[bytes]:
    for offset in range(0, len(content), PIECE):
        yield content[offset:offset + PIECE]
