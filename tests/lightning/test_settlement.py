"""Settlement between two operators (``constellation/settlement.py``) over the simulated
Lightning network, under random faults: payments that fail, hang or lose their answers,
payments that never reach the payer's node, messages between the operators lost,
repeated and reordered, and either side crashing between persisting and acting (it
comes back from what it persisted).

After every step: outputs are released in order, each once, and only when an invoice of
exactly their batch was paid; the payer counts as paid only what the payee's node
received. Once the faults stop, everything owed is paid and released, with at most one
Lightning payment per batch.
"""

from __future__ import annotations

import copy
import hmac
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.errors import TooLargeToSettle
from constellation.keys import SigningKey
from constellation.lightning import Outcome, nothing_sent, outgoing, spent_at_most
from constellation.settlement import (
    ATTEMPTING_S,
    GIVE_UP_S,
    LOOKUP_S,
    MAX_BATCH_OUTPUTS,
    MAX_PENDING,
    NEVER_SENT_S,
    RETRY_S,
    Action,
    CancelInvoice,
    Cancelled,
    LookUp,
    MakeInvoice,
    Offer,
    Pay,
    Payee,
    PayeeState,
    Payer,
    PayerState,
    Refuse,
    Release,
    RequestCancel,
    RequestInvoice,
    check_settleable,
    label,
)
from constellation.tx import HERE, Transaction, TxInput, TxOutput, ledger_id
from services.gateway.lightning import RETRY_FOR_S
from services.lnsim.network import Attempt, LnError, Network

KEY = b"payee settlement key"
MAX_BATCH_MSAT = 12_000_000  # a batch holds a few obligations of up to 5,000,000 msat


