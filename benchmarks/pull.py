"""Pulling a big build artefact back over a long link, and saves made meanwhile (issue 18).

    python -m benchmarks.pull [--size-mb 100] [--rtt-ms 300] [--lanes 4] [--saves 20]

One `lsync connect` session runs through the testbed (the private sshd behind the delay
proxy at one-way delay RTT/2, no bandwidth cap), its `.lsync.toml` pulling `build/*.bin`.
Once it is `ready`:

1. the "build" writes a new artefact of incompressible bytes into the remote tree, and
   `lsync pull` (the control request, sent from this process) brings it back: the time,
   the throughput, and the issue's bar, 0.8 x lanes x 2 MiB per RTT (what the lanes would
   carry with OpenSSH's 2 MiB windows; lsync's own client windows are larger);
2. the same, with saves made while the artefact comes: one small file saved locally every
   `--saves-every-ms`; a thread reading the remote copy every millisecond notes when each
   version lands. Bar: p95 of save-to-remote <= one-way delay + 50 ms (saves travel on
   their own lane and the agent sends pulled data from worker threads);
3. the same saves with no pull running (the reference);
4. a 100-byte change of the artefact pulled again (a delta against the local copy).

Every pulled file is checked byte for byte. Exit status 0 when all bars hold.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.provenance import machine_description
from benchmarks.slow_link import Session, commit, digest, write_random
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd
from lsync.client.buildloop.control import request
from lsync.client.buildloop.controlpath import find_socket

MIB = 1 << 20


def pull(local: Path) -> dict[str, object]:
    socket = find_socket(local)
    assert socket is not None, "the session has no control socket"
    return asyncio.run(request(socket, {"v": 1, "op": "pull", "patterns": [],
                                        "timeout": 60}, 3600))


class Landings:
    """Reads a remote file every millisecond and notes when each content first appears."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[bytes, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                content = self.path.read_bytes()
            except OSError:
                content = b""
            self.seen.setdefault(content, time.monotonic())
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def saves(local: Path, remote: Path, count: int, every: float, tag: str,
          until: threading.Event | None = None) -> tuple[list[float], int]:
    """Save `count` versions of one file (stopping early once `until` is set): the
    seconds each took to land remotely, and how many never landed as such (a newer save
    replaced them while they were queued: lsync sends the newest)."""
    landings = Landings(remote / "save.c")
    made: list[tuple[bytes, float]] = []
    try:
        for i in range(count):
            if until is not None and until.is_set():
                break
            content = f"int {tag}_{i} = {i};\n".encode() * 20
            temp = local / ".save.c.tmp"
            temp.write_bytes(content)
            began = time.monotonic()
            os.rename(temp, local / "save.c")
            made.append((content, began))
            time.sleep(every)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and made and made[-1][0] not in landings.seen:
            time.sleep(0.01)
    finally:
        landings.close()
    landed = [landings.seen[c] - t for c, t in made if c in landings.seen]
    return landed, len(made) - len(landed)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=300.0)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--saves-every-ms", type=float, default=150.0)
    args = parser.parse_args(argv)
    size = int(args.size_mb * 1_000_000)
    rtt = args.rtt_ms / 1000
    bar_rate = 0.8 * args.lanes * 2 * MIB / rtt
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="lsync-pull-") as work_name:
        work = Path(work_name)
        local, remote = work / "local", work / "remote"
        local.mkdir()
        (local / ".lsync.toml").write_text('[pull]\npaths = ["build/*.bin"]\n')
        (local / "save.c").write_text("int save;\n")
        with PrivateSshd(work / "sshd") as sshd, ThreadedProxy(
                ("127.0.0.1", sshd.port), rtt / 2) as proxy:
            config = sshd.write_client_config(port=proxy.port)
            session = Session(["connect", "-F", str(config), "--lanes", str(args.lanes),
                               f"{sshd.alias}:{remote}"], local)
            try:
                session.wait(lambda: session.count(" ready ") > 0, 120, "ready line")
                (remote / "build").mkdir()
                artefact = remote / "build" / "app.bin"
                pulled = local / "build" / "app.bin"

                write_random(artefact, size)
                proxy.reset_counters()
                began = time.monotonic()
                reply = pull(local)
                took = time.monotonic() - began
                same = digest(pulled) == digest(artefact)
                rate = size / took
                ok = ok and same and rate >= bar_rate and reply.get("pulled_count") == 1
                rows.append(f"| pull a new {size / 1e6:g} MB artefact | {took:.2f} s | "
                            f"{rate / MIB:.1f} MiB/s | {bar_rate / MIB:.1f} MiB/s | "
                            f"{proxy.counters().bytes_down:,} | {'yes' if same else 'NO'} |")

                write_random(artefact, size)
                done = threading.Event()
                result: dict[str, object] = {}

                took_pulling: list[float] = []

                def pulling() -> None:
                    began = time.monotonic()
                    try:
                        result.update(pull(local))
                    finally:
                        took_pulling.append(time.monotonic() - began)
                        done.set()

                puller = threading.Thread(target=pulling, daemon=True)
                puller.start()
                time.sleep(rtt)  # the pull is under way (listed, data coming)
                during, collapsed = saves(local, remote, args.saves,
                                          args.saves_every_ms / 1000, "during", done)
                puller.join()
                took = took_pulling[0]
                overlapped = len(during) + collapsed
                same = digest(pulled) == digest(artefact)
                save_bar = rtt / 2 + 0.050
                ok = (ok and same and bool(during) and p95(during) <= save_bar
                      and result.get("pulled_count") == 1)
                rows.append(f"| pull another {size / 1e6:g} MB artefact, saving meanwhile | "
                            f"{took:.2f} s | {size / took / MIB:.1f} MiB/s | | | "
                            f"{'yes' if same else 'NO'} |")

                quiet, collapsed_quiet = saves(local, remote, args.saves,
                                               args.saves_every_ms / 1000, "quiet")

                with open(artefact, "r+b") as handle:
                    handle.seek(size // 3)
                    handle.write(b"x" * 100)
                proxy.reset_counters()
                began = time.monotonic()
                reply = pull(local)
                took = time.monotonic() - began
                same = digest(pulled) == digest(artefact)
                down = proxy.counters().bytes_down
                ok = ok and same and reply.get("pulled_count") == 1
                rows.append(f"| pull it again after a 100-byte change (delta) | {took:.2f} s "
                            f"| | | {down:,} | {'yes' if same else 'NO'} |")
            finally:
                status = session.stop()
    print(f"Run {started_at}, lsync at {commit()}; link RTT {args.rtt_ms:.0f} ms, uncapped "
          f"(delay proxy); {args.lanes} data lanes.")
    print(f"Machine: {machine_description()}")
    print()
    print("| step | time | throughput | bar (0.8 x lanes x 2 MiB per RTT) | bytes down "
          "| local copy identical |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| saves of one small file | count | median | p95 | max | bar (one-way + 50 ms) |")
    print("|---|---|---|---|---|---|")
    for label, values in (("during the pull", during), ("with no pull running", quiet)):
        if values:
            ordered = sorted(values)
            print(f"| {label} | {len(values)} | {ordered[len(ordered) // 2] * 1000:.0f} ms | "
                  f"{p95(values) * 1000:.0f} ms | {ordered[-1] * 1000:.0f} ms | "
                  f"{(rtt / 2 + 0.050) * 1000:.0f} ms |")
    print(f"\n{overlapped} saves overlapped the pull ({collapsed} replaced by a newer one while "
          f"queued, {collapsed_quiet} with no pull); lsync exited {status}. Its pull notes:")
    for line in session.lines:
        if " pulled " in line:
            print(f"    {line.strip()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
