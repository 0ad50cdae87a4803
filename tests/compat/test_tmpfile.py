"""New files written unnamed (O_TMPFILE) and linked into place (lsync.agent.confined):
atomic, with the right content, mode and stat; an entry that appears at the name before
the link is never replaced blindly (it goes through the replacement's checks and guard);
where O_TMPFILE or linking through /proc does not work the named temporary file takes
over; and the file never lands outside the root."""

import errno
import os
import shutil
import stat

from lsync.agent import confined, tempfiles
from lsync.agent.confined import ConfinedRoot, file_key
from lsync.agent.refusals import OpError, ReplaceGuard
from lsync.agent.writer import write_batch
from lsync.protocol.errors import ErrorCode
from tests.compat.helpers import TempTree


def _kernel_has_tmpfile(directory):
    """Whether this machine can make an unnamed file in `directory` (asked directly)."""
    flags = getattr(os, "O_TMPFILE", 0)
    if not flags:
        return False
    try:
        fd = os.open(directory, flags | os.O_RDWR, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


def _entries(directory):
    return sorted(os.listdir(directory))


class _Recorder(ReplaceGuard):
    def __init__(self, refuse=False):
        self.calls = []
        self.refuse = refuse

    def before_replace(self, dfd, name, path, known):
        st = os.lstat(name, dir_fd=dfd)
        self.calls.append((name, path, stat.S_IFMT(st.st_mode)))
        if self.refuse:
            raise OpError(ErrorCode.PERMISSION_DENIED, "kept: not replaced")


def _root(tree):
    root = ConfinedRoot(tree.root)
    assert root.tmpfile == (_kernel_has_tmpfile(tree.root)
                            and os.path.isdir("/proc/self/fd"))
    return root


def test_a_new_file_is_invisible_while_written_and_appears_whole_with_its_mode_and_stat():
    tree = TempTree()
    os.mkdir(tree.path("d"))
    root = _root(tree)
    try:
        for name, mode in (("plain.c", 0o644), ("script.sh", 0o755), ("ro.txt", 0o444),
                           ("none", 0o000), ("setuid", 0o4755)):
            pending = root.begin_write("d/" + name, mode=mode)
            pending.write(b"x" * 100000)
            pending.write(memoryview(b"tail"))
            if root.tmpfile:
                assert pending.temp is None
                # nothing at the name yet, and no temporary name either
                assert name not in _entries(tree.path("d"))
                assert not [n for n in _entries(tree.path("d"))
                            if n.startswith(confined.TEMP_PREFIX)]
            st = pending.commit(mode)
            now = os.lstat(tree.path("d/" + name))
            assert stat.S_IMODE(now.st_mode) == mode, (name, oct(now.st_mode))
            assert stat.S_IMODE(st.st_mode) == mode
            assert file_key(st) == file_key(now)  # the record's key: size, mtime, inode
            assert now.st_nlink == 1
            assert tree.read("d/" + name) == b"x" * 100000 + b"tail"
        assert not [n for n in _entries(tree.path("d")) if n.startswith(confined.TEMP_PREFIX)]
    finally:
        root.close()
        os.chmod(tree.path("d/none"), 0o600)
        shutil.rmtree(tree.base)


def test_an_aborted_unnamed_file_leaves_nothing_behind():
    tree = TempTree()
    root = _root(tree)
    try:
        pending = root.begin_write("f", mode=0o644)
        pending.write(b"half")
        pending.abort()
        assert _entries(tree.root) == []
    finally:
        root.close()
        shutil.rmtree(tree.base)


def test_an_existing_file_is_replaced_after_the_guard_and_no_temporary_name_stays():
    tree = TempTree()
    tree.write("f", b"old")
    root = _root(tree)
    guard = root.guard = _Recorder()
    try:
        old_ino = os.lstat(tree.path("f")).st_ino
        pending = root.begin_write("f", mode=0o600)
        pending.write(b"new")
        st = pending.commit(0o640)
        assert tree.read("f") == b"new"
        assert os.lstat(tree.path("f")).st_ino == st.st_ino != old_ino
        assert stat.S_IMODE(os.lstat(tree.path("f")).st_mode) == 0o640
        assert guard.calls == [("f", "f", stat.S_IFREG)]
        assert _entries(tree.root) == ["f"]
    finally:
        root.close()
        shutil.rmtree(tree.base)


def _appearing(pending, make):
    """Make `make` run right before the unnamed file is linked at its name: an entry
    appears between the commit's look and its link."""
    original = pending._link

    def link(name):
        if name == pending.name:
            make()
        return original(name)
    pending._link = link


def test_a_file_appearing_before_the_link_is_not_replaced_without_the_guard():
    tree = TempTree()
    root = _root(tree)
    if not root.tmpfile:
        root.close()
        shutil.rmtree(tree.base)
        return  # no unnamed files here: the named way is what the other tests check
    guard = root.guard = _Recorder(refuse=True)
    try:
        pending = root.begin_write("f", mode=0o644)
        pending.write(b"lsync's")
        _appearing(pending, lambda: tree.write("f", b"someone else's"))
        try:
            pending.commit(0o644)
        except OpError as exc:
            assert exc.code == ErrorCode.PERMISSION_DENIED
        else:
            raise AssertionError("the guard's refusal was not heeded")
        assert tree.read("f") == b"someone else's"  # the guard saw it and kept it
        assert guard.calls == [("f", "f", stat.S_IFREG)]
        assert _entries(tree.root) == ["f"]  # no temporary name left
        # A guard that lets it go: the appeared file is replaced like any existing one.
        guard.refuse = False
        pending = root.begin_write("g", mode=0o644)
        pending.write(b"lsync's")
        _appearing(pending, lambda: tree.write("g", b"someone else's"))
        pending.commit(0o644)
        assert tree.read("g") == b"lsync's"
        assert guard.calls[-1] == ("g", "g", stat.S_IFREG)
        assert _entries(tree.root) == ["f", "g"]
    finally:
        root.close()
        shutil.rmtree(tree.base)


def test_a_directory_or_fifo_appearing_before_the_link_is_refused_and_left_alone():
    tree = TempTree()
    root = _root(tree)
    if not root.tmpfile:
        root.close()
        shutil.rmtree(tree.base)
        return
    try:
        for name, make, code in (
                ("d", lambda: os.mkdir(tree.path("d")), ErrorCode.TYPE_CONFLICT),
                ("p", lambda: os.mkfifo(tree.path("p")), ErrorCode.TYPE_CONFLICT)):
            pending = root.begin_write(name, mode=0o644)
            pending.write(b"data")
            _appearing(pending, make)
            try:
                pending.commit(0o644)
            except OpError as exc:
                assert exc.code == code
            else:
                raise AssertionError("{} was replaced".format(name))
        assert stat.S_ISDIR(os.lstat(tree.path("d")).st_mode)
        assert stat.S_ISFIFO(os.lstat(tree.path("p")).st_mode)
        assert _entries(tree.root) == ["d", "p"]
    finally:
        root.close()
        shutil.rmtree(tree.base)


def _write_and_check(root, tree, path, data, mode):
    pending = root.begin_write(path, mode=mode)
    pending.write(data)
    st = pending.commit(mode)
    assert tree.read(path) == data
    now = os.lstat(tree.path(path))
    assert stat.S_IMODE(now.st_mode) == mode
    assert file_key(st) == file_key(now)


def test_without_o_tmpfile_the_named_temporary_file_is_used():
    tree = TempTree()
    root = ConfinedRoot(tree.root)
    root.tmpfile = False  # as where the kernel or /proc lacks it
    try:
        pending = root.begin_write("f", mode=0o755)
        assert pending.temp is not None and pending.temp.startswith(confined.TEMP_PREFIX)
        assert _entries(tree.root) == [pending.temp]
        pending.write(b"#!/bin/sh\n")
        pending.commit(0o755)
        assert tree.read("f") == b"#!/bin/sh\n"
        assert stat.S_IMODE(os.lstat(tree.path("f")).st_mode) == 0o755
        assert _entries(tree.root) == ["f"]
    finally:
        root.close()
        shutil.rmtree(tree.base)


def test_an_old_kernel_that_takes_o_tmpfile_for_a_directory_open_turns_it_off():
    # A kernel before 3.11 ignores __O_TMPFILE and sees O_DIRECTORY | O_RDWR: EISDIR.
    tree = TempTree()
    root = ConfinedRoot(tree.root)
    root.tmpfile = True
    saved = confined._TMPFILE_FLAGS
    confined._TMPFILE_FLAGS = os.O_DIRECTORY | os.O_RDWR
    try:
        _write_and_check(root, tree, "f", b"content", 0o644)
        assert root.tmpfile is False
        assert _entries(tree.root) == ["f"]
    finally:
        confined._TMPFILE_FLAGS = saved
        root.close()
        shutil.rmtree(tree.base)


class _NoTmpfileOs(object):
    """`os` as on a file system without O_TMPFILE (EOPNOTSUPP for it)."""

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, dir_fd=None):
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if tmpfile and flags & tmpfile == tmpfile:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return os.open(path, flags, mode, dir_fd=dir_fd)


