"""Moving a quarter of an operator's copies to another machine, and back, under payments.

    python bench/rebalance.py --json bench/results/rebalance.json

A local guild of three operators of four workers each, as real processes
(``constellation devnet``); op0 runs three machines. Clients pay back to back between
wallets of op0, through its gateway, for the whole run; meanwhile op0 goes to four
machines (the new one takes a quarter of its copy slots) and back to three (they move
back), ``--repeats`` times (``devnet machines``: each copy's folder moves whole, a
leader hands its leadership to its twin first).

Figures (medians over every move):
  move_s          a move from its first placement change to its last arrival (a machine
                  added starts first: on a cluster that is its own node's work, here it
                  takes the same two cores, and it is left out of the span compared)
  change_s        the whole change, machines started or stopped included
  moved_share     the share of op0's copy slots each move moved
  tps_share       payments committed a second during a move / in the seconds before it
                  (target >= 0.7)
  p99_ratio       p99 confirm latency of the payments sent during a move / before it
                  (target <= 3)
  add_* remove_*  the same, of the moves to four machines (followers move: a new
                  machine takes copies 1 first) and back (leaders move too, and hand
                  their leadership to the twin, and it back once they have arrived)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, print_table, write_json
from bench.guild import Load
from services.devnet import Devnet, guild
from services.workload import percentile

WORKERS = 4
FIRST = 3  # op0's machines; one more takes a quarter of its slots
BEFORE_S = 5.0  # the span before a move it is compared with
SETTLE_S = 3.0  # after a move, before the next span begins
MIN_SPAN_S = 2.0  # a move's span, at least (a quick move counts its aftermath)


def span(done: list[tuple[float, float]], start: float, end: float) -> tuple[float, float]:
    """(payments committed a second, p99 latency in ms) of the payments sent in
    [start, end)."""
    lat = sorted(latency for at, latency in done if start <= at - latency < end)
    return len(lat) / (end - start), percentile(lat, 0.99) * 1000 if lat else float("inf")


async def run(directory: Path, net: Devnet, clients: int, repeats: int) -> dict[str, object]:
    done: list[tuple[float, float]] = []  # (answered at, latency) of committed payments
    moves: list[dict[str, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        load = Load(net, session)
        await load.fund(40)
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                sent, before = time.perf_counter(), load.committed
                await load.pay(sent)
                if load.committed > before:
                    now = time.perf_counter()
                    done.append((now, now - sent))

        paying = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(BEFORE_S + 2)  # warm
        for machines in [FIRST + 1, FIRST] * repeats:
            moved = await asyncio.to_thread(guild.set_machines, directory, net.operator, machines)
            start = moved.moving_since  # a new machine's start is its own node's work
            end = max(start + moved.moving_s, start + MIN_SPAN_S)
            await asyncio.sleep(max(0.0, end - time.perf_counter()) + 0.5)
            tps0, p99_0 = span(done, start - BEFORE_S, start)
            tps1, p99_1 = span(done, start, end)
            moves.append(
                {
                    "machines": machines,
                    "move_s": moved.moving_s,
                    "change_s": moved.seconds,
                    "moved_share": moved.moved / (2 * WORKERS),
                    "tps_before": tps0,
                    "tps_during": tps1,
                    "p99_before_ms": p99_0,
                    "p99_during_ms": p99_1,
                    "tps_share": tps1 / tps0,
                    "p99_ratio": p99_1 / p99_0,
                }
            )
            print(
                f"  {FIRST + FIRST + 1 - machines} -> {machines} machines: "
                f"{moved.moved} slots in {moved.moving_s:.2f} s ({moved.seconds:.2f} s with "
                f"machines started or stopped); tx/s {tps0:.0f} -> {tps1:.0f}, "
                f"p99 {p99_0:.0f} -> {p99_1:.0f} ms",
                flush=True,
            )
            await asyncio.sleep(SETTLE_S + BEFORE_S)
        stop.set()
        await asyncio.gather(*paying)
    return {
        "move_s": median([m["move_s"] for m in moves]),
        "change_s": median([m["change_s"] for m in moves]),
        "moved_share": median([m["moved_share"] for m in moves]),
        "tps_share": median([m["tps_share"] for m in moves]),
        "p99_ratio": median([m["p99_ratio"] for m in moves]),
        # adding moves copies 1 (followers); removing moves what is there, leaders too
        "add_tps_share": median([m["tps_share"] for m in moves if m["machines"] > FIRST]),
        "remove_tps_share": median([m["tps_share"] for m in moves if m["machines"] == FIRST]),
        "add_p99_ratio": median([m["p99_ratio"] for m in moves if m["machines"] > FIRST]),
        "remove_p99_ratio": median([m["p99_ratio"] for m in moves if m["machines"] == FIRST]),
        "tps_before": median([m["tps_before"] for m in moves]),
        "p99_before_ms": median([m["p99_before_ms"] for m in moves]),
        "failed_payments": sum(load.failed.values()),
        "moves": moves,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="moves there and back")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rebalance-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user where we are root
        directory = Path(tmp) / "guild"
        nets = guild.up(directory, 3, WORKERS, "bench", machines=FIRST)
        try:
            figures = asyncio.run(run(directory, nets[0], args.clients, args.repeats))
        finally:
            guild.down(directory)
    rows = [
        ("move_s", f"{figures['move_s']:.2f}", "median, each move"),
        ("moved_share", f"{figures['moved_share']:.2f}", "of op0's copy slots, each move"),
        ("tx/s before", f"{figures['tps_before']:.0f}", "closed loop"),
        ("tps_share", f"{figures['tps_share']:.2f}", "during a move / before; target >= 0.7"),
        ("p99 before ms", f"{figures['p99_before_ms']:.0f}", ""),
        ("p99_ratio", f"{figures['p99_ratio']:.2f}", "during a move / before; target <= 3"),
        (
            "adding / removing",
            f"{figures['add_tps_share']:.2f} / {figures['remove_tps_share']:.2f}",
            f"tps_share; p99_ratio {figures['add_p99_ratio']:.2f} / "
            f"{figures['remove_p99_ratio']:.2f} (a leader moved hands over twice)",
        ),
        ("failed payments", f"{figures['failed_payments']}", "whole run"),
    ]
    print_table("moving a quarter of an operator's copies under payments", rows)
    write_json(str(args.json) if args.json else None, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
