"""Bulk writes in worker threads, so that creating files overlaps reading the stream.

Creating a file is the slow part of a bulk sync (a filesystem may take hundreds of
microseconds per create) and it releases the GIL, as do inflating and hashing. `WritePool`
runs such jobs in a few threads and hands their outcomes back to the main thread, which
alone touches the service's state and answers the client.

The ordering promise is the caller's half of the contract: `AgentService` gives the pool
only jobs on paths that `conflicts()` says are independent of every job still running, and
drains the pool before any operation that could see or change a running job's path, so
every path still goes through its operations in sequence order. Answers may leave in a
different order; each names its sequence number.

`whole_file_job`, `delta_job` and `batch_job` are those jobs (a batch's may run inline
too, through `write_batch`); each says what it is about to put in place before it does
(intents, see lsync.agent.records), the service records what was put there. A job reads
the record's digests but changes none of them: that is the service's thread's.
`WriteOrder` keeps content writes of one path in sequence order across the streams they
arrive on.
`claim_intended` records as lsync's what a killed agent had said it was about to put in
place and is there now (intents: see lsync.agent.records).
"""

import collections
import os
import select
import stat
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Set, Tuple

from lsync.agent.confined import ConfinedRoot, Parents, file_key
from lsync.agent.derived import write_delta
from lsync.agent.records import DigestRecord
from lsync.agent.refusals import OpError
from lsync.agent.tempfiles import PendingFile
from lsync.protocol import hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode

WORKERS = 4


class Outcome(NamedTuple):
    seq: int  # -1 for a job on several paths (a batch)
    path: str
    result: Any  # the job's return value, when error is None
    error: Optional[BaseException]
    trace: str  # the formatted traceback of an unexpected error
    paths: List[str]  # every path the job was on


