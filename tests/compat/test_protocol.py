"""Protocol tests with no sockets: framing, message validation, the conversation's order."""

import random
import struct

from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m
from lsync.protocol.connection import AGENT, CLIENT, Connection
from lsync.protocol.errors import ErrorCode, ProtocolError
from lsync.protocol.framing import MAGIC, FrameDecoder, encode_frame
from lsync.protocol.paths import relpath_problem

SAMPLES = [
    m.Hello(1, {"hash": ["xxh3-128"]}, "src/tree", {"create_root": True}),
    m.Welcome(1, {"hash": "blake2b-128"}, {"root": "/x", "python": "3.6.15"}),
    m.ListTree(7),
    m.ManifestBatch(7, [["a", "f", 3, 10, 420, b"d" * 16, None, b"d" * 16],
                        ["l", "l", 0, 0, 0, None, "a", b"a"],
                        ["d", "d", 0, 0, 493, None, None, b""],
                        ["n", "f", 3, 10, 420, None, None, None]], True),
    m.HashPaths(8, ["a", "b/c"]),
    m.Hashes(8, [b"x" * 16, None]),
    m.WriteFile(9, "a", 0o644, 0, b"data", True),
    m.WriteDelta(10, "a", 0o755, b"b" * 16, b"d" * 16, b"\x01\x01"),
    m.Delete(11, "a"),
    m.Rename(12, "a", "b"),
    m.Copy(13, "a", "b", 0o644, b"d" * 16),
    m.Mkdir(14, "d", 0o755),
    m.Symlink(15, "l", "../x"),
    m.SetMode(16, "a", 0o600),
    m.SetDictionary(17, b"#include <stdio.h>\n"),
    m.WriteFile(18, "z", 0o644, 0, b"packed", True, 3),
    m.Ack(9, 0, ""),
    m.Error(9, int(ErrorCode.NO_SPACE), "disk full"),
    m.Ping(1),
    m.Pong(1),
    m.Goodbye(0, "bye"),
]


def _sender(message):
    for cls, senders, _ in m.SCHEMA.values():
        if cls is type(message):
            return senders[0]
    raise AssertionError(message)


def _raises_protocol_error(func, *args):
    try:
        func(*args)
    except ProtocolError as exc:
        return exc
    raise AssertionError("no ProtocolError")


def test_every_message_round_trips_through_its_encoding():
    for message in SAMPLES:
        decoded = m.decode_message(m.encode_message(message), _sender(message))
        assert decoded == message and type(decoded) is type(message), message


def test_message_from_the_wrong_side_is_refused():
    payload = m.encode_message(m.WriteFile(1, "a", 0o644, 0, b"", True))
    exc = _raises_protocol_error(m.decode_message, payload, "a")
    assert exc.code == ErrorCode.UNEXPECTED_MESSAGE


def test_ill_typed_fields_are_malformed():
    import msgpack
    for bad in ([20, "x", "a", 0, 0, b"", True], [20, 1, "a", 0, 0, "text", True],
                [20, 1, "a"], [99, 1], "not a list", [], [True, 1], [22, -1, "a"]):
        exc = _raises_protocol_error(m.decode_message, msgpack.packb(bad, use_bin_type=True), "c")
        assert exc.code == ErrorCode.MALFORMED_FRAME, bad


def test_decoder_returns_frames_fed_one_byte_at_a_time():
    stream = MAGIC + encode_frame(b"one") + encode_frame(b"") + encode_frame(b"three")
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        got.extend(decoder.frames())
    assert got == [b"one", b"", b"three"]


def test_decoder_skips_a_banner_before_the_magic():
    decoder = FrameDecoder()
    decoder.feed(b"Welcome to host!\n" + MAGIC[:3])
    assert decoder.frames() == []
    decoder.feed(MAGIC[3:] + encode_frame(b"x"))
    assert decoder.frames() == [b"x"]
    assert decoder.skipped == b"Welcome to host!\n"


def test_decoder_gives_up_on_endless_junk():
    decoder = FrameDecoder()
    decoder.feed(b"j" * (65 * 1024))
    assert _raises_protocol_error(decoder.frames).code == ErrorCode.NO_MAGIC


