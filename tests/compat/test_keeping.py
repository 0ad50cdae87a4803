"""Remote edits of what lsync wrote are kept aside (lsync.agent.keeping), never overwritten
or deleted without a word; what lsync did not write, and unedited files, are replaced as
before; the kept tree is never listed and never written by an operation."""

import os
import stat

from lsync.agent import keeping
from lsync.agent.service import AgentService
from lsync.agent.writer import WritePool
from lsync.protocol import PROTOCOL_VERSION, hashing
from lsync.protocol import messages as m
from lsync.protocol.delta import KIND_BLOCK, encode_block_delta
from lsync.protocol.errors import AckStatus, ErrorCode, ProtocolError
from tests.compat.helpers import Pair, TempTree, home_at, manifest

KEPT = m.KEPT_DIR


def _session(tree, use_cache=False):
    pair = Pair(tree.root, use_cache=use_cache)
    first = pair.pump()
    assert isinstance(first[0], m.Welcome), first
    assert isinstance(first[1], m.Kept) and first[1].listing, first
    return pair, first[1].entries


def _answers(pair, message):
    """The replies to one operation: (kept entries told before it, its answer)."""
    pair.client.send(message)
    replies = pair.pump()
    assert replies and isinstance(replies[-1], (m.Ack, m.Error)), replies
    kept = []
    for reply in replies[:-1]:
        assert isinstance(reply, m.Kept) and not reply.listing, replies
        kept.extend(reply.entries)
    return kept, replies[-1]


def _edit_remote(tree, rel, data):
    """Someone on the build host saves `rel` (a new inode, as editors do)."""
    temp = tree.path(rel) + ".swp"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.rename(temp, tree.path(rel))


def _kept_tree(tree):
    found = {}
    top = tree.path(KEPT)
    for base, _dirs, files in os.walk(top):
        for name in files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, tree.root)
            found[rel] = ("link", os.readlink(full)) if os.path.islink(full) else tree.read(rel)
    return found


def test_write_over_a_remote_edit_keeps_it_first_and_says_so_before_the_ack():
    tree = TempTree()
    try:
        pair, listed = _session(tree)
        assert listed == []
        assert _answers(pair, m.WriteFile(1, "src/main.c", 0o644, 0, b"v1\n", True))[0] == []
        _edit_remote(tree, "src/main.c", b"edited on the build host\n")
        kept, reply = _answers(pair, m.WriteFile(2, "src/main.c", 0o644, 0, b"v2\n", True))
        assert reply == m.Ack(2, 0, "")
        assert len(kept) == 1
        path, kept_as, kind, size, _ = kept[0]
        assert (path, kept_as, kind, size) == ("src/main.c", KEPT + "/1/src/main.c", "f", 25)
        assert tree.read("src/main.c") == b"v2\n"
        assert _kept_tree(tree) == {kept_as: b"edited on the build host\n"}
        # Not a remote extra: the manifest never lists the kept tree (nor .lsync above it).
        assert sorted(manifest(pair, 3)) == ["src", "src/main.c"]
    finally:
        tree.cleanup()


def test_unedited_files_and_files_lsync_did_not_write_are_replaced_without_keeping():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        assert _answers(pair, m.WriteFile(1, "a", 0o644, 0, b"one", True))[0] == []
        assert _answers(pair, m.WriteFile(2, "a", 0o644, 0, b"two", True))[0] == []
        tree.write("theirs", b"made on the remote, never written by lsync")
        assert _answers(pair, m.WriteFile(3, "theirs", 0o644, 0, b"local", True))[0] == []
        assert _answers(pair, m.Delete(4, "a"))[0] == []
        assert tree.read("theirs") == b"local" and not os.path.exists(tree.path("a"))
        assert not os.path.exists(tree.path(".lsync"))
    finally:
        tree.cleanup()


