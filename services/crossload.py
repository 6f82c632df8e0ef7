"""Payments between operators on a local guild: wallets at every operator pay wallets at
the others, each payment spent at once in the payer's ledger and pending at the payee's
until the operators settle over Lightning; then a report and the checks.

Each payment's output is followed to the coin it becomes at the payee's ledger
(``release_coin``: its id is known while it is pending): the receiver sees it
pending, then spendable. The checks: every output released exactly once, as the coin it
was announced as, and only after its batch was paid (the payee's books say released
msat = paid msat); each ledger's books conserved (issued = held + fees + paid out); the
payers' paid-out totals equal the payees' released totals; and the reserve invariant
holding at every operator.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp

from constellation.address import Network, encode_address
from constellation.keys import XOnlyPubKey
from constellation.ledger.partition import Coin
from constellation.settlement import release_coin
from constellation.tx import TxOutput
from constellation.wallet import Wallet
from services.api_client import Gateway, GatewayError
from services.devnet import Devnet, guild
from services.workload import COIN_MSAT, FEE_MSAT, percentile, tally

RELEASE_WAIT_S = 120.0


@dataclass
class Account:
    op: int
    wallet: Wallet
    owner: XOnlyPubKey  # where it receives from other operators
    address: str
    coins: dict[bytes, Coin]


@dataclass
class Crossing:
    src: int
    dst: int
    output_id: bytes  # in the payer's ledger
    owner: bytes
    value_msat: int
    committed_at: float  # wall clock, as the payee's database stamps releases
    released_at: float | None = None
    release_id: bytes = b""  # the coin it becomes at the payee (worked out after the run)


class CrossWorkload:
    def __init__(
        self, nets: list[Devnet], session: aiohttp.ClientSession, wallets: int, out: TextIO
    ) -> None:
        self.nets = nets
        self.out = out
        self.rng = random.Random(os.urandom(8))
        self.network = Network.from_name(nets[0].network)
        self.gws = [Gateway(n.gateway_url, session) for n in nets]
        self.lids = [bytes.fromhex("00")] * len(nets)
        self.accounts: list[list[Account]] = []
        for op in range(len(nets)):
            accounts = []
            for _ in range(wallets):
                w = Wallet(os.urandom(32), self.network)
                key = w.fresh_key().pubkey
                accounts.append(Account(op, w, key, "", {}))
            self.accounts.append(accounts)
        self.crossings: list[Crossing] = []
        self.codes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.payers = list(range(len(nets)))  # the operators whose wallets pay
        self.paying = 0  # payments sent and not answered yet

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def setup(self, coins_each: int) -> None:
        """Learn each ledger's id, then fund every wallet at its own operator."""
        for op, gw in enumerate(self.gws):
            self.lids[op] = bytes.fromhex((await gw.totals())["ledger_id"])
            for a in self.accounts[op]:
                a.address = self.address(a)

        async def one(op: int, a: Account) -> None:
            outputs = [TxOutput(COIN_MSAT, a.wallet.fresh_key().pubkey) for _ in range(coins_each)]
            receipt = await self.gws[op].issue(self.nets[op].issuance(outputs))
            for (value, owner), o in zip(outputs, receipt["outputs"], strict=True):
                a.coins[bytes.fromhex(o["coin_id"])] = Coin(value, owner)

        await asyncio.gather(
            *(one(op, a) for op in range(len(self.nets)) for a in self.accounts[op])
        )
        for net, accounts in zip(self.nets, self.accounts, strict=True):
            await asyncio.to_thread(guild.deposit, net, COIN_MSAT * coins_each * len(accounts))

    def address(self, a: Account) -> str:
        return encode_address(a.owner, self.network, self.lids[a.op])

    async def payer(self, todo: list[int], cross: bool) -> None:
        while todo[0] > 0:
            todo[0] -= 1
            self.paying += 1
            try:
                paid = await self.pay_one(cross)
            finally:
                self.paying -= 1
            if not paid:
                todo[0] += 1
                if not self.paying and not any(
                    a.coins for p in self.payers for a in self.accounts[p]
                ):
                    self.codes["no coin left"] += todo[0]  # every coin is spent or lost
                    todo[0] = 0
                await asyncio.sleep(0.001)

    async def pay_one(self, cross: bool) -> bool:
        """One payment from a random wallet, to another operator's wallet (``cross``) or
        to one of its own; False where the operator picked has no coin free now."""
        ops = len(self.nets)
        op = self.rng.choice(self.payers)
        funded = [a for a in self.accounts[op] if a.coins]
        if not funded:
            return False
        src = self.rng.choice(funded)
        cid, coin = src.coins.popitem()
        if coin.value_msat <= FEE_MSAT + 1_000:
            return True  # dust: left where it is
        dst_op = self.rng.choice([o for o in range(ops) if o != op]) if cross else op
        dst = self.rng.choice([a for a in self.accounts[dst_op] if a is not src])
        amount = min(self.rng.randrange(1_000, 200_000), coin.value_msat - FEE_MSAT)
        tx = src.wallet.pay(
            {cid: coin},
            dst.owner,
            amount,
            FEE_MSAT,
            ledger=self.lids[dst_op],
            here=self.lids[op],
        )
        sent = await self.gws[op].send(tx)
        tally(sent, self.codes, self.latencies)
        if sent.committed is False:
            src.coins[cid] = coin
        if not sent.committed:  # not spent, or nobody could tell (the coin is left)
            return True
        for i, ((value, owner), out_id) in enumerate(zip(tx.outputs, tx.output_ids, strict=True)):
            if i == 0 and dst_op != op:  # nothing more here: the load's CPU is the guild's
                self.crossings.append(Crossing(op, dst_op, out_id, owner, value, time.time()))
            elif owner == dst.owner and i == 0:
                dst.coins[out_id] = Coin(value, owner)
            else:
                src.coins[out_id] = Coin(value, owner)
        return True

    async def closed_loop(self, seconds: float, clients: int, cross: bool) -> float:
        """``clients`` paying back to back for ``seconds``; returns tx/s committed."""
        end = time.monotonic() + seconds
        before = self.codes["committed"]

        async def client() -> None:
            while time.monotonic() < end:
                if not await self.pay_one(cross):
                    await asyncio.sleep(0.001)

        await asyncio.gather(*(client() for _ in range(clients)))
        return (self.codes["committed"] - before) / seconds

    async def open_loop(self, seconds: float, rate: float, cross: bool) -> None:
        """A payment every ``1/rate`` s for ``seconds``, each on its own."""
        started, tasks = time.monotonic(), []
        for k in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, started + k / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(self.pay_one(cross)))
        await asyncio.gather(*tasks)

    async def run(self, payments: int, clients: int, cross: bool) -> float:
        """Make ``payments`` (between operators, or each inside one); returns tx/s."""
        todo, before = [payments], self.codes["committed"]
        started = time.perf_counter()
        await asyncio.gather(*(self.payer(todo, cross) for _ in range(clients)))
        return (self.codes["committed"] - before) / (time.perf_counter() - started)

    def released_as(self, crossings: list[Crossing]) -> None:
        """Work out the coin each becomes at its payee (``release_coin``)."""
        issuers = [net.issuer.pubkey for net in self.nets]
        for c in crossings:
            if not c.release_id:
                c.release_id = release_coin(
                    issuers[c.dst], self.lids[c.src], c.output_id, c.value_msat, c.owner
                )

    async def show_pending(self, c: Crossing) -> list[str]:
        """How the receiver sees a payment from another operator: pending, then a coin."""
        self.released_as([c])
        seen: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < 10:
            info = await self.gws[c.dst].coin(c.release_id)
            status = info["status"] if info else "not there yet"
            if not seen or seen[-1].split(" at ")[0] != status:
                seen.append(f"{status} at {(time.monotonic() - started) * 1000:.0f} ms")
            if status == "unspent":
                break
            await asyncio.sleep(0.02)
        self.say(
            f"the last payment, {c.value_msat} msat from {self.nets[c.src].operator} to"
            f" {self.nets[c.dst].operator}, as its receiver sees it after the commit:"
            f" {' -> '.join(seen)}"
        )
        return [x.split(" at ")[0] for x in seen]

    async def wait_released(self, timeout_s: float = RELEASE_WAIT_S) -> int:
        """Wait until every crossing is a coin at its payee; returns how many are not."""
        deadline = time.monotonic() + timeout_s
        self.released_as(self.crossings)
        by_id = {c.release_id: c for c in self.crossings}
        while True:
            for op, accounts in enumerate(self.accounts):
                for a in accounts:
                    try:
                        entries = await self.gws[op].incoming(a.address, 500)
                    except (aiohttp.ClientError, TimeoutError):
                        break  # an operator down: asked again in the next round
                    except GatewayError as exc:
                        if exc.status != 503:
                            raise
                        break  # its database restarting: "retry", in the next round
                    for entry in entries:
                        c = by_id.get(bytes.fromhex(entry["coin_id"]))
                        if c is not None and entry["status"] == "released":
                            c.released_at = entry["released_at"]
            left = sum(1 for c in self.crossings if c.released_at is None)
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.5)

    async def spendable(self) -> bool:
        """Every released coin is unspent at its payee's ledger, for its value."""
        for c in self.crossings:
            info = await self.gws[c.dst].coin(c.release_id)
            if info is None or info["status"] != "unspent" or info["value_msat"] != c.value_msat:
                self.say(f"coin {c.release_id.hex()[:16]} at op{c.dst}: {info}")
                return False
        return True

    def release_ms(self) -> list[float]:
        return sorted(
            (c.released_at - c.committed_at) * 1000
            for c in self.crossings
            if c.released_at is not None
        )


