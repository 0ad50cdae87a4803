"""WriteBatch: many small files in one message, each its own operation and answer."""

import os
import stat
import zlib

from lsync.agent import confined
from lsync.protocol import hashing
from lsync.protocol import messages as m
from lsync.protocol.errors import ErrorCode, ProtocolError
from tests.compat.helpers import Pair, TempTree, manifest


def _session():
    tree = TempTree()
    pair = Pair(tree.root)
    welcome = pair.pump()
    assert isinstance(welcome[0], m.Welcome), welcome
    return tree, pair, welcome[0].chosen["hash"]


def _batch(files, packed=True):
    """[(seq, path, mode, content)] as one WriteBatch."""
    joined = b"".join(content for _, _, _, content in files)
    return m.WriteBatch([[seq, path, mode, len(content)] for seq, path, mode, content in files],
                        zlib.compress(joined) if packed else joined, int(packed))


def _answers(replies):
    out = {}
    for reply in replies:
        if isinstance(reply, m.Acked):
            for seq in reply.seqs:
                out[seq] = "ok"
        elif isinstance(reply, m.Error):
            out[reply.seq] = ErrorCode(reply.code)
    return out


def _no_temp_files(tree):
    return [p for p in tree.listing() if confined.TEMP_PREFIX in p] == []


def test_batch_writes_every_file_with_its_mode_and_acks_them_in_one_answer():
    tree, pair, algorithm = _session()
    try:
        files = [(1, "a.c", 0o644, b"int a;\n" * 50), (2, "d/b.c", 0o755, b""),
                 (3, "d/e/c.h", 0o600, b"#define C 1\n")]
        pair.client.send(_batch(files))
        replies = pair.pump()
        assert replies == [m.Acked([1, 2, 3])]
        for _, path, mode, content in files:
            assert tree.read(path) == content
            assert stat.S_IMODE(os.stat(tree.path(path)).st_mode) == mode
        entries = manifest(pair, 4)
        # The agent knows the digests and that lsync wrote them (the `written` field).
        assert entries["a.c"][5] == hashing.digest_of(algorithm, b"int a;\n" * 50)
        assert entries["d/e/c.h"][7] == hashing.digest_of(algorithm, b"#define C 1\n")
        assert _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_a_batch_with_the_clients_digests_is_recorded_with_them_unhashed():
    """The client sends the digest of each file it read (of the bytes it sends); the agent
    records it as it would its own hash of the content, without hashing it again."""
    tree, pair, algorithm = _session()
    try:
        files = [(1, "a.c", 0o644, b"int a;\n" * 50), (2, "d/b.c", 0o644, b"int b;\n")]
        digests = {path: hashing.digest_of(algorithm, content)
                   for _, path, _, content in files}
        joined = b"".join(content for _, _, _, content in files)
        batch = m.WriteBatch([[seq, path, mode, len(content), digests[path]]
                              for seq, path, mode, content in files], joined, 0)
        original = hashing.new_hasher
        hashed = []

        def counting(name):
            hashed.append(name)
            return original(name)

        hashing.new_hasher = counting
        try:
            pair.client.send(batch)
            assert pair.pump() == [m.Acked([1, 2])]
        finally:
            hashing.new_hasher = original
        assert hashed == []  # (the agent took the client's digests)
        entries = manifest(pair, 3)
        assert entries["a.c"][5] == digests["a.c"] and entries["d/b.c"][5] == digests["d/b.c"]
        assert tree.read("d/b.c") == b"int b;\n"
    finally:
        tree.cleanup()


def test_a_refused_file_fails_alone_and_its_neighbours_are_written():
    tree, pair, _ = _session()
    try:
        os.mkdir(tree.path("dir"))
        pair.client.send(_batch([(1, "ok1", 0o644, b"one"), (2, "../escape", 0o644, b"evil"),
                                 (3, "dir", 0o644, b"over a directory"),
                                 (4, "ok2", 0o644, b"two")], packed=False))
        answers = _answers(pair.pump())
        assert answers == {1: "ok", 2: ErrorCode.BAD_PATH, 3: ErrorCode.TYPE_CONFLICT, 4: "ok"}
        assert tree.read("ok1") == b"one" and tree.read("ok2") == b"two"
        assert os.path.isdir(tree.path("dir"))
        assert not os.path.exists(os.path.join(os.path.dirname(tree.root), "escape"))
        assert _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_a_batch_whose_data_does_not_match_its_sizes_fails_every_file_and_writes_none():
    tree, pair, _ = _session()
    try:
        short = m.WriteBatch([[1, "a", 0o644, 10], [2, "b", 0o644, 10]], zlib.compress(b"x" * 15),
                             1)
        pair.client.send(short)
        assert _answers(pair.pump()) == {1: ErrorCode.BAD_REQUEST, 2: ErrorCode.BAD_REQUEST}
        # More data than the sizes say (a bomb is cut off at the sizes' sum).
        bomb = m.WriteBatch([[3, "c", 0o644, 10]], zlib.compress(b"\0" * (m.MAX_CHUNK + 1)), 1)
        pair.client.send(bomb)
        assert _answers(pair.pump()) == {3: ErrorCode.BAD_DELTA}
        garbage = m.WriteBatch([[4, "d", 0o644, 3]], b"not zlib", 1)
        pair.client.send(garbage)
        assert _answers(pair.pump()) == {4: ErrorCode.BAD_DELTA}
        too_big = m.WriteBatch([[5, "e", 0o644, m.MAX_CHUNK], [6, "f", 0o644, 1]], b"", 0)
        pair.client.send(too_big)
        assert _answers(pair.pump()) == {5: ErrorCode.BAD_REQUEST, 6: ErrorCode.BAD_REQUEST}
        assert not any(os.path.exists(tree.path(name)) for name in "abcdef")
        assert _no_temp_files(tree)
    finally:
        tree.cleanup()


