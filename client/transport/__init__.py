"""Bytes to and from one agent: the SSH connection and the agent's start (`ssh`, `bootstrap`),
the byte streams (`streams`), the framed protocol: requests and their replies (`link`), what
it writes, in order, on the main channel and its data lanes (`writing`, `lanes`, `outbox`),
pull answers (`pullroutes`), and whether the link is alive (`liveness`). Foreign errors (asyncssh,
OS) become the client's closed / broken errors here.
"""
