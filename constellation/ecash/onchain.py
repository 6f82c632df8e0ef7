"""On-chain withdrawals from the guild's funds that a mint holds (NUT-30 melts): which
coins to spend, the transaction, its fee, and what each guild signer is asked to sign.

Pure: the mint's service picks the coins it holds from its database, asks the signers,
sends the result and keeps the records. Sizes are BIP141 weights: every input a key-path
taproot spend (one 64-byte signature), every output its script.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from constellation.bitcoin import BitcoinTx, SpendInput, SpendOutput, TxIn, compact_size
from constellation.guild import OnchainSpend

TX_VERSION = 2
SEQUENCE = 0xFFFFFFFD  # final, replaceable (BIP125): a stuck withdrawal can be bumped
OVERHEAD_WU = 4 * (4 + 4) + 2  # version, locktime; segwit marker and flag (and the counts)
INPUT_WU = 4 * (32 + 4 + 1 + 4) + (1 + 1 + 64)  # outpoint, empty scriptSig, sequence; witness
DUST_SAT = 330  # the least a taproot output may carry (Bitcoin Core's dust limit for it)
# a sweep's inputs in one transaction: 500 x INPUT_WU is 115,000 weight units, well within
# the 400,000 Bitcoin Core relays in one (a standard transaction)
MAX_SWEEP_INPUTS = 500
# What a withdrawal pays to: P2WPKH, P2WSH and P2TR, whose outputs Bitcoin Core relays
# at DUST_SAT (P2WPKH's limit is lower). Other witness programs are standard too, but a
# longer one has a higher dust limit and a 2-byte one can make a transaction Core finds
# too small to relay: either would stay unsent, and the melt pending, for good.
STANDARD = ((0x00, 20), (0x00, 32), (0x51, 32))
_P2TR = bytes([0x51, 32]) + bytes(32)  # a taproot output's script, for its size


def check_destination(script: bytes) -> None:
    """``ValueError`` unless ``script`` pays to one of the ``STANDARD`` kinds."""
    if len(script) < 2 or (script[0], script[1]) not in STANDARD or len(script) != 2 + script[1]:
        raise ValueError("pays neither P2WPKH, P2WSH nor P2TR (the kinds withdrawals pay)")


class Coin(NamedTuple):
    """An output of the guild's that the mint holds."""

    txid: str  # as Bitcoin shows it
    vout: int
    amount_sat: int
    script: bytes
    label: bytes  # its address among the holder's (``guild.owned_derivation``)
    key: bytes = b""  # the guild key it is under (33 bytes): the one that signs for it


class Withdrawal(NamedTuple):
    tx: BitcoinTx  # unsigned
    spent: list[Coin]
    fee_sat: int
    change_sat: int  # 0: no change output


def output_wu(script: bytes) -> int:
    return 4 * (8 + 1 + len(script))


