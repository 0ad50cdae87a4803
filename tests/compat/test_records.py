"""The agent's record of what lsync wrote: kept per operation, moved, forgotten, persisted
across agents (snapshot and journal, including an agent killed without closing) and
reported in the manifest's `written` field."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import lsync.agent
from lsync.agent.recordfiles import read_snapshot, snapshot_bytes
from lsync.agent.records import DigestRecord
from lsync.protocol import PROTOCOL_VERSION, hashing
from lsync.protocol import messages as m
from lsync.protocol.connection import CLIENT, Connection
from lsync.protocol.delta import encode_block_delta
from lsync.protocol.errors import AckStatus
from tests.compat.helpers import Pair, TempTree, home_at, manifest

WRITTEN = 7  # index of `written` in a manifest entry


def _open(tree, now_ns=None):
    """A session whose record lives under tree.base (as HOME, set by the caller)."""
    pair = Pair(tree.root, use_cache=True, now_ns=now_ns)
    welcome = pair.pump()
    assert isinstance(welcome[0], m.Welcome), welcome
    return pair, welcome[0].chosen["hash"]


def _record_files(tree):
    """The snapshot and journal files (not the intents, nor the root's lock)."""
    directory = os.path.join(tree.base, ".cache", "lsync")
    return sorted(n for n in os.listdir(directory) if n.endswith((".json", ".journal"))
                  ) if os.path.isdir(directory) else []


def test_every_kind_of_operation_records_what_lsync_wrote():
    tree = TempTree()
    try:
        with home_at(tree.base):
            pair, algorithm = _open(tree)
            base = b"0123456789" * 100
            new = base[:500] + b"EDIT" + base[500:]
            assert pair.op(m.WriteFile(1, "w.c", 0o644, 0, b"whole", True)).status == 0
            pair.client.send(m.WriteFile(2, "big", 0o644, 0, b"a" * 10, False))
            assert pair.pump() == []
            assert pair.op(m.WriteFile(2, "big", 0o644, 10, b"b", True)).status == 0
            assert pair.op(m.WriteFile(3, "d.c", 0o644, 0, base, True)).status == 0
            delta = bytes(encode_block_delta(len(base), new, [(0, 0, 500), (504, 500, 500)]))
            assert pair.op(m.WriteDelta(4, "d.c", 0o644, hashing.digest_of(algorithm, base),
                                        hashing.digest_of(algorithm, new), delta)).status == 0
            assert pair.op(m.Copy(5, "w.c", "copy.c", 0o600,
                                  hashing.digest_of(algorithm, b"whole"))).status == 0
            assert pair.op(m.Symlink(6, "link", "w.c")).status == 0
            assert pair.op(m.Mkdir(7, "made/deep", 0o755)).status == 0
            os.mkdir(tree.path("theirs"))
            assert pair.op(m.Mkdir(8, "theirs", 0o750)).status == 0  # claimed by Mkdir
            tree.write("foreign.o", b"built remotely")
            os.mkdir(tree.path("foreign_dir"))
            os.symlink("x", tree.path("foreign_link"))
            entries = manifest(pair, 9)
            assert entries["w.c"][WRITTEN] == hashing.digest_of(algorithm, b"whole")
            assert entries["big"][WRITTEN] == hashing.digest_of(algorithm, b"a" * 10 + b"b")
            assert entries["d.c"][WRITTEN] == hashing.digest_of(algorithm, new)
            assert entries["copy.c"][WRITTEN] == hashing.digest_of(algorithm, b"whole")
            assert entries["link"][WRITTEN] == b"w.c"
            assert entries["made/deep"][WRITTEN] == b""
            assert entries["made"][WRITTEN] == b""  # made on the way, by lsync too
            assert entries["theirs"][WRITTEN] == b""
            for foreign in ("foreign.o", "foreign_dir", "foreign_link"):
                assert entries[foreign][WRITTEN] is None, foreign
            assert all(len(e) == 8 for e in entries.values())
            pair.service.close()
    finally:
        tree.cleanup()


def test_pooled_writes_are_recorded_too():
    from lsync.agent.service import AgentService
    from lsync.agent.writer import WritePool
    tree = TempTree()
    sent = []
    service = AgentService(sent.append, lambda: None, lambda: 10 ** 18, use_cache=False,
                           pool=WritePool(2))
    try:
        service.handle(m.Hello(PROTOCOL_VERSION, {"hash": ["blake2b-128"]}, tree.root, {}))
        service.handle(m.WriteFile(1, "p.c", 0o644, 0, b"pooled", True))
        service.drain_pool()
        assert sent[-1] == m.Ack(1, 0, "")
        service.handle(m.ListTree(2))
        (entry,) = m.decode_message(m.encode_message(sent[-1]), "a").entries  # unpacked
        assert entry[WRITTEN] == hashing.digest_of("blake2b-128", b"pooled")
    finally:
        service.close()
        tree.cleanup()


def test_rename_moves_the_record_with_the_tree_and_replaces_the_destination():
    tree = TempTree()
    try:
        with home_at(tree.base):
            pair, algorithm = _open(tree)
            pair.op(m.Mkdir(1, "a/sub", 0o755))
            pair.op(m.WriteFile(2, "a/sub/f", 0o644, 0, b"f", True))
            pair.op(m.Symlink(3, "a/l", "sub/f"))
            pair.op(m.WriteFile(4, "x", 0o644, 0, b"x", True))
            tree.write("y", b"foreign")
            assert pair.op(m.Rename(5, "a", "b")).status == 0
            assert pair.op(m.Rename(6, "y", "x")).status == 0  # a foreign file over ours
            entries = manifest(pair, 7)
            assert sorted(entries) == ["b", "b/l", "b/sub", "b/sub/f", "x"]
            assert entries["b"][WRITTEN] == b"" and entries["b/sub"][WRITTEN] == b""
            assert entries["b/sub/f"][WRITTEN] == hashing.digest_of(algorithm, b"f")
            assert entries["b/l"][WRITTEN] == b"sub/f"
            assert entries["x"][WRITTEN] is None
            # A file recreated at the old place by someone else is not lsync's.
            tree.write("a/sub/f", b"f")
            assert manifest(pair, 8)["a/sub/f"][WRITTEN] is None
            pair.service.close()
    finally:
        tree.cleanup()


def test_delete_forgets_only_what_was_removed():
    tree = TempTree()
    try:
        with home_at(tree.base):
            pair, algorithm = _open(tree)
            pair.op(m.Mkdir(1, "d", 0o755))
            pair.op(m.WriteFile(2, "d/ours", 0o644, 0, b"ours", True))
            pair.op(m.WriteFile(3, "gone", 0o644, 0, b"gone", True))
            tree.write("d/built.o", b"object")
            assert pair.op(m.Delete(4, "gone")).status == AckStatus.OK
            assert pair.op(m.Delete(5, "d")).status == AckStatus.KEPT_NOT_EMPTY
            entries = manifest(pair, 6)
            assert entries["d"][WRITTEN] == b""  # still there, still made by lsync
            assert entries["d/ours"][WRITTEN] == hashing.digest_of(algorithm, b"ours")
            assert entries["d/built.o"][WRITTEN] is None
            # The same content put back by someone else is not lsync's.
            tree.write("gone", b"gone")
            assert manifest(pair, 7)["gone"][WRITTEN] is None
            assert pair.op(m.Delete(8, "d/ours")).status == AckStatus.OK
            os.unlink(tree.path("d/built.o"))
            assert pair.op(m.Delete(9, "d")).status == AckStatus.OK
            os.mkdir(tree.path("d"))  # someone else's directory, same name
            assert manifest(pair, 10)["d"][WRITTEN] is None
            pair.service.close()
    finally:
        tree.cleanup()


def test_ownership_survives_a_new_agent_whatever_the_mtimes():
    tree = TempTree()
    try:
        with home_at(tree.base):
            # The clocks say the files were written just now (the file system's clock is
            # still in their tick): their stat keys are racy and must not be trusted by the
            # next agent, but what lsync wrote must be.
            pair, algorithm = _open(tree, now_ns=time.time_ns if hasattr(time, "time_ns")
                                    else lambda: int(time.time() * 1e9))
            pair.service.record.fs_clock = lambda: os.lstat(tree.path("f")).st_mtime_ns
            pair.op(m.WriteFile(1, "f", 0o644, 0, b"content", True))
            pair.op(m.Symlink(2, "l", "f"))
            pair.op(m.Mkdir(3, "d", 0o755))
            pair.service.close()
            again, _ = _open(tree)
            entries = manifest(again, 1)
            assert entries["f"][5] is None  # racy key dropped: the digest must be asked
            assert entries["f"][WRITTEN] == hashing.digest_of(algorithm, b"content")
            assert entries["l"][WRITTEN] == b"f" and entries["d"][WRITTEN] == b""
            again.service.close()
    finally:
        tree.cleanup()


def test_an_agent_that_never_closes_loses_no_acknowledged_ownership():
    tree = TempTree()
    try:
        with home_at(tree.base):
            pair, algorithm = _open(tree)
            pair.op(m.WriteFile(1, "first", 0o644, 0, b"1", True))
            # Not closed: only the journal, written before each answer left, knows.
            pair.op(m.WriteFile(2, "second", 0o644, 0, b"2", True))
            pair.op(m.Rename(3, "first", "moved"))
            pair.op(m.Delete(4, "second"))
            tree.write("second", b"2")
            assert len(_record_files(tree)) == 2  # snapshot + journal
            pair.service.lock.release()  # as if its process had died
            again, _ = _open(tree)
            entries = manifest(again, 1)
            assert entries["moved"][WRITTEN] == hashing.digest_of(algorithm, b"1")
            assert entries["second"][WRITTEN] is None
            # The second agent appends to the same journal; a third sees both.
            again.op(m.Mkdir(2, "d", 0o700))
            again.service.lock.release()
            third, _ = _open(tree)
            entries = manifest(third, 1)
            assert entries["d"][WRITTEN] == b"" and entries["moved"][WRITTEN] is not None
            third.service.close()
    finally:
        tree.cleanup()


def test_a_killed_agent_process_keeps_what_it_acknowledged():
    tree = TempTree()
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        lsync.agent.__file__))))
    env = dict(os.environ, HOME=tree.base, PYTHONPATH=top)
    proc = subprocess.Popen([sys.executable, "-m", "lsync.agent"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        client = Connection(CLIENT)
        # The same offer as Pair's, so that both agents pick the same record file.
        client.send(m.Hello(PROTOCOL_VERSION, {"hash": ["xxh3-128", "blake2b-128"]},
                            tree.root, {}))
        client.send(m.WriteFile(1, "f", 0o644, 0, b"data", True))
        proc.stdin.write(client.data_to_send())
        proc.stdin.flush()
        replies = []
        while not any(isinstance(r, m.Ack) for r in replies):
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, "agent ended early"
            client.receive_data(chunk)
            while True:
                message = client.next_message()
                if message is None:
                    break
                replies.append(message)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with home_at(tree.base):
            pair, algorithm = _open(tree)
            assert replies[0].chosen["hash"] == algorithm
            assert manifest(pair, 1)["f"][WRITTEN] == hashing.digest_of(algorithm, b"data")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()
        tree.cleanup()


def test_a_record_file_without_the_written_section_loads():
    tree = TempTree()
    try:
        cache = os.path.join(tree.base, "agent-old.json")
        with open(cache, "w") as handle:
            json.dump({"algorithm": "blake2b-128", "saved_ns": 10 ** 19,
                       "entries": {"f": [3, 10 ** 18, 7, "ab" * 16]}}, handle)
        record = DigestRecord(cache, "blake2b-128")
        record.load()
        assert record.lookup("f", (3, 10 ** 18, 7)) == b"\xab" * 16
        assert record.written("f", m.KIND_FILE, 7) is None
        # The first change writes a snapshot in the new format, and a journal behind it.
        record.wrote_file("g", b"\x01" * 16)
        record.journal(10 ** 19)
        again = DigestRecord(cache, "blake2b-128")
        again.load()
        assert again.written("g", m.KIND_FILE, 0) == b"\x01" * 16
        assert again.lookup("f", (3, 10 ** 18, 7)) == b"\xab" * 16
        record.close(10 ** 19)
        # An old JSON snapshot is rewritten in the current format at the next snapshot,
        # changes or not.
        with open(cache, "w") as handle:
            json.dump({"algorithm": "blake2b-128", "saved_ns": 10 ** 19,
                       "entries": {"f": [3, 10 ** 18, 7, "ab" * 16]}}, handle)
        unchanged = DigestRecord(cache, "blake2b-128")
        unchanged.load()
        unchanged.close(10 ** 19)
        with open(cache, "rb") as handle:
            assert handle.read(13) == b"lsync-record "
        again = DigestRecord(cache, "blake2b-128")
        again.load()
        assert again.lookup("f", (3, 10 ** 18, 7)) == b"\xab" * 16
        again._close_journal()
    finally:
        tree.cleanup()


def test_a_torn_journal_line_is_ignored_and_the_next_change_starts_afresh():
    tree = TempTree()
    try:
        cache = os.path.join(tree.base, "agent-x.json")
        record = DigestRecord(cache, "blake2b-128")
        record.wrote_file("a", b"\x01" * 16)
        record.journal(10 ** 19)  # snapshot (no journal yet) holding "a"
        record.wrote_file("b", b"\x02" * 16)
        record.made_dir("c", 5)
        record.journal(10 ** 19)  # appended
        with open(record.journal_path, "ab") as handle:
            handle.write(b'["w","torn","f","0')
        again = DigestRecord(cache, "blake2b-128")
        again.load()
        assert again.written("b", m.KIND_FILE, 0) == b"\x02" * 16
        assert again.written("c", m.KIND_DIR, 5) == b""
        assert again.written("c", m.KIND_DIR, 6) is None  # another directory of that name
        assert again.written("torn", m.KIND_FILE, 0) is None
        again.wrote_link("d", "target")
        again.journal(10 ** 19)
        third = DigestRecord(cache, "blake2b-128")
        third.load()
        assert third.written("d", m.KIND_LINK, 0) == b"target"
        assert third.written("a", m.KIND_FILE, 0) == b"\x01" * 16
        # A journal that belongs to another snapshot is not replayed.
        with open(cache, "rb") as handle:
            loaded = read_snapshot(handle.read(), "blake2b-128")
        assert loaded is not None and loaded[2]  # (the id of the journal behind it)
        with open(cache, "wb") as handle:
            handle.write(snapshot_bytes("blake2b-128", 10 ** 19, loaded[0], loaded[1],
                                        "someone-else"))
        third.wrote_file("e", b"\x03" * 16)
        third.journal(10 ** 19)
        fourth = DigestRecord(cache, "blake2b-128")
        fourth.load()
        assert fourth.written("d", m.KIND_LINK, 0) == b"target"
        assert fourth.written("e", m.KIND_FILE, 0) is None
        for record_ in (record, again, third, fourth):
            record_._close_journal()
    finally:
        tree.cleanup()


def test_snapshots_wait_for_quiet_input_unless_the_journal_is_huge():
    from lsync.agent import records
    tree = TempTree()
    try:
        record = DigestRecord(os.path.join(tree.base, "agent-q.json"), "blake2b-128")
        assert record.snapshot_wanted(0, quiet=True) is None
        record.remember("f", (1, 0, 1), b"\x00" * 16)
        assert record.snapshot_wanted(10, quiet=False) is None
        assert record.snapshot_wanted(10, quiet=True) == records.SNAPSHOT_INTERVAL_NS
        record.save(10 ** 19)
        assert record.snapshot_wanted(10 ** 19, quiet=True) is None
        limit = records.JOURNAL_COMPACT_LINES
        for i in range(limit):
            record.wrote_file("f{}".format(i), b"\x00" * 16)
        record.journal(10 ** 19)
        assert record.snapshot_wanted(10 ** 19, quiet=True) == 10 ** 19
        assert record.snapshot_wanted(10 ** 19, quiet=False) is None
        # A journal that rewrites the same few paths over and over is compacted even while
        # busy (a journal about as long as the record is no worse than a snapshot).
        for i in range(limit * records.JOURNAL_HARD_FACTOR):
            record.wrote_file("f{}".format(i % 100), (i + 1).to_bytes(16, "big"))
        assert record.snapshot_wanted(10 ** 19, quiet=False) == 10 ** 19
        record.close(10 ** 19)
    finally:
        tree.cleanup()


def test_journal_lines_are_what_json_dumps_writes_whatever_the_path():
    import random

    from lsync.agent.recordfiles import journal_line as _line
    rng = random.Random(16)
    alphabet = ["a", "/", '"', "\\", "\n", "\x00", "\x1f", "\x7f", "\u00e9", "\udcff",
                "\U0001f600", "\u2028", " "]
    for _ in range(3000):
        value = []
        for _ in range(rng.randrange(0, 6)):
            pick = rng.random()
            if pick < 0.5:
                value.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(12))))
            elif pick < 0.8:
                value.append(rng.randrange(-10 ** 20, 10 ** 20))
            else:
                value.append(rng.choice([True, False, None, 1.5, [1, "x"], {"k": 2}]))
        expected = json.dumps(value, separators=(",", ":")) + "\n"
        assert _line(value) == expected, value
        assert json.loads(_line(value)) == value