def test_oversized_length_is_refused_before_the_payload_arrives():
    decoder = FrameDecoder(limit=1024)
    decoder.feed(MAGIC + struct.pack(">I", 1025))
    assert _raises_protocol_error(decoder.frames).code == ErrorCode.FRAME_TOO_LARGE


def test_hostile_bytes_raise_only_protocol_error():
    rng = random.Random(1234)
    valid = b"".join(encode_frame(m.encode_message(s)) for s in SAMPLES if _sender(s) == "c")
    for trial in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if trial % 3 == 0:
            data = bytearray(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        conn = Connection(AGENT)
        conn.receive_data(MAGIC + bytes(data))
        try:
            while conn.next_message() is not None:
                pass
        except ProtocolError:
            pass


def test_agent_refuses_operations_before_hello():
    agent = Connection(AGENT)
    client = Connection(CLIENT)
    client.send(m.Hello(PROTOCOL_VERSION, {}, "r", {}))
    client.data_to_send()
    # A second client stream that skips the Hello.
    rogue = MAGIC + encode_frame(m.encode_message(m.Delete(1, "a")))
    agent.receive_data(rogue)
    assert _raises_protocol_error(agent.next_message).code == ErrorCode.UNEXPECTED_MESSAGE


def test_client_refuses_replies_before_welcome():
    client = Connection(CLIENT)
    client.send(m.Hello(PROTOCOL_VERSION, {}, "r", {}))
    client.receive_data(MAGIC + encode_frame(m.encode_message(m.Ack(1, 0, ""))))
    assert _raises_protocol_error(client.next_message).code == ErrorCode.UNEXPECTED_MESSAGE


def test_client_may_pipeline_operations_behind_hello():
    client = Connection(CLIENT)
    client.send(m.Hello(PROTOCOL_VERSION, {}, "r", {}))
    client.send(m.WriteFile(1, "a", 0o644, 0, b"x", True))
    assert client.data_to_send().startswith(MAGIC)


def test_eof_inside_a_frame_is_a_lost_connection():
    client = Connection(CLIENT)
    client.send(m.Hello(PROTOCOL_VERSION, {}, "r", {}))
    client.receive_data(MAGIC + encode_frame(b"abc")[:5])
    assert client.next_message() is None
    assert _raises_protocol_error(client.receive_eof).code == ErrorCode.CONNECTION_LOST


def test_wire_paths_are_checked():
    for bad in ("", "/etc/passwd", "a/../b", "..", "a//b", "./a", "a/.", "a\x00b", "x" * 300):
        assert relpath_problem(bad), bad
    for good in ("a", "a/b.c", ".hidden/x", "a b/ü"):
        assert relpath_problem(good) == "", good


def test_manifest_entries_need_the_written_field():
    import msgpack
    good = ["a", "f", 3, 10, 420, None, None, None]
    for bad in (good[:7], good + [None], good[:7] + ["text"], good[:7] + [1]):
        payload = msgpack.packb([11, 1, [bad], True, [], "", ""], use_bin_type=True)
        exc = _raises_protocol_error(m.decode_message, payload, "a")
        assert exc.code == ErrorCode.MALFORMED_FRAME, bad
    payload = msgpack.packb([11, 1, [good], True, [], "", ""], use_bin_type=True)
    assert m.decode_message(payload, "a").entries == [good]


def test_frame_of_millions_of_nested_empty_arrays_is_refused_cheaply():
    # [11, [[], [], ...] * 400]: a legal-size frame (16 MB) that would build 16 million
    # lists (about 1 GB) if decoded whole.
    import resource

    inner = b"\xdc" + struct.pack(">H", 40000) + b"\x90" * 40000
    payload = b"\x92\x0b\xdc" + struct.pack(">H", 400) + inner * 400
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        m.decode_message(payload, "a")
    except ProtocolError as exc:
        assert exc.code == ErrorCode.MALFORMED_FRAME
    else:
        raise AssertionError("accepted a frame of 16 million lists")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100 * 1024, "decoding it took {} KB".format(grown_kb)


def test_a_full_manifest_batch_still_decodes():
    entries = [["d/f{}".format(i), m.KIND_FILE, 1, 0, 0o644, None, None, None]
               for i in range(5000)]
    payload = m.encode_message(m.ManifestBatch(7, entries, True))
    assert m.decode_message(payload, "a") == m.ManifestBatch(7, entries, True)
