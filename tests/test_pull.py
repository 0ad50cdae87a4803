"""Pulls (issue 18, part 1) without SSH: rules, the compile-database rewrite, the protocol
messages, block deltas, the push rules that leave pulled paths alone, and the agent's pull
service listing and sending through its outbox and through a lane socket (a socketpair)."""

from __future__ import annotations

import json
import os
import random
import select
import socket
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from lsync.agent.confined import ConfinedRoot
from lsync.agent.pull import PullSelector, PullService, block_copies, delta_for, list_selected
from lsync.client.buildloop.control import ControlError, PullRequest, RunRequest, parse_request
from lsync.client.buildloop.pull import _put_in_place, block_hashes, block_size_for
from lsync.client.buildloop.pullrules import (
    PullRules,
    PushRules,
    RewriteRules,
    rewrite_json,
    wire_rules,
)
from lsync.client.project import ProjectError, load_project, merge
from lsync.client.transport.pullroutes import PullRoutes
from lsync.protocol import hashing, packing
from lsync.protocol import messages as m
from lsync.protocol.delta import apply_delta_to_bytes
from lsync.protocol.errors import ErrorCode, ProtocolError
from lsync.protocol.framing import MAGIC, FrameDecoder, encode_frame

HASH = hashing.BLAKE2B_128
BOUND = 10.0  # seconds: no wait here comes near it

PATTERNS = ["compile_commands.json", "include/generated/**", "arch/*/include/generated/",
            "/top.log", "build/", "!build/keep/", "*.o", "!vmlinux.o", "docs/**/*.html",
            "a?c[0-9].txt"]
PATHS = [
    ("compile_commands.json", False), ("build/compile_commands.json", False),
    ("include/generated/autoconf.h", False), ("include/generated/uapi/v.h", False),
    ("include/generated", True), ("include/linux/fs.h", False),
    ("arch/x86/include/generated/asm/x.h", False), ("arch/x86/include/generated", True),
    ("arch/x86/include/asm/x.h", False), ("top.log", False), ("sub/top.log", False),
    ("build/out.txt", False), ("build", True), ("build/keep/a", False), ("build/keep", True),
    ("src/a.o", False), ("vmlinux.o", False), ("docs/x/y/z.html", False), ("docs/z.html", False),
    ("abc1.txt", False), ("abc12.txt", False), ("src/main.c", False),
]


# -- rules ------------------------------------------------------------------------------------


def test_the_agent_selects_exactly_what_the_client_rules_select() -> None:
    client = PullRules(PATTERNS)
    agent = PullSelector(wire_rules(PATTERNS))
    for path, is_dir in PATHS:
        assert agent.selects(path, is_dir) == client.selects(path, is_dir), path
    expected = {"compile_commands.json", "build/compile_commands.json",
                "include/generated/autoconf.h", "include/generated/uapi/v.h",
                "arch/x86/include/generated/asm/x.h", "arch/x86/include/generated", "top.log",
                "build/out.txt", "build", "build/keep/a", "build/keep", "src/a.o",
                "docs/x/y/z.html", "docs/z.html", "abc1.txt"}
    assert {p for p, d in PATHS if client.selects(p, d)} == expected


def test_random_trees_list_the_same_files_as_a_walk_of_everything(tmp_path: Path) -> None:
    rng = random.Random(18)
    names = ["a", "b", "include", "generated", "arch", "x86", "build", "keep", "docs",
             "compile_commands.json", "top.log", "m.o", "vmlinux.o", "p.html", "abc1.txt"]
    files: list[str] = []
    for _ in range(300):
        parts = [rng.choice(names) for _ in range(rng.randint(1, 5))]
        path = tmp_path.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text("x")
                files.append("/".join(parts))
        except (NotADirectoryError, FileExistsError, IsADirectoryError):
            continue
    root = ConfinedRoot(str(tmp_path))
    try:
        for patterns in (PATTERNS, ["include/generated/**"], ["/top.log"], ["x86/"]):
            selector = PullSelector(wire_rules(patterns))
            listed = {e[0] for e in list_selected(root.fd, selector, 0)}
            rules = PullRules(patterns)
            assert listed == {f for f in files if rules.selects(f)}, patterns
    finally:
        root.close()


