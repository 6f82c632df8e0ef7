"""Light-client proofs: their size, and a wallet's CPU to check one; with --guild, a
local guild's checkpoint lag and the pushes one gateway sustains.

    python bench/lightclient.py --json bench/results/lightclient.json [--coins 1000000]
    python bench/lightclient.py --guild --clients 1000 --json bench/results/lightclient.json

Builds the index every operator computes (``constellation.lightclient.index``) for a
guild of 3 operators x 2 workers holding --coins coins, then one checkpoint's worth of
payments (--payments, 1 input to 2 outputs, each coin in the shard its id falls in: a
payment touches 1 to 3 shards), signed like the guild signs (one BIP340 signature).

Figures:
  proof_bytes        median size of a payment's proof (every shard's record of it)
  proof_bytes_max    the largest of them
  coin_proof_bytes   median size of a coin's proof (unspent, as of the checkpoint)
  verify_us          median CPU to check a payment's proof and its checkpoint
  coin_verify_us     the same for a coin's proof
  index_s            seconds to build the index of --coins coins (an operator's start)
  checkpoint_ms      CPU to make one checkpoint (entries, records trees, shards tree)

With --guild (a 3-operator local guild, ``constellation devnet``, on this machine):
--clients websockets subscribe to an address each at op0's gateway (``/v1/lc/ws``); each
of --rounds rounds issues a coin to every address (issuances of 250 outputs) and waits
for every push.
  checkpoint_lag_ms  p50/p99: an issuance's receipt (its block confirmed) to the push of
                     its proof arriving (a signed checkpoint covers it, and the gateway
                     pushed it)
  pushes_per_s       median over rounds: pushes one gateway delivered a second, from the
                     round's first push to its last
  pushes_missing     pushes that did not come within 30 s of their round
Targets: verify_us <= 500, proof_bytes <= 2,048, checkpoint_lag_ms p99 <= 2,500.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, print_table, write_json
from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.protocol.ledger import BlockEvents, CoinChange, Commit
from constellation.tx import TxOutput
from services.api_client import Gateway
from services.devnet import Devnet, guild
from services.workload import percentile

GUILD_KEY = SigningKey(b"\x33" * 32)
SHARDS = [(o, w) for o in range(3) for w in range(2)]
MEMBERS = pf.members_root(2, [(n, bytes([i + 1]) * 32) for i, n in enumerate("abc")])
PIN = pf.Pin("bench", bytes(GUILD_KEY.pubkey), MEMBERS)
ISSUE_CHUNK = 250


def shard_of(coin_id: bytes) -> lc.Shard:
    return SHARDS[coin_id[0] * len(SHARDS) // 256]


class Guild:
    """The index of a guild's shards, fed blocks of events."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.index = lc.GuildIndex("bench", MEMBERS, SHARDS)
        self.heights = dict.fromkeys(SHARDS, 0)
        self.unspent: list[tuple[bytes, int, bytes]] = []

    def block(self, shard: lc.Shard, changes: list[CoinChange], committed: list[Commit]) -> None:
        prev = self.heights[shard] or -1
        self.heights[shard] += 1
        rng = self.rng
        ev = BlockEvents(
            shard[1],
            self.heights[shard],
            prev,
            changes,
            committed,
            rng.randbytes(32),
            rng.randbytes(32),
        )
        self.index.apply(shard[0], ev)

    def checkpoint(self, time_ms: int) -> lc.Signed:
        checkpoint, entries = self.index.propose(time_ms)
        sig = GUILD_KEY.sign(checkpoint.message())
        return self.index.signed(pf.SignedCheckpoint(checkpoint, sig), entries)

    def issue(self, coins: int) -> None:
        rng = self.rng
        pending: dict[lc.Shard, list[CoinChange]] = {s: [] for s in SHARDS}
        iid = b""
        for n in range(coins):
            if n % ISSUE_CHUNK == 0:
                iid = rng.randbytes(32)
            cid, owner = rng.randbytes(32), rng.randbytes(32)
            pending[shard_of(cid)].append(CoinChange(iid, cid, owner, 1_000_000, True))
            self.unspent.append((cid, 1_000_000, owner))
        for shard, changes in pending.items():
            for i in range(0, len(changes), 10_000):
                self.block(shard, changes[i : i + 10_000], [])

    def pay(self) -> bytes:
        """A payment of one coin to two new ones, each recorded in its shard's block."""
        rng = self.rng
        cid, value, owner = self.unspent.pop(rng.randrange(len(self.unspent)))
        txid = rng.randbytes(32)
        changes = {shard_of(cid): [CoinChange(txid, cid, owner, value, False)]}
        for part in (value // 2, value - value // 2 - 100):
            out = rng.randbytes(32)
            changes.setdefault(shard_of(out), []).append(
                CoinChange(txid, out, rng.randbytes(32), part, True)
            )
            self.unspent.append((out, part, owner))
        for shard, cs in changes.items():
            self.block(shard, cs, [Commit(txid, 100)] if shard == shard_of(cid) else [])
        return txid


def measure(
    guild: Guild, signed: lc.Signed, payments: list[bytes], samples: int
) -> dict[str, float]:
    rng = guild.rng
    sizes: list[float] = []
    coin_sizes: list[float] = []
    verify: list[float] = []
    coin_verify: list[float] = []
    held = [lc.held(signed)]
    for txid in rng.sample(payments, min(samples, len(payments))):
        proof = lc.tx_proof(held, txid)
        assert proof is not None
        raw = pf.encode_tx_proof(proof)
        sizes.append(len(raw))
        t = time.process_time()
        pf.verify_tx(PIN, pf.decode_tx_proof(raw), txid)
        verify.append((time.process_time() - t) * 1e6)
    for cid, _, _ in rng.sample(guild.unspent, samples):
        raw = pf.encode_coin_proof(lc.coin_proof(signed, shard_of(cid), cid))
        coin_sizes.append(len(raw))
        t = time.process_time()
        verdict = pf.verify_coin(PIN, pf.decode_coin_proof(raw), cid, shard_of(cid), not_below=1)
        coin_verify.append((time.process_time() - t) * 1e6)
        assert verdict.leaf is not None and verdict.leaf.state is pf.CoinState.UNSPENT
    return {
        "proof_bytes": median(sizes),
        "proof_bytes_max": max(sizes),
        "coin_proof_bytes": median(coin_sizes),
        "verify_us": median(verify),
        "coin_verify_us": median(coin_verify),
    }


async def _pushes(net: Devnet, clients: int, rounds: int) -> dict[str, Any]:
    network = Network.from_name(net.network)
    keys = [SigningKey(os.urandom(32)) for _ in range(clients)]
    owners = [k.pubkey for k in keys]
    addresses = [encode_address(o, network) for o in owners]
    arrived: dict[str, float] = {}
    ready = asyncio.Event()
    url = net.gateway_url.replace("http", "ws", 1) + "/v1/lc/ws"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        gw = Gateway(net.gateway_url, session)
        while True:  # the guild's first checkpoint
            async with session.get(net.gateway_url + "/v1/lc/checkpoints/latest") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.5)
        subscribed = 0

        async def client(address: str) -> None:
            nonlocal subscribed
            async with session.ws_connect(url, max_msg_size=0) as ws:
                await ws.send_json(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "address.subscribe",
                        "params": {"address": address},
                    }
                )
                await ws.receive_json()
                subscribed += 1
                if subscribed == clients:
                    ready.set()
                async for msg in ws:
                    if msg.json().get("method") == "address.update":
                        arrived[address] = time.perf_counter()

        tasks = [asyncio.create_task(client(a)) for a in addresses]
        await asyncio.wait_for(ready.wait(), 120)
        lags: list[float] = []
        rates: list[float] = []
        missing = 0
        receipts: dict[str, float] = {}
        for _ in range(rounds):
            arrived.clear()
            receipts.clear()

            async def issue(chunk: list[int]) -> None:
                outputs = [TxOutput(1_000_000, owners[i]) for i in chunk]
                await gw.issue(net.issuance(outputs))
                now = time.perf_counter()
                receipts.update((addresses[i], now) for i in chunk)

            await asyncio.gather(
                *(issue(list(range(i, min(i + 250, clients)))) for i in range(0, clients, 250))
            )
            end = time.perf_counter() + 30
            while len(arrived) < clients and time.perf_counter() < end:
                await asyncio.sleep(0.05)
            missing += clients - len(arrived)
            lags += [(t - receipts[a]) * 1000 for a, t in arrived.items()]
            if len(arrived) > 1:
                rates.append(len(arrived) / (max(arrived.values()) - min(arrived.values()) or 1e-3))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lags.sort()
    return {
        "clients": clients,
        "rounds": rounds,
        "checkpoint_lag_p50_ms": percentile(lags, 0.5),
        "checkpoint_lag_p99_ms": percentile(lags, 0.99),
        "pushes_per_s": median(rates),
        "pushes_missing": missing,
    }


