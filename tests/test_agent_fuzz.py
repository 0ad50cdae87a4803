"""Fuzzing the agent in-process: hostile input costs nothing (issue 11).

Each case is a stream a client could send: a real Hello, then a few well-formed operations
on paths inside and around the root (`..`, absolute, NUL, symlinks pointing outside), then
the encoded bytes mutated (flipped, dropped, duplicated or inserted bytes, truncation) or
replaced by random msgpack payloads in valid frames. The stream goes through the agent's
own decode boundary (`Connection(AGENT)`) into `AgentService.handle`, as agent/main.py
drives it. The only exceptions allowed out are the protocol's (`ProtocolError`) and the end
of a session (`SessionEnd`); nothing outside the root may change; and the memory the
process holds stays bounded. `FUZZ_CASES` inputs run in CI (more with LSYNC_FUZZ_CASES).
"""

from __future__ import annotations

import os
import random
import resource
from pathlib import Path

import msgpack

from lsync.agent.service import AgentService, SessionEnd
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, CLIENT, Connection
from lsync.protocol.errors import ProtocolError

FUZZ_CASES = int(os.environ.get("LSYNC_FUZZ_CASES", "10000"))
MAX_RSS_GROWTH_KB = 200 * 1024  # the whole campaign may not grow the process more than this

PATHS = ["a", "d/b", "../x", "/etc/passwd", "d/../../x", "a\x00b", "", "out/f", "link/f",
         "d", "d/c/e", "." * 300]


def _operations(rng: random.Random) -> list[m.Message]:
    ops: list[m.Message] = []
    for seq in range(2, 2 + rng.randint(1, 6)):
        path = rng.choice(PATHS)
        kind = rng.randrange(8)
        if kind == 0:
            ops.append(m.WriteFile(seq, path, 0o644, 0, rng.randbytes(rng.randint(0, 64)),
                                   True, 0))
        elif kind == 1:
            ops.append(m.Mkdir(seq, path, rng.choice([0o755, 0o7777, 0])))
        elif kind == 2:
            ops.append(m.Symlink(seq, path, rng.choice(["../../outside", "/", "a", "x\x00"])))
        elif kind == 3:
            ops.append(m.Rename(seq, path, rng.choice(PATHS)))
        elif kind == 4:
            ops.append(m.Delete(seq, path))
        elif kind == 5:
            ops.append(m.SetMode(seq, path, rng.choice([0o777, 0o4755])))
        elif kind == 6:
            ops.append(m.HashPaths(seq, [rng.choice(PATHS) for _ in range(rng.randint(0, 5))]))
        else:
            ops.append(m.Copy(seq, path, rng.choice(PATHS), 0o644, rng.randbytes(16)))
    return ops


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not buf:
            break
        at = rng.randrange(len(buf))
        choice = rng.randrange(5)
        if choice == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            del buf[at]
        elif choice == 2:
            buf.insert(at, rng.randrange(256))
        elif choice == 3:
            buf[at:at] = buf[at:at + rng.randint(1, 16)]
        else:
            del buf[at:]
    return bytes(buf)


def _random_payload_frames(rng: random.Random) -> bytes:
    frames = b""
    for _ in range(rng.randint(1, 4)):
        obj: object = [rng.randint(-2, 70)] + [
            rng.choice([None, True, 1, -1, 2 ** 63, "x", b"y", [], {}, [[]] * 100, "../z"])
            for _ in range(rng.randint(0, 8))]
        payload = msgpack.packb(obj, use_bin_type=True)
        frames += len(payload).to_bytes(4, "big") + payload
    return frames


def _snapshot(top: Path) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (st.st_mode, st.st_size)
    return found


def test_hostile_streams_raise_only_protocol_errors_and_never_touch_outside(
        tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("keep\n")
    os.symlink(outside, root / "link")
    before = _snapshot(outside)
    rng = random.Random(20261202)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(FUZZ_CASES):
        client = Connection(CLIENT)
        client.send(m.Hello(PROTOCOL_VERSION, {"hash": ["xxh3-128", "blake2b-128"]},
                            str(root), {"create_root": True}))
        for op in _operations(rng):
            try:
                client.send(op)
            except ProtocolError:
                break  # the client itself refuses it (a bad field): send what we have
        stream = client.data_to_send()
        kind = case % 3
        if kind == 1:
            stream = _mutate(stream, rng)
        elif kind == 2:
            hello_end = len(stream) - len(client.data_to_send())  # (nothing left: all sent)
            stream = stream[:rng.randrange(max(hello_end, 1))] + _random_payload_frames(rng)
        agent = Connection(AGENT)
        service = AgentService(agent.send, lambda: None, lambda: 10 ** 18, use_cache=False)
        try:
            agent.receive_data(stream)
            while (message := agent.next_message()) is not None:
                service.handle(message)
            agent.receive_eof()
        except (ProtocolError, SessionEnd):
            pass
        finally:
            service.close()
    assert _snapshot(outside) == before, "the agent changed something outside its root"
    assert (outside / "secret").read_text() == "keep\n"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss
    assert grown < MAX_RSS_GROWTH_KB, f"the process grew by {grown} KB"