def test_anchored_rules_let_the_agent_skip_directories_they_cannot_reach() -> None:
    selector = PullSelector(wire_rules(["include/generated/**", "/top.log",
                                        "arch/*/include/generated/"]))
    assert selector.may_reach("include") and selector.may_reach("include/generated/uapi")
    assert selector.may_reach("arch/x86/kernel")  # (a glob follows "arch/")
    assert not selector.may_reach("drivers") and not selector.may_reach("fs/ext4")
    assert PullSelector(wire_rules(["compile_commands.json"])).may_reach("deep/down")
    assert PullSelector(wire_rules(["**/gen/*.h"])).may_reach("anywhere")


def test_remote_edits_kept_aside_are_never_pulled_as_build_output(tmp_path: Path) -> None:
    kept = tmp_path / m.KEPT_DIR / "1" / "build"
    kept.mkdir(parents=True)
    (kept / "app.bin").write_text("an edit kept aside")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "app.bin").write_text("built")
    root = ConfinedRoot(str(tmp_path))
    try:
        for patterns in (["**/*.bin"], ["*"]):
            selector = PullSelector(wire_rules(patterns))
            listed = {e[0] for e in list_selected(root.fd, selector, 0)}
            assert listed == {"build/app.bin"}, patterns
    finally:
        root.close()


def test_a_rule_the_agent_cannot_compile_is_refused() -> None:
    with pytest.raises(ValueError):
        PullSelector([["(unclosed", 0, ""]])


def test_push_rules_ignore_what_is_pulled_and_what_a_pull_made(tmp_path: Path) -> None:
    rules = PushRules(tmp_path, ["*.tmp"], pull=PullRules(["build/*.bin"]), git_index=False)
    # Kept remote edits brought back for a merge, in any session:
    assert rules.is_ignored("src/main.c.lsync-remote-3", False)
    assert not rules.is_ignored("src/main.c.lsync-remote-3", True)
    assert rules.is_ignored("build/app.bin", False) and not rules.is_ignored("build/a.c", False)
    assert rules.is_ignored("x.tmp", False) and not rules.is_ignored("src/main.c", False)
    rules.pulled.add("logs/test.log")
    rules.pulled_dirs.add("out")
    assert rules.is_ignored("logs/test.log", False) and not rules.is_ignored("logs", True)
    assert rules.is_ignored("out", True) and rules.is_ignored("out/deep/file", False)
    explained = rules.explain("build/app.bin", False)
    assert explained is not None and "[pull]" in str(explained)


# -- the compile database -------------------------------------------------------------------


def test_a_compile_database_is_rewritten_to_local_paths_as_json() -> None:
    remote, local = "/home/me/build/proj", "/work/proj"
    database = [
        {"directory": f"{remote}/build", "file": f"{remote}/src/main.c",
         "command": f"/usr/bin/cc -I{remote}/build/generated -o x.o -c {remote}/src/main.c",
         "output": f"{remote}/build/x.o"},
        {"directory": f"{remote}/build", "file": "../src/b.c",
         "arguments": ["cc", f"-I{remote}/inc", "-c", f"{remote}2/other.c", "-DX=\"a b\""],
         "extra": {"keep": f"{remote}/untouched"}},
    ]
    out = json.loads(rewrite_json(json.dumps(database).encode(), remote, local))
    assert out[0] == {"directory": f"{local}/build", "file": f"{local}/src/main.c",
                      "command": f"/usr/bin/cc -I{local}/build/generated -o x.o -c "
                                 f"{local}/src/main.c",
                      "output": f"{local}/build/x.o"}
    assert out[1]["arguments"] == ["cc", f"-I{local}/inc", "-c", f"{remote}2/other.c",
                                   "-DX=\"a b\""]
    assert out[1]["file"] == "../src/b.c"
    assert out[1]["extra"] == {"keep": f"{remote}/untouched"}  # not a key of the format


def test_a_file_to_rewrite_that_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError):
        rewrite_json(b"[{\"directory\": ", "/r", "/l")
    with pytest.raises(ValueError):
        rewrite_json(b"\xff\xfe", "/r", "/l")


def test_rewrite_rules_name_files_at_any_depth_or_by_pattern() -> None:
    rules = RewriteRules(["compile_commands.json", "out/*.json"])
    assert rules.wants("build/compile_commands.json") and rules.wants("out/db.json")
    assert not rules.wants("build/other.json") and not RewriteRules(()).wants("x.json")


# -- protocol ---------------------------------------------------------------------------------

