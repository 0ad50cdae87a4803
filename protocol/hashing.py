"""Content digests: the algorithms both ends may use, and their negotiation.

A digest is 16 raw bytes. "xxh3-128" needs the `xxhash` package; "sha256-128" (the first
16 bytes of SHA-256) and "blake2b-128" are always available from `hashlib`. The client
offers its list in order of preference; the agent picks the first one it computes at full
speed, passing over "sha256-128" where SHA-256 is slow (`sha256_is_fast`), and taking
first one it already holds a record of the root under (`choose_hash`).

Why SHA-256 at all: where the CPU has SHA instructions (x86's SHA-NI, ARMv8's SHA2) and
hashlib's SHA-256 is OpenSSL's, which uses them, it hashes about 1.1 GB/s against
BLAKE2b's 0.7-0.9 GB/s; the initial sync of the Linux kernel hashes 1.3 GB on the client,
and a first contact as much on the remote. Elsewhere (no such instructions, or Python's
own SHA-256, as in some builds of 3.6) it runs at 0.3-0.4 GB/s, and BLAKE2b is kept. The
rule is read off the machine, never timed, so that the choice does not flip between two
sessions; and a root already recorded under one algorithm keeps it (each algorithm has its
own hash cache and record: a change would hash everything again, so an upgrade of lsync
that makes SHA-256 the choice keeps the trees synced before on BLAKE2b).
"""

import hashlib
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

XXH3_128 = "xxh3-128"
SHA256_128 = "sha256-128"
BLAKE2B_128 = "blake2b-128"
DIGEST_SIZE = 16
ALGORITHMS = (XXH3_128, SHA256_128, BLAKE2B_128)  # every name either end may offer
_CPU_FLAGS = ("sha_ni", "sha2")  # /proc/cpuinfo: x86's "flags", ARMv8's "Features"


def _blake2b() -> Any:
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


class _Sha256Prefix:
    """SHA-256 cut to DIGEST_SIZE bytes (`update` is hashlib's own: no call in between)."""

    __slots__ = ("_hash", "update")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.update = self._hash.update

    def digest(self) -> bytes:
        return self._hash.digest()[:DIGEST_SIZE]


def sha256_is_fast(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether hashlib's SHA-256 here is OpenSSL's on a CPU with SHA instructions."""
    if getattr(hashlib.sha256, "__name__", "") != "openssl_sha256":
        return False
    if sys.platform == "darwin":
        return platform.machine() == "arm64"  # (every Apple CPU of that kind has them)
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return any(flag in value.split() for flag in _CPU_FLAGS)
    except OSError:
        pass
    return False


def _hashers() -> Dict[str, Callable[[], Any]]:
    found: Dict[str, Callable[[], Any]] = {BLAKE2B_128: _blake2b, SHA256_128: _Sha256Prefix}
    try:
        import xxhash
    except ImportError:
        return found
    found[XXH3_128] = xxhash.xxh3_128
    return found


HASHERS = _hashers()
SHA256_FAST = sha256_is_fast()


def available_hashes() -> List[str]:
    """Algorithms this process computes at full speed, best first."""
    return [name for name in ALGORITHMS
            if name in HASHERS and (name != SHA256_128 or SHA256_FAST)]


def choose_hash(offered: List[str], recorded: Sequence[str] = ()) -> Optional[str]:
    """The algorithm to use from the `offered` list: the first this process computes at
    full speed, preferring one in `recorded` (the agent holds a record of the root under
    it: another would hash the whole tree again); else the first it can compute at all;
    None if none."""
    available = available_hashes()
    fast = [name for name in offered if name in available]
    for name in fast:
        if name in recorded:
            return name
    if fast:
        return fast[0]
    for name in offered:
        if name in HASHERS:
            return name
    return None


def new_hasher(name: str) -> Any:
    """A fresh hash object with update() and digest() for algorithm `name`."""
    return HASHERS[name]()


def digest_of(name: str, data: bytes) -> bytes:
    hasher = new_hasher(name)
    hasher.update(data)
    result: bytes = hasher.digest()
    return result
