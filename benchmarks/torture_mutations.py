"""Does the torture test catch each issue-15 defect again? Revert one fix at a time and see.

    python -m benchmarks.torture_mutations [--seed N] [NAME ...]   (default: every mutation)

For each mutation (`MUTATIONS`: the revert of one fix of issue 15, at its cause, as it was
before the fix) a scratch copy of the committed tree (`git worktree add --detach`, in a
temporary directory) gets the edit, and the torture test's short mode
(`python -m benchmarks.torture --short`) runs on it: the scratch tree's lsync, found first
on the path (a `lsync` package whose `__path__` is the scratch tree, on PYTHONPATH, which
the `lsync connect` subprocesses inherit; their agent is bundled from it). A mutation is
caught when the run exits 1 (an invariant violated). `none` is the control: no edit, the
run must pass. Prints one line per mutation as it ends, then a table.

Each edit must match exactly once, so a mutation that no longer applies (the code moved on)
says so instead of running unmutated. Needs what the torture test needs (root).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
Edit = tuple[str, str, str]  # (file in the tree, text, its replacement)


@dataclass(frozen=True)
class Mutation:
    what: str
    edits: tuple[Edit, ...]


MUTATIONS: dict[str, Mutation] = {
    "none": Mutation("nothing (the control run)", ()),
    "1": Mutation("defect 1: the root is read ahead; one path's failure fails its group and "
                  "the session", (
        ("client/remote/engine.py", "            if not path or path in futures:",
         "            if path in futures:"),
        ("client/remote/engine.py",
         "            if relpath_problem(path):\n                continue\n", ""),
        ("client/remote/engine.py",
         "        except Exception as exc:\n            # A bug met while "
         "syncing one path", "        except ZeroDivisionError as exc:\n            # A bug met "
         "while syncing one path"),
        ("client/remote/sender.py", "    with SiblingReader(owner.root, owner.cache) as reader:\n"
         "        for path, ahead in group:\n            try:\n                left = min("
         "PREFETCH_MAX, owner.left())\n                if left > 0 and (ahead.believed is None"
         "\n                                 or reader.digest_known(path) != ahead.believed):"
         "\n                    ahead.result = _prepare(reader, path, packer, left, seen)\n"
         "                    if ahead.result is not None:\n                        owner.count("
         "ahead, _held_bytes(ahead.result))\n            except Exception:\n                "
         "ahead.result = None\n            ahead.done = True\n    done.set_result(None)",
         "    try:\n        with SiblingReader(owner.root, owner.cache) as reader:\n"
         "            for path, ahead in group:\n                left = min(PREFETCH_MAX, "
         "owner.left())\n                if left > 0 and (ahead.believed is None\n"
         "                                 or reader.digest_known(path) != ahead.believed):"
         "\n                    ahead.result = _prepare(reader, path, packer, left, seen)\n"
         "                    if ahead.result is not None:\n                        owner.count("
         "ahead, _held_bytes(ahead.result))\n                ahead.done = True\n    except "
         "BaseException as exc:\n        done.set_exception(exc)\n        return\n    done."
         "set_result(None)"),
    )),
    "2": Mutation("defect 2: `run` runs where the connection is (none: locally); the dead "
                  "engine is kept through the backoff", (
        ("client/buildloop/loop.py",
         "            await self.flush(left, send_line)\n            if "
         "self.session.target_is_local:\n                return None\n            conn = self."
         "session.ssh_connection\n            if conn is not None and self.session.link_up and"
         " self.session.engine_ready:\n                return conn",
         "            await self.flush(left, send_line)\n            return self.session.ssh_"
         "connection"),
        ("client/session.py", "                worked = self._forget_connection()\n",
         "                worked = self.engine is not None\n"),
        ("client/session.py", "        finally:\n            self._link_down()\n",
         "        finally:\n"),
    )),
    "3": Mutation("defect 3: liveness by replies only, pings only when nothing is awaited", (
        ("client/transport/liveness.py",
         "        if self.quiet >= self.ping_every and self._since_ping",
         "        if not awaiting and self.quiet >= self.ping_every and self._since_ping"),
        ("client/transport/liveness.py",
         "        for (written, buffered), (was_written, was_buffered) in"
         " zip(", "        return False\n        for (written, buffered), (was_written, "
         "was_buffered) in zip("),
    )),
    "4": Mutation("defect 4: a failed path gets a new tick when retried; a backoff step per "
                  "failed operation", (
        ("client/remote/pathqueue.py",
         "        if record.state is State.FAILED:\n            record."
         "since = when\n", "        if record.state is State.FAILED:\n            record.since "
         "= when\n            self._tick += 1\n            record.tick = self._tick\n          "
         "  heapq.heappush(self._ticks, (self._tick, record.path))\n"),
        ("client/remote/pathqueue.py",
         "        if record.state is State.FAILED:\n            # Another"
         " operation of the same attempt failed", "        if False:\n            # Another "
         "operation of the same attempt failed"),
    )),
    "5": Mutation("defect 5: a refused delete's entry is not put back, and refused paths are "
                  "not listed again", (
        ("client/remote/remoteside.py", "        target, entry = flight.target, flight.dropped\n",
         "        target, entry = flight.target, None\n"),
        ("client/remote/remoteside.py",
         "            self.unsure.setdefault(flight.owner, set()).add("
         "flight.target)\n", ""),
    )),
    "6": Mutation("defect 6: replies failed by a broken link take their operation out of the "
                  "window (nothing carried over)", (
        ("client/remote/remoteside.py",
         "        if future.cancelled() or future.exception() is not None:"
         "\n", "        if future.cancelled() or future.exception() is not None:\n"
         "            self.window.answer(seq)\n"),
    )),
    "10": Mutation("defect 10: no intents journaled, no lock on the root (an old agent lives "
                   "on beside the new one)", (
        ("agent/records.py", "        if not self.cache_path or not intents:\n            return"
         "\n        lines = [journal_line([\"i\"", "        if True:\n            return\n"
         "        lines = [journal_line([\"i\""),
        ("agent/rootlock.py", "    def acquire(self) -> bool:\n        if self.path is None:\n "
         "           return False\n", "    def acquire(self) -> bool:\n        if True:\n"
         "            return True\n"),
    )),
}


class NoLongerApplies(Exception):
    pass


def apply(tree: Path, mutation: Mutation) -> None:
    for rel, old, new in mutation.edits:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise NoLongerApplies(f"{rel}: the text to revert is found {text.count(old)} "
                                  f"times: {old[:60]!r}")
        path.write_text(text.replace(old, new))


@dataclass
class Outcome:
    name: str
    status: int | None  # the torture's exit status; None: the mutation did not apply
    seconds: float
    violations: list[str]
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.status is None:
            return f"not applied ({self.note})"
        caught = self.status == 1
        if self.name == "none":
            return "passes ✓" if self.status == 0 else f"exit {self.status} ✗ (the control)"
        return "caught ✓" if caught else f"exit {self.status}: not caught ✗"


def run_one(name: str, seed: int) -> Outcome:
    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"lsync-mutation-{name}-"))
    tree = scratch / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), "HEAD"],
                   cwd=REPO, check=True)
    try:
        try:
            apply(tree, MUTATIONS[name])
        except NoLongerApplies as exc:
            return Outcome(name, None, 0.0, [], str(exc))
        shim = scratch / "shim" / "lsync"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text(f"__path__ = [{str(tree)!r}]\n")
        env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{tree}"}
        done = subprocess.run([sys.executable, "-m", "benchmarks.torture", "--short",
                               "--seed", str(seed)], cwd=tree, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        (scratch / "torture.log").write_text(done.stdout)
        violations = [line.strip() for line in done.stdout.splitlines()
                      if line.lstrip().startswith("VIOLATION")]
        return Outcome(name, done.returncode, time.monotonic() - began, violations,
                       f"log: {scratch / 'torture.log'}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                       check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torture_mutations",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"of {', '.join(MUTATIONS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutations {unknown}; known: {', '.join(MUTATIONS)}")
    names = args.names or list(MUTATIONS)
    outcomes = []
    for name in names:
        outcome = run_one(name, args.seed)
        outcomes.append(outcome)
        first = outcome.violations[0][:160] if outcome.violations else ""
        print(f"{name}: {outcome.verdict} in {outcome.seconds:.0f} s; "
              f"{len(outcome.violations)} violations {first}", flush=True)
    print(f"\n| reverted | torture short mode, seed {args.seed} | violations (first) |")
    print("|---|---|---|")
    for outcome in outcomes:
        first = outcome.violations[0][:120].replace("|", "/") if outcome.violations else ""
        print(f"| {outcome.name}: {MUTATIONS[outcome.name].what} | {outcome.verdict} | "
              f"{len(outcome.violations)}: {first} |")
    wrong = [o for o in outcomes if (o.status != 0 if o.name == "none" else o.status != 1)]
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
