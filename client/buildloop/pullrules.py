"""Which paths are pulled, and what a pulled compile database becomes locally.

- `PullRules` are the `[pull] paths` of `.lsync.toml` (gitignore patterns relative to the
  tree, one rule file at the root: the last matching pattern decides, `!` excludes, a
  selected directory selects everything below it). `wire()` gives them to the agent as
  regular expressions (lsync.protocol.messages, PullList) with the literal directory each
  anchored pattern starts in, so that the agent walks only where a rule can match; the agent
  (lsync.agent.pull.PullSelector) applies them with the same semantics as `selects` here.
- `PushRules` are the session's ignore rules plus one promise: a path is pulled or pushed,
  never both. What the pull rules select, what a pull brought outside them during this
  session and the directories a pull made to hold it, are ignored for pushing — the watcher
  does not bounce a pulled file back, `--delete` never deletes its remote original, and it
  is never counted as a remote extra — with no round trip and no change to the engine's
  model: the rules decide before the engine looks.
- `rewrite_json` parses a compile database (`compile_commands.json`, or any file that
  `[pull] rewrite` names) and replaces the remote root by the local root, with the rules of
  lsync.client.buildloop.pathmap (a longer name that merely starts with the root is left alone), in
  the values of `directory`, `file`, `output`, `command` and each of `arguments`, wherever
  such keys are in the document; it writes the result back as JSON. Input that is not JSON
  raises ValueError (the caller keeps the file as it came and says so).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lsync.client.buildloop.pathmap import PathMapper
from lsync.client.local.gitpatterns import _GLOB_CHARS, RuleFile, parse_patterns
from lsync.client.local.ignore import IgnoreRules, Rule
from lsync.protocol import messages as m

DEFAULT_REWRITE = ("compile_commands.json",)
REWRITTEN_KEYS = frozenset({"directory", "file", "output", "command"})
PULL_SOURCE = ".lsync.toml [pull] paths"


class PullRules:
    """Gitignore-style pull patterns relative to the tree's root."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._file = RuleFile("\n".join(self.patterns)) if self.patterns else None
        self._dirs: dict[str, bool] = {}  # directory -> selected (cached)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._file is not None

    def _verdict(self, rel: str, is_dir: bool) -> bool:
        assert self._file is not None
        return self._file.verdict(rel, rel.rpartition("/")[2], is_dir) is True

    def _dir_selected(self, rel: str) -> bool:
        found = self._dirs.get(rel)
        if found is None:
            parent = rel.rpartition("/")[0]
            found = (bool(parent) and self._dir_selected(parent)) or self._verdict(rel, True)
            with self._lock:
                if len(self._dirs) > 200_000:
                    self._dirs.clear()
                self._dirs[rel] = found
        return found

    def selects(self, rel: str, is_dir: bool = False) -> bool:
        """Whether the rules pull `rel` (a directory when `is_dir`)."""
        if self._file is None or not rel:
            return False
        if is_dir:
            return self._dir_selected(rel)
        parent = rel.rpartition("/")[0]
        return (bool(parent) and self._dir_selected(parent)) or self._verdict(rel, False)

    def wire(self) -> list[list[Any]]:
        return wire_rules(self.patterns)


def wire_rules(patterns: Sequence[str]) -> list[list[Any]]:
    """`patterns` as PullList rules: [regex, flags, prefix]. The prefix is the literal
    directory an anchored pattern starts in ("" when a glob comes first: anywhere; "/" for
    a literal file at the root: no directory needs entering)."""
    rules: list[list[Any]] = []
    for pattern in parse_patterns("\n".join(patterns)):
        flags = ((m.PULL_RULE_NEGATIVE if pattern.negative else 0)
                 | (m.PULL_RULE_DIR_ONLY if pattern.dir_only else 0)
                 | (m.PULL_RULE_BASENAME if pattern.basename else 0))
        prefix = ""
        if not pattern.basename:
            body = pattern.body
            glob = next((i for i, c in enumerate(body) if c in _GLOB_CHARS), len(body))
            literal = body[:glob]
            prefix = literal[:literal.rfind("/") + 1]
            if glob == len(body) and not prefix:
                prefix = "/"  # a file at the root itself
        rules.append([pattern.regex, flags, prefix])
    return rules


# Local copies of kept remote edits (`lsync pull --kept PATH`: PATH + mark + N) are pulled
# files in every session, never pushed.
KEPT_COPY_MARK = ".lsync-remote-"


class PushRules(IgnoreRules):
    """The session's ignore rules, which also ignore every pulled path (see the module
    docstring). `pulled` and `pulled_dirs` grow as pulls bring paths outside the rules."""

    def __init__(self, root: Path, excludes: Sequence[str] = (), include_vcs: bool = False,
                 *, pull: PullRules | None = None, git_index: bool = True,
                 on_note: Callable[[str], None] | None = None) -> None:
        super().__init__(root, excludes, include_vcs, git_index=git_index, on_note=on_note)
        self.pull = pull if pull is not None else PullRules(())
        self.pulled: set[str] = set()
        self.pulled_dirs: set[str] = set()

    def is_pulled(self, rel: str, is_dir: bool) -> bool:
        if not rel:
            return False
        if self.pull.selects(rel, is_dir) or rel in self.pulled or rel in self.pulled_dirs:
            return True
        if not is_dir and KEPT_COPY_MARK in rel.rpartition("/")[2]:
            return True  # a kept remote edit brought back for a merge (`pull --kept`)
        if self.pulled_dirs:
            parent = rel.rpartition("/")[0]
            while parent:
                if parent in self.pulled_dirs:
                    return True
                parent = parent.rpartition("/")[0]
        return False

    def is_ignored(self, rel: str, is_dir: bool) -> bool:
        return self.is_pulled(rel, is_dir) or super().is_ignored(rel, is_dir)

    def explain(self, rel: str, is_dir: bool) -> Rule | None:
        if self.is_pulled(rel, is_dir):
            return Rule(PULL_SOURCE, 0, "")
        return super().explain(rel, is_dir)


class RewriteRules:
    """Which pulled files are compile databases to rewrite (names or gitignore patterns)."""

    def __init__(self, patterns: Sequence[str] = DEFAULT_REWRITE) -> None:
        self._file = RuleFile("\n".join(patterns)) if patterns else None

    def wants(self, rel: str) -> bool:
        if self._file is None:
            return False
        return self._file.verdict(rel, rel.rpartition("/")[2], False) is True


def _mapped(text: str, remote_root: str, local_root: str) -> str:
    mapper = PathMapper(remote_root, local_root)
    raw = mapper.feed(text.encode("utf-8", "surrogateescape")) + mapper.flush()
    return raw.decode("utf-8", "surrogateescape")


def _rewrite(value: Any, remote_root: str, local_root: str) -> Any:
    if isinstance(value, list):
        return [_rewrite(item, remote_root, local_root) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in REWRITTEN_KEYS and isinstance(item, str):
            out[key] = _mapped(item, remote_root, local_root)
        elif key == "arguments" and isinstance(item, list):
            out[key] = [_mapped(a, remote_root, local_root) if isinstance(a, str) else a
                        for a in item]
        else:
            out[key] = _rewrite(item, remote_root, local_root)
    return out


def rewrite_json(data: bytes, remote_root: str, local_root: str) -> bytes:
    """The JSON document `data` with the remote root replaced by the local root (see the
    module docstring); ValueError when `data` is not JSON."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    rewritten = _rewrite(document, remote_root, local_root)
    return (json.dumps(rewritten, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
