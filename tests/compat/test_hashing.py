"""Content digests: SHA-256's prefix, and which algorithm an end takes from an offer."""

import hashlib
import os
import tempfile

from lsync.agent.records import DigestRecord
from lsync.protocol import hashing
from lsync.protocol import messages as m
from tests.compat.helpers import Pair, TempTree, home_at


def _cpuinfo(text):
    fd, path = tempfile.mkstemp(prefix="lsync-cpuinfo-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_sha256_128_is_the_first_16_bytes_of_sha256_fed_in_pieces():
    data = os.urandom(100000)
    hasher = hashing.new_hasher(hashing.SHA256_128)
    for start in range(0, len(data), 4099):
        hasher.update(data[start:start + 4099])
    assert hasher.digest() == hashlib.sha256(data).digest()[:16]
    assert hashing.digest_of(hashing.SHA256_128, data) == hasher.digest()
    assert len(hashing.digest_of(hashing.BLAKE2B_128, data)) == hashing.DIGEST_SIZE


def test_sha256_counts_as_fast_only_for_openssls_on_a_cpu_with_sha_instructions():
    x86 = _cpuinfo("processor\t: 0\nflags\t\t: fpu sse2 avx2 sha_ni\n")
    arm = _cpuinfo("processor\t: 0\nFeatures\t: fp asimd aes sha1 sha2 crc32\n")
    plain = _cpuinfo("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    real = hashlib.sha256
    try:
        hashlib.sha256 = lambda *a: real(*a)  # (not OpenSSL's: another name)
        assert not hashing.sha256_is_fast(x86)
        def openssl_sha256(*a):
            return real(*a)
        hashlib.sha256 = openssl_sha256
        assert hashing.sha256_is_fast(x86) and hashing.sha256_is_fast(arm)
        assert not hashing.sha256_is_fast(plain)
        assert not hashing.sha256_is_fast(plain + ".gone")
    finally:
        hashlib.sha256 = real
        for path in (x86, arm, plain):
            os.unlink(path)


def test_an_end_takes_the_first_offer_it_computes_at_full_speed():
    saved = hashing.SHA256_FAST
    offer = [hashing.XXH3_128, hashing.SHA256_128, hashing.BLAKE2B_128]
    try:
        hashing.SHA256_FAST = True
        expected = hashing.XXH3_128 if hashing.XXH3_128 in hashing.HASHERS \
            else hashing.SHA256_128
        assert hashing.choose_hash(offer) == expected
        hashing.SHA256_FAST = False  # slow here: BLAKE2b, though offered after it
        assert hashing.choose_hash(offer[1:]) == hashing.BLAKE2B_128
        assert hashing.SHA256_128 not in hashing.available_hashes()
        # What it can compute at all is still better than no common hash.
        assert hashing.choose_hash([hashing.SHA256_128]) == hashing.SHA256_128
        assert hashing.choose_hash(["md5"]) is None
        # A root recorded under an algorithm keeps it, if it is fast here.
        hashing.SHA256_FAST = True
        assert hashing.choose_hash(offer[1:], [hashing.BLAKE2B_128]) == hashing.BLAKE2B_128
        hashing.SHA256_FAST = False
        assert hashing.choose_hash(offer[1:], [hashing.SHA256_128]) == hashing.BLAKE2B_128
    finally:
        hashing.SHA256_FAST = saved


def _chosen(root, home):
    with home_at(home):
        pair = Pair(root, use_cache=True,
                    hashes=[hashing.SHA256_128, hashing.BLAKE2B_128])
        welcome = pair.pump()
        assert isinstance(welcome[0], m.Welcome), welcome
        pair.service.close()
        return welcome[0].chosen["hash"]


def test_an_agent_keeps_the_algorithm_it_holds_a_record_of_the_root_under():
    """An upgrade that makes SHA-256 the client's first choice does not make the agent
    hash a tree it recorded under BLAKE2b again."""
    saved = hashing.SHA256_FAST
    tree = TempTree()
    fresh, recorded = (tempfile.mkdtemp(prefix="lsync-compat-home-") for _ in range(2))
    try:
        hashing.SHA256_FAST = True
        assert _chosen(tree.root, fresh) == hashing.SHA256_128  # nothing recorded there
        with home_at(recorded):
            record = DigestRecord.default_path(os.path.normpath(tree.root),
                                               hashing.BLAKE2B_128)
        os.makedirs(os.path.dirname(record))
        with open(record, "w") as f:
            f.write("")  # (an empty record: loaded as none, but there)
        assert _chosen(tree.root, recorded) == hashing.BLAKE2B_128
    finally:
        hashing.SHA256_FAST = saved
        tree.cleanup()
