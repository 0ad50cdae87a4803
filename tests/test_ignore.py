"""Unit tests of lsync.client.local.ignore: git's .gitignore semantics, .git/ and --exclude.

The last test compares the verdicts with git itself on random trees (skipped without git).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from lsync.client.local.ignore import IgnoreRules, parse_patterns


def make_tree(root: Path, files: dict[str, str]) -> None:
    """Create files (and their directories); a key ending in '/' makes a directory."""
    for rel, text in files.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def rules(
    root: Path,
    files: dict[str, str],
    excludes: Sequence[str] = (),
    include_vcs: bool = False,
) -> IgnoreRules:
    make_tree(root, files)
    return IgnoreRules(root, excludes, include_vcs)


def test_pattern_without_slash_matches_name_at_any_depth(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "*.o\ncore\n"})
    assert r.is_ignored("a.o", False)
    assert r.is_ignored("x/y/z.o", False)
    assert r.is_ignored("x/core", False)
    assert r.is_ignored("x/core", True)
    assert not r.is_ignored("a.c", False)
    assert not r.is_ignored("a.o.c", False)
    assert not r.is_ignored("score", False)


def test_nested_gitignore_applies_below_its_directory_relative_to_it(tmp_path: Path) -> None:
    r = rules(tmp_path, {"sub/.gitignore": "*.tmp\n/build\nlib/gen.c\n", "sub/lib/": ""})
    assert r.is_ignored("sub/a.tmp", False)
    assert r.is_ignored("sub/deep/b.tmp", False)
    assert not r.is_ignored("a.tmp", False)
    assert not r.is_ignored("other/a.tmp", False)
    assert r.is_ignored("sub/build", True)
    assert not r.is_ignored("sub/x/build", True)  # anchored to sub/
    assert not r.is_ignored("build", True)
    assert r.is_ignored("sub/lib/gen.c", False)
    assert not r.is_ignored("lib/gen.c", False)


def test_deeper_gitignore_overrides_shallower(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "*.log\n", "keep/.gitignore": "!*.log\n"})
    assert r.is_ignored("a.log", False)
    assert not r.is_ignored("keep/a.log", False)
    assert not r.is_ignored("keep/deeper/a.log", False)


def test_negation_reincludes_and_last_matching_pattern_wins(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "*.log\n!important.log\n*.log2\n!*.log2\nb.log2\n"})
    assert r.is_ignored("debug.log", False)
    assert not r.is_ignored("important.log", False)
    assert not r.is_ignored("x/important.log", False)
    assert not r.is_ignored("a.log2", False)
    assert r.is_ignored("b.log2", False)


def test_negation_cannot_reinclude_below_an_ignored_directory(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "build/\n!build/keep.c\n", "build/.gitignore": "!*\n"})
    assert r.is_ignored("build", True)
    assert r.is_ignored("build/keep.c", False)
    assert r.is_ignored("build/sub/x.c", False)


def test_negated_directory_does_not_reinclude_files_a_shallower_rule_ignores(
    tmp_path: Path,
) -> None:
    # A flat "path or anything below it" matcher would let !logs/ decide for the file.
    r = rules(tmp_path, {".gitignore": "*.log\n", "sub/.gitignore": "!logs/\n"})
    assert not r.is_ignored("sub/logs", True)
    assert r.is_ignored("sub/logs/a.log", False)


def test_dir_only_pattern_matches_directories_not_files_or_links(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "out/\n"})
    assert r.is_ignored("out", True)
    assert r.is_ignored("a/out", True)
    assert not r.is_ignored("out", False)  # a file, or a symlink to a directory
    assert r.is_ignored("out/file", False)


def test_whitelist_idiom_with_negated_dirs(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "*\n!*/\n!*.c\n"})
    assert not r.is_ignored("src", True)
    assert not r.is_ignored("src/a.c", False)
    assert r.is_ignored("src/a.o", False)
    assert r.is_ignored("Makefile", False)


def test_leading_and_inner_slash_anchor_the_pattern(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "/top\ndoc/*.pdf\n"})
    assert r.is_ignored("top", False)
    assert not r.is_ignored("x/top", False)
    assert r.is_ignored("doc/a.pdf", False)
    assert not r.is_ignored("x/doc/a.pdf", False)
    assert not r.is_ignored("doc/x/a.pdf", False)  # '*' does not match '/'


def test_double_star_forms(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "**/gen\na/**/b\nlogs/**\n!logs/keep\nx**y\n"})
    assert r.is_ignored("gen", True)
    assert r.is_ignored("p/q/gen", False)
    assert r.is_ignored("a/b", False)
    assert r.is_ignored("a/x/y/b", False)
    assert not r.is_ignored("z/a/b", False)
    assert not r.is_ignored("logs", True)  # "logs/**" matches inside, not logs itself
    assert r.is_ignored("logs/today", False)
    assert not r.is_ignored("logs/keep", False)
    assert r.is_ignored("xaay", False)
    assert not r.is_ignored("xa/ay", False)  # "**" not between slashes acts like "*"


def test_wildcards_and_bracket_expressions(tmp_path: Path) -> None:
    r = rules(
        tmp_path,
        {".gitignore": "?.q\n[abc].r\n[!abc].s\n[a-c0-9]x.t\n[[:digit:]].u\n[]].v\n[unclosed\n"},
    )
    assert r.is_ignored("a.q", False)
    assert not r.is_ignored("ab.q", False)
    assert r.is_ignored("b.r", False)
    assert not r.is_ignored("d.r", False)
    assert r.is_ignored("d.s", False)
    assert not r.is_ignored("a.s", False)
    assert r.is_ignored("7x.t", False)
    assert r.is_ignored("5.u", False)
    assert not r.is_ignored("x.u", False)
    assert r.is_ignored("].v", False)
    assert not r.is_ignored("[unclosed", False)  # git drops a malformed pattern


def test_escapes_comments_trailing_spaces_crlf_and_bom(tmp_path: Path) -> None:
    text = "\ufeffbom\r\n# comment\n\\#hash\n\\!bang\nspace \\ \ntrail   \n\\*star\n"
    r = rules(tmp_path, {".gitignore": text})
    assert r.is_ignored("bom", False)
    assert not r.is_ignored("# comment", False)
    assert r.is_ignored("#hash", False)
    assert r.is_ignored("!bang", False)
    assert r.is_ignored("space  ", False)
    assert r.is_ignored("trail", False)
    assert r.is_ignored("*star", False)
    assert not r.is_ignored("xstar", False)


def test_parse_patterns_skips_blank_and_comment_lines() -> None:
    patterns = parse_patterns("\n# c\n   \n!\n/\nfoo/\n")
    assert [(p.body, p.dir_only, p.negative) for p in patterns] == [("foo", True, False)]


def test_everything_below_an_ignored_directory_is_ignored(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "vendor\n"})
    assert r.is_ignored("vendor", True)
    assert r.is_ignored("vendor/a/b/c.c", False)
    assert r.is_ignored("vendor/a", True)
    assert not r.is_ignored("vendored", True)


def test_root_is_never_ignored(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "**\n"})
    assert not r.is_ignored("", True)
    assert r.is_ignored("anything", False)


def test_dot_git_is_excluded_by_default(tmp_path: Path) -> None:
    r = rules(tmp_path, {})
    assert r.is_ignored(".git", True)
    assert r.is_ignored(".git/HEAD", False)
    assert r.is_ignored("sub/module/.git", False)  # a submodule's .git file
    assert not r.is_ignored(".github", True)
    assert not r.is_ignored(".gitignore", False)


def test_include_vcs_includes_git_even_when_a_gitignore_matches_it(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": ".*\n*.lock\n"}, include_vcs=True)
    assert not r.is_ignored(".git", True)
    assert not r.is_ignored(".git/index.lock", False)
    assert not r.is_ignored(".git/objects/ab", True)
    assert r.is_ignored(".hidden", False)
    assert r.is_ignored("x.lock", False)


def test_exclude_patterns_are_relative_to_root_and_rank_above_gitignore(tmp_path: Path) -> None:
    r = rules(
        tmp_path,
        {".gitignore": "*.log\n", "sub/.gitignore": "!*.tmp\n"},
        excludes=["*.tmp", "/data/", "!keep.log"],
    )
    assert r.is_ignored("a.tmp", False)
    assert r.is_ignored("sub/a.tmp", False)  # --exclude beats the deeper negation
    assert r.is_ignored("data", True)
    assert not r.is_ignored("sub/data", True)
    assert r.is_ignored("a.log", False)
    assert not r.is_ignored("keep.log", False)  # a negated --exclude re-includes


def test_exclude_still_applies_inside_git_with_include_vcs(tmp_path: Path) -> None:
    r = rules(tmp_path, {}, excludes=["*.pack"], include_vcs=True)
    assert r.is_ignored(".git/objects/pack/p.pack", False)
    assert not r.is_ignored(".git/HEAD", False)


def test_reload_picks_up_an_edited_created_or_deleted_gitignore(tmp_path: Path) -> None:
    r = rules(tmp_path, {"d/.gitignore": "*.a\n", "e/": ""})
    assert r.is_ignored("d/x.a", False)
    assert not r.is_ignored("d/x.b", False)
    assert not r.is_ignored("e/x.c", False)

    (tmp_path / "d/.gitignore").write_text("*.b\n")
    assert r.is_ignored("d/x.a", False)  # still cached until reload
    assert r.reload("d") is True
    assert not r.is_ignored("d/x.a", False)
    assert r.is_ignored("d/x.b", False)
    assert r.reload("d") is False  # nothing changed

    (tmp_path / "e/.gitignore").write_text("x.c\n")
    assert r.reload("e") is True
    assert r.is_ignored("e/x.c", False)

    (tmp_path / "d/.gitignore").unlink()
    assert r.reload("d") is True
    assert not r.is_ignored("d/x.b", False)


def test_reload_of_root_gitignore_changes_directory_verdicts(tmp_path: Path) -> None:
    r = rules(tmp_path, {".gitignore": "build/\n"})
    assert r.is_ignored("build/a/b.c", False)
    (tmp_path / ".gitignore").write_text("")
    assert r.reload("") is True
    assert not r.is_ignored("build", True)
    assert not r.is_ignored("build/a/b.c", False)


def test_forget_drops_rules_of_a_removed_directory(tmp_path: Path) -> None:
    r = rules(tmp_path, {"d/sub/.gitignore": "*.x\n"})
    assert r.is_ignored("d/sub/f.x", False)
    shutil.rmtree(tmp_path / "d")
    make_tree(tmp_path, {"d/sub/.gitignore": "*.y\n"})
    r.forget("d")
    assert not r.is_ignored("d/sub/f.x", False)
    assert r.is_ignored("d/sub/f.y", False)


def test_forget_of_a_rules_file_reloaded_below_unread_directories(tmp_path: Path) -> None:
    """A .gitignore reloaded (its change seen) below directories whose rules were never
    read is still forgotten with its top directory."""
    r = IgnoreRules(tmp_path)
    make_tree(tmp_path, {"a/b/c/.gitignore": "*.x\n"})
    assert r.reload("a/b/c") is True
    assert r.is_ignored("a/b/c/f.x", False)
    shutil.rmtree(tmp_path / "a")
    make_tree(tmp_path, {"a/b/c/.gitignore": "*.y\n"})
    r.forget("a")
    assert not r.is_ignored("a/b/c/f.x", False)
    assert r.is_ignored("a/b/c/f.y", False)


def test_forget_of_a_file_keeps_the_rules_and_costs_no_walk(tmp_path: Path) -> None:
    """Deleting a file (11,000 of them in a branch switch) must not walk every rules file
    known nor throw away the verdicts worked out (it did: 30 s of a far switch)."""
    r = rules(tmp_path, {"d/.gitignore": "*.x\n", "d/f.c": ""})
    assert r.is_ignored("d/g.x", False)
    chains, verdicts = dict(r._chains), dict(r._dir_verdicts)
    for n in range(20000):
        r.forget(f"d/sub{n % 50}/file{n}.c")
    r.forget("d/f.c")
    assert r._chains == chains and r._dir_verdicts == verdicts
    assert r.is_ignored("d/g.x", False)


def test_symlinked_gitignore_is_not_followed(tmp_path: Path) -> None:
    make_tree(tmp_path, {"elsewhere": "*.c\n"})
    os.symlink("elsewhere", tmp_path / ".gitignore")
    assert not IgnoreRules(tmp_path).is_ignored("a.c", False)


def test_is_rules_file(tmp_path: Path) -> None:
    r = IgnoreRules(tmp_path)
    assert r.is_rules_file(".gitignore")
    assert r.is_rules_file("a/b/.gitignore")
    assert not r.is_rules_file("a/x.gitignore")


# --- differential test against git itself -------------------------------------------------

_NAMES = ["a", "b", "foo", "build", "x.o", "y.c", "a.log", "logs", ".hidden", "keep", "z.tmp",
          "[x]", "sp ace", "#h", "!bang", "core"]
_PATTERNS = [
    "*.o", "!*.o", "foo", "/foo", "foo/", "!foo/", "build/", "!build/", "b/*", "!b/keep",
    "a/**/b", "**/foo", "foo/**", "!foo/keep", "*.log", "!a.log", "logs/", "!logs/", ".*",
    "!.hidden", "*", "!*/", "!*.c", "a/b", "/a/b/", "[xy].*", "[!x]*.c", "?b", "a?",
    "**/b/**", "b/**/x.o", "\\[x]", "\\#h", "\\!bang", "sp ace", "z.tmp   ", "*/keep", "/*",
    "!/a", "a/*/", "!core", "**", "*/", "[[:alpha:]].c", "[a-c]b", "a/", "!a/",
]


def _random_tree(root: Path, rng: random.Random) -> None:
    def fill(directory: Path, depth: int) -> None:
        for _ in range(rng.randint(1, 4)):
            path = directory / rng.choice(_NAMES)
            if path.exists():
                continue
            if depth < 3 and rng.random() < 0.45:
                path.mkdir()
                fill(path, depth + 1)
            else:
                path.write_text("x")
        if rng.random() < 0.5:
            lines = [rng.choice(_PATTERNS) for _ in range(rng.randint(1, 5))]
            (directory / ".gitignore").write_text("\n".join(lines) + "\n")

    fill(root, 0)


def _kept_by_us(root: Path, r: IgnoreRules) -> set[str]:
    kept: set[str] = set()

    def walk(directory: Path, prefix: str) -> None:
        for item in os.scandir(directory):
            rel = prefix + item.name
            is_dir = item.is_dir(follow_symlinks=False)
            if r.is_ignored(rel, is_dir):
                continue
            if is_dir:
                walk(Path(item.path), rel + "/")
            else:
                kept.add(rel)

    walk(root, "")
    return kept


def _kept_by_git(root: Path) -> set[str]:
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, HOME=str(root))
    out = subprocess.run(
        ["git", "-c", "core.excludesFile=" + os.devnull, "ls-files", "-z", "--others",
         "--exclude-standard"],
        cwd=root, env=env, capture_output=True, check=True,
    ).stdout
    return {p for p in out.decode().split("\0") if p}


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_verdicts_match_git_on_random_trees(tmp_path: Path) -> None:
    for seed in range(40):
        root = tmp_path / f"t{seed}"
        root.mkdir()
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        _random_tree(root, random.Random(seed))
        ours, git = _kept_by_us(root, IgnoreRules(root)), _kept_by_git(root)
        assert ours == git, (seed, sorted(ours - git), sorted(git - ours))