@dataclass
class World:
    rng: random.Random
    faulty: bool = True
    now: float = 1_800_000_000.0
    net: Network = field(init=False)
    payer: Payer = field(init=False)
    payee: Payee = field(init=False)
    saved_payer: PayerState = field(init=False)
    saved_payee: PayeeState = field(init=False)
    to_payee: list[Action] = field(default_factory=list)  # messages in flight
    to_payer: list[Action] = field(default_factory=list)
    owed: list[int] = field(default_factory=list)  # amounts, by seq - 1
    announced: int = 0
    released: list[Release] = field(default_factory=list)
    pay_index: int = 0  # the payee's stream, persisted with its state
    saved_pay_index: int = 0

    def __post_init__(self) -> None:
        self.net = Network(lambda: self.now, seed=self.rng.getrandbits(32))
        for name in ("p", "q"):
            self.net.add_node(name)
            self.net.fund(name, 50_000_000)
        self.net.fundchannel("p", "q", 40_000_000, 0)
        self.net.mine(1)
        self.payer = Payer(PayerState("p", "q"), max_batch_msat=MAX_BATCH_MSAT)
        self.payee = Payee(PayeeState("p", "q"))
        self.saved_payer = copy.deepcopy(self.payer.state)
        self.saved_payee = copy.deepcopy(self.payee.state)

    def chance(self, p: float) -> bool:
        return self.faulty and self.rng.random() < p

    # -- the shells: persist, then act ----------------------------------------------

    def payer_did(self, actions: list[Action]) -> None:
        self.saved_payer = copy.deepcopy(self.payer.state)
        for a in actions:
            if self.chance(0.03):  # crash after persisting, before acting
                self.crash_payer()
                return
            self.payer_act(a)

    def payee_did(self, actions: list[Action]) -> None:
        self.saved_payee = copy.deepcopy(self.payee.state)
        self.saved_pay_index = self.pay_index
        for a in actions:
            if self.chance(0.03):
                self.crash_payee()
                return
            self.payee_act(a)

    def crash_payer(self) -> None:
        self.payer = Payer(copy.deepcopy(self.saved_payer), max_batch_msat=MAX_BATCH_MSAT)
        self.payer_did(self.payer.resume(self.now))

    def crash_payee(self) -> None:
        self.payee = Payee(copy.deepcopy(self.saved_payee))
        self.pay_index = self.saved_pay_index
        self.payee_did(self.payee.resume())

    def payer_act(self, a: Action) -> None:
        if isinstance(a, RequestInvoice | RequestCancel):
            if isinstance(a, RequestInvoice):  # a batch holds what fits, one at least
                assert a.amount_msat <= MAX_BATCH_MSAT or a.first == a.last
            self.to_payee.append(a)
        elif isinstance(a, Pay):
            if self.chance(0.05):
                return  # the node was down: the call never reached it, and no answer came
            if self.chance(0.1):
                self.net.nodes["q"].faults.fail_next = 1
            if self.chance(0.1):
                self.net.nodes["q"].faults.hold = True
            try:
                attempt = self.net.start_payment("p", a.bolt11, None, a.fee_limit_msat, True)
            except LnError as exc:
                if nothing_sent(exc.code):
                    self.payer_did(self.payer.outcome(a.batch, Outcome.FAILED, self.now))
                    return
                attempt = None  # 200 (in progress) or 219 (paid): listpays says which
            if isinstance(attempt, Attempt):
                self.net.advance(attempt)
            if self.chance(0.2):
                return  # the answer was lost: the payer looks it up later
            self.look_up(a.batch, self._hash(a.bolt11))
        elif isinstance(a, LookUp):
            if not self.chance(0.2):
                self.look_up(a.batch, a.payment_hash, a.attempted)
        else:
            raise AssertionError(f"the payer does not {a}")

    def _hash(self, bolt11: str) -> bytes:
        return bytes.fromhex(self.net.decode(bolt11).payment_hash or "")

    def look_up(self, batch: int, payment_hash: bytes, attempted: bool = True) -> None:
        state = outgoing(self.net.pays("p", payment_hash), payment_hash, asked=attempted)
        self.payer_did(self.payer.outcome(batch, state.outcome, self.now))

    def payee_act(self, a: Action) -> None:
        if isinstance(a, Offer | Refuse | Cancelled):
            self.to_payer.append(a)
        elif isinstance(a, MakeInvoice):
            preimage = hmac.digest(KEY, a.label.encode(), "sha256")
            try:
                expiry = self.rng.choice((5, 60, 3600)) if self.faulty else 3600
                inv = self.net.invoice("q", a.amount_msat, a.label, "settlement", expiry, preimage)
            except LnError as exc:
                assert exc.code == 900  # made before: the same invoice
                inv = self.net.nodes["q"].invoices[a.label]
                assert inv.amount_msat == a.amount_msat and inv.preimage == preimage
            self.payee_did(self.payee.made(a.batch, inv.bolt11, inv.expires_at))
        elif isinstance(a, CancelInvoice):
            try:
                self.net.delinvoice("q", a.label, "unpaid")
                paid = False
            except LnError as exc:
                assert exc.code == 906 and exc.data is not None
                assert exc.data["current_status"] in ("paid", "expired")
                paid = exc.data["current_status"] == "paid"
            self.payee_did(self.payee.cancel_result(a.batch, paid))
        elif isinstance(a, Release):
            inv = self.net.nodes["q"].invoices[label("p", a.batch)]
            assert inv.status == "paid", "released before paid"
            assert inv.amount_received_msat == sum(self.owed[a.first - 1 : a.last])
            if a not in self.released:  # the ledger's release is idempotent
                expected_first = self.released[-1].last + 1 if self.released else 1
                assert a.first == expected_first, "released out of order"
                self.released.append(a)
            self.payee.released(a.batch)
            self.saved_payee = copy.deepcopy(self.payee.state)
        else:
            raise AssertionError(f"the payee does not {a}")

    # -- the world turns ------------------------------------------------------------

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.15:  # a payment out of the payer's ledger into the payee's
            amount = self.rng.randint(1, 5_000_000)
            self.owed.append(amount)
            self.payer.owe(len(self.owed), amount)
            self.saved_payer = copy.deepcopy(self.payer.state)
        elif r < 0.25 and self.announced < len(self.owed):  # the payee hears of it
            self.announced += 1
            self.payee.announced(self.announced, self.owed[self.announced - 1])
            self.saved_payee = copy.deepcopy(self.payee.state)
        elif r < 0.40:
            self.now += self.rng.choice((0.1, 0.5, 1.0, 3.0))
            self.payer_did(self.payer.tick(self.now))
            self.payee_did(self.payee.tick(self.now))
        elif r < 0.60 and self.to_payee:
            self.deliver(self.to_payee, self.to_payee_message)
        elif r < 0.80 and self.to_payer:
            self.deliver(self.to_payer, self.to_payer_message)
        elif r < 0.88:
            self.stream()
        elif r < 0.93 and self.net.attempts:
            self.net.nodes["q"].faults.hold = False
            self.net.release("q")
        elif r < 0.95:
            self.crash_payer()
        elif r < 0.97:
            self.crash_payee()

    def deliver(self, queue: list[Action], handle: Any) -> None:
        msg = queue.pop(self.rng.randrange(len(queue)) if self.faulty else 0)
        if self.chance(0.1):
            return  # lost
        if self.chance(0.1):
            queue.append(msg)  # and delivered again later
        handle(msg)

    def deliver_all(self) -> None:
        while self.to_payee or self.to_payer:
            if self.to_payee:
                self.deliver(self.to_payee, self.to_payee_message)
            if self.to_payer:
                self.deliver(self.to_payer, self.to_payer_message)

    def to_payee_message(self, msg: Action) -> None:
        if isinstance(msg, RequestInvoice):
            self.payee_did(self.payee.request(msg.batch, msg.first, msg.last, msg.amount_msat))
        elif isinstance(msg, RequestCancel):
            self.payee_did(self.payee.cancel(msg.batch))

    def to_payer_message(self, msg: Action) -> None:
        if isinstance(msg, Offer):
            decoded = self.net.decode(msg.bolt11)
            assert decoded.payee == self.net.nodes["q"].node_id  # the payee's node signed it
            amount = int(decoded.amount_msat or 0)
            actions = self.payer.offered(
                msg.batch, msg.bolt11, self._hash(msg.bolt11), amount, self.now
            )
            self.payer_did(actions)
        elif isinstance(msg, Refuse):
            self.payer_did(self.payer.refused(msg.batch, self.now))
        elif isinstance(msg, Cancelled):
            self.payer_did(self.payer.cancelled(msg.batch, msg.paid, self.now))

    def stream(self) -> None:
        """The payee's node's paid invoices after its persisted index, in order."""
        for inv in sorted(
            (
                i
                for i in self.net.nodes["q"].invoices.values()
                if (i.pay_index or 0) > self.pay_index
            ),
            key=lambda i: i.pay_index or 0,
        ):
            assert inv.pay_index is not None and inv.amount_received_msat is not None
            self.pay_index = inv.pay_index
            self.payee_did(self.payee.paid(inv.label, inv.amount_received_msat))

    def check(self) -> None:
        paid_invoices = [i for i in self.net.nodes["q"].invoices.values() if i.status == "paid"]
        received = sum(i.amount_received_msat or 0 for i in paid_invoices)
        assert self.payer.state.paid_msat <= received  # counted paid only what arrived
        # and nothing arrived twice: beyond what the payer settled, at most its batch
        batch = self.payer.state.batch
        assert received <= self.payer.state.paid_msat + (batch.amount_msat if batch else 0)
        assert self.payee.state.released_msat <= received
        assert self.net.books()["missing_msat"] == 0
        complete = [p for p in self.net.nodes["p"].parts if p.status == "complete"]
        assert len({p.payment_hash for p in complete}) == len(complete)  # nothing paid twice


