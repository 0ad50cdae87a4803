"""Single paths below the root (lsync.client.local.confined_open, through the scanner's
lstat_confined, read_file_stable, stat_path, scan_dir and StableFileReader): never through a
symlink, never outside the root, never through a stale root descriptor, and the same
answers from openat2(2) and from the component-by-component walk.

Every test taking `impl` runs twice: with openat2 (skipped where the kernel lacks it; the
test then checks that openat2 really answered) and with the walk forced.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lsync.client.local import confined_open
from lsync.client.local.hashcache import RACY_NS, HashCache
from lsync.client.local.ignore import IgnoreRules
from lsync.client.local.localentry import NotRegularFileError
from lsync.client.local.scanner import lstat_confined, scan_dir, stat_path
from lsync.client.local.stableread import StableFileReader, read_file_stable


def new_cache() -> HashCache:
    return HashCache("xxh3-128", None, clock=lambda: time.time_ns() + 5 * RACY_NS)


def write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass
class Impl:
    name: str
    openat2_calls: list[bytes] = field(default_factory=list)

    def check_used(self) -> None:
        """With openat2, that it answered (paths of one component never need it)."""
        if self.name == "openat2":
            assert self.openat2_calls, "openat2 was never called: the test did not test it"
        else:
            assert not self.openat2_calls


@pytest.fixture(params=["openat2", "walk"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Impl]:
    """Which resolution the scanner uses; a spy records openat2's calls."""
    chosen = Impl(request.param)
    real = confined_open._openat2
    if chosen.name == "walk":
        monkeypatch.setattr(confined_open, "openat2_enabled", False)
    elif real is None:
        pytest.skip("openat2 is not available here")
    if real is not None:
        def spy(dir_fd: int, path: bytes, flags: int) -> int:
            chosen.openat2_calls.append(path)
            return real(dir_fd, path, flags)

        monkeypatch.setattr(confined_open, "_openat2", spy)
    yield chosen


def fds_below(path: Path) -> list[str]:
    """What this process's open descriptors name below `path` (or `path` itself)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(path) or target.startswith(f"{path}/"):
            found.append(target)
    return found


def symlinked_tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/real/a/b/c/f.c with symlinks to its directories at every level, and an
    `outside` directory next to the root holding a file of the same name."""
    root = tmp_path / "root"
    write(root, "real/a/b/c/f.c", b"inside\n")
    write(tmp_path, "outside/a/b/c/f.c", b"outside\n")
    os.symlink("real", root / "first")                        # first component
    os.symlink("b", root / "real/a/middle")                   # a middle one
    os.symlink("c", root / "real/a/b/last")                   # the last but one
    os.symlink(str(root / "real/a"), root / "real/absolute")  # absolute, inside the root
    os.symlink("../outside", root / "escape")                 # relative, leaving the root
    os.symlink(str(tmp_path / "outside"), root / "real/far")  # absolute, leaving the root
    return root, tmp_path / "outside"


THROUGH_LINKS = [
    "first/a/b/c/f.c",
    "real/a/middle/c/f.c",
    "real/a/b/last/f.c",
    "real/absolute/b/c/f.c",
    "escape/a/b/c/f.c",
    "real/far/a/b/c/f.c",
    "first/a",
    "real/a/middle/c",
]


@pytest.mark.parametrize("rel", THROUGH_LINKS)
def test_a_symlink_in_any_component_is_never_followed(tmp_path: Path, impl: Impl,
                                                      rel: str) -> None:
    root, _ = symlinked_tree(tmp_path)
    cache, rules = new_cache(), IgnoreRules(root)
    assert lstat_confined(root, rel) is None
    assert stat_path(root, rel, rules, cache) is None
    assert scan_dir(root, rel, rules, cache) is None
    with pytest.raises(FileNotFoundError):
        read_file_stable(root, rel, cache)
    with pytest.raises(FileNotFoundError):
        StableFileReader(root, rel, cache)
    impl.check_used()


def test_the_same_paths_without_links_are_read(tmp_path: Path, impl: Impl) -> None:
    root, _ = symlinked_tree(tmp_path)
    cache = new_cache()
    found = lstat_confined(root, "real/a/b/c/f.c")
    assert found is not None and found[1] is None
    assert found[0].st_ino == os.lstat(root / "real/a/b/c/f.c").st_ino
    assert read_file_stable(root, "real/a/b/c/f.c", cache)[0] == b"inside\n"
    with StableFileReader(root, "real/a/b/c/f.c", cache) as reader:
        assert b"".join(reader) == b"inside\n"
    listing = scan_dir(root, "real/a/b", IgnoreRules(root), cache)
    assert listing is not None and set(listing) == {"real/a/b/c", "real/a/b/last"}
    impl.check_used()


@pytest.mark.parametrize("rel", ["first", "real/a/middle", "real/a/b/last", "escape",
                                 "real/far", "real/absolute"])
