"""The agent's record of file digests, so that it rarely has to read a file to know it.

For each path it holds (size, mtime_ns, inode, digest) of the version it last wrote or hashed.
A file whose current lstat matches the key is taken to have that digest; anything else is
"unknown" and is hashed when someone needs to know. The record persists between sessions in
a small JSON file under ~/.cache/lsync (a corrupt or foreign file is ignored), which makes a
restart on an unchanged tree cheap.
"""

import hashlib
import json
import os
from typing import Dict, Optional, Tuple

Key = Tuple[int, int, int]

# Entries whose mtime is this close to the moment they were recorded are not trusted on a
# later run: a same-size rewrite within the clock's granularity would keep the key.
_RACY_NS = 2 * 10 ** 9


class DigestRecord:
    def __init__(self, cache_path: Optional[str], algorithm: str) -> None:
        self.cache_path = cache_path
        self.algorithm = algorithm
        self._entries: Dict[str, Tuple[int, int, int, bytes]] = {}
        self._dirty = False

    @staticmethod
    def default_path(root: str, algorithm: str) -> Optional[str]:
        home = os.path.expanduser("~")
        if not home or home == "~":
            return None
        name = hashlib.sha256("{}\0{}".format(root, algorithm).encode("utf-8",
                              "surrogateescape")).hexdigest()[:24]
        return os.path.join(home, ".cache", "lsync", "agent-{}.json".format(name))

    def lookup(self, path: str, key: Key) -> Optional[bytes]:
        entry = self._entries.get(path)
        if entry is None or entry[:3] != key:
            return None
        return entry[3]

    def remember(self, path: str, key: Key, digest: bytes) -> None:
        self._entries[path] = (key[0], key[1], key[2], digest)
        self._dirty = True

    def forget(self, path: str) -> None:
        if self._entries.pop(path, None) is not None:
            self._dirty = True

    def forget_tree(self, path: str) -> None:
        prefix = path + "/"
        for name in [n for n in self._entries if n == path or n.startswith(prefix)]:
            del self._entries[name]
            self._dirty = True

    def move_tree(self, src: str, dst: str) -> None:
        prefix = src + "/"
        moved = {}
        for name in [n for n in self._entries if n == src or n.startswith(prefix)]:
            moved[dst + name[len(src):]] = self._entries.pop(name)
        self.forget_tree(dst)
        self._entries.update(moved)
        self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def load(self) -> None:
        if not self.cache_path:
            return
        try:
            with open(self.cache_path, "r", encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("algorithm") != self.algorithm:
                return
            saved_at = int(data["saved_ns"])
            for path, (size, mtime_ns, ino, digest) in data["entries"].items():
                if saved_at - int(mtime_ns) < _RACY_NS:
                    continue
                self._entries[str(path)] = (int(size), int(mtime_ns), int(ino),
                                            bytes.fromhex(digest))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._entries.clear()

    def save(self, now_ns: int) -> None:
        if not self.cache_path or not self._dirty:
            return
        data = {
            "algorithm": self.algorithm,
            "saved_ns": now_ns,
            "entries": {p: [e[0], e[1], e[2], e[3].hex()] for p, e in self._entries.items()},
        }
        directory = os.path.dirname(self.cache_path)
        temp = "{}.{}.tmp".format(self.cache_path, os.getpid())
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with open(temp, "w", encoding="utf-8") as handle:
                json.dump(data, handle, separators=(",", ":"))
            os.replace(temp, self.cache_path)
            self._dirty = False
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
