"""The lsync agent: runs on the remote host, applies operations under one root.

It is started by the client's bootstrap loader (see `lsync.client.transport.bootstrap`) with nothing
installed remotely but python3 >= 3.6, and speaks the protocol of `lsync.protocol` over its
stdin and stdout. Standard library only (msgpack travels with it when the host lacks it).
"""
