"""The lsync wire protocol, shared by the client and the agent.

Everything here is sans-IO: bytes go in, messages come out, and messages become bytes to
send. Nothing in this package touches files, sockets, clocks or asyncio, and it runs on the
oldest Python the agent supports (3.6) with the standard library plus msgpack.
"""

PROTOCOL_VERSION = 3  # 2: manifest entries carry `written` (what lsync made); 3: WriteBatch
