"""The lsync client: the `lsync` command, the SSH connection, the watcher and sync engine."""