def test_same_size_edit_with_its_mtime_put_back_is_still_seen():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _answers(pair, m.WriteFile(1, "f.c", 0o644, 0, b"int a = 1;\n", True))
        before = os.stat(tree.path("f.c"))
        with open(tree.path("f.c"), "r+b") as handle:
            handle.write(b"int b")
        os.utime(tree.path("f.c"), ns=(before.st_atime_ns, before.st_mtime_ns))
        kept, reply = _answers(pair, m.WriteFile(2, "f.c", 0o644, 0, b"int a = 2;\n", True))
        assert reply.status == AckStatus.OK and len(kept) == 1
        assert tree.read(kept[0][1]) == b"int b = 1;\n"
    finally:
        tree.cleanup()


def test_delete_of_an_edited_file_moves_it_aside_and_a_tree_delete_keeps_only_the_edited():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _answers(pair, m.Mkdir(1, "d", 0o755))
        _answers(pair, m.WriteFile(2, "d/edited", 0o644, 0, b"lsync", True))
        _answers(pair, m.WriteFile(3, "d/plain", 0o644, 0, b"lsync", True))
        _answers(pair, m.WriteFile(4, "top", 0o644, 0, b"lsync", True))
        _edit_remote(tree, "d/edited", b"remote")
        with open(tree.path("top"), "ab") as handle:  # in place, same inode
            handle.write(b" and more")
        kept_a, reply_a = _answers(pair, m.Delete(5, "d/edited"))
        kept_b, reply_b = _answers(pair, m.Delete(6, "d/plain"))
        kept_c, reply_c = _answers(pair, m.Delete(7, "d"))
        kept_d, reply_d = _answers(pair, m.Delete(8, "top"))
        assert [r.status for r in (reply_a, reply_b, reply_c, reply_d)] == [0, 0, 0, 0]
        assert [e[0] for e in kept_a + kept_b + kept_c + kept_d] == ["d/edited", "top"]
        assert not os.path.exists(tree.path("d")) and not os.path.exists(tree.path("top"))
        assert _kept_tree(tree) == {KEPT + "/1/d/edited": b"remote",
                                    KEPT + "/2/top": b"lsync and more"}
    finally:
        tree.cleanup()


def test_rename_and_symlink_onto_an_edited_file_keep_it_and_a_retargeted_link_is_kept():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _answers(pair, m.WriteFile(1, "dst", 0o644, 0, b"lsync", True))
        _answers(pair, m.WriteFile(2, "src", 0o644, 0, b"moved", True))
        _answers(pair, m.WriteFile(3, "f", 0o644, 0, b"lsync", True))
        _answers(pair, m.Symlink(4, "link", "target-a"))
        _edit_remote(tree, "dst", b"remote dst")
        _edit_remote(tree, "f", b"remote f")
        os.unlink(tree.path("link"))
        os.symlink("target-b", tree.path("link"))
        kept_a, _ = _answers(pair, m.Rename(5, "src", "dst"))
        kept_b, _ = _answers(pair, m.Symlink(6, "f", "elsewhere"))
        kept_c, _ = _answers(pair, m.WriteFile(7, "link", 0o644, 0, b"a file now", True))
        assert [(e[0], e[2]) for e in kept_a + kept_b + kept_c] == [
            ("dst", "f"), ("f", "f"), ("link", "l")]
        assert tree.read("dst") == b"moved" and os.readlink(tree.path("f")) == "elsewhere"
        assert tree.read("link") == b"a file now"
        assert _kept_tree(tree) == {KEPT + "/1/dst": b"remote dst", KEPT + "/2/f": b"remote f",
                                    KEPT + "/3/link": ("link", "target-b")}
    finally:
        tree.cleanup()


def test_a_file_put_where_lsync_made_a_link_is_an_edit_too():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _answers(pair, m.Symlink(1, "l", "somewhere"))
        os.unlink(tree.path("l"))
        tree.write("l", b"a regular file made on the remote")
        kept, reply = _answers(pair, m.Symlink(2, "l", "new-target"))
        assert reply.status == AckStatus.OK and [e[2] for e in kept] == ["f"]
        assert os.readlink(tree.path("l")) == "new-target"
    finally:
        tree.cleanup()


