"""Deterministic source trees to synchronise: `tiny`, `small` and `kernel`.

The same preset and seed always give the same tree, byte for byte (paths, sizes, contents),
so runs on different machines and days are comparable. `small` is 5,000 C-like text files of
1-50 KB in ~400 directories; `kernel` is ~80,000 files in ~5,000 directories whose sizes are
shaped like a Linux source tree (many small files, a long tail, a few files of several MB,
~1 GB in all); `tiny` is a few dozen files for quick runs and tests.

Content is built from a pre-made pool of random C-like (or prose) lines grouped into short
blocks, picked at random per file and headed by a line naming the file, so it compresses
roughly like real source (about 3.3x with zlib), no two files are equal, and no long runs
repeat across files. Generating `kernel` takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TreeSpec:
    """Shape of a tree: counts, and a lognormal size model clipped to [min_size, max_size]."""

    name: str
    files: int
    dirs: int
    median_size: int
    sigma: float
    min_size: int
    max_size: int
    total_bytes: int | None = None  # rescale the lognormal part to reach about this total
    big_files: int = 0  # extra large files (sizes in big_sizes range), counted in `files`
    big_min: int = 0
    big_max: int = 0
    c_only: bool = False  # only .c/.h files (the `small` tree); else a kernel-like mix


PRESETS: dict[str, TreeSpec] = {
    "tiny": TreeSpec("tiny", files=40, dirs=6, median_size=3_000, sigma=0.8,
                     min_size=200, max_size=8_000, c_only=True),
    "small": TreeSpec("small", files=5_000, dirs=400, median_size=14_000, sigma=0.7,
                      min_size=1_000, max_size=50_000, c_only=True),
    "kernel": TreeSpec("kernel", files=80_000, dirs=5_000, median_size=5_500, sigma=1.25,
                       min_size=40, max_size=1_500_000, total_bytes=1_000_000_000,
                       big_files=12, big_min=2_000_000, big_max=9_000_000),
}


@dataclass(frozen=True)
class PlannedFile:
    path: str  # relative POSIX path
    size: int
    kind: str  # "c" or "prose"


@dataclass
class TreePlan:
    """Directories (parents first) and files of a tree, before any content is written."""

    spec: TreeSpec
    seed: int
    dirs: list[str] = field(default_factory=list)
    files: list[PlannedFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class TreeStats:
    preset: str
    seed: int
    files: int
    dirs: int
    bytes: int
    seconds: float


# -- vocabulary -----------------------------------------------------------------------------


def _wordlist(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_WORDS = _wordlist(
    "the of to and a in is it that for on with as be this by are not or from at an can "
    "which if when all will has was one may must but each only into more other than then "
    "also used use set get new before after while until because between without during "
    "device driver buffer queue request reply state lock entry list table page memory cache "
    "interrupt timer clock power reset error value count length offset address register "
    "bit mask flag mode port link channel ring descriptor packet frame header payload "
    "kernel module user thread task process file inode block sector superblock journal "
    "mount path name node tree root child parent parent's caller callee context handler "
    "callback notifier event wait wake sleep spin mutex semaphore atomic barrier ordering "
    "allocate free release acquire hold drop check verify update return fail succeed "
    "enable disable start stop probe remove suspend resume init exit open close read write"
)

_PREFIXES = _wordlist(
    "dev drv phy usb pci irq dma buf reg clk pm net skb sk inode page vma mm bio req ctx "
    "cfg priv hw fw port link chan ring desc tx rx msg cmd state lock list node entry work "
    "timer gpio i2c spi acpi of sysfs debugfs trace perf sched cpu numa mem blk scsi ata nvme "
    "ext4 btrfs xfs nfs tcp udp ip ipv6 eth wlan bt snd drm kms fb crtc plane hid input"
)

_SUFFIXES = _wordlist(
    "init exit get put alloc free read write enable disable probe remove reset start stop "
    "lock unlock count size len flags mask base addr data ops info id idx num max min "
    "create destroy attach detach submit complete handle update show store"
)

_TYPES = ("int", "unsigned int", "u32", "u64", "u8", "u16", "size_t", "bool", "long",
          "unsigned long", "void *", "const char *", "struct device *", "dma_addr_t")

_DIR_WORDS = _wordlist(
    "arch drivers fs net kernel mm include lib crypto security sound block tools scripts "
    "firmware virt ipc init samples usr certs io_uring rust core common platform generic "
    "boot configs mach plat lib util misc base bus class char gpu drm amd intel nouveau "
    "radeon display media video input hid usb host gadget storage serial tty pci acpi "
    "clk gpio i2c spi pinctrl regulator power supply thermal watchdog mfd iio leds hwmon "
    "scsi ata nvme mmc mtd nand md dm bcache infiniband hw ulp ethernet wireless phy can "
    "bluetooth nfc ppp bonding bridge ipv4 ipv6 netfilter sched tipc sctp xfrm unix packet "
    "ext4 btrfs xfs nfs nfsd cifs smb fuse overlayfs proc sysfs debugfs tracefs quota "
    "crypto asymmetric keys selinux apparmor smack integrity tomoyo landlock codecs soc "
    "pcm firewire sparc powerpc x86 arm arm64 riscv mips s390 loongarch kvm xen hyperv"
)

_C_EXTS = ((".c", 0.55), (".h", 0.45))
_KERNEL_KINDS = (  # (suffix or full name, weight, content kind)
    (".c", 0.42, "c"), (".h", 0.30, "c"), (".S", 0.02, "c"), (".dtsi", 0.03, "c"),
    (".dts", 0.03, "c"), (".rst", 0.04, "prose"), (".txt", 0.01, "prose"),
    (".yaml", 0.05, "prose"), ("Makefile", 0.03, "prose"), ("Kconfig", 0.02, "prose"),
    (".sh", 0.01, "prose"), (".py", 0.01, "c"), (".json", 0.01, "prose"),
    (".rs", 0.01, "c"),
)


def _identifier(rng: random.Random) -> str:
    parts = [rng.choice(_PREFIXES)]
    if rng.random() < 0.6:
        parts.append(rng.choice(_PREFIXES))
    parts.append(rng.choice(_SUFFIXES))
    return "_".join(parts)


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _c_line(rng: random.Random) -> str:
    """One random line of C-like code, with the rough mix of a kernel source file."""
    ident = _identifier(rng)
    const = _identifier(rng).upper()
    var = rng.choice(_PREFIXES)
    other = rng.choice(_PREFIXES)
    tabs = "\t" * rng.choice((0, 1, 1, 1, 2, 2, 3))
    r = rng.random()
    if r < 0.10:
        return ""
    if r < 0.16:
        return tabs + rng.choice(("}", "{", "\treturn 0;", "\tbreak;", "} else {", "};"))
    if r < 0.20:
        header = var + rng.choice(("", "_" + rng.choice(_SUFFIXES)))
        return f"#include <linux/{header}.h>"
    if r < 0.25:
        value = rng.choice(("0x{:x}", "BIT({})", "{}")).format(rng.randrange(1 << 16))
        return f"#define {const}\t{value}"
    if r < 0.31:
        ret, arg = rng.choice(_TYPES), rng.choice(_TYPES)
        return f"static {ret} {ident}(struct {var} *{other}, {arg} {rng.choice(_PREFIXES)})"
    if r < 0.40:
        return f"{tabs}/* {_words(rng, 3, 10)} */"
    if r < 0.46:
        return f" * {_words(rng, 4, 12)}"
    if r < 0.55:
        if rng.random() < 0.5:
            test = rng.choice((")", " < 0)", " == NULL)", f" & {const})"))
            return f"{tabs}if ({rng.choice(('!', ''))}{var}->{ident}{test} {{"
        return f"{tabs}if ({ident}({var}))"
    if r < 0.66:
        return f"{tabs}{ident}({var}, {other}->{_identifier(rng)});"
    if r < 0.75:
        value = rng.choice((const, "0", "NULL", "true", f"{_identifier(rng)}({other})"))
        return f"{tabs}{var}->{ident} = {value};"
    if r < 0.82:
        return f"{tabs}{rng.choice(_TYPES)} {var}_{rng.choice(_SUFFIXES)};"
    if r < 0.86:
        value = rng.choice(("-EINVAL", "-ENOMEM", "-EIO", "-EBUSY", "ret", f"{ident}({var})"))
        return f"{tabs}return {value};"
    if r < 0.90:
        level = rng.choice(("err", "warn", "dbg", "info"))
        return f'{tabs}dev_{level}(&{var}->dev, "{_words(rng, 2, 7)}: %d\\n", ret);'
    if r < 0.93:
        return f"{tabs}for (i = 0; i < {var}->{ident}; i++) {{"
    if r < 0.96:
        return f"{tabs}case {const}:"
    if r < 0.98:
        call = rng.choice(("spin_lock", "spin_unlock", "mutex_lock", "mutex_unlock"))
        return f"{tabs}{call}(&{var}->lock);"
    return f"{ident}:"


def _prose_line(rng: random.Random) -> str:
    """One random line of documentation, Kconfig, Makefile or YAML-like text."""
    r = rng.random()
    name = _identifier(rng)
    if r < 0.12:
        return ""
    if r < 0.20:
        return f"config {name.upper()}" if rng.random() < 0.5 else f"  - {name}"
    if r < 0.28:
        if rng.random() < 0.5:
            return f"\tdepends on {name.upper()}"
        return f"obj-$(CONFIG_{name.upper()}) += {_identifier(rng)}.o"
    line = _words(rng, 5, 14)
    return line[:1].upper() + line[1:] + rng.choice((".", ",", "", ":"))


_LINES_PER_POOL = 8_192
_BLOCKS_PER_POOL = 16_384
_ZIPF_EXPONENT = 0.9  # tuned so zlib compresses the text about 3.3x, like C source


class _ContentPool:
    """Blocks of 2-6 random lines, pre-joined; file bodies are random sequences of blocks."""

    def __init__(self, seed: int, kind: str) -> None:
        rng = random.Random(f"pool:{kind}:{seed}")
        make = _c_line if kind == "c" else _prose_line
        lines = [(make(rng) + "\n").encode() for _ in range(_LINES_PER_POOL)]
        # Some lines are far more common than others (Zipf), as in real code.
        weights = [1.0 / (rank + 1) ** _ZIPF_EXPONENT for rank in range(len(lines))]
        cum = list(itertools.accumulate(weights))
        self.blocks = [
            b"".join(rng.choices(lines, cum_weights=cum, k=rng.randint(2, 6)))
            for _ in range(_BLOCKS_PER_POOL)
        ]
        self.mean_block = sum(map(len, self.blocks)) / len(self.blocks)

    def body(self, rng: random.Random, size: int) -> bytes:
        """`size` bytes of text (ends with a newline when size > 0)."""
        if size <= 0:
            return b""
        out = bytearray()
        while len(out) < size:
            k = max(1, math.ceil((size - len(out)) / self.mean_block * 1.05))
            out += b"".join(rng.choices(self.blocks, k=k))
        del out[size:]
        out[-1] = 0x0A
        return bytes(out)


_POOLS: dict[tuple[int, str], _ContentPool] = {}


def _pool(seed: int, kind: str) -> _ContentPool:
    key = (seed, kind)
    if key not in _POOLS:
        _POOLS[key] = _ContentPool(seed, kind)
    return _POOLS[key]


def _header(path: str, kind: str) -> bytes:
    if kind == "c" and not path.endswith(".py"):
        return f"// SPDX-License-Identifier: GPL-2.0\n/*\n * {path}\n */\n".encode()
    return f"# SPDX-License-Identifier: GPL-2.0\n# {path}\n".encode()


def file_content(path: str, size: int, kind: str, seed: int) -> bytes:
    """Content of one planned file: a header naming it, then pool text; exactly `size` bytes."""
    rng = random.Random(f"file:{seed}:{path}")
    head = _header(path, kind)[:size]
    return head + _pool(seed, kind).body(rng, size - len(head))


def text_of_size(size: int, seed: int = 0, kind: str = "c", name: str = "big.c") -> bytes:
    """A deterministic C-like (or prose) text of exactly `size` bytes (e.g. the 10 MB file)."""
    return file_content(name, size, kind, seed)


def one_line_edit(data: bytes, seed: int = 0) -> bytes:
    """`data` with one line near the middle changed (same length ± a few bytes)."""
    rng = random.Random(f"edit:{seed}:{len(data)}")
    mid = len(data) // 2
    start = data.rfind(b"\n", 0, mid) + 1
    end = data.find(b"\n", mid)
    if end < 0:
        end = len(data)
    new = f"\t/* edited {rng.randrange(1 << 30):08x} */".encode()
    return data[:start] + new + data[end:]


# -- planning ---------------------------------------------------------------------------------


def _plan_dirs(spec: TreeSpec, rng: random.Random) -> list[str]:
    dirs: list[str] = []
    children: dict[str, set[str]] = {"": set()}
    depth: dict[str, int] = {"": 0}
    top = min(spec.dirs, max(2, round(math.sqrt(spec.dirs) / 3)))
    for i in range(spec.dirs):
        if i < top:
            parent = ""
        else:
            # Favour recent (deeper) directories a little: trees are bushy, not flat.
            parent = dirs[min(len(dirs) - 1, int(len(dirs) * rng.random() ** 0.7))]
            if depth[parent] >= 7:
                parent = dirs[rng.randrange(top)]
        base = rng.choice(_DIR_WORDS)
        name = base
        n = 2
        while name in children[parent]:
            name = f"{base}{n}" if rng.random() < 0.5 else f"{base}-{rng.choice(_SUFFIXES)}"
            n += 1
        children[parent].add(name)
        path = f"{parent}/{name}" if parent else name
        dirs.append(path)
        children[path] = set()
        depth[path] = depth[parent] + 1
    return dirs


def _plan_sizes(spec: TreeSpec, rng: random.Random) -> list[int]:
    n_regular = spec.files - spec.big_files
    mu = math.log(spec.median_size)
    raw = [rng.lognormvariate(mu, spec.sigma) for _ in range(n_regular)]
    big = [rng.randint(spec.big_min, spec.big_max) for _ in range(spec.big_files)]
    scale = 1.0
    if spec.total_bytes is not None:
        # Find the scale at which the clipped regular sizes plus the big files hit the total.
        target = spec.total_bytes - sum(big)
        lo, hi = 0.1, 10.0
        for _ in range(40):
            scale = (lo + hi) / 2
            total = sum(min(spec.max_size, max(spec.min_size, int(s * scale))) for s in raw)
            lo, hi = (scale, hi) if total < target else (lo, scale)
    sizes = [min(spec.max_size, max(spec.min_size, int(s * scale))) for s in raw]
    sizes.extend(big)
    rng.shuffle(sizes)
    return sizes


def plan(preset: str | TreeSpec, seed: int = 0) -> TreePlan:
    """Paths and sizes of the tree `preset` with `seed`, without writing anything."""
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    rng = random.Random(f"plan:{spec.name}:{seed}")
    result = TreePlan(spec=spec, seed=seed)
    result.dirs = _plan_dirs(spec, rng)
    sizes = _plan_sizes(spec, rng)
    # Files per directory vary a lot (a few directories hold hundreds of files).
    weights = [rng.lognormvariate(0.0, 1.2) for _ in result.dirs]
    where = rng.choices(result.dirs, weights=weights, k=spec.files)
    names: dict[str, set[str]] = {}
    for size, d in zip(sizes, where, strict=True):
        if spec.c_only:
            ext = rng.choices([e for e, _ in _C_EXTS], [w for _, w in _C_EXTS])[0]
            kind = "c"
        else:
            ext, _, kind = rng.choices(_KERNEL_KINDS, [w for _, w, _ in _KERNEL_KINDS])[0]
        taken = names.setdefault(d, set())
        if ext[0] != "." and ext not in taken:
            name = ext
        else:
            suffix = ext if ext[0] == "." else ".mk"
            base = _identifier(rng)
            name = base + suffix
            n = 2
            while name in taken:
                name = f"{base}{n}{suffix}"
                n += 1
        taken.add(name)
        result.files.append(PlannedFile(path=f"{d}/{name}", size=size, kind=kind))
    return result


# -- writing ----------------------------------------------------------------------------------


def generate(preset: str | TreeSpec, root: Path | str, seed: int = 0) -> TreeStats:
    """Write the tree under `root` (created if missing; existing files are overwritten)."""
    t0 = time.perf_counter()
    p = plan(preset, seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for d in p.dirs:
        os.makedirs(root / d, exist_ok=True)
    total = 0
    for f in p.files:
        data = file_content(f.path, f.size, f.kind, seed)
        with open(root / f.path, "wb") as out:
            out.write(data)
        total += len(data)
    return TreeStats(
        preset=p.spec.name,
        seed=seed,
        files=len(p.files),
        dirs=len(p.dirs),
        bytes=total,
        seconds=time.perf_counter() - t0,
    )


def walk_files(root: Path | str) -> Iterator[str]:
    """Relative POSIX paths of every regular file under `root`, sorted."""
    root = str(root)
    found: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    yield from sorted(found)


def tree_digest(root: Path | str) -> str:
    """SHA-256 over every file's relative path and content (sorted): equal trees, equal hex."""
    h = hashlib.sha256()
    root = Path(root)
    for rel in walk_files(root):
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big"))
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.testbed.trees",
                                     description="Write a deterministic source tree.")
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digest", action="store_true", help="print the tree digest after")
    args = parser.parse_args(argv)
    stats = generate(args.preset, args.dir, args.seed)
    print(f"{stats.preset}: {stats.files} files, {stats.dirs} dirs, "
          f"{stats.bytes / 1e6:.1f} MB in {stats.seconds:.1f} s -> {args.dir}")
    if args.digest:
        print(tree_digest(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
