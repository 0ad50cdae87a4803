"""What the ignore rules leave out: a full scan's tally, the note when they left out most of
the tree, and following git's index while lsync runs.

`IgnoredTally` hears every entry a scan skips (`scan_tree(..., on_ignored=tally.add)`):
files, links, and directories it did not enter, but never `.git` (skipping it is no news).
`entries` is that count (what `lsync status` shows as `ignored`). After the scan,
`mostly_ignored_note(files_kept)` returns a one-line note when more than half of the tree's
files are ignored — Debian's kernel source adds `/*` to the top `.gitignore`, and lsync
synced 0 of 78,667 files without a word:

    78,667 of 78,667 files ignored (.gitignore:159 "/*")

Counting the files inside ignored directories means walking them, so it is done only when
the scan met more ignored entries than files it kept (otherwise an ignored `node_modules/`
or build directory, however big, is the usual case and worth no note), and only up to
`WALK_LIMIT` entries. The rules behind the count (`IgnoreRules.explain`) are looked up then
too, not during the scan. Thread-safe enough for one scan thread feeding it and the
session reading `entries`; `mostly_ignored_note` is meant for a worker thread.

`follow_index(rules, on_change, note)` runs for a session's life: every `INDEX_POLL`
seconds it stats git's index and, when the file changed, reads it in a worker thread and
hands what the new index changed to `on_change`, on the event loop. Git writes its index
last, after the work tree, and some commands change only the index (`git add -f`, `git rm
--cached`), so watching the tree is not enough; ten stats a second cost nothing worth
measuring. Meanwhile `IgnoreRules.index_seen_until` tells a flush or an in-sync report how
far the verdicts are current: it waits only while a new index is being read. A one-line
note says when the index cannot be read, once per problem; nothing else stops it (a bug
is noted and logged, and the polling goes on).
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from lsync.client.errors import internal_error
from lsync.client.local.ignore import VCS_DIR, IgnoreRules, IndexChange, Rule
from lsync.client.local.localentry import LocalEntry

INDEX_POLL = 0.1  # seconds between looks (one stat each) at git's index
WALK_LIMIT = 1_000_000  # entries below ignored directories counted at most
KEEP_LIMIT = 200_000  # ignored paths remembered for the note at most (the rest: counted)
SHOWN_RULES = 3


class IgnoredTally:
    """The entries one full scan skipped because of the ignore rules."""

    def __init__(self, root: Path, rules: IgnoreRules) -> None:
        self.root = root
        self.rules = rules
        self.entries = 0  # files, links and directories skipped (not counting below them)
        self._paths: list[tuple[str, bool]] = []  # the first KEEP_LIMIT of them

    def add(self, rel: str, is_dir: bool) -> None:
        """The scan skipped `rel` (a directory it did not enter when `is_dir`)."""
        if rel.rpartition("/")[2] == VCS_DIR:
            return
        self.entries += 1
        if len(self._paths) < KEEP_LIMIT:
            self._paths.append((rel, is_dir))

    def by_rule(self) -> tuple[collections.Counter[Rule], int, bool]:
        """Ignored files per rule (a directory counts the files below it), the total, and
        whether the walk stopped at WALK_LIMIT (the counts are then lower bounds)."""
        counts: collections.Counter[Rule] = collections.Counter()
        budget = WALK_LIMIT
        for rel, is_dir in self._paths:
            rule = self.rules.explain(rel, is_dir)
            if rule is None:  # not ignored any more (the rules or the index changed)
                continue
            if not is_dir:
                counts[rule] += 1
                continue
            found, budget = _count_files(self.root / rel, budget)
            counts[rule] += found
        unknown = self.entries - len(self._paths)  # beyond KEEP_LIMIT: counted once each
        if unknown:
            counts[Rule("rules not looked up", 0, "")] += unknown
        return counts, sum(counts.values()), budget <= 0

    def after_scan(self, local: Mapping[str, LocalEntry]) -> str | None:
        """`mostly_ignored_note` for the scan that found `local` (links count as files, as
        they do below ignored directories)."""
        return self.mostly_ignored_note(sum(entry.kind != "dir" for entry in local.values()))

    def mostly_ignored_note(self, files_kept: int) -> str | None:
        """The note to show when more than half of the tree's files are ignored, else None
        (see the module's docstring for when the ignored directories are walked)."""
        if self.entries <= files_kept:
            return None
        counts, ignored, cut = self.by_rule()
        if ignored <= files_kept:
            return None
        total = ignored + files_kept
        more = "more than " if cut else ""
        shown = counts.most_common(SHOWN_RULES)
        if len(counts) == 1:
            why = str(shown[0][0])
        else:
            why = ", ".join(f"{rule}: {count:,}" for rule, count in shown)
            if len(counts) > SHOWN_RULES:
                why += f", {len(counts) - SHOWN_RULES} more rules"
        return f"{more}{ignored:,} of {more}{total:,} files ignored ({why})"


def _count_files(top: Path, budget: int) -> tuple[int, int]:
    """Files (and links) below the directory `top`, without following links, and what is
    left of the budget of entries to look at."""
    found = 0
    stack = [str(top)]
    while stack and budget > 0:
        try:
            with os.scandir(stack.pop()) as listing:
                for item in listing:
                    budget -= 1
                    if item.name == VCS_DIR:
                        continue
                    if item.is_dir(follow_symlinks=False):
                        stack.append(item.path)
                    else:
                        found += 1
        except OSError:
            continue
    return found, budget


async def follow_index(rules: IgnoreRules, on_change: Callable[[IndexChange], None],
                       note: Callable[[str], None], interval: float = INDEX_POLL) -> None:
    """Until cancelled: hand every new version of git's index, once applied, to `on_change`
    (its paths: those whose verdicts changed, maybe none; from then on
    `rules.index_seen_until` vouches for that index), and say through `note` when the
    index cannot be read."""
    shown: str | None = None
    failure: str | None = None
    while True:
        try:
            if rules.index_changed():
                change = await asyncio.to_thread(rules.refresh_index)
                rules.index_applied(change)
                # (Called with no paths too: an in-sync report held back while the new
                # index was read may be given now.)
                on_change(change)
            problem = rules.index_problem
            if problem != shown:
                shown = problem
                if problem is not None:
                    note(problem)
        except OSError as exc:  # a .gitignore that cannot be read, say: try again later
            if str(exc) != failure:
                failure = str(exc)
                note(f"following git's index: {exc}")
        except Exception as exc:  # a bug: said, logged, and the session goes on
            note(str(internal_error("following git's index", exc)))
            await asyncio.sleep(10 * interval)
        await asyncio.sleep(interval)
