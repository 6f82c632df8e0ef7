"""Settlement between two operators over Lightning: what one owes the other for payments
out of its ledger into the other's, paid as one Lightning payment per batch, exactly
once, and the outputs a batch covers released at the payee only once it is paid.

An ordered pair (payer P, payee Q) is two state machines, ``Payer`` at P and ``Payee``
at Q. Both are pure: the clock and the Lightning node's answers come in as calls; what
to do comes out as actions. The shell's contract: after every call, persist the
machine's state (``state``) before carrying out the actions it returned; after a crash,
load the state and carry out ``resume()``'s actions. Whatever is lost in between is
asked for again, and every action is idempotent where it meets the outside world.

Obligations. Every payment out of P's ledger into Q's gives Q an output that is pending
at Q, and P an obligation to Q: ``(seq, amount)``, ``seq`` counting from 1 per pair
without gaps. Both sides learn of each (``owe``, ``announced``) and hold the same list.

Batches. Every ``period_s``, with nothing in flight, P closes a batch: its obligations
after the last settled one (``first..last``, ``amount`` their sum), as many as fit in
``max_batch_msat`` (at least one) and ``MAX_BATCH_OUTPUTS``, so that a batch the channel
cannot carry does not grow for ever, and Q can hold every obligation of it. Q holds at
most ``MAX_PENDING`` of P's outputs pending (an announcement beyond is not taken, and
announced again once Q released some: a peer pays nothing to announce). Q makes one
invoice for exactly that batch, only where the range follows what it released and the
amount is what it holds pending from P there, and only one at a time: a new batch waits
until the open one is paid or cancelled. The invoice's label is ``settle:<P>:<batch>``
and its preimage derives from the batch id (the shell's ``HMAC(Q's key, label)``), so
making it again after a crash gives the same invoice. Once it expires, Q asks its node
to delete it, and closes the batch unpaid on its node's word that it can no longer be
paid (deleted, or expired; paid, it is released): a payer that neither pays nor cancels
keeps no invoice open here for ever.

The payer takes only an invoice of a hash its node has no attempt of, and writes PAYING
before it asks its node to pay (asking again after a crash is safe: lightningd never
pays one hash twice); a settled payment that gave the payee less than the batch is an
older payment of that hash, not the batch's. Its outcome is four-valued
(``constellation.lightning``): settled; failed; pending or unknown (looked up again;
where it stays so for ``GIVE_UP_S``, Q is asked to cancel the invoice). A batch whose
payment failed is cancelled at Q the same way. Cancelling, P asks its own node too until
it says the payment settled (the batch is settled) or failed with no pay command of ours
still trying (then none of it is on its way, whether Q ever answers or not). Q cancels
only an unpaid invoice, which can then never be paid (an HTLC held for it fails); a paid
one settles the batch. P does not take Q's word either way: it asks its own node once
more. Cancelled, it puts the batch's obligations into the next batch only once its node
says the payment failed, ``ATTEMPTING_S`` after it last asked its node to pay and after
the newest attempt its node lists began (a command that went late still tries) (pending
and unknown are looked up again: a payment in flight may still land, and so may a pay
command still trying routes, one sent before a restart too, where Q kept the invoice it
said it deleted; no attempt at all ``NEVER_SENT_S`` after the cancel is a payment never
sent); paid, it settles with the fee its node reports (and where its node paid nothing, someone
else paid Q's invoice: Q released, so the batch is settled all the same).

P's record of a payment can be lost (a commit lost with its database): P asks again for
the invoice of a batch its node paid. Q, having released that batch, offers its invoice
again, and P takes the payment its node made of it for the whole batch as the batch's.

Q releases a batch's outputs once its invoice is paid for the whole amount; what it
received beyond that (a payer may overpay) is the operator's, counted apart. The release
is remembered until the shell says its ledger made it (``released``), and asked for
again after a restart: the ledger's release of an output is idempotent.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from constellation.errors import TooLargeToSettle
from constellation.hashing import tagged_hasher
from constellation.keys import XOnlyPubKey
from constellation.lightning import Outcome, PaymentState, failure_final, spent_at_most
from constellation.tx import IssuanceBatch, Transaction, TxOutput

PERIOD_S = 1.0  # a batch a second, at most
RETRY_S = 2.0  # an unanswered request to the payee is sent again
LOOKUP_S = 1.0  # a payment in doubt is looked up again
GIVE_UP_S = 30.0  # a payment unknown this long: the payee is asked to cancel its invoice
# Cancelled this long, no attempt of ours at our node means none was made: we send none
# once cancelled, and a pay command ends sooner (services.gateway.lightning.RETRY_FOR_S).
NEVER_SENT_S = 60.0
# A pay command tries routes this long at most (services.gateway.lightning.RETRY_FOR_S),
# with a margin: until then, every attempt so far having failed is not the payment's
# failure (the command, perhaps one sent before a restart, may try again and land).
ATTEMPTING_S = 45.0
MAX_BATCH_OUTPUTS = 10_000  # obligations in one batch
# A peer's outputs pending at the payee, announced and not yet paid: a peer pays nothing
# to announce, and each is a row and memory here. A batch fits: the payee holds it all.
MAX_PENDING = 100_000
# What one output to another ledger carries at most, the same for every ledger of every
# guild: each is one obligation, paid whole in one batch, so one worth more than a
# channel carries would be batched alone, fail, and be batched again for ever, ahead of
# every later obligation to that ledger. A protocol constant, not a setting: the ledger
# refuses such an output where a transaction is admitted (``check_settleable``), and a
# gateway serving another member's ledger knows nothing of that member's settings.
MAX_SETTLE_MSAT = 10**9

_release_hash = tagged_hasher("constellation/release")


def label(payer: str, batch: int) -> str:
    return f"settle:{payer}:{batch}"


def check_settleable(tx: Transaction, max_batch_msat: int = MAX_SETTLE_MSAT) -> None:
    """Each output of ``tx`` to another ledger is one obligation, paid whole in one
    batch of at most ``max_batch_msat`` (what a channel carries): one worth more could
    never be paid, and batches go in order, so it would hold back every later one.

    Every ledger checks this with ``MAX_SETTLE_MSAT`` where it admits a transaction
    (``constellation.ledger.commit``: the coordinator, before anything is logged; copies
    re-executing its blocks do not check again, so a block confirmed before, or under
    another limit, replays alike everywhere). A gateway checks it first, with the smaller
    of that and its own batch size for its own operator's ledger."""
    for i, _ in tx.remote():
        value = tx.outputs[i].value_msat
        if value > max_batch_msat:
            raise TooLargeToSettle(
                f"output {i} pays {value} msat to another ledger; at most {max_batch_msat}"
                " msat a payment between ledgers (pay more in several transactions)"
            )


