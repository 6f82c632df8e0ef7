"""The reserve invariant's arithmetic: what moves its slack, and what breaks it."""

from __future__ import annotations

from dataclasses import replace

from constellation.settlement import Payee, PayeeState, Release, label
from services.gateway.lightning import Channel, our_side_msat
from services.gateway.settle import CONFIRM, Books, Reserve

START = Books(
    held_msat=1_000,
    outbound_msat=0,
    fees_msat=0,
    paid_out_msat=0,
    releasing_msat=0,
    owed_by_others_msat=0,
    lightning_msat=50_000,
    onchain_msat=7_000,
    lightning_fees_msat=0,
    onchain_fees_msat=0,
    routed_msat=0,
    in_flight_msat=0,
)


def test_a_payment_out_then_its_settlement_keep_it() -> None:
    r = Reserve()
    assert r.check(START)["ok"] and r.check(START)["ok"] and r.baseline is not None
    # 300 paid to another ledger (fee 2): spent here at once, owed until settled
    spent = replace(START, held_msat=698, outbound_msat=300, fees_msat=2)
    v = r.check(spent)
    assert v["ok"] and v["drift"] == 0 and v["owed_to_others"] == 300
    # paid over Lightning with a routing fee of 1
    paid = replace(spent, paid_out_msat=300, lightning_msat=49_699, lightning_fees_msat=1)
    v = r.check(paid)
    assert v["ok"] and v["drift"] == 0 and v["owed_to_others"] == 0


def test_a_payment_in_is_pending_then_paid_then_released() -> None:
    r = Reserve()
    r.check(START)
    r.check(START)
    pending = replace(START, owed_by_others_msat=400)  # held for its receiver, not paid
    assert r.check(pending)["drift"] == 0
    paid = replace(START, releasing_msat=400, lightning_msat=50_400)  # paid, being issued
    assert r.check(paid)["drift"] == 0
    issued = replace(paid, held_msat=1_400, releasing_msat=0)
    v = r.check(issued)
    assert v["ok"] and v["drift"] == 0 and v["l3_held"] == 1_400


def test_money_gone_or_coins_made_from_nothing_break_it() -> None:
    r = Reserve()
    r.check(START)
    r.check(START)
    v = r.check(replace(START, lightning_msat=49_000))
    assert not v["ok"] and v["drift"] == -1_000
    v = r.check(replace(START, held_msat=1_500))  # issued without a deposit
    assert not v["ok"] and v["drift"] == -500
    # in flight: a moment's difference up to what is on its way is not a break
    assert r.check(replace(START, lightning_msat=49_000, in_flight_msat=1_000))["ok"]


def test_the_baseline_is_taken_only_when_nothing_is_in_flight() -> None:
    r = Reserve()
    v = r.check(replace(START, in_flight_msat=10))
    assert r.baseline is None and v["ok"] and v["drift"] == 0
    r.check(START)
    assert r.baseline is None  # one quiet read: a transaction may sit between two
    r.check(replace(START, held_msat=900))
    assert r.baseline is None  # two that disagree
    r.check(replace(START, held_msat=900))
    assert r.baseline == 57_000 - 900


def test_broken_only_when_it_stays_beyond_what_is_in_flight() -> None:
    r = Reserve()
    r.check(START)
    r.check(START)
    skewed = replace(START, held_msat=900)  # a transaction committing between two reads
    for _ in range(CONFIRM - 1):
        assert not r.check(skewed)["broken"]
    assert r.check(START)["ok"]  # it was a moment
    for _ in range(CONFIRM - 1):
        assert not r.check(skewed)["broken"]
    assert r.check(skewed)["broken"]  # it stays: money appeared from nowhere


def test_the_node_s_own_fees_and_earnings_keep_it() -> None:
    r = Reserve()
    r.check(START)
    r.check(START)
    # a splice in of 2,000 paying a miner 200: funds down by the fee, booked by the node
    spliced = replace(START, lightning_msat=52_000, onchain_msat=4_800, onchain_fees_msat=200)
    assert r.check(spliced)["drift"] == 0
    # 30 earned forwarding a payment through this node
    routed = replace(spliced, lightning_msat=52_030, routed_msat=30)
    assert r.check(routed)["drift"] == 0
    # a miner's fee the books do not name is a loss
    assert r.check(replace(routed, onchain_msat=4_700))["drift"] == -100


