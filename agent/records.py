"""The agent's record of the remote tree: digests it knows, and what lsync itself made.

It holds two facts per path, kept apart because they age differently:

- The digest cache: (size, mtime_ns, inode) and the digest of the version the agent last
  wrote or hashed. A file whose current lstat matches the key is taken to have that digest;
  anything else is "unknown" and is hashed when someone needs to know. A snapshot leaves
  out the keys a later same-size rewrite could keep (the racy-mtime rule: a write within
  the same tick of the clock keeps the mtime): those whose mtime is not older than the root
  file system's own clock when the snapshot is written (an unnamed file made there to read
  it), or, where no such file can be made, less than 2 s older than the agent's clock.
- What lsync wrote ("written"): for a file the digest of the content lsync wrote, for a
  symlink its target, for a directory that lsync made it (Mkdir) and its inode. This is a
  fact about lsync's own actions, not a guess from a stat key, so it survives restarts
  whatever the mtimes. `written()` reports it only while the entry is still of that kind
  (and, for a directory, the same inode); the client compares a file's or link's written
  value with what is there now to decide what lsync owns.

Persistence, under ~/.cache/lsync: a snapshot `agent-<hash>.json` (temp file + rename: a
header line with its SHA-256, then the record in `marshal` format 4, which every Python 3
since 3.4 reads, four times faster to load than the JSON it was until December 2026 and
still reads, so a restart on a big tree waits less for it), and an append-only journal
`agent-<hash>.journal` of the changes to "written" since that snapshot. The journal's first
line names the snapshot it extends; it is replayed only onto that snapshot, and a torn last
line (an agent killed mid-write) ends the replay. The agent appends the journal before its
acknowledgements leave (`journal`), so a killed agent loses no ownership it acknowledged, at
the cost of one small write. `save` writes a new snapshot and starts an empty journal; its
cost grows with the tree (see `snapshot_wanted` for when the driver pays it). A missing,
corrupt or foreign file is ignored: ownership unknown is the safe default, since lsync
deletes nothing it cannot show it made.

Intents close the window between a change and its journal line (an agent killed there,
by SIGKILL or a takeover, would leave a file lsync made that nobody knows lsync made: a
remote extra for ever once it is deleted locally). Before a file, link or directory is put
in place, `intend` appends what is about to be there to the journal, with every line still
pending, and returns once that write is done (any thread may call it: the writer threads
do; `ready_for_intents` must have opened the journal first). On replay, an intent stays a
candidate unless a later line records it ("w" with that value), cancels it ("c": the change
failed) or moves or forgets its path; the service of the next agent claims a candidate only
where what is there now IS the intended content (link target, a directory): claiming a file
that holds exactly what lsync was about to write is what the client's own comparison does
with equal files. A snapshot's new journal starts with the intents still unsettled.

One agent at a time keeps a root's record (`RootLock`, lsync.agent.rootlock).
"""

import hashlib
import json
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from lsync.agent.recordfiles import (
    RACY_NS,
    Written,
    is_racy,
    is_snapshot,
    journal_line,
    read_snapshot,
    replace_file,
    snapshot_bytes,
    write_all,
)
from lsync.protocol.messages import KIND_DIR, KIND_FILE, KIND_LINK

Key = Tuple[int, int, int]
Intent = Tuple[str, str, bytes]  # (path, kind, digest / link target / b"" for a directory)

_JOURNAL_MAGIC = "lsync-journal"
_JOURNAL_FORMAT = 1
# A snapshot is due when the journal has this many lines (or half the record, if more)...
JOURNAL_COMPACT_LINES = 20000
# ... and, for the digest cache alone, when the last one is this old.
SNAPSHOT_INTERVAL_NS = 30 * 10 ** 9
# A journal this many times over the compaction size is compacted even while busy.
JOURNAL_HARD_FACTOR = 4
RETRY_NS = 10 ** 9  # after a journal could not be opened, writes go on without intents