def test_a_file_system_without_o_tmpfile_turns_it_off_for_the_root():
    tree = TempTree()
    root = ConfinedRoot(tree.root)
    root.tmpfile = True
    confined.os = _NoTmpfileOs()
    try:
        _write_and_check(root, tree, "a/f", b"one", 0o644)
        assert root.tmpfile is False
        _write_and_check(root, tree, "a/g", b"two", 0o600)
        assert _entries(tree.path("a")) == ["f", "g"]
    finally:
        confined.os = os
        root.close()
        shutil.rmtree(tree.base)


def test_when_linking_through_proc_fails_the_file_is_copied_to_a_named_one():
    tree = TempTree()
    root = _root(tree)
    if not root.tmpfile:
        root.close()
        shutil.rmtree(tree.base)
        return
    saved = tempfiles._PROC_FD
    tempfiles._PROC_FD = os.path.join(tree.base, "no-proc", "{}")  # as without /proc
    try:
        data = os.urandom(3 * confined.READ_CHUNK + 17)
        _write_and_check(root, tree, "f", data, 0o751)
        assert root.tmpfile is False  # the root goes the named way from now on
        pending = root.begin_write("g", mode=0o644)
        assert pending.temp is not None
        pending.abort()
        assert _entries(tree.root) == ["f"]
    finally:
        tempfiles._PROC_FD = saved
        root.close()
        shutil.rmtree(tree.base)


