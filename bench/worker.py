"""One partition worker in this process: CPU per payment of the engine and its shell.

    python bench/worker.py --json bench/results/worker.json

A ``Worker`` (the two-phase commit engine, its block log with one fdatasync per block,
its events log) in a temporary folder takes single-worker 1-in-2-out payments in
packages, as it would from a gateway, each package's block written before the next.
No NATS, no gateway: what is left is the ledger's own cost, so a change to the engine
shows here without the noise of a whole devnet on 2 cores.

Figures:
  cpu_us_per_tx   process CPU (user+system) per committed payment, median of runs
  tps             payments per second of that CPU
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ISSUER, median, print_table, single_worker_payments, write_json
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from services.bus import Batching
from services.partition.metrics import WorkerMetrics
from services.partition.wal import BlockLog, EventLog
from services.partition.worker import Worker


async def run(payments: int, package: int) -> float:
    """CPU seconds per payment, for ``payments`` sent ``package`` at a time."""
    results: list[proto.Result] = []

    def send(subject: str, item: proto.Item, lazy: bool = False) -> None:
        if isinstance(item, proto.Result):
            results.append(item)

    with tempfile.TemporaryDirectory() as folder:
        worker = Worker(
            me=0,
            pmap=PartitionMap.even(1),
            issuers=frozenset([ISSUER.pubkey]),
            wal=BlockLog(Path(folder) / "blocks.log"),
            events=EventLog(Path(folder) / "events.log"),
            blocks=Batching(4096, 0),
            prepare_timeout_ms=2_000,
            metrics=WorkerMetrics(),
            send=send,
            subject_of=lambda w: f"w.{w}",
            publish=lambda _: None,
        )
        worker.recover()
        engine = worker.engine
        issuances, txs = single_worker_payments(payments)
        for raw in issuances:
            engine.handle(proto.Package(2, -1, "gw", 1, [proto.Issue(0, raw)]))
            worker.writer.flush()
        results.clear()
        started = time.process_time()
        for at in range(0, len(txs), package):
            items: list[proto.Item] = [
                proto.Submit(i, txs[i]) for i in range(at, min(at + package, len(txs)))
            ]
            engine.handle(proto.Package(2, -1, "gw", 1, items))
            worker.writer.flush()
        took = time.process_time() - started
        worker.wal.close()
        worker.writer.events.close()
    committed = sum(1 for r in results if not r.code)
    assert committed == len(txs), f"{committed} of {len(txs)} committed"
    return took / committed


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--payments", type=int, default=20_000, help="payments per run")
    ap.add_argument("--package", type=int, default=200, help="payments per package and block")
    ap.add_argument("--runs", type=int, default=3, help="repeat and take the median")
    args = ap.parse_args()
    per_tx = median([asyncio.run(run(args.payments, args.package)) for _ in range(args.runs)])
    figures = {"cpu_us_per_tx": per_tx * 1e6, "tps": 1 / per_tx, "package": args.package}
    print_table(
        "worker: the engine and its logs, in process",
        [
            ("cpu_us_per_tx", f"{per_tx * 1e6:,.1f}", "per committed payment (CPU)"),
            ("tps", f"{1 / per_tx:,.0f}", "payments per CPU second"),
        ],
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
