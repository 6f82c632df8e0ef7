"""The ``constellation`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from constellation import __version__
from constellation.demo import run_demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="constellation", description=__doc__)
    parser.add_argument("--version", action="version", version=f"constellation {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="wallets, genesis funding and payments on an in-process ledger"
    )
    demo.add_argument("--workers", type=int, default=4, help="simulated partition workers")
    demo.add_argument("--payments", type=int, default=200, help="random payments to make")
    demo.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(args.workers, args.payments, args.seed, sys.stdout)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
