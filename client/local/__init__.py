"""The local side: the tree as it is on this machine, seen once for every target.

Watching (`watcher`, `inotify`), scanning (`scanner`, `confined_open`), reading files whole and
never torn (`stableread`), the records both report (`localentry`), digests remembered across
runs (`hashcache`), what git tracks and what the ignore rules leave out (`gitindex`,
`gitpatterns`, `ignore`, `ignored`), and `localside`, which holds one of each for a run and
shares scans and reads between its targets. Nothing here knows a remote host.
"""
