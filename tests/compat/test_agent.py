"""Agent core tests: confinement, atomic writes, every operation, error replies."""

import errno
import os
import stat

from lsync.agent import confined
from lsync.protocol import hashing
from lsync.protocol import messages as m
from lsync.protocol.delta import KIND_BLOCK, encode_block_delta
from lsync.protocol.errors import AckStatus, ErrorCode
from tests.compat.helpers import Pair, TempTree


def _session(byte_at_a_time=False):
    tree = TempTree()
    pair = Pair(tree.root, byte_at_a_time)
    welcome = pair.pump()
    assert isinstance(welcome[0], m.Welcome), welcome
    return tree, pair, welcome[0].chosen["hash"]


def _no_temp_files(tree):
    return [p for p in tree.listing() if confined.TEMP_PREFIX in p] == []


def test_full_session_fed_one_byte_at_a_time():
    tree, pair, _ = _session(byte_at_a_time=True)
    try:
        assert pair.op(m.WriteFile(1, "d/a.c", 0o644, 0, b"int x;\n", True)) == m.Ack(1, 0, "")
        assert pair.op(m.Symlink(2, "d/link", "a.c")) == m.Ack(2, 0, "")
        pair.client.send(m.ListTree(3))
        batches = pair.pump()
        entries = sorted(e[0] for b in batches for e in b.entries)
        assert entries == ["d", "d/a.c", "d/link"]
        assert tree.read("d/a.c") == b"int x;\n"
        assert os.readlink(tree.path("d/link")) == "a.c"
    finally:
        tree.cleanup()


def test_write_is_atomic_sets_mode_and_leaves_no_temp_file():
    tree, pair, _ = _session()
    try:
        tree.write("f", b"old")
        reply = pair.op(m.WriteFile(1, "f", 0o755, 0, b"new content", True))
        assert reply.status == AckStatus.OK
        assert tree.read("f") == b"new content"
        assert stat.S_IMODE(os.stat(tree.path("f")).st_mode) == 0o755
        assert _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_chunked_write_is_invisible_until_the_final_chunk():
    tree, pair, _ = _session()
    try:
        pair.client.send(m.WriteFile(5, "big", 0o644, 0, b"a" * 10, False))
        assert pair.pump() == []
        assert not os.path.exists(tree.path("big"))
        reply = pair.op(m.WriteFile(5, "big", 0o644, 10, b"b" * 5, True))
        assert reply == m.Ack(5, 0, "")
        assert tree.read("big") == b"a" * 10 + b"b" * 5
    finally:
        tree.cleanup()


def test_paths_escaping_the_root_are_refused_and_nothing_is_written():
    tree, pair, _ = _session()
    try:
        outside = os.path.join(tree.base, "outside")
        os.mkdir(outside)
        os.symlink(outside, tree.path("escape"))
        for seq, path in enumerate(["../x", "/tmp/x", "escape/x", "a/../../x"], start=1):
            reply = pair.op(m.WriteFile(seq, path, 0o644, 0, b"evil", True))
            assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_PATH, reply
        reply = pair.op(m.Mkdir(9, "escape/sub", 0o755))
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_PATH
        reply = pair.op(m.Rename(10, "escape", "../moved"))
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_PATH
        assert os.listdir(outside) == []
        assert sorted(os.listdir(tree.base)) == ["outside", "root"]
    finally:
        tree.cleanup()


def test_delete_reports_kept_directories_and_absent_paths():
    tree, pair, _ = _session()
    try:
        tree.write("d/built.o", b"obj")
        os.mkdir(tree.path("empty"))
        reply = pair.op(m.Delete(1, "d"))
        assert reply.status == AckStatus.KEPT_NOT_EMPTY and "d" in reply.detail
        assert os.path.exists(tree.path("d/built.o"))
        assert pair.op(m.Delete(2, "empty")).status == AckStatus.OK
        assert not os.path.exists(tree.path("empty"))
        assert pair.op(m.Delete(3, "nothing/here")).status == AckStatus.ALREADY_ABSENT
    finally:
        tree.cleanup()


