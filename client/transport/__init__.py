"""Bytes to and from one agent: the SSH connection and the agent's start (`ssh`, `bootstrap`),
the byte streams (`streams`), the framed protocol with its lanes and batches (`link`, `lanes`,
`outbox`, `pullroutes`), and whether the link is alive (`liveness`). Foreign errors (asyncssh,
OS) become the client's closed / broken errors here.
"""
