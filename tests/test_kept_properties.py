"""Property test of issue 18 part 2: remote edits of what lsync wrote are kept, never
overwritten or deleted without a word, and the local version ends on the remote.

The client core is wired as `lsync connect` wires it (a `Session`'s rules, reporter and
`on_kept`, an `AgentLink` and a `SyncEngine`) over `MemoryAgentStream` (tests/memagent.py:
the real `AgentService`, in this process). Hypothesis generates local saves (in place or
by rename, small and big enough for deltas), local deletes of a file or of a whole
directory, and remote edits of the files lsync wrote there — rewritten (a new inode, as
editors save), appended to in place, changed at the same size with the mtime put back,
replaced by a symlink, removed — made either between a local save and its sync, or in
flight: right before the agent handles the next operation on that path, after the
client decided what to send (the race a slow link opens). The agent's hook records, per
path, the order of remote edits and of operations that replace or delete it. After the
last step every path still edited remotely gets one more local save, and the test checks:

(a) 100% of remote edits were kept: every remote version that lsync replaced or deleted
    (it was not overwritten by a later remote edit of the same path first) is still in
    the remote tree or kept under KEPT_DIR, byte for byte (a link: by target);
(b) no keep without an edit: every kept copy holds a remote edit;
(c) every keep was told: one `note kept remote edit of PATH as KEPT` per kept copy, and
    the session's list (what `lsync status` shows) names exactly the kept copies;
(d) the local version is on the remote: the remote tree, the kept tree aside, equals the
    local tree; no failure but the fallbacks of a delta against an edited base; no
    internal error of the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsync.client.errors import LinkBroken
from lsync.client.local.hashcache import HashCache
from lsync.client.local.scanner import scan_tree
from lsync.client.local.watcher import WatchBatch
from lsync.client.remote.engine import SyncEngine
from lsync.client.session import Options, Session
from lsync.client.target import Target
from lsync.client.transport.link import AgentLink
from lsync.protocol import PROTOCOL_VERSION, hashing, packing
from lsync.protocol import messages as m
from tests.memagent import MemoryAgentStream
from tests.test_sync_properties import RecordingReporter

TIMEOUT = 20.0
TARGETS = ("a.c", "d/b.c", "d/e/c.h")
EDITS = ("rewrite", "append", "same-size-mtime", "symlink", "remove")
FALLBACKS = ("not the expected base", "did not give the expected content",
             "no longer has the expected content")
Version = tuple[str, bytes]  # ("file", content) or ("link", target)


def _touched(message: m.Message) -> list[str]:
    """The paths an operation replaces or deletes (a rename: both ends)."""
    if isinstance(message, m.WriteBatch):
        return [item[1] for item in message.files]
    if isinstance(message, m.Rename):
        return [message.src, message.dst]
    if isinstance(message, m.Copy):
        return [message.dst]
    if isinstance(message, m.WriteFile | m.WriteDelta | m.Delete | m.Symlink):
        return [message.path]
    return []


class HookedAgent(MemoryAgentStream):
    """The in-memory agent, with remote edits made right before it handles an operation
    on their path, and a log of edits and operations per path."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(use_cache=False)
        self.rig = rig

    def _handle(self, message: m.Message) -> None:
        for path in _touched(message):
            how = self.rig.in_flight.pop(path, None)
            if how is not None:
                self.rig.edit_remote(path, how)
            self.rig.events.setdefault(path, []).append(("op", None))
        super()._handle(message)