def test_a_symlink_as_the_last_component_is_reported_as_a_link(tmp_path: Path, impl: Impl,
                                                               rel: str) -> None:
    root, _ = symlinked_tree(tmp_path)
    found = lstat_confined(root, rel)
    assert found is not None
    st, target = found
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_ino == os.lstat(root / rel).st_ino
    assert target == os.readlink(root / rel)
    entry = stat_path(root, rel, IgnoreRules(root), new_cache())
    assert entry is not None and entry.kind == "link" and entry.target == target
    with pytest.raises(NotRegularFileError):
        read_file_stable(root, rel, new_cache())
    if "/" in rel:
        impl.check_used()


BAD_PATHS = ["", "/", "/etc/passwd", "..", "../root", "a/../b", "a/..", ".", "./a", "a/.",
             "a//b", "a/", "//a"]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_dot_dot_empty_and_absolute_paths_are_refused(tmp_path: Path, impl: Impl,
                                                      bad: str) -> None:
    write(tmp_path, "a/b", b"x")
    cache = new_cache()
    with pytest.raises(ValueError):
        lstat_confined(tmp_path, bad)
    with pytest.raises(ValueError):
        read_file_stable(tmp_path, bad, cache)
    with pytest.raises(ValueError):
        stat_path(tmp_path, bad, IgnoreRules(tmp_path), cache)
    with pytest.raises(ValueError):
        StableFileReader(tmp_path, bad, cache)
    assert impl.openat2_calls == []  # refused before any system call


@pytest.mark.parametrize("rel", ["f.c", "d/e/f.c"])
def test_a_replaced_root_is_not_read_through_the_old_descriptor(tmp_path: Path, impl: Impl,
                                                                rel: str) -> None:
    root = tmp_path / "root"
    write(root, rel, b"old\n")
    cache = new_cache()
    assert read_file_stable(root, rel, cache)[0] == b"old\n"
    old_ino = os.lstat(root / rel).st_ino
    root.rename(tmp_path / "moved-away")
    write(root, rel, b"new\n")
    assert read_file_stable(root, rel, cache)[0] == b"new\n"
    found = lstat_confined(root, rel)
    assert found is not None and found[0].st_ino == os.lstat(root / rel).st_ino != old_ino
    # The old root stays open only while a call holds it: none does now.
    assert fds_below(tmp_path / "moved-away") == []
    # A root that is gone is gone, whatever descriptor was kept.
    root.rename(tmp_path / "moved-again")
    assert lstat_confined(root, rel) is None
    with pytest.raises(FileNotFoundError):
        read_file_stable(root, rel, cache)
    if "/" in rel:
        impl.check_used()


def test_a_retargeted_root_link_is_followed_to_its_new_target(tmp_path: Path,
                                                              impl: Impl) -> None:
    """The root may be a symlink (resolved as open(2) does); retargeting it is a new root."""
    write(tmp_path, "one/d/f.c", b"one\n")
    write(tmp_path, "two/d/f.c", b"two\n")
    root = tmp_path / "root"
    os.symlink("one", root)
    cache = new_cache()
    assert read_file_stable(root, "d/f.c", cache)[0] == b"one\n"
    os.symlink("two", tmp_path / "root.new")
    os.replace(tmp_path / "root.new", root)
    assert read_file_stable(root, "d/f.c", cache)[0] == b"two\n"
    found = lstat_confined(root, "d/f.c")
    assert found is not None and found[0].st_ino == os.lstat(tmp_path / "two/d/f.c").st_ino
    assert fds_below(tmp_path / "one") == []
    impl.check_used()


def test_no_root_descriptor_outlives_a_call(tmp_path: Path, impl: Impl) -> None:
    """A descriptor kept open would pin the local filesystem: a lazily unmounted tree would
    never report its unmount, and lsync must stop then (test_e2e_disk_faults)."""
    root = tmp_path / "root"
    write(root, "d/f.c", b"x")
    write(root, "top.c", b"y")
    cache = new_cache()
    for rel in ("d/f.c", "top.c"):
        assert lstat_confined(root, rel) is not None
        assert read_file_stable(root, rel, cache)[0] in (b"x", b"y")
    assert fds_below(root) == []


def mixed_tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """A tree with files, directories, symlinks to files and to directories (relative,
    absolute, inside and outside the root), dangling links, a FIFO; and paths to ask about:
    everything in it, the same below every entry, and missing ones."""
    root = tmp_path / "root"
    write(root, "top.c", b"top\n")
    write(root, "src/a.c", b"a\n")
    write(root, "src/lib/b.c", b"b\n")
    write(root, "src/lib/deep/er/c.c", b"c\n")
    (root / "empty").mkdir()
    write(tmp_path, "outside/secret", b"secret\n")
    os.symlink("top.c", root / "to-file")
    os.symlink("a.c", root / "src/to-file")
    os.symlink("lib", root / "src/to-dir")
    os.symlink("../src", root / "src/lib/up")
    os.symlink(str(root / "src"), root / "abs-dir")
    os.symlink("../outside", root / "out-dir")
    os.symlink(str(tmp_path / "outside/secret"), root / "src/out-file")
    os.symlink("nowhere", root / "dangling")
    os.symlink("../../missing/x", root / "src/lib/dangling-dir")
    os.symlink("loop", root / "loop")
    os.mkfifo(root / "src/fifo")
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    below = [f"{rel}/{tail}" for rel in list(paths)
             for tail in ("a.c", "lib", "lib/b.c", "secret", "x", "deep/er/c.c")]
    missing = ["nope", "src/nope", "src/nope/deeper", "top.c/x", "src/a.c/x/y"]
    return root, sorted(set(paths + below + missing))