def run(seed: int, steps: int) -> World:
    world = World(random.Random(seed))
    for _ in range(steps):
        world.step()
        world.check()
    # the faults stop; what is held is let go; everyone hears everything
    world.faulty = False
    world.net.nodes["q"].faults.hold = False
    world.net.nodes["q"].faults.fail_next = 0
    world.net.release("q")
    while world.announced < len(world.owed):
        world.announced += 1
        world.payee.announced(world.announced, world.owed[world.announced - 1])
    for _ in range(2000):
        world.now += 0.5
        world.payer_did(world.payer.tick(world.now))
        world.payee_did(world.payee.tick(world.now))
        world.deliver_all()
        world.stream()
        world.check()
        if world.payer.state.settled_upto == len(world.owed) and world.payer.state.batch is None:
            break
    return world


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_settlement_pays_each_batch_once_and_releases_only_what_was_paid(seed: int) -> None:
    world = run(seed, 300)
    p, q = world.payer.state, world.payee.state
    context = f"seed {seed}"
    assert p.settled_upto == len(world.owed) and q.released_upto == len(world.owed), context
    assert p.paid_msat == q.released_msat == sum(world.owed), context
    assert [r.first for r in world.released] == [1, *(r.last + 1 for r in world.released[:-1])]
    paid = [i for i in world.net.nodes["q"].invoices.values() if i.status == "paid"]
    assert sum(i.amount_received_msat or 0 for i in paid) == sum(world.owed), context
    assert len(paid) == len(world.released) == p.settled, context  # one payment per batch