async def settlement_books(nets: list[Devnet], session: aiohttp.ClientSession) -> dict[str, Any]:
    """Each operator's settlement summary, ledger totals and reserve gauges."""
    books: dict[str, Any] = {}
    for net in nets:
        gw = Gateway(net.gateway_url, session)
        books[net.operator] = {
            "settlement": (await gw.get("/v1/settlement"))["peers"],
            "ledger": await gw.totals(),
            "reserve": await reserve(net, session),
        }
    return books


async def reserve(net: Devnet, session: aiohttp.ClientSession) -> dict[str, float]:
    async with session.get(f"{net.gateway_url}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_reserve_msat{"):
            term = line.split('term="', 1)[1].split('"', 1)[0]
            out[term] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gateway_reserve_ok "):
            out["ok"] = float(line.rsplit(" ", 1)[1])
    return out


async def settled_books_agree(
    nets: list[Devnet], session: aiohttp.ClientSession, out: TextIO, timeout_s: float = 30.0
) -> bool:
    """Once nothing is in flight: what each payer paid each payee equals what that payee
    released from it, each ledger's books are conserved, and the reserve holds with no
    drift at every operator."""
    deadline = time.monotonic() + timeout_s
    while True:
        books = await settlement_books(nets, session)
        problems = []
        for net in nets:
            me = books[net.operator]
            led = me["ledger"]
            if led["issued_msat"] != led["held_msat"] + led["fees_msat"] + led["outbound_msat"]:
                problems.append(f"{net.operator}: ledger books not conserved: {led}")
            r = me["reserve"]
            unsettled = r.get("owed_to_others", 1) or r.get("owed_by_others", 1)
            if r.get("ok") != 1 or r.get("drift", 1) or r.get("in_flight", 1) or unsettled:
                problems.append(f"{net.operator}: reserve {r}")
            for peer, pair in me["settlement"].items():
                paid = pair["owed"]["paid_msat"]
                released = books[peer]["settlement"][net.operator]["held"]["released_msat"]
                if pair["owed"]["outputs"] or pair["owed"]["batch"] is not None:
                    problems.append(f"{net.operator} -> {peer}: still owed {pair['owed']}")
                if paid != released:
                    problems.append(f"{net.operator} -> {peer}: paid {paid}, released {released}")
        if not problems:
            for net in nets:
                r = books[net.operator]["reserve"]
                print(
                    f"  {net.operator}: reserve holds: funds {r['funds']:,.0f} msat, L3 held"
                    f" {r['l3_held']:,.0f}, ecash less the mint's coins"
                    f" {r.get('ecash', 0):,.0f}, owed to others"
                    f" {r['owed_to_others']:,.0f}, drift {r['drift']:,.0f}",
                    file=out,
                )
            return True
        if time.monotonic() > deadline:
            for p in problems:
                print(f"  NOT SETTLED: {p}", file=out)
            return False
        await asyncio.sleep(1.0)


async def run_cross(
    nets: list[Devnet], wallets: int, coins_each: int, payments: int, clients: int, out: TextIO
) -> bool:
    """Payments between the guild's operators, pending then settled; True if every
    check holds."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 8)) as s:
        work = CrossWorkload(nets, s, wallets, out)
        await work.setup(coins_each)
        tps = await work.run(payments, clients, cross=True)
        committed = work.codes["committed"]
        work.say(
            f"payments between operators: {committed} of {payments} committed, {tps:,.0f} tx/s"
        )
        for code, n in sorted(work.codes.items()):
            if code != "committed":
                work.say(f"  {code}: {n}")
        if work.crossings:
            await work.show_pending(work.crossings[-1])
        left = await work.wait_released()
        lat = work.release_ms()
        work.say(
            f"released at the payees: {len(lat)} of {len(work.crossings)}; payment to spendable"
            f" ms: p50 {percentile(lat, 0.5):.0f}, p99 {percentile(lat, 0.99):.0f}"
        )
        ok = left == 0 and await work.spendable()
        ok &= await settled_books_agree(nets, s, out)
        return ok
