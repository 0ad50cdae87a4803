"""The agent and protocol tests under every CPython >= 3.6 on this machine.

The agent runs on whatever python3 the remote host has, so `tests/compat` (stdlib only) is
run by `tests/compat/run.py` under each interpreter found: pyenv's versions and the
`python3.X` commands on PATH. msgpack's pure-Python modules travel with it, as they do with
the real agent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

REPO = Path(__file__).resolve().parent.parent


def _interpreters() -> dict[str, str]:
    found: dict[str, str] = {}
    candidates = [sys.executable]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += [str(p) for p in sorted(pyenv.glob("3.*/bin/python3"))]
    candidates += [w for v in range(6, 15) if (w := shutil.which(f"python3.{v}") or "")]
    for exe in candidates:
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if re.fullmatch(r"3\.\d+", out) and int(out.split(".")[1]) >= 6:
            found.setdefault(out, exe)
    return found


def _minor(version: str) -> int:
    return int(version.split(".")[1])


INTERPRETERS = _interpreters()
VERSIONS: list[str] = sorted(INTERPRETERS.keys(), key=_minor)


@pytest.mark.parametrize("version", VERSIONS)
def test_agent_and_protocol_tests_pass_under_python(version: str) -> None:
    result = subprocess.run(
        [INTERPRETERS[version], str(REPO / "tests" / "compat" / "run.py")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LSYNC_MSGPACK_SOURCE": str(Path(msgpack.__file__).parent)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r" [1-9]\d* passed, 0 failed$", result.stdout.strip()), result.stdout[-500:]
