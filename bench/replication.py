"""One shard replicated at six copies (3 operators x 2), in this process: where the CPU
of replication goes, per payment, next to the same payments in a lone engine.

    python bench/replication.py --json bench/results/replication.json

The leader's engine takes single-worker 1-in-2-out payments in packages, as from a
gateway; each package becomes a block, proposed, sent to the five other copies (every
message encoded and decoded as on the wire), re-executed there (the twin without
signature checks, the other operators' copies with), acked and confirmed; the receipts
wait for the confirmation. No disk and no network: the figures are the protocol's CPU.
The lone engine takes the same payments with a log that confirms at once.

Figures (medians of runs):
  lone_cpu_us_per_tx        the engine alone
  leader_cpu_us_per_tx      the leading copy: engine, sealing, signing, acks
  twin_cpu_us_per_tx        the owner's other copy (replays without signature checks)
  other_cpu_us_per_tx       a copy at another operator (replays with them), average
  shard_cpu_us_per_tx       all six copies together
  replication_cpu_ratio     shard / lone
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ISSUER, median, print_table, single_worker_payments, write_json
from constellation.keys import SigningKey
from constellation.ledger.commit import TwoPhaseCommit
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import EVERYONE, Replica, Role, Settings
from constellation.replication.shard import LedgerShard, ShardLog

KEYS = [SigningKey(hashlib.sha256(b"operator %d" % i).digest()) for i in range(3)]


def engine(log: ShardLog, results: list[proto.Result]) -> TwoPhaseCommit:
    def send(subject: str, item: proto.Item, lazy: bool = False) -> None:
        if isinstance(item, proto.Result):
            results.append(item)

    return TwoPhaseCommit(
        me=0,
        pmap=PartitionMap.even(1),
        issuers=frozenset([ISSUER.pubkey]),
        prepare_timeout_ms=2_000,
        send=send,
        subject_of=lambda w: f"w.{w}",
        log=log,
        clock=time.monotonic,
        draw=lambda: 1,
    )


class Instant(ShardLog):
    """A lone engine's log: every block is durable at once."""

    def seal_now(self) -> None:
        self.proposed += 1
        self.waiting[self.proposed] = self.after
        self.records, self.after = [], []
        self.confirm(self.proposed)


def lone(issuances: list[bytes], txs: list[bytes], package: int) -> float:
    results: list[proto.Result] = []
    log = Instant()
    e = engine(log, results)
    for raw in issuances:
        e.handle(proto.Package(2, -1, "gw", 1, [proto.Issue(0, raw)]))
        log.seal_now()
    results.clear()
    started = time.process_time()
    for at in range(0, len(txs), package):
        e.handle(proto.Package(2, -1, "gw", 1, submits(txs, at, package)))
        log.seal_now()
        e.root()  # a block's header carries it
    took = time.process_time() - started
    assert sum(1 for r in results if not r.code) == len(txs)
    return took / len(txs)


def submits(txs: list[bytes], at: int, package: int) -> list[proto.Item]:
    return [proto.Submit(i, txs[i]) for i in range(at, min(at + package, len(txs)))]


class Guild:
    """Six copies of shard (0, 0), wired in memory; CPU counted per copy."""

    def __init__(self) -> None:
        self.results: list[proto.Result] = []
        self.now = 0.0
        self.cpu = [0.0] * 6
        self.queue: deque[tuple[int, int, bytes]] = deque()
        self.shards = []
        self.replicas = []
        settings = Settings(window=8, snapshot_every=1 << 30)
        for c in range(6):
            log = ShardLog()
            shard = LedgerShard(engine(log, self.results if c == 0 else []), log)
            key = KEYS[c // 2]
            self.shards.append(shard)
            self.replicas.append(
                Replica(
                    owner=0,
                    worker=0,
                    me=c,
                    keys=[k.pubkey for k in KEYS],
                    sign=key.sign,
                    executor=shard.executor,
                    clock=lambda: self.now,
                    draw=lambda: 0.5,
                    settings=settings,
                )
            )

    def timed(self, c: int, action: Callable[[], None]) -> None:
        started = time.process_time()
        action()
        self.flush(c)
        self.cpu[c] += time.process_time() - started

    def flush(self, c: int) -> None:
        r = self.replicas[c]
        while not (ready := r.ready()).empty():
            for to, msg in ready.messages:
                data = rp.encode(rp.Envelope(0, 0, c, msg))
                for dest in range(6) if to == EVERYONE else [to]:
                    if dest != c:
                        self.queue.append((c, dest, data))
            r.stored(ready.last)
            if ready.leading is not None:
                self.shards[c].leading(ready.leading, r)
            if ready.confirmed and r.role is Role.LEADER:
                self.shards[c].confirmed(ready.confirmed)

    def deliver(self) -> None:
        while self.queue:
            _, dest, data = self.queue.popleft()

            def step(dest: int = dest, data: bytes = data) -> None:
                env = rp.decode(data)
                self.replicas[dest].step(env.sender, env.msg)

            self.timed(dest, step)

    def tick(self, dt: float) -> None:
        self.now += dt
        for c in range(6):
            self.timed(c, functools.partial(self.shards[c].tick, self.replicas[c], self.now))
            self.timed(c, self.replicas[c].tick)
        self.deliver()

    def submit(self, items: list[proto.Item]) -> None:
        self.timed(0, lambda: self.shards[0].engine.handle(proto.Package(2, -1, "gw", 1, items)))
        self.timed(0, lambda: self.shards[0].tick(self.replicas[0], self.now))
        self.deliver()


def guild(issuances: list[bytes], txs: list[bytes], package: int) -> list[float]:
    g = Guild()
    while g.replicas[0].role is not Role.LEADER or g.shards[0].settling is not None:
        g.tick(0.05)
    for raw in issuances:
        g.submit([proto.Issue(0, raw)])
    g.tick(0.001)
    g.results.clear()
    g.cpu = [0.0] * 6
    for at in range(0, len(txs), package):
        g.submit(submits(txs, at, package))
    while sum(1 for r in g.results if not r.code) < len(txs):
        g.tick(0.001)
    assert len({r.state_root() for r in g.replicas}) == 1
    return [cpu / len(txs) for cpu in g.cpu]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--payments", type=int, default=5_000, help="payments per run")
    ap.add_argument("--package", type=int, default=200, help="payments per package and block")
    ap.add_argument("--runs", type=int, default=3, help="repeat and take the median")
    args = ap.parse_args()
    issuances, txs = single_worker_payments(args.payments)
    lones, runs = [], []
    for _ in range(args.runs):  # interleaved: the same noise for both
        lones.append(lone(issuances, txs, args.package))
        runs.append(guild(issuances, txs, args.package))
    us = 1e6
    figures = {
        "lone_cpu_us_per_tx": median(lones) * us,
        "leader_cpu_us_per_tx": median([r[0] for r in runs]) * us,
        "twin_cpu_us_per_tx": median([r[1] for r in runs]) * us,
        "other_cpu_us_per_tx": median([sum(r[2:]) / 4 for r in runs]) * us,
        "shard_cpu_us_per_tx": median([sum(r) for r in runs]) * us,
        "replication_cpu_ratio": median([sum(r) / lo for r, lo in zip(runs, lones, strict=True)]),
        "package": args.package,
    }
    print_table(
        "replication: one shard at six copies, in process (CPU per payment)",
        [(k, f"{v:,.1f}" if "ratio" not in k else f"{v:.2f}", "") for k, v in figures.items()],
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
