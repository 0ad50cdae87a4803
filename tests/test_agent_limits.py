"""Limits the agent enforces are above what the client ever asks for in one request."""

from __future__ import annotations

from lsync.client.remote import initial
from lsync.protocol import messages as m
from lsync.protocol.framing import MAX_FRAME


def test_client_hash_batches_fit_the_agent_limit() -> None:
    assert initial.HASH_BATCH <= m.MAX_HASH_PATHS <= m.MAX_ARRAY_LEN


def test_the_largest_hash_request_fits_in_a_frame() -> None:
    longest = "x" * 4096  # MAX_PATH_BYTES
    payload = m.encode_message(m.HashPaths(1, [longest] * initial.HASH_BATCH))
    assert len(payload) <= MAX_FRAME
