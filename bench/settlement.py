"""Payments between operators against payments inside one, in a 3-operator local guild
settling every second over the simulated Lightning network.

    python bench/settlement.py --json bench/results/settlement.json

The guild runs as real processes (``constellation devnet``, 3 operators, 2 workers,
each gateway settling with the other two). The load, from this process: wallets at
every operator paying wallets at another operator (cross) or at their own (same),
through the payer's gateway.

Figures:
  same_tps / cross_tps            saturated, closed loop: committed payments a second
                                  (medians of --repeats alternating runs)
  cross_tps_ratio                 cross / same, the same runs (target >= 0.8)
  same_cpu_us_per_tx              CPU of every process of the guild per payment, from a
  cross_cpu_us_per_tx             run's start until what it paid between operators is
                                  released (settlement's work counts)
  cross_cpu_ratio                 cross / same
  release_p50_ms / release_p99_ms payment committed to spendable at the receiver, at an
                                  open-loop load of half cross_tps (target p99 <= 2,500)
  ln_payments_per_1000            Lightning payments per 1,000 payments between operators
  ln_payments_per_pair_batch      Lightning payments a pair of operators makes per batch:
                                  twice the most payments one direction made per batch
                                  (target <= 2: one each way, whatever the rate)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, print_table, write_json
from bench.guild import cpu_by_kind
from services.crossload import CrossWorkload, settled_books_agree
from services.devnet import Devnet, guild
from services.workload import percentile


async def settlement_counts(
    nets: list[Devnet], session: aiohttp.ClientSession
) -> dict[str, dict[str, float]]:
    """Per direction (payer>payee): Lightning payments started and batches closed."""
    out: dict[str, dict[str, float]] = {}
    for net in nets:
        async with session.get(f"{net.gateway_url}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                for metric, kind in (
                    ("gateway_settle_payments_total{", "payments"),
                    ("gateway_settle_batches_total{", "batches"),
                ):
                    if line.startswith(metric):
                        peer = line.split('peer="', 1)[1].split('"', 1)[0]
                        d = out.setdefault(f"{net.operator}>{peer}", {})
                        d[kind] = d.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def measure(
    nets: list[Devnet], seconds: float, clients: int, repeats: int
) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 8)) as s:
        work = CrossWorkload(nets, s, 32, io.StringIO())
        await work.setup(16)
        await work.closed_loop(2.0, clients, cross=True)  # warm up
        await work.wait_released()
        runs: dict[str, list[tuple[float, float]]] = {"same": [], "cross": []}
        crossed = 0
        counts0 = await settlement_counts(nets, s)
        for _ in range(repeats):
            for kind in ("same", "cross"):
                cpu0, done0 = sum(cpu_by_kind(nets).values()), work.codes["committed"]
                n0 = len(work.crossings)
                tps = await work.closed_loop(seconds, clients, cross=kind == "cross")
                if kind == "cross":
                    crossed += len(work.crossings) - n0
                    await work.wait_released()
                else:
                    await asyncio.sleep(1.0)  # the index and pushes catch up, as settlement
                used = sum(cpu_by_kind(nets).values()) - cpu0
                runs[kind].append((tps, used / max(1, work.codes["committed"] - done0) * 1e6))
        counts = await settlement_counts(nets, s)
        moved = {
            d: {k: v - counts0.get(d, {}).get(k, 0.0) for k, v in c.items()}
            for d, c in counts.items()
        }
        ln = sum(c.get("payments", 0.0) for c in moved.values())
        # each direction pays once per batch (a retry after a lost reply counts again)
        per_batch = max(
            c.get("payments", 0.0) / max(1.0, c.get("batches", 0.0)) for c in moved.values()
        )
        rate = median([t for t, _ in runs["cross"]]) / 2
        n0 = len(work.crossings)
        await work.open_loop(seconds, rate, cross=True)
        await work.wait_released()
        lat = sorted(
            (c.released_at - c.committed_at) * 1000
            for c in work.crossings[n0:]
            if c.released_at is not None
        )
        out = io.StringIO()
        agree = await settled_books_agree(nets, s, out)
        print(out.getvalue(), end="")
        same_tps = median([t for t, _ in runs["same"]])
        cross_tps = median([t for t, _ in runs["cross"]])
        same_cpu = median([c for _, c in runs["same"]])
        cross_cpu = median([c for _, c in runs["cross"]])
        return {
            "same_tps": same_tps,
            "cross_tps": cross_tps,
            "cross_tps_ratio": cross_tps / same_tps,
            "same_cpu_us_per_tx": same_cpu,
            "cross_cpu_us_per_tx": cross_cpu,
            "cross_cpu_ratio": cross_cpu / same_cpu,
            "open_loop_tps": rate,
            "release_p50_ms": percentile(lat, 0.5),
            "release_p99_ms": percentile(lat, 0.99),
            "released": len(lat),
            "ln_payments_per_1000": ln * 1000 / max(1, crossed),
            "ln_payments_per_pair_batch": 2 * per_batch,
            "batches": sum(c.get("batches", 0.0) for c in moved.values()),
            "books_agree": agree,
            "failed_payments": sum(n for c, n in work.codes.items() if c != "committed"),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load phase")
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs (medians)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-settle-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user where we are root
        where = Path(tmp) / "guild"
        nets = guild.up(where, 3, 2, "bench")
        started = time.monotonic()
        try:
            f = asyncio.run(measure(nets, args.seconds, args.clients, args.repeats))
        finally:
            guild.down(where)
    rows = [
        ("same_tps", f"{f['same_tps']:,.0f}", "inside one operator, saturated"),
        ("cross_tps", f"{f['cross_tps']:,.0f}", "between operators, saturated"),
        ("cross_tps_ratio", f"{f['cross_tps_ratio']:.2f}", "target >= 0.8"),
        ("same_cpu_us_per_tx", f"{f['same_cpu_us_per_tx']:,.0f}", "all processes of the guild"),
        ("cross_cpu_us_per_tx", f"{f['cross_cpu_us_per_tx']:,.0f}", "settlement included"),
        ("cross_cpu_ratio", f"{f['cross_cpu_ratio']:.2f}", "same runs"),
        (
            "release p50 / p99 ms",
            f"{f['release_p50_ms']:.0f} / {f['release_p99_ms']:.0f}",
            f"open loop {f['open_loop_tps']:,.0f} tx/s; target p99 <= 2,500",
        ),
        ("ln_payments_per_1000", f"{f['ln_payments_per_1000']:.1f}", "netting"),
        (
            "ln_payments_per_pair_batch",
            f"{f['ln_payments_per_pair_batch']:.2f}",
            f"one each way, {f['batches']:.0f} batches; target <= 2",
        ),
        ("books agree", str(f["books_agree"]), "paid = released, reserve drift 0"),
    ]
    print_table(
        f"settlement between operators, this machine ({time.monotonic() - started:.0f} s)", rows
    )
    if args.json:
        write_json(args.json, f)
    return 0 if f["books_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
