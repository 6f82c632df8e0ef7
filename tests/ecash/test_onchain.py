"""On-chain withdrawals, pure: the plan (coins, fee, change), what each signer is asked,
and the transaction the guild signs, checked as Bitcoin checks it (the simulated chain's
``Chain``), with a FROST key dealt here and every signer's own derivation of the sighash.
"""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.bitcoin import SpendOutput, address_script, p2tr_script, parse_tx
from constellation.ecash import onchain as oc
from constellation.errors import RequestRefused
from constellation.guild import derive, guild_output, owned_derivation
from services.lnsim.chain import Chain, ChainError
from tests.crypto.dealer import deal
from tests.crypto.test_frost import run_session

GROUP, SHARES = deal(3, 2, random.Random(7))
DESTINATION = b"\x00\x14" + b"\x11" * 20  # a P2WPKH output
FEERATE = 2


ME = b"\x30" * 32  # the member whose mint holds the coins (its x-only host key)


def label(k: int) -> bytes:
    return bytes([k]) * 32


def coin(k: int, sat: int) -> oc.Coin:
    key = guild_output(GROUP.thresh_pk, owned_derivation(ME, label(k))).xonly
    return oc.Coin(f"{k:064x}", k % 3, sat, p2tr_script(key), label(k))


CHANGE = p2tr_script(guild_output(GROUP.thresh_pk, owned_derivation(ME, b"\xcc" * 32)).xonly)


def sign_all(w: oc.Withdrawal) -> bytes:
    """Each input signed as a signer would: ``derive`` checks the request (of the member
    that holds the coins) and gives the message and tweaks; two of three shares sign."""
    sigs = []
    for request in oc.spend_requests(w.tx, w.spent):
        d = derive(request, GROUP.thresh_pk, ME)
        sigs.append(run_session(GROUP, SHARES, [0, 2], d.msg, d.tweaks, d.is_xonly))
    return oc.signed(w.tx, sigs).serialize()


def chain_of(coins: list[oc.Coin]) -> Chain:
    chain = Chain(lambda _: None)
    for c in coins:
        chain.paid(
            c.txid, [*[SpendOutput(0, b"\x6a")] * c.vout, SpendOutput(c.amount_sat, c.script)], []
        )
    return chain


def test_a_withdrawal_the_guild_signs_is_valid_on_the_chain() -> None:
    coins = [coin(1, 40_000), coin(2, 25_000), coin(3, 9_000)]
    w = oc.plan(coins, DESTINATION, 50_000, CHANGE, FEERATE, 10_000)
    assert w is not None
    assert [c.amount_sat for c in w.spent] == [40_000, 25_000]  # the largest first
    assert sum(c.amount_sat for c in w.spent) == 50_000 + w.change_sat + w.fee_sat
    raw = sign_all(w)
    tx, fee = chain_of(coins).check(raw)
    assert fee == w.fee_sat and tx.txid == w.tx.txid  # witnesses do not change the txid
    assert w.fee_sat == tx.vsize * FEERATE  # the planned size is the signed size
    assert parse_tx(raw) == tx


def test_a_signature_for_another_input_or_key_is_refused_by_the_chain() -> None:
    coins = [coin(1, 40_000), coin(2, 25_000)]
    w = oc.plan(coins, DESTINATION, 50_000, CHANGE, FEERATE, 10_000)
    assert w is not None
    signed = parse_tx(sign_all(w))
    swapped = oc.signed(w.tx, [signed.inputs[1].witness[0], signed.inputs[0].witness[0]])
    with pytest.raises(ChainError, match="Invalid Schnorr signature"):
        chain_of(coins).check(swapped.serialize())


def test_the_signer_refuses_a_label_that_is_not_the_inputs_or_another_member_s() -> None:
    w = oc.plan([coin(1, 40_000)], DESTINATION, 30_000, CHANGE, FEERATE, 10_000)
    assert w is not None
    [request] = oc.spend_requests(w.tx, w.spent)
    moved = msgspec.structs.replace(request, label=label(2))
    with pytest.raises(RequestRefused, match="not a guild output the requester holds"):
        derive(moved, GROUP.thresh_pk, ME)
    with pytest.raises(RequestRefused, match="not a guild output the requester holds"):
        derive(request, GROUP.thresh_pk, b"\x31" * 32)  # another member: not its coin
    with pytest.raises(RequestRefused, match="32 bytes"):
        derive(msgspec.structs.replace(request, label=b"\x01"), GROUP.thresh_pk, ME)