def test_without_faults_a_batch_a_second_carries_every_payment_of_that_second() -> None:
    world = World(random.Random(1), faulty=False)
    for second in range(5):
        for _ in range(100):  # a hundred payments, one Lightning payment
            world.owed.append(1000)
            world.payer.owe(len(world.owed), 1000)
            world.announced += 1
            world.payee.announced(world.announced, 1000)
        world.now += 1.0
        world.payer_did(world.payer.tick(world.now))
        world.deliver_all()
        world.stream()
        assert world.payee.state.released_upto == 100 * (second + 1)
    assert world.payer.state.settled == 5
    assert len([p for p in world.net.nodes["p"].parts if p.status == "complete"]) == 5


def test_the_payer_confirms_a_cancel_with_its_own_node() -> None:
    """A payee's "cancelled" is not taken on its word: the payer's node decides."""

    def cancelling() -> tuple[Payer, int]:
        payer = Payer(PayerState("p", "q"))
        payer.owe(1, 5_000)
        [request] = payer.tick(10.0)
        assert isinstance(request, RequestInvoice)
        # only the invoice asked for is looked at (its shell decodes no other)
        assert payer.asks(request.batch) and not payer.asks(request.batch + 1)
        payer.offered(request.batch, "lnbcrt1x", b"h" * 32, 5_000, 10.0)
        assert not payer.asks(request.batch)  # taken: a repeat is not decoded again
        assert payer.outcome(request.batch, Outcome.FAILED, 11.0) == [RequestCancel(request.batch)]
        return payer, request.batch

    payer, batch = cancelling()
    assert payer.cancelled(batch + 1, False, 12.0) == []  # not this batch: ignored
    assert payer.cancelled(batch, False, 12.0) == [LookUp(batch, b"h" * 32)]
    assert payer.outcome(batch, Outcome.PENDING, 13.0) == []  # still in flight: wait
    assert payer.state.batch is not None
    assert payer.outcome(batch, Outcome.SETTLED, 14.0) == []  # it was paid after all
    assert payer.state.batch is None and payer.state.settled_upto == 1
    assert payer.state.paid_msat == 5_000 and payer.state.failed == 0

    payer, batch = cancelling()
    payer.cancelled(batch, False, 12.0)
    payer.outcome(batch, Outcome.FAILED, 13.0)  # our pay command may still be trying
    assert payer.state.batch is not None
    payer.outcome(batch, Outcome.FAILED, 10.0 + ATTEMPTING_S)  # confirmed unpaid
    assert payer.state.batch is None and payer.state.failed == 1
    assert payer.state.owed == [(1, 5_000)]
    assert payer.cancelled(batch, True, 14.0) == []  # too late to matter: ignored
    assert payer.state.settled_upto == 0


def test_a_cancelled_payment_is_never_sent_only_after_our_pay_command_would_end() -> None:
    """``NEVER_SENT_S``'s premise: a pay command of ours stops trying before it."""
    assert RETRY_FOR_S + LOOKUP_S < NEVER_SENT_S
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    [request] = payer.tick(10.0)
    assert isinstance(request, RequestInvoice)
    payer.offered(request.batch, "lnbcrt1x", b"h" * 32, 5_000, 10.0)
    payer.outcome(request.batch, Outcome.FAILED, 11.0)
    assert payer.cancelled(request.batch, False, 12.0) == [LookUp(request.batch, b"h" * 32)]
    assert payer.tick(12.0 + NEVER_SENT_S - 1) == [LookUp(request.batch, b"h" * 32, True)]
    assert payer.tick(12.0 + NEVER_SENT_S) == [LookUp(request.batch, b"h" * 32, False)]
    assert payer.resume(12.0 + NEVER_SENT_S) == [LookUp(request.batch, b"h" * 32, False)]