def test_rename_copy_mkdir_symlink_and_set_mode():
    tree, pair, algorithm = _session()
    try:
        tree.write("a/x", b"payload")
        assert pair.op(m.Rename(1, "a", "b/c")).status == AckStatus.OK
        assert tree.read("b/c/x") == b"payload"
        digest = hashing.digest_of(algorithm, b"payload")
        assert pair.op(m.Copy(2, "b/c/x", "copy", 0o600, digest)).status == AckStatus.OK
        assert tree.read("copy") == b"payload"
        wrong = pair.op(m.Copy(3, "b/c/x", "copy2", 0o600, b"\0" * 16))
        assert wrong.code == ErrorCode.DIGEST_MISMATCH and not os.path.exists(tree.path("copy2"))
        gone = pair.op(m.Copy(7, "no/such/source", "copy3", 0o600, digest))
        assert gone.code == ErrorCode.DIGEST_MISMATCH and not os.path.exists(tree.path("copy3"))
        assert pair.op(m.Mkdir(4, "new/dir", 0o750)).status == AckStatus.OK
        assert stat.S_IMODE(os.stat(tree.path("new/dir")).st_mode) == 0o750
        assert pair.op(m.Symlink(5, "copy", "b/c/x")).status == AckStatus.OK
        assert os.readlink(tree.path("copy")) == "b/c/x"
        assert pair.op(m.SetMode(6, "b/c/x", 0o700)).status == AckStatus.OK
        assert stat.S_IMODE(os.stat(tree.path("b/c/x")).st_mode) == 0o700
        assert _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_write_over_a_directory_is_a_type_conflict():
    tree, pair, _ = _session()
    try:
        os.makedirs(tree.path("d/sub"))
        reply = pair.op(m.WriteFile(1, "d", 0o644, 0, b"x", True))
        assert reply.code == ErrorCode.TYPE_CONFLICT
        assert os.path.isdir(tree.path("d/sub")) and _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_full_disk_is_an_error_reply_and_leaves_no_temp_file():
    tree, pair, _ = _session()
    real_write = os.write

    def full(fd, data):
        if fd > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    try:
        tree.write("f", b"old")
        os.write = full
        try:
            reply = pair.op(m.WriteFile(1, "f", 0o644, 0, b"new", True))
        finally:
            os.write = real_write
        assert reply.code == ErrorCode.NO_SPACE and "No space" in reply.message
        assert tree.read("f") == b"old" and _no_temp_files(tree)
        assert pair.op(m.WriteFile(2, "f", 0o644, 0, b"new", True)).status == AckStatus.OK
    finally:
        tree.cleanup()


def test_delta_applies_only_to_the_named_base():
    tree, pair, algorithm = _session()
    try:
        base = b"0123456789" * 100
        new = base[:500] + b"EDIT" + base[500:]
        tree.write("f", base)
        delta = bytes(encode_block_delta(len(base), new, [(0, 0, 500), (504, 500, 500)]))
        good = m.WriteDelta(1, "f", 0o644, hashing.digest_of(algorithm, base),
                            hashing.digest_of(algorithm, new), delta)
        assert pair.op(good).status == AckStatus.OK
        assert tree.read("f") == new
        # The same delta again: the file is no longer that base, nothing may be written.
        again = pair.op(good._replace(seq=2))
        assert again.code == ErrorCode.BASE_MISMATCH and tree.read("f") == new
        assert _no_temp_files(tree) and KIND_BLOCK == 1
    finally:
        tree.cleanup()


def test_stale_temp_files_of_dead_agents_are_removed_on_listing():
    tree, pair, _ = _session()
    try:
        dead_pid = 2 ** 22 + 12345  # above any pid_max default: never a live process
        stale = f"{confined.TEMP_PREFIX}{dead_pid}-1"
        tree.write("d/" + stale, b"half")
        pair.client.send(m.ListTree(1))
        names = [e[0] for b in pair.pump() for e in b.entries]
        assert names == ["d"]
        assert not os.path.exists(tree.path("d/" + stale))
    finally:
        tree.cleanup()


def test_manifest_reports_digests_only_for_files_the_agent_knows():
    tree, pair, algorithm = _session()
    try:
        tree.write("foreign", b"not written by lsync")
        pair.op(m.WriteFile(1, "ours", 0o644, 0, b"ours", True))
        pair.client.send(m.ListTree(2))
        entries = {e[0]: e for b in pair.pump() for e in b.entries}
        assert entries["ours"][5] == hashing.digest_of(algorithm, b"ours")
        assert entries["foreign"][5] is None
        pair.client.send(m.HashPaths(3, ["foreign", "missing"]))
        (hashes,) = pair.pump()
        assert hashes.digests == [hashing.digest_of(algorithm, b"not written by lsync"), None]
    finally:
        tree.cleanup()