def test_delta_against_a_remote_edit_is_refused_and_the_whole_file_then_keeps_it():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        name = pair.service.hash_name
        base = b"line\n" * 500
        new = base + b"local edit\n"
        _answers(pair, m.WriteFile(1, "f", 0o644, 0, base, True))
        _edit_remote(tree, "f", base + b"remote edit\n")
        delta = encode_block_delta(len(base), new, [(0, 0, len(base))])
        assert delta[1] == KIND_BLOCK
        kept, reply = _answers(pair, m.WriteDelta(2, "f", 0o644, hashing.digest_of(name, base),
                                                  hashing.digest_of(name, new), delta))
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.BASE_MISMATCH, reply
        assert kept == [] and tree.read("f") == base + b"remote edit\n"  # nothing garbled
        kept, reply = _answers(pair, m.WriteFile(3, "f", 0o644, 0, new, True))
        assert reply.status == AckStatus.OK and tree.read(kept[0][1]) == base + b"remote edit\n"
        assert tree.read("f") == new
    finally:
        tree.cleanup()


def test_delta_against_content_the_client_has_keeps_nothing():
    # The remote changed to what the local side holds too (the same checkout on both ends):
    # the client's delta names it as its base; nothing of the remote's would be lost.
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        name = pair.service.hash_name
        old, both, new = b"a\n" * 300, b"b\n" * 300, b"b\n" * 300 + b"c\n"
        _answers(pair, m.WriteFile(1, "f", 0o644, 0, old, True))
        _edit_remote(tree, "f", both)
        delta = encode_block_delta(len(both), new, [(0, 0, len(both))])
        kept, reply = _answers(pair, m.WriteDelta(2, "f", 0o644, hashing.digest_of(name, both),
                                                  hashing.digest_of(name, new), delta))
        assert reply.status == AckStatus.OK and kept == [] and tree.read("f") == new
    finally:
        tree.cleanup()


def test_nothing_may_be_written_in_the_kept_tree_nor_the_directory_above_it_moved():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        for seq, message in enumerate([
                m.WriteFile(0, KEPT + "/1/x", 0o644, 0, b"x", True), m.Mkdir(0, KEPT, 0o755),
                m.Symlink(0, KEPT + "/l", "x"), m.Delete(0, KEPT),
                m.Rename(0, ".lsync", "elsewhere"), m.Rename(0, "a", KEPT + "/a")], 1):
            reply = _answers(pair, message._replace(seq=seq))[1]
            assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_PATH, reply
        assert not os.path.exists(tree.path(".lsync"))
    finally:
        tree.cleanup()


def test_a_keep_that_cannot_be_made_refuses_the_write_and_leaves_the_edit():
    tree = TempTree()
    try:
        pair, _ = _session(tree)
        _answers(pair, m.WriteFile(1, "f", 0o644, 0, b"lsync", True))
        _edit_remote(tree, "f", b"remote")
        tree.write(".lsync", b"a file where the kept tree should go")
        kept, reply = _answers(pair, m.WriteFile(2, "f", 0o644, 0, b"local", True))
        assert isinstance(reply, m.Error) and "cannot keep the remote edit" in reply.message
        assert kept == [] and tree.read("f") == b"remote"
        assert [p for p in os.listdir(tree.root) if p.startswith(".lsync-tmp")] == []
        os.unlink(tree.path(".lsync"))
        kept, reply = _answers(pair, m.WriteFile(3, "f", 0o644, 0, b"local", True))
        assert reply.status == AckStatus.OK and tree.read(kept[0][1]) == b"remote"
    finally:
        tree.cleanup()