def test_a_payee_that_keeps_the_invoice_it_said_it_deleted_is_not_paid_twice() -> None:
    """The payer restarts while its pay command tries routes; the payee fails each
    attempt on purpose, says it cancelled, and keeps its invoice. Between two attempts
    the node says failed: not final while a pay command of ours may still be trying."""
    assert RETRY_FOR_S < ATTEMPTING_S
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    [request] = payer.tick(0.0)
    assert isinstance(request, RequestInvoice)
    payer.offered(request.batch, "lnbcrt1x", b"h" * 32, 5_000, 0.5)  # pay command 1 starts
    payer = Payer(copy.deepcopy(payer.state))  # a restart
    assert payer.resume(5.0) == [Pay(request.batch, "lnbcrt1x", payer.fee_limit_msat)]
    assert payer.outcome(request.batch, Outcome.PENDING, 5.1) == []
    assert payer.outcome(request.batch, Outcome.FAILED, 7.0) == [RequestCancel(request.batch)]
    payer.cancelled(request.batch, False, 7.2)  # a lie: the invoice is kept
    payer.outcome(request.batch, Outcome.FAILED, 7.3)
    assert payer.state.batch is not None and payer.state.failed == 0
    payer.outcome(request.batch, Outcome.SETTLED, 8.0, fee_msat=5)  # an attempt lands
    assert payer.state.batch is None and payer.state.settled_upto == 1
    assert payer.state.paid_msat == 5_000 and payer.tick(9.0) == []  # nothing to pay again
    # Where no attempt lands, failed is final once the last pay command is over.
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    [request] = payer.tick(0.0)
    assert isinstance(request, RequestInvoice)
    payer.offered(request.batch, "lnbcrt1x", b"h" * 32, 5_000, 0.5)
    payer.resume(5.0)
    payer.outcome(request.batch, Outcome.FAILED, 7.0)
    payer.cancelled(request.batch, False, 7.2)
    payer.outcome(request.batch, Outcome.FAILED, 5.0 + ATTEMPTING_S - 0.1)
    assert payer.state.batch is not None
    payer.outcome(request.batch, Outcome.FAILED, 5.0 + ATTEMPTING_S)
    assert payer.state.batch is None and payer.state.failed == 1


def test_a_cancelled_batch_waits_out_a_pay_command_that_began_late_and_still_tries() -> None:
    """Our pay command went out late (it waited for a place) and still tries routes;
    the payee fails each attempt on purpose, says it cancelled and keeps its invoice,
    and we restart. Failed is not final while our node's newest attempt is recent: a
    batch dropped then would be paid again in the next while this command lands."""
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    [request] = payer.tick(0.0)
    assert isinstance(request, RequestInvoice)
    b, h = request.batch, b"h" * 32
    payer.offered(b, "lnbcrt1x", h, 5_000, 0.0)  # its command goes at 22, tries until 52
    assert payer.outcome(b, Outcome.UNKNOWN, GIVE_UP_S) == [RequestCancel(b)]
    payer.cancelled(b, False, 31.0)  # a lie: the invoice is kept
    payer = Payer(copy.deepcopy(payer.state))  # a restart: no command of ours known
    assert payer.resume(40.0) == [LookUp(b, h, True)]
    payer.outcome(b, Outcome.FAILED, ATTEMPTING_S, last_attempt_at=44)
    assert payer.state.batch is not None and payer.state.failed == 0  # may still land
    payer.outcome(b, Outcome.FAILED, 44 + ATTEMPTING_S - 0.1, last_attempt_at=44)
    assert payer.state.batch is not None
    payer.outcome(b, Outcome.FAILED, 44 + ATTEMPTING_S, last_attempt_at=44)  # over
    assert payer.state.batch is None and payer.state.failed == 1
    assert payer.state.owed == [(1, 5_000)]
    # Cancelling (the payee has not answered): no longer looked up only once it is over.
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    [request] = payer.tick(0.0)
    assert isinstance(request, RequestInvoice)
    b = request.batch
    payer.offered(b, "lnbcrt1x", h, 5_000, 0.0)
    payer.outcome(b, Outcome.UNKNOWN, GIVE_UP_S)
    payer.outcome(b, Outcome.FAILED, ATTEMPTING_S, last_attempt_at=44)
    assert payer.state.batch is not None and not payer.state.batch.stopped
    payer.outcome(b, Outcome.FAILED, 44 + ATTEMPTING_S, last_attempt_at=44)
    assert payer.state.batch.stopped


