"""The project file `.lsync.toml`: loading, errors that name the line, and the merge with
the command line (the command line wins, `exclude` adds)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lsync.client.local.watcher import DEFAULT_DEBOUNCE_MS, DEFAULT_STEP_MS
from lsync.client.project import (
    PROJECT_FILE,
    Project,
    ProjectError,
    find_project,
    key_line,
    load_project,
    merge,
)

GOOD = """\
# the build box
target = "build-box:src/linux"
exclude = [
    "*.o",     # objects
    "/out/",
]
delete = true
include_vcs = false
accept_new_host_key = true
ssh_config = ["~/.ssh/config", "~/.ssh/work"]
step_ms = 3
debounce_ms = 40
reconnect = false
log = "verbose"

[run]
map_paths = false
"""


def write(root: Path, text: str) -> Path:
    path = root / PROJECT_FILE
    path.write_text(text)
    return path


def error_of(root: Path, text: str) -> ProjectError:
    write(root, text)
    with pytest.raises(ProjectError) as caught:
        load_project(root)
    return caught.value


def connect_args(argv: list[str]) -> argparse.Namespace:
    """A parser shaped as merge() documents: every default None."""
    parser = argparse.ArgumentParser()
    parser.add_argument("target", nargs="?")
    parser.add_argument("--local")
    parser.add_argument("-F", dest="ssh_config", action="append")
    parser.add_argument("--delete", action=argparse.BooleanOptionalAction)
    parser.add_argument("--exclude", action="append")
    parser.add_argument("--include-vcs", action="store_true", default=None)
    parser.add_argument("--accept-new-host-key", action="store_true", default=None)
    parser.add_argument("--step-ms", type=int)
    parser.add_argument("--debounce-ms", type=int)
    parser.add_argument("--no-reconnect", action="store_true")
    parser.add_argument("--no-map-paths", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def test_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    project = load_project(tmp_path)
    assert project == Project(
        path=path, root=tmp_path, target="build-box:src/linux",
        targets=(("build-box:src/linux", None),), exclude=("*.o", "/out/"),
        delete=True, include_vcs=False, accept_new_host_key=True,
        ssh_config=("~/.ssh/config", "~/.ssh/work"), step_ms=3, debounce_ms=40,
        reconnect=False, log="verbose", map_paths=False)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    write(tmp_path, "")
    project = load_project(tmp_path)
    assert project == Project(path=tmp_path / PROJECT_FILE, root=tmp_path)
    assert project.step_ms == DEFAULT_STEP_MS and project.debounce_ms == DEFAULT_DEBOUNCE_MS
    assert project.map_paths and project.reconnect and project.log == "normal"


def test_no_file(tmp_path: Path) -> None:
    assert load_project(tmp_path) is None
    assert find_project(tmp_path) != tmp_path


def test_ssh_config_as_one_string_and_dotted_run_key(tmp_path: Path) -> None:
    write(tmp_path, 'ssh_config = "~/.ssh/alt"\nrun.map_paths = false\n')
    project = load_project(tmp_path)
    assert project is not None
    assert project.ssh_config == ("~/.ssh/alt",) and project.map_paths is False


def test_local_directory_target_is_relative_to_the_file(tmp_path: Path) -> None:
    write(tmp_path, 'target = "../mirror"\n')
    project = load_project(tmp_path)
    assert project is not None and project.target == str(tmp_path / "../mirror")
    write(tmp_path, 'target = "/abs/mirror"\n')
    project = load_project(tmp_path)
    assert project is not None and project.target == "/abs/mirror"


def test_find_project_walks_up(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "file.c").write_text("")
    assert find_project(deep) == tmp_path
    assert find_project(deep / "file.c") == tmp_path
    inner = tmp_path / "a"
    write(inner, "")
    assert find_project(deep) == inner


def test_unknown_key_names_its_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, 'target = "h:t"\n\n# comment\ninclude-vcs = true\n')
    assert error.code == "unknown-key" and error.line == 4
    assert str(tmp_path / PROJECT_FILE) in str(error)
    assert "line 4" in str(error) and "`include-vcs`" in str(error)
    assert "did you mean `include_vcs`" in str(error)


def test_unknown_key_in_run_table_names_its_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, 'target = "h:t"\n[run]\nmap_paths = true\npty = true\n')
    assert error.code == "unknown-key" and error.line == 4 and "`run.pty`" in str(error)


def test_unknown_table_names_its_header(tmp_path: Path) -> None:
    error = error_of(tmp_path, 'target = "h:t"\n\n[watch]\nstep = 1\n')
    assert error.code == "unknown-key" and error.line == 3 and "`watch`" in str(error)


def test_bad_type_names_its_line(tmp_path: Path) -> None:
    cases = {
        'target = "h:t"\ndelete = "yes"\n': (2, "delete"),
        'exclude = [\n  "a",\n  3,\n]\nstep_ms = 1\n': (1, "exclude"),
        'step_ms = -1\n': (1, "step_ms"),
        'debounce_ms = 2.5\n': (1, "debounce_ms"),
        'step_ms = true\n': (1, "step_ms"),
        'log = "loud"\n': (1, "log"),
        'ssh_config = 3\n': (1, "ssh_config"),
        'target = ""\n': (1, "target"),
        'run = 3\n': (1, "run"),
        '[run]\nmap_paths = "no"\n': (2, "run.map_paths"),
        'delete = false\nrun = { map_paths = "no" }\n': (2, "run.map_paths"),
    }
    for text, (line, key) in cases.items():
        error = error_of(tmp_path, text)
        assert error.code == "bad-value", text
        assert error.line == line, text
        assert f"line {line}:" in str(error) and f"`{key}`" in str(error), text


def test_key_line_skips_multiline_values() -> None:
    text = ('exclude = [\n  "delete = 1",\n]\nnote = """\n[run]\ndelete = 2\n"""\n'
            "delete = 3\n[run]\nmap_paths = 1\n")
    assert key_line(text, (), "delete") == 8
    assert key_line(text, ("run",), "map_paths") == 10
    assert key_line(text, (), "run") == 9
    assert key_line(text, (), "absent") == 0
    assert key_line("'quoted' = 1\n\"dq\".x = 2\n", ("dq",), "x") == 2


def test_syntax_error_keeps_tomllib_position(tmp_path: Path) -> None:
    error = error_of(tmp_path, 'target = "h:t"\ndelete = tru\n')
    assert error.code == "syntax" and error.line == 2
    assert str(error).startswith(f"{tmp_path / PROJECT_FILE}: ")
    assert "line 2, column" in str(error)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / PROJECT_FILE).write_bytes(b'target = "h:t"\n# \xff\n')
    with pytest.raises(ProjectError) as caught:
        load_project(tmp_path)
    assert caught.value.code == "syntax" and caught.value.line == 2


def test_merge_without_a_file_uses_the_command_line(tmp_path: Path) -> None:
    args = connect_args(["h:t", "--local", str(tmp_path), "--exclude", "*.o"])
    settings = merge(None, args)
    assert settings.target == "h:t" and settings.local_root == tmp_path.resolve()
    assert settings.exclude == ["*.o"] and settings.delete is False
    assert settings.step_ms == DEFAULT_STEP_MS and settings.reconnect is True
    assert settings.log == "normal" and settings.map_paths is True
    assert settings.ssh_config is None


def test_merge_file_only(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    project = load_project(tmp_path)
    settings = merge(project, connect_args([]))
    assert settings.target == "build-box:src/linux"
    assert settings.local_root == tmp_path.resolve()
    assert settings.exclude == ["*.o", "/out/"]
    assert settings.delete is True and settings.accept_new_host_key is True
    assert settings.ssh_config == ["~/.ssh/config", "~/.ssh/work"]
    assert (settings.step_ms, settings.debounce_ms) == (3, 40)
    assert settings.reconnect is False and settings.log == "verbose"
    assert settings.map_paths is False


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    project = load_project(tmp_path)
    settings = merge(project, connect_args(
        ["other:tree", "--no-delete", "--exclude", "*.tmp", "-F", "cfg", "--step-ms", "9",
         "--include-vcs", "-q"]))
    assert settings.target == "other:tree"
    assert settings.delete is False  # the file says true
    assert settings.exclude == ["*.o", "/out/", "*.tmp"]  # added to the file's
    assert settings.ssh_config == ["cfg"]
    assert settings.step_ms == 9 and settings.debounce_ms == 40
    assert settings.include_vcs is True and settings.log == "quiet"


def test_no_flags_turn_off_what_the_file_turns_on(tmp_path: Path) -> None:
    write(tmp_path, "reconnect = true\n[run]\nmap_paths = true\n")
    project = load_project(tmp_path)
    settings = merge(project, connect_args(["h:t", "--no-reconnect", "--no-map-paths"]))
    assert settings.reconnect is False and settings.map_paths is False
    settings = merge(project, argparse.Namespace(target="h:t", reconnect=False,
                                                 map_paths=None))
    assert settings.reconnect is False and settings.map_paths is True


def test_merge_without_any_target_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "delete = true\n")
    with pytest.raises(ProjectError) as caught:
        merge(load_project(tmp_path), connect_args([]))
    assert caught.value.code == "no-target" and "target" in str(caught.value)
    with pytest.raises(ProjectError):
        merge(None, connect_args(["--local", str(tmp_path)]))


def test_local_elsewhere_than_the_file(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    other = tmp_path / "sub"
    other.mkdir()
    project = load_project(tmp_path)
    with pytest.raises(ProjectError) as caught:
        merge(project, connect_args(["--local", str(other)]))
    assert caught.value.code == "mismatch"
    settings = merge(project, connect_args(["h:t", "--local", str(other)]))
    assert settings.local_root == other.resolve() and settings.exclude == []
    assert settings.delete is False  # the file was for another tree


def test_the_lsync_command_imports_without_any_warning() -> None:
    """A fresh install prints nothing but lsync's own lines: every module of the command,
    imported with warnings turned into errors (the DSA deprecation that asyncssh triggers
    on import with cryptography >= 48 printed ten lines on every start)."""
    import subprocess
    import sys

    modules = ["lsync.client.cli", "lsync.client.session", "lsync.client.transport.ssh",
               "lsync.client.buildloop.loop", "lsync.client.transport.lanes",
               "lsync.client.transport.streams"]
    code = "import " + ", ".join(modules)
    done = subprocess.run([sys.executable, "-W", "error", "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# -- several targets (issue 17) ---------------------------------------------------------------


def test_target_may_be_a_list_of_strings(tmp_path: Path) -> None:
    write(tmp_path, 'target = ["x86-box:src/linux", "arm-box:build/linux", "out"]\n')
    project = load_project(tmp_path)
    assert project is not None
    assert project.targets == (("x86-box:src/linux", None), ("arm-box:build/linux", None),
                               (str(tmp_path / "out"), None))
    assert project.target == "x86-box:src/linux"


def test_target_tables_give_names(tmp_path: Path) -> None:
    write(tmp_path, '[[target]]\nname = "x86"\ntarget = "x86-box:src"\n\n'
                    '[[target]]\ntarget = "arm-box:src"\n')
    project = load_project(tmp_path)
    assert project is not None
    assert project.targets == (("x86-box:src", "x86"), ("arm-box:src", None))


@pytest.mark.parametrize("text, problem", [
    ("target = []\n", "must not be empty"),
    ('[[target]]\nname = "x"\n', "tables must set `target`"),
    ('[[target]]\nname = "a b"\ntarget = "h:t"\n', "unique name"),
    ('[[target]]\nname = "a"\ntarget = "h:t"\n[[target]]\nname = "a"\ntarget = "g:t"\n',
     "unique name"),
    ('[[target]]\ntarget = "h:t"\nhost = "h"\n', "unknown key `target.host`"),
    ("target = [1]\n", "must be a string"),
])
def test_bad_targets_are_refused_with_the_key(tmp_path: Path, text: str, problem: str) -> None:
    assert problem in str(error_of(tmp_path, text))


def test_targets_on_the_command_line_replace_the_files(tmp_path: Path) -> None:
    write(tmp_path, 'target = ["a:t", "b:t"]\n')
    project = load_project(tmp_path)
    settings = merge(project, argparse.Namespace(target=["c:t", "d:u"]))
    assert settings.targets == (("c:t", None), ("d:u", None))
    assert merge(project, argparse.Namespace(target=[])).targets == (("a:t", None),
                                                                       ("b:t", None))


def test_target_names_default_to_the_host_and_are_made_unique() -> None:
    from lsync.client.target import Target, target_name, unique_names

    assert target_name(Target.parse("me@x86-box:src")) == "x86-box"
    assert target_name(Target.parse("/srv/build/linux/")) == "linux"
    assert target_name(Target.parse("h:t")) == "h"
    assert unique_names(["box", "box", "arm", "box"]) == ["box", "box-2", "arm", "box-3"]
