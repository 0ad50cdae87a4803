#!/usr/bin/env bash
# The test command (README: `bash tests/run.sh`). On a fresh Debian machine it installs what
# the tests need — openssh-server, rsync, cmake, clangd and the benchmark peers through
# apt-get, a virtual environment with lsync installed by `pip install .` — then runs ruff,
# mypy and pytest
# (end-to-end tests against a private sshd on 127.0.0.1, and the agent/protocol tests under
# every CPython >= 3.6 found on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
command -v inotifywait >/dev/null || missing+=(inotify-tools)
command -v lsyncd >/dev/null || missing+=(lsyncd)
command -v cmake >/dev/null || missing+=(cmake)  # the pull recipe (tests/test_e2e_pull.py)
command -v clangd >/dev/null || missing+=(clangd)
python=""
for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null &&
        "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        python=$(command -v "$candidate")
        break
    fi
done
[ -n "$python" ] || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    [ -n "$python" ] || python=$(command -v python3)
fi

venv=${LSYNC_VENV:-$repo/.venv}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Pinned versions (tests/constraints.txt), the build's own setuptools and wheel included
# (PIP_CONSTRAINT reaches pip's isolated build environment too).
PIP_CONSTRAINT="$repo/tests/constraints.txt" \
    "$venv/bin/python" -m pip install -q --disable-pip-version-check ".[test]"

echo "== ruff"
"$venv/bin/ruff" check client agent protocol tests benchmarks
echo "== mypy"
"$venv/bin/mypy" -p lsync.client -p lsync.agent -p lsync.protocol
"$venv/bin/mypy" tests benchmarks
echo "== pytest"
exec "$venv/bin/python" -m pytest -q "$@"
