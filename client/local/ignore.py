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

Each `.gitignore` is read once, lazily, and compiled (lsync.client.local.gitpatterns, which also
says why patterns are not matched with `pathspec`). Directory verdicts are cached, so a
path costs one dict lookup for its parent plus one match per `.gitignore` on its way up
(directories without one cost nothing). `.gitignore` files are opened without following
symlinks, as git does. Differences from git that remain: non-ASCII characters are matched
as code points rather than bytes, and `core.excludesFile` and `.git/info/exclude` are not
read.

Tracked files (lsync.client.local.gitindex): when the tree is (inside) a git work tree, the ignore
rules above apply only to untracked paths, as in git. A file in git's index is never
ignored, nor is a directory that holds one at any depth (so the scanner and the watcher
enter it); untracked paths inside such a directory still follow the rules, including
"everything below an ignored directory is ignored". `--exclude` is the user's own choice
for lsync, not git's: it applies to tracked paths too. `refresh_index()` re-reads the index
when its file changed (one stat otherwise) and says which paths that changed the verdict
of; an index that cannot be read leaves the plain rules in force, with a one-line note.
`index_changed`, `index_applied` and `index_seen_until` let a session follow the index
(lsync.client.local.ignored.follow_index) and tell a flush how far the verdicts are current.
Only the index of the repository holding the root is read: files of a nested repository
(a submodule, a vendored clone) follow the rules. `explain(rel, is_dir)` names the rule
that ignores a path (file:line and pattern).

Threads: `reload`, `forget` and `refresh_index` may run while another thread (a scan)
calls `is_ignored`; nothing breaks (the tracked set is replaced whole, in one assignment),
but that scan may see the old rules or index for some paths and the new ones for others,
so rescan what `reload` and `refresh_index` report changed after such a scan.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lsync.client.local import gitindex
from lsync.client.local.gitpatterns import RuleFile
from lsync.client.local.gitpatterns import parse_patterns as parse_patterns  # (re-exported)

GITIGNORE = ".gitignore"
VCS_DIR = ".git"

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
_Chain = tuple[tuple[int, RuleFile], ...]


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
        self._excludes = RuleFile("\n".join(excludes)) if excludes else None
        self._files: dict[str, RuleFile | None] = {}  # dir rel -> its .gitignore
        # Every proper ancestor of a key of _files (a superset after keys are dropped): a
        # path in neither has nothing read at or below it, so `forget` has nothing to do.
        self._above: set[str] = set()
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
            self.index_applied(self.refresh_index(report=False))  # (no news yet)

    def own(self, rel: str) -> str:
        """`rel`, or the equal string of git's index that the rules hold anyway (a scan
        keeps that one: one string per path of the tree, not two)."""
        return self.tracked.own(rel)

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

    def _rule_file(self, dir_rel: str) -> RuleFile | None:
        if dir_rel in self._files:
            return self._files[dir_rel]
        text = self._read_gitignore(dir_rel)
        rules = RuleFile(text) if text is not None else None
        self._files[dir_rel] = rules
        self._note_ancestors(dir_rel)
        return rules

    def _note_ancestors(self, dir_rel: str) -> None:
        while dir_rel:
            dir_rel = dir_rel.rpartition("/")[0]
            if dir_rel in self._above:
                return
            self._above.add(dir_rel)

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
        self._files[dir_rel] = RuleFile(text) if text is not None else None
        self._note_ancestors(dir_rel)
        self._chains.clear()
        self._dir_verdicts.clear()
        return True

    def forget(self, dir_rel: str) -> None:
        """Drop what was read from `dir_rel` and below (after the directory was removed
        or renamed away); it is read again from disk when next needed. A path with nothing
        read at or below it (a file: most deletes) costs a lookup, and keeps the caches."""
        if dir_rel and dir_rel not in self._files and dir_rel not in self._above:
            return
        prefix = dir_rel + "/"
        for key in list(self._files):  # list(): a snapshot even if a scan thread adds keys
            if not dir_rel or key == dir_rel or key.startswith(prefix):
                self._files.pop(key, None)
        self._chains.clear()
        self._dir_verdicts.clear()

    # -- git's index ------------------------------------------------------------------------
    def refresh_index(self, report: bool = True) -> IndexChange:
        """Read git's index again if its file changed since the last read (else this costs
        one stat): the paths whose verdict changed because they became tracked or
        untracked (a checkout, `git add -f`, `git rm --cached`), for the caller to look at
        again; none without `report` (working them out costs about 5 us per path that
        changed: 0.4 s for the kernel's first read). Never raises: an index that cannot be
        read counts as empty (the plain rules apply) and is reported once through
        `on_note`."""
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
            if not report:
                return IndexChange(frozenset(), frozenset(), stamp, as_of)
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
    def _rule_in(rules: RuleFile | None, source: str, rel: str, name: str,
                 is_dir: bool) -> Rule | None:
        """The pattern of `rules` that ignores (rel, name), None if none does."""
        if rules is None:
            return None
        index = rules.deciding(rel, name, is_dir)
        if index < 0 or rules.negative[index]:
            return None
        return Rule(source, index + 1, rules.patterns[index])