def test_a_kept_copy_survives_an_agent_killed_before_the_write_and_is_listed_next_time():
    tree = TempTree()
    home = TempTree()
    try:
        with home_at(home.root):
            pair, _ = _session(tree, use_cache=True)
            _answers(pair, m.WriteFile(1, "f", 0o644, 0, b"lsync", True))
            _answers(pair, m.WriteFile(2, "g", 0o644, 0, b"lsync", True))
            _edit_remote(tree, "f", b"remote f")
            _edit_remote(tree, "g", b"remote g")
            _answers(pair, m.WriteFile(3, "g", 0o644, 0, b"local g", True))
            # Killed between the keep and the rename: the keep is made, nothing else.
            dfd, name = pair.service.root.parent_fd("f")
            try:
                pair.service.keeper.before_replace(dfd, name, "f", b"")
            finally:
                os.close(dfd)
            pair.service.journal()  # what a killed agent had on disk (no close, no save)
            pair.service.lock.release()  # (as its death would)
            again, listed = _session(tree, use_cache=True)
            assert [(e[0], e[1]) for e in listed] == [("f", KEPT + "/2/f"),
                                                       ("g", KEPT + "/1/g")]
            assert tree.read("f") == b"remote f"
            # The client sends the write again: the edit, still there, is kept again.
            kept, reply = _answers(again, m.WriteFile(4, "f", 0o644, 0, b"local f", True))
            assert reply.status == AckStatus.OK and kept[0][1] == KEPT + "/3/f"
            assert tree.read(KEPT + "/2/f") == tree.read(KEPT + "/3/f") == b"remote f"
            assert tree.read("f") == b"local f"
    finally:
        tree.cleanup()
        home.cleanup()


def test_pooled_writes_keep_edits_and_tell_them_before_their_answers():
    tree = TempTree()
    try:
        sent = []
        service = AgentService(sent.append, lambda: None, lambda: 10 ** 18, use_cache=False,
                               pool=WritePool(4))
        service.handle(m.Hello(PROTOCOL_VERSION, {"hash": ["blake2b-128"]}, tree.root,
                               {"create_root": True}))
        names = ["f{}".format(i) for i in range(40)]
        service.handle(m.WriteBatch([[i + 1, n, 0o644, 2] for i, n in enumerate(names)],
                                    b"v1" * 40, 0))
        service.drain_pool()
        for name in names[::2]:
            _edit_remote(tree, name, b"remote " + name.encode())
        del sent[:]
        service.handle(m.WriteBatch([[i + 100, n, 0o644, 2] for i, n in enumerate(names)],
                                    b"v2" * 40, 0))
        big = b"x" * (keeping.VERIFY_MAX + 1)
        service.handle(m.WriteFile(200, names[0], 0o644, 0, big, True))  # pooled: > 256 KiB
        service.drain_pool()
        service.close()
        kinds = [type(s).__name__ for s in sent]
        assert kinds.index("Kept") < kinds.index("Acked"), kinds
        kept = [e for s in sent if isinstance(s, m.Kept) for e in s.entries]
        assert sorted(e[0] for e in kept) == sorted(names[::2])
        for path, kept_as, _, _, _ in kept:
            assert tree.read(kept_as) == b"remote " + path.encode()
        assert all(tree.read(n) == b"v2" for n in names[1:]) and tree.read(names[0]) == big
        assert stat.S_ISDIR(os.lstat(tree.path(KEPT)).st_mode)
    finally:
        tree.cleanup()


def test_kept_message_round_trips_and_bad_entries_are_malformed():
    good = m.Kept([["src/a.c", KEPT + "/1/src/a.c", "f", 12, 1700000000000000000],
                   ["l", KEPT + "/2/l", "l", 3, -5]], False)
    for message in (good, m.Kept([], True)):
        decoded = m.decode_message(m.encode_message(message), "a")
        assert decoded == message and type(decoded) is m.Kept
    for entries in ([["a", "b", "d", 0, 0]], [["a", "b", "f", -1, 0]], [["a", "b", "f", 0]],
                    [["a", 1, "f", 0, 0]], ["a"], "a", [["a", "b", "f", 0, 1.5]]):
        try:
            m.decode_message(m.encode_message(m.Kept(entries, False)), "a")
        except ProtocolError as exc:
            assert exc.code == ErrorCode.MALFORMED_FRAME, (entries, exc)
        else:
            raise AssertionError(entries)
    try:
        m.decode_message(m.encode_message(good), "c")
    except ProtocolError as exc:
        assert exc.code == ErrorCode.UNEXPECTED_MESSAGE
    else:
        raise AssertionError("a client may not send Kept")