def test_dust_change_goes_to_the_fee_and_limits_refuse() -> None:
    coins = [coin(1, 30_500)]
    fee2 = oc.fee_sat(1, [DESTINATION, CHANGE], FEERATE)
    w = oc.plan(coins, DESTINATION, 30_500 - fee2 - 100, CHANGE, FEERATE, 10_000)
    assert w is not None and w.change_sat == 0 and len(w.tx.outputs) == 1
    assert w.fee_sat == fee2 + 100
    assert oc.plan(coins, DESTINATION, 30_500, CHANGE, FEERATE, 10_000) is None  # short
    assert oc.plan(coins, DESTINATION, 100, CHANGE, FEERATE, fee2 - 1) is None  # fee limit


@given(
    st.lists(st.integers(oc.DUST_SAT, 10**8), min_size=1, max_size=8),
    st.integers(oc.DUST_SAT, 10**8),
    st.integers(1, 50),
)
@settings(max_examples=200, deadline=None)
def test_a_plan_conserves_value_and_pays_its_rate(
    amounts: list[int], amount: int, feerate: int
) -> None:
    coins = [coin(k + 1, a) for k, a in enumerate(amounts)]
    w = oc.plan(coins, DESTINATION, amount, CHANGE, feerate, 10**9)
    if w is None:
        assert sum(amounts) < amount + oc.fee_sat(len(amounts), [DESTINATION], feerate)
        return
    spent = sum(c.amount_sat for c in w.spent)
    assert spent == amount + w.change_sat + w.fee_sat
    assert w.tx.outputs[0].amount_sat == amount
    assert w.change_sat == 0 or w.change_sat >= oc.DUST_SAT
    dummy = oc.signed(w.tx, [b"\x00" * 64] * len(w.spent))
    assert w.fee_sat >= dummy.vsize * feerate


def test_a_withdrawal_pays_only_the_kinds_of_output_bitcoin_core_relays_at_its_dust_limit() -> None:
    """A 40-byte witness program's dust limit is above DUST_SAT, and a 2-byte one can make
    a transaction too small to relay: either would leave the melt pending for good."""
    key = bytes(range(32))
    for address in (
        "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",  # P2WPKH (BIP173)
        "bc1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qccfmv3",  # P2WSH
    ):
        oc.check_destination(address_script(address, "bc"))
    oc.check_destination(p2tr_script(key))
    for version, program in ((1, bytes(40)), (1, bytes(2)), (2, bytes(32)), (0, bytes(21))):
        script = bytes([0x50 + version if version else 0, len(program)]) + program
        with pytest.raises(ValueError, match="neither P2WPKH, P2WSH nor P2TR"):
            oc.check_destination(script)
    with pytest.raises(ValueError):
        oc.check_destination(p2tr_script(key) + b"\x00")  # its length says otherwise


def test_a_child_takes_a_stuck_withdrawal_to_the_market_s_feerate() -> None:
    """A withdrawal sent at 2 sat/vB stays in no block of a market at 30; a child of its
    change (``bump``), signed by the guild, is valid, and with it the two pay 30 sat/vB
    together: the next block takes both. A package that pays the rate already, a fee
    over the limit, or a child left with dust gets no child."""
    coins = [coin(1, 100_000)]
    chain = chain_of(coins)
    w = oc.plan(coins, DESTINATION, 40_000, CHANGE, FEERATE, 10_000)
    assert w is not None and w.change_sat > 0
    sent = parse_tx(sign_all(w))
    chain.send(sent.serialize())
    chain.mine(1, 30)
    assert chain.txs[sent.txid].height is None
    change = oc.Coin(sent.txid, 1, w.change_sat, CHANGE, b"\xcc" * 32)
    child = oc.bump(change, CHANGE, w.fee_sat, sent.vsize, 30, 10_000)
    assert child is not None and child.spent == [change]
    signed = parse_tx(sign_all(child))
    chain.send(signed.serialize())
    assert (w.fee_sat + child.fee_sat) >= 30 * (sent.vsize + signed.vsize)
    assert signed.outputs[0].amount_sat == w.change_sat - child.fee_sat
    chain.mine(2, 30)
    assert chain.txs[sent.txid].height == 2 and chain.txs[signed.txid].height == 2
    assert oc.bump(change, CHANGE, w.fee_sat, sent.vsize, FEERATE, 10_000) is None  # pays it
    assert oc.bump(change, CHANGE, w.fee_sat, sent.vsize, 30, child.fee_sat - 1) is None
    small = oc.Coin(sent.txid, 1, child.fee_sat + oc.DUST_SAT - 1, CHANGE, b"\xcc" * 32)
    assert oc.bump(small, CHANGE, w.fee_sat, sent.vsize, 30, 10_000) is None  # dust left


