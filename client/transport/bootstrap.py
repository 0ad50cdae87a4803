"""Starting the agent on a host that has nothing installed but python3.

The remote command is a short POSIX `sh` line that runs `python3 -c LOADER BUNDLE INITIAL`
(or `python`) and prints a clear error when neither exists. LOADER checks the interpreter's
version, decodes BUNDLE — base64 of zlib-compressed JSON mapping module names to sources —
installs an importer for it, and runs the agent on stdin/stdout. The loader takes the
current directory (`-c` puts it first on sys.path) out of the path, so that no file in the
remote home shadows a module it imports; and its importer is a plain finder and loader, not
an `importlib.abc` subclass: importing `importlib.abc` pulls in importlib.resources, pathlib,
tempfile and typing, about a sixth of the agent's start-up time (issue 10). The bundle carries the
agent, the protocol and msgpack's pure-Python modules (used only when the host has no
msgpack >= 1.0 of its own).

Everything travels inside the exec request itself, and so do the first bytes of the protocol
stream (INITIAL: the Hello, the ListTree and any operation already queued). OpenSSH opens a
session channel's window only once the command runs, so data sent on the channel costs a
round trip more; with the command line carrying it, the agent answers two round trips after
authentication (channel open, then exec). Linux limits one argument to 128 KiB; the bundle
(docstrings blanked) and INITIAL, capped at `MAX_INITIAL`, must fit in it together
(tests/test_bootstrap_size.py checks it); the rest of the stream goes on stdin.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import pkgutil
import shlex
import sys
import tokenize
import zlib
from functools import lru_cache
from pathlib import Path

import msgpack

import lsync.agent
import lsync.protocol

MIN_REMOTE_PYTHON = (3, 6)
NO_PYTHON_STATUS = 127
OLD_PYTHON_STATUS = 126

# Runs under any python that might be found, so it must parse on Python 2 as well; it uses
# double quotes only, because the whole of it travels inside single quotes.
LOADER = """
import sys
if sys.version_info < (3, 6):
    sys.stderr.write("lsync: the remote python is %s; lsync needs python >= 3.6\\n"
                     % sys.version.split()[0])
    sys.exit(126)
sys.path[:] = [p for p in sys.path if p]
import base64, importlib.machinery, json, os, zlib
sources = json.loads(zlib.decompress(base64.b64decode(sys.argv[1])).decode("utf-8"))
initial = base64.b64decode(sys.argv[2]) if len(sys.argv) > 2 else b""
class _Bundle(object):
    def __init__(self, names):
        self.names = names
    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=sources[name][0])
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        is_pkg, code = sources[module.__name__]
        if is_pkg:
            module.__path__ = []
        exec(compile(code, "<lsync-bundle>/" + module.__name__, "exec"), module.__dict__)
own = set(n for n in sources if n == "lsync" or n.startswith("lsync."))
sys.meta_path.insert(0, _Bundle(own))
try:
    if os.environ.get("LSYNC_BUNDLED_MSGPACK"):
        raise ImportError
    import msgpack
    if msgpack.version < (1, 0):
        raise ImportError
except ImportError:
    for n in [n for n in sys.modules if n == "msgpack" or n.startswith("msgpack.")]:
        del sys.modules[n]
    os.environ["MSGPACK_PUREPYTHON"] = "1"
    sys.meta_path.insert(0, _Bundle(set(n for n in sources if n.split(".")[0] == "msgpack")))
from lsync.agent.main import main
main(initial)
"""

_SHELL = (
    'for p in python3 python; do '
    'if command -v "$p" >/dev/null 2>&1; then exec "$p" -c "$0" "$1" "$2"; fi; '
    'done; '
    'echo "lsync: no python3 or python on the remote host (lsync needs python >= 3.6)" >&2; '
    "exit 127"
)


# Protocol bytes carried on the command line, before base64 (the rest follows on stdin).
# What is written before the agent starts is its Hello and ListTree, a few hundred bytes;
# 32 KiB leaves the agent's bundle (56 KB of base64 with the journal's intents and the
# root lock) room to grow under Linux's 128 KiB per argument.
MAX_INITIAL = 32 << 10


def remote_command(initial: bytes = b"") -> str:
    """The command line for an SSH exec channel; any POSIX or fish login shell runs it."""
    return " ".join(shlex.quote(part) for part in (
        "sh", "-c", _SHELL, LOADER, bundle_b64(), base64.b64encode(initial).decode("ascii")))


def local_argv(initial: bytes = b"", python: str | None = None) -> list[str]:
    """argv for running the agent through the same loader as a local subprocess."""
    return [python or sys.executable, "-c", LOADER, bundle_b64(),
            base64.b64encode(initial).decode("ascii")]


def without_docstrings(source: str) -> str:
    """`source` with its docstrings blanked out (lines kept, so tracebacks still point at
    the right line): the command line that carries the bundle is limited to 128 KiB."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        start, end = first.lineno - 1, (first.end_lineno or first.lineno) - 1
        indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
        lines[start] = f"{indent}pass\n" if len(node.body) == 1 else "\n"
        for index in range(start + 1, end + 1):
            lines[index] = "\n"
    return "".join(lines)


def without_comments(source: str) -> str:
    """`source` with its comments cut off (lines kept, as `without_docstrings`)."""
    lines = source.splitlines(keepends=True)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            lines[row - 1] = lines[row - 1][:column].rstrip() + "\n"
    return "".join(lines)


def _stripped(source: str) -> str:
    return without_comments(without_docstrings(source))


def _package_sources(package: object, prefix: str) -> dict[str, tuple[bool, str]]:
    found: dict[str, tuple[bool, str]] = {}
    directory = Path(package.__file__).parent  # type: ignore[attr-defined]
    found[prefix] = (True, _stripped((directory / "__init__.py").read_text(encoding="utf-8")))
    for info in pkgutil.iter_modules([str(directory)]):
        if info.ispkg or info.name.startswith("__"):
            continue
        source = (directory / f"{info.name}.py").read_text(encoding="utf-8")
        found[f"{prefix}.{info.name}"] = (False, _stripped(source))
    return found


@lru_cache(maxsize=1)
def bundle_b64() -> str:
    """The agent's sources, compressed and base64-encoded for the command line."""
    sources: dict[str, tuple[bool, str]] = {"lsync": (True, "")}
    sources.update(_package_sources(lsync.agent, "lsync.agent"))
    sources.update(_package_sources(lsync.protocol, "lsync.protocol"))
    msgpack_dir = Path(msgpack.__file__).parent
    sources["msgpack"] = (True, (msgpack_dir / "__init__.py").read_text(encoding="utf-8"))
    for name in ("exceptions", "ext", "fallback"):
        text = (msgpack_dir / f"{name}.py").read_text(encoding="utf-8")
        sources[f"msgpack.{name}"] = (False, text)
    payload = zlib.compress(json.dumps(sources).encode("utf-8"), 9)
    return base64.b64encode(payload).decode("ascii")