MESSAGES: list[tuple[m.Message, str]] = [
    (m.PullList(7, wire_rules(PATTERNS), 5_000_000_000), "c"),
    (m.PullListing(7, [["a/b.h", 10, 1_700_000_000_000_000_000, 0o644]], True), "a"),
    (m.PullFetch(8, "build/app.bin", b"\x01" * 16, 100, 64, b"\x02" * 16), "c"),
    (m.PullFetch(9, "x", None, 0, 0, b""), "c"),
    (m.PullData(8, 1 << 20, b"data", packing.PACK_ZLIB), "a"),
    (m.PullDone(8, m.PULL_FAILED, 0, 0o755, b"", int(ErrorCode.NOT_FOUND), "gone"), "a"),
]


@pytest.mark.parametrize(("message", "sender"), MESSAGES)
def test_pull_messages_round_trip(message: m.Message, sender: str) -> None:
    assert m.decode_message(m.encode_message(message), sender) == message
    with pytest.raises(ProtocolError):
        m.decode_message(m.encode_message(message), "a" if sender == "c" else "c")


def test_ill_typed_pull_messages_are_refused() -> None:
    for fields in ([80, 1, [["re", -1, ""]], 0], [80, 1, [["re", 0]], 0],
                   [82, 1, "p", "not bytes", 0, 0, b""], [84, 1, 0, 0, 0, b"", 0],
                   [81, 1, [["p", 1, 2]], True]):
        with pytest.raises(ProtocolError):
            m.decode_message(msgpack.packb(fields, use_bin_type=True), "a" if fields[0] in (
                81, 84) else "c")


def test_block_hashes_that_do_not_cover_the_base_are_a_bad_request() -> None:
    ok = m.PullFetch(1, "f", b"d", 100, 64, b"\x00" * 16)
    assert m.request_problem(ok) is None
    for bad in (ok._replace(blocks=b"\x00" * 15), ok._replace(base_size=200),
                ok._replace(block_size=0)):
        problem = m.request_problem(bad)
        assert problem is not None and problem[0] == ErrorCode.BAD_REQUEST


# -- deltas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["in place", "appended", "truncated", "block moved"])
def test_block_deltas_rebuild_the_new_file_from_the_local_copy(edit: str) -> None:
    rng = random.Random(edit)
    old = rng.randbytes(1_000_000)
    new = bytearray(old)
    if edit == "in place":
        new[300_000:300_050] = rng.randbytes(50)
    elif edit == "appended":
        new += rng.randbytes(70_000)
    elif edit == "truncated":
        del new[900_000:]
    else:
        new = new[65536 * 4:65536 * 8] + new[:65536 * 4] + new[65536 * 8:]
    block = block_size_for(len(old))
    fetch = m.PullFetch(1, "f", b"x", len(old), block, block_hashes(old, block))
    delta = delta_for(bytes(new), fetch)
    assert delta is not None and len(delta) < len(new) // 4
    assert apply_delta_to_bytes(delta, old, 1 << 30) == bytes(new)
    assert block_copies(bytes(new), len(old), block, b"") == []


# -- the agent's pull service -----------------------------------------------------------------


def _wait_readable(fd: int) -> None:
    assert select.select([fd], [], [], BOUND)[0], "nothing came within the bound"


def _from_outbox(service: PullService, until: Callable[[m.Message], bool]) -> list[m.Message]:
    got: list[m.Message] = []
    while not got or not until(got[-1]):
        _wait_readable(service.wakeup_fd)
        got.extend(service.take_outbox())
    return got


def _from_lane(sock: socket.socket, decoder: FrameDecoder, seq: int) -> list[m.Message]:
    got: list[m.Message] = []
    while not got or not isinstance(got[-1], m.PullDone):
        _wait_readable(sock.fileno())
        decoder.feed(sock.recv(1 << 20))
        got.extend(m.decode_message(frame, "a") for frame in decoder.frames())
    assert all(getattr(message, "seq", seq) == seq for message in got)
    return got


def _payload(messages: list[m.Message]) -> tuple[bytes, m.PullDone]:
    done = messages[-1]
    assert isinstance(done, m.PullDone)
    data = b"".join(packing.unpack(x.data, x.packing, m.MAX_CHUNK) if x.packing else x.data
                    for x in messages if isinstance(x, m.PullData))
    return data, done


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "build" / "gen").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "build" / "gen" / "a.h").write_text("#define A 1\n")
    (root / "build" / "big.bin").write_bytes(random.Random(1).randbytes(3 << 20))
    (root / "build" / "text.log").write_text("line\n" * 100_000)
    (root / "src" / "main.c").write_text("int main;\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.h").write_text("secret\n")
    (root / "build" / "escape").symlink_to(tmp_path / "outside")
    return root