def test_a_batch_recorded_in_one_go_is_recorded_as_file_by_file():
    import random

    from lsync.agent.records import KIND_FILE
    rng = random.Random(3)
    tree = TempTree()
    try:
        for _ in range(50):
            one = DigestRecord(os.path.join(tree.base, "one.json"), "blake2b-128")
            many = DigestRecord(os.path.join(tree.base, "many.json"), "blake2b-128")
            files = []
            for _ in range(rng.randrange(0, 8)):
                path = rng.choice(["a", "b", "d/c", "d/\u00e9"])
                digest = bytes([rng.randrange(3)]) * 16
                files.append((path, (rng.randrange(9), rng.randrange(9), 7), digest))
            for record in (one, many):
                record.wrote_file("a", b"\x01" * 16)  # already there: no new line for it
                record.intend([(path, KIND_FILE, digest) for path, _, digest in files])
            for path, key, digest in files:
                one.remember(path, key, digest)
                one.wrote_file(path, digest)
                one.settle([(path, KIND_FILE, digest)])
            many.wrote_files(files)
            assert one._entries == many._entries
            assert one._written == many._written
            assert one._pending == many._pending
            assert one._intents == many._intents == {}
            assert one._dirty == many._dirty
    finally:
        shutil.rmtree(tree.base)