class Status(Enum):
    ASKED = "asked"  # the payee was asked for an invoice
    PAYING = "paying"  # the node was asked to pay it (written before)
    CANCELLING = "cancelling"  # the payee was asked to cancel it
    CANCELLED = "cancelled"  # the payee says it deleted it: our node confirms it unpaid


@dataclass
class Batch:
    id: int
    first: int
    last: int
    amount_msat: int
    status: Status = Status.ASKED
    bolt11: str = ""
    payment_hash: bytes = b""
    since: float = 0.0  # the status's start
    asked: float = 0.0  # the last request or lookup
    paid_at: float = 0.0  # the last ``Pay`` asked of the node
    paid_said: bool = False  # cancelling, the payee said its invoice was paid
    # cancelling, our node said the payment failed, and no pay command of ours can still
    # be trying: nothing of it is on its way (we send no other once cancelling)
    stopped: bool = False


# -- what the machines ask the shell to do -------------------------------------------


@dataclass(frozen=True)
class RequestInvoice:
    """Payer -> payee: an invoice for this batch."""

    batch: int
    first: int
    last: int
    amount_msat: int


@dataclass(frozen=True)
class Pay:
    batch: int
    bolt11: str
    fee_limit_msat: int


@dataclass(frozen=True)
class LookUp:
    """What our node says of the batch's payment. ``attempted`` False: no attempt of
    ours can appear any more, so none seen means it was never sent (failed)."""

    batch: int
    payment_hash: bytes
    attempted: bool = True