def test_malformed_batches_are_refused_at_the_decode_boundary():
    bad = [
        [29, [], b"", 0],  # no files
        [29, [[1, "a", 0o644]], b"", 0],  # an entry of three fields
        [29, [[1, 2, 0o644, 0]], b"", 0],  # a path that is not a string
        [29, [[-1, "a", 0o644, 0]], b"", 0],  # a negative seq
        [29, [[i, "a", 0o644, 0] for i in range(m.MAX_BATCH_FILES + 1)], b"", 0],
        [29, [[1, "a", 0o644, 0]], "text", 0],  # data that is not bytes
        [29, [[1, "a", 0o644, 1, b"short"]], b"x", 0],  # a digest of the wrong size
        [29, [[1, "a", 0o644, 1, "x" * 16]], b"x", 0],  # a digest that is not bytes
        [29, [[1, "a", 0o644, 1, b"d" * 16, 0]], b"x", 0],  # an entry of six fields
    ]
    import msgpack
    for obj in bad:
        try:
            m.decode_message(msgpack.packb(obj, use_bin_type=True), "c")
        except ProtocolError as exc:
            assert exc.code == ErrorCode.MALFORMED_FRAME, obj[:2]
        else:
            raise AssertionError("accepted {}".format(obj[:2]))
    # And only a client may send one.
    good = [29, [[1, "a", 0o644, 1]], b"x", 0]
    assert isinstance(m.decode_message(msgpack.packb(good, use_bin_type=True), "c"),
                      m.WriteBatch)
    try:
        m.decode_message(msgpack.packb(good, use_bin_type=True), "a")
    except ProtocolError as exc:
        assert exc.code == ErrorCode.UNEXPECTED_MESSAGE
    else:
        raise AssertionError("an agent's WriteBatch was accepted")


def test_packed_messages_are_unwrapped_at_the_decode_boundary_and_bad_ones_refused():
    import msgpack
    inner = m.ManifestBatch(7, [["a.c", "f", 3, 0, 0o644, None, None, None]], True)
    envelope = m.packed(inner)
    assert len(envelope.payload) < len(m.encode_message(inner)) + 16
    assert m.decode_message(m.encode_message(envelope), "a") == inner
    nested = m.Packed(zlib.compress(m.encode_message(envelope)))
    bomb = m.Packed(zlib.compress(b"\x00" * (m.MAX_PACKED + 1)))
    garbage = m.Packed(b"not zlib")
    truncated = m.Packed(zlib.compress(m.encode_message(inner))[:-3])
    for bad in (nested, bomb, garbage, truncated):
        try:
            m.decode_message(m.encode_message(bad), "a")
        except ProtocolError as exc:
            assert exc.code == ErrorCode.MALFORMED_FRAME
        else:
            raise AssertionError("accepted a bad Packed message")
    # A client may not send one, and what is inside is checked like any message.
    try:
        m.decode_message(m.encode_message(envelope), "c")
    except ProtocolError as exc:
        assert exc.code == ErrorCode.UNEXPECTED_MESSAGE
    else:
        raise AssertionError("a client's Packed message was accepted")
    ill_typed = m.Packed(zlib.compress(msgpack.packb([11, 7, "not entries", True],
                                                     use_bin_type=True)))
    try:
        m.decode_message(m.encode_message(ill_typed), "a")
    except ProtocolError as exc:
        assert exc.code == ErrorCode.MALFORMED_FRAME
    else:
        raise AssertionError("an ill-typed packed message was accepted")


def test_an_older_write_arriving_after_a_newer_one_of_its_path_is_not_applied():
    # Writes of one path may come on different streams (data lanes): seq order wins.
    from lsync.protocol.errors import AckStatus
    tree, pair, _ = _session()
    try:
        assert pair.op(m.WriteFile(200, "p.c", 0o644, 0, b"newest\n", True)) == \
            m.Ack(200, 0, "")
        pair.client.send(_batch([(100, "p.c", 0o644, b"older, from a batch\n"),
                                 (101, "q.c", 0o644, b"q\n")]))
        replies = pair.pump()
        assert m.Ack(100, int(AckStatus.SUPERSEDED), "") in replies
        assert _answers(replies).get(101) == "ok"
        assert tree.read("p.c") == b"newest\n" and tree.read("q.c") == b"q\n"
        # A chunked older write: its chunks are ignored, its last one answered.
        pair.client.send(m.WriteFile(150, "p.c", 0o644, 0, b"a" * 10, False))
        assert pair.pump() == []
        reply = pair.op(m.WriteFile(150, "p.c", 0o644, 10, b"b" * 5, True))
        assert reply == m.Ack(150, int(AckStatus.SUPERSEDED), "")
        assert tree.read("p.c") == b"newest\n"
        # A newer one still applies, as does any write of another path.
        assert pair.op(m.WriteFile(300, "p.c", 0o644, 0, b"later\n", True)).status == 0
        assert tree.read("p.c") == b"later\n"
        reply = pair.op(m.WriteDelta(250, "p.c", 0o644, b"\0" * 16, b"\0" * 16, b""))
        assert reply == m.Ack(250, int(AckStatus.SUPERSEDED), "")
        assert _no_temp_files(tree)
    finally:
        tree.cleanup()