def test_listing_under_a_path_gives_that_entry_and_what_is_below_it_only():
    tree, pair, algorithm = _session()
    try:
        pair.op(m.WriteFile(1, "a/b/ours.c", 0o644, 0, b"ours", True))
        tree.write("a/b/c/foreign.o", b"build output")
        tree.write("a/other.c", b"beside")
        tree.write("top.c", b"top")
        os.symlink("b", tree.path("a/link"))
        pair.client.send(m.ListTree(2, "a/b"))
        entries = {e[0]: e for b in pair.pump() for e in b.entries}
        assert sorted(entries) == ["a/b", "a/b/c", "a/b/c/foreign.o", "a/b/ours.c"]
        assert entries["a/b/ours.c"][7] == hashing.digest_of(algorithm, b"ours")
        assert entries["a/b/c/foreign.o"][7] is None
        pair.client.send(m.ListTree(3, "a/b/ours.c"))
        assert [e[0] for b in pair.pump() for e in b.entries] == ["a/b/ours.c"]
        pair.client.send(m.ListTree(4, "a/missing/x"))
        (batch,) = pair.pump()
        assert batch.entries == [] and batch.done
        # Through a symlink: nothing is listed, nothing outside is touched.
        pair.client.send(m.ListTree(5, "a/link/ours.c"))
        (batch,) = pair.pump()
        assert batch.entries == [] and batch.done
        pair.client.send(m.ListTree(6, "a/link"))
        assert [e[0] for b in pair.pump() for e in b.entries] == ["a/link"]
    finally:
        tree.cleanup()


def test_listing_under_an_escaping_path_is_refused_with_bad_path():
    tree, pair, _ = _session()
    try:
        for seq, under in enumerate(["../etc", "/etc", "a//b", "a/./b"], start=1):
            pair.client.send(m.ListTree(seq, under))
            (reply,) = pair.pump()
            assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_PATH, reply
    finally:
        tree.cleanup()


def test_goodbye_is_answered_and_ends_the_session():
    tree, pair, _ = _session()
    try:
        pair.client.send(m.Goodbye(0, "done"))
        assert pair.pump() == [m.Goodbye(0, "bye")]
        assert pair.ended is not None
    finally:
        tree.cleanup()


def test_compressed_chunks_are_inflated_and_bad_ones_refused():
    import zlib
    tree, pair, _ = _session()
    try:
        data = b"int x = 1;\n" * 1000
        reply = pair.op(m.WriteFile(1, "z.c", 0o644, 0, zlib.compress(data), True, 1))
        assert reply.status == AckStatus.OK and tree.read("z.c") == data
        reply = pair.op(m.WriteFile(2, "bad.c", 0o644, 0, b"not zlib at all", True, 1))
        assert reply.code == ErrorCode.BAD_DELTA and not os.path.exists(tree.path("bad.c"))
        bomb = zlib.compress(b"\0" * (m.MAX_CHUNK + 1))
        reply = pair.op(m.WriteFile(3, "bomb", 0o644, 0, bomb, True, 1))
        assert reply.code == ErrorCode.BAD_DELTA and _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_dictionary_chunks_use_the_dictionary_set_before_them():
    from lsync.protocol import packing
    tree, pair, _ = _session()
    try:
        zdict = b"#include <linux/module.h>\nMODULE_LICENSE(\"GPL\");\n" * 50
        data = b"#include <linux/module.h>\nMODULE_LICENSE(\"GPL\");\nint y;\n" * 3
        packed = packing.pack(data, packing.PACK_ZLIB_DICT, 6, zdict)
        reply = pair.op(m.WriteFile(1, "early.c", 0o644, 0, packed, True,
                                    packing.PACK_ZLIB_DICT))
        assert reply.code == ErrorCode.BAD_DELTA and not os.path.exists(tree.path("early.c"))
        assert pair.op(m.SetDictionary(2, zdict)) == m.Ack(2, 0, "")
        reply = pair.op(m.WriteFile(3, "m.c", 0o644, 0, packed, True, packing.PACK_ZLIB_DICT))
        assert reply.status == AckStatus.OK and tree.read("m.c") == data
        reply = pair.op(m.SetDictionary(4, b"x" * (m.MAX_DICTIONARY + 1)))
        assert reply.code == ErrorCode.BAD_DELTA
    finally:
        tree.cleanup()
