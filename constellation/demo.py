"""``constellation demo``: a whole ledger in one process, told step by step.

Uses the same core as the services: wallets from BIP39 words, a genesis issuance,
two-phase commit across simulated workers, and the ledger's own refusals.
"""

from __future__ import annotations

import random
from typing import TextIO

from constellation.address import Network
from constellation.amount import format_msat
from constellation.errors import ConstellationError, InsufficientFunds
from constellation.keys import SigningKey
from constellation.ledger import LocalLedger
from constellation.tx import Issuance, TxOutput, partition_of
from constellation.wallet import Wallet

NAMES = ("alice", "bob", "carol", "dave")
FEE_MSAT = 1_000


def run_demo(workers: int, payments: int, seed: int | None, out: TextIO) -> int:
    rng = random.Random(seed)

    def say(line: str = "") -> None:
        print(line, file=out)

    net = Network.REGTEST
    operator = SigningKey(rng.randbytes(32)) if seed is not None else SigningKey.generate()
    ledger = LocalLedger(workers, issuers=[operator.pubkey])
    say(f"ledger: {workers} workers, partitions split {[f'{r.start}..{r.stop - 1}' for r in ledger.ranges]}")

    wallets = {name: Wallet(rng.randbytes(32), net) for name in NAMES}
    for name, wallet in wallets.items():
        say(f"wallet {name:<6} address {wallet.fresh_address()}")

    genesis = Issuance(
        operator.pubkey,
        nonce=0,
        outputs=[
            TxOutput(1_000_000_000, wallets["alice"].fresh_key().pubkey),
            TxOutput(500_000_000, wallets["bob"].fresh_key().pubkey),
        ],
    ).signed_by(operator.secret)
    ledger.issue(genesis)
    say(f"genesis: operator issued {format_msat(genesis.total_msat)} to alice and bob")

    def balance(name: str) -> int:
        return ledger.balance_msat(wallets[name].owners)

    def pay(src: str, dst: str, amount_msat: int) -> None:
        wallet = wallets[src]
        tx = wallet.pay(ledger.coins_of(wallet.owners), wallets[dst].fresh_address(),
                        amount_msat, FEE_MSAT)
        ledger.submit(tx)

    say()
    say("payments:")
    first = wallets["alice"]
    tx = first.pay(ledger.coins_of(first.owners), wallets["bob"].fresh_address(),
                   250_000_000, FEE_MSAT)
    votes = ledger.submit(tx)
    parts = sorted({partition_of(c) for c, _ in tx.inputs} | {partition_of(c) for c in tx.output_coin_ids()})
    say(f"  alice -> bob 250,000 sat  txid {tx.txid.hex()[:16]}…  partitions {parts}  "
        f"workers {ledger.participants(tx)} ({len(votes)}-party commit)")

    made = refused = 0
    for _ in range(payments):
        src, dst = rng.sample(NAMES, 2)
        amount = rng.randrange(1_000, max(1_001, balance(src) // 3 + 1))
        try:
            pay(src, dst, amount)
            made += 1
        except InsufficientFunds:
            refused += 1
    say(f"  {made} random payments committed, {refused} refused for lack of funds")

    say()
    say("double spend:")
    alice = wallets["alice"]
    coins = ledger.coins_of(alice.owners)
    cid, coin = max(coins.items(), key=lambda item: item[1].value_msat)
    spend = {cid: coin}
    to_bob = alice.pay(spend, wallets["bob"].fresh_address(), coin.value_msat - FEE_MSAT, FEE_MSAT)
    to_carol = alice.pay(spend, wallets["carol"].fresh_address(), coin.value_msat - FEE_MSAT, FEE_MSAT)
    coordinator = ledger.state_of(cid)
    coordinator.prepare(to_bob)
    try:
        ledger.submit(to_carol)
    except ConstellationError as exc:
        say(f"  while the first is in flight, the second is refused: [{exc.code}] {exc}")
    coordinator.abort(to_bob.txid)
    ledger.submit(to_bob)
    say(f"  the first commits: {to_bob.txid.hex()[:16]}…")
    try:
        ledger.submit(to_carol)
        say("  BUG: the second spend was accepted")
        return 1
    except ConstellationError as exc:
        say(f"  the second is refused: [{exc.code}] {exc}")

    say()
    say("balances:")
    for name in NAMES:
        say(f"  {name:<6} {format_msat(balance(name)):>18}  {len(ledger.coins_of(wallets[name].owners))} coins")
    ledger.check_invariants()
    say(f"  fees   {format_msat(ledger.fees_msat):>18}")
    say(f"  total  {format_msat(ledger.total_msat + ledger.fees_msat):>18}  "
        f"= issued {format_msat(ledger.issued_msat)}: value conserved, no lock held")
    return 0
