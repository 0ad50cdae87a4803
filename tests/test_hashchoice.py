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


def test_the_offer_is_xxh3_then_sha256_where_fast_then_blake2b(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "SHA256_FAST", True)
    assert hashchoice.offered() == [XXH3, SHA, BLAKE]
    monkeypatch.setattr(hashing, "SHA256_FAST", False)
    assert hashchoice.offered() == [XXH3, BLAKE, SHA]


def test_the_guess_is_the_last_choice_else_the_trees_newest_cache_else_the_offers_head(
        cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "SHA256_FAST", True)
    assert hashchoice.likely(cache_home, None) == XXH3
    HashCache(BLAKE, root=cache_home).save(force=True)  # a tree synced before on BLAKE2b
    assert hashchoice.likely(cache_home, None) == BLAKE
    assert hashchoice.likely(cache_home, SHA) == SHA  # (what the agent chose last)
    # The offer does not depend on the tree: every target's agent sees the same list and
    # keeps its own recorded algorithm (lsync.protocol.hashing.choose_hash).
    assert hashchoice.offered() == [XXH3, SHA, BLAKE]