@dataclass(frozen=True)
class RequestCancel:
    """Payer -> payee: cancel this batch's invoice, or say it was paid."""

    batch: int


@dataclass(frozen=True)
class MakeInvoice:
    """At the payee's node (idempotent: the label and preimage derive from the batch)."""

    batch: int
    label: str
    amount_msat: int


@dataclass(frozen=True)
class Offer:
    """Payee -> payer: the invoice for a batch."""

    batch: int
    bolt11: str


@dataclass(frozen=True)
class Refuse:
    """Payee -> payer: no invoice for this batch, and why (the payer asks again later)."""

    batch: int
    reason: str


@dataclass(frozen=True)
class CancelInvoice:
    """At the payee's node: delete the unpaid invoice (refused where it was paid)."""

    batch: int
    label: str


@dataclass(frozen=True)
class Cancelled:
    """Payee -> payer: the batch's invoice can never be paid now (``paid``: it was)."""

    batch: int
    paid: bool


@dataclass(frozen=True)
class Release:
    """At the payee's ledger: the pending outputs of obligations ``first..last``."""

    batch: int
    first: int
    last: int


Action = (
    RequestInvoice
    | Pay
    | LookUp
    | RequestCancel
    | MakeInvoice
    | Offer
    | Refuse
    | CancelInvoice
    | Cancelled
    | Release
)


# -- the payer -----------------------------------------------------------------------


@dataclass
class PayerState:
    payer: str
    payee: str
    owed: list[tuple[int, int]] = field(default_factory=list)  # (seq, msat), unsettled
    settled_upto: int = 0  # obligations up to this seq are paid
    batch: Batch | None = None
    next_batch: int = 1
    closed_at: float = float("-inf")
    paid_msat: int = 0
    fees_msat: int = 0
    settled: int = 0  # batches
    failed: int = 0  # batches cancelled unpaid