class WritePool:
    def __init__(self, workers: int = WORKERS) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="lsync-write")
        self._done: Deque[Outcome] = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._busy: Dict[str, int] = {}  # path -> jobs running on it
        self._below: Dict[str, int] = {}  # directory -> jobs running under it
        self._lock = threading.Lock()
        self.outstanding = 0

    @property
    def wakeup_fd(self) -> int:
        """Readable when a job has finished (select on it next to the input)."""
        return self._read_fd

    def conflicts(self, path: str) -> bool:
        """Whether an operation on `path` could see or change a running job's path."""
        return self.conflicts_any([path])

    def conflicts_any(self, paths: List[str], below: bool = True) -> bool:
        """Whether an operation on any of `paths` could see or change a running job's path
        (the directories above them are looked at once each: a batch's files share them).
        Without `below`, jobs under the paths do not count (making a directory that a job
        may be making on its way, see ConfinedRoot.mkdir: made or found, either way)."""
        if not self.outstanding:
            return False
        busy, under = self._busy, self._below if below else {}
        parents = set()
        for path in paths:
            if path in busy or path in under:
                return True
            parents.add(path.rpartition("/")[0])
        seen: Set[str] = set()
        for parent in parents:
            while parent and parent not in seen:
                if parent in busy:
                    return True
                seen.add(parent)
                parent = parent.rpartition("/")[0]
        return False

    def submit(self, seq: int, path: str, job: Callable[[], Any]) -> None:
        self._submit(seq, [path], job)

    def submit_read(self, seq: int, job: Callable[[], Any]) -> None:
        """A job that only reads (hashing for a HashPaths): it holds no path busy."""
        self._submit(seq, [], job)

    def submit_batch(self, paths: List[str], job: Callable[[], Any]) -> None:
        """A job on several paths (seq -1 in its outcome); each counts as busy until done."""
        self._submit(-1, paths, job)

    def _submit(self, seq: int, paths: List[str], job: Callable[[], Any]) -> None:
        self._count(paths, 1)
        self.outstanding += 1
        self._executor.submit(self._run, seq, paths, job)

    def _run(self, seq: int, paths: List[str], job: Callable[[], Any]) -> None:
        path = paths[0] if len(paths) == 1 else ""
        try:
            outcome = Outcome(seq, path, job(), None, "", paths)
        except BaseException as exc:  # handed to the main thread, which answers for it
            outcome = Outcome(seq, path, None, exc, traceback.format_exc(), paths)
        with self._lock:
            self._done.append(outcome)
        try:
            os.write(self._write_fd, b"!")
        except OSError:
            pass  # the pipe is full: the main thread has wake-ups enough

    def collect(self, wait: bool = False) -> List[Outcome]:
        """Outcomes of finished jobs; with `wait`, block until at least one (if any runs)."""
        if wait and self.outstanding:
            while True:
                with self._lock:
                    if self._done:
                        break
                select.select([self._read_fd], [], [])
                self._clear_wakeups()
        self._clear_wakeups()
        with self._lock:
            finished = list(self._done)
            self._done.clear()
        for outcome in finished:
            self._count(outcome.paths, -1)
            self.outstanding -= 1
        return finished

    def _clear_wakeups(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _count(self, paths: List[str], step: int) -> None:
        """Count `paths` busy (step 1) or done (-1), and the directories above them; each
        directory's chain is walked once, with the number of paths directly in it."""
        parents: Dict[str, int] = {}
        for path in paths:
            _bump(self._busy, path, step)
            parent = path.rpartition("/")[0]
            parents[parent] = parents.get(parent, 0) + step
        for parent, count in parents.items():
            while parent:
                _bump(self._below, parent, count)
                parent = parent.rpartition("/")[0]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        os.close(self._read_fd)
        os.close(self._write_fd)


def _bump(counts: Dict[str, int], key: str, step: int) -> None:
    value = counts.get(key, 0) + step
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


def record_file(record: DigestRecord, path: str, st: os.stat_result, digest: bytes) -> None:
    """Record that lsync wrote `digest` at `path` (now of stat `st`), its intent settled."""
    record.remember(path, file_key(st), digest)
    record.wrote_file(path, digest)
    record.settle([(path, m.KIND_FILE, digest)])


def record_batch(record: DigestRecord, results: Optional[List[Any]]) -> None:
    """Record what a batch wrote (`write_batch`'s results, None when it failed whole)."""
    record.wrote_files([(path, file_key(st), digest) for _, path, st, digest in results or ()
                        if st is not None])


def record_outcomes(record: DigestRecord, outcomes: List[Outcome]) -> None:
    """Record what finished pooled writes wrote (call before anything is answered: once
    the session is over an answer raises, and what was written must still be recorded)."""
    for outcome in outcomes:
        if outcome.error is not None:
            continue
        if outcome.seq < 0:
            record_batch(record, outcome.result[1])
        else:
            record_file(record, outcome.path, outcome.result[0], outcome.result[1])


def unpack_chunk(path: str, data: bytes, code: int, zdict: bytes,
                 limit: int = m.MAX_CHUNK) -> bytes:
    """One WriteFile chunk's content, refusing anything beyond `limit` bytes."""
    try:
        return packing.unpack(data, code, limit, zdict)
    except packing.PackingError as exc:
        raise OpError(ErrorCode.BAD_DELTA, "compressed chunk for {} refused: {}".format(
            path, exc))


def whole_file_job(root: ConfinedRoot, record: DigestRecord, msg: m.WriteFile,
                   hash_name: str, zdict: bytes) -> Callable[[], Any]:
    """The work of a whole file in one WriteFile, for any thread: it returns (stat, digest)
    or raises. Its intent is said before it is put in place (the caller made the record
    `ready_for_intents`) and settled here if that fails; the caller records it."""

    def job() -> Any:
        data = unpack_chunk(msg.path, msg.data, msg.packing, zdict)
        hasher = hashing.new_hasher(hash_name)
        hasher.update(data)
        digest = hasher.digest()
        pending = root.begin_write(msg.path, mode=msg.mode)
        try:
            pending.write(data)
        except BaseException:
            pending.abort()
            raise
        return commit_intended(record, pending, msg.mode, digest), digest

    return job


def commit_intended(record: DigestRecord, pending: PendingFile, mode: int,
                    digest: bytes) -> os.stat_result:
    """Put a pooled job's file in place, its intent said first (the caller made the record
    `ready_for_intents`) and settled as failed if that fails; for any thread."""
    intents = [(pending.path, m.KIND_FILE, digest)]
    record.intend(intents)
    try:
        return pending.commit(mode)
    except BaseException:
        record.settle(intents, failed=True)
        raise


def delta_job(root: ConfinedRoot, record: DigestRecord, msg: m.WriteDelta,
              hash_name: str) -> Callable[[], Any]:
    """The work of a WriteDelta (lsync.agent.derived.write_delta), for any thread: it returns
    (stat, digest) or raises. The base's digest is looked up but not remembered (the record's
    digests are the service thread's to change; the path is replaced anyway)."""

    def job() -> Any:
        return write_delta(root, record, msg, lambda: hashing.new_hasher(hash_name),
                           lambda pending, mode, digest: commit_intended(
                               record, pending, mode, digest), remember=False)

    return job


def batch_job(root: ConfinedRoot, record: Optional[DigestRecord], msg: m.WriteBatch,
              skip: Set[int], hash_name: str, zdict: bytes) -> Callable[[], Any]:
    """The work of a WriteBatch, for any thread. It returns (files, results, error,
    trace): per file written (seq, path, stat, digest), per file refused (seq, path,
    None, OpError); `error` when the batch as a whole failed (every file in it fails)."""

    def job() -> Any:
        try:
            total = sum(item[3] for item in msg.files)  # never inflate beyond it
            data = unpack_chunk("a batch", msg.data, msg.packing, zdict,
                                min(total, m.MAX_CHUNK))
            return (msg.files, write_batch(root, msg.files, data, hash_name, skip, record),
                    None, "")
        except Exception as exc:
            return msg.files, None, exc, traceback.format_exc()

    return job


def write_batch(root: ConfinedRoot, files: List[List[Any]], data: bytes,
                hash_name: str, skip: Optional[Set[int]] = None,
                record: Optional[DigestRecord] = None) -> List[Any]:
    """Write the files of a WriteBatch (`data`: their contents, unpacked), each atomically,
    reaching each directory once: [(seq, path, stat, digest)] per file written,
    [(seq, path, None, OpError)] per file refused, [(seq, path, None, None)] per file of
    `skip` (superseded: not written). Raises OpError when `data` does not
    hold exactly the files' sizes (then none is written). What the batch is about to
    write is said to `record` first, in one write (`DigestRecord.intend`, after the
    caller's `ready_for_intents`); the caller records and settles what was written. For
    any thread."""
    total = sum(item[3] for item in files)
    if total > m.MAX_CHUNK:
        raise OpError(ErrorCode.BAD_REQUEST, "a batch of {} bytes; at most {}".format(
            total, m.MAX_CHUNK))
    if len(data) != total:
        raise OpError(ErrorCode.BAD_REQUEST, "a batch holds {} bytes, its files {}".format(
            len(data), total))
    work = []  # (seq, path, mode, offset of the content, digest); digest None: skipped
    offset = 0
    view = memoryview(data)
    for item in files:
        seq, path, mode, size = item[:4]
        digest = None
        if not (skip and seq in skip):
            if len(item) > 4:
                digest = item[4]  # the client's, of the bytes it sent (see WriteBatch)
            else:
                hasher = hashing.new_hasher(hash_name)
                hasher.update(view[offset:offset + size])
                digest = hasher.digest()
        work.append((seq, path, mode, offset, digest))
        offset += size
    if record is not None:
        record.intend([(path, m.KIND_FILE, digest) for _, path, _, _, digest in work
                       if digest is not None])
    results: List[Any] = []
    parents = Parents(root)
    try:
        for (seq, path, mode, offset, digest), item in zip(work, files):
            if digest is None:
                results.append((seq, path, None, None))
                continue
            try:
                pending = root.begin_write(path, parents, mode)
                try:
                    # A view, not a copy (PendingFile.write takes any buffer).
                    pending.write(view[offset:offset + item[3]])
                except BaseException:
                    pending.abort()
                    raise
                results.append((seq, path, pending.commit(mode), digest))
            except OpError as exc:
                if record is not None:
                    record.settle([(path, m.KIND_FILE, digest)], failed=True)
                results.append((seq, path, None, exc))
    finally:
        parents.close()
    return results


def claim_intended(root: ConfinedRoot, record: DigestRecord,
                   new_hasher: Callable[[], Any]) -> None:
    """Record as lsync's what an earlier agent was about to put in place and that is there
    now (it was killed before recording it, see lsync.agent.records), and the directories
    above it, which that agent may have made on the way (a Mkdir would claim them too).
    The service calls it once, right after loading the record."""
    candidates = record.take_candidates()
    above = {path.rpartition("/")[0] for path in candidates}
    while above - {""}:
        for path in above - {""}:
            candidates.setdefault(path, [(m.KIND_DIR, b"")])
        above = {path.rpartition("/")[0] for path in above}
    for path, wanted in sorted(candidates.items()):
        kinds = {kind for kind, _ in wanted}
        try:
            dfd, name = root.parent_fd(path)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else None
            finally:
                os.close(dfd)
            if stat.S_ISREG(st.st_mode) and m.KIND_FILE in kinds:
                digest = record.lookup(path, file_key(st))
                if digest is None:
                    digest, st = root.digest_file(path, new_hasher)
                    record.remember(path, file_key(st), digest)
                if (m.KIND_FILE, digest) in wanted:
                    record.wrote_file(path, digest)
            elif target is not None and m.KIND_LINK in kinds:
                value = target.encode("utf-8", "surrogateescape")
                if (m.KIND_LINK, value) in wanted:
                    record.wrote_link(path, target)
            elif (stat.S_ISDIR(st.st_mode) and m.KIND_DIR in kinds
                  and record.written(path, m.KIND_DIR, st.st_ino) is None):
                record.made_dir(path, st.st_ino)
        except (OSError, OpError, ValueError):
            continue  # gone, or not reachable inside the root: nothing to claim


APPLY = "apply"  # WriteOrder.check: the write is the newest of its path
SKIP = "skip"  # an older write's chunk: ignore it, answer nothing yet
ANSWER = "answer"  # an older write, complete: answer it SUPERSEDED, apply nothing


class WriteOrder:
    """Content writes of one path take effect in seq order, whatever stream (data lane)
    they came on: one arriving after a newer write of its path is not applied (the chunks
    of a chunked one are ignored, and its last one answered). Sans-IO: the service asks
    `check` for each message and `stale_in` for a batch."""

    def __init__(self) -> None:
        self.latest: Dict[str, int] = {}  # path -> seq of its newest content write
        self.skipped: Set[int] = set()  # chunked writes found older: their chunks are ignored

    def check(self, message: Any) -> str:
        if isinstance(message, m.WriteFile):
            if message.seq in self.skipped:
                if not message.final:
                    return SKIP
                self.skipped.discard(message.seq)
                return ANSWER
            if message.offset != 0:
                return APPLY
        elif not isinstance(message, m.WriteDelta):
            return APPLY
        if self._newer(message.path, message.seq):
            return APPLY
        if isinstance(message, m.WriteFile) and not message.final:
            self.skipped.add(message.seq)
            return SKIP
        return ANSWER

    def stale_in(self, batch: m.WriteBatch) -> Set[int]:
        """The seqs of a batch's files that a newer write of their path already passed."""
        return {item[0] for item in batch.files if not self._newer(item[1], item[0])}

    def _newer(self, path: str, seq: int) -> bool:
        if self.latest.get(path, -1) > seq:
            return False
        self.latest[path] = seq
        return True


def hash_files(root: ConfinedRoot, paths: List[str], new_hasher: Callable[[], Any]
               ) -> List[Tuple[str, Optional[Tuple[bytes, Any]]]]:
    """For a HashPaths (any thread): per path, its (digest, stat) or None when it is no
    regular file that can be read."""
    found = []  # type: List[Tuple[str, Optional[Tuple[bytes, Any]]]]
    for path in paths:
        try:
            found.append((path, root.digest_file(path, new_hasher)))
        except OpError:
            found.append((path, None))
    return found
