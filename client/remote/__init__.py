"""One target's core: what the remote holds, which paths differ, what to send, and what
each answer means.

The sans-IO part (`model`, `pathqueue`, `window`, `planner`, `checks`, `delta`) takes time and
replies as inputs and returns decisions. `remoteside` holds one target's instance of it;
`passes`, `initial`, `convergence` and `sender` look at local paths and turn what differs into
operations; `engine` is the thin asyncio driver. One of each per target; the local side
(`lsync.client.local`) is shared.
"""
