"""How many round trips from an authenticated SSH connection to the first acknowledged write.

Runs the private sshd behind the delay proxy (RTT 300 ms by default), connects with lsync's
own `connect`, then starts the agent exactly as `lsync connect` does — Hello and a WriteFile
queued before the channel exists, so they ride inside the exec request — and times the
Welcome and the write's acknowledgement. Target (issue 2): at most 2 round trips.

    python -m benchmarks.bootstrap_rtt [--rtt-ms 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.testbed.proxy import DelayProxy
from benchmarks.testbed.sshd import LOOPBACK, PrivateSshd
from lsync.client.transport import ssh
from lsync.client.transport.link import AgentLink
from lsync.client.transport.streams import SshAgentStream
from lsync.protocol import PROTOCOL_VERSION
from lsync.protocol import messages as m


async def one_run(config: Path, alias: str, remote: Path) -> tuple[float, float, float]:
    started = time.monotonic()
    conn = await ssh.connect(ssh.Target(alias, None, str(remote)), [str(config)], False)
    authenticated = time.monotonic()
    stream = SshAgentStream()
    link = AgentLink(stream)
    link.start(m.Hello(PROTOCOL_VERSION, {"hash": ["xxh3-128", "blake2b-128"]},
                                 str(remote), {"create_root": True}))
    ack = link.submit(m.WriteFile(link.next_seq(), "first.c", 0o644, 0, b"int x;\n", True))
    await ssh.start_agent(conn, stream)
    await link.welcome(30)
    welcomed = time.monotonic()
    reply = await ack
    acked = time.monotonic()
    assert isinstance(reply, m.Ack), reply
    await link.close()
    conn.close()
    await conn.wait_closed()
    return authenticated - started, welcomed - authenticated, acked - authenticated


async def measure(rtt_ms: float, runs: int) -> list[tuple[float, float, float]]:
    with tempfile.TemporaryDirectory() as tmp, PrivateSshd(Path(tmp) / "sshd") as sshd:
        sshd.write_client_config()
        async with DelayProxy((LOOPBACK, sshd.port), rtt_ms / 2000) as proxy:
            config = sshd.write_client_config(port=proxy.port)
            return [await one_run(config, sshd.alias, Path(tmp) / f"remote{i}")
                    for i in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=300.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = asyncio.run(measure(args.rtt_ms, args.runs))
    rtt = args.rtt_ms / 1000
    print(f"RTT {args.rtt_ms:.0f} ms, {args.runs} runs (median)")
    print("| step | seconds | round trips |")
    print("|---|---|---|")
    for name, column in (("connect + authenticate", 0), ("authenticated -> Welcome", 1),
                         ("authenticated -> first write acknowledged", 2)):
        value = statistics.median(r[column] for r in results)
        print(f"| {name} | {value:.3f} | {value / rtt:.2f} |")


if __name__ == "__main__":
    main()
