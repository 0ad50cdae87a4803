"""What the torture test does to the local tree (a git checkout of the kernel material).

Every action is driven by the run's seeded `random.Random` and counts what it changed
(`changed_bytes`: the bytes of every file written, whole, and `changed_paths`), the measure
the bytes on the wire are held to:

- `checkout`: `git checkout -f` of the other release (hundreds to a thousand real changed
  paths, the root `Makefile` among them); `clean`: `git clean -fdq` too (every file and
  directory the harness added goes: a burst of deletes); `vacate` then `checkout`: big
  directories and the root-level files removed, then brought back by the checkout as
  thousands of new files (a switch to a branch far back in history);
- `edit`: files saved as editors do: truncate and write, write a temporary file and rename
  it over, move the original aside and write anew (vim's backup), append; a mode change;
- `create` / `delete`: new files and new subtrees; deletes of files lsync wrote;
- `move_dir`: a directory renamed (sometimes one holding planted build outputs remotely);
- `symlinks`: links created, retargeted atomically, replaced by files and back;
- `big_file` / `poke`: a big incompressible file, and a 10-byte edit in place of it.

Names the harness invents (`torture_*`, `torture-*`) are not ignored by the kernel's
`.gitignore` rules (checked by `check_names`); temporary names are (`.*`, `*~`).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

from benchmarks.kernel_material import git
from benchmarks.torture_checks import ignored

CHUNK = 1 << 20


class Workload:
    """Seeded edits of the local tree at `local` (a clone of the material at `tags[0]`)."""

    def __init__(self, local: Path, tags: tuple[str, str], rng: random.Random) -> None:
        self.local = local
        self.tags = tags
        self.rng = rng
        self.revision = tags[0]
        self.changed_bytes = 0
        self.changed_paths = 0
        self.counter = 0
        self._files: list[str] = []
        self._dirs: list[str] = []
        self.favoured_dirs: list[str] = []  # directories worth moving (planted outputs)
        self.big_files: list[str] = []
        self.vacated: list[str] = []  # tracked files removed, back at the next checkout
        self.created: list[Path] = []  # files created by `create`
        self._index()

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _index(self) -> None:
        """The tracked files lsync syncs (not ignored), and their directories."""
        tracked = git("ls-files", cwd=self.local).stdout.splitlines()
        skip = ignored(self.local, tracked, set())
        self._files = [rel for rel in tracked if rel not in skip and "/" in rel]
        self._dirs = sorted({rel.rpartition("/")[0] for rel in self._files})

    def check_names(self) -> list[str]:
        """Invented names the kernel's rules would ignore (must be none)."""
        names = ["torture-marker.txt", "torture-big-1.dat", "kernel/torture_new_1.c",
                 "torture-link-1", "kernel/torture_dir_1/a/b.c", "mm-moved-1/x.c",
                 "REMOTE-ONLY-1.txt"]
        return sorted(ignored(self.local, names, set()))

    def account(self, path: Path) -> None:
        self.changed_paths += 1
        with contextlib.suppress(FileNotFoundError):
            self.changed_bytes += path.lstat().st_size

    def reset_accounting(self) -> None:
        self.changed_bytes = 0
        self.changed_paths = 0

    def existing_files(self, count: int, under: str | None = None,
                       spare: str | None = None) -> list[Path]:
        """Up to `count` tracked files that exist now (only below `under`; none below
        `spare`)."""
        pool = self._files
        if under is not None:
            pool = [rel for rel in pool if rel.startswith(under + "/")]
        if spare is not None:
            pool = [rel for rel in pool if not rel.startswith(spare + "/")]
        picked: list[Path] = []
        for _ in range(count * 4):
            if len(picked) >= count or not pool:
                break
            path = self.local / self.rng.choice(pool)
            if path.is_file() and not path.is_symlink() and path not in picked:
                picked.append(path)
        return picked

    def directory(self, deep: bool = True) -> str:
        """A directory of the tree that exists now (one may have been moved away)."""
        candidates = [d for d in self._dirs if (d.count("/") >= 1) == deep] or self._dirs
        for _ in range(50):
            rel = self.rng.choice(candidates)
            if (self.local / rel).is_dir():
                return rel
        return "kernel"  # in both releases, never moved (moves take deeper directories)

    # -- actions ---------------------------------------------------------------------------

    def checkout(self, clean: bool = False) -> str:
        old = self.revision
        new = self.tags[1] if old == self.tags[0] else self.tags[0]
        changed = git("diff", "--name-only", "--no-renames", old, new, cwd=self.local)
        git("checkout", "-q", "-f", new, cwd=self.local)
        if clean:
            git("clean", "-fdq", cwd=self.local)
            self.big_files = [rel for rel in self.big_files if (self.local / rel).exists()]
        self.revision = new
        for rel in {*changed.stdout.splitlines(), *self.vacated}:
            self.account(self.local / rel)
        restored = len(self.vacated)
        self.vacated = []
        self._index()
        return (f"checkout {new}" + (" + clean" if clean else "")
                + (f" ({restored} files restored)" if restored else ""))

    def vacate(self, files: int) -> str:
        """Remove big directories (at least `files` tracked files) and the root-level files,
        `.gitignore` among them: the next `checkout` brings them all back as new files, and
        the root's rules file with them, as a switch to a branch far back in history does
        (while the rules are gone, the planted build outputs are not ignored either)."""
        by_top: dict[str, int] = {}
        for rel in self._files:
            top = "/".join(rel.split("/")[:2]) if rel.count("/") >= 2 else rel.split("/")[0]
            by_top[top] = by_top.get(top, 0) + 1
        chosen: list[str] = []
        total = 0
        for top, count in sorted(by_top.items(), key=lambda item: -item[1]):
            if total >= files:
                break
            chosen.append(top)
            total += count
        gone = [rel for rel in self._files
                if any(rel == top or rel.startswith(top + "/") for top in chosen)]
        tracked = git("ls-files", cwd=self.local).stdout.splitlines()
        gone += [rel for rel in tracked if "/" not in rel]  # the root .gitignore too
        for rel in gone:
            with contextlib.suppress(FileNotFoundError):
                (self.local / rel).unlink()
            self.changed_paths += 1
        self.vacated += gone
        return f"removed {len(gone)} files ({', '.join(chosen)} and the root-level files)"

    def _new_text(self, old: bytes) -> bytes:
        lines = old.split(b"\n")
        at = self.rng.randrange(len(lines))
        lines[at] = f"/* torture {self.rng.getrandbits(48):x} */".encode()
        return b"\n".join(lines)

    def save(self, path: Path, data: bytes, how: str) -> None:
        if how == "truncate":
            with open(path, "wb") as handle:
                handle.write(data)
        elif how == "rename":
            temp = path.with_name(f".{path.name}.tmp{self._next()}")
            temp.write_bytes(data)
            os.rename(temp, path)
        elif how == "backup":
            backup = path.with_name(path.name + "~")
            os.rename(path, backup)
            path.write_bytes(data)
            os.unlink(backup)
        else:  # append
            with open(path, "ab") as handle:
                handle.write(data[-40:])
        self.account(path)

    def edit(self, count: int) -> str:
        hows = ("truncate", "rename", "backup", "append")
        for path in self.existing_files(count):
            how = self.rng.choice(hows)
            self.save(path, self._new_text(path.read_bytes()), how)
            if self.rng.random() < 0.1:
                path.chmod(path.stat().st_mode ^ 0o100)
        return f"edit {count}"

    def create(self, count: int) -> str:
        for _ in range(count):
            n = self._next()
            if self.rng.random() < 0.3:
                top = self.local / self.directory() / f"torture_dir_{n}"
                for depth in range(self.rng.randint(1, 3)):
                    sub = top / f"sub{depth}"
                    sub.mkdir(parents=True, exist_ok=True)
                    for i in range(self.rng.randint(1, 5)):
                        path = sub / f"torture_{n}_{i}.c"
                        path.write_bytes(self._text(self.rng.randint(10, 30_000)))
                        self.account(path)
                        self.created.append(path)
            else:
                path = self.local / self.directory() / f"torture_new_{n}.c"
                path.write_bytes(self._text(self.rng.randint(0, 60_000)))
                self.account(path)
                self.created.append(path)
        return f"create {count}"

    def _text(self, size: int) -> bytes:
        words = (b"int ", b"return ", b"struct ", b"static ", b"u32 ", b"->", b"NULL; ", b"\n")
        out = bytearray()
        while len(out) < size:
            out += self.rng.choice(words)
            if self.rng.random() < 0.2:
                out += b"v%x " % self.rng.getrandbits(24)
        return bytes(out[:size])

    def delete(self, count: int, under: str | None = None, spare: str | None = None) -> str:
        picked = self.existing_files(count, under, spare)
        for path in picked:
            path.unlink()
            self.changed_paths += 1
        return f"delete {len(picked)}" + (f" in {under}" if under else "")

    def delete_created(self, count: int) -> str:
        """Delete files this run created (lsync wrote them moments ago, maybe not yet)."""
        self.rng.shuffle(self.created)
        gone = 0
        while self.created and gone < count:
            path = self.created.pop()
            if path.is_file():
                path.unlink()
                gone += 1
                self.changed_paths += 1
        return f"delete {gone} new files"

    def delete_paths(self, paths: list[Path]) -> str:
        gone = 0
        for path in paths:
            if path.is_file():
                path.unlink()
                gone += 1
                self.changed_paths += 1
        return f"delete {gone} files created just before"

    def move_dir(self) -> str:
        pool = [d for d in self.favoured_dirs if (self.local / d).is_dir()]
        if not pool or self.rng.random() < 0.5:
            pool = [d for d in self._dirs if d.count("/") >= 1 and (self.local / d).is_dir()]
        if not pool:
            return "move (nothing to move)"
        rel = self.rng.choice(pool)
        new_rel = f"{rel}-moved-{self._next()}"
        os.rename(self.local / rel, self.local / new_rel)
        self.changed_paths += 1
        self.favoured_dirs = [new_rel if d == rel else d for d in self.favoured_dirs]
        return f"move {rel} -> {new_rel}"

    def symlinks(self, count: int) -> str:
        for _ in range(count):
            n = self.rng.randint(1, 6)
            link = self.local / f"torture-link-{n}"
            target = self.rng.choice(self._files + self._dirs)
            choice = self.rng.random()
            if choice < 0.2 and link.is_symlink():
                link.unlink()
                link.write_bytes(b"now a file\n")
            elif link.exists() and not link.is_symlink():
                link.unlink()
                os.symlink(target, link)
            else:
                temp = self.local / f".torture-link-{n}.tmp{self._next()}"
                os.symlink(target, temp)
                os.rename(temp, link)
            self.changed_paths += 1
        return f"symlinks {count}"

    def big_file(self, size: int) -> str:
        rel = f"torture-big-{self._next()}.dat"
        temp = self.local / f".{rel}.part"
        with open(temp, "wb") as handle:
            left = size
            while left > 0:
                handle.write(self.rng.randbytes(min(CHUNK, left)))
                left -= CHUNK
        os.rename(temp, self.local / rel)
        self.account(self.local / rel)
        self.big_files.append(rel)
        return f"big file {rel} of {size >> 20} MiB"

    def poke(self, rel: str) -> str:
        """Ten bytes changed in place in the middle of `rel` (a big file)."""
        path = self.local / rel
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            handle.write(self.rng.randbytes(10))
        self.changed_paths += 1
        self.changed_bytes += 10
        return f"10-byte edit of {rel}"

    def drop_big_files(self) -> str:
        for rel in self.big_files:
            (self.local / rel).unlink(missing_ok=True)
            self.changed_paths += 1
        gone = len(self.big_files)
        self.big_files = []
        return f"delete {gone} big files"

    def random_action(self) -> str:
        """One action, weighted towards what real work looks like."""
        roll = self.rng.random()
        if roll < 0.25:
            return self.checkout(clean=self.rng.random() < 0.3)
        if roll < 0.5:
            return self.edit(self.rng.randint(1, 40))
        if roll < 0.62:
            return self.create(self.rng.randint(1, 20))
        if roll < 0.74:
            return self.delete(self.rng.randint(1, 15))
        if roll < 0.87:
            return self.move_dir()
        return self.symlinks(self.rng.randint(1, 4))

