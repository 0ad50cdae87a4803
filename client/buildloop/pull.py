"""Pulling remote files into the local tree: `lsync pull` and `lsync run`'s pull afterwards.

`Puller.pull` asks the agent for the files the rules select (changed within `age_ns` on the
agent's clock, or all of them), then fetches those in turn, a few at a time, over the
session's link (lsync.agent.pull sends each on a data lane when there is one, so a save is
never queued behind a pulled file). For a file it has, the client sends the digest of its
copy (the agent answers "same" and sends nothing when the remote file is that) and, for a
big one, the hashes of its blocks, so that the agent sends a delta against it.

What it promises:
- A pulled file is written atomically: into a temporary file beside it (`.lsync-tmp-pull-*`,
  which the watcher ignores), checked against the digest the agent sent, then renamed over
  the local path. Never over a local file changed since the pull looked at it (its size,
  mtime, ctime or inode differ): that file is kept and reported ("changed locally"), never
  replaced. Nothing is written through a symlink or outside the tree (lsync.client.
  confined_open); a local directory or symlink where the remote has a file is reported and
  left alone.
- Pulled files are never synced back: before a file is put in place, its path (and any
  directory made for it) is in the session's `PushRules`, which the engine and the watcher
  consult (see lsync.client.buildloop.pullrules).
- A compile database (`RewriteRules`) is rewritten to local paths before it is written;
  the digest of the remote original is kept, so the next pull still finds it unchanged.
- A failure of one file (refused, gone, a digest mismatch) fails that file alone, in the
  report; a broken link fails what was left with the link's reason. Nothing raises but
  `LinkBroken` from the listing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsync.client.buildloop.pullrules import PushRules, RewriteRules, rewrite_json
from lsync.client.errors import LinkBroken
from lsync.client.local.confined_open import lstat_below, open_parent
from lsync.client.remote.passes import FAST_LANE
from lsync.client.transport.link import AgentLink
from lsync.protocol import hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.delta import DeltaError, apply_delta
from lsync.protocol.paths import relpath_problem

FETCHES_IN_FLIGHT = 8
DELTA_MIN = 256 << 10  # local copies this big get block hashes (a delta may come)
DELTA_MAX = 256 << 20  # bigger ones are not read whole for hashing blocks
MIN_BLOCK = 64 << 10
REWRITE_MAX = 512 << 20  # a compile database bigger than this is kept as it came
TEMP_PREFIX = ".lsync-tmp-pull-"
_names = itertools.count(1)

# Identity of a local file for "changed since": (inode, size, mtime_ns, ctime_ns).
Stamp = tuple[int, int, int, int]
_MTIME = 2


def block_size_for(size: int) -> int:
    block = MIN_BLOCK
    while -(-size // block) > m.MAX_PULL_BLOCKS // 4:
        block *= 2
    return block


def block_hashes(content: bytes, block: int) -> bytes:
    return b"".join(hashlib.blake2b(content[i:i + block], digest_size=m.PULL_BLOCK_HASH)
                    .digest() for i in range(0, len(content), block))


@dataclass
class PullReport:
    listed: int = 0
    pulled: list[str] = field(default_factory=list)
    unchanged: int = 0
    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # kept the local file: why
    failed: dict[str, str] = field(default_factory=dict)
    bytes_received: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict[str, object]:
        return {"listed": self.listed, "pulled": self.pulled[:100],
                "pulled_count": len(self.pulled), "unchanged": self.unchanged,
                "rewritten": self.rewritten[:100], "skipped": dict(list(self.skipped.items())[:50]),
                "failed": dict(list(self.failed.items())[:50]),
                "bytes": self.bytes_received, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        text = (f"pulled {len(self.pulled)} of {self.listed} files "
                f"({self.bytes_received} bytes on the wire, {self.seconds:.2f} s)")
        if self.unchanged:
            text += f", {self.unchanged} unchanged"
        if self.rewritten:
            text += f", rewritten to local paths: {', '.join(self.rewritten[:5])}"
        for what, found in (("kept local", self.skipped), ("failed", self.failed)):
            if found:
                path, why = next(iter(found.items()))
                text += f"; {len(found)} {what} (first: {path}: {why})"
        return text


class _Fetch:
    """One fetch's payload as it arrives: content into a temporary file beside the target
    (or memory, for a file to rewrite), unpacked, hashed and written by `writer` (one
    thread, so pieces go in order) and never on the event loop: a disk that throttles
    writes must not hold up the saves the loop is sending."""

    def __init__(self, parent_fd: int, in_memory: bool, hash_name: str,
                 writer: ThreadPoolExecutor) -> None:
        self.parent_fd = os.dup(parent_fd)  # its own: the writer thread may outlive the caller
        self.in_memory = in_memory
        self.writer = writer
        self.memory = bytearray()
        self.temp = ""
        self.fd = -1
        self.size = 0
        self.hasher = hashing.new_hasher(hash_name)
        self.wire = 0
        self.error: BaseException | None = None  # of a write, raised by `written`
        self.last: concurrent.futures.Future[None] | None = None
        self.done: asyncio.Future[m.PullDone] = asyncio.get_running_loop().create_future()

    def on_message(self, message: m.Message | None) -> None:
        if self.done.done():
            return
        try:
            if message is None:
                raise LinkBroken("the link to the agent broke during the pull")
            if isinstance(message, m.PullData):
                self.wire += len(message.data)
                self.last = self.writer.submit(self._piece, message)
            elif isinstance(message, m.PullDone):
                self.done.set_result(message)
            elif isinstance(message, m.Error):
                raise OSError(message.message)
        except (OSError, LinkBroken) as exc:
            self.done.set_exception(exc)

    async def written(self) -> None:
        """Once every piece that came is written; raises what a write raised."""
        if self.last is not None:
            await asyncio.wrap_future(self.last)
        if self.error is not None:
            raise self.error

    def _piece(self, message: m.PullData) -> None:
        if self.error is not None:
            return
        try:
            if message.offset != self.size:
                raise OSError(f"piece at {message.offset}, expected {self.size}")
            data = message.data if message.packing == packing.PACK_RAW else packing.unpack(
                message.data, message.packing, m.MAX_CHUNK)
            self.size += len(data)
            if self.in_memory:
                self.memory += data
                return
            self.hasher.update(data)
            if self.fd < 0:
                self.temp = f"{TEMP_PREFIX}{os.getpid()}-{next(_names)}"
                self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                  | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.parent_fd)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except (OSError, packing.PackingError) as exc:
            self.error = exc

    def write_temp(self, data: bytes) -> None:
        """Put `data` (all of it) into a new temporary file."""
        self._drop_temp()
        self.temp = f"{TEMP_PREFIX}{os.getpid()}-{next(_names)}"
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=self.parent_fd)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _drop_temp(self) -> None:
        self.close_fd()
        if self.temp:
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self.parent_fd)
            self.temp = ""

    def release(self) -> None:
        """Remove what is left (after the pieces still being written, in the writer)."""
        def release_now() -> None:
            self._drop_temp()
            os.close(self.parent_fd)

        self.writer.submit(release_now)


class Puller:
    """Pulls over one link into the tree at `root` (see the module docstring).
    `remote_digests` survives across pulls of a session: for each file pulled, the local
    stamp it was written with and the digest of the remote original. A local file that a
    pull of this session wrote and that no longer has that stamp, or (`changed_after_ns`)
    one modified after that Unix time (when the command of `lsync run` started), was
    changed locally: it is kept."""

    def __init__(self, link: AgentLink, root: Path, remote_root: str, hash_name: str,
                 push_rules: PushRules, rewrite: RewriteRules,
                 remote_digests: dict[str, tuple[Stamp, bytes]],
                 changed_after_ns: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.root = root
        self.remote_root = remote_root
        self.hash_name = hash_name
        self.push_rules = push_rules
        self.rewrite = rewrite
        self.remote_digests = remote_digests
        self.changed_after_ns = changed_after_ns
        self.clock = clock
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="lsync-pull")
        self.turn = 0  # of the data lanes that carry fetches

    async def pull(self, rules: list[list[Any]], age_ns: int = 0) -> PullReport:
        started = self.clock()
        report = PullReport()
        entries = await self.listing(rules, age_ns)
        report.listed = len(entries)
        slots = asyncio.Semaphore(FETCHES_IN_FLIGHT)

        async def one(entry: list[Any]) -> None:
            async with slots:
                await self._one(str(entry[0]), report)

        try:
            await asyncio.gather(*(one(entry) for entry in entries))
        finally:
            self.writer.shutdown(wait=False)
        report.pulled.sort()
        report.seconds = self.clock() - started
        return report

    async def listing(self, rules: list[list[Any]], age_ns: int) -> list[list[Any]]:
        seq = self.link.next_seq()
        entries: list[list[Any]] = []
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_message(message: m.Message | None) -> None:
            if finished.done():
                return
            if message is None:
                finished.set_exception(self.link.failure or LinkBroken("the link broke"))
            elif isinstance(message, m.Error):
                finished.set_exception(LinkBroken(f"the agent refused the pull: "
                                                  f"{message.message}"))
            elif isinstance(message, m.PullListing):
                entries.extend(e for e in message.entries if not relpath_problem(e[0]))
                if message.done:
                    finished.set_result(None)

        self.link.open_pull(seq, on_message)
        try:
            self.link.send(m.PullList(seq, rules, age_ns))
            await finished
        finally:
            self.link.close_pull(seq)
        return entries

    # -- one file --------------------------------------------------------------------------
    def _stamp(self, rel: str) -> tuple[str, Stamp | None]:
        """What is at `rel` locally: ("file", stamp), ("none", None), or another kind."""
        try:
            st, _ = lstat_below(self.root, rel)
        except FileNotFoundError:
            return "none", None
        if stat.S_ISREG(st.st_mode):
            return "file", (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return ("a directory" if stat.S_ISDIR(st.st_mode) else "a symlink or special file"), None

    def _make_parents(self, rel: str) -> None:
        """Make the missing directories above `rel` (known as pulled: never pushed)."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            try:
                st, _ = lstat_below(self.root, prefix)
            except FileNotFoundError:
                self.push_rules.pulled_dirs.add(prefix)
                with open_parent(self.root, prefix) as parent, \
                        contextlib.suppress(FileExistsError):
                    os.mkdir(parent.name, 0o755, dir_fd=parent.fd)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{prefix} is not a directory locally")

    def _local_base(self, rel: str, rewrite: bool, stamp: Stamp | None
                    ) -> tuple[bytes | None, int, int, bytes]:
        """(digest, size, block size, block hashes) of the local copy, for the fetch."""
        if stamp is None:
            return None, 0, 0, b""
        known = self.remote_digests.get(rel)
        digest = known[1] if known is not None and known[0] == stamp else None
        if rewrite or (digest is not None and stamp[1] < DELTA_MIN):
            return digest, stamp[1], 0, b""  # (the local file is what the last pull left)
        with open_parent(self.root, rel) as parent:
            fd = os.open(parent.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent.fd)
        try:
            size = os.fstat(fd).st_size
            hasher = hashing.new_hasher(self.hash_name)
            if DELTA_MIN <= size <= DELTA_MAX:
                content = _read_all(fd)
                view = memoryview(content)
                for at in range(0, len(content), 1 << 20):  # the event loop gets the GIL
                    hasher.update(view[at:at + (1 << 20)])
                block = block_size_for(len(content))
                return hasher.digest(), len(content), block, block_hashes(content, block)
            while piece := os.read(fd, 1 << 20):
                hasher.update(piece)
            return hasher.digest(), size, 0, b""
        finally:
            os.close(fd)

    def _lane(self) -> int:
        """The data lane of the next fetch (answered on it): the bulk lanes in turn, never
        the lane of single saves while there are others; 0 (main) without lanes."""
        lanes = self.link.lanes
        if lanes <= FAST_LANE:
            return lanes
        self.turn += 1
        return FAST_LANE + 1 + self.turn % (lanes - FAST_LANE)

    def _changed_locally(self, rel: str, stamp: Stamp) -> bool:
        known = self.remote_digests.get(rel)
        if known is not None:
            return known[0] != stamp
        return self.changed_after_ns is not None and stamp[_MTIME] > self.changed_after_ns

    async def pull_as(self, pairs: list[tuple[str, str]]) -> PullReport:
        """Fetch each remote path of `pairs` into its local path (kept remote edits brought
        back beside the local file), with the same promises as `pull`."""
        started = self.clock()
        report = PullReport()
        report.listed = len(pairs)
        try:
            for remote, local in pairs:
                await self._one(remote, report, local)
        finally:
            self.writer.shutdown(wait=False)
        report.seconds = self.clock() - started
        return report

    async def _one(self, rel: str, report: PullReport, local: str | None = None) -> None:
        try:
            await self._fetch(rel, report, local)
        except LinkBroken as exc:
            report.failed[rel] = str(exc)
        except (OSError, ValueError, DeltaError) as exc:
            report.failed[rel] = getattr(exc, "strerror", None) or str(exc)

    async def _fetch(self, remote: str, report: PullReport, local: str | None = None) -> None:
        rel = local or remote  # (where it goes in the local tree)
        kind, stamp = await asyncio.to_thread(self._stamp, rel)
        if kind not in ("file", "none"):
            report.skipped[rel] = f"{kind} locally"
            return
        if stamp is not None and self._changed_locally(rel, stamp):
            report.skipped[rel] = "changed locally since lsync pulled it; the local file is kept"
            return
        rewrite = self.rewrite.wants(rel) and local is None
        if kind == "none":
            await asyncio.to_thread(self._make_parents, rel)
        base, base_size, block, blocks = await asyncio.to_thread(
            self._local_base, rel, rewrite, stamp)
        with open_parent(self.root, rel) as parent:
            fetch = _Fetch(parent.fd, rewrite, self.hash_name, self.writer)
            seq = self.link.next_seq()
            self.link.open_pull(seq, fetch.on_message)
            try:
                self.link.send_on(m.PullFetch(seq, remote, base, base_size, block, blocks),
                                  self._lane())
                try:
                    done = await fetch.done
                finally:
                    await fetch.written()  # (no write left behind, whatever happened)
                fetch.close_fd()
                report.bytes_received += fetch.wire
                await self._finish(rel, parent, fetch, done, stamp, rewrite, report)
            finally:
                self.link.close_pull(seq)
                fetch.release()

    async def _finish(self, rel: str, parent: Any, fetch: _Fetch, done: m.PullDone,
                      stamp: Stamp | None, rewrite: bool, report: PullReport) -> None:
        if done.outcome == m.PULL_FAILED:
            report.failed[rel] = done.message
            return
        if done.outcome == m.PULL_SAME:
            report.unchanged += 1
            if stamp is not None and not rewrite:
                self.remote_digests[rel] = (stamp, done.digest)
            return
        if done.outcome == m.PULL_DELTA:
            digest = await asyncio.to_thread(self._apply, parent.fd, parent.name, fetch)
        elif rewrite:
            digest = hashing.digest_of(self.hash_name, bytes(fetch.memory))
            if fetch.size != done.size:
                digest = b""
        else:
            digest = fetch.hasher.digest()
        if digest != done.digest or (done.outcome == m.PULL_WHOLE and fetch.size != done.size):
            report.failed[rel] = "the pulled content does not match the remote's digest"
            return
        if rewrite:
            data = bytes(fetch.memory)
            if self.remote_root and len(data) <= REWRITE_MAX:
                try:
                    data = rewrite_json(data, self.remote_root, str(self.root))
                    report.rewritten.append(rel)
                except ValueError as exc:
                    report.failed[rel] = f"kept as it came, not rewritten: {exc}"
            await asyncio.to_thread(fetch.write_temp, data)
            fetch.close_fd()
        elif not fetch.temp:
            await asyncio.to_thread(fetch.write_temp, b"")  # an empty file
            fetch.close_fd()
        if not self.push_rules.pull.selects(rel):
            self.push_rules.pulled.add(rel)  # before it appears: the watcher ignores it
        placed = await asyncio.to_thread(_put_in_place, parent.fd, parent.name, fetch.temp,
                                         done.mode, stamp)
        if placed is None:
            report.skipped[rel] = "changed locally since the pull began; the local file is kept"
            return
        fetch.temp = ""
        report.pulled.append(rel)
        self.remote_digests[rel] = (placed, done.digest)

    def _apply(self, parent_fd: int, name: str, fetch: _Fetch) -> bytes:
        """Apply the delta that arrived (in memory, or in the temporary file) to the local
        copy, into a new temporary file; the result's digest."""
        delta = bytes(fetch.memory)
        if fetch.temp:
            fd = os.open(fetch.temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)
            try:
                delta = _read_all(fd)
            finally:
                os.close(fd)
        base_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            base_size = os.fstat(base_fd).st_size

            def read_base(offset: int, length: int) -> bytes:
                return os.pread(base_fd, length, offset)

            fetch.write_temp(b"")
            hasher = hashing.new_hasher(self.hash_name)
            for chunk in apply_delta(delta, read_base, base_size, 1 << 40):
                hasher.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fetch.fd, view):]
            fetch.close_fd()
            return bytes(hasher.digest())
        finally:
            os.close(base_fd)


def _read_all(fd: int) -> bytes:
    pieces = []
    while piece := os.read(fd, 1 << 20):
        pieces.append(piece)
    return b"".join(pieces)


def _put_in_place(parent_fd: int, name: str, temp: str, mode: int,
                  stamp: Stamp | None) -> Stamp | None:
    """Rename `temp` over `name` unless what is at `name` is no longer what the pull saw
    (`stamp`, None: nothing); the new file's stamp, or None when the local one was kept."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        now: Stamp | None = ((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                             if stat.S_ISREG(st.st_mode) else (-1, -1, -1, -1))
    except FileNotFoundError:
        now = None
    if now != stamp:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent_fd)
        return None
    os.chmod(temp, mode & 0o7777 or 0o644, dir_fd=parent_fd)
    os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

