"""The simulated chain's outputs that belong to no node, and the transactions that
spend them: what a guild's on-chain funds live in.

The nodes' own wallets are the network's (``Node.utxos``). An output paid to any other
address (a node's ``withdraw`` to it, or a transaction sent raw) is a ``Coin`` here,
spendable only by a transaction sent raw whose every input is a key-path taproot spend
with a valid BIP340 signature over its BIP341 signature hash, as Bitcoin checks it.
Every block mined begins with its coinbase; one that pays an address (bitcoind's
``generatetoaddress``) is a coin, spent ``COINBASE_MATURITY`` blocks after its own or later.
``rpc`` serves it as bitcoind's JSON-RPC does (blocks, transactions, ``gettxout``,
``getmempoolentry``, ``sendrawtransaction``), which is how the guild's mint follows it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from constellation.bitcoin import (
    BitcoinTx,
    SpendInput,
    SpendOutput,
    p2tr_script,
    parse_tx,
    taproot_sighash,
)
from constellation.errors import DecodeError
from constellation.keys import schnorr_verify

MIN_FEERATE = 1  # sat/vB: less is not relayed
COIN = Decimal(100_000_000)
COINBASE_MATURITY = 100  # Bitcoin's: block h's coinbase is spent in block h + 100 or later
COINBASE_SAT = 5_000_000_000  # every block's reward: regtest's first 50 BTC, never halved
# the simulator's own miner, whom each block pays unless told otherwise: a key nobody holds
MINER_SCRIPT = p2tr_script(hashlib.sha256(b"lnsim miner").digest())
# bitcoind's error codes
RPC_MISC_ERROR = -1
RPC_TYPE_ERROR = -3
RPC_INVALID_PARAMETER = -8
RPC_METHOD_NOT_FOUND = -32601
RPC_DESERIALIZATION_ERROR = -22
RPC_VERIFY_ERROR = -25
RPC_VERIFY_REJECTED = -26
RPC_VERIFY_ALREADY_IN_CHAIN = -27
RPC_INVALID_ADDRESS_OR_KEY = -5


class ChainError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Coin:
    amount_sat: int
    script: bytes
    spent_by: str | None = None


@dataclass
class ChainTx:
    txid: str
    outputs: list[SpendOutput]
    inputs: list[tuple[str, int]]  # outpoints (txid as shown, vout); none: a node's wallet
    raw: bytes | None  # what was sent raw; None: a node wallet's (not rendered) or a coinbase
    height: int | None = None
    fee_sat: int | None = None  # of one sent raw (None: a node wallet's, mined at once)
    vsize: int = 0
    coinbase: bool = False


@dataclass
class Chain:
    """Coins of no node, by outpoint, and the transactions that made them."""

    owner_of_script: Callable[[bytes], str | None]  # the node a script pays, if any
    txs: dict[str, ChainTx] = field(default_factory=dict)
    coins: dict[tuple[str, int], Coin] = field(default_factory=dict)
    blocks: dict[int, list[str]] = field(default_factory=dict)  # height: txids confirmed
    height: int = 0  # the last block mined: a coinbase's maturity counts to the next

    @property
    def unspent_sat(self) -> int:
        return sum(c.amount_sat for c in self.coins.values() if c.spent_by is None)

    def paid(self, txid: str, outputs: list[SpendOutput], inputs: list[tuple[str, int]]) -> None:
        """A transaction is on its way: its outputs to no node become coins."""
        self.txs[txid] = ChainTx(txid, outputs, inputs, None)
        for vout, out in enumerate(outputs):
            if self.owner_of_script(out.script_pubkey) is None:
                self.coins[(txid, vout)] = Coin(out.amount_sat, out.script_pubkey)

    def check(self, raw: bytes) -> tuple[BitcoinTx, int]:
        """Parse and verify a transaction sent raw (raises ChainError as bitcoind would);
        returns it and its fee."""
        try:
            tx = parse_tx(raw)
        except DecodeError as exc:
            raise ChainError(RPC_DESERIALIZATION_ERROR, f"TX decode failed: {exc}") from None
        known = self.txs.get(tx.txid)
        if known is not None and known.height is not None:
            # Bitcoin Core finds a transaction in the chain by its outputs in the UTXO set
            # (BroadcastTransaction): once every one is spent in a block, it is checked
            # as a new one, whose inputs are spent
            if any(self.unspent_in_chain(tx.txid, n) for n in range(len(known.outputs))):
                raise ChainError(RPC_VERIFY_ALREADY_IN_CHAIN, "Transaction already in block chain")
            raise ChainError(RPC_VERIFY_ERROR, "bad-txns-inputs-missingorspent")
        if len({(i.txid, i.vout) for i in tx.inputs}) != len(tx.inputs):
            raise ChainError(RPC_VERIFY_REJECTED, "bad-txns-inputs-duplicate")
        spent = []
        for i in tx.inputs:
            coin = self.coins.get((i.txid[::-1].hex(), i.vout))
            if coin is None or (coin.spent_by not in (None, tx.txid)):
                raise ChainError(RPC_VERIFY_ERROR, "bad-txns-inputs-missingorspent")
            made = self.txs[i.txid[::-1].hex()]
            depth = self.height + 1 - (made.height or 0)  # as bitcoind counts: in the next block
            if made.coinbase and depth < COINBASE_MATURITY:
                raise ChainError(
                    RPC_VERIFY_REJECTED,
                    "bad-txns-premature-spend-of-coinbase,"
                    f" tried to spend coinbase at depth {depth}",
                )
            spent.append(SpendInput(i.txid, i.vout, i.sequence, coin.amount_sat, coin.script))
        fee = sum(c.amount_sat for c in spent) - sum(o.amount_sat for o in tx.outputs)
        if fee < 0:
            raise ChainError(RPC_VERIFY_REJECTED, "bad-txns-in-belowout")
        if any(o.amount_sat < 0 for o in tx.outputs) or not tx.outputs:
            raise ChainError(RPC_VERIFY_REJECTED, "bad-txns-vout-empty or negative")
        if fee < tx.vsize * MIN_FEERATE:
            raise ChainError(RPC_VERIFY_REJECTED, "min relay fee not met")
        for index, (i, prev) in enumerate(zip(tx.inputs, spent, strict=True)):
            if len(prev.script_pubkey) != 34 or prev.script_pubkey[:2] != b"\x51\x20":
                raise ChainError(RPC_VERIFY_REJECTED, "only key-path taproot spends are checked")
            msg = taproot_sighash(tx.version, tx.locktime, spent, tx.outputs, index)
            if len(i.witness) != 1 or not schnorr_verify(prev.script_pubkey[2:], msg, i.witness[0]):
                raise ChainError(
                    RPC_VERIFY_REJECTED,
                    "mandatory-script-verify-flag-failed (Invalid Schnorr signature)",
                )
        return tx, fee

    def unspent_in_chain(self, txid: str, vout: int) -> bool:
        """Whether output ``vout`` of ``txid`` (in a block) is in the chain's UTXO set: not
        spent by a transaction in a block (a spend in the mempool leaves it there), and
        spendable (an OP_RETURN output never is). One to a node is taken for unspent:
        the nodes' wallets spend theirs where this chain does not see it."""
        out = self.txs[txid].outputs[vout]
        if out.script_pubkey[:1] == b"\x6a":
            return False
        coin = self.coins.get((txid, vout))
        if coin is None:
            return self.owner_of_script(out.script_pubkey) is not None
        spender = self.txs.get(coin.spent_by) if coin.spent_by is not None else None
        return spender is None or spender.height is None

    def send(self, raw: bytes) -> tuple[BitcoinTx, int, bool]:
        """Take a verified transaction into the mempool: its inputs spent, its outputs
        to no node made coins. Returns it, its fee, and whether it is new (a resend of
        one in the mempool changes nothing)."""
        tx, fee = self.check(raw)
        if tx.txid in self.txs:
            return tx, fee, False
        outpoints = [(i.txid[::-1].hex(), i.vout) for i in tx.inputs]
        for outpoint in outpoints:
            self.coins[outpoint].spent_by = tx.txid
        self.paid(tx.txid, list(tx.outputs), outpoints)
        self.txs[tx.txid].raw = tx.serialize()
        self.txs[tx.txid].fee_sat, self.txs[tx.txid].vsize = fee, tx.vsize
        return tx, fee, True

    def mine(self, height: int, feerate: float = MIN_FEERATE) -> None:
        """Into the block at ``height``, each mempool transaction whose package (it and
        its ancestors in no block yet) pays at least ``feerate`` (the market's) together,
        as Bitcoin Core mines by ancestor feerate: a child may pay for its parent (CPFP).
        The rest waits for a block that takes it."""
        block: list[str] = []
        for t in self.txs.values():  # in the order sent: a parent before its child
            package = self.unmined(t, [])
            raw = [p for p in package if p.fee_sat is not None]
            if raw and sum(p.fee_sat or 0 for p in raw) < feerate * sum(p.vsize for p in raw):
                continue
            for p in package:
                p.height = height
                block.append(p.txid)
        self.blocks[height] = block

    def unmined(self, t: ChainTx, found: list[ChainTx]) -> list[ChainTx]:
        """``t`` and its ancestors in no block, each after its parents."""
        if t.height is None and all(f is not t for f in found):
            for txid, _ in t.inputs:
                if txid in self.txs:
                    self.unmined(self.txs[txid], found)
            found.append(t)
        return found

    def coinbase(self, height: int, script: bytes) -> int:
        """The block at ``height`` begins with its coinbase, paying ``COINBASE_SAT`` to
        ``script``. Returns what it made a coin of: nothing where it pays the simulator's
        miner (``MINER_SCRIPT``), whose rewards are nobody's here and never spent, so they
        stay out of the coins and the books; a reward to an address is a coin (money
        made, which the network's books count as minted)."""
        assert self.owner_of_script(script) is None, "a node's wallet keeps no coinbase"
        txid = hashlib.sha256(b"lnsim coinbase %d" % height).digest()[::-1].hex()
        outputs = [SpendOutput(COINBASE_SAT, script)]
        self.txs[txid] = ChainTx(txid, outputs, [], None, height, coinbase=True)
        self.blocks.setdefault(height, []).insert(0, txid)
        self.height = height
        if script == MINER_SCRIPT:
            return 0
        self.coins[(txid, 0)] = Coin(COINBASE_SAT, script)
        return COINBASE_SAT


def block_hash(height: int) -> str:
    return hashlib.sha256(b"lnsim block %d" % height).digest()[::-1].hex()


def btc(sat: int) -> Decimal:
    return Decimal(sat) / COIN