def test_an_invoice_left_unpaid_is_closed_once_its_node_says_it_can_no_longer_be_paid() -> None:
    """A payer that asks for an invoice and neither pays nor cancels it keeps nothing in
    flight here beyond its expiry; one paid just before it expired is released."""
    payee = Payee(PayeeState("p", "q"))
    payee.announced(1, 5_000)
    assert payee.request(1, 1, 1, 5_000) == [MakeInvoice(1, label("p", 1), 5_000)]
    assert payee.incoming_msat == 0  # no invoice yet: nothing can be paid
    assert payee.made(1, "lnbcrt1x", 100.0) == [Offer(1, "lnbcrt1x")]
    assert payee.incoming_msat == 5_000
    assert payee.tick(99.9) == []
    assert payee.tick(100.0) == [CancelInvoice(1, label("p", 1))]  # its node says which
    assert payee.tick(100.0 + RETRY_S - 0.1) == []
    assert payee.tick(100.0 + RETRY_S) == [CancelInvoice(1, label("p", 1))]  # unanswered
    assert payee.state.open is not None and payee.incoming_msat == 5_000  # not on our word
    assert payee.cancel_result(1, False) == [Cancelled(1, paid=False)]  # expired, or deleted
    assert payee.state.open is None and payee.incoming_msat == 0 and payee.tick(200.0) == []
    # the payer, still asking for it (its offer was lost), hears it was closed
    assert payee.request(1, 1, 1, 5_000) == [Cancelled(1, paid=False)]
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    [request] = payer.tick(0.0)
    assert request == RequestInvoice(1, 1, 1, 5_000)
    assert payer.cancelled(1, False, 1.0) == []  # never offered: nothing was paid
    assert payer.state.batch is None and payer.state.failed == 1
    assert payer.tick(2.0) == [RequestInvoice(2, 1, 1, 5_000)]  # asked for again
    # paid just before it expired: the node says so, and the paid stream releases it
    assert payee.request(2, 1, 1, 5_000) == [MakeInvoice(2, label("p", 2), 5_000)]
    payee.made(2, "lnbcrt1y", 300.0)
    assert payee.tick(300.0) == [CancelInvoice(2, label("p", 2))]
    assert payee.cancel_result(2, True) == [] and payee.incoming_msat == 5_000
    assert payee.paid(label("p", 2), 5_000) == [Release(2, 1, 1)]
    assert payee.state.open is None and payee.tick(400.0) == []


def test_a_batch_the_payee_never_cancels_is_in_flight_only_while_our_node_may_pay_it() -> None:
    """Cancelling, the payer asks its own node as well as the payee: a payee that never
    answers keeps the batch open (still owed, never paid twice), but nothing in flight
    once our node says the payment failed and no pay command of ours can still try."""
    payer = Payer(PayerState("p", "q"), fee_limit_msat=10)
    payer.owe(1, 5_000)
    [request] = payer.tick(0.0)
    assert isinstance(request, RequestInvoice) and payer.in_flight_msat == 0
    b, h = request.batch, b"h" * 32
    payer.offered(b, "lnbcrt1x", h, 5_000, 1.0)
    assert payer.in_flight_msat == 5_010  # its fee too: booked once settled
    assert payer.outcome(b, Outcome.UNKNOWN, 1.0 + GIVE_UP_S) == [RequestCancel(b)]
    t = 1.0 + GIVE_UP_S + RETRY_S
    assert payer.tick(t) == [RequestCancel(b), LookUp(b, h, True)]
    payer.outcome(b, Outcome.FAILED, 1.0 + ATTEMPTING_S - 0.1)  # a command may still try
    assert payer.in_flight_msat == 5_010
    payer.outcome(b, Outcome.FAILED, 1.0 + ATTEMPTING_S)
    assert payer.in_flight_msat == 0
    assert payer.tick(t + 60.0) == [RequestCancel(b)]  # the payee only, from now on
    assert payer.state.batch is not None and payer.state.owed == [(1, 5_000)]
    assert payer.resume(t + 61.0) == [RequestCancel(b)]
    # no attempt of ours at our node long after our last Pay: none was made
    payer = Payer(PayerState("p", "q"))
    payer.owe(1, 5_000)
    payer.tick(0.0)
    payer.offered(b, "lnbcrt1x", h, 5_000, 1.0)
    payer.outcome(b, Outcome.FAILED, 2.0)
    assert payer.tick(1.0 + NEVER_SENT_S) == [RequestCancel(b), LookUp(b, h, False)]
    # our node says it settled: settled, whatever the payee says or not
    payer.outcome(b, Outcome.SETTLED, 1.0 + NEVER_SENT_S, fee_msat=3)
    assert payer.state.batch is None and payer.state.settled_upto == 1
    assert payer.state.paid_msat == 5_000 and payer.state.fees_msat == 3