def _service(root: ConfinedRoot) -> PullService:
    return PullService(lambda: root, lambda: HASH, lambda: 10**19)


def test_the_agent_lists_selected_files_without_following_symlinks(tree: Path) -> None:
    root = ConfinedRoot(str(tree))
    service = _service(root)
    try:
        service.handle(m.PullList(1, wire_rules(["build/**"]), 0))
        got = _from_outbox(service, lambda x: isinstance(x, m.PullListing) and x.done)
        listed = sorted(e[0] for x in got if isinstance(x, m.PullListing) for e in x.entries)
        assert listed == ["build/big.bin", "build/gen/a.h", "build/text.log"]
        service.handle(m.PullList(2, wire_rules(["build/**"]), 1))  # changed in the last ns
        got = _from_outbox(service, lambda x: isinstance(x, m.PullListing) and x.done)
        assert [x.entries for x in got if isinstance(x, m.PullListing)] == [[]]
        service.handle(m.PullList(3, [["(", 0, ""]], 0))
        refused = _from_outbox(service, lambda x: True)
        assert isinstance(refused[0], m.Error) and refused[0].code == ErrorCode.BAD_REQUEST
    finally:
        service.close()
        root.close()


def test_the_agent_sends_files_whole_same_or_as_deltas_on_a_lane(tree: Path) -> None:
    root = ConfinedRoot(str(tree))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    service = _service(root)
    decoder = FrameDecoder()  # (the stream back starts with the magic, once)
    try:
        text = (tree / "build" / "text.log").read_bytes()
        service.handle(m.PullFetch(5, "build/text.log", None, 0, 0, b""), ours)
        data, done = _payload(_from_lane(theirs, decoder, 5))
        assert (data, done.outcome, done.size) == (text, m.PULL_WHOLE, len(text))
        assert done.digest == hashing.digest_of(HASH, text)
        service.handle(m.PullFetch(6, "build/text.log", done.digest, len(text), 0, b""), ours)
        data, done = _payload(_from_lane(theirs, decoder, 6))
        assert (data, done.outcome) == (b"", m.PULL_SAME)
        big = (tree / "build" / "big.bin").read_bytes()
        mine = bytearray(big)
        mine[2_000_000:2_000_010] = b"local edit"
        block = block_size_for(len(mine))
        service.handle(m.PullFetch(7, "build/big.bin", hashing.digest_of(HASH, bytes(mine)),
                                   len(mine), block, block_hashes(bytes(mine), block)), ours)
        delta, done = _payload(_from_lane(theirs, decoder, 7))
        assert done.outcome == m.PULL_DELTA and len(delta) < len(big) // 10
        assert apply_delta_to_bytes(delta, bytes(mine), 1 << 30) == big
        for seq, path, code in ((8, "build/escape/secret.h", ErrorCode.BAD_PATH),
                                (9, "build/none", ErrorCode.NOT_FOUND),
                                (10, "../outside/secret.h", ErrorCode.BAD_PATH)):
            service.handle(m.PullFetch(seq, path, None, 0, 0, b""), ours)
            _, done = _payload(_from_lane(theirs, decoder, seq))
            assert (done.outcome, done.code) == (m.PULL_FAILED, code), path
    finally:
        service.close()
        root.close()
        ours.close()
        theirs.close()


def test_without_a_lane_the_agent_sends_through_its_outbox(tree: Path) -> None:
    root = ConfinedRoot(str(tree))
    service = _service(root)
    try:
        service.handle(m.PullFetch(3, "build/gen/a.h", None, 0, 0, b""))
        data, done = _payload(_from_outbox(service, lambda x: isinstance(x, m.PullDone)))
        assert data == b"#define A 1\n" and done.mode == 0o644
    finally:
        service.close()
        root.close()


# -- putting a pulled file in place -----------------------------------------------------------


def test_a_pulled_file_never_replaces_a_local_file_changed_meanwhile(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "t1").write_bytes(b"pulled")
        assert _put_in_place(fd, "f", "t1", 0o755, None) is not None  # absent: put there
        assert (tmp_path / "f").read_bytes() == b"pulled"
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o755
        st = (tmp_path / "f").stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        (tmp_path / "f").write_bytes(b"edited")  # the user, between the look and the rename
        (tmp_path / "t2").write_bytes(b"newer")
        assert _put_in_place(fd, "f", "t2", 0o644, stamp) is None
        assert (tmp_path / "f").read_bytes() == b"edited" and not (tmp_path / "t2").exists()
    finally:
        os.close(fd)


