"""The agent's bootstrap fits on one command line, with room to spare.

Linux refuses one argument longer than 128 KiB (MAX_ARG_STRLEN); the bundle of the agent's
sources and the first protocol bytes (up to MAX_INITIAL) travel in one. Growing the agent
past that would break every start, so the margin is checked here, not discovered remotely.
"""

from __future__ import annotations

import base64
import json
import zlib

from lsync.client.transport import bootstrap

MAX_ARG_STRLEN = 128 * 1024
MARGIN = 8 * 1024  # room left for the agent to grow before this test asks for a decision


def test_remote_command_with_the_largest_initial_stream_fits_in_one_argument() -> None:
    command = bootstrap.remote_command(b"\xff" * bootstrap.MAX_INITIAL)
    assert len(command.encode()) < MAX_ARG_STRLEN - MARGIN


def test_bundled_sources_without_docstrings_still_compile_and_keep_their_lines() -> None:
    sources = json.loads(zlib.decompress(base64.b64decode(bootstrap.bundle_b64())))
    assert "lsync.agent.service" in sources and "lsync.protocol.messages" in sources
    for name, (_is_package, source) in sources.items():
        compile(source, name, "exec")
    original = "def f():\n    '''doc\n    more'''\n    return 1\n\n\nclass C:\n    'x'\n"
    stripped = bootstrap.without_docstrings(original)
    assert stripped.count("\n") == original.count("\n")
    assert "doc" not in stripped and "'x'" not in stripped
    namespace: dict[str, object] = {}
    exec(compile(stripped, "stripped", "exec"), namespace)
    assert callable(namespace["f"])


def test_comments_are_cut_but_lines_and_hashes_in_strings_kept() -> None:
    original = ("x = '# not a comment'  # a comment\n"
                "# a whole line\n"
                "def f(a,  # inside brackets\n"
                "      b):\n"
                "    return a + b  # done\n")
    stripped = bootstrap.without_comments(original)
    assert stripped.count("\n") == original.count("\n")
    assert "comment" not in stripped.replace("'# not a comment'", "")
    assert "'# not a comment'" in stripped
    namespace: dict[str, object] = {}
    exec(compile(stripped, "stripped", "exec"), namespace)
    assert namespace["x"] == "# not a comment"