def test_a_snapshot_keeps_digests_and_ownership_and_leaves_out_racy_keys():
    tree = TempTree()
    try:
        cache = os.path.join(tree.base, "agent-s.json")
        now = 10 ** 19
        record = DigestRecord(cache, "blake2b-128")
        record.remember("old", (3, now - 5 * 10 ** 9, 7), b"\xab" * 16)
        record.remember("racy", (3, now - 10 ** 9, 8), b"\xcd" * 16)  # mtime 1 s before
        record.wrote_file("f", b"\x01" * 16)
        record.wrote_link("l", "target")
        record.made_dir("d", 9)
        record.save(now, force=True)
        with open(cache, "rb") as handle:
            assert handle.read(13) == b"lsync-record "
        again = DigestRecord(cache, "blake2b-128")
        again.load()
        assert again.lookup("old", (3, now - 5 * 10 ** 9, 7)) == b"\xab" * 16
        assert again.lookup("racy", (3, now - 10 ** 9, 8)) is None
        assert again.written("f", m.KIND_FILE, 0) == b"\x01" * 16
        assert again.written("l", m.KIND_LINK, 0) == b"target"
        assert again.written("d", m.KIND_DIR, 9) == b""
        # Another hash's record is not this one.
        other = DigestRecord(cache, "xxh3-128")
        other.load()
        assert other.written("f", m.KIND_FILE, 0) is None
        for record_ in (record, again, other):
            record_._close_journal()
    finally:
        tree.cleanup()


