"""One operator's ledger under open-loop load: throughput, confirm latency, CPU per tx.

    python bench/engine.py --json bench/results/engine.json

For 1 and then 2 partition workers, a fresh devnet (nats-server, Redis, PostgreSQL, the
workers, the gateway) is started. This process is the load generator: it funds random
wallets, signs one 1-in-2-out payment per funded coin before measuring, then submits
them open loop (on a fixed schedule, whatever the answers) as batches every
``--tick-ms`` through the gateway's ``POST /v1/txs``.

Each configuration runs twice: at ``--offered`` tx/s, far above what 2 cores commit,
to find the maximum committed rate; then at half that rate for latency. Then the half
rate runs once more for each package deadline of ``--deadlines`` (workers' and
gateway's), to show what closing packages later costs and saves. Last, 2 workers run
with each count of ``--verifiers`` processes checking their signatures, saturated and
at the same half rate, to show whether that pays on this machine.

Figures:
  tps_1w, tps_2w     committed tx/s at saturation, 1 and 2 workers
  p50_ms, p99_ms     confirm latency (submission to receipt) at 50% of tps_2w
  cpu_us_per_tx      CPU (user+system) of the workers and the gateway per committed
                     transaction, at 50% of tps_2w
  package_deadlines  p50_ms, p99_ms and cpu_us_per_tx at 50% of tps_2w per deadline
  verifiers          tps saturated, then p50_ms, p99_ms and cpu_us_per_tx (the verifier
                     processes included) at 50% of tps_2w, per WORKER_VERIFIERS
Targets on a 2-core machine: tps_2w >= 5000, p99_ms <= 50, cpu_us_per_tx <= 300.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import msgspec

from bench.common import median, print_table, write_json
from constellation.keys import SigningKey, schnorr_sign
from constellation.sighash import sighash
from constellation.tx import Transaction, TxInput, TxOutput
from services import devnet
from services.api_client import Gateway

COIN_MSAT = 1_000_000
FEE_MSAT = 100
ISSUE_CHUNK = 250


def with_children(pids: list[int]) -> list[int]:
    """``pids`` and their child processes (a worker's verifiers)."""
    return [*pids, *(c for pid in pids for c in devnet.child_pids(pid))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def fund(
    gw: Gateway, net: devnet.Devnet, keys: list[SigningKey], coins: int
) -> list[tuple[bytes, SigningKey]]:
    rng = random.Random(1)
    funded: list[tuple[bytes, SigningKey]] = []

    async def chunk(n: int) -> None:
        owners = [rng.choice(keys) for _ in range(n)]
        issuance = net.issuance([TxOutput(COIN_MSAT, k.pubkey) for k in owners])
        receipt = await gw.issue(issuance)
        assert receipt["status"] == "committed"
        funded.extend(zip(issuance.output_ids, owners, strict=True))

    left = coins
    tasks = []
    while left > 0:
        tasks.append(chunk(min(ISSUE_CHUNK, left)))
        left -= ISSUE_CHUNK
    for i in range(0, len(tasks), 8):
        await asyncio.gather(*tasks[i : i + 8])
    return funded


def payments(funded: list[tuple[bytes, SigningKey]], keys: list[SigningKey]) -> list[bytes]:
    """One signed 1-in-2-out payment per coin, to a random wallet, change to another."""
    rng = random.Random(2)
    out = []
    for cid, key in funded:
        amount = rng.randrange(1, COIN_MSAT - FEE_MSAT)
        to, change = rng.choice(keys), rng.choice(keys)
        tx = Transaction(
            [TxInput(cid, COIN_MSAT)],
            [TxOutput(amount, to.pubkey), TxOutput(COIN_MSAT - FEE_MSAT - amount, change.pubkey)],
            FEE_MSAT,
        )
        sig = schnorr_sign(key.secret, sighash(tx.txid, 0, COIN_MSAT, key.pubkey))
        out.append(tx.with_witnesses([sig]).encode())
    return out


async def open_loop(
    gw_url: str, txs: list[bytes], rate: float, tick_ms: float
) -> tuple[int, float, list[float], dict[str, int]]:
    """Submit ``txs`` at ``rate``/s in batches every ``tick_ms``; (committed, seconds,
    latencies, refusals by code)."""
    per_tick = max(1, round(rate * tick_ms / 1000))
    latencies: list[float] = []
    refused: dict[str, int] = {}
    committed = 0
    pending: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def send(batch: list[bytes]) -> None:
            nonlocal committed
            body = b"".join(struct.pack(">I", len(t)) + t for t in batch)
            sent = time.perf_counter()
            async with session.post(
                gw_url + "/v1/txs", data=body, headers={"Content-Type": "application/octet-stream"}
            ) as resp:
                doc = msgspec.json.decode(await resp.read())
            took = time.perf_counter() - sent
            if resp.status != 200:
                code = doc["error"]["code"]
                refused[code] = refused.get(code, 0) + len(batch)
                return
            for r in doc["results"]:
                if "error" in r:
                    code = r["error"]["code"]
                    refused[code] = refused.get(code, 0) + 1
                else:
                    committed += 1
                    latencies.append(took)

        started = time.perf_counter()
        for i, at in enumerate(range(0, len(txs), per_tick)):
            due = started + i * tick_ms / 1000
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(txs[at : at + per_tick]))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
    return committed, elapsed, latencies, refused


class Setup:
    def __init__(self, workers: int, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cst-bench-"))
        self.dir.chmod(0o755)  # PostgreSQL runs as its own user where this runs as root
        self.workers = workers
        self.env = env or {}
        self.net: devnet.Devnet | None = None

    def __enter__(self) -> devnet.Devnet:
        saved = dict(os.environ)
        os.environ.update(self.env)  # the devnet's processes inherit this environment
        try:
            self.net = devnet.up(self.dir / "net", 0, "bench", self.workers)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return self.net

    def __exit__(self, failed: object, *_: object) -> None:
        devnet.down(self.dir / "net")
        if failed is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"the devnet's logs are kept in {self.dir}", file=sys.stderr)


async def measure(net: devnet.Devnet, count: int, rate: float, tick_ms: float) -> dict[str, Any]:
    keys = [SigningKey(os.urandom(32)) for _ in range(200)]
    async with aiohttp.ClientSession() as session:
        funded = await fund(Gateway(net.gateway_url, session), net, keys, count)
    txs = payments(funded, keys)
    pids = with_children([net.gateway_pid, *(w.pid for w in net.workers)])
    await asyncio.sleep(1)  # the indexer catches up with the funding
    cpu0, idx0 = cpu_seconds(pids), cpu_seconds([net.indexer_pid])
    committed, elapsed, lat, refused = await open_loop(net.gateway_url, txs, rate, tick_ms)
    cpu = cpu_seconds(pids) - cpu0
    idx = cpu_seconds([net.indexer_pid]) - idx0
    return {
        "committed": committed,
        "tps": committed / elapsed,
        "p50_ms": percentile(lat, 0.5) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "cpu_us_per_tx": cpu / max(1, committed) * 1e6,
        "indexer_cpu_us_per_tx": idx / max(1, committed) * 1e6,
        "refused": refused,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each measured run")
    ap.add_argument("--offered", type=float, default=12_000, help="tx/s offered to saturate")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="batch interval of the generator")
    ap.add_argument(
        "--deadlines",
        default="0,250,500,1000",
        help="package deadlines (us) to compare at 50%% of tps_2w; empty for none",
    )
    ap.add_argument(
        "--verifiers",
        default="1",
        help="WORKER_VERIFIERS counts to compare with checking inline; empty for none",
    )
    ap.add_argument("--runs", type=int, default=1, help="repeat and take medians")
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for workers in (1, 2):
        for _ in range(args.runs):
            with Setup(workers) as net:
                sat = asyncio.run(
                    measure(net, int(args.offered * args.seconds), args.offered, args.tick_ms)
                )
                runs.setdefault(f"sat_{workers}w", []).append(sat)
                if workers == 2:
                    half = sat["tps"] / 2
                    lat = asyncio.run(measure(net, int(half * args.seconds), half, args.tick_ms))
                    runs.setdefault("half_2w", []).append(lat)
    half = median([r["tps"] for r in runs["sat_2w"]]) / 2
    sweep = []
    for deadline in [int(d) for d in args.deadlines.split(",") if d]:
        env = {
            "WORKER_PACKAGE_DEADLINE_US": str(deadline),
            "GATEWAY_PACKAGE_DEADLINE_US": str(deadline),
        }
        with Setup(2, env) as net:
            lat = asyncio.run(measure(net, int(half * args.seconds), half, args.tick_ms))
        sweep.append({"deadline_us": deadline, **lat})
    verifying = []
    for count in [int(v) for v in args.verifiers.split(",") if v]:
        with Setup(2, {"WORKER_VERIFIERS": str(count)}) as net:
            sat = asyncio.run(
                measure(net, int(args.offered * args.seconds), args.offered, args.tick_ms)
            )
            lat = asyncio.run(measure(net, int(half * args.seconds), half, args.tick_ms))
        verifying.append({"verifiers": count, "tps": sat["tps"], **lat})
    figures["tps_1w"] = median([r["tps"] for r in runs["sat_1w"]])
    figures["tps_2w"] = median([r["tps"] for r in runs["sat_2w"]])
    figures["p50_ms"] = median([r["p50_ms"] for r in runs["half_2w"]])
    figures["p99_ms"] = median([r["p99_ms"] for r in runs["half_2w"]])
    figures["cpu_us_per_tx"] = median([r["cpu_us_per_tx"] for r in runs["half_2w"]])
    figures["cpu_us_per_tx_saturated_2w"] = median([r["cpu_us_per_tx"] for r in runs["sat_2w"]])
    figures["indexer_cpu_us_per_tx"] = median([r["indexer_cpu_us_per_tx"] for r in runs["half_2w"]])
    figures["package_deadlines"] = sweep
    figures["verifiers"] = verifying
    figures["tick_ms"] = args.tick_ms
    figures["runs"] = runs
    print_table(
        "engine: gateway + partition workers over NATS, open loop",
        [
            ("tps_1w", f"{figures['tps_1w']:,.0f}", "committed tx/s, 1 worker, saturated"),
            ("tps_2w", f"{figures['tps_2w']:,.0f}", "committed tx/s, 2 workers (target >= 5,000)"),
            ("p50_ms", f"{figures['p50_ms']:.1f}", "confirm latency at 50% of tps_2w"),
            ("p99_ms", f"{figures['p99_ms']:.1f}", "(target <= 50)"),
            (
                "cpu_us_per_tx",
                f"{figures['cpu_us_per_tx']:.0f}",
                "workers + gateway (target <= 300)",
            ),
            (
                "cpu_us_per_tx_sat",
                f"{figures['cpu_us_per_tx_saturated_2w']:.0f}",
                "the same, saturated",
            ),
        ],
    )
    if sweep:
        print_table(
            "package deadline (workers and gateway) at 50% of tps_2w",
            [
                (
                    f"{r['deadline_us']} us",
                    f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
                    f"{r['cpu_us_per_tx']:.0f} us cpu/tx",
                )
                for r in sweep
            ],
        )
    if verifying:
        print_table(
            "signature checks in verifier processes, 2 workers (0: inline, the runs above)",
            [
                (
                    f"{r['verifiers']} per worker",
                    f"{r['tps']:,.0f} tx/s saturated; at 50%: p50 {r['p50_ms']:.1f} ms,"
                    f" p99 {r['p99_ms']:.1f} ms",
                    f"{r['cpu_us_per_tx']:.0f} us cpu/tx",
                )
                for r in verifying
            ],
        )
    for name, rs in runs.items():
        for r in rs:
            if r["refused"]:
                print(f"  {name}: refused {r['refused']}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