def guild_figures(clients: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-lc-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user where we are root
        directory = Path(tmp) / "guild"
        nets = guild.up(directory, 3, 2, "bench")
        try:
            return asyncio.run(_pushes(nets[0], clients, rounds))
        finally:
            guild.down(directory)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coins", type=int, default=1_000_000)
    ap.add_argument("--payments", type=int, default=600, help="in one checkpoint")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--json")
    ap.add_argument("--guild", action="store_true", help="also a local guild's lag and pushes")
    ap.add_argument("--clients", type=int, default=1000, help="--guild: websockets")
    ap.add_argument("--rounds", type=int, default=5, help="--guild: a push to every client each")
    args = ap.parse_args()
    guild = Guild(random.Random(1))
    started = time.perf_counter()
    guild.issue(args.coins)
    guild.checkpoint(0)
    index_s = time.perf_counter() - started
    payments = [guild.pay() for _ in range(args.payments)]
    started = time.process_time()
    signed = guild.checkpoint(1000)
    checkpoint_ms = (time.process_time() - started) * 1000
    figures = {
        "coins": args.coins,
        "payments_per_checkpoint": args.payments,
        **measure(guild, signed, payments, args.samples),
        "index_s": index_s,
        "checkpoint_ms": checkpoint_ms,
    }
    rows = []
    if args.guild:
        g = guild_figures(args.clients, args.rounds)
        figures.update(g)
        rows = [
            (
                "checkpoint_lag_ms",
                f"{g['checkpoint_lag_p50_ms']:.0f} / {g['checkpoint_lag_p99_ms']:.0f}",
                "p50 / p99, confirmed to pushed with its proof (target p99 <= 2,500)",
            ),
            ("pushes_per_s", f"{g['pushes_per_s']:,.0f}", f"one gateway, {args.clients} sockets"),
            ("pushes_missing", str(g["pushes_missing"]), f"of {args.clients} x {args.rounds}"),
        ]
    print_table(
        f"light-client proofs: {args.coins:,} coins in 3 operators x 2 workers, "
        f"{args.payments} payments per checkpoint",
        [
            ("proof_bytes", f"{figures['proof_bytes']:.0f}", "median, a payment (target <= 2,048)"),
            ("proof_bytes_max", f"{figures['proof_bytes_max']:.0f}", ""),
            ("coin_proof_bytes", f"{figures['coin_proof_bytes']:.0f}", "median, an unspent coin"),
            (
                "verify_us",
                f"{figures['verify_us']:.0f}",
                "median, proof + checkpoint (target <= 500)",
            ),
            ("coin_verify_us", f"{figures['coin_verify_us']:.0f}", "median"),
            ("index_s", f"{index_s:.1f}", "building the index of every coin"),
            ("checkpoint_ms", f"{checkpoint_ms:.1f}", "CPU to make one checkpoint"),
            *rows,
        ],
    )
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