class Payer:
    def __init__(
        self,
        state: PayerState,
        fee_limit_msat: int = 0,
        period_s: float = PERIOD_S,
        max_batch_msat: int = 2**64,
    ) -> None:
        self.state = state
        self.fee_limit_msat = fee_limit_msat
        self.period_s = period_s
        self.max_batch_msat = max_batch_msat
        self._owed_msat = sum(a for _, a in state.owed)  # kept as it changes

    @property
    def owed_msat(self) -> int:
        return self._owed_msat

    @property
    def in_flight_msat(self) -> int:
        """What of ours may be on its way to the payee, and so counted on one side of
        the books only: the batch being paid with its fee (booked once settled), unless
        our node said its payment failed for good."""
        b = self.state.batch
        if b is None or b.status is Status.ASKED or b.stopped:
            return 0
        return b.amount_msat + self.fee_limit_msat

    def owe(self, seq: int, amount_msat: int) -> None:
        """An obligation to the payee (told again after a crash: taken once)."""
        s = self.state
        last = s.owed[-1][0] if s.owed else s.settled_upto
        if seq <= last:
            return
        if seq != last + 1 or amount_msat <= 0:
            raise ValueError(f"obligation {seq} of {amount_msat} msat does not follow {last}")
        s.owed.append((seq, amount_msat))
        self._owed_msat += amount_msat

    def tick(self, now: float) -> list[Action]:
        s = self.state
        b = s.batch
        if b is None:
            if not s.owed or now - s.closed_at < self.period_s:
                return []
            first, last, amount = s.owed[0][0], s.owed[0][0], s.owed[0][1]
            for seq, msat in itertools.islice(s.owed, 1, MAX_BATCH_OUTPUTS):
                if amount + msat > self.max_batch_msat:
                    break
                last, amount = seq, amount + msat
            b = s.batch = Batch(s.next_batch, first, last, amount, since=now, asked=now)
            s.next_batch += 1
            s.closed_at = now
            return [RequestInvoice(b.id, first, last, b.amount_msat)]
        if b.status is Status.ASKED and now - b.asked >= RETRY_S:
            b.asked = now
            return [RequestInvoice(b.id, b.first, b.last, b.amount_msat)]
        if b.status is Status.PAYING and now - b.asked >= LOOKUP_S:
            b.asked = now
            return [LookUp(b.id, b.payment_hash)]
        if b.status is Status.CANCELLING and now - b.asked >= RETRY_S:
            b.asked = now
            return self._cancelling(b, now)
        if b.status is Status.CANCELLED and now - b.asked >= LOOKUP_S:
            b.asked = now
            return [self._look_up_cancelled(b, now)]
        return []

    @staticmethod
    def _cancelling(b: Batch, now: float) -> list[Action]:
        """Ask the payee to cancel; and our node, until it settles whether anything is on
        its way (a payee that never answers keeps nothing in flight for ever). No attempt
        of ours at our node ``NEVER_SENT_S`` after our last ``Pay`` means none was made."""
        actions: list[Action] = [RequestCancel(b.id)]
        if b.payment_hash and not b.stopped:
            actions.append(LookUp(b.id, b.payment_hash, now - b.paid_at < NEVER_SENT_S))
        return actions

    @staticmethod
    def _look_up_cancelled(b: Batch, now: float) -> LookUp:
        """A cancelled batch's payment: a payment that never reached our node (no route,
        an expired invoice, the node down when asked) shows no attempt at all, which
        after ``NEVER_SENT_S`` is a failure, not a payment still to appear."""
        return LookUp(b.id, b.payment_hash, now - b.since < NEVER_SENT_S)

    def asks(self, batch: int) -> bool:
        """Whether the payee's invoice for ``batch`` is asked for now (any other offer
        is stale, repeated or unasked: not even decoded)."""
        b = self.state.batch
        return b is not None and b.id == batch and b.status is Status.ASKED

    def offered(
        self,
        batch: int,
        bolt11: str,
        payment_hash: bytes,
        amount_msat: int,
        now: float,
        listed: PaymentState | None = None,
    ) -> list[Action]:
        """The payee's invoice for ``batch`` (its amount and hash as decoded by the
        shell; the payee's sealed message vouches for the invoice). ``listed``: what our
        node says of payments of that hash before we pay it (``attempted`` False). Only
        an invoice of a hash our node has no attempt of is taken (every batch's hash is
        new): the node pays no hash twice, and its record of an earlier payment of that
        hash (a payee's invoice reusing one, for a smaller amount) would read as this
        batch's payment; one still trying routes for another (a melt of the mint's)
        would settle both with one payment. Except a settled payment that gave the
        payee the whole batch: the batch's own, whose record we lost (``_adopt``)."""
        b = self.state.batch
        if b is None or not self.asks(batch):
            return []  # stale, or repeated
        if amount_msat != b.amount_msat:
            raise ValueError(f"batch {batch}: invoiced {amount_msat} msat, owed {b.amount_msat}")
        if listed is not None and listed.outcome is Outcome.SETTLED:
            return self._adopt(b, bolt11, payment_hash, listed)
        if listed is not None and (
            listed.outcome is not Outcome.FAILED or listed.last_attempt_at is not None
        ):  # an attempt listed, or the node not sure (unknown): the payee is asked again
            raise ValueError(
                f"batch {batch}: our node has a payment of hash {payment_hash.hex()}"
                f" already ({listed.outcome.value}); only an invoice of a new hash is paid"
            )
        b.status, b.bolt11, b.payment_hash, b.since, b.asked, b.paid_at = (
            Status.PAYING,
            bolt11,
            payment_hash,
            now,
            now,
            now,
        )
        return [Pay(b.id, bolt11, self.fee_limit_msat)]

    def _adopt(
        self, b: Batch, bolt11: str, payment_hash: bytes, listed: PaymentState
    ) -> list[Action]:
        """Our node paid the payee's invoice for this batch (of its amount, sealed by the
        payee for it) while our record says we only asked for it: we paid it and lost
        the record (written over by a settler that no longer led, or a commit lost).
        The payment settles the batch where it gave the payee the whole batch and cost
        at least that; else it is an earlier payment of that hash, not the batch's."""
        fee_msat = spent_at_most(listed, b.amount_msat, self.fee_limit_msat) - b.amount_msat
        short = listed.amount_msat is not None and listed.amount_msat < b.amount_msat
        if fee_msat < 0 or short:
            raise ValueError(
                f"batch {b.id}: our node paid hash {payment_hash.hex()} already, not for"
                " the whole batch; only an invoice of a new hash is paid"
            )
        b.bolt11, b.payment_hash = bolt11, payment_hash
        self._settle(b, fee_msat)
        return []

    def refused(self, batch: int, now: float) -> list[Action]:
        """The payee made no invoice (it has not heard of every obligation yet, say):
        the request is sent again after ``RETRY_S``."""
        b = self.state.batch
        if b is not None and b.id == batch and b.status is Status.ASKED:
            b.asked = now
        return []

    def outcome(
        self,
        batch: int,
        outcome: Outcome,
        now: float,
        fee_msat: int = 0,
        received_msat: int | None = None,
        last_attempt_at: int | None = None,
    ) -> list[Action]:
        """What the node says of the batch's payment (an answer to ``Pay`` or ``LookUp``):
        with a settled one, its routing fee (what left the node, less the batch) and what
        the payee got, where the node says; when the newest attempt it lists began.

        A settled payment that gave the payee less than the batch, or cost less than the
        batch, is not this batch's: it is an earlier payment of ours of the same hash
        (the node pays no hash twice, so none of this batch was sent or ever will be), and
        is taken as failed."""
        s = self.state
        b = s.batch
        if b is None or b.id != batch or b.status is Status.ASKED:
            return []
        short = received_msat is not None and received_msat < b.amount_msat
        if outcome is Outcome.SETTLED and (fee_msat < 0 or short):
            outcome = Outcome.FAILED
        if outcome is Outcome.SETTLED:
            self._settle(b, fee_msat)
            return []
        # Failed is final only once no pay command of ours can still be trying: neither
        # the last one asked for, nor one that began later than asked (it waited for a
        # place, say) and still tries routes (its newest attempt is recent).
        final = failure_final(
            PaymentState(outcome, b.payment_hash, last_attempt_at=last_attempt_at),
            now,
            b.paid_at,
            ATTEMPTING_S,
        )
        if b.status is Status.CANCELLING:  # the payee decides when it is cancelled
            b.stopped = final
            return []
        if b.status is Status.CANCELLED:
            # a payee that said it cancelled may have kept its invoice
            if final:
                if b.paid_said:  # paid, by someone else: the payee released it
                    self._settle(b, 0)
                else:
                    s.batch = None
                    s.failed += 1
            return []  # pending or unknown: it may still land; looked up again
        if outcome is Outcome.FAILED or now - b.since >= GIVE_UP_S:
            # failed: the invoice is unpaid; unknown for long: make sure it stays so
            b.status, b.since, b.asked = Status.CANCELLING, now, now
            return [RequestCancel(b.id)]
        return []  # pending, or unknown for now: looked up again

    def cancelled(self, batch: int, paid: bool, now: float) -> list[Action]:
        """The payee's answer to ``RequestCancel``, or to ``RequestInvoice`` for a batch
        it closed (its invoice expired before we took it): paid settles the batch;
        cancelled is confirmed with our own node before the batch is dropped."""
        b = self.state.batch
        if b is None or b.id != batch or b.status not in (Status.ASKED, Status.CANCELLING):
            return []
        if not b.payment_hash:
            # paid: our record of taking its invoice was lost; asked again, the payee
            # offers that invoice again, and our node says what it paid (``offered``)
            if paid:
                return []
            self.state.batch = None  # no invoice was ever offered: nothing was paid
            self.state.failed += 1
            return []
        b.status, b.since, b.asked, b.paid_said = Status.CANCELLED, now, now, paid
        return [LookUp(b.id, b.payment_hash)]

    def _settle(self, b: Batch, fee_msat: int) -> None:
        s = self.state
        count = b.last - b.first + 1
        assert s.owed[count - 1][0] == b.last, "a batch is not the oldest obligations"
        s.owed = s.owed[count:]
        self._owed_msat -= b.amount_msat
        s.settled_upto = b.last
        s.paid_msat += b.amount_msat
        s.fees_msat += fee_msat
        s.settled += 1
        s.batch = None

    def resume(self, now: float) -> list[Action]:
        """After a restart: carry on with the batch in flight."""
        b = self.state.batch
        if b is None:
            return []
        b.asked = now
        if b.status is Status.ASKED:
            return [RequestInvoice(b.id, b.first, b.last, b.amount_msat)]
        if b.status is Status.PAYING:  # the node pays no hash twice: asking again is safe
            b.paid_at = now
            return [Pay(b.id, b.bolt11, self.fee_limit_msat)]
        if b.status is Status.CANCELLED:
            return [self._look_up_cancelled(b, now)]
        return self._cancelling(b, now)


