"""A big new file over a slow, long link (issue 15, defect 3): does it cross on the first try?

    python -m benchmarks.slow_link [--size-mb 100] [--rate-mbit 10 (0: uncapped)] [--rtt-ms 300]

One `lsync connect` session runs through the testbed (the private sshd behind the delay
proxy, one-way delay RTT/2, both directions capped to the rate), with lsync's own stall
bound (15 s; LSYNC_STALL_SECONDS is removed from the environment). Once it is `ready`, a new
file of incompressible bytes is written; the run waits for lsync's `in-sync as-of=N` line
with N after the write (every change made before N acknowledged), then edits 10 bytes in
the middle of the file in place and waits again. Printed: the time the file took, the TCP
connections the proxy saw (1: no reconnect), whether lsync reported a lost link, the bytes
on the wire for the file and for the edit (proxy counters, SSH framing included), and
whether the remote copy is byte-identical after each step.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.provenance import machine_description
from benchmarks.testbed.proxy import ThreadedProxy
from benchmarks.testbed.sshd import PrivateSshd

IN_SYNC = re.compile(r" in-sync as-of=(\d+)\b")
EDIT = b"0123456789"


class Session:
    """`lsync connect` as a subprocess; its log lines are collected by a thread."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LSYNC_STALL_SECONDS"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lsync.client.cli", *argv], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, done: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"slow_link: no {what} (lsync "
                                 f"{'exited' if self.proc.poll() is not None else 'running'});"
                                 " last lines:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)

    def in_sync_after(self, after_ns: int, timeout: float) -> None:
        def reached() -> bool:
            return any(int(match.group(1)) >= after_ns for line in list(self.lines)
                       if (match := IN_SYNC.search(line)) is not None)
        self.wait(reached, timeout, f"in-sync as-of >= {after_ns}")

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(2)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def digest(path: Path) -> bytes:
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            hasher.update(block)
    return hasher.digest()


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 4 << 20))
            handle.write(block)
            left -= len(block)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="0: uncapped")
    parser.add_argument("--rtt-ms", type=float, default=300.0)
    args = parser.parse_args(argv)
    size = int(args.size_mb * 1_000_000)
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="lsync-slow-link-") as work_name:
        work = Path(work_name)
        local, remote = work / "local", work / "remote"
        local.mkdir()
        (local / "small.c").write_text("int small;\n")
        with PrivateSshd(work / "sshd") as sshd, ThreadedProxy(
                ("127.0.0.1", sshd.port), args.rtt_ms / 2000,
                rate_bps=args.rate_mbit * 1e6 or None) as proxy:
            config = sshd.write_client_config(port=proxy.port)
            session = Session(["connect", "-F", str(config), f"{sshd.alias}:{remote}"], local)
            try:
                session.wait(lambda: session.count(" ready ") > 0, 60, "ready line")
                proxy.reset_counters()
                big = local / "big.img"
                write_random(big, size)
                written_ns = time.time_ns()
                began = time.monotonic()
                session.in_sync_after(written_ns, 3600)
                took = time.monotonic() - began
                file_wire = proxy.counters()
                file_same = digest(big) == digest(remote / big.name)
                cut = session.count("disconnected")

                proxy.reset_counters()
                with open(big, "r+b") as handle:
                    handle.seek(size // 2)
                    handle.write(EDIT)
                edited_ns = time.time_ns()
                edit_began = time.monotonic()
                session.in_sync_after(edited_ns, 600)
                edit_took = time.monotonic() - edit_began
                edit_wire = proxy.counters()
                edit_same = digest(big) == digest(remote / big.name)
            finally:
                status = session.stop()
    goodput = size * 8 / took / 1e6
    rate = f"{args.rate_mbit:g} Mbit/s each way" if args.rate_mbit else "uncapped"
    print(f"Run {started_at}, lsync at {commit()}; link RTT {args.rtt_ms:.0f} ms, {rate} "
          "(delay proxy); stall bound 15 s.")
    print(f"Machine: {machine_description()}")
    print()
    print("| step | time | bytes up | bytes down | TCP connections so far | lost link reported "
          "| remote identical |")
    print("|---|---|---|---|---|---|---|")
    print(f"| new {size / 1e6:g} MB file | {took:.1f} s ({goodput:.1f} Mbit/s of content) | "
          f"{file_wire.bytes_up:,} | {file_wire.bytes_down:,} | "
          f"{file_wire.connections_total} | {cut} times | {'yes' if file_same else 'NO'} |")
    print(f"| 10-byte edit in place | {edit_took:.2f} s | {edit_wire.bytes_up:,} | "
          f"{edit_wire.bytes_down:,} | {edit_wire.connections_total} | "
          f"{session.count('disconnected') - cut} times | {'yes' if edit_same else 'NO'} |")
    print(f"\nlsync exited {status}.")
    ok = (file_same and edit_same and cut == 0 and file_wire.connections_total == 1
          and edit_wire.bytes_total < 20 * 1024)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
