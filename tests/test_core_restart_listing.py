"""Restarts with the kept listing: the delta applied to the client's copy IS the manifest.

Against the real agent service (in memory, tests/memagent.py): between sessions others
change the remote (files edited, made, deleted, directories replaced, links retargeted,
modes changed) and the local tree changes too; whatever happened, the manifest a restart
builds from its copy and the agent's delta equals the whole manifest, and so do the
engine's model and the paths it queues. A corrupt or foreign copy on either side gives the
whole manifest, never a wrong one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsync.agent.listing import KeptListing
from lsync.agent.records import DigestRecord
from lsync.client.local.hashcache import HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.scanner import scan_tree
from lsync.client.remote import planner, remotelisting
from lsync.client.remote.model import RemoteModel
from lsync.client.transport.link import AgentLink
from lsync.protocol import PROTOCOL_VERSION, hashing
from lsync.protocol import messages as m
from tests.memagent import MemoryAgentStream

TARGET = "memory:remote"
NAMES = ["a.c", "b.h", "d", "e/f.c", "e/g", "e/h/i.c", "k"]


async def _fetch(remote: Path, held: remotelisting.Listing | None) -> remotelisting.Listing:
    stream = MemoryAgentStream()
    link = AgentLink(stream)
    link.start(m.Hello(PROTOCOL_VERSION, {"hash": [hashing.BLAKE2B_128]}, str(remote),
                       {"create_root": True}))
    answer = asyncio.ensure_future(remotelisting.fetch(
        link.listing(held.generation if held is not None else ""), held))
    await link.welcome(10)
    listing = await asyncio.wait_for(answer, 10)
    await link.close("done")
    return listing


def _session(remote: Path, copy: Path) -> remotelisting.Listing:
    """One start as Session._one_connection makes it: the copy named, the answer kept."""
    return _start(remote, copy)[1]


def _start(remote: Path, copy: Path
           ) -> tuple[remotelisting.Listing | None, remotelisting.Listing]:
    held = remotelisting.load(copy, TARGET)
    listing = asyncio.run(_fetch(remote, held))
    if listing.changed and listing.generation:
        remotelisting.save(copy, TARGET, listing)
    return held, listing


def _model_view(model: RemoteModel) -> tuple[object, ...]:
    return (model.entries, {k: v for k, v in model.children.items() if v}, model.by_digest)


def _whole(remote: Path) -> dict[str, Any]:
    return asyncio.run(_fetch(remote, None)).entries


def _change(root: Path, step: tuple[str, int]) -> None:
    """One change by someone else: write, grow, delete, make a directory, link, chmod."""
    action, index = step
    path = root / NAMES[index % len(NAMES)]
    if action == "delete":
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        return
    for parent in reversed(path.relative_to(root).parents[:-1]):
        here = root / parent
        if here.is_symlink() or (here.exists() and not here.is_dir()):
            here.unlink()
        here.mkdir(exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    if action == "write":
        if path.is_symlink():
            path.unlink()
        path.write_bytes(b"x" * (index + 1))
    elif action == "mkdir":
        if path.exists() or path.is_symlink():
            path.unlink()
        path.mkdir()
    elif action == "link":
        if path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(f"target{index}")
    elif action == "chmod" and path.exists() and not path.is_symlink():
        path.chmod(0o600 if index % 2 else 0o644)


STEPS = st.lists(st.tuples(st.sampled_from(["write", "delete", "mkdir", "link", "chmod"]),
                           st.integers(0, 20)), max_size=8)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME for the agent's record and kept listing, $XDG_CACHE_HOME for the client."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "client-cache"))
    return home


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sessions=st.lists(st.tuples(STEPS, STEPS), min_size=1, max_size=4))
def test_a_restart_builds_the_whole_manifest_from_its_copy_whatever_changed_between(
        home: Path, sessions: list[tuple[list[tuple[str, int]], list[tuple[str, int]]]]
) -> None:
    base = Path(tempfile.mkdtemp(dir=home))  # (the fixture is shared by the examples)
    remote, local = base / "remote", base / "local"
    remote.mkdir(parents=True)
    local.mkdir()
    copy = base / "copy.remote"
    _session(remote, copy)
    for remote_steps, local_steps in sessions:
        for step in remote_steps:
            _change(remote, step)
        for step in local_steps:
            _change(local, step)
        held, listing = _start(remote, copy)
        whole = _whole(remote)
        assert listing.entries == whole
        # The engine's view is the same from either: its model and the paths it queues.
        rules = IgnoreRules(local)
        cache = HashCache(hashing.BLAKE2B_128)
        scanned = scan_tree(local, rules, cache, on_error=lambda rel, exc: None)
        models = [planner.load_manifest(list(entries.values()), scanned, rules.is_ignored)
                  for entries in (listing.entries, whole)]
        assert sorted(models[0][1]) == sorted(models[1][1])
        # A model of the copy held, brought up to date with the delta, is the same too.
        if held is not None and listing.delta is not None:
            prepared = planner.load_manifest(list(held.entries.values()), scanned,
                                             rules.is_ignored)
            if planner.load_changes(*prepared, *listing.delta, scanned, rules.is_ignored):
                assert _model_view(prepared[0]) == _model_view(models[1][0])
                assert sorted(prepared[1]) == sorted(models[1][1])
        queued = [planner.differences(scanned, model, rules.is_ignored, False)
                  for model, _ in models]
        assert queued[0] == queued[1]


def _agent_listing_path(remote: Path) -> Path:
    record = DigestRecord.default_path(str(remote), hashing.BLAKE2B_128)
    found = KeptListing.beside(record)
    assert found is not None
    return Path(found)


@pytest.mark.parametrize("damage", ["agent-corrupt", "agent-gone", "client-corrupt",
                                    "client-foreign", "client-other-generation"])
def test_a_doubtful_copy_on_either_side_gives_the_whole_manifest(
        home: Path, damage: str) -> None:
    remote = home / "remote"
    (remote / "e").mkdir(parents=True)
    (remote / "a.c").write_bytes(b"a")
    (remote / "e" / "f.c").write_bytes(b"f")
    copy = home / "copy.remote"
    first = _session(remote, copy)
    assert first.generation and not _session(remote, copy).changed  # nothing changed
    (remote / "e" / "f.c").write_bytes(b"changed by someone else")  # (the copy is stale)
    agent = _agent_listing_path(remote)
    if damage == "agent-corrupt":
        data = bytearray(agent.read_bytes())
        data[-5] ^= 0xFF
        agent.write_bytes(bytes(data))
    elif damage == "agent-gone":
        agent.unlink()
    elif damage == "client-corrupt":
        data = bytearray(copy.read_bytes())
        data[-5] ^= 0xFF
        copy.write_bytes(bytes(data))
    elif damage == "client-foreign":
        held = remotelisting.load(copy, TARGET)
        assert held is not None
        remotelisting.save(copy, "another:target", held)
    else:
        held = remotelisting.load(copy, TARGET)
        assert held is not None
        held.generation = os.urandom(8).hex()
        remotelisting.save(copy, TARGET, held)
    listing = _session(remote, copy)
    assert listing.entries == _whole(remote)
    assert listing.entries["e/f.c"][2] == len(b"changed by someone else")
    assert _session(remote, copy).changed is False  # and the copies agree again