def test_a_failed_link_in_a_directory_that_went_away_is_reported_not_found():
    tree = TempTree()
    os.mkdir(tree.path("d"))
    root = _root(tree)
    try:
        pending = root.begin_write("d/f", mode=0o644)
        pending.write(b"data")
        os.rmdir(tree.path("d"))
        try:
            pending.commit(0o644)
        except OpError as exc:
            assert exc.code == ErrorCode.NOT_FOUND, exc.message
        else:
            raise AssertionError("committed into a removed directory")
        assert _entries(tree.root) == []
        # a removed directory says nothing about /proc: unnamed files go on
        assert root.tmpfile == _kernel_has_tmpfile(tree.root)
    finally:
        root.close()
        shutil.rmtree(tree.base)


def test_an_unnamed_file_is_linked_where_its_directory_is_even_if_swapped_for_a_symlink():
    tree = TempTree()
    outside = os.path.join(tree.base, "outside")
    os.mkdir(outside)
    os.mkdir(tree.path("d"))
    root = _root(tree)
    try:
        pending = root.begin_write("d/f", mode=0o644)
        pending.write(b"data")
        os.rename(tree.path("d"), tree.path("moved"))
        os.symlink(outside, tree.path("d"))
        pending.commit(0o644)
        assert os.listdir(outside) == []
        assert tree.read("moved/f") == b"data"
        try:
            root.begin_write("d/g", mode=0o644)
        except OpError as exc:
            assert exc.code == ErrorCode.BAD_PATH
        else:
            raise AssertionError("wrote through a symlink")
        for bad in ("../x", "/etc/x", ".lsync/kept/x"):
            try:
                root.begin_write(bad, mode=0o644)
            except OpError as exc:
                assert exc.code == ErrorCode.BAD_PATH
            else:
                raise AssertionError("{} accepted".format(bad))
        assert os.listdir(outside) == []
    finally:
        root.close()
        shutil.rmtree(tree.base)


def test_a_batch_writes_new_and_existing_files_the_same_with_or_without_o_tmpfile():
    results = {}
    for tmpfile in (True, False):
        tree = TempTree()
        tree.write("sub/old", b"old content")
        root = ConfinedRoot(tree.root)
        root.tmpfile = tmpfile and root.tmpfile
        files = [[1, "sub/old", 0o644, 3], [2, "sub/new", 0o755, 5], [3, "top", 0o600, 0]]
        try:
            done = write_batch(root, files, b"abcdefgh", "blake2b-128")
            assert [r[3] is not None and r[2] is not None for r in done] == [True] * 3
            results[tmpfile] = [(rel, tree.read(rel), stat.S_IMODE(os.lstat(
                tree.path(rel)).st_mode)) for rel in ("sub/old", "sub/new", "top")]
            assert sorted(os.listdir(tree.path("sub"))) == ["new", "old"]
        finally:
            root.close()
            shutil.rmtree(tree.base)
    assert results[True] == results[False] == [
        ("sub/old", b"abc", 0o644), ("sub/new", b"defgh", 0o755), ("top", b"", 0o600)]