def outcome(call: Callable[..., object], *args: object) -> object:
    """What a call gives, comparable across implementations: its value or its error."""
    try:
        value = call(*args)
    except OSError as exc:
        return ("error", type(exc).__name__, exc.errno)
    except Exception as exc:
        return ("error", type(exc).__name__)
    if isinstance(value, tuple) and value and isinstance(value[0], os.stat_result):
        st = value[0]
        return ("lstat", st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, value[1])
    return value


def answers(root: Path, paths: list[str]) -> dict[str, tuple[object, ...]]:
    cache, rules = new_cache(), IgnoreRules(root)
    return {rel: (outcome(lstat_confined, root, rel),
                  outcome(read_file_stable, root, rel, cache),
                  outcome(stat_path, root, rel, rules, cache),
                  outcome(scan_dir, root, rel, rules, cache))
            for rel in paths}


def test_openat2_and_the_walk_give_the_same_answers(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if not confined_open.openat2_available():
        pytest.skip("openat2 is not available here")
    root, paths = mixed_tree(tmp_path)
    assert len(paths) > 100
    with_openat2 = answers(root, paths)
    monkeypatch.setattr(confined_open, "openat2_enabled", False)
    walking = answers(root, paths)
    assert with_openat2 == walking
    # ... and both are right: every path without a symlink on the way is what lstat says.
    for rel, (found, *_) in with_openat2.items():
        parents = [root / rel.rsplit("/", i + 1)[0] for i in range(rel.count("/"))]
        if all(p.is_dir() and not p.is_symlink() for p in parents) and \
                os.path.lexists(root / rel):
            st = os.lstat(root / rel)
            assert isinstance(found, tuple) and found[:2] == ("lstat", st.st_ino), rel
        else:
            assert found is None, rel


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM, errno.EINVAL])
def test_openat2_refused_at_run_time_falls_back_to_the_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A seccomp filter (EPERM), a missing syscall (ENOSYS) or flags refused (EINVAL) met
    after the probe: the walk answers, with the same promise, and a path that exists is not
    reported gone; ENOSYS also turns openat2 off for good."""
    root, _ = symlinked_tree(tmp_path)
    calls: list[bytes] = []

    def refused(dir_fd: int, path: bytes, flags: int) -> int:
        calls.append(path)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(confined_open, "_openat2", refused)
    monkeypatch.setattr(confined_open, "openat2_enabled", True)
    assert lstat_confined(root, "first/a/b/c/f.c") is None
    assert read_file_stable(root, "real/a/b/c/f.c", new_cache())[0] == b"inside\n"
    found = lstat_confined(root, "real/a/b/last")
    assert found is not None and found[1] == "c"
    assert calls
    assert (confined_open._openat2 is None) == (err == errno.ENOSYS)


def test_openat2_leaving_the_root_counts_as_a_symlink_on_the_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EXDEV (RESOLVE_BENEATH) is what a link out of the root would give: gone, as ELOOP."""
    write(tmp_path, "a/b", b"x")

    def escaping(dir_fd: int, path: bytes, flags: int) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(confined_open, "_openat2", escaping)
    monkeypatch.setattr(confined_open, "openat2_enabled", True)
    assert lstat_confined(tmp_path, "a/b") is None
    with pytest.raises(FileNotFoundError):
        read_file_stable(tmp_path, "a/b", new_cache())


def test_threads_reading_while_the_root_is_swapped_see_one_root_or_none(
        tmp_path: Path, impl: Impl) -> None:
    """Readers share the kept root descriptor while another thread swaps the root between
    two trees: each read gives one tree's content or 'gone', never an error from a
    descriptor closed under it, and no descriptor is left open on a tree no longer root."""
    root = tmp_path / "root"
    for name in ("one", "two"):
        for i in range(5):
            write(tmp_path, f"{name}/d{i}/e/f.c", f"{name}\n".encode())
            write(tmp_path, f"{name}/top{i}.c", f"{name}\n".encode())
    (tmp_path / "one").rename(root)
    stop = threading.Event()
    problems: list[BaseException] = []
    contents: set[bytes] = set()

    def reader() -> None:
        cache = new_cache()
        while not stop.is_set():
            for i in range(5):
                for rel in (f"d{i}/e/f.c", f"top{i}.c"):
                    try:
                        contents.add(read_file_stable(root, rel, cache)[0])
                        lstat_confined(root, rel)
                    except FileNotFoundError:
                        pass
                    except BaseException as exc:
                        problems.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        spare = {"one": "two", "two": "one"}
        current = "one"
        for _ in range(200):
            root.rename(tmp_path / current)
            (tmp_path / spare[current]).rename(root)
            current = spare[current]
            time.sleep(0.0005)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert problems == []
    assert contents <= {b"one\n", b"two\n"} and contents
    impl.check_used()
    assert fds_below(tmp_path) == []
