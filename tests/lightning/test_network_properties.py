"""The simulated Lightning network's invariants (``notes/lightning.md`` §5), under random
payments, holds, failures, splices, withdrawals, outages and time: conservation,
atomicity per payment hash, fees within the limit, no double payment, invoice rules,
capacity and reserves, splices."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from constellation.address import encode_segwit
from services.lnsim.network import (
    PAY_ALREADY_PAID,
    PAY_IN_PROGRESS,
    PAY_INVOICE_EXPIRED,
    Attempt,
    Invoice,
    LnError,
    Network,
    Part,
)

NODES = ["a", "b", "c", "d"]
PAIRS = [("a", "b"), ("b", "c"), ("c", "d"), ("a", "c")]
START = 1_800_000_000.0
OUTSIDE_ADDRESS = encode_segwit("bcrt", 1, bytes(range(32)))  # no node's: a coin on the chain


class LightningNetwork(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.net = Network(lambda: self.now, seed=7)
        for name in NODES:
            self.net.add_node(name)
            self.net.fund(name, 4_000_000)
        for a, b in PAIRS:
            self.net.fundchannel(a, b, 1_000_000, 500_000_000)
            self.net.mine(1)  # the change of one funding spends in the next
        self.invoices: list[tuple[str, Invoice]] = []
        self.attempts: list[Attempt] = []
        self.maxfee: dict[tuple[str, bytes], int] = {}
        self.refused: list[int] = []
        self.sides: dict[tuple[str, str], tuple[int, int]] = {}  # (free, reserve) last seen

    def _snapshot(self) -> Any:
        return (
            {cid: dict(c.balance) for cid, c in self.net.channels.items()},
            {n: self.net.wallet_sat(n) for n in NODES},
        )

    @rule(
        payee=st.sampled_from(NODES),
        amount=st.one_of(st.none(), st.integers(1, 600_000_000)),
        expiry=st.integers(1, 3600),
    )
    def invoice(self, payee: str, amount: int | None, expiry: int) -> None:
        label = f"inv{len(self.invoices)}"
        self.invoices.append((payee, self.net.invoice(payee, amount, label, "x", expiry)))

    @precondition(lambda self: self.invoices)
    @rule(
        payer=st.sampled_from(NODES),
        pick=st.integers(0, 1000),
        amount=st.integers(1, 600_000_000),
        maxfee=st.one_of(st.none(), st.integers(0, 50)),
        xpay=st.booleans(),
    )
    def pay(self, payer: str, pick: int, amount: int, maxfee: int | None, xpay: bool) -> None:
        payee, inv = self.invoices[pick % len(self.invoices)]
        before = self._snapshot()
        paid_before = [
            p
            for p in self.net.nodes[payer].parts
            if p.payment_hash == inv.payment_hash and p.status == "complete"
        ]
        given = None if inv.amount_msat is not None else amount
        spendable = {
            (cid, side): ch.spendable(side)
            for cid, ch in self.net.channels.items()
            for side in (ch.a, ch.b)
        }
        try:
            started = self.net.start_payment(payer, inv.bolt11, given, maxfee, xpay)
        except LnError as exc:
            self.refused.append(exc.code)
            assert self._snapshot() == before  # nothing was sent
            if paid_before:
                assert exc.code == PAY_ALREADY_PAID and xpay
            elif (payer, inv.payment_hash) in self.net.attempts:
                assert exc.code == PAY_IN_PROGRESS  # an attempt is held: no second one
            elif self.now >= inv.expires_at and payer != payee:
                assert exc.code == PAY_INVOICE_EXPIRED
            return
        if isinstance(started, Part):  # ``pay`` of what this payer paid: the same success
            assert not xpay and started in paid_before
            assert self._snapshot() == before
            return
        assert not paid_before and self.now < inv.expires_at
        for ch, offerer, amt in started.hops:  # no hop carries more than it could
            assert amt <= spendable[(ch.channel_id, offerer)]
        self.maxfee[(payer, inv.payment_hash)] = maxfee if maxfee is not None else 1 << 62
        self.attempts.append(started)
        self.net.advance(started)

    @rule(node=st.sampled_from(NODES), hold=st.booleans())
    def set_hold(self, node: str, hold: bool) -> None:
        self.net.nodes[node].faults.hold = hold

    @rule(node=st.sampled_from(NODES))
    def fail_next(self, node: str) -> None:
        self.net.nodes[node].faults.fail_next += 1

    @rule(node=st.sampled_from(NODES))
    def release(self, node: str) -> None:
        self.net.release(node)

    @rule(node=st.sampled_from(NODES), offline=st.booleans())
    def set_offline(self, node: str, offline: bool) -> None:
        self.net.nodes[node].faults.offline = offline

    @rule(seconds=st.integers(1, 4000))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule(blocks=st.integers(1, 3))
    def mine(self, blocks: int) -> None:
        self.net.mine(blocks)

    @rule(
        pair=st.sampled_from(PAIRS),
        side=st.integers(0, 1),
        amount=st.integers(-900_000, 900_000).filter(bool),
    )
    def splice(self, pair: tuple[str, str], side: int, amount: int) -> None:
        node, peer = pair[side], pair[1 - side]
        before = self._snapshot()
        try:
            self.net.splice(node, self.net.nodes[peer].node_id, amount)
        except LnError:
            assert self._snapshot() == before

    @rule(
        node=st.sampled_from(NODES),
        to=st.sampled_from([*NODES, None]),
        sat=st.integers(1, 2_000_000),
    )
    def withdraw(self, node: str, to: str | None, sat: int) -> None:
        address = self.net.newaddr(to) if to is not None else OUTSIDE_ADDRESS
        with contextlib.suppress(LnError):
            self.net.withdraw(node, address, sat)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def conserved(self) -> None:
        assert self.net.books()["missing_msat"] == 0

    @invariant()
    def channels_hold_their_capacity_and_reserves(self) -> None:
        for ch in self.net.channels.values():
            out = 0
            if ch.splice is not None and ch.splice.capacity_delta_sat < 0:
                out = ch.splice.capacity_delta_sat * 1000
            assert sum(ch.balance.values()) == ch.capacity_sat * 1000 + out
            for side in (ch.a, ch.b):
                # HTLCs stay in the offerer's balance until they settle; a side over its
                # reserve stays over it (a splice that raises the reserve may leave the
                # other side under it: it then cannot send until it receives)
                free = ch.balance[side] - ch.offered(side)
                assert free >= 0
                was = self.sides.get((ch.channel_id, side))
                if was is not None and was[1] == ch.reserve_msat and was[0] >= was[1]:
                    assert free >= ch.reserve_msat
                self.sides[(ch.channel_id, side)] = (free, ch.reserve_msat)

    @invariant()
    def a_payment_is_all_or_nothing(self) -> None:
        complete = {}
        for payer in NODES:
            for part in self.net.nodes[payer].parts:
                if part.status == "complete":
                    assert part.payment_hash not in complete  # paid once, by one payer
                    complete[part.payment_hash] = (payer, part)
                    assert part.preimage is not None
                    assert hashlib.sha256(part.preimage).digest() == part.payment_hash
        paid = {}
        for payee in NODES:
            for inv in self.net.nodes[payee].invoices.values():
                if inv.status == "paid":
                    paid[inv.payment_hash] = (payee, inv)
        assert paid.keys() == complete.keys()
        for h, (payee, inv) in paid.items():
            payer, part = complete[h]
            assert part.destination == self.net.nodes[payee].node_id
            assert inv.amount_received_msat == part.amount_msat
            assert inv.amount_msat is None or part.amount_msat >= inv.amount_msat
            assert part.amount_sent_msat - part.amount_msat <= self.maxfee[(payer, h)]

    @invariant()
    def forwarders_earn_exactly_the_fees_paid(self) -> None:
        paid = sum(
            p.amount_sent_msat - p.amount_msat
            for n in NODES
            for p in self.net.nodes[n].parts
            if p.status == "complete"
        )
        assert sum(self.net.nodes[n].fees_collected_msat for n in NODES) == paid

    @invariant()
    def htlcs_belong_to_payments_in_flight(self) -> None:
        in_flight = {(a.part.payment_hash) for a in self.net.attempts.values()}
        for ch in self.net.channels.values():
            for h in ch.htlcs:
                assert h.payment_hash in in_flight
        for attempt in self.attempts:
            assert attempt.resolved == (attempt.part.status != "pending")

    @invariant()
    def pay_indexes_run_from_one_without_gaps(self) -> None:
        for n in NODES:
            indexes = sorted(
                i.pay_index for i in self.net.nodes[n].invoices.values() if i.pay_index
            )
            assert indexes == list(range(1, len(indexes) + 1))


LightningNetwork.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestLightningNetwork = LightningNetwork.TestCase
