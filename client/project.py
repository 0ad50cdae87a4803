"""The project file, `.lsync.toml` at the root of the local tree.

    target = "build-box:src/linux"     # [user@]host:tree, or a local directory
    # or several: target = ["x86-box:src/linux", "arm-box:build/linux"]
    # or named ones (the default name is the host, or the directory's last part):
    #   [[target]]
    #   name = "x86"
    #   target = "x86-box:src/linux"
    exclude = ["*.o", "/out/"]         # gitignore syntax, like --exclude
    delete = false                     # --delete
    include_vcs = false                # --include-vcs
    accept_new_host_key = false        # --accept-new-host-key
    ssh_config = "~/.ssh/work_config"  # -F: one file or a list of files
    step_ms = 5                        # --step-ms
    debounce_ms = 20                   # --debounce-ms
    reconnect = true                   # false is --no-reconnect
    lanes = 4                          # --lanes (extra SSH channels; 0: one channel)
    log = "normal"                     # "quiet" (-q), "normal", "verbose" (-v)

    [run]
    map_paths = true                   # false is `lsync run --no-map-paths`

    [pull]
    paths = ["compile_commands.json", "include/generated/**"]  # pulled after `lsync run`
    rewrite = ["compile_commands.json"]  # pulled JSON rewritten to local paths (default)
    after_run = true                   # false is `lsync run --no-pull`

Every key is optional; every option of `lsync connect` has one, except `--local`: the
local tree is the directory holding the file. A relative local-directory `target` is taken
relative to that directory. `find_project` walks up from a directory to the first one
holding `.lsync.toml`, so any directory inside the tree finds it.

What it promises: a file that loads is fully checked (types and ranges), and every problem
is one `ProjectError` (a `UsageError`: exit status 2) whose message names the file, the key
and its line: unknown keys (with a suggestion for a near miss such as `include-vcs`), bad
value types, a TOML syntax error (tomllib's own message, which carries line and column),
a file that is not UTF-8 or cannot be read.

`merge(project, cli_args)` gives the settings of one `lsync connect`: a command-line option
overrides the file, the file overrides the built-in default. In `cli_args` (an
`argparse.Namespace` or anything with the same attributes; a missing attribute is "not
given") an option counts as given when its value is not None, so the parser must use
`default=None` for every option (`--delete` with `action="store_true", default=None`;
`argparse.BooleanOptionalAction` with `default=None` lets the command line also turn a
file's `true` off). `no_reconnect` and `no_map_paths` are understood as well as `reconnect`
and `map_paths`. Two options add rather than override, because the command line can only
add to them: `exclude` patterns from the command line come after the file's, and
`quiet`/`verbose` (store_true flags) override `log` only when true. A `local` (--local)
other than the file's directory is refused unless a target is given too, and then the
file, which belongs to another tree, does not apply at all.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

from lsync.agent.lanes import MAX_LANES
from lsync.client.errors import UsageError
from lsync.client.local.watcher import DEFAULT_DEBOUNCE_MS, DEFAULT_STEP_MS
from lsync.client.target import NAME, Target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["PROJECT_FILE", "ConnectSettings", "LogLevel", "Project", "ProjectError",
           "find_project", "load_project", "merge"]

PROJECT_FILE = ".lsync.toml"
DEFAULT_LANES = 4  # data lanes: one for single saves, three for batches

LogLevel = Literal["quiet", "normal", "verbose"]
_LOG_LEVELS: tuple[LogLevel, ...] = ("quiet", "normal", "verbose")
_TOP_KEYS = ("target", "ssh_config", "delete", "exclude", "include_vcs", "accept_new_host_key",
             "step_ms", "debounce_ms", "reconnect", "lanes", "log", "run", "pull")
_PULL_KEYS = {"paths", "rewrite", "after_run"}
DEFAULT_REWRITE = ("compile_commands.json",)


class ProjectError(UsageError):
    """The project file is unusable. `code` is one of "syntax", "unknown-key", "bad-value",
    "unreadable", "no-target", "mismatch"; `line` is 1-based, 0 when unknown."""

    def __init__(self, code: str, message: str, path: Path | None = None, line: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Project:
    """One loaded `.lsync.toml`: the values it sets, the defaults for the rest."""

    path: Path  # the file
    root: Path  # the directory holding it: the local tree
    target: str | None = None  # the first target
    targets: tuple[tuple[str, str | None], ...] = ()  # every target: (target, name or None)
    ssh_config: tuple[str, ...] | None = None
    delete: bool = False
    exclude: tuple[str, ...] = ()
    include_vcs: bool = False
    accept_new_host_key: bool = False
    step_ms: int = DEFAULT_STEP_MS
    debounce_ms: int = DEFAULT_DEBOUNCE_MS
    reconnect: bool = True
    lanes: int = DEFAULT_LANES
    log: LogLevel = "normal"
    map_paths: bool = True  # [run] map_paths
    pull_paths: tuple[str, ...] = ()  # [pull] paths (lsync.client.buildloop.pullrules)
    pull_rewrite: tuple[str, ...] = DEFAULT_REWRITE  # [pull] rewrite
    pull_after_run: bool = True  # [pull] after_run


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    """The settings of one `lsync connect` (or `lsync run`), file and command line merged."""

    target: str  # the first target
    local_root: Path
    ssh_config: list[str] | None
    delete: bool
    exclude: list[str]
    include_vcs: bool
    accept_new_host_key: bool
    step_ms: int
    debounce_ms: int
    reconnect: bool
    lanes: int
    log: LogLevel
    map_paths: bool
    pull_paths: tuple[str, ...] = ()
    pull_rewrite: tuple[str, ...] = DEFAULT_REWRITE
    targets: tuple[tuple[str, str | None], ...] = ()  # every target: (target, name or None)


# -- finding and loading ------------------------------------------------------------------

def find_project(start: Path) -> Path | None:
    """The first directory from `start` (a directory or a file in one) up to `/` that
    holds a `.lsync.toml` regular file; None when there is none."""
    here = start.expanduser().absolute()
    if not here.is_dir():
        here = here.parent
    for directory in (here, *here.parents):
        if (directory / PROJECT_FILE).is_file():
            return directory
    return None


def load_project(root: Path) -> Project | None:
    """The project file of the tree at `root`, checked; None when `root` has none."""
    root = root.expanduser().absolute()
    path = root / PROJECT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProjectError("unreadable", f"{path}: cannot read: {exc.strerror}", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ProjectError("syntax", f"{path}, line {line}: not UTF-8 text", path, line) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise ProjectError("syntax", f"{path}: {exc}", path,
                           int(found.group(1)) if found else 0) from None
    return _Checker(path, text).project(root, document)


class _Checker:
    """Turns the parsed document into a `Project`, or the first problem into a ProjectError
    naming the key's line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def project(self, root: Path, document: dict[str, object]) -> Project:
        self._known(document, set(_TOP_KEYS), ())
        d = Project(path=self.path, root=root)
        targets = self._targets(document["target"], root) if "target" in document else ()
        ssh_config = d.ssh_config
        if "ssh_config" in document:
            value = document["ssh_config"]
            ssh_config = (value,) if isinstance(value, str) else self._strings(
                value, "ssh_config", (), "a string or a list of strings")
        run = document.get("run", {})
        if not isinstance(run, dict):
            self._fail("bad-value", "run", (), f"must be a table ([run]), not {_shown(run)}")
        self._known(run, {"map_paths"}, ("run",))
        pull = document.get("pull", {})
        if not isinstance(pull, dict):
            self._fail("bad-value", "pull", (), f"must be a table ([pull]), not {_shown(pull)}")
        self._known(pull, _PULL_KEYS, ("pull",))
        return Project(
            path=self.path,
            root=root,
            target=targets[0][0] if targets else None,
            targets=targets,
            ssh_config=ssh_config,
            delete=self._bool(document, "delete", d.delete),
            exclude=self._strings(document.get("exclude", []), "exclude", (), "a list of strings"),
            include_vcs=self._bool(document, "include_vcs", d.include_vcs),
            accept_new_host_key=self._bool(document, "accept_new_host_key",
                                           d.accept_new_host_key),
            step_ms=self._milliseconds(document, "step_ms", d.step_ms),
            debounce_ms=self._milliseconds(document, "debounce_ms", d.debounce_ms),
            reconnect=self._bool(document, "reconnect", d.reconnect),
            lanes=self._lanes(document, d.lanes),
            log=self._log(document, d.log),
            map_paths=self._bool(run, "map_paths", d.map_paths, ("run",)),
            pull_paths=self._strings(pull.get("paths", []), "paths", ("pull",),
                                     "a list of strings (gitignore patterns)"),
            pull_rewrite=self._strings(pull.get("rewrite", list(d.pull_rewrite)), "rewrite",
                                       ("pull",), "a list of strings (file names or patterns)"),
            pull_after_run=self._bool(pull, "after_run", d.pull_after_run, ("pull",)),
        )

    def _known(self, table: dict[str, object], known: set[str], where: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                near = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=1)
                hint = f" (did you mean `{near[0]}`?)" if near else ""
                line, name, at = self._where(key, where)
                raise ProjectError("unknown-key", f"{at}: unknown key `{name}`{hint}; known "
                                   "keys: " + ", ".join(sorted(known)), self.path, line)

    def _targets(self, value: object, root: Path) -> tuple[tuple[str, str | None], ...]:
        """`target`: a string, or an array of strings and tables (`name`, `target`)."""
        items = value if isinstance(value, list) else [value]
        if not items:
            self._fail("bad-value", "target", (), "must not be empty")
        found: list[tuple[str, str | None]] = []
        names: set[str] = set()
        for item in items:
            name = None
            if isinstance(item, dict):
                self._known(item, {"name", "target"}, ("target",))
                if "target" not in item:
                    self._fail("bad-value", "target", (), "tables must set `target`")
                name = item.get("name")
                if name is not None and (not isinstance(name, str)
                                         or not NAME.fullmatch(name) or name in names):
                    self._fail("bad-value", "name", ("target",),
                               "must be a unique name of letters, digits, '.', '_' and '-', "
                               f"not {_shown(name)}")
                if name is not None:
                    names.add(name)
                item = item["target"]
            text = self._string(item, "target", ())
            if not text:
                self._fail("bad-value", "target", (), "must not be empty")
            found.append((_relative_to(root, text), name))
        return tuple(found)

    def _string(self, value: object, key: str, where: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            self._fail("bad-value", key, where, f"must be a string, not {_shown(value)}")
        return value

    def _bool(self, table: dict[str, object], key: str, default: bool,
              where: tuple[str, ...] = ()) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self._fail("bad-value", key, where, f"must be true or false, not {_shown(value)}")
        return value

    def _milliseconds(self, table: dict[str, object], key: str, default: int) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self._fail("bad-value", key, (),
                       f"must be a whole number of milliseconds >= 0, not {_shown(value)}")
        return value

    def _lanes(self, table: dict[str, object], default: int) -> int:
        value = table.get("lanes", default)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LANES:
            self._fail("bad-value", "lanes", (),
                       f"must be a whole number from 0 to {MAX_LANES}, not {_shown(value)}")
        return value

    def _log(self, table: dict[str, object], default: LogLevel) -> LogLevel:
        value = table.get("log", default)
        for level in _LOG_LEVELS:
            if value == level:
                return level
        self._fail("bad-value", "log", (),
                   f'must be "quiet", "normal" or "verbose", not {_shown(value)}')

    def _strings(self, value: object, key: str, where: tuple[str, ...],
                 expected: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._fail("bad-value", key, where, f"must be {expected}, not {_shown(value)}")
        return tuple(value)

    def _where(self, key: str, where: tuple[str, ...]) -> tuple[int, str, str]:
        """(line, dotted name, "FILE, line N") of `key` in table `where`."""
        line = key_line(self.text, where, key)
        at = f"{self.path}, line {line}" if line else str(self.path)
        return line, ".".join((*where, key)), at

    def _fail(self, code: str, key: str, where: tuple[str, ...], problem: str) -> NoReturn:
        line, name, at = self._where(key, where)
        raise ProjectError(code, f"{at}: `{name}` {problem}", self.path, line)


def _shown(value: object) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def _relative_to(root: Path, target: str) -> str:
    """A local-directory target relative to the project's directory, not to the cwd."""
    parsed = Target.parse(target)
    if parsed.host is None and not target.startswith(("/", "~")):
        return str(root / target)
    return target


# -- where a key is -----------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HEADER = re.compile(r"\[\[?\s*([^\]]*?)\s*\]")


def key_line(text: str, table: tuple[str, ...], key: str) -> int:
    """The 1-based line where `key` is set in `table` (() for the top level) of the TOML
    `text`; 0 when it cannot be found. Handles `[table]` headers, dotted keys
    (`run.map_paths = ...`), quoted keys, and skips lines inside multi-line strings and
    arrays (tomllib reports no positions for values that parse but are wrong)."""
    current: tuple[str, ...] = ()
    fallback = 0
    for number, line in _logical_lines(text):
        stripped = line.strip()
        if stripped.startswith("["):
            found = _HEADER.match(stripped)
            header = _parse_key(found.group(1)) if found else None
            if header is not None:
                current = tuple(header)
                if current == (*table, key):
                    fallback = fallback or number
            continue
        name, sep, _ = stripped.partition("=")
        if not sep:
            continue
        parts = _parse_key(name.strip())
        if parts is None:
            continue
        path = (*current, *parts)
        if path == (*table, key):
            return number
        wanted = (*table, key)
        if len(path) > len(wanted) and path[:len(wanted)] == wanted:
            fallback = fallback or number  # `run.map_paths = ...` when looking for `run`
        elif len(path) < len(wanted) and wanted[:len(path)] == path:
            fallback = fallback or number  # `run = { map_paths = ... }`: an inline table
    return fallback


def _parse_key(text: str) -> list[str] | None:
    """A (dotted) TOML key as its parts; None when `text` is not a key."""
    parts: list[str] = []
    rest = text
    while True:
        rest = rest.lstrip()
        if rest[:1] in ('"', "'"):
            quote = rest[0]
            end = rest.find(quote, 1)
            if end < 0:
                return None
            parts.append(rest[1:end])
            rest = rest[end + 1:]
        else:
            match = _BARE_KEY.match(rest)
            if not match:
                return None
            parts.append(match.group())
            rest = rest[match.end():]
        rest = rest.lstrip()
        if not rest:
            return parts
        if rest[0] != ".":
            return None
        rest = rest[1:]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """The lines of `text` that start outside any multi-line string or bracket (where a
    key or a table header can be), with their 1-based numbers."""
    found: list[tuple[int, str]] = []
    depth = 0  # open [ or { of values spanning lines
    quote = ""  # the open multi-line string's delimiter
    for number, line in enumerate(text.splitlines(), 1):
        if not quote and depth == 0:
            found.append((number, line))
        i = 0
        at_start = not quote and depth == 0
        while i < len(line):
            if quote:
                if line.startswith(quote, i) and (quote == "'''" or not _escaped(line, i)):
                    i += len(quote)
                    quote = ""
                else:
                    i += 1
                continue
            char = line[i]
            if char == "#":
                break
            if line.startswith(('"""', "'''"), i):
                quote = line[i:i + 3]
                i += 3
            elif char in "\"'":
                end = i + 1
                while end < len(line) and not (
                        line[end] == char and (char == "'" or not _escaped(line, end))):
                    end += 1
                i = end + 1
            elif char in "[{":
                # a table header's brackets at the start of a line are not a value
                if not (at_start and depth == 0 and "=" not in line[:i]):
                    depth += 1
                i += 1
            elif char in "]}":
                if depth:
                    depth -= 1
                i += 1
            else:
                i += 1
    return found


def _escaped(line: str, i: int) -> bool:
    backslashes = 0
    while i - backslashes - 1 >= 0 and line[i - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


# -- merging with the command line --------------------------------------------------------

def merge(project: Project | None, cli_args: object) -> ConnectSettings:
    """The settings of one run: the command line (`cli_args`, see the module docstring)
    over the project file over the defaults."""

    def given(name: str) -> object:
        return getattr(cli_args, name, None)

    local = given("local")
    if local is not None:
        local_root = Path(str(local)).expanduser().resolve()
        if project is not None and local_root != project.root.resolve():
            if not given("target"):
                raise ProjectError(
                    "mismatch", f"--local {local_root} is not the tree of {project.path} "
                    f"({project.root}); give a target too, or run in {project.root}",
                    project.path)
            project = None  # a target for another tree: that tree's file does not apply
    elif project is not None:
        local_root = project.root.resolve()
    else:
        local_root = Path.cwd().resolve()
    base = project if project is not None else Project(path=Path(PROJECT_FILE), root=local_root)

    given_targets = given("target")
    if isinstance(given_targets, str):
        given_targets = [given_targets]
    targets: tuple[tuple[str, str | None], ...] = (
        tuple((str(t), None) for t in _str_list(given_targets)) if given_targets
        else base.targets)
    target = targets[0][0] if targets else None
    if not target:
        where = f" and {project.path} sets no `target`" if project is not None else (
            f" and there is no {PROJECT_FILE} in this tree")
        raise ProjectError("no-target", f"no target given{where}: "
                           "give [user@]host:tree", project.path if project else None)

    ssh_config = given("ssh_config")
    if ssh_config is None:
        configs = list(base.ssh_config) if base.ssh_config is not None else None
    else:
        configs = [ssh_config] if isinstance(ssh_config, str) else _str_list(ssh_config)

    log: LogLevel = base.log
    if given("quiet"):
        log = "quiet"
    elif given("verbose"):
        log = "verbose"

    reconnect = _flag(given("reconnect"), given("no_reconnect"), base.reconnect)
    map_paths = _flag(given("map_paths"), given("no_map_paths"), base.map_paths)
    return ConnectSettings(
        target=target,
        local_root=local_root,
        ssh_config=configs,
        delete=_bool_or(given("delete"), base.delete),
        exclude=[*base.exclude, *_str_list(given("exclude") or [])],
        include_vcs=_bool_or(given("include_vcs"), base.include_vcs),
        accept_new_host_key=_bool_or(given("accept_new_host_key"), base.accept_new_host_key),
        step_ms=_int_or(given("step_ms"), base.step_ms),
        debounce_ms=_int_or(given("debounce_ms"), base.debounce_ms),
        reconnect=reconnect,
        lanes=_int_or(given("lanes"), base.lanes),
        log=log,
        map_paths=map_paths,
        pull_paths=base.pull_paths,
        pull_rewrite=base.pull_rewrite,
        targets=targets,
    )


def _flag(positive: object, negative: object, default: bool) -> bool:
    if positive is not None:
        return bool(positive)
    if negative:  # a store_true `--no-...` flag: None or False means not given
        return False
    return default


def _bool_or(value: object, default: bool) -> bool:
    return default if value is None else bool(value)


def _int_or(value: object, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an int option, got {value!r}")
    return value


def _str_list(value: object) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list option, got {value!r}")
    return [str(v) for v in value]
