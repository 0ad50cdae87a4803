"""Which local paths lsync leaves alone: `.gitignore` files, `.git/`, and `--exclude`.

`IgnoreRules.is_ignored(rel, is_dir)` answers with git's semantics, checked against
`git ls-files --others --exclude-standard` in tests/test_ignore.py:

- A `.gitignore` in directory D holds patterns for paths below D, relative to D. For a path,
  the deepest `.gitignore` with a matching pattern decides, and within one file the last
  matching pattern wins; `!pattern` re-includes. `--exclude` patterns (gitignore syntax,
  relative to the root) rank above every `.gitignore`, like git's command-line excludes.
- A pattern with no slash (but for a trailing one) matches the name at any depth; a pattern
  with a leading or inner slash is anchored to its file's directory; a trailing slash makes
  it match directories only (a symlink is never a directory here); `*`, `?`, `[...]` do not
  match `/`; `**/`, `/**/`, `/**` behave as git documents; `\\` escapes; trailing spaces are
  dropped unless escaped; a trailing CR and a UTF-8 BOM are dropped; `#` starts a comment.
- If a directory is ignored, everything under it is ignored, whatever deeper rules say
  (git does not look inside an excluded directory, so its `.gitignore` is never read).
- Any entry named `.git` (the repository directory, or a submodule's `.git` file) is
  ignored unless `include_vcs=True`; then `.git` and everything in it is exempt from the
  `.gitignore` files (git never applies them there) but still subject to `--exclude`.

Each `.gitignore` is read once, lazily, and compiled into one matcher per kind of path
(file or directory): literal names, literal paths and `*.ext` patterns go to dicts, the
rest into a regular expression whose alternatives are in reverse order, so one
`fullmatch` finds the last matching pattern. Directory verdicts are cached, so a path
costs one dict lookup for its parent plus one match per `.gitignore` on its way up
(directories without one cost nothing). `.gitignore` files are opened without following
symlinks, as git does.

Patterns are translated here rather than matched with `pathspec`: pathspec's matchers answer
"this path or any path under it" (they are built for flat whole-path checks), which gives
wrong verdicts when rules in nested `.gitignore` files interact (root `*.log` plus
`sub/.gitignore` `!logs/` would re-include `sub/logs/a.log`; git does not), and matching 100
patterns one by one costs about 30 us per path. Differences from git that remain: non-ASCII
characters are matched as code points rather than bytes, and `core.excludesFile` and
`.git/info/exclude` are not read.

Tracked files (lsync.client.gitindex): when the tree is (inside) a git work tree, the ignore
rules above apply only to untracked paths, as in git. A file in git's index is never
ignored, nor is a directory that holds one at any depth (so the scanner and the watcher
enter it); untracked paths inside such a directory still follow the rules, including
"everything below an ignored directory is ignored". `--exclude` is the user's own choice
for lsync, not git's: it applies to tracked paths too. `refresh_index()` re-reads the index
when its file changed (one stat otherwise) and says which paths that changed the verdict
of; an index that cannot be read leaves the plain rules in force, with a one-line note.
`explain(rel, is_dir)` names the rule that ignores a path (file:line and pattern).

Threads: `reload`, `forget` and `refresh_index` may run while another thread (a scan)
calls `is_ignored`; nothing breaks (the tracked set is replaced whole, in one assignment),
but that scan may see the old rules or index for some paths and the new ones for others,
so rescan what `reload` and `refresh_index` report changed after such a scan.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lsync.client import gitindex

GITIGNORE = ".gitignore"
VCS_DIR = ".git"

# POSIX character classes as git's wildmatch knows them (ASCII, C locale).
_CHAR_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}
_GLOB_CHARS = frozenset("*?[\\")


@dataclass(frozen=True, slots=True)
class _Pattern:
    index: int  # position in its file: later patterns win
    negative: bool  # "!pattern": re-include
    dir_only: bool  # "pattern/": directories only
    basename: bool  # no slash: matched against the last path component only
    body: str  # the pattern text with "!", trailing "/" and leading "/" removed
    regex: str  # body translated; matched with fullmatch
    text: str = ""  # the pattern as written (for explain)


def _trim_trailing_spaces(line: str) -> str:
    """Drop trailing spaces unless backslash-escaped (git's trim_trailing_spaces)."""
    last_space = -1
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == " ":
            if last_space < 0:
                last_space = i
        elif c == "\\":
            i += 1
            if i >= n:
                return line
            last_space = -1
        else:
            last_space = -1
        i += 1
    return line[:last_space] if last_space >= 0 else line


def _translate_bracket(body: str, start: int) -> tuple[str, int] | None:
    """Translate the bracket expression at body[start] == '['.

    Returns the regex and the index after the closing ']', or None when the expression is
    malformed (unterminated, unknown class): git then never matches the whole pattern.
    """
    n = len(body)
    j = start + 1
    negated = False
    if j < n and body[j] in "!^":
        negated = True
        j += 1
    parts: list[str] = []
    prev: str | None = None  # the last single character, which may start a range
    first = True
    while True:
        if j >= n:
            return None
        c = body[j]
        if c == "]" and not first:
            break
        first = False
        if c == "\\":
            j += 1
            if j >= n:
                return None
            prev = body[j]
            parts.append(re.escape(prev))
        elif c == "-" and prev is not None and j + 1 < n and body[j + 1] != "]":
            j += 1
            high = body[j]
            if high == "\\":
                j += 1
                if j >= n:
                    return None
                high = body[j]
            if prev <= high:
                parts.append(f"{re.escape(prev)}-{re.escape(high)}")
            prev = None
        elif c == "[" and j + 1 < n and body[j + 1] == ":":
            close = body.find("]", j + 2)
            if close < 0:
                return None
            if close - (j + 2) < 1 or body[close - 1] != ":":
                # Not a class after all: a literal '[', and go on after it.
                parts.append("\\[")
                prev = "["
            else:
                members = _CHAR_CLASSES.get(body[j + 2 : close - 1])
                if members is None:
                    return None
                parts.append(members)
                prev = None
                j = close
        else:
            prev = c
            parts.append(re.escape(c))
        j += 1
    members = "".join(parts)
    if negated:
        return f"[^/{members}]", j + 1
    return f"(?!/)[{members}]", j + 1


def _translate(body: str) -> str | None:
    """Translate a gitignore pattern body into a regex for fullmatch (wildmatch with
    WM_PATHNAME). Returns None for a pattern git would never match."""
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == "*":
            j = i
            while j < n and body[j] == "*":
                j += 1
            if j - i >= 2 and (i == 0 or body[i - 1] == "/"):
                if j == n:  # "/**" at the end, or "**" alone: everything
                    out.append(".*")
                    i = j
                    continue
                if body[j] == "/":  # "**/": zero or more directories
                    out.append("(?:.*/)?")
                    i = j + 1
                    continue
                if body.startswith("\\/", j):
                    out.append(".*/")
                    i = j + 2
                    continue
            out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            bracket = _translate_bracket(body, i)
            if bracket is None:
                return None
            regex, i = bracket
            out.append(regex)
        elif c == "\\":
            if i + 1 >= n:
                return None
            out.append(re.escape(body[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def parse_patterns(text: str) -> list[_Pattern]:
    """Parse the text of a .gitignore (or the --exclude list joined by newlines)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    patterns: list[_Pattern] = []
    for index, raw in enumerate(text.split("\n")):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line or line.startswith("#"):
            continue
        line = _trim_trailing_spaces(line)
        text = line
        negative = line.startswith("!")
        if negative:
            line = line[1:]
        dir_only = line.endswith("/")
        if dir_only:
            line = line[:-1]
        basename = "/" not in line
        if not basename and line.startswith("/"):
            line = line[1:]
        if not line:
            continue
        regex = _translate(line)
        if regex is None:
            continue
        patterns.append(_Pattern(index, negative, dir_only, basename, line, regex, text))
    return patterns


class _Matcher:
    """The patterns of one file that apply to one kind of path (file or directory).

    Cheap cases first: literal names and literal anchored paths are dict lookups, `*SUFFIX`
    patterns (SUFFIX literal with a dot) are found by the name's last extension; the rest
    is one regex per kind (name or path) with the alternatives in reverse order.
    """

    __slots__ = (
        "exact_name", "exact_path", "name_index", "name_regex", "path_index", "path_regex",
        "suffixes",
    )

    def __init__(self, patterns: Sequence[_Pattern]) -> None:
        self.exact_name: dict[str, int] = {}
        self.exact_path: dict[str, int] = {}
        self.suffixes: dict[str, list[tuple[str, int]]] = {}
        name_alts: list[_Pattern] = []
        path_alts: list[_Pattern] = []
        for p in patterns:
            literal = not _GLOB_CHARS.intersection(p.body)
            if p.basename and literal:
                self.exact_name[p.body] = p.index
            elif not p.basename and literal:
                self.exact_path[p.body] = p.index
            elif (
                p.basename
                and p.body.startswith("*")
                and "." in p.body
                and not _GLOB_CHARS.intersection(p.body[1:])
            ):
                suffix = p.body[1:]
                self.suffixes.setdefault(suffix.rpartition(".")[2], []).append(
                    (suffix, p.index)
                )
            elif p.basename:
                name_alts.append(p)
            else:
                path_alts.append(p)
        self.name_regex, self.name_index = self._combine(name_alts)
        self.path_regex, self.path_index = self._combine(path_alts)

    @staticmethod
    def _combine(alts: list[_Pattern]) -> tuple[re.Pattern[str] | None, list[int]]:
        if not alts:
            return None, []
        alts = alts[::-1]  # the first alternative that matches is the last pattern
        regex = re.compile("|".join(f"({p.regex})" for p in alts), re.DOTALL)
        return regex, [-1] + [p.index for p in alts]

    def last_match(self, rel: str, name: str) -> int:
        """Index of the last pattern matching (rel, name), or -1."""
        best = self.exact_name.get(name, -1)
        if self.exact_path:
            best = max(best, self.exact_path.get(rel, -1))
        if self.suffixes:
            dot = name.rfind(".")
            if dot >= 0:
                for suffix, index in self.suffixes.get(name[dot + 1 :], ()):
                    if index > best and name.endswith(suffix):
                        best = index
        if self.name_regex is not None:
            m = self.name_regex.fullmatch(name)
            if m is not None:
                best = max(best, self.name_index[m.lastindex or 0])
        if self.path_regex is not None:
            m = self.path_regex.fullmatch(rel)
            if m is not None:
                best = max(best, self.path_index[m.lastindex or 0])
        return best


class _RuleFile:
    """The compiled patterns of one .gitignore (or of the --exclude list)."""

    __slots__ = ("dirs", "files", "negative", "patterns", "text")

    def __init__(self, text: str) -> None:
        patterns = parse_patterns(text)
        self.text = text
        self.negative = {p.index: p.negative for p in patterns}
        self.patterns = {p.index: p.text for p in patterns}
        self.files = _Matcher([p for p in patterns if not p.dir_only])
        self.dirs = _Matcher(patterns)

    def verdict(self, rel: str, name: str, is_dir: bool) -> bool | None:
        """True: ignored; False: re-included by a negation; None: no pattern matches."""
        index = (self.dirs if is_dir else self.files).last_match(rel, name)
        if index < 0:
            return None
        return not self.negative[index]

    def deciding(self, rel: str, name: str, is_dir: bool) -> int:
        """The index of the pattern that decides (rel, name), or -1."""
        return (self.dirs if is_dir else self.files).last_match(rel, name)


@dataclass(frozen=True, slots=True)
class Rule:
    """Where a verdict comes from: `source` is a .gitignore (relative to the root),
    "--exclude" or ".git"; `line` counts from 1 (the position in the --exclude list)."""

    source: str
    line: int
    pattern: str

    def __str__(self) -> str:
        if not self.line:
            return self.source
        return f'{self.source}:{self.line} "{self.pattern}"'


VCS_RULE = Rule(VCS_DIR, 0, VCS_DIR)


Stamp = tuple[int, int, int] | None  # gitindex.stamp of the index file


@dataclass(frozen=True, slots=True)
class IndexChange:
    """Paths whose verdict a new git index changed (tracked now, or no longer), to look at
    again; `dirs`: directories whose verdict changed, for the watcher to walk again. `stamp` is the
    index file's, `as_of_ns` when it was taken (for `index_applied`)."""

    paths: frozenset[str]
    dirs: frozenset[str]
    stamp: Stamp = None
    as_of_ns: int = 0

    def __bool__(self) -> bool:
        return bool(self.paths)


NO_CHANGE = IndexChange(frozenset(), frozenset())
_UNREAD: Stamp = (-1, -1, -1)


# One step of a path's way up: (length of the directory prefix to cut, its rules).
_Chain = tuple[tuple[int, _RuleFile], ...]


class IgnoreRules:
    """Ignore verdicts for paths relative to `root` (POSIX, '/'-separated, no leading '/')."""

    def __init__(
        self, root: Path, excludes: Sequence[str] = (), include_vcs: bool = False,
        *, git_index: bool = True, on_note: Callable[[str], None] | None = None,
    ) -> None:
        """`git_index`: read the index of the git work tree holding `root`, if any (see
        `refresh_index`); `on_note` hears, in one line, why an index cannot be read."""
        self.root = Path(root)
        self.include_vcs = include_vcs
        self._excludes = _RuleFile("\n".join(excludes)) if excludes else None
        self._files: dict[str, _RuleFile | None] = {}  # dir rel -> its .gitignore
        self._chains: dict[str, _Chain] = {}  # dir rel -> rule files that apply below it
        self._dir_verdicts: dict[str, bool] = {}  # dir rel -> the rules' verdict (untracked)
        self._git_index = git_index
        self._on_note = on_note
        self._index: gitindex.IndexLocation | None = None
        self._has_dot_git = False  # whether root/.git existed when no index was found
        self._index_stamp: Stamp = _UNREAD  # of the index last read
        self._applied: Stamp = _UNREAD  # of the index whose changes the caller applied
        self._applied_ns = 0  # when that stamp was taken, or last found current
        self._index_lock = threading.Lock()  # one refresh at a time
        self.tracked: gitindex.Tracked = gitindex.EMPTY  # replaced whole, never changed
        self.index_problem: str | None = None  # why the index could not be read
        if git_index:
            self._index = gitindex.locate(self.root)
            self.index_applied(self.refresh_index())  # (the first read has no news)

    def is_ignored(self, rel: str, is_dir: bool) -> bool:
        """Whether lsync ignores the path `rel` (a directory when `is_dir`). The root ('')
        is never ignored."""
        if not rel:
            return False
        if is_dir:
            if not self._dir_ignored(rel):
                return False
            return not self.tracked.holds(rel) or self._excluded(rel, True)
        parent, _, name = rel.rpartition("/")
        if (parent and self._dir_ignored(parent)) or self._own_verdict(parent, name, rel, False):
            return rel not in self.tracked.files or self._excluded(rel, False)
        return False

    def _excluded(self, rel: str, is_dir: bool) -> bool:
        """Whether `--exclude` ignores `rel` by itself or through one of its directories
        (what still ignores a tracked path)."""
        excludes = self._excludes
        if excludes is None:
            return False
        parts = rel.split("/")
        last = len(parts) - 1
        for i, name in enumerate(parts):
            sub = "/".join(parts[:i + 1])
            if excludes.verdict(sub, name, is_dir or i < last) is True:
                return True
        return False

    def _dir_ignored(self, dir_rel: str) -> bool:
        """Whether the rules ignore the directory `dir_rel` when nothing in it is tracked
        (and so everything untracked below it), cached; computed top-down for uncached
        ancestors."""
        verdict = self._dir_verdicts.get(dir_rel)
        if verdict is not None:
            return verdict
        parent = ""
        for name in dir_rel.split("/"):
            rel = parent + "/" + name if parent else name
            verdict = self._dir_verdicts.get(rel)
            if verdict is None:
                verdict = self._own_verdict(parent, name, rel, True)
                self._dir_verdicts[rel] = verdict
            if verdict:
                self._dir_verdicts[dir_rel] = True
                return True
            parent = rel
        return False

    def _own_verdict(self, parent: str, name: str, rel: str, is_dir: bool) -> bool:
        """The verdict for `rel` itself, its ancestors being known not ignored."""
        if name == VCS_DIR or (rel.startswith(".git/") or "/.git/" in rel):
            if not self.include_vcs:
                return True
            if self._excludes is None:
                return False
            return self._excludes.verdict(rel, name, is_dir) is True
        if self._excludes is not None:
            verdict = self._excludes.verdict(rel, name, is_dir)
            if verdict is not None:
                return verdict
        chain = self._chains.get(parent)
        if chain is None:
            chain = self._chain(parent)
        for cut, rules in reversed(chain):
            verdict = rules.verdict(rel[cut:], name, is_dir)
            if verdict is not None:
                return verdict
        return False

    def _chain(self, dir_rel: str) -> _Chain:
        """The rule files of `dir_rel` and its ancestors, root first."""
        chain = self._chains.get(dir_rel)
        if chain is not None:
            return chain
        # Find the deepest ancestor already known, then extend downwards.
        missing = [dir_rel]
        while missing[-1]:
            up = missing[-1].rpartition("/")[0]
            known = self._chains.get(up)
            if known is not None:
                chain = known
                break
            missing.append(up)
        else:
            chain = ()
        for rel in reversed(missing):
            rules = self._rule_file(rel)
            if rules is not None:
                chain = (*chain, (len(rel) + 1 if rel else 0, rules))
            self._chains[rel] = chain
        return chain

    def _rule_file(self, dir_rel: str) -> _RuleFile | None:
        if dir_rel in self._files:
            return self._files[dir_rel]
        text = self._read_gitignore(dir_rel)
        rules = _RuleFile(text) if text is not None else None
        self._files[dir_rel] = rules
        return rules

    def _read_gitignore(self, dir_rel: str) -> str | None:
        """The text of dir_rel/.gitignore, or None when there is none to read."""
        path = self.root / dir_rel / GITIGNORE if dir_rel else self.root / GITIGNORE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
                return None
            raise
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            return None
        return data.decode("utf-8", "surrogateescape")

    def is_rules_file(self, rel: str) -> bool:
        """Whether a change to `rel` means calling `reload` on its directory."""
        return rel == GITIGNORE or rel.endswith("/" + GITIGNORE)

    def reload(self, dir_rel: str) -> bool:
        """Re-read the .gitignore of `dir_rel` ('' for the root) after it was created,
        changed or deleted. Returns True when its rules changed: verdicts below `dir_rel`
        may differ now, so the caller should rescan that subtree."""
        known = dir_rel in self._files
        old = self._files.get(dir_rel)
        text = self._read_gitignore(dir_rel)
        if (old.text if old is not None else None) == text and (known or text is None):
            return False
        self._files[dir_rel] = _RuleFile(text) if text is not None else None
        self._chains.clear()
        self._dir_verdicts.clear()
        return True

    def forget(self, dir_rel: str) -> None:
        """Drop what was read from `dir_rel` and below (after the directory was removed
        or renamed away); it is read again from disk when next needed."""
        prefix = dir_rel + "/"
        for key in list(self._files):  # list(): a snapshot even if a scan thread adds keys
            if not dir_rel or key == dir_rel or key.startswith(prefix):
                self._files.pop(key, None)
        self._chains.clear()
        self._dir_verdicts.clear()

    # -- git's index ------------------------------------------------------------------------
    def refresh_index(self) -> IndexChange:
        """Read git's index again if its file changed since the last read (else this costs
        one stat): the paths whose verdict changed because they became tracked or
        untracked (a checkout, `git add -f`, `git rm --cached`), for the caller to look at
        again. Never raises: an index that cannot be read counts as empty (the plain rules
        apply) and is reported once through `on_note`."""
        as_of = time.time_ns()
        if not self._git_index:
            return IndexChange(frozenset(), frozenset(), None, as_of)
        with self._index_lock:
            if self._index is None:
                self._has_dot_git = os.path.lexists(self.root / VCS_DIR)
                if self._has_dot_git:
                    self._index = gitindex.locate(self.root)  # a repository made meanwhile
                if self._index is None:
                    return IndexChange(frozenset(), frozenset(), None, as_of)
            stamp = gitindex.stamp(self._index)
            if stamp == self._index_stamp:
                return IndexChange(frozenset(), frozenset(), stamp, as_of)
            self._index_stamp = stamp
            try:
                tracked = gitindex.read(self._index)
                problem = None
            except (gitindex.IndexUnreadable, OSError) as exc:
                tracked = gitindex.EMPTY
                problem = f"git index {self._index.path} unreadable ({exc}); tracked files " \
                          "are synced only if the ignore rules allow until git rewrites it"
            if problem != self.index_problem:
                self.index_problem = problem
                if problem is not None and self._on_note is not None:
                    self._on_note(problem)
            old, self.tracked = self.tracked, tracked
            paths, dirs = self._index_change(old, tracked)
            return IndexChange(paths, dirs, stamp, as_of)

    def index_changed(self) -> bool:
        """Whether git's index file differs from the one last read (one stat, or none
        without git): then call `refresh_index`, in a worker thread for a big tree."""
        if not self._git_index:
            return False
        location = self._index
        if location is None:
            return os.path.lexists(self.root / VCS_DIR) != self._has_dot_git
        return gitindex.stamp(location) != self._index_stamp

    def index_applied(self, change: IndexChange) -> None:
        """The caller acted on `change` (the paths are marked for a new look): from now on
        `index_seen_until` may vouch for that version of the index."""
        self._applied, self._applied_ns = change.stamp, change.as_of_ns

    def index_seen_until(self) -> int:
        """Unix ns before which every change of git's index was applied (see
        `index_applied`): now when the index file is the one last applied (one stat, like
        the watcher's one select), else the last time that was so. Without git: now."""
        now = time.time_ns()
        if not self._git_index:
            return now
        if self._index is None:
            if not self.index_changed():
                self._applied_ns = now
        elif gitindex.stamp(self._index) == self._applied:
            self._applied_ns = now
        return self._applied_ns

    def _index_change(self, old: gitindex.Tracked,
                      new: gitindex.Tracked) -> tuple[frozenset[str], frozenset[str]]:
        """What differs between the two indexes: (paths to look at, directories to watch
        again). Paths: files that became tracked or untracked and the rules match, and
        directories the rules match that now hold tracked paths. Directories to watch
        again: also those that no longer hold any. (Such a directory is not looked at again:
        it would be forgotten whole, its remote copy left in place, before the tracked
        files that left it are deleted remotely; each of those files is looked at.)"""
        flipped = old.files ^ new.files
        old_dirs = {name[:-1] for name in old.ordered if name.endswith("/")}
        new_dirs = {name[:-1] for name in new.ordered if name.endswith("/")}
        paths: set[str] = set()
        dirs: set[str] = set()
        candidates: set[str] = old_dirs ^ new_dirs
        for rel in flipped:
            parent, _, name = rel.rpartition("/")
            ruled = (parent and self._dir_ignored(parent)) or self._own_verdict(
                parent, name, rel, False)
            if ruled and not self._excluded(rel, False):
                paths.add(rel)
            while parent and parent not in candidates:
                candidates.add(parent)
                parent = parent.rpartition("/")[0]
        for rel in candidates:
            holds = new.holds(rel)
            if old.holds(rel) != holds and self._dir_ignored(rel) \
                    and not self._excluded(rel, True):
                dirs.add(rel)
                if holds:
                    paths.add(rel)
        return frozenset(paths), frozenset(dirs)

    # -- why --------------------------------------------------------------------------------
    def explain(self, rel: str, is_dir: bool) -> Rule | None:
        """The rule that makes lsync ignore `rel`, None when it is not ignored: the rule of
        its outermost ignored directory if it has one, else its own."""
        if not self.is_ignored(rel, is_dir):
            return None
        parent = ""
        parts = rel.split("/")
        for i, name in enumerate(parts):
            sub = parent + "/" + name if parent else name
            last = i == len(parts) - 1
            rule = self._own_rule(parent, name, sub, is_dir if last else True)
            if rule is not None and (last or self._dir_ignored(sub)):
                return rule
            parent = sub
        return None  # (not reached: an ignored path has an ignoring rule on its way)

    def _own_rule(self, parent: str, name: str, rel: str, is_dir: bool) -> Rule | None:
        """The rule behind `_own_verdict(...)` when it is True, else None; --exclude first
        (it ranks above the .gitignore files)."""
        if name == VCS_DIR or (rel.startswith(".git/") or "/.git/" in rel):
            if not self.include_vcs:
                return VCS_RULE
            return self._rule_in(self._excludes, "--exclude", rel, name, is_dir)
        excluded = self._rule_in(self._excludes, "--exclude", rel, name, is_dir)
        if excluded is not None or (self._excludes is not None and
                                    self._excludes.verdict(rel, name, is_dir) is False):
            return excluded
        for cut, rules in reversed(self._chain(parent)):
            if rules.verdict(rel[cut:], name, is_dir) is not None:
                source = f"{rel[:cut]}{GITIGNORE}"
                return self._rule_in(rules, source, rel[cut:], name, is_dir)
        return None

    @staticmethod
    def _rule_in(rules: _RuleFile | None, source: str, rel: str, name: str,
                 is_dir: bool) -> Rule | None:
        """The pattern of `rules` that ignores (rel, name), None if none does."""
        if rules is None:
            return None
        index = rules.deciding(rel, name, is_dir)
        if index < 0 or rules.negative[index]:
            return None
        return Rule(source, index + 1, rules.patterns[index])
