"""Rewriting remote paths in a remote command's output into local ones, as a stream.

`lsync run -- make` relays what the remote compiler prints; an editor's error list (vim
quickfix, emacs compile-mode, VS Code problem matchers) can only jump to a file it can open,
so `PathMapper` rewrites every absolute path under the remote root into the same path under
the local root, and leaves every other byte exactly as it came:

- The remote root is rewritten where it is followed by `/` (`/home/u/src/linux/x.c:3:1`) or
  where its path token ends there (`make: Entering directory '/home/u/src/linux'`): at a
  byte that cannot continue a file name (whitespace, quotes, brackets, `:`, `,`, `;`, `=`,
  `|`, `&`, control characters such as the ESC of a colour sequence) or at the end of the
  stream. A longer name that merely starts with the root is not rewritten
  (`/home/u/src/linux2/x.c` is not under `/home/u/src/linux`).
- Nor is the root's text where it continues a longer path (`/mnt/home/u/src/linux/x.c`):
  the root must start a path token. Text glued before it without a `/` still counts as
  the token's start, so `-I/home/u/src/linux/include` is rewritten.
- Relative paths are never touched: a compiler run with its working directory inside the
  remote tree prints paths relative to it, and the same relative path names the same file
  in the local tree. Only absolute remote-root paths need mapping.
- ANSI colour sequences around a path (gcc's `ESC[01mESC[K/path...ESC[mESC[K`) survive
  untouched: they are separators, not part of the path.

Streaming: `feed` returns at once everything it can decide; it holds back only a tail that
may be the start of the root (at most `len(root)` bytes: the root itself waits for the one
byte that tells whether a name continues). The root contains no newline, so nothing after
a newline is held, and a complete line is never delayed. `flush()` is the end of the
stream: it decides what was held as if no byte followed. A relay of an interactive stream
that goes quiet with something held may call `flush()` then, trading exactness at that one
point for liveness.
"""

from __future__ import annotations

import os

__all__ = ["PathMapper"]

# Bytes that end a path token (and so may precede or follow the root). Everything else,
# including bytes >= 0x80 (UTF-8 names), can be part of a file name.
_SEPARATORS = frozenset(
    b" \t\n\r\v\f'\"`()[]{}<>:,;=|&" + bytes(range(0x20)) + b"\x7f")
_SLASH = ord("/")
# How far back `_starts_token` looks for the start of the token before a match; a token
# longer than this before the root is taken as not being a path start.
_LOOKBACK = 4096


class PathMapper:
    """Rewrites `remote_root` (absolute, not `/`) into `local_root` in a byte stream."""

    def __init__(self, remote_root: str, local_root: str) -> None:
        remote = remote_root.rstrip("/")
        if not remote_root.startswith("/") or not remote:
            raise ValueError(f"remote root must be an absolute path other than /: {remote_root!r}")
        if "\n" in remote or "\r" in remote:
            raise ValueError(f"remote root contains a line break: {remote_root!r}")
        self.remote_root = remote.encode("utf-8", "surrogateescape")
        self.local_root = os.fsencode(local_root.rstrip("/") or "/")
        self._held = b""  # undecided tail: a prefix of the root, or the root itself
        self._before = b""  # input bytes already decided, the last _LOOKBACK of them
        self._at_start = True  # _before holds everything since the stream began

    def feed(self, data: bytes) -> bytes:
        """The output for `data`, as far as it can be decided now."""
        if not data:
            return b""
        root = self.remote_root
        buf = self._held + data
        out = bytearray()
        i = 0  # buf[:i] is decided and appended to out
        while True:
            j = buf.find(root, i)
            if j < 0:
                break
            end = j + len(root)
            if end == len(buf):  # the next byte decides; wait for it
                out += buf[i:j]
                self._keep(buf, j)
                return bytes(out)
            if self._boundary(buf[end]) and self._starts_token(buf, j):
                out += buf[i:j]
                out += self.local_root
                i = end
            else:
                out += buf[i:j + 1]
                i = j + 1
        hold = self._partial_tail(buf, i)
        out += buf[i:hold]
        self._keep(buf, hold)
        return bytes(out)

    def flush(self) -> bytes:
        """Everything held back, decided as at the end of the stream; the mapper can go on."""
        held, self._held = self._held, b""
        if not held:
            return b""
        buf = held
        out = held
        if held == self.remote_root and self._starts_token(buf, 0):
            out = self.local_root
        self._remember(buf, len(buf))
        return out

    # -- internals ----------------------------------------------------------------------

    def _keep(self, buf: bytes, hold: int) -> None:
        """Decide buf[:hold] (remember it as context), hold buf[hold:]."""
        self._remember(buf, hold)
        self._held = buf[hold:]

    def _remember(self, buf: bytes, upto: int) -> None:
        if upto >= _LOOKBACK:
            before = buf[upto - _LOOKBACK:upto]
        else:
            before = self._before[-(_LOOKBACK - upto):] + buf[:upto]
        if len(self._before) + upto > _LOOKBACK:
            self._at_start = False
        self._before = before

    def _partial_tail(self, buf: bytes, start: int) -> int:
        """Where the longest suffix of buf[start:] that is a proper prefix of the root
        begins (len(buf) when there is none)."""
        root = self.remote_root
        k = max(start, len(buf) - len(root) + 1)
        while True:
            k = buf.find(b"/", k)
            if k < 0:
                return len(buf)
            if root.startswith(buf[k:]):
                return k
            k += 1

    @staticmethod
    def _boundary(byte: int) -> bool:
        return byte == _SLASH or byte in _SEPARATORS

    def _starts_token(self, buf: bytes, j: int) -> bool:
        """Whether the match at buf[j] starts a path token: scanning back to the previous
        separator finds no `/` (which would make the match the tail of a longer path)."""
        k = j - 1
        while k >= 0:
            byte = buf[k]
            if byte in _SEPARATORS:
                return True
            if byte == _SLASH:
                return False
            k -= 1
            if j - k > _LOOKBACK:
                return False
        before = self._before
        k = len(before) - 1
        while k >= 0:
            byte = before[k]
            if byte in _SEPARATORS:
                return True
            if byte == _SLASH:
                return False
            k -= 1
        return self._at_start  # the stream's first token