def test_an_obligation_larger_than_a_batch_is_refused_where_it_would_be_made() -> None:
    """Batches go in order, each holding the oldest obligation: one no batch carries
    would hold back every later one to that ledger for ever."""
    owner, other = SigningKey(b"\x01" * 32).pubkey, ledger_id(SigningKey(b"\x02" * 32).pubkey)
    coin = b"\x03" * 32

    def paying(value_msat: int) -> Transaction:
        outputs = [TxOutput(value_msat, owner), TxOutput(1_000, owner)]
        return Transaction([TxInput(coin, value_msat + 1_000)], outputs, ledgers=[other, HERE])

    check_settleable(paying(MAX_BATCH_MSAT), MAX_BATCH_MSAT)
    with pytest.raises(TooLargeToSettle, match=f"output 0 pays {MAX_BATCH_MSAT + 1} msat"):
        check_settleable(paying(MAX_BATCH_MSAT + 1), MAX_BATCH_MSAT)
    local = Transaction([TxInput(coin, 10**12)], [TxOutput(10**12, owner)])
    check_settleable(local, MAX_BATCH_MSAT)  # kept in this ledger: owed to nobody


def test_a_payee_holds_a_bounded_number_of_outputs_and_answers_without_walking_them() -> None:
    """A peer pays nothing to announce: the payee takes at most ``max_pending`` (the
    shell acknowledges no more, and the payer announces the rest again), sums a batch
    and what it holds without a walk, and a batch always fits what it holds."""
    assert MAX_BATCH_OUTPUTS <= MAX_PENDING
    payee = Payee(PayeeState("p", "q"), max_pending=3)
    for seq in (1, 2, 3):
        payee.announced(seq, seq * 1_000)
    assert payee.room == 0 and payee.pending_msat == 6_000
    refused = payee.request(1, 1, 2**62, 7)
    assert refused == [Refuse(1, f"obligations 1..{2**62} are not all announced here")]
    assert payee.request(1, 1, 2, 7) == [Refuse(1, "obligations 1..2 are 3000 msat")]
    assert payee.request(1, 1, 2, 3_000) == [MakeInvoice(1, label("p", 1), 3_000)]
    payee.made(1, "lnbcrt1x", 100.0)
    assert payee.paid(label("p", 1), 3_000) == [Release(1, 1, 2)]
    assert payee.room == 2 and payee.pending_msat == 3_000
    payee.announced(4, 4_000)
    assert payee.pending_msat == 7_000
    assert payee.request(2, 3, 4, 7_000) == [MakeInvoice(2, label("p", 2), 7_000)]
    again = Payee(copy.deepcopy(payee.state), max_pending=3)  # after a restart
    assert again.pending_msat == 7_000 and again.room == 1
    # the payer's batch holds no more obligations than a payee holds
    payer = Payer(PayerState("p", "q"))
    for seq in range(1, MAX_BATCH_OUTPUTS + 2):
        payer.owe(seq, 1)
    assert payer.owed_msat == MAX_BATCH_OUTPUTS + 1
    assert payer.tick(0.0) == [RequestInvoice(1, 1, MAX_BATCH_OUTPUTS, MAX_BATCH_OUTPUTS)]


