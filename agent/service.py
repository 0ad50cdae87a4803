"""The agent's core: what to do with each message, independent of how bytes move.

`AgentService.handle` takes one decoded message and answers through `send` (and `flush`,
which the driver implements, when a long answer such as the manifest is streamed). Every
operation gets exactly one `Ack` or `Error` with its `seq`; a failed operation leaves the
tree as it was and never ends the session. Handlers are dispatched through `_HANDLERS`,
after `messages.request_problem` has had its say: what it refuses is answered with its code
(an Error, or a Goodbye for a Hello) and never reaches a handler. Whole files arrive in
chunks here or go to the write pool (lsync.agent.writer); a delta or a copy is made from
what is on the remote by lsync.agent.derived (a bulk lane's delta in the pool, a save's at
once).
Each change also updates the record of what lsync made (`lsync.agent.records`), which the
manifest reports as each entry's `written` field and which outlives the agent. What a
change is about to put in place is said (`DigestRecord.intend`) before it is put there,
so that an agent killed in between loses no ownership; the next agent claims such paths
where they hold what was intended (`lsync.agent.writer.claim_intended`). One agent at a time keeps a
root's record: the Hello takes the root's lock, ending an older agent that still holds it.
A remote edit of what lsync wrote is kept aside before it is replaced or deleted
(lsync.agent.keeping); the client hears of it in a `Kept` message before the operation's
answer, and of every kept version in one right after the Welcome.
"""

import contextlib
import os
import stat
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from lsync.agent.confined import ConfinedRoot, file_key, resolve_root
from lsync.agent.derived import copy_file, write_delta
from lsync.agent.keeping import Keeper
from lsync.agent.listing import KeptListing, send_manifest
from lsync.agent.manifest import walk_tree, walk_under
from lsync.agent.records import DigestRecord, Intent
from lsync.agent.refusals import OpError
from lsync.agent.rootlock import RootLock
from lsync.agent.tempfiles import PendingFile
from lsync.agent.writer import (
    ANSWER,
    APPLY,
    WriteOrder,
    WritePool,
    batch_job,
    claim_intended,
    delta_job,
    hash_files,
    record_batch,
    record_file,
    record_outcomes,
    unpack_chunk,
    whole_file_job,
)
from lsync.protocol import PROTOCOL_VERSION, hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.errors import AckStatus, ErrorCode, ProtocolError
from lsync.protocol.paths import shown

MAX_MESSAGE = 1000  # characters of an Error's message
INLINE_WRITE_MAX = 256 << 10  # a whole file this small (packed) is written without the pool

Send = Callable[[m.Message], None]
LogInternal = Callable[[str, str], None]  # (context, traceback text)

# Operations that never touch a path a pooled write is on need not wait for the pool.
_PATH_OPS = (m.Mkdir, m.SetMode, m.Symlink, m.WriteFile, m.WriteDelta, m.Copy)