# -- the payee -----------------------------------------------------------------------


@dataclass
class Open:
    batch: int
    first: int
    last: int
    amount_msat: int
    bolt11: str = ""
    # from then the node is asked whether the invoice can still be paid: its expiry,
    # then every ``RETRY_S`` until the node says (unknown until it is made or found)
    check_at: float = float("inf")


@dataclass
class PayeeState:
    payer: str
    payee: str
    pending: list[tuple[int, int]] = field(default_factory=list)  # (seq, msat) announced
    released_upto: int = 0
    open: Open | None = None
    last_batch: int = 0  # the newest batch closed: released, or cancelled unpaid
    last_paid: bool = False  # whether it was released
    last_bolt11: str = ""  # its invoice, where it was released
    released_msat: int = 0
    # (batch, first, last, msat): paid, their coins not yet issued
    releasing: list[tuple[int, int, int, int]] = field(default_factory=list)
    # received beyond the amounts of the invoices paid (a payer may overpay: lightningd
    # takes up to twice the amount): the operator's, as what it earns routing is
    overpaid_msat: int = 0


class Payee:
    def __init__(self, state: PayeeState, max_pending: int = MAX_PENDING) -> None:
        self.state = state
        self.max_pending = max_pending
        # the running sum of what was announced, up to each pending output, less
        # ``_base`` (what was released): a batch's sum, and what is held, without a walk
        self._sums = list(itertools.accumulate(a for _, a in state.pending))
        self._base = 0

    @property
    def pending_msat(self) -> int:
        """What is pending here from the payer (not paid)."""
        return self._sums[-1] - self._base if self._sums else 0

    @property
    def room(self) -> int:
        """How many more outputs announced are taken now (``MAX_PENDING``): the shell
        takes no more (those it holds from before a restart, all of them)."""
        return max(0, self.max_pending - len(self.state.pending))

    @property
    def incoming_msat(self) -> int:
        """What may be paid to us and not yet heard of: the open batch's invoice."""
        o = self.state.open
        return o.amount_msat if o is not None and o.bolt11 else 0

    def announced(self, seq: int, amount_msat: int) -> None:
        """An output pending from the payer (told again after a crash: taken once)."""
        s = self.state
        last = s.pending[-1][0] if s.pending else s.released_upto
        if seq <= last:
            return
        if seq != last + 1 or amount_msat <= 0:
            raise ValueError(f"obligation {seq} of {amount_msat} msat does not follow {last}")
        s.pending.append((seq, amount_msat))
        self._sums.append((self._sums[-1] if self._sums else self._base) + amount_msat)

    def request(self, batch: int, first: int, last: int, amount_msat: int) -> list[Action]:
        """The payer asks for an invoice for a batch."""
        s = self.state
        o = s.open
        if o is not None:
            if (o.batch, o.first, o.last, o.amount_msat) != (batch, first, last, amount_msat):
                return [Refuse(batch, f"batch {o.batch} is open: cancel it first")]
            if o.bolt11:
                return [Offer(batch, o.bolt11)]  # asked again: the same invoice
            return [MakeInvoice(batch, label(s.payer, batch), amount_msat)]
        if batch == s.last_batch:  # closed before the payer took its invoice, as it says
            if s.last_bolt11:  # paid (its record of that lost): for its node to confirm
                return [Offer(batch, s.last_bolt11)]
            return [Cancelled(batch, paid=s.last_paid)]  # expired, say
        if batch < s.last_batch:
            return [Refuse(batch, f"batch {batch} is over")]
        if first != s.released_upto + 1:
            return [Refuse(batch, f"the next obligation is {s.released_upto + 1}, not {first}")]
        count = last - first + 1  # pending holds the obligations after the released ones
        if not 1 <= count <= len(s.pending):
            return [Refuse(batch, f"obligations {first}..{last} are not all announced here")]
        held = self._sums[count - 1] - self._base
        if held != amount_msat:
            return [Refuse(batch, f"obligations {first}..{last} are {held} msat")]
        s.open = Open(batch, first, last, amount_msat)
        return [MakeInvoice(batch, label(s.payer, batch), amount_msat)]

    def made(self, batch: int, bolt11: str, expires_at: float) -> list[Action]:
        """The node made (or, asked again, found) the batch's invoice, which no node pays
        from ``expires_at`` (the node's clock, as the shell's ``now``)."""
        o = self.state.open
        if o is None or o.batch != batch:
            return []
        o.bolt11, o.check_at = bolt11, expires_at
        return [Offer(batch, bolt11)]

    def tick(self, now: float) -> list[Action]:
        """The open batch's invoice expired: the node is asked to delete it, and says
        whether it was paid first (``cancel_result``). Only the node's word closes it:
        paid just before it expired, it is released all the same."""
        o = self.state.open
        if o is None or not o.bolt11 or now < o.check_at:
            return []
        o.check_at = now + RETRY_S
        return [CancelInvoice(o.batch, label(self.state.payer, o.batch))]

    def paid(self, invoice_label: str, amount_received_msat: int) -> list[Action]:
        """The node's stream says an invoice was paid (any invoice: others are not
        this pair's). What it received beyond the invoice's amount is the operator's
        (``overpaid_msat``): it is in the channel, and owed to nobody."""
        o = self.state.open
        if o is None or invoice_label != label(self.state.payer, o.batch):
            return []
        if amount_received_msat < o.amount_msat:
            return []  # cannot be (the node takes no less than the invoice); never released
        self.state.overpaid_msat += amount_received_msat - o.amount_msat
        return self._release(o)

    def cancel(self, batch: int) -> list[Action]:
        """The payer asks to cancel a batch's invoice."""
        s = self.state
        o = s.open
        if o is not None and o.batch == batch:
            if not o.bolt11:  # no invoice was made: nothing to cancel
                return self._close_unpaid(batch)
            return [CancelInvoice(batch, label(s.payer, batch))]
        if batch == s.last_batch:  # closed already: say how again
            return [Cancelled(batch, paid=s.last_paid)]
        if batch < s.last_batch or o is not None:
            return []  # an old request, or one that is not the open batch's: nothing
        return self._close_unpaid(batch)  # never opened here: it never will be

    def cancel_result(self, batch: int, paid: bool) -> list[Action]:
        """The node deleted the unpaid invoice, or refused since it was paid."""
        s = self.state
        o = s.open
        if o is None or o.batch != batch:
            return []
        if paid:  # its release comes from the stream of paid invoices, amount checked
            return []
        return self._close_unpaid(batch)

    def _close_unpaid(self, batch: int) -> list[Action]:
        s = self.state
        s.open, s.last_batch, s.last_paid, s.last_bolt11 = None, batch, False, ""
        return [Cancelled(batch, paid=False)]

    def _release(self, o: Open) -> list[Action]:
        s = self.state
        count = o.last - o.first + 1
        assert s.pending[count - 1][0] == o.last, "a batch is not the oldest obligations"
        s.pending = s.pending[count:]
        self._base = self._sums[count - 1]
        self._sums = self._sums[count:]
        s.released_upto = o.last
        s.released_msat += o.amount_msat
        s.open, s.last_batch, s.last_paid, s.last_bolt11 = None, o.batch, True, o.bolt11
        s.releasing.append((o.batch, o.first, o.last, o.amount_msat))
        return [Release(o.batch, o.first, o.last)]

    def released(self, batch: int) -> None:
        """The ledger released the batch's outputs."""
        s = self.state
        s.releasing = [r for r in s.releasing if r[0] != batch]

    def resume(self) -> list[Action]:
        """After a restart: the releases not known done, and the open batch's invoice
        made again (the node finds it; the shell makes it only while the batch is open)."""
        s = self.state
        actions: list[Action] = [Release(b, first, last) for b, first, last, _ in s.releasing]
        if s.open is not None:
            actions.append(
                MakeInvoice(s.open.batch, label(s.payer, s.open.batch), s.open.amount_msat)
            )
        return actions