class DigestRecord:
    def __init__(self, cache_path: Optional[str], algorithm: str) -> None:
        self.cache_path = cache_path
        self.algorithm = algorithm
        self._entries: Dict[str, Tuple[int, int, int, bytes]] = {}
        self._written: Dict[str, Written] = {}
        self._dirty = False  # changed since the last snapshot
        self._pending: List[str] = []  # journal lines not yet appended
        self._journal_id: Optional[str] = None  # the snapshot on disk our journal extends
        self._journal_fd = -1
        self._journal_lines = 0
        self._saved_ns = 0
        # The root's file system's clock (ConfinedRoot.filesystem_now_ns): it decides which
        # keys a snapshot leaves out as racy (recordfiles.is_racy); None: the agent's.
        self.fs_clock: Optional[Callable[[], Optional[int]]] = None
        # Guards the journal (its fd, the pending lines) and the intents: writer threads
        # write intents; everything else is the service's thread only.
        self._lock = threading.Lock()
        self._retry_ns = 0  # no journal could be opened: not again before then
        self._intents: Dict[Intent, int] = {}  # intents not yet settled -> how many
        # Intents found on disk at load: path -> what an earlier agent was about to put
        # there. The service claims those that are there now (`take_candidates`).
        self.candidates: Dict[str, List[Tuple[str, bytes]]] = {}

    @staticmethod
    def default_path(root: str, algorithm: str) -> Optional[str]:
        home = os.path.expanduser("~")
        if not home or home == "~":
            return None
        name = hashlib.sha256("{}\0{}".format(root, algorithm).encode("utf-8",
                              "surrogateescape")).hexdigest()[:24]
        return os.path.join(home, ".cache", "lsync", "agent-{}.json".format(name))

    @property
    def journal_path(self) -> Optional[str]:
        if not self.cache_path:
            return None
        base = self.cache_path[:-5] if self.cache_path.endswith(".json") else self.cache_path
        return base + ".journal"

    # -- intents (see the module docstring) -----------------------------------------------
    def ready_for_intents(self, now_ns: int) -> None:
        """Open the journal (writing a snapshot if there is none to extend) so that
        `intend` can be durable; call it from the thread that owns the record."""
        if self.cache_path and self._journal_fd < 0 and now_ns >= self._retry_ns:
            if self._journal_id is not None:
                with self._lock:
                    self._open_journal()
            if self._journal_fd < 0:
                self.save(now_ns, force=True)
            if self._journal_fd < 0:  # a full or read-only disk: not a snapshot per write
                self._retry_ns = now_ns + RETRY_NS

    def intend(self, intents: List[Intent]) -> None:
        """Say, durably, what is about to be put at these paths; call before doing it, and
        `settle` once it is recorded or failed. Any thread; one write to the journal."""
        if not self.cache_path or not intents:
            return
        lines = [journal_line(["i", path, kind, value.hex()]) for path, kind, value in intents]
        with self._lock:
            for intent in intents:
                self._intents[intent] = self._intents.get(intent, 0) + 1
            self._pending.extend(lines)
            self._write_pending()

    def settle(self, intents: List[Intent], failed: bool = False) -> None:
        """These intents are done with: recorded (their "w" line settles them on replay),
        or `failed` (a "c" line says so)."""
        with self._lock:
            for intent in intents:
                left = self._intents.get(intent, 0) - 1
                if left > 0:
                    self._intents[intent] = left
                else:
                    self._intents.pop(intent, None)
                if failed and self.cache_path:
                    self._pending.append(journal_line(["c", intent[0], intent[1], intent[2].hex()]))

    def moved_intents(self, src: str, dst: str) -> List[Intent]:
        """The intents of renaming `src` (and what is below it) to `dst`: what lsync wrote
        there, at its new path."""
        prefix = src + "/"
        return [(dst + path[len(src):], kind, value)
                for path, (kind, value, _) in self._written.items()
                if path == src or path.startswith(prefix)]

    def take_candidates(self) -> Dict[str, List[Tuple[str, bytes]]]:
        """The intents of earlier agents left unsettled (path -> [(kind, value)]), once."""
        found, self.candidates = self.candidates, {}
        return found

    def _drop_candidates(self, path: str, tree: bool) -> None:
        self.candidates.pop(path, None)
        if tree:
            prefix = path + "/"
            for name in [n for n in self.candidates if n.startswith(prefix)]:
                del self.candidates[name]

    def _discard_candidate(self, path: str, kind: str, value: bytes) -> None:
        known = self.candidates.get(path)
        if known is not None and (kind, value) in known:
            known.remove((kind, value))
            if not known:
                del self.candidates[path]

    # -- the digest cache -----------------------------------------------------------------
    def lookup(self, path: str, key: Key) -> Optional[bytes]:
        entry = self._entries.get(path)
        if entry is None or entry[:3] != key:
            return None
        return entry[3]

    def remember(self, path: str, key: Key, digest: bytes) -> None:
        self._entries[path] = (key[0], key[1], key[2], digest)
        self._dirty = True

    # -- what lsync wrote -----------------------------------------------------------------
    def wrote_file(self, path: str, digest: bytes) -> None:
        self._set_written(path, (KIND_FILE, digest, 0))

    def wrote_link(self, path: str, target: str) -> None:
        self._set_written(path, (KIND_LINK, target.encode("utf-8", "surrogateescape"), 0))

    def wrote_files(self, files: List[Tuple[str, Key, bytes]]) -> None:
        """For each (path, stat key, digest) of files lsync just wrote (a batch's):
        `remember`, `wrote_file` and `settle` its intent, in one go (one lock taken)."""
        if not files:
            return
        lines = []
        entries, written = self._entries, self._written
        for path, key, digest in files:
            entries[path] = (key[0], key[1], key[2], digest)
            value = (KIND_FILE, digest, 0)
            if written.get(path) != value:
                written[path] = value
                lines.append(journal_line(["w", path, KIND_FILE, digest.hex(), 0]))
        self._dirty = True
        with self._lock:
            if self.cache_path:
                self._pending.extend(lines)
            intents = self._intents
            for path, _, digest in files:
                intent = (path, KIND_FILE, digest)
                left = intents.get(intent, 0) - 1
                if left > 0:
                    intents[intent] = left
                else:
                    intents.pop(intent, None)

    def made_dir(self, path: str, ino: int) -> None:
        self._set_written(path, (KIND_DIR, b"", ino))

    def _set_written(self, path: str, value: Written) -> None:
        if self._written.get(path) == value:
            return
        self._written[path] = value
        self._dirty = True
        self._log(["w", path, value[0], value[1].hex(), value[2]])

    def written(self, path: str, kind: str, ino: int) -> Optional[bytes]:
        """What lsync wrote at `path` if the entry there is still of that kind, else None."""
        value = self._written.get(path)
        if value is None or value[0] != kind or (kind == KIND_DIR and value[2] != ino):
            return None
        return value[1]

    # -- both, as the tree changes --------------------------------------------------------
    def forget(self, path: str, tree: bool = False) -> None:
        """Forget `path` (and, with `tree`, everything below it): it is gone or replaced."""
        if self._drop(path, tree):
            self._log(["x", path, int(tree)])

    def move(self, src: str, dst: str, tree: bool = False) -> None:
        """Records of `src` (and below, with `tree`) now belong to `dst`, replacing dst's."""
        if self._move(src, dst, tree):
            self._log(["m", src, dst, int(tree)])

    def _tables(self) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        return self._entries, self._written

    def _drop(self, path: str, tree: bool) -> bool:
        changed = False
        prefix = path + "/"
        for table in self._tables():
            if table.pop(path, None) is not None:
                changed = True
            if tree:
                for name in [n for n in table if n.startswith(prefix)]:
                    del table[name]
                    changed = True
        self._dirty = self._dirty or changed
        return changed

    def _move(self, src: str, dst: str, tree: bool) -> bool:
        moved: List[Dict[str, Any]] = []
        prefix = src + "/"
        for table in self._tables():
            taken = {}
            if src in table:
                taken[dst] = table.pop(src)
            if tree:
                for name in [n for n in table if n.startswith(prefix)]:
                    taken[dst + name[len(src):]] = table.pop(name)
            moved.append(taken)
        changed = self._drop(dst, tree)
        for table, taken in zip(self._tables(), moved):
            table.update(taken)
            changed = changed or bool(taken)
        self._dirty = self._dirty or changed
        return changed

    # -- the journal ----------------------------------------------------------------------
    def _log(self, line: List[Any]) -> None:
        if self.cache_path:
            with self._lock:
                self._pending.append(journal_line(line))

    def journal(self, now_ns: int) -> None:
        """Make every change to "written" so far durable against this process dying.

        Appends the pending lines to the journal (one write), or writes a snapshot when
        there is no journal on disk that extends the current snapshot.
        """
        if not self._pending:
            return
        if self._journal_fd < 0 and self._journal_id is not None:
            with self._lock:
                self._open_journal()
        if self._journal_fd < 0:
            self.save(now_ns)
            return
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        """Append the pending lines (the lock held); nothing when no journal is open."""
        if self._journal_fd < 0 or not self._pending:
            return
        data = "".join(self._pending).encode("utf-8")
        count = len(self._pending)
        self._pending = []
        try:
            write_all(self._journal_fd, data)
        except OSError:
            # Possibly torn: stop appending to it; the next change writes a snapshot.
            self._close_journal()
            self._journal_id = None
            return
        self._journal_lines += count

    def _open_journal(self) -> None:
        path = self.journal_path
        try:
            if path is None:
                raise OSError("no journal path")
            self._journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND
                                       | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._journal_id = None

    def _close_journal(self) -> None:
        if self._journal_fd >= 0:
            try:
                os.close(self._journal_fd)
            except OSError:
                pass
            self._journal_fd = -1

    def _replay(self, journal_id: str) -> None:
        """Apply the journal that extends snapshot `journal_id`; ignore any other."""
        path = self.journal_path
        if path is None:
            return
        try:
            with open(path, "r", encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, ValueError):
            return
        lines = text.split("\n")
        # The last piece is "" after a complete last line; anything else was cut short.
        torn = lines.pop() != ""
        try:
            if not lines or json.loads(lines[0]) != [_JOURNAL_MAGIC, _JOURNAL_FORMAT,
                                                      journal_id]:
                return
        except ValueError:
            return
        count = 0
        for line in lines[1:]:
            try:
                self._apply(json.loads(line))
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                torn = True
                break
            count += 1
        # Appending after a torn line would hide every later line from the next replay.
        self._journal_id = None if torn else journal_id
        self._journal_lines = count

    def _apply(self, line: Any) -> None:
        op = line[0]
        if op in ("w", "i", "c") and line[2] in (KIND_FILE, KIND_LINK, KIND_DIR):
            path, kind, value = str(line[1]), str(line[2]), bytes.fromhex(line[3])
            if op == "w":
                self._written[path] = (kind, value, int(line[4]))
                self._discard_candidate(path, kind, value)
            elif op == "c":
                self._discard_candidate(path, kind, value)
            elif (kind, value) not in self.candidates.setdefault(path, []):
                self.candidates[path].append((kind, value))
        elif op == "x":
            self._drop(str(line[1]), bool(line[2]))
            self._drop_candidates(str(line[1]), bool(line[2]))
        elif op == "m":
            self._move(str(line[1]), str(line[2]), bool(line[3]))
            for path in (str(line[1]), str(line[2])):
                self._drop_candidates(path, bool(line[3]))
        else:
            raise ValueError("unknown journal line")

    # -- snapshots ------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._dirty or bool(self._pending)

    def snapshot_wanted(self, now_ns: int, quiet: bool) -> Optional[int]:
        """When a snapshot should be written (ns, possibly past), or None for not yet.

        While the input is quiet: once the journal is long, or the last snapshot is older
        than SNAPSHOT_INTERVAL_NS and something changed. While busy: only once the journal
        is JOURNAL_HARD_FACTOR times longer than that.
        """
        if not self.cache_path or not self.dirty:
            return None
        compact = max(JOURNAL_COMPACT_LINES, len(self._written) // 2)
        lines = self._journal_lines + len(self._pending)
        if not quiet:
            return now_ns if lines >= compact * JOURNAL_HARD_FACTOR else None
        if lines >= compact:
            return now_ns
        return self._saved_ns + SNAPSHOT_INTERVAL_NS

    def load(self) -> None:
        if not self.cache_path:
            return
        try:
            with open(self.cache_path, "rb") as handle:
                raw = handle.read()
        except OSError:
            return
        if is_snapshot(raw):
            snapshot = read_snapshot(raw, self.algorithm)
            if snapshot is not None:
                entries, written, extended_by = snapshot
                self._entries.update(entries)
                self._written.update(written)
                if extended_by:
                    self._replay(extended_by)
            return
        try:  # a snapshot of an older agent, in JSON
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("algorithm") != self.algorithm:
                return
        except ValueError:  # (UnicodeDecodeError is one)
            return
        self._dirty = True  # (the next snapshot is in the faster format)
        try:
            saved_at = int(data["saved_ns"])
            for path, (size, mtime_ns, ino, digest) in data["entries"].items():
                if saved_at - int(mtime_ns) < RACY_NS:
                    continue
                self._entries[str(path)] = (int(size), int(mtime_ns), int(ino),
                                            bytes.fromhex(digest))
        except (ValueError, KeyError, TypeError, AttributeError):
            self._entries.clear()
        try:
            self._load_written(data.get("written", {}))
        except (ValueError, KeyError, TypeError, AttributeError):
            self._written.clear()
            return  # a journal extends the whole snapshot, not a part of it
        journal_id = data.get("journal")
        if isinstance(journal_id, str):
            self._replay(journal_id)

    def _load_written(self, section: Any) -> None:
        for path, digest in section.get(KIND_FILE, {}).items():
            self._written[str(path)] = (KIND_FILE, bytes.fromhex(digest), 0)
        for path, target in section.get(KIND_LINK, {}).items():
            self._written[str(path)] = (KIND_LINK, bytes.fromhex(target), 0)
        for path, ino in section.get(KIND_DIR, {}).items():
            self._written[str(path)] = (KIND_DIR, b"", int(ino))

    def save(self, now_ns: int, force: bool = False) -> None:
        """Write a snapshot of everything and start a journal that extends it (holding the
        intents not settled yet). Only when something changed, unless `force`."""
        if not self.cache_path or not (self.dirty or force):
            return
        journal_id = os.urandom(8).hex()
        fs_now = self.fs_clock() if self.fs_clock is not None else None  # (after every key)
        with self._lock:  # no intent may fall between the old journal and the new one
            try:
                os.makedirs(os.path.dirname(self.cache_path), mode=0o700, exist_ok=True)
                replace_file(self.cache_path, snapshot_bytes(self.algorithm, now_ns, self._entries,
                                                    self._written, journal_id, fs_now))
            except OSError:
                return  # the old snapshot and journal still stand
            self._pending = []
            self._close_journal()
            self._journal_id = None
            self._saved_ns = now_ns
            # Keys saved while racy are dropped by the next load: save again once they
            # are not.
            self._dirty = any(is_racy(e[1], now_ns, fs_now) for e in self._entries.values())
            lines = [json.dumps([_JOURNAL_MAGIC, _JOURNAL_FORMAT, journal_id]) + "\n"]
            lines += [journal_line(["i", path, kind, value.hex()])
                      for path, kind, value in self._intents]
            self._journal_lines = len(lines) - 1
            try:
                self._journal_fd = replace_file(str(self.journal_path),
                                            "".join(lines).encode("utf-8"), keep_open=True)
            except OSError:
                return  # the new snapshot stands alone; the next change writes another
            self._journal_id = journal_id

    def close(self, now_ns: int) -> None:
        self.save(now_ns)
        with self._lock:
            self._close_journal()
