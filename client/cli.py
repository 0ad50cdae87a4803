"""The `lsync` command line.

    lsync connect [user@]host:tree   keep `tree` on `host` in sync with this directory
    lsync connect /some/dir          the same against a local directory (no SSH)

Errors are printed as one line and map to exit statuses (see `lsync.client.errors`);
Ctrl-C drains in-flight writes and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from lsync.client.errors import LsyncError, internal_error
from lsync.client.session import Options, Session, default_local_root
from lsync.client.ssh import Target
from lsync.client.status import NORMAL, QUIET, VERBOSE, make_status, terminal_safe
from lsync.client.watcher import DEFAULT_DEBOUNCE_MS, DEFAULT_STEP_MS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsync", description="Low-latency continuous one-way sync over one SSH connection.")
    commands = parser.add_subparsers(dest="command", required=True)
    connect = commands.add_parser(
        "connect", help="sync this tree to [user@]host:tree (or a local directory) until stopped")
    connect.add_argument("target", help="[user@]host:tree, or a local directory path")
    connect.add_argument("--local", metavar="DIR", help="local tree (default: current directory)")
    connect.add_argument("-F", dest="ssh_config", metavar="FILE", action="append",
                         help="SSH client config file (default ~/.ssh/config)")
    connect.add_argument("--delete", action="store_true",
                         help="also delete remote files that do not exist locally")
    connect.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                         help="ignore paths matching PATTERN (gitignore syntax); repeatable")
    connect.add_argument("--include-vcs", action="store_true",
                         help="sync the .git directory too (excluded by default)")
    connect.add_argument("--accept-new-host-key", action="store_true",
                         help="trust and record an unknown host key (never a changed one)")
    connect.add_argument("--step-ms", type=int, default=DEFAULT_STEP_MS,
                         help=f"watcher quiet period before a batch (default {DEFAULT_STEP_MS})")
    connect.add_argument("--debounce-ms", type=int, default=DEFAULT_DEBOUNCE_MS,
                         help=f"longest a batch collects (default {DEFAULT_DEBOUNCE_MS})")
    connect.add_argument("--no-reconnect", action="store_true",
                         help="exit when the connection breaks instead of reconnecting")
    level = connect.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    level.add_argument("-v", "--verbose", action="store_true", help="print every write")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    verbosity = QUIET if args.quiet else VERBOSE if args.verbose else NORMAL
    status = make_status(verbosity)
    options = Options(
        target=Target.parse(args.target),
        local_root=default_local_root(args.local),
        ssh_config=args.ssh_config,
        delete=args.delete,
        excludes=args.exclude,
        include_vcs=args.include_vcs,
        accept_new_host_key=args.accept_new_host_key,
        step_ms=args.step_ms,
        debounce_ms=args.debounce_ms,
        reconnect=not args.no_reconnect,
    )
    try:
        try:
            asyncio.run(Session(options, status).run())
        except (LsyncError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the last boundary: a bug, in one line, never a traceback
            raise internal_error("syncing", exc) from None
    except LsyncError as exc:
        status.close()
        print(f"lsync: {terminal_safe(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        status.close()
        sys.exit(130)
    status.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