# -- what derives from the batch and the obligation, the same after any crash ---------


def invoice_preimage(secret: bytes, invoice_label: str) -> bytes:
    """The preimage of a batch's invoice: HMAC-SHA256 under the payee's secret, so the
    invoice made again after a crash is the same, and nobody else can derive it."""
    return hmac.new(secret, invoice_label.encode(), hashlib.sha256).digest()


def release_nonce(payer_ledger: bytes, output_id: bytes) -> bytes:
    """The nonce of the batch entry that releases one pending output at the payee: all
    of the output's 32 bytes of entropy (a shorter one would let a payer's user grind
    two outputs into one coin)."""
    return _release_hash(payer_ledger + output_id)


def release_coin(
    issuer: bytes, payer_ledger: bytes, output_id: bytes, value_msat: int, owner: bytes
) -> bytes:
    """The coin a pending output becomes at the payee once its batch is paid, known
    while it is pending: the ledger applies its entry once, whatever the retries."""
    out = TxOutput(value_msat, XOnlyPubKey(owner))
    return IssuanceBatch.coin_of(issuer, release_nonce(payer_ledger, output_id), out)


def release_batch(
    issuer: bytes, entries: Sequence[tuple[bytes, bytes, int, bytes]]
) -> IssuanceBatch:
    """The issuance of pending outputs ``(payer ledger, output id, value, owner)`` at
    the payee (keys not checked again: the announcement's were; the ledger checks)."""
    return IssuanceBatch(
        issuer,
        [
            (release_nonce(ledger, oid), TxOutput(value, XOnlyPubKey(owner)))
            for ledger, oid, value, owner in entries
        ],
        check_keys=False,
    )
