"""Starting the agent on a host that has nothing installed but python3.

The remote command is a short POSIX `sh` line that runs `python3 -c LOADER` (or `python`)
and prints a clear error when neither exists. LOADER, small enough to pass on the command
line, checks the interpreter's version, reads one bundle from stdin — a header line
`LSYNC-BUNDLE <length>` and zlib-compressed JSON mapping module names to sources — installs
an importer for it, and runs the agent on the same stdin/stdout. The bundle carries the
agent, the protocol and msgpack's pure-Python modules (used only when the host has no
msgpack >= 1.0 of its own). The loader reads stdin with os.read so that no byte of the
protocol stream behind the bundle is swallowed by a buffer.
"""

from __future__ import annotations

import json
import pkgutil
import shlex
import sys
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
import importlib.abc, importlib.util, json, os, zlib
def _read(n):
    parts = []
    while n > 0:
        b = os.read(0, n)
        if not b:
            sys.stderr.write("lsync: the agent bundle was cut short\\n")
            sys.exit(125)
        parts.append(b)
        n -= len(b)
    return b"".join(parts)
head = b""
while not head.endswith(b"\\n") and len(head) < 64:
    head += _read(1)
magic, size = head.split()
assert magic == b"LSYNC-BUNDLE"
sources = json.loads(zlib.decompress(_read(int(size))).decode("utf-8"))
class _Bundle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names):
        self.names = names
    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=sources[name][0])
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
main()
"""

_SHELL = (
    'for p in python3 python; do '
    'if command -v "$p" >/dev/null 2>&1; then exec "$p" -c "$0"; fi; '
    'done; '
    'echo "lsync: no python3 or python on the remote host (lsync needs python >= 3.6)" >&2; '
    "exit 127"
)


def remote_command() -> str:
    """The command line for an SSH exec channel; any POSIX or fish login shell runs it."""
    return f"sh -c {shlex.quote(_SHELL)} {shlex.quote(LOADER)}"


def local_argv(python: str | None = None) -> list[str]:
    """argv for running the agent through the same loader as a local subprocess."""
    return [python or sys.executable, "-c", LOADER]


def _package_sources(package: object, prefix: str) -> dict[str, tuple[bool, str]]:
    found: dict[str, tuple[bool, str]] = {}
    directory = Path(package.__file__).parent  # type: ignore[attr-defined]
    found[prefix] = (True, (directory / "__init__.py").read_text(encoding="utf-8"))
    for info in pkgutil.iter_modules([str(directory)]):
        if info.ispkg or info.name.startswith("__"):
            continue
        source = (directory / f"{info.name}.py").read_text(encoding="utf-8")
        found[f"{prefix}.{info.name}"] = (False, source)
    return found


@lru_cache(maxsize=1)
def bundle() -> bytes:
    """The header line and compressed sources the loader expects on stdin."""
    sources: dict[str, tuple[bool, str]] = {"lsync": (True, "")}
    sources.update(_package_sources(lsync.agent, "lsync.agent"))
    sources.update(_package_sources(lsync.protocol, "lsync.protocol"))
    msgpack_dir = Path(msgpack.__file__).parent
    sources["msgpack"] = (True, (msgpack_dir / "__init__.py").read_text(encoding="utf-8"))
    for name in ("exceptions", "ext", "fallback"):
        text = (msgpack_dir / f"{name}.py").read_text(encoding="utf-8")
        sources[f"msgpack.{name}"] = (False, text)
    payload = zlib.compress(json.dumps(sources).encode("utf-8"), 9)
    return b"LSYNC-BUNDLE %d\n" % len(payload) + payload
