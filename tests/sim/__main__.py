"""Run the guild simulator: ``python -m tests.sim --seeds N`` (a long hunt) or
``--seed S`` (replay one seed, printing its fault log)."""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.checkpoints import CheckpointSim
from tests.sim.guild import Guild, Violation, replay_command
from tests.sim.ledger import LedgerGuild


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seed", type=int, help="replay this seed and print its faults")
    parser.add_argument("--seeds", type=int, default=100, help="run seeds 0..N-1")
    parser.add_argument("--first", type=int, default=0, help="the first seed of --seeds")
    parser.add_argument("--operators", type=int, default=3)
    parser.add_argument(
        "--ledger", action="store_true", help="the real ledger (2PC across two shards)"
    )
    parser.add_argument(
        "--change",
        choices=["join", "leave", "join-leave"],
        default="",
        help="a member joins, leaves, or joins then leaves",
    )
    parser.add_argument(
        "--checkpoints", action="store_true", help="the checkpoints through a key's handover"
    )
    parser.add_argument(
        "--splits", action="store_true", help="checkpoints: sessions fail after one share"
    )
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    failed = []
    started = time.monotonic()
    for seed in seeds:
        guild: Guild | LedgerGuild | CheckpointSim
        if args.checkpoints:
            guild = CheckpointSim(seed, splits=args.splits)
            splits = " --splits" if args.splits else ""
            replay = f".venv/bin/python -m tests.sim --checkpoints{splits} --seed {seed}"
        else:
            kind = LedgerGuild if args.ledger else Guild
            guild = kind(seed, operators=args.operators, change=args.change)
            replay = replay_command(seed, args.operators, args.ledger, args.change)
        try:
            guild.run()
        except Violation as exc:
            failed.append(seed)
            print(f"seed {seed}: {exc}\n  replay: {replay}")
            if args.seed is not None:
                print("\n".join(guild.log))
    took = time.monotonic() - started
    print(
        f"{len(seeds)} seeds, {len(failed)} failed, {took:.1f} s ({took / len(seeds):.2f} s/seed)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
