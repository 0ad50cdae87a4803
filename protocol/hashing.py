"""Content digests: the algorithms both ends may use, and their negotiation.

A digest is 16 raw bytes. "xxh3-128" needs the `xxhash` package; "blake2b-128" is always
available from `hashlib`. The client offers its list in order of preference; the agent
picks the first one it can compute (`choose_hash`).
"""

import hashlib
from typing import Any, Callable, Dict, List, Optional

XXH3_128 = "xxh3-128"
BLAKE2B_128 = "blake2b-128"
DIGEST_SIZE = 16


def _blake2b() -> Any:
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def _hashers() -> Dict[str, Callable[[], Any]]:
    found: Dict[str, Callable[[], Any]] = {BLAKE2B_128: _blake2b}
    try:
        import xxhash
    except ImportError:
        return found
    found[XXH3_128] = xxhash.xxh3_128
    return found


HASHERS = _hashers()


def available_hashes() -> List[str]:
    """Algorithms this process can compute, best first."""
    return [name for name in (XXH3_128, BLAKE2B_128) if name in HASHERS]


def choose_hash(offered: List[str]) -> Optional[str]:
    """The first offered algorithm this process supports, or None."""
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