def test_a_torn_or_corrupt_snapshot_tells_nothing():
    tree = TempTree()
    try:
        cache = os.path.join(tree.base, "agent-t.json")
        record = DigestRecord(cache, "blake2b-128")
        record.wrote_file("f", b"\x01" * 16)
        record.save(10 ** 19, force=True)
        record._close_journal()
        with open(cache, "rb") as handle:
            whole = handle.read()
        flipped = bytearray(whole)
        flipped[-3] ^= 0x40
        header = whole.partition(b"\n")[0]
        for damaged in (whole[:len(whole) - 7], bytes(flipped), header, b"lsync-record ",
                        header.replace(b" 1 ", b" 9 ") + whole[len(header):]):
            with open(cache, "wb") as handle:
                handle.write(damaged)
            again = DigestRecord(cache, "blake2b-128")
            again.load()
            assert again.written("f", m.KIND_FILE, 0) is None, damaged[:40]
        # A payload whose digest is right but whose values are not what a record holds.
        import hashlib
        import marshal
        payload = marshal.dumps(("blake2b-128", 1, {"f": (1, 2, 3, "not bytes")}, {}, ""))
        with open(cache, "wb") as handle:
            handle.write(b"lsync-record 1 " + hashlib.sha256(payload).hexdigest().encode()
                         + b"\n" + payload)
        again = DigestRecord(cache, "blake2b-128")
        again.load()
        assert again.lookup("f", (1, 2, 3)) is None
    finally:
        tree.cleanup()
