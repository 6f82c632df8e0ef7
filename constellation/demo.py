"""``constellation demo``: a whole ledger in one process, told step by step.

Uses the same core as the services: wallets from seeds, a genesis issuance signed
by the operator, two-phase commit across simulated workers, and the ledger's own
refusals of a double spend.
"""

from __future__ import annotations

import random
from typing import TextIO

from constellation.address import Network
from constellation.amount import format_msat
from constellation.errors import ConstellationError, InsufficientFunds
from constellation.keys import SigningKey
from constellation.ledger import LocalLedger
from constellation.tx import Issuance, Transaction, TxOutput, partition_of
from constellation.wallet import Wallet

NAMES = ("alice", "bob", "carol", "dave")
FEE_MSAT = 1_000


class Demo:
    def __init__(self, workers: int, seed: int | None, out: TextIO) -> None:
        self.rng = random.Random(seed)
        self.out = out
        self.operator = SigningKey(self.rng.randbytes(32))
        self.ledger = LocalLedger(workers, issuers=[self.operator.pubkey])
        self.wallets = {name: Wallet(self.rng.randbytes(32), Network.REGTEST) for name in NAMES}

    def say(self, line: str = "") -> None:
        print(line, file=self.out)

    def balance(self, name: str) -> int:
        return self.ledger.balance_msat(self.wallets[name].owners)

    def payment(self, src: str, dst: str, amount_msat: int) -> Transaction:
        wallet = self.wallets[src]
        coins = self.ledger.coins_of(wallet.owners)
        return wallet.pay(coins, self.wallets[dst].fresh_address(), amount_msat, FEE_MSAT)

    def setup(self) -> None:
        ranges = ", ".join(f"{lo}..{hi - 1}" for _, lo, hi in self.ledger.pmap.ranges)
        self.say(f"ledger: {len(self.ledger.states)} workers holding partitions {ranges}")
        for name, wallet in self.wallets.items():
            self.say(f"wallet {name:<6} address {wallet.fresh_address()}")
        genesis = Issuance(
            self.operator.pubkey,
            nonce=0,
            outputs=[
                TxOutput(1_000_000_000, self.wallets["alice"].fresh_key().pubkey),
                TxOutput(500_000_000, self.wallets["bob"].fresh_key().pubkey),
            ],
        ).signed_by(self.operator.secret)
        self.ledger.issue(genesis)
        self.say(f"genesis: the operator issued {format_msat(genesis.total_msat)} to alice, bob")

    def payments(self, count: int) -> None:
        self.say("\npayments:")
        tx = self.payment("alice", "bob", 250_000_000)
        votes = self.ledger.submit(tx)
        parts = sorted(
            {partition_of(c) for c, _ in tx.inputs} | set(map(partition_of, tx.output_ids))
        )
        self.say(
            f"  alice -> bob 250,000 sat  txid {tx.txid.hex()[:16]}…  partitions {parts}, "
            f"{len(votes)} workers in the commit"
        )
        made = short = 0
        for _ in range(count):
            src, dst = self.rng.sample(NAMES, 2)
            amount = self.rng.randrange(1_000, max(1_001, self.balance(src) // 3 + 1))
            try:
                self.ledger.submit(self.payment(src, dst, amount))
                made += 1
            except InsufficientFunds:
                short += 1
        self.say(f"  {made} random payments committed, {short} refused for lack of funds")

    def double_spend(self) -> bool:
        self.say("\ndouble spend: alice signs one coin over to bob and to carol")
        alice = self.wallets["alice"]
        cid, coin = max(self.ledger.coins_of(alice.owners).items(), key=lambda i: i[1].value_msat)
        amount = coin.value_msat - FEE_MSAT
        to_bob = alice.pay({cid: coin}, self.wallets["bob"].fresh_address(), amount, FEE_MSAT)
        to_carol = alice.pay({cid: coin}, self.wallets["carol"].fresh_address(), amount, FEE_MSAT)
        coordinator = self.ledger.state_of(cid)
        coordinator.prepare(to_bob)
        refused_in_flight = self.refused(to_carol, "while the first is in flight the second")
        coordinator.abort(to_bob.txid)
        self.ledger.submit(to_bob)
        self.say(f"  the first commits: txid {to_bob.txid.hex()[:16]}…")
        return refused_in_flight and self.refused(to_carol, "the second")

    def refused(self, tx: Transaction, what: str) -> bool:
        """Submit a spend that must fail; say why it did (or that it wrongly did not)."""
        try:
            self.ledger.submit(tx)
        except ConstellationError as exc:
            self.say(f"  {what} is refused: [{exc.code}] {exc}")
            return True
        self.say(f"  BUG: {what} was accepted")
        return False

    def report(self) -> None:
        self.say("\nbalances:")
        for name in NAMES:
            coins = len(self.ledger.coins_of(self.wallets[name].owners))
            self.say(f"  {name:<6} {format_msat(self.balance(name)):>18}  {coins} coins")
        self.ledger.check_invariants()
        total = self.ledger.total_msat + self.ledger.fees_msat
        self.say(f"  fees   {format_msat(self.ledger.fees_msat):>18}")
        self.say(
            f"  total  {format_msat(total):>18}  = issued {format_msat(self.ledger.issued_msat)}:"
            " value conserved, no lock held"
        )


def run_demo(workers: int, payments: int, seed: int | None, out: TextIO) -> int:
    """Run the demo; returns the process exit code (non-zero if the ledger misbehaved)."""
    demo = Demo(workers, seed, out)
    demo.setup()
    demo.payments(payments)
    ok = demo.double_spend()
    demo.report()
    return 0 if ok else 1
