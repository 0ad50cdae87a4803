"""A directory the agent cannot make on its way to a file is a clear refusal, not a bug.

A write into a new directory makes the missing directories above it (ConfinedRoot.parent_fd).
On a read-only or full file system that mkdir fails; the failure used to escape as a raw
OSError, which the agent answered "internal agent error: OSError" with a traceback in its
log (the torture's read-only fault wrote thousands of them). It must be answered with the
code of the cause, for a file written at once and for a batch in the write pool alike.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from lsync.agent.writer import WritePool
from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode
from tests.test_agent_crash import _agent
from tests.test_agent_crash import home as home  # (a fixture)

CAUSES = [(errno.EROFS, ErrorCode.PERMISSION_DENIED), (errno.ENOSPC, ErrorCode.NO_SPACE)]


def _refuse_mkdir(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    def refused(*args: Any, **kwargs: Any) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "mkdir", refused)


def _errors(sent: list[Any]) -> dict[int, tuple[int, str]]:
    return {x.seq: (x.code, x.message) for x in sent if isinstance(x, m.Error)}


@pytest.mark.parametrize(("err", "code"), CAUSES)
def test_a_file_whose_directory_cannot_be_made_is_refused_with_the_cause(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int,
        code: ErrorCode) -> None:
    service, sent = _agent(tmp_path / "remote")
    try:
        _refuse_mkdir(monkeypatch, err)
        service.handle(m.WriteFile(5, "new/dir/f.c", 0o644, 0, b"int f;\n", True))
        assert _errors(sent)[5][0] == int(code), sent
        assert "make directory new" in _errors(sent)[5][1]
    finally:
        monkeypatch.undo()
        service.close()
    assert not (tmp_path / "remote/new").exists()


@pytest.mark.parametrize(("err", "code"), CAUSES)
def test_a_pooled_batch_whose_directory_cannot_be_made_is_refused_with_the_cause(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int,
        code: ErrorCode) -> None:
    service, sent = _agent(tmp_path / "remote", WritePool())
    try:
        _refuse_mkdir(monkeypatch, err)
        service.handle(m.WriteBatch([[5, "new/a.c", 0o644, 3], [6, "top.c", 0o644, 3]],
                                    b"a;\nt;\n", 0))
        service.drain_pool()
        errors = _errors(sent)
        assert errors[5][0] == int(code) and 6 not in errors, sent
        assert (tmp_path / "remote/top.c").read_bytes() == b"t;\n"
    finally:
        monkeypatch.undo()
        service.close()
