"""Benchmarks for lsync: a high-latency testbed and side-by-side runs against its peers.

The package is importable from the repository root as ``benchmarks``. Nothing in it is part
of lsync itself; it only drives lsync and its peers (rsync, the inotifywait+rsync script,
lsyncd) over a simulated long link and reports what it measured.
"""
