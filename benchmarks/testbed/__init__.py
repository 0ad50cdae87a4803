"""The high-latency testbed: a private sshd, a TCP delay proxy and a tree generator.

``sshd`` runs a private OpenSSH server on 127.0.0.1 with its own keys and client config;
``proxy`` sits between client and server and delays each direction by a one-way delay
(``relay``: its connections);
``trees`` writes deterministic source trees to sync. The tests use the same pieces.
"""