class Rig:
    def __init__(self, base: Path) -> None:
        self.local = base / "local"
        self.remote = base / "remote"
        self.local.mkdir()
        (self.local / "keep").write_text("the local root is never empty\n")
        self.reporter = RecordingReporter()
        self.session = Session(Options(Target(None, None, str(self.remote)), self.local),
                               self.reporter)
        self.in_flight: dict[str, str] = {}  # path -> remote edit made before its next op
        # path -> ("remote", version or None when removed) / ("op", None), in order
        self.events: dict[str, list[tuple[str, Version | None]]] = {}
        self.edits = 0
        self.stream: HookedAgent | None = None
        self.link: AgentLink | None = None
        self.engine: SyncEngine | None = None
        self.runner: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        stream = self.stream = HookedAgent(self)
        link = self.link = AgentLink(stream)
        link.on_kept = self.session._on_kept
        link.start(m.Hello(PROTOCOL_VERSION, {"hash": [hashing.XXH3_128],
                                              "compression": packing.available_packings()},
                           str(self.remote), {"create_root": True}))
        entries: list[list[Any]] = []

        async def manifest() -> None:
            async for batch in link.list_tree():
                entries.extend(batch)

        listing = asyncio.ensure_future(manifest())
        welcome = await link.welcome(TIMEOUT)
        cache = HashCache(welcome.chosen["hash"])
        local = await asyncio.to_thread(scan_tree, self.local, self.session.rules, cache)
        await asyncio.wait_for(listing, TIMEOUT)
        engine = self.engine = SyncEngine(link, self.local, self.session.rules, cache,
                                          self.session.reporter)
        await engine.initial_sync(local, entries)
        self.session._set_engine(engine)
        self.runner = asyncio.ensure_future(engine.run())
        await self.quiet()

    async def close(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkBroken):
                await self.runner
        if self.link is not None:
            await self.link.close("test over")

    async def quiet(self) -> None:
        assert self.engine is not None and self.runner is not None
        idle = asyncio.ensure_future(self.engine.wait_idle())
        done, _ = await asyncio.wait({idle, self.runner}, timeout=TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        if self.runner in done:
            self.runner.result()
            raise AssertionError("the engine stopped")
        assert done, "the engine is not idle"

    def changed(self, paths: list[str]) -> None:
        files = frozenset(p for p in paths if (self.local / p).is_file())
        self.session._on_batch(WatchBatch(list(paths), frozenset(), files))

    # -- the two sides ------------------------------------------------------------------
    def save_local(self, path: str, version: int, size: int, by_rename: bool) -> None:
        full = self.local / path
        full.parent.mkdir(parents=True, exist_ok=True)
        data = _text(path, size) + f"/* local version {version} */\n".encode()
        if by_rename:
            temp = full.with_name(f".{full.name}.swp")
            temp.write_bytes(data)
            os.rename(temp, full)
        else:
            full.write_bytes(data)
        self.changed([path])

    def delete_local(self, path: str) -> None:
        full = self.local / path
        if full.is_dir():
            gone = [p.relative_to(self.local).as_posix() for p in full.rglob("*")]
            shutil.rmtree(full)
            self.changed([path, *gone])
        elif full.exists():
            full.unlink()
            self.changed([path])

    def edit_remote(self, path: str, how: str) -> None:
        """Edit the remote file `path` as someone on the build host would (only a regular
        file: what lsync wrote there)."""
        full = self.remote / path
        if full.is_symlink() or not full.is_file():
            return
        self.edits += 1
        marker = f"/* remote edit {self.edits} */\n".encode()
        version: Version | None
        if how == "rewrite":
            temp = full.with_name(f"{full.name}.tmp-edit")
            temp.write_bytes(full.read_bytes() + marker)
            os.rename(temp, full)
            version = ("file", full.read_bytes())
        elif how == "append":
            with open(full, "ab") as handle:
                handle.write(marker)
            version = ("file", full.read_bytes())
        elif how == "same-size-mtime":
            before = full.stat()
            data = bytearray(full.read_bytes() or b"\0\0")
            # Two bytes no text holds, the second one this edit's own: an edit never gives
            # back an earlier version (flipping one bit per edit did: three edits XORed 1, 2
            # and 3 into the same byte and restored what lsync had written).
            mid = max(0, len(data) // 2 - 1)
            data[mid:mid + 2] = bytes([0xFE, 1 + self.edits % 254])[:len(data) - mid]
            with open(full, "r+b") as handle:
                handle.write(bytes(data))
            os.utime(full, ns=(before.st_atime_ns, before.st_mtime_ns))
            version = ("file", bytes(data))
        elif how == "symlink":
            full.unlink()
            os.symlink(f"../elsewhere-{self.edits}", full)
            version = ("link", f"../elsewhere-{self.edits}".encode())
        else:
            full.unlink()
            version = None
        self.events.setdefault(path, []).append(("remote", version))

    # -- the checks ---------------------------------------------------------------------
    def problems(self) -> list[str]:
        kept_dir = self.remote / m.KEPT_DIR
        kept = _versions(kept_dir, kept_dir.parent.parent)
        remote = _versions(self.remote, self.remote, skip=m.KEPT_DIR.split("/")[0])
        local = _versions(self.local, self.local)
        out: list[str] = []
        everywhere = set(kept.values()) | set(remote.values())
        edits: set[Version] = set()
        for path, events in sorted(self.events.items()):
            for (what, version), after in zip(events, [*events[1:], ("end", None)], strict=True):
                if what != "remote" or version is None:
                    continue
                edits.add(version)
                if after[0] != "remote" and version not in everywhere:
                    out.append(f"(a) a remote edit of {path} is lost: {_show(version)}")
        for kept_as, version in sorted(kept.items()):
            if version not in edits:
                out.append(f"(b) {kept_as} holds no remote edit: {_show(version)}")
        told = sorted(n for n in self.reporter.notes if n.startswith("kept remote edit of "))
        on_disk = sorted(f"kept remote edit of {k.split('/', 3)[3]} as {k}" for k in kept)
        if told != on_disk:
            out.append(f"(c) notes {told} but kept on disk {on_disk}")
        listed = sorted(str(e["kept_as"]) for e in self.session.progress.kept_edits)
        if listed != sorted(kept):
            out.append(f"(c) the status lists {listed}, the disk holds {sorted(kept)}")
        if remote != local:
            out.append(f"(d) remote {_summary(remote)} != local {_summary(local)}")
        for path, message in self.reporter.failures:
            if not any(text in message for text in FALLBACKS):
                out.append(f"(d) failure: {path}: {message}")
        assert self.stream is not None
        out.extend(f"(d) agent internal error: {e}" for e in self.stream.internal_errors)
        return out


def _text(path: str, size: int) -> bytes:
    line = f"int {path.replace('/', '_').replace('.', '_')}(void) {{ return 0; }}\n".encode()
    return (line * (size // len(line) + 1))[:size]


def _versions(top: Path, relative_to: Path, skip: str = "") -> dict[str, Version]:
    """Files (by content) and links (by target) below `top`, by path from `relative_to`."""
    found: dict[str, Version] = {}
    if not top.is_dir():
        return found
    for base, dirs, files in os.walk(top):
        if skip and Path(base) == top and skip in dirs:
            dirs.remove(skip)
        for name in files + [d for d in dirs if Path(base, d).is_symlink()]:
            full = Path(base, name)
            rel = full.relative_to(relative_to).as_posix()
            if stat.S_ISLNK(full.lstat().st_mode):
                found[rel] = ("link", os.readlink(full).encode())
            else:
                found[rel] = ("file", full.read_bytes())
    return found


def _show(version: Version) -> str:
    return f"{version[0]} {version[1][-40:]!r}"


def _summary(tree: dict[str, Version]) -> str:
    return str({path: _show(version) for path, version in sorted(tree.items())})


# -- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Save:
    target: str
    size: int
    by_rename: bool


@dataclass(frozen=True)
class Delete:
    target: str  # a file of TARGETS, or "d": the directory with two of them


@dataclass(frozen=True)
class Edit:
    target: str
    how: str
    in_flight: bool  # made right before the agent's next operation on the path


Step = Save | Delete | Edit

STEPS = st.lists(st.one_of(
    st.builds(Save, st.sampled_from(TARGETS), st.sampled_from([0, 40, 3000, 40_000]),
              st.booleans()),
    st.builds(Delete, st.sampled_from([*TARGETS, "d"])),
    st.builds(Edit, st.sampled_from(TARGETS), st.sampled_from(EDITS), st.booleans()),
    st.builds(Edit, st.sampled_from(TARGETS), st.sampled_from(EDITS), st.booleans()),
), min_size=1, max_size=12)


async def _scenario(base: Path, steps: list[Step]) -> list[str]:
    rig = Rig(base)
    for number, target in enumerate(TARGETS):
        rig.save_local(target, number, 3000, False)
    await rig.connect()
    try:
        version = 100
        for step in steps:
            if isinstance(step, Save):
                version += 1
                rig.save_local(step.target, version, step.size, step.by_rename)
            elif isinstance(step, Delete):
                rig.delete_local(step.target)
            elif step.in_flight:
                rig.in_flight[step.target] = step.how
                continue  # made when the agent meets the path (if it does before the end)
            else:
                rig.edit_remote(step.target, step.how)
                continue  # the sync waits for the next local change
            await rig.quiet()
        # Every path edited last on the remote gets one more local save; in-flight edits
        # not made yet are made by it.
        for path in sorted(set(rig.in_flight) | {p for p, e in rig.events.items()
                                                  if e and e[-1][0] == "remote"}):
            version += 1
            rig.save_local(path, version, 200, False)
        await rig.quiet()
        rig.in_flight.clear()
        return rig.problems()
    finally:
        await rig.close()


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=STEPS)
def test_every_remote_edit_racing_local_saves_is_kept_and_the_local_version_wins(
        steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory(prefix="lsync-kept-") as base:
        problems = asyncio.run(asyncio.wait_for(_scenario(Path(base), steps), 60))
    assert not problems, "\n".join(problems)