def test_an_invoice_reusing_a_hash_our_node_paid_is_neither_paid_nor_counted_paid() -> None:
    """The payee offers, for batch 2, an invoice of its other node with the hash of
    batch 1's payment (it knows the preimage): our node would not pay that hash again,
    and its record of batch 1's payment (1,000 msat) once settled batch 2 (10^6 msat),
    its fee booked as -998,999 msat."""
    net = Network(lambda: 1_800_000_000.0, seed=1)
    for name in ("p", "q", "q2"):
        net.add_node(name)
        net.fund(name, 50_000_000)
    net.fundchannel("p", "q", 40_000_000, 0)
    net.mine(1)
    payer = Payer(PayerState("p", "q"), fee_limit_msat=10_000)
    preimage = hmac.digest(KEY, label("p", 1).encode(), "sha256")

    def node_says(payment_hash: bytes, asked: bool) -> Any:
        return outgoing(net.pays("p", payment_hash), payment_hash, asked)

    def pay(batch: int, bolt11: str) -> None:
        attempt = net.start_payment("p", bolt11, None, 10_000, False)  # pay: the earlier
        if isinstance(attempt, Attempt):  # success is answered again for a hash it paid
            net.advance(attempt)
        h = bytes.fromhex(net.decode(bolt11).payment_hash or "")
        state = node_says(h, True)
        assert payer.state.batch is not None
        fee = spent_at_most(state, payer.state.batch.amount_msat, 10_000)
        fee -= payer.state.batch.amount_msat
        payer.outcome(batch, state.outcome, 1.0, fee, state.amount_msat)

    payer.owe(1, 1_000)
    payer.tick(0.0)
    first = net.invoice("q", 1_000, label("p", 1), "settlement", 3600, preimage)
    h = first.payment_hash
    assert payer.offered(1, first.bolt11, h, 1_000, 0.0, node_says(h, False))
    pay(1, first.bolt11)
    assert payer.state.settled == 1 and payer.state.paid_msat == 1_000

    payer.owe(2, 10**6)
    assert payer.tick(10.0) == [RequestInvoice(2, 2, 2, 10**6)]
    again = net.invoice("q2", 10**6, label("p", 2), "settlement", 3600, preimage)
    assert again.payment_hash == h
    with pytest.raises(ValueError, match="already"):  # our node lists it: not taken
        payer.offered(2, again.bolt11, h, 10**6, 10.0, node_says(h, False))
    assert payer.asks(2)  # asked again later
    # taken all the same (our node said nothing of it, say): the old payment is not its
    assert payer.offered(2, again.bolt11, h, 10**6, 11.0) == [Pay(2, again.bolt11, 10_000)]
    pay(2, again.bolt11)
    s = payer.state
    assert s.settled == 1 and s.paid_msat == 1_000 and s.fees_msat >= 0
    assert s.batch is not None and s.batch.id == 2 and s.owed == [(2, 10**6)]
    assert net.nodes["q2"].invoices[label("p", 2)].status == "unpaid"  # nothing was sent


def test_a_payment_whose_record_the_payer_lost_is_taken_from_its_node() -> None:
    """The payer's store says it only asked for batch 1's invoice, which its node paid
    (the record lost): the payee, having released the batch, offers the invoice again,
    and the payer takes what its node paid of it as the batch's, fee and all."""
    net = Network(lambda: 1_800_000_000.0, seed=1)
    for name in ("p", "q"):
        net.add_node(name)
        net.fund(name, 50_000_000)
    net.fundchannel("p", "q", 40_000_000, 0)
    net.mine(1)
    payer = Payer(PayerState("p", "q"), fee_limit_msat=10_000)
    payee = Payee(PayeeState("p", "q"))
    payer.owe(1, 5_000)
    payee.announced(1, 5_000)
    [request] = payer.tick(0.0)
    assert isinstance(request, RequestInvoice)
    lost = copy.deepcopy(payer.state)  # what the store keeps
    assert payee.request(1, 1, 1, 5_000) == [MakeInvoice(1, label("p", 1), 5_000)]
    preimage = hmac.digest(KEY, label("p", 1).encode(), "sha256")
    invoice = net.invoice("q", 5_000, label("p", 1), "settlement", 3600, preimage)
    payee.made(1, invoice.bolt11, 3600.0)
    attempt = net.start_payment("p", invoice.bolt11, None, 10_000, False)
    assert isinstance(attempt, Attempt)
    net.advance(attempt)
    assert payee.paid(label("p", 1), 5_000) == [Release(1, 1, 1)]

    payer = Payer(lost, fee_limit_msat=10_000)  # restarted from it
    assert payer.resume(1.0) == [request]
    assert payer.cancelled(1, True, 1.0) == []  # no hash of ours to look up
    assert payer.asks(1)
    assert payee.request(1, 1, 1, 5_000) == [Offer(1, invoice.bolt11)]
    h = invoice.payment_hash
    listed = outgoing(net.pays("p", h), h, False)
    assert payer.offered(1, invoice.bolt11, h, 5_000, 2.0, listed) == []  # nothing paid
    s = payer.state
    assert s.batch is None and s.settled_upto == 1 and s.paid_msat == 5_000
    assert s.fees_msat == (listed.sent_msat or 0) - 5_000 >= 0