def test_a_sweep_moves_every_coin_in_transactions_a_node_relays() -> None:
    """A mint with more coins than one move's transaction takes (its inputs, its fee
    limit) moves them in several, the next taking those left, until none is left; each
    one Bitcoin Core relays, at the feerate. Coins worth less than their input go with
    large ones that pay for them, not left stranded; alone they never make a move."""

    def moves(coins: list[oc.Coin], feerate: int) -> list[oc.Withdrawal]:
        left, done = list(coins), []
        while w := oc.sweep(left, CHANGE, feerate, 50_000):
            assert w.fee_sat <= 50_000 and len(w.spent) <= oc.MAX_SWEEP_INPUTS
            assert w.tx.outputs[0].amount_sat == sum(c.amount_sat for c in w.spent) - w.fee_sat
            assert w.tx.outputs[0].amount_sat >= oc.DUST_SAT
            signed = oc.signed(w.tx, [b"\x00" * 64] * len(w.spent))
            assert w.fee_sat == signed.vsize * feerate and signed.vsize * 4 <= 400_000
            left = [c for c in left if c not in w.spent]
            done.append(w)
        return done

    coins = [oc.Coin(f"{i:064x}", i % 3, 10_000 + i, CHANGE, label(1)) for i in range(1_200)]
    assert [len(w.spent) for w in moves(coins, 1)] == [500, 500, 200]  # the inputs' count
    busy = moves(coins, 20)  # the fee limit bounds each: one input more would pass it
    assert sum(len(w.spent) for w in busy) == 1_200
    assert oc.fee_sat(len(busy[0].spent) + 1, [CHANGE], 20) > 50_000
    # at 20 sat/vB an input costs 1,150 sat: the 1,000-sat coins go with the large ones
    mixed = [
        oc.Coin(f"{i:064x}", 0, 100_000 if i < 30 else 1_000, CHANGE, label(1)) for i in range(60)
    ]
    assert sum(len(w.spent) for w in moves(mixed, 20)) == 60
    # ...where they would leave dust, they are left out; alone, they never move
    few = [oc.Coin(f"{i:064x}", 0, 3_000 if i == 0 else 500, CHANGE, label(1)) for i in range(41)]
    [w] = moves(few, 20)
    assert [c.amount_sat for c in w.spent] == [3_000]
    assert oc.sweep([], CHANGE, FEERATE, 50_000) is None


def test_every_coin_the_mint_makes_can_be_moved_on_its_own_at_the_least_feerate() -> None:
    """A change or a child's output under ``movable_sat`` of the least feerate could be
    moved after a change of members only beside another coin: a rest under it goes to
    the fee while the fee limit takes it (as dust does); where it would not, it is still
    change rather than a refused withdrawal. A child leaves no less."""
    least = oc.movable_sat(FEERATE)
    assert least == oc.DUST_SAT + oc.fee_sat(1, [CHANGE], FEERATE)
    assert oc.sweep([coin(9, least)], CHANGE, FEERATE, 50_000) is not None
    assert oc.sweep([coin(9, least - 1)], CHANGE, FEERATE, 50_000) is None
    coins = [coin(1, 100_000)]
    fee2 = oc.fee_sat(1, [DESTINATION, CHANGE], FEERATE)
    amount = 100_000 - fee2 - (least - 1)  # a rest over dust, too small to move alone
    w = oc.plan(coins, DESTINATION, amount, CHANGE, FEERATE, 10_000, least)
    assert w is not None and w.change_sat == 0 and len(w.tx.outputs) == 1
    assert w.fee_sat == 100_000 - amount  # the miner's, paid from the melt's fee reserve
    w = oc.plan(coins, DESTINATION, amount - 1, CHANGE, FEERATE, 10_000, least)
    assert w is not None and w.change_sat == least and w.fee_sat == fee2
    w = oc.plan(coins, DESTINATION, amount, CHANGE, FEERATE, fee2 + least - 2, least)
    assert w is not None and w.change_sat == least - 1  # the limit would not take it
    stuck = oc.Coin("ab" * 32, 1, 0, CHANGE, b"\xcc" * 32)
    fee = (200 + oc.vsize(1, [CHANGE])) * 30 - 400  # a child of a 200-vB parent to 30 sat/vB
    enough = stuck._replace(amount_sat=fee + least)
    child = oc.bump(enough, CHANGE, 400, 200, 30, 10_000, least)
    assert child is not None and child.tx.outputs[0].amount_sat == least
    short = stuck._replace(amount_sat=fee + least - 1)
    assert oc.bump(short, CHANGE, 400, 200, 30, 10_000, least) is None
    assert oc.bump(short, CHANGE, 400, 200, 30, 10_000) is not None  # dust alone allows it
