"""The sync engine: turns "this path may have changed" into pipelined operations.

Paths become dirty (from the initial comparison or from the watcher); the engine takes
them in order and reconciles each: it looks at the local path now, compares it with the
`RemoteModel`, and sends whatever operations make the remote match — nothing when they
already match. A path dirtied again while still queued is reconciled once, with its newest
content. Operations flow through a bounded window (count and bytes) and are acknowledged
asynchronously; nothing on this path waits for the remote except for window space.

Safety: before any delete the engine checks that the local root still exists and is not
suddenly empty; otherwise it raises `SafetyStop` and sends nothing more.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsync.client.errors import SafetyStop
from lsync.client.hashcache import HashCache
from lsync.client.ignore import IgnoreRules
from lsync.client.link import AgentLink, Reply
from lsync.client.model import DIR, FILE, LINK, RemoteEntry, RemoteModel
from lsync.client.reporter import Reporter
from lsync.client.scanner import LocalEntry, ScanError, UnstableFileError, read_file_stable
from lsync.protocol import messages as m
from lsync.protocol.errors import AckStatus, ErrorCode
from lsync.protocol.paths import relpath_problem

CHUNK = 4 << 20
WINDOW_OPS = 4096
WINDOW_BYTES = 64 << 20
HASH_BATCH = 2000
UNSTABLE_RETRY = 0.05
# Files are read whole into memory (and sent in CHUNK pieces); bigger ones are reported.
MAX_FILE = 1 << 30

@dataclass(slots=True)
class InFlight:
    path: str
    nbytes: int
    since: float  # when the path became dirty: the save, as far as we can tell
    op: str


@dataclass
class Counters:
    files: int = 0
    bytes: int = 0
    errors: int = 0
    last_latency: float | None = None


class SyncEngine:
    def __init__(self, link: AgentLink, root: Path, rules: IgnoreRules, cache: HashCache,
                 reporter: Reporter, delete_extra: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.root = root
        self.rules = rules
        self.cache = cache
        self.reporter = reporter
        self.delete_extra = delete_extra
        self.clock = clock
        self.model = RemoteModel()
        self.dirty: dict[str, float] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.in_flight_bytes = 0
        self.counters = Counters()
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._retry_handles: set[asyncio.TimerHandle] = set()
        self._initial_total = (0, 0)  # files, bytes queued by the initial comparison
        self._initial_done = (0, 0)

    # -- input ----------------------------------------------------------------------------
    def mark_dirty(self, paths: Iterable[str], since: float | None = None) -> None:
        when = self.clock() if since is None else since
        added = False
        for path in paths:
            if path not in self.dirty:
                self.dirty[path] = when
                added = True
        if added:
            self._idle.clear()
            self._wakeup.set()
            self.reporter.queue(len(self.dirty), len(self.in_flight))

    async def wait_idle(self) -> None:
        """Return once nothing is queued and every operation sent has been answered."""
        while True:
            self._check_idle()
            if self._idle.is_set():
                return
            await self._idle.wait()

    def _check_idle(self) -> None:
        if not self.dirty and not self.in_flight:
            self._idle.set()

    # -- initial comparison ---------------------------------------------------------------
    async def initial_sync(self, local: dict[str, LocalEntry],
                           remote_entries: list[list[Any]]) -> None:
        """Load the remote manifest and queue every path where local and remote differ."""
        for path, kind, size, _mtime, mode, digest, target in remote_entries:
            if self.rules.is_ignored(path, kind == DIR):
                continue
            self.model.put(path, RemoteEntry(kind, mode, digest, target, owned=False,
                                             size=size))
        if self.delete_extra and not local and len(self.model):
            raise SafetyStop(
                f"the local tree {self.root} is empty while the remote holds "
                f"{len(self.model)} entries; refusing to delete them (--delete)")
        to_send: list[str] = []
        need_hash: list[str] = []
        for path in sorted(local):
            entry = local[path]
            remote = self.model.get(path)
            if remote is None or remote.kind != _kind(entry):
                to_send.append(path)
            elif entry.kind == "dir":
                remote.owned = True
                if remote.mode != entry.mode:
                    to_send.append(path)
            elif entry.kind == "link":
                if remote.target == entry.target:
                    remote.owned = True
                else:
                    to_send.append(path)
            elif remote.size != entry.size or entry.digest is None:
                to_send.append(path)
            elif remote.digest is None:
                need_hash.append(path)
            elif remote.digest == entry.digest:
                remote.owned = True
                if remote.mode != entry.mode:
                    to_send.append(path)
            else:
                to_send.append(path)
        batches = [need_hash[i:i + HASH_BATCH] for i in range(0, len(need_hash), HASH_BATCH)]
        results = await asyncio.gather(*(self.link.hash_paths(b) for b in batches))
        for batch, digests in zip(batches, results, strict=True):
            for path, digest in zip(batch, digests, strict=True):
                remote = self.model.get(path)
                assert remote is not None
                remote.digest = digest
                if digest is not None and digest == local[path].digest:
                    remote.owned = True
                    if remote.mode != local[path].mode:
                        to_send.append(path)
                else:
                    to_send.append(path)
        if self.delete_extra:
            extra = [p for p in self.model.entries if p not in local]
            for path in extra:
                entry_ = self.model.get(path)
                if entry_ is not None:
                    entry_.owned = True
            to_send.extend(sorted(extra))
        files = [p for p in to_send if p in local and local[p].kind == "file"]
        self._initial_total = (len(files), sum(local[p].size for p in files))
        self._initial_done = (0, 0)
        self.mark_dirty(sorted(set(to_send)))

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Reconcile dirty paths for ever (until cancelled or a SafetyStop)."""
        try:
            while True:
                if not self.dirty:
                    self._check_idle()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                path, since = next(iter(self.dirty.items()))
                await self._wait_for_window()
                if self.dirty.get(path) != since:
                    continue
                del self.dirty[path]
                await self._reconcile(path, since)
                self.reporter.queue(len(self.dirty), len(self.in_flight))
        finally:
            for handle in self._retry_handles:
                handle.cancel()
            self._retry_handles.clear()

    async def _wait_for_window(self) -> None:
        while len(self.in_flight) >= WINDOW_OPS or self.in_flight_bytes >= WINDOW_BYTES:
            self._space.clear()
            await self._space.wait()

    def _retry_later(self, path: str, since: float) -> None:
        def again() -> None:
            self._retry_handles.discard(handle)
            self.mark_dirty([path], since)

        handle = asyncio.get_running_loop().call_later(UNSTABLE_RETRY, again)
        self._retry_handles.add(handle)

    # -- reconciling one path -------------------------------------------------------------
    async def _reconcile(self, path: str, since: float) -> None:
        if path == "":
            self._check_root()
            await self._reconcile_dir_listing("", since)
            return
        if relpath_problem(path):
            return
        absolute = self.root / path
        try:
            st = os.lstat(absolute) if self._parent_is_real(path) else None
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self.reporter.failed(path, f"cannot read: {exc.strerror}")
            return
        remote = self.model.get(path)
        if st is not None and self.rules.is_ignored(path, stat.S_ISDIR(st.st_mode)):
            if remote is not None:
                self.model.drop_tree(path)  # ignored now: leave the remote copy alone
            return
        if st is None:
            self.rules.forget(path)
            if remote is not None:
                await self._remove(path, since)
            return
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            await self._reconcile_dir(path, remote, mode, since)
        elif stat.S_ISLNK(st.st_mode):
            await self._reconcile_link(path, remote, since)
        elif stat.S_ISREG(st.st_mode):
            await self._reconcile_file(path, remote, st, since)

    def _parent_is_real(self, path: str) -> bool:
        """False when a directory above `path` is now a symlink: the path is gone for us."""
        parent = path.rpartition("/")[0]
        if not parent:
            return True
        return os.path.realpath(self.root / parent) == str(self.root / parent)

    async def _reconcile_dir(self, path: str, remote: RemoteEntry | None, mode: int,
                             since: float) -> None:
        if remote is not None and remote.kind != DIR:
            await self._remove(path, since)
            remote = None
        if remote is None or remote.mode != mode or not remote.owned:
            self._submit(m.Mkdir(self.link.next_seq(), path, mode), path, 0, since)
            self.model.put(path, RemoteEntry(DIR, mode, owned=True))
        await self._reconcile_dir_listing(path, since)

    async def _reconcile_dir_listing(self, path: str, since: float) -> None:
        """Queue children that exist on one side only (moved-in or vanished subtrees)."""
        local_children: set[str] = set()
        try:
            with os.scandir(self.root / path if path else self.root) as listing:
                for item in listing:
                    child = f"{path}/{item.name}" if path else item.name
                    if relpath_problem(child):
                        continue
                    if self.rules.is_ignored(child, item.is_dir(follow_symlinks=False)):
                        continue
                    local_children.add(child)
        except OSError:
            return
        self.mark_dirty(sorted(local_children ^ self.model.child_names(path)), since)

    async def _reconcile_link(self, path: str, remote: RemoteEntry | None,
                              since: float) -> None:
        try:
            target = os.readlink(self.root / path)
        except OSError:
            self.mark_dirty([path], since)
            return
        if remote is not None and remote.kind == LINK and remote.target == target:
            remote.owned = True
            return
        if remote is not None and remote.kind == DIR:
            await self._remove(path, since)
        self._submit(m.Symlink(self.link.next_seq(), path, target), path, 0, since)
        self.model.put(path, RemoteEntry(LINK, 0, target=target, owned=True))

    async def _reconcile_file(self, path: str, remote: RemoteEntry | None,
                              st: os.stat_result, since: float) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if remote is not None and remote.kind == FILE and remote.mode == mode and remote.owned:
            # The hash cache trusts a stat only for files older than the clock's granularity,
            # so a same-size rewrite within one timestamp tick is always read again.
            known = self.cache.lookup(path, st)
            if known is not None and known == remote.digest:
                return
        try:
            content, entry = read_file_stable(self.root, path, self.cache, limit=MAX_FILE)
        except UnstableFileError:
            self._retry_later(path, since)
            return
        except FileNotFoundError:
            self._retry_later(path, since)  # gone or replaced meanwhile: look again
            return
        except (OSError, ScanError) as exc:
            self.reporter.failed(path, f"cannot read: {exc}")
            return
        digest = entry.digest
        mode = entry.mode
        if remote is not None and remote.kind == FILE and remote.digest == digest:
            if remote.mode != mode:
                self._submit(m.SetMode(self.link.next_seq(), path, mode), path, 0, since)
                remote.mode = mode
            remote.owned = True
            return
        if remote is not None and remote.kind == DIR:
            await self._remove(path, since)
        await self._send_file(path, content, mode, since)
        self.model.put(path, RemoteEntry(FILE, mode, digest, owned=True, size=len(content)))

    async def _send_file(self, path: str, content: bytes, mode: int, since: float) -> None:
        seq = self.link.next_seq()
        if len(content) <= CHUNK:
            self._submit(m.WriteFile(seq, path, mode, 0, content, True), path, len(content),
                         since, op="write")
            await self.link.drain()
            return
        first = m.WriteFile(seq, path, mode, 0, content[:CHUNK], False)
        self._submit(first, path, len(content), since, op="write")
        for offset in range(CHUNK, len(content), CHUNK):
            final = offset + CHUNK >= len(content)
            self.link.send(m.WriteFile(seq, path, mode, offset, content[offset:offset + CHUNK],
                                       final))
            await self.link.drain()

    async def _remove(self, path: str, since: float) -> None:
        """Delete what lsync owns at and below `path`; the rest stays."""
        self._check_root()
        for below in list(self.model.descendants(path)):
            self._remove_one(below, since)
        self._remove_one(path, since)

    def _remove_one(self, path: str, since: float) -> None:
        entry = self.model.get(path)
        if entry is None:
            return
        if entry.owned or self.delete_extra:
            self._submit(m.Delete(self.link.next_seq(), path), path, 0, since, op="delete")
        self.model.drop(path)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise SafetyStop(f"the local tree {self.root} has disappeared; stopped without "
                             "deleting anything on the remote")
        try:
            with os.scandir(self.root) as listing:
                empty = next(iter(listing), None) is None
        except OSError as exc:
            raise SafetyStop(f"the local tree {self.root} cannot be read ({exc.strerror}); "
                             "stopped without deleting anything on the remote") from None
        if empty and self.model.owned_count():
            raise SafetyStop(f"the local tree {self.root} is suddenly empty (an unmounted "
                             "disk?); stopped without deleting anything on the remote")

    # -- acknowledgements -----------------------------------------------------------------
    def _submit(self, message: m.Message, path: str, nbytes: int, since: float,
                op: str = "") -> None:
        seq: int = message.seq  # type: ignore[union-attr]
        self.in_flight[seq] = InFlight(path, nbytes, since, op or type(message).__name__)
        self.in_flight_bytes += nbytes
        self._idle.clear()
        future = self.link.submit(message)
        future.add_done_callback(lambda done: self._on_reply(seq, done))

    def _on_reply(self, seq: int, future: asyncio.Future[Reply]) -> None:
        flight = self.in_flight.pop(seq)
        self.in_flight_bytes -= flight.nbytes
        self._space.set()
        if future.cancelled() or future.exception() is not None:
            return  # the link broke; the session reports it and resyncs on reconnect
        reply = future.result()
        if isinstance(reply, m.Ack):
            self._on_ack(reply, flight)
        else:
            self._on_error(reply, flight)
        self.reporter.queue(len(self.dirty), len(self.in_flight))
        self._check_idle()

    def _on_ack(self, ack: m.Ack, flight: InFlight) -> None:
        latency = self.clock() - flight.since
        if flight.op == "write":
            self.counters.files += 1
            self.counters.bytes += flight.nbytes
            self.counters.last_latency = latency
            files, nbytes = self._initial_done
            total_files, total_bytes = self._initial_total
            if files < total_files:
                self._initial_done = (files + 1, nbytes + flight.nbytes)
                self.reporter.progress(nbytes + flight.nbytes, total_bytes, files + 1,
                                       total_files)
        if ack.status == AckStatus.KEPT_NOT_EMPTY:
            self.reporter.note(ack.detail)
        self.reporter.acked(flight.path, latency, flight.nbytes)

    def _on_error(self, error: m.Error, flight: InFlight) -> None:
        self.counters.errors += 1
        self.reporter.failed(flight.path, error.message)
        entry = self.model.get(flight.path)
        if entry is not None:
            # The remote state of this path is unknown now: the next change sends it whole.
            entry.digest = None
        if error.code == ErrorCode.BASE_MISMATCH:
            self.mark_dirty([flight.path])


def _kind(entry: LocalEntry) -> str:
    return {"file": FILE, "dir": DIR, "link": LINK}[entry.kind]