# -- the project file and the control socket --------------------------------------------------


def test_the_pull_table_of_the_project_file(tmp_path: Path) -> None:
    (tmp_path / ".lsync.toml").write_text(
        'target = "h:t"\n[pull]\npaths = ["compile_commands.json", "include/generated/**"]\n'
        'rewrite = ["db.json"]\nafter_run = false\n')
    project = load_project(tmp_path)
    assert project is not None
    assert project.pull_paths == ("compile_commands.json", "include/generated/**")
    assert project.pull_rewrite == ("db.json",) and project.pull_after_run is False
    settings = merge(project, object())
    assert settings.pull_paths == project.pull_paths
    (tmp_path / ".lsync.toml").write_text('[pull]\npaths = ["a"]\n')
    project = load_project(tmp_path)
    assert project is not None and project.pull_rewrite == ("compile_commands.json",)
    assert project.pull_after_run is True
    for text, key in (('[pull]\npaths = "a"\n', "pull.paths"), ('pull = 1\n', "pull"),
                      ('[pull]\npath = ["a"]\n', "pull.path")):
        (tmp_path / ".lsync.toml").write_text(text)
        with pytest.raises(ProjectError) as caught:
            load_project(tmp_path)
        assert f"`{key}`" in str(caught.value), text


def test_pull_and_run_requests_on_the_control_socket_parse() -> None:
    assert parse_request(b'{"v":1,"op":"pull"}') == PullRequest()
    assert parse_request(b'{"v":1,"op":"pull","patterns":["a/*.h"],"timeout":3}') == \
        PullRequest(("a/*.h",), 3.0)
    assert parse_request(b'{"v":1,"op":"run","argv":["make"],"pull":true}') == \
        RunRequest(argv=("make",), pull=True)
    assert parse_request(b'{"v":1,"op":"pull","kept":["src/a.c"]}') == \
        PullRequest(kept=("src/a.c",))
    for bad in (b'{"v":1,"op":"pull","patterns":"a"}', b'{"v":1,"op":"pull","x":1}',
                b'{"v":1,"op":"pull","patterns":[1]}', b'{"v":1,"op":"run","argv":["a"],'
                b'"pull":"yes"}', b'{"v":1,"op":"pull","kept":["../etc/passwd"]}',
                b'{"v":1,"op":"pull","kept":"a.c"}'):
        with pytest.raises(ControlError):
            parse_request(bad)


def test_a_bug_in_a_fetch_is_answered_not_left_hanging(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(content: bytes, msg: m.PullFetch) -> bytes | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("lsync.agent.pull.delta_for", broken)
    logged: list[str] = []
    root = ConfinedRoot(str(tree))
    service = PullService(lambda: root, lambda: HASH, lambda: 10**19,
                          lambda context, trace: logged.append(context))
    try:
        big = (tree / "build" / "big.bin").read_bytes()
        service.handle(m.PullFetch(4, "build/big.bin", b"\0" * 16, len(big), 1 << 20,
                                   block_hashes(big, 1 << 20)))
        _, done = _payload(_from_outbox(service, lambda x: isinstance(x, m.PullDone)))
        assert (done.outcome, done.code) == (m.PULL_FAILED, ErrorCode.INTERNAL)
        assert "RuntimeError" in done.message and logged == ["pulling"]
    finally:
        service.close()
        root.close()


# -- the link's routes ------------------------------------------------------------------------


def test_pull_routes_deliver_by_seq_and_refuse_what_nobody_asked_for() -> None:
    routes = PullRoutes()
    got: list[m.Message | None] = []
    routes.open(3, got.append)
    assert routes and 3 in routes
    routes.deliver(m.PullListing(3, [], True))
    with pytest.raises(ProtocolError):
        routes.deliver(m.PullListing(4, [], True))
    done = m.PullDone(3, m.PULL_SAME, 0, 0o644, b"d", 0, "")
    frames = MAGIC + encode_frame(m.encode_message(done))
    routes.lane_data(2, frames[:5])  # (a frame may come in pieces)
    routes.lane_data(2, frames[5:])
    with pytest.raises(ProtocolError):
        routes.lane_data(1, MAGIC + encode_frame(m.encode_message(m.Ack(3, 0, ""))))
    routes.end()
    assert got == [m.PullListing(3, [], True), done, None] and not routes