class SessionEnd(Exception):
    """Raised by a handler when the conversation is over (goodbye sent or received)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class AgentService:
    def __init__(self, send: Send, flush: Callable[[], None],
                 now_ns: Callable[[], int], use_cache: bool = True,
                 pool: Optional[WritePool] = None,
                 log_internal: Optional[LogInternal] = None,
                 offer_lanes: Optional[Callable[[], str]] = None) -> None:
        self.send = send
        self.offer_lanes = offer_lanes  # the driver's data-lane socket, "" if none
        self.pool = pool
        self.hashing = set()  # type: Set[int]  # HashPaths being answered by the pool
        self.log_internal = log_internal
        self.flush = flush
        self.now_ns = now_ns
        self.use_cache = use_cache
        self.root: Optional[ConfinedRoot] = None
        self.record: Optional[DigestRecord] = None
        self.kept: Optional[KeptListing] = None  # the last whole-tree listing, kept
        self.keeper: Optional[Keeper] = None  # keeps remote edits aside (the root's guard)
        self.lock = RootLock(None)
        self.hash_name = hashing.BLAKE2B_128
        self.pending: Dict[int, PendingFile] = {}
        self.pending_hashers: Dict[int, Any] = {}
        self.failed_writes: Set[int] = set()
        self.order = WriteOrder()  # content writes of a path take effect in seq order
        self.zdict = b""  # the preset dictionary of PACK_ZLIB_DICT chunks

    # -- dispatch -------------------------------------------------------------------------
    def handle(self, message: m.Message, bulk: bool = False) -> None:
        """Answer `message` now, or once the write pool has done it. `bulk`: it came on a
        bulk data lane (no save waits for it), so a delta may go to the pool too."""
        handler = _HANDLERS.get(type(message))
        if handler is None:  # messages the agent may receive but need no answer (Pong)
            return
        seq = getattr(message, "seq", None)
        problem = m.request_problem(message)
        if problem is not None:
            code, reason = problem
            if seq is not None:
                self._error(seq, code, reason)
                return
            self.send(m.Goodbye(int(code), reason))  # a Hello that cannot be served
            raise SessionEnd(int(code), reason)
        if self.root is None and isinstance(message, m.WriteBatch):
            for item in message.files:
                self._error(item[0], ErrorCode.ROOT_UNAVAILABLE, "no root is open")
            return
        if seq is not None and self.root is None:
            self._error(seq, ErrorCode.ROOT_UNAVAILABLE, "no root is open")
            return
        if self._superseded(message):
            return
        if self.pool is not None and self.pool.outstanding and not isinstance(message, m.Ping):
            # Wait for the pooled writes unless this message cannot see their paths.
            independent = isinstance(message, _PATH_OPS) or self._poolable(message, bulk)
            if not independent or self.pool.conflicts_any(_paths_of(message),
                                                          below=not _makes_open_dir(message)):
                self.drain_pool()
        if self.pool is not None and isinstance(message, m.WriteBatch):
            self._pool_batch(message)
            return
        if self.pool is not None and self._poolable(message, bulk):
            self._pool_write(message)  # type: ignore[arg-type]
            return
        try:
            handler(self, message)
        except OpError as exc:
            if seq is None:
                raise
            self._error(seq, exc.code, exc.message)
        finally:
            self._record_made_parents()

    def _superseded(self, message: m.Message) -> bool:
        """Whether `message` is an older content write than one already seen for its path
        (see WriteOrder); answered here when its answer is due."""
        outcome = self.order.check(message)
        if outcome == ANSWER:
            self._ack(message.seq, AckStatus.SUPERSEDED)  # type: ignore[union-attr]
        return outcome != APPLY

    def _record_made_parents(self) -> None:
        if self.root is not None and self.record is not None:
            for path, ino in self.root.take_made():
                self.record.made_dir(path, ino)

    # -- bulk writes in worker threads (see lsync.agent.writer) ----------------------------
    def _poolable(self, message: m.Message, bulk: bool) -> bool:
        """Batches, big whole files and a bulk lane's deltas go to the pool; a small file
        or a delta of a save is written at once, never queued behind a burst's work."""
        if isinstance(message, m.WriteBatch):
            return True
        if isinstance(message, m.WriteDelta):
            return bulk
        return (isinstance(message, m.WriteFile) and message.offset == 0 and message.final
                and len(message.data) > INLINE_WRITE_MAX
                and message.seq not in self.pending and message.seq not in self.failed_writes)

    def _pool_write(self, msg: Union[m.WriteFile, m.WriteDelta]) -> None:
        assert self.pool is not None and self.root is not None and self.record is not None
        self.record.ready_for_intents(self.now_ns())
        if isinstance(msg, m.WriteDelta):
            job = delta_job(self.root, self.record, msg, self.hash_name)
        else:
            job = whole_file_job(self.root, self.record, msg, self.hash_name, self.zdict)
        self.pool.submit(msg.seq, msg.path, job)

    def _pool_batch(self, msg: m.WriteBatch) -> None:
        assert self.pool is not None and self.record is not None
        self.record.ready_for_intents(self.now_ns())
        self.pool.submit_batch([item[1] for item in msg.files], self._batch_job(msg))

    def _batch_job(self, msg: m.WriteBatch) -> Callable[[], Any]:
        assert self.root is not None
        return batch_job(self.root, self.record, msg, self.order.stale_in(msg),
                         self.hash_name, self.zdict)

    def _answer_batch(self, files: List[List[Any]], results: Optional[List[Any]],
                      error: Optional[BaseException], trace: str) -> None:
        """Answer a batch's files (`error`: the whole batch failed)."""
        if error is not None:
            if not isinstance(error, OpError) and self.log_internal is not None:
                self.log_internal("writing a batch", trace)
            for seq, _, _, _ in files:
                self._answer_error(seq, error)
            return
        assert results is not None
        acked = []
        for seq, _, st, outcome in results:
            if st is None and outcome is None:
                self._ack(seq, AckStatus.SUPERSEDED)
            elif st is None:
                self._answer_error(seq, outcome)
            else:
                acked.append(seq)
        if acked:
            self._tell_kept()
            self.send(m.Acked(acked))

    def _answer_error(self, seq: int, error: BaseException) -> None:
        if isinstance(error, OpError):
            self._error(seq, error.code, error.message)
        else:
            self._error(seq, ErrorCode.INTERNAL, "internal agent error: {}".format(
                type(error).__name__))

    def on_write_batch(self, msg: m.WriteBatch) -> None:
        """A WriteBatch without a write pool: written here, in order."""
        outcome = self._batch_job(msg)()
        self._record_made_parents()
        assert self.record is not None
        record_batch(self.record, outcome[1])  # (before any answer: it may fail to go)
        self._answer_batch(*outcome)

    def collect_pool(self, wait: bool = False) -> None:
        """Answer for the pooled writes that have finished (with `wait`, for at least one)."""
        if self.pool is None:
            return
        outcomes = self.pool.collect(wait)
        self._record_made_parents()
        # Everything written is recorded before anything is answered: once the session is
        # over an answer raises, and what was written must still be recorded.
        assert self.record is not None
        hashed = [o for o in outcomes if o.seq in self.hashing]
        outcomes = [o for o in outcomes if o.seq not in self.hashing]
        record_outcomes(self.record, outcomes)
        for outcome in outcomes:
            if outcome.seq < 0 and outcome.error is None:
                self._answer_batch(*outcome.result)
            elif outcome.error is None:
                self._ack(outcome.seq)
            elif isinstance(outcome.error, OpError):
                self._error(outcome.seq, outcome.error.code, outcome.error.message)
            else:
                if self.log_internal is not None:
                    self.log_internal("writing {}".format(outcome.path), outcome.trace)
                self._error(outcome.seq, ErrorCode.INTERNAL, "internal agent error: {}".format(
                    type(outcome.error).__name__))
        for outcome in hashed:
            self.hashing.discard(outcome.seq)
            if outcome.error is None:
                self._answer_hashes(outcome.seq, outcome.result)
            else:
                if self.log_internal is not None:
                    self.log_internal("hashing files", outcome.trace)
                self._error(outcome.seq, ErrorCode.INTERNAL, "internal agent error: {}".format(
                    type(outcome.error).__name__))

    def drain_pool(self) -> None:
        while self.pool is not None and self.pool.outstanding:
            self.collect_pool(wait=True)

    def _ack(self, seq: int, status: AckStatus = AckStatus.OK, detail: str = "") -> None:
        self._tell_kept()
        self.send(m.Ack(seq, int(status), detail))

    def _tell_kept(self) -> None:
        """Say what was kept aside since the last answer (before the next answer goes)."""
        kept = self.keeper.take() if self.keeper is not None else []
        if kept:
            self.send(m.Kept(kept, False))

    def _error(self, seq: int, code: ErrorCode, message: str) -> None:
        self._tell_kept()
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        self.send(m.Error(seq, int(code), message))

    def close(self) -> None:
        if self.pool is not None:
            # Let every started write finish (each is atomic); their answers may no longer
            # be deliverable once the conversation is over.
            while self.pool.outstanding:
                try:
                    self.drain_pool()
                except ProtocolError:
                    pass
            self.pool.close()
            self.pool = None
        for pending in self.pending.values():
            pending.abort()
        self.pending.clear()
        if self.record is not None:
            self.record.close(self.now_ns())
        self.lock.release()
        if self.root is not None:
            self.root.close()
            self.root = None

    # -- keeping the record on disk (see lsync.agent.records) ------------------------------
    def journal(self) -> None:
        """Make what lsync wrote so far survive this process; call before acks leave."""
        if self.record is not None:
            self.record.journal(self.now_ns())

    def snapshot_wanted(self, quiet: bool) -> Optional[int]:
        """When (ns) the record wants a snapshot if the input stays quiet, or None."""
        if self.record is None:
            return None
        return self.record.snapshot_wanted(self.now_ns(), quiet)

    def save_record_if_due(self, quiet: bool) -> None:
        """Write a snapshot when one is due: `quiet` says the input has been idle a while."""
        if self.record is None:
            return
        now = self.now_ns()
        due = self.record.snapshot_wanted(now, quiet)
        if due is not None and due <= now:
            self.record.save(now)

    # -- handshake ------------------------------------------------------------------------
    def on_hello(self, msg: m.Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            self.send(m.Goodbye(int(ErrorCode.VERSION_MISMATCH),
                                "agent speaks protocol {}, client {}".format(
                                    PROTOCOL_VERSION, msg.version)))
            raise SessionEnd(int(ErrorCode.VERSION_MISMATCH), "version mismatch")
        offered = list(msg.capabilities.get("hash", []))
        if hashing.choose_hash(offered) is None:
            self.send(m.Goodbye(int(ErrorCode.VERSION_MISMATCH), "no common hash algorithm"))
            raise SessionEnd(int(ErrorCode.VERSION_MISMATCH), "no common hash")
        try:
            path = resolve_root(msg.root, bool(msg.options.get("create_root", True)))
            self.root = ConfinedRoot(path)
        except (OSError, ValueError) as exc:
            reason = "cannot use {} as the root: {}".format(
                shown(msg.root), getattr(exc, "strerror", None) or exc)
            self.send(m.Goodbye(int(ErrorCode.ROOT_UNAVAILABLE), reason))
            raise SessionEnd(int(ErrorCode.ROOT_UNAVAILABLE), reason)
        chosen = hashing.choose_hash(offered, self._recorded(path, offered))
        assert chosen is not None  # (checked above)
        self.hash_name = chosen
        cache = DigestRecord.default_path(path, chosen) if self.use_cache else None
        if self.use_cache:
            self.lock = RootLock(RootLock.default_path(path))
            self.lock.acquire()  # an older agent of this root ends (or is ended) first
        self.record = DigestRecord(cache, chosen)
        self.record.fs_clock = self.root.filesystem_now_ns
        path_kept = KeptListing.beside(cache)
        self.kept = KeptListing(path_kept) if path_kept else None
        self.record.load()
        claim_intended(self.root, self.record, self._new_hasher)
        self.record.ready_for_intents(self.now_ns())
        self.keeper = self.root.guard = Keeper(self.root.fd, self.record, self._new_hasher)
        compression = packing.choose_packing(msg.capabilities.get("compression", []))
        info = {
            "root": path,
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "executable": sys.executable or "",
            "pid": str(os.getpid()),
        }
        if self.lock.took_over:
            info["took_over"] = str(self.lock.took_over)  # the older agent this one ended
        if msg.options.get("lanes") and self.offer_lanes is not None:
            lanes = self.offer_lanes()
            if lanes:
                info["lanes"] = lanes  # a Unix socket: extra channels pump writes into it
        self.send(m.Welcome(PROTOCOL_VERSION, {"hash": chosen, "compression": compression},
                            info))
        self.send(m.Kept(self.keeper.listing(), True))

    def on_goodbye(self, msg: m.Goodbye) -> None:
        self.send(m.Goodbye(0, "bye"))
        raise SessionEnd(msg.code, msg.reason)

    def on_ping(self, msg: m.Ping) -> None:
        self.send(m.Pong(msg.nonce))

    # -- reading the tree -----------------------------------------------------------------
    def on_list_tree(self, msg: m.ListTree) -> None:
        assert self.root is not None and self.record is not None
        if msg.under:
            send_manifest(msg.seq, walk_under(self.root, msg.under, self.record), self.send,
                          self.flush)
        else:
            send_manifest(msg.seq, walk_tree(self.root.fd, self.record), self.send,
                          self.flush, self.kept, msg.since)

    def on_hash_paths(self, msg: m.HashPaths) -> None:
        """Hash the files in a worker thread when there is a pool: the main loop goes on
        answering pings meanwhile (2,000 big files on a slow disk took longer than the
        client's stall bound); answered by `collect_pool`."""
        assert self.root is not None and self.record is not None
        if self.pool is None:
            self._answer_hashes(msg.seq, hash_files(self.root, msg.paths, self._new_hasher))
            return
        self.hashing.add(msg.seq)
        root, paths, new_hasher = self.root, list(msg.paths), self._new_hasher
        self.pool.submit_read(msg.seq, lambda: hash_files(root, paths, new_hasher))

    def _answer_hashes(self, seq: int, found: List[Tuple[str, Optional[Tuple[bytes, Any]]]]
                       ) -> None:
        assert self.record is not None
        digests: List[Optional[bytes]] = []
        for path, result in found:
            if result is None:
                digests.append(None)
                continue
            digest, st = result
            self.record.remember(path, file_key(st), digest)
            digests.append(digest)
        self.send(m.Hashes(seq, digests))

    def _recorded(self, path: str, offered: List[str]) -> List[str]:
        """The offered algorithms under which this agent holds a record of root `path`."""
        if not self.use_cache:
            return []
        found = []
        for name in offered:
            if name not in hashing.HASHERS:
                continue
            record = DigestRecord(DigestRecord.default_path(path, name), name)
            if any(p is not None and os.path.exists(p)
                   for p in (record.cache_path, record.journal_path)):
                found.append(name)
        return found

    def _new_hasher(self) -> Any:
        return hashing.new_hasher(self.hash_name)

    # -- changing the tree ----------------------------------------------------------------
    def on_write_file(self, msg: m.WriteFile) -> None:
        assert self.root is not None and self.record is not None
        if msg.seq in self.failed_writes:
            if msg.final:
                self.failed_writes.discard(msg.seq)
            return  # the error was already reported for an earlier chunk
        pending = self.pending.get(msg.seq)
        try:
            if pending is None:
                if msg.offset != 0:
                    raise OpError(ErrorCode.BAD_REQUEST, "write {} starts at offset {}".format(
                        shown(msg.path), msg.offset))
                pending = self.root.begin_write(msg.path, mode=msg.mode)
                self.pending[msg.seq] = pending
                self.pending_hashers[msg.seq] = self._new_hasher()
            elif msg.offset != pending.size or msg.path != pending.path:
                raise OpError(ErrorCode.BAD_REQUEST, "chunk of {} out of order: offset {}, "
                              "expected {} of {}".format(shown(msg.path), msg.offset,
                                                        pending.size, shown(pending.path)))
            data = unpack_chunk(msg.path, msg.data, msg.packing, self.zdict)
            pending.write(data)
            self.pending_hashers[msg.seq].update(data)
            if not msg.final:
                return
            del self.pending[msg.seq]
            digest = self.pending_hashers.pop(msg.seq).digest()
            st = self._commit(pending, msg.mode, digest)
        except OpError:
            failed = self.pending.pop(msg.seq, None)
            self.pending_hashers.pop(msg.seq, None)
            if failed is not None:
                failed.abort()
            if not msg.final:
                self.failed_writes.add(msg.seq)
            raise
        record_file(self.record, msg.path, st, digest)
        self._ack(msg.seq)

    def _commit(self, pending: PendingFile, mode: int, digest: bytes) -> os.stat_result:
        """Put a written file in place, its intent said first (see lsync.agent.records)."""
        with self._intending([(pending.path, m.KIND_FILE, digest)]):
            return pending.commit(mode)

    @contextlib.contextmanager
    def _intending(self, intents: List[Intent]) -> Iterator[None]:
        """Say `intents` durably, then run the block; settle them after it (as failed when
        it raises)."""
        assert self.record is not None
        self.record.ready_for_intents(self.now_ns())
        self.record.intend(intents)
        try:
            yield
        except BaseException:
            self.record.settle(intents, failed=True)
            raise
        self.record.settle(intents)

    def on_write_delta(self, msg: m.WriteDelta) -> None:
        assert self.root is not None and self.record is not None
        st, digest = write_delta(self.root, self.record, msg, self._new_hasher, self._commit)
        record_file(self.record, msg.path, st, digest)
        self._ack(msg.seq)

    def on_set_dictionary(self, msg: m.SetDictionary) -> None:
        if len(msg.data) > m.MAX_DICTIONARY:
            raise OpError(ErrorCode.BAD_DELTA, "dictionary of {} bytes; at most {}".format(
                len(msg.data), m.MAX_DICTIONARY))
        self.zdict = msg.data
        self._ack(msg.seq)

    def on_delete(self, msg: m.Delete) -> None:
        assert self.root is not None and self.record is not None
        try:
            removed, was_dir = self.root.remove(msg.path)
        except OpError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                self.record.forget(msg.path)
                self._ack(msg.seq, AckStatus.ALREADY_ABSENT)
                return
            raise
        if removed:
            # An empty directory may still have records of entries removed behind our back.
            self.record.forget(msg.path, tree=was_dir)
            self._ack(msg.seq)
        else:
            # Nothing was removed (remove() touches only the named entry): records stay.
            self._ack(msg.seq, AckStatus.KEPT_NOT_EMPTY,
                      "kept {}: it holds files lsync did not sync".format(msg.path))

    def on_rename(self, msg: m.Rename) -> None:
        assert self.root is not None and self.record is not None
        with self._intending(self.record.moved_intents(msg.src, msg.dst)):
            st = self.root.rename(msg.src, msg.dst)
        self.record.move(msg.src, msg.dst, tree=st is None or stat.S_ISDIR(st.st_mode))
        self._ack(msg.seq)

    def on_copy(self, msg: m.Copy) -> None:
        assert self.root is not None and self.record is not None
        st, digest = copy_file(self.root, msg, self._new_hasher, self._commit)
        record_file(self.record, msg.dst, st, digest)
        self._ack(msg.seq)

    def on_mkdir(self, msg: m.Mkdir) -> None:
        assert self.root is not None and self.record is not None
        with self._intending([(msg.path, m.KIND_DIR, b"")]):
            st = self.root.mkdir(msg.path, msg.mode)
        # Made or found: either way the client now owns this directory.
        self.record.made_dir(msg.path, st.st_ino)
        self._ack(msg.seq)

    def on_symlink(self, msg: m.Symlink) -> None:
        assert self.root is not None and self.record is not None
        with self._intending([(msg.path, m.KIND_LINK,
                                msg.target.encode("utf-8", "surrogateescape"))]):
            self.root.symlink(msg.path, msg.target)
        self.record.forget(msg.path)
        self.record.wrote_link(msg.path, msg.target)
        self._ack(msg.seq)

    def on_set_mode(self, msg: m.SetMode) -> None:
        assert self.root is not None
        self.root.set_mode(msg.path, msg.mode)
        self._ack(msg.seq)


_HANDLERS: Dict[Any, Callable[[AgentService, Any], None]] = {
    m.Hello: AgentService.on_hello,
    m.Goodbye: AgentService.on_goodbye,
    m.Ping: AgentService.on_ping,
    m.ListTree: AgentService.on_list_tree,
    m.HashPaths: AgentService.on_hash_paths,
    m.WriteFile: AgentService.on_write_file,
    m.WriteDelta: AgentService.on_write_delta,
    m.Delete: AgentService.on_delete,
    m.Rename: AgentService.on_rename,
    m.Copy: AgentService.on_copy,
    m.Mkdir: AgentService.on_mkdir,
    m.Symlink: AgentService.on_symlink,
    m.SetMode: AgentService.on_set_mode,
    m.SetDictionary: AgentService.on_set_dictionary,
    m.WriteBatch: AgentService.on_write_batch,
}


def _makes_open_dir(message: m.Message) -> bool:
    """A Mkdir that leaves the directory open to its owner (writable, searchable): the
    pool's jobs under it, which may have made it on their way, need not finish first (the
    batches of a new directory's files often overtake its Mkdir on their data lanes)."""
    return isinstance(message, m.Mkdir) and message.mode & 0o300 == 0o300


def _paths_of(message: m.Message) -> List[str]:
    if isinstance(message, m.WriteBatch):
        return [item[1] for item in message.files]
    if isinstance(message, m.Copy):
        return [message.src, message.dst]
    return [message.path]  # type: ignore[union-attr]
