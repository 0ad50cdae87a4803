"""What a session offers the agent as content hashes, and its guess before the answer
(lsync.client.local.hashchoice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsync.client.local import hashchoice
from lsync.client.local.hashcache import HashCache
from lsync.protocol import hashing

XXH3, SHA, BLAKE = hashing.XXH3_128, hashing.SHA256_128, hashing.BLAKE2B_128


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tree = tmp_path / "tree"
    tree.mkdir()
    return tree


def _save_cache(tree: Path, algorithm: str) -> None:
    cache = HashCache(algorithm, root=tree)
    cache.store("f", (tree / "f").stat(), cache.digest_of(b"x"), 0)
    cache.save(force=True)


def test_a_new_tree_is_offered_xxh3_then_sha256_where_fast_then_blake2b(
        cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "SHA256_FAST", True)
    assert hashchoice.offered(cache_home) == [XXH3, SHA, BLAKE]
    assert hashchoice.likely(cache_home, None) == XXH3
    monkeypatch.setattr(hashing, "SHA256_FAST", False)
    assert hashchoice.offered(cache_home) == [XXH3, BLAKE, SHA]


def test_a_tree_synced_before_keeps_its_caches_algorithm(
        cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade that makes SHA-256 the choice does not hash a tree synced on BLAKE2b
    again: the offer starts with the algorithm of its newest cache."""
    monkeypatch.setattr(hashing, "SHA256_FAST", True)
    (cache_home / "f").write_bytes(b"x")
    _save_cache(cache_home, BLAKE)
    assert hashchoice.offered(cache_home) == [BLAKE, XXH3, SHA]
    assert hashchoice.likely(cache_home, None) == BLAKE
    assert hashchoice.likely(cache_home, SHA) == SHA  # (what the agent chose last)
    # The agent's side of it: no xxhash there, SHA-256 fast or not, BLAKE2b is taken.
    offer = [name for name in hashchoice.offered(cache_home) if name != XXH3]
    assert hashing.choose_hash(offer) == BLAKE