def _channel(state: str, to_us_msat: int) -> Channel:
    return Channel("c", "p", state, True, 100_000, to_us_msat, 0, 0, False)


def test_a_channel_s_close_moves_our_side_to_the_wallet_once_mined() -> None:
    """As lightningd reports a mutual close: the channel holds our side until the close
    is mined; from that block the output is the wallet's (``listfunds``) and the channel
    is FUNDING_SPEND_SEEN, then ONCHAIN. The books hold the same all along (the closing
    fee, 300, is booked by the node's income as it is mined)."""
    r = Reserve()
    r.check(START)
    ours = START.lightning_msat
    for state in ("CHANNELD_SHUTTING_DOWN", "CLOSINGD_SIGEXCHANGE", "CLOSINGD_COMPLETE"):
        books = replace(START, lightning_msat=our_side_msat([_channel(state, ours)]))
        assert r.check(books)["drift"] == 0, state
    for state in ("FUNDING_SPEND_SEEN", "ONCHAIN"):
        mined = replace(
            START,
            lightning_msat=our_side_msat([_channel(state, ours)]),
            onchain_msat=START.onchain_msat + ours - 300,
            onchain_fees_msat=300,
        )
        assert r.check(mined)["drift"] == 0, state
    # our own commitment, broadcast and not mined: still the channel's
    dropped = replace(START, lightning_msat=our_side_msat([_channel("AWAITING_UNILATERAL", ours)]))
    assert r.check(dropped)["drift"] == 0


def test_an_invoice_of_ours_a_peer_keeps_open_excuses_no_shortfall() -> None:
    """A peer chooses the amount of the invoice it asks of us: paid and not yet heard
    of, it can only make the books read over, never short."""
    r = Reserve()
    asked = replace(START, incoming_msat=10**15)
    r.check(asked)
    r.check(asked)
    assert r.baseline == START.lightning_msat + START.onchain_msat - START.held_msat
    assert r.check(replace(asked, lightning_msat=50_400))["ok"]  # paid, not yet heard of
    v = r.check(replace(asked, lightning_msat=49_000))
    assert not v["ok"] and v["drift"] == -1_000 and v["incoming"] == 10**15
    for _ in range(CONFIRM - 1):
        v = r.check(replace(asked, lightning_msat=49_000))
    assert v["broken"]


def test_what_a_payer_pays_beyond_our_invoice_is_ours_and_keeps_it() -> None:
    """A payer may overpay an invoice (lightningd takes up to twice its amount): the
    payee releases the batch's amount, and the rest, in our channel and owed to nobody,
    once read as money from nowhere (the invariant broken for good)."""
    payee = Payee(PayeeState("p", "q"))
    payee.announced(1, 1_000)
    payee.request(1, 1, 1, 1_000)
    payee.made(1, "lnbcrt1x", 10.0**10)
    asked = replace(
        START, owed_by_others_msat=payee.pending_msat, incoming_msat=payee.incoming_msat
    )
    r = Reserve()
    r.check(asked)
    r.check(asked)
    assert payee.paid(label("p", 1), 1_999) == [Release(1, 1, 1)]  # received 1,999
    assert payee.state.released_msat == 1_000 and payee.state.overpaid_msat == 999
    issued = replace(
        START,
        held_msat=START.held_msat + 1_000,
        lightning_msat=START.lightning_msat + 1_999,
        received_msat=payee.state.overpaid_msat,
    )
    for _ in range(CONFIRM):
        v = r.check(issued)
    assert v["ok"] and v["drift"] == 0 and not v["broken"]
    # a payment asked of nobody (a keysend) is the operator's the same way
    keysend = replace(issued, lightning_msat=issued.lightning_msat + 5, received_msat=999 + 5)
    assert r.check(keysend)["drift"] == 0