def vsize(inputs: int, output_scripts: Sequence[bytes]) -> int:
    """The virtual size of a transaction of ``inputs`` guild inputs and these outputs
    (its weight over 4, rounded up)."""
    counts = len(compact_size(inputs)) + len(compact_size(len(output_scripts)))
    weight = OVERHEAD_WU + 4 * counts + inputs * INPUT_WU
    weight += sum(output_wu(s) for s in output_scripts)
    return -(-weight // 4)


def fee_sat(inputs: int, output_scripts: Sequence[bytes], feerate: int) -> int:
    """The fee of such a transaction at ``feerate`` sat/vB."""
    return vsize(inputs, output_scripts) * feerate


def movable_sat(feerate: int) -> int:
    """The least a guild coin must carry to be moved on its own (``sweep``: one input to
    one P2TR output, after a change of members) at ``feerate`` sat/vB, its output over
    dust. A coin with less, at the least feerate the mint builds at, can only ever be
    moved beside another that pays for it: the mint makes none (``plan``, ``bump``)."""
    return DUST_SAT + fee_sat(1, [_P2TR], feerate)


def plan(
    coins: Sequence[Coin],
    destination: bytes,
    amount_sat: int,
    change: bytes,
    feerate: int,
    max_fee_sat: int,
    least_change_sat: int = DUST_SAT,
) -> Withdrawal | None:
    """Pay ``amount_sat`` to the script ``destination`` from ``coins`` (the largest
    first), the rest back to ``change``, at ``feerate``, for at most ``max_fee_sat``;
    None where the coins or the fee limit do not allow it. A rest below
    ``least_change_sat`` (``movable_sat`` of the least feerate: what a coin needs to be
    moved on its own after a change of members) goes to the fee, within
    ``max_fee_sat``; where that would pass it, a rest over the dust limit is still
    change (a coin that moves beside another), and one below it goes to the fee."""
    picked: list[Coin] = []
    total = 0
    for coin in sorted(coins, key=lambda c: (-c.amount_sat, c.txid, c.vout)):
        picked.append(coin)
        total += coin.amount_sat
        bare = fee_sat(len(picked), [destination], feerate)  # without change
        if bare > max_fee_sat:
            return None
        if total >= amount_sat + bare:
            break
    else:
        return None
    fee = fee_sat(len(picked), [destination, change], feerate)
    left = total - amount_sat - fee
    folded = total - amount_sat  # the fee where what is left is the miner's
    outputs = [SpendOutput(amount_sat, destination)]
    least = least_change_sat if folded <= max_fee_sat else DUST_SAT
    if left >= max(least, DUST_SAT) and fee <= max_fee_sat:
        outputs.append(SpendOutput(left, change))
    else:  # what is left is too little for an output of its own: the miner's
        fee, left = folded, 0
        if fee > max_fee_sat:
            return None
    inputs = [TxIn(bytes.fromhex(c.txid)[::-1], c.vout, SEQUENCE) for c in picked]
    return Withdrawal(BitcoinTx(TX_VERSION, 0, inputs, outputs), picked, fee, left)


def sweep(
    coins: Sequence[Coin],
    destination: bytes,
    feerate: int,
    max_fee_sat: int,
    max_inputs: int = MAX_SWEEP_INPUTS,
) -> Withdrawal | None:
    """Move ``coins`` to the script ``destination`` (a new guild key's output, after a
    change of members), less the fee at ``feerate``, in as many transactions as it takes
    (the next taking those left): this one of at most ``max_inputs`` inputs and
    ``max_fee_sat`` of fee. Its coins are taken from both ends by value (the largest,
    the smallest, the next largest...), so that small coins, some worth less than their
    input costs, go with large ones that pay for them rather than being left for a last
    transaction that could not; where those taken would leave dust, the ones worth less
    than their input are left out. None where there are none, or no output over dust
    can be made."""
    by_value = sorted(coins, key=lambda c: (-c.amount_sat, c.txid, c.vout))
    picked: list[Coin] = []
    large, small = 0, len(by_value) - 1
    while large <= small and len(picked) < max_inputs:
        if fee_sat(len(picked) + 1, [destination], feerate) > max_fee_sat:
            break
        if len(picked) % 2 == 0:
            picked.append(by_value[large])
            large += 1
        else:
            picked.append(by_value[small])
            small -= 1
    if _left(picked, destination, feerate) < DUST_SAT:
        input_sat = -(-INPUT_WU * feerate // 4)
        picked = [c for c in picked if c.amount_sat > input_sat]
    if not picked or _left(picked, destination, feerate) < DUST_SAT:
        return None
    picked.sort(key=lambda c: (c.txid, c.vout))
    fee = fee_sat(len(picked), [destination], feerate)
    inputs = [TxIn(bytes.fromhex(c.txid)[::-1], c.vout, SEQUENCE) for c in picked]
    outputs = [SpendOutput(sum(c.amount_sat for c in picked) - fee, destination)]
    return Withdrawal(BitcoinTx(TX_VERSION, 0, inputs, outputs), picked, fee, 0)


def _left(coins: Sequence[Coin], destination: bytes, feerate: int) -> int:
    """What a sweep of ``coins`` leaves its output, its fee paid."""
    return sum(c.amount_sat for c in coins) - fee_sat(len(coins), [destination], feerate)


def bump(
    coin: Coin,
    destination: bytes,
    package_fee_sat: int,
    package_vsize: int,
    feerate: int,
    max_fee_sat: int,
    least_sat: int = DUST_SAT,
) -> Withdrawal | None:
    """A child of a transaction in no block (child pays for parent): it spends ``coin``,
    our output of it, to ``destination``, with a fee that takes the package (the
    transactions of ours in no block it descends from: their fees and virtual sizes, and
    itself) to ``feerate``, as miners take a transaction with its ancestors. None where
    the package pays that already, or the fee would pass ``max_fee_sat`` or leave an
    output of less than ``least_sat`` (``movable_sat`` of the least feerate, as change:
    ``plan``; never less than dust)."""
    if package_fee_sat >= package_vsize * feerate:
        return None
    fee = (package_vsize + vsize(1, [destination])) * feerate - package_fee_sat
    if fee > max_fee_sat or coin.amount_sat - fee < max(least_sat, DUST_SAT):
        return None
    inputs = [TxIn(bytes.fromhex(coin.txid)[::-1], coin.vout, SEQUENCE)]
    outputs = [SpendOutput(coin.amount_sat - fee, destination)]
    return Withdrawal(BitcoinTx(TX_VERSION, 0, inputs, outputs), [coin], fee, 0)


def spend_requests(tx: BitcoinTx, coins: Sequence[Coin]) -> list[OnchainSpend]:
    """What the guild signs for each input of ``tx`` (spending ``coins``, in order): the
    transaction, every output it spends, and the input's label."""
    spent = [
        SpendInput(i.txid, i.vout, i.sequence, c.amount_sat, c.script)
        for i, c in zip(tx.inputs, coins, strict=True)
    ]
    return [
        OnchainSpend(tx.version, tx.locktime, spent, list(tx.outputs), k, c.label)
        for k, c in enumerate(coins)
    ]


def signed(tx: BitcoinTx, signatures: Sequence[bytes]) -> BitcoinTx:
    """The transaction with each input's key-path signature as its witness."""
    inputs = [
        TxIn(i.txid, i.vout, i.sequence, [sig])
        for i, sig in zip(tx.inputs, signatures, strict=True)
    ]
    return BitcoinTx(tx.version, tx.locktime, inputs, list(tx.outputs))
