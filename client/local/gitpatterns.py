"""Git's ignore patterns (gitignore(5), wildmatch) compiled for fast matching.

`parse_patterns(text)` reads the text of a `.gitignore` (or the `--exclude` list joined by
newlines) with git's rules for comments, escapes, trailing spaces, a trailing CR and a
UTF-8 BOM; `RuleFile(text)` compiles them into one `Matcher` per kind of path (file or
directory): literal names, literal paths and `*.ext` patterns go to dicts, the rest into a
regular expression whose alternatives are in reverse order, so one `fullmatch` finds the
last matching pattern. `lsync.client.local.ignore` decides which files apply to a path.

Patterns are translated here rather than matched with `pathspec`: pathspec's matchers
answer "this path or any path under it" (they are built for flat whole-path checks), which
gives wrong verdicts when rules in nested `.gitignore` files interact (root `*.log` plus
`sub/.gitignore` `!logs/` would re-include `sub/logs/a.log`; git does not), and matching
100 patterns one by one costs about 30 us per path. Non-ASCII characters are matched as
code points rather than bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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
class Pattern:
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


def parse_patterns(text: str) -> list[Pattern]:
    """Parse the text of a .gitignore (or the --exclude list joined by newlines)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    patterns: list[Pattern] = []
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
        patterns.append(Pattern(index, negative, dir_only, basename, line, regex, text))
    return patterns


class Matcher:
    """The patterns of one file that apply to one kind of path (file or directory).

    Cheap cases first: literal names and literal anchored paths are dict lookups, `*SUFFIX`
    patterns (SUFFIX literal with a dot) are found by the name's last extension; the rest
    is one regex per kind (name or path) with the alternatives in reverse order.
    """

    __slots__ = (
        "exact_name", "exact_path", "name_index", "name_regex", "path_index", "path_regex",
        "suffixes",
    )

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        self.exact_name: dict[str, int] = {}
        self.exact_path: dict[str, int] = {}
        self.suffixes: dict[str, list[tuple[str, int]]] = {}
        name_alts: list[Pattern] = []
        path_alts: list[Pattern] = []
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
    def _combine(alts: list[Pattern]) -> tuple[re.Pattern[str] | None, list[int]]:
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


class RuleFile:
    """The compiled patterns of one .gitignore (or of the --exclude list)."""

    __slots__ = ("dirs", "files", "negative", "patterns", "text")

    def __init__(self, text: str) -> None:
        patterns = parse_patterns(text)
        self.text = text
        self.negative = {p.index: p.negative for p in patterns}
        self.patterns = {p.index: p.text for p in patterns}
        self.files = Matcher([p for p in patterns if not p.dir_only])
        self.dirs = Matcher(patterns)

    def verdict(self, rel: str, name: str, is_dir: bool) -> bool | None:
        """True: ignored; False: re-included by a negation; None: no pattern matches."""
        index = (self.dirs if is_dir else self.files).last_match(rel, name)
        if index < 0:
            return None
        return not self.negative[index]

    def deciding(self, rel: str, name: str, is_dir: bool) -> int:
        """The index of the pattern that decides (rel, name), or -1."""
        return (self.dirs if is_dir else self.files).last_match(rel, name)
