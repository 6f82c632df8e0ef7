"""The devnet's payment workload: wallets, funding by issuance, random payments through
the gateway, a double spend, and a report (payments, tx/s, latency percentiles, checks)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from constellation.address import Network
from constellation.keys import XOnlyPubKey
from constellation.ledger.partition import Coin
from constellation.tx import Transaction, TxOutput
from constellation.wallet import Wallet
from services.api_client import Gateway, GatewayError, Sent
from services.devnet import Devnet, guild

FEE_MSAT = 1_000
COIN_MSAT = 10_000_000


@dataclass
class Account:
    wallet: Wallet
    coins: dict[bytes, Coin] = field(default_factory=dict)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Workload:
    def __init__(self, net: Devnet, gateway: Gateway, wallets: int, out: TextIO) -> None:
        self.net = net
        self.gw = gateway
        self.out = out
        self.rng = random.Random(os.urandom(8))
        network = Network.from_name(net.network)
        self.accounts = [Account(Wallet(os.urandom(32), network)) for _ in range(wallets)]
        self.by_owner: dict[XOnlyPubKey, Account] = {}
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()
        self.extra_msat = 0  # paid outside the accounts' own bookkeeping

    def say(self, line: str) -> None:
        print(line, file=self.out)

    def fresh_owner(self, account: Account) -> XOnlyPubKey:
        owner = account.wallet.fresh_key().pubkey
        self.by_owner[owner] = account
        return owner

    async def fund(self, coins_each: int) -> int:
        """One issuance per wallet; returns the msat issued."""

        async def one(account: Account) -> None:
            outputs = [TxOutput(COIN_MSAT, self.fresh_owner(account)) for _ in range(coins_each)]
            receipt = await self.gw.issue(self.net.issuance(outputs))
            for (value, owner), o in zip(outputs, receipt["outputs"], strict=True):
                account.coins[bytes.fromhex(o["coin_id"])] = Coin(value, owner)

        await asyncio.gather(*(one(a) for a in self.accounts))
        self.say(f"funded {len(self.accounts)} wallets with {coins_each} coins of {COIN_MSAT} msat")
        issued = COIN_MSAT * coins_each * len(self.accounts)
        await asyncio.to_thread(guild.deposit, self.net, issued)
        return issued

    def payment(self) -> tuple[Account, bytes, Coin, Transaction] | None:
        """A random payment with one coin of a random funded wallet (the coin is taken)."""
        funded = [a for a in self.accounts if a.coins]
        if not funded:
            return None
        src = self.rng.choice(funded)
        cid, coin = src.coins.popitem()
        if coin.value_msat <= FEE_MSAT + 1:
            self.extra_msat += coin.value_msat  # dust: left where it is
            return None
        dst = self.rng.choice([a for a in self.accounts if a is not src])
        amount = min(self.rng.randrange(1_000, 200_000), coin.value_msat - FEE_MSAT)
        tx = src.wallet.pay({cid: coin}, self.fresh_owner(dst), amount, FEE_MSAT)
        for change in tx.outputs[1:]:
            self.by_owner[change.owner] = src
        return src, cid, coin, tx

    async def payer(self, todo: list[int]) -> None:
        while todo[0] > 0:
            made = self.payment()
            if made is None:
                await asyncio.sleep(0.001)  # every coin is in flight or dust: wait for change
                continue
            todo[0] -= 1
            src, cid, coin, tx = made
            sent = await self.gw.send(tx)
            tally(sent, self.codes, self.latencies)
            if sent.committed is False:
                src.coins[cid] = coin
            if not sent.committed:  # not spent, or nobody could tell (the coin is left)
                continue
            for (value, owner), out_id in zip(tx.outputs, tx.output_ids, strict=True):
                self.by_owner[owner].coins[out_id] = Coin(value, owner)

    async def double_spend(self) -> int:
        """Two payments of one coin, sent at once: how many committed."""
        src, cid, coin = next(
            (a, cid, c)
            for a in self.accounts
            for cid, c in a.coins.items()
            if c.value_msat > FEE_MSAT
        )
        del src.coins[cid]
        pays = [
            src.wallet.pay({cid: coin}, self.fresh_owner(a), coin.value_msat - FEE_MSAT, FEE_MSAT)
            for a in self.accounts[:2]
        ]
        race = await asyncio.gather(*(self.gw.submit(t) for t in pays), return_exceptions=True)
        won = [r for r in race if isinstance(r, dict)]
        lost = [r.code for r in race if isinstance(r, GatewayError)]
        self.extra_msat += (coin.value_msat - FEE_MSAT) * len(won)
        self.say(f"double spend: {len(won)} committed, the other refused with {lost}")
        return len(won)

    def report(self, payments: int, clients: int, elapsed: float) -> None:
        lat = sorted(self.latencies)
        committed = self.codes["committed"]
        self.say(f"payments: {committed} of {payments} committed")
        for code, n in sorted(self.codes.items()):
            if code != "committed":
                self.say(f"  {code}: {n}")
        self.say(
            f"throughput: {committed / elapsed:,.0f} tx/s over {elapsed:.2f} s, {clients} clients"
        )
        cuts = ", ".join(
            f"p{int(q * 100)} {percentile(lat, q) * 1000:.1f}" for q in (0.5, 0.9, 0.99)
        )
        self.say(f"confirm latency ms: {cuts}, max {lat[-1] * 1000 if lat else 0:.1f}")

    def conserved(self, issued: int, before: dict[str, Any], after: dict[str, Any]) -> bool:
        """The workers' totals moved exactly as the wallets' own books say."""
        d_issued = after["issued_msat"] - before["issued_msat"]
        held = after["held_msat"] - before["held_msat"]
        fees = after["fees_msat"] - before["fees_msat"]
        out = after.get("outbound_msat", 0) - before.get("outbound_msat", 0)
        books = sum(c.value_msat for a in self.accounts for c in a.coins.values())
        books += self.extra_msat
        ok = bool(d_issued == issued and held + fees + out == issued and held == books)
        self.say(
            f"ledger check: issued {d_issued} = held {held} + fees {fees}; wallets' books "
            f"{books}; locks {after['locks']}, in doubt {after['in_doubt']}: "
            + ("conserved" if ok else "NOT CONSERVED")
        )
        return ok


def tally(sent: Sent, codes: Counter[str], latencies: list[float]) -> None:
    """Count how a payment went; a payment committed at once adds its latency."""
    codes[sent.how] += 1
    if sent.how == "committed":
        latencies.append(sent.seconds)


async def run_workload(
    net: Devnet,
    wallets: int,
    coins_each: int,
    payments: int,
    clients: int,
    out: TextIO,
    via: Devnet | None = None,
) -> bool:
    """Fund ``wallets`` on ``net``'s ledger and make ``payments`` with ``clients`` at once,
    through ``net``'s gateway or another guild member's (``via``); True if every check
    holds (value conserved, the double spend refused, no lock left)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        if via is None:
            gw = Gateway(net.gateway_url, session)
        else:
            gw = Gateway(via.gateway_url, session, ledger=net.operator)
        work = Workload(net, gw, wallets, out)
        before = await gw.settled()
        issued = await work.fund(coins_each)
        started = time.perf_counter()
        todo = [payments]
        await asyncio.gather(*(work.payer(todo) for _ in range(clients)))
        work.report(payments, clients, time.perf_counter() - started)
        won = await work.double_spend()
        after = await gw.settled()
        ok = work.conserved(issued, before, after)
        return ok and won == 1 and after["locks"] == 0 and after["in_doubt"] == 0
