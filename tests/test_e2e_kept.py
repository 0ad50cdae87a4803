"""End to end (issue 18 part 2): remote edits racing local saves, over the real sshd and the
delay proxy (one-way delay D), are all kept and none overwritten without a word.

`lsync connect` syncs a small C tree through the proxy. Each round edits some files that
lsync wrote on the remote, the way someone in an ssh window would (an editor's save by
rename, an append in place, a same-size change with the mtime put back, the file replaced
by a symlink), and races each edit with a local save of the same file: the remote edit
comes either just before the save, or while the save is in flight (at most D/2 after it:
its write cannot reach the agent before D, so the edit is always there first). Some files
are deleted locally instead of saved, some edited remotely with no local save until the next
round. After each round `lsync flush` returns 0 and then: every remote edit that lsync replaced or
deleted is kept under KEPT_DIR byte for byte, an edit with no local save is untouched where
it was, the remote (kept tree aside) equals the local tree but for those, and the log holds
one `note kept remote edit of PATH as KEPT` per kept copy. `lsync status --json` lists every
kept copy, `lsync status` says how many, and a new session lists them again from the agent;
`lsync pull --kept PATH` brings the newest one back beside PATH, and it is never pushed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.testbed.sshd import PrivateSshd
from tests.conftest import LSYNC, LsyncProcess, counting_link_to, snapshot

D = 0.05  # one-way delay of the proxy, seconds
FILES = [f"src/f{i}.c" for i in range(8)] + [f"include/h{i}.h" for i in range(4)]
KEPT = ".lsync/kept"
ROUNDS = 8


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LSYNC + list(args), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def _content(path: str, version: int) -> bytes:
    line = f"int {path.replace('/', '_').replace('.', '_')}(void) {{ return {version}; }}\n"
    return line.encode() * 40 + f"/* local version {version} */\n".encode()


def _save(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.swp")
    temp.write_bytes(data)
    os.rename(temp, path)


def _edit_remote(path: Path, how: str, number: int) -> tuple[str, bytes]:
    """Edit a remote file as someone on the build host would; what is there after."""
    marker = f"/* remote edit {number} */\n".encode()
    if how == "rename":
        _save(path, path.read_bytes() + marker)
    elif how == "append":
        with open(path, "ab") as handle:
            handle.write(marker)
    elif how == "same-size":
        before = path.stat()
        data = bytearray(path.read_bytes())
        data[number % len(data)] ^= number % 255 + 1
        path.write_bytes(bytes(data))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        path.unlink()
        os.symlink(f"../elsewhere-{number}", path)
        return "link", f"../elsewhere-{number}".encode()
    return "file", path.read_bytes()


def _kept(remote: Path) -> dict[str, tuple[str, bytes]]:
    """Every kept copy (wire path under the root) by kind and content or target."""
    found: dict[str, tuple[str, bytes]] = {}
    for base, dirs, files in os.walk(remote / KEPT):
        for name in files + [d for d in dirs if Path(base, d).is_symlink()]:
            full = Path(base, name)
            rel = full.relative_to(remote).as_posix()
            found[rel] = (("link", os.readlink(full).encode()) if full.is_symlink()
                          else ("file", full.read_bytes()))
    return found


def _not_kept(rel: str) -> bool:
    return rel == ".lsync" or rel.startswith(".lsync/")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    local, remote = tmp_path / "local", tmp_path / "remote"
    for number, rel in enumerate(FILES):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(_content(rel, number))
    yield local, remote


def test_remote_edits_racing_local_saves_are_all_kept_told_and_listed(
        sshd: PrivateSshd, tree: tuple[Path, Path]) -> None:
    local, remote = tree
    rng = random.Random(18)
    version = 100
    edits: dict[str, tuple[str, bytes]] = {}  # remote edits lsync must keep: by marker
    untouched: dict[str, tuple[str, bytes]] = {}  # path -> its remote edit, no local save
    with counting_link_to(sshd, D) as link:
        lsync = LsyncProcess(link.connect_args(remote), cwd=local)
        try:
            lsync.wait_for_line(" ready ", timeout=60)
            for round_number in range(ROUNDS):
                # Last round's edits with no local save get one now: they are kept.
                resolved, untouched = untouched, {}
                for rel, there in resolved.items():
                    version += 1
                    _save(local / rel, _content(rel, version))
                    edits[f"{rel} untouched {round_number}"] = there
                picked = rng.sample([p for p in FILES if p not in resolved], 5)
                for index, rel in enumerate(picked):
                    number = round_number * 10 + index
                    how = rng.choice(["rename", "append", "same-size", "symlink"])
                    race = rng.choice(["before", "in-flight", "delete", "none"])
                    version += 1
                    if race == "before":
                        edits[rel + str(number)] = _edit_remote(remote / rel, how, number)
                        _save(local / rel, _content(rel, version))
                    elif race == "in-flight":
                        _save(local / rel, _content(rel, version))
                        time.sleep(rng.uniform(0, D / 2))
                        edits[rel + str(number)] = _edit_remote(remote / rel, how, number)
                    elif race == "delete":
                        edits[rel + str(number)] = _edit_remote(remote / rel, how, number)
                        (local / rel).unlink()
                    else:
                        untouched[rel] = _edit_remote(remote / rel, how, number)
                flushed = _cli("flush", "--timeout", "30", cwd=local)
                assert flushed.returncode == 0, (flushed.stdout, flushed.stderr,
                                                 lsync.log_tail())
                kept = _kept(remote)
                missing = [k for k, v in edits.items() if v not in kept.values()]
                assert not missing, f"remote edits not kept: {missing}\n{lsync.log_tail()}"
                assert sorted(kept.values()) == sorted(edits.values()), "a keep with no edit"
                now = snapshot(remote, _not_kept)
                for rel, version_there in untouched.items():
                    entry = now.get(rel)
                    assert isinstance(entry, tuple), rel
                    held = entry[1].encode() if isinstance(entry[1], str) else entry[1]
                    assert (entry[0], held) == version_there, rel
                skip = set(untouched)
                want = snapshot(local, skip.__contains__)
                assert {r: e for r, e in now.items() if r not in untouched} == want
                for rel in FILES:  # deleted files come back for the next rounds
                    if not (local / rel).exists():
                        version += 1
                        _save(local / rel, _content(rel, version))
                assert _cli("flush", "--timeout", "30", cwd=local).returncode == 0
            # The last edits nobody saved over are kept once the local side saves them.
            for rel in untouched:
                version += 1
                _save(local / rel, _content(rel, version))
            edits.update({f"{rel} untouched": v for rel, v in untouched.items()})
            assert _cli("flush", "--timeout", "30", cwd=local).returncode == 0
            kept = _kept(remote)
            assert sorted(kept.values()) == sorted(edits.values())
            assert snapshot(remote, _not_kept) == snapshot(local)
            notes = sorted(line.split(" note ", 1)[1] for line in lsync.lines
                           if " note kept remote edit of " in line)
            assert notes == sorted(f"kept remote edit of {k.split('/', 3)[3]} as {k}"
                                   for k in kept), notes
            status = json.loads(_cli("status", "--json", cwd=local).stdout)
            listed = status["kept_remote_edits"]
            assert sorted(e["kept_as"] for e in listed) == sorted(kept)
            assert [e["kept_as"] for e in listed] == sorted(
                kept, key=lambda k: -int(k.split("/")[2]))  # newest first
            text = _cli("status", cwd=local).stdout
            assert f"{len(kept)} remote edits kept aside" in text, text
        finally:
            if lsync.proc.poll() is None:
                assert lsync.interrupt() == 0
        # A new session hears of them from the agent, and keeps nothing more.
        again = LsyncProcess(link.connect_args(remote), cwd=local)
        try:
            again.wait_for_line(" ready ", timeout=60)
            status = json.loads(_cli("status", "--json", cwd=local).stdout)
            assert sorted(e["kept_as"] for e in status["kept_remote_edits"]) == sorted(kept)
            assert not again.saw("kept remote edit")
            # `lsync pull --kept PATH` brings the newest kept file of PATH back beside it,
            # for a merge; it is never pushed.
            newest = next(e for e in status["kept_remote_edits"] if kept[e["kept_as"]][0]
                          == "file")
            number = newest["kept_as"].split("/")[2]
            copy = local / f"{newest['path']}.lsync-remote-{number}"
            pulled = _cli("pull", "--kept", newest["path"], cwd=local)
            assert pulled.returncode == 0, (pulled.stdout, pulled.stderr, again.log_tail())
            assert copy.read_bytes() == kept[newest["kept_as"]][1]
            nothing = _cli("pull", "--kept", "src/never-kept.c", cwd=local)
            assert nothing.returncode == 1 and "no remote edit of src/never-kept.c" in (
                nothing.stderr), nothing.stderr
            assert _cli("flush", "--timeout", "30", cwd=local).returncode == 0
            assert not (remote / copy.relative_to(local)).exists()
        finally:
            if again.proc.poll() is None:
                assert again.interrupt() == 0
