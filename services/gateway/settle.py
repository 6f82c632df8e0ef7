"""Settlement between operators: the shell around ``constellation.settlement``.

For each operator it settles with (the guild's other members, and the layout's
neighbours: operators of other guilds), this operator is a ``Payer`` (what its ledger
paid into the peer's) and a ``Payee`` (what the peer's ledger paid into it). The shell:

* takes obligations from the index's ``outbound`` rows (``SettleStore.take``) and
  announces them to the payee, which stores them as pending outputs (the receiver sees
  them, with the coin each will become) and says how far it holds them;
* carries out the machines' actions: messages to the peer, sealed with the operator
  key (``SettleLink``) on the peer's NATS, under the name the peer knows it by (the user
  of the credentials the peer issued it); invoices, payments and look-ups at the
  operator's Lightning node; releases, which issue each paid output's coin in this ledger
  (``release_batch``: each output applied once however often it is asked for);
* persists each machine's state (``SettleStore.save_state``) before it acts on what a
  call returned, and on start loads it and carries out ``resume()``;
* takes at most ``st.MAX_PENDING`` outputs pending from a peer (the rest is announced
  again once some are released: a peer pays nothing to announce);
* checks the reserve invariant every second (``Reserve``), over every peer it ever
  settled with: a peer gone from the layout (a member that left, a neighbour dropped)
  keeps its state in the store, read here and never acted on, so that what was paid to
  it stays paid in the books; what it is still owed, or owes, is said loudly at start
  and in ``summary`` (nothing settles it until it is back in the layout).

One gateway of an operator settles at a time: the holder of a PostgreSQL advisory lock
(the others stand by and take over when its session ends). A gateway that lost it may
still be in a call (a peer's message, a task) before its next tick sees so: it writes
nothing (the store writes through the lock's session) and sends no payment (its node is
told to pay only where that session still answers right before the command goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from constellation import settlement as st
from constellation.errors import AlreadyCommitted, ConstellationError
from constellation.keys import SigningKey
from constellation.lightning import Outcome, PaymentState, spent_at_most
from constellation.protocol import settlement as sp
from constellation.tx import ledger_id
from services.database import DATABASE_DOWN
from services.ecash.store import MintBooks, mint_books
from services.gateway.lightning import (
    Balances,
    Channel,
    Income,
    LightningBackend,
    LightningError,
    our_side_msat,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.settle_store import LockLost, SettleStore
from services.partition.client import LedgerClient, LedgerUnavailable
from services.replica.config import Layout
from services.replica.transport import SETTLE_LISTEN, SettleLink, settle_subject
from services.runtime import close_nats, connect_peer, now_ms

log = logging.getLogger("settle")

TICK_S = 0.1
LEAD_RETRY_S = 1.0
ANNOUNCE_RETRY_S = 1.0  # obligations not acknowledged are announced again
TAKE_LIMIT = 4096  # obligations taken at once
RELEASE_CHUNK = 256  # coins issued at once
INVOICE_EXPIRY_S = 3600
RESERVE_EVERY_S = 1.0
CONFIRM = 5  # reserve checks in a row beyond what is in flight: the invariant is broken
RECENT_BATCHES = 60  # the liquidity policy expects the most of these
# lightningd's label of what its keysend plugin received: a payment nobody asked us for
UNSOLICITED = "keysend-"


@dataclass
class Departed:
    """A peer this operator settled with, gone from the layout: both machines' states as
    stored, read for the books only (nothing is sent to it, paid or released)."""

    name: str
    payer: st.Payer
    payee: st.Payee
    owed: int  # obligations to it in the store after those settled (at most TAKE_LIMIT)


@dataclass
class Pair:
    """This operator and one peer: both machines and what the shell keeps beside them."""

    name: str
    ledger: bytes
    payer: st.Payer
    payee: st.Payee
    entries: dict[int, sp.Entry] = field(default_factory=dict)  # owed, not yet acknowledged
    acked: int = 0  # the payee holds every obligation up to here
    sent: int = 0  # announced up to here
    announced_at: float = 0.0
    releasing: asyncio.Task[None] | None = None
    release_after: float = 0.0  # a refused release is tried again from then
    release_backoff: float = 0.0
    paying: asyncio.Task[None] | None = None  # the pay command of the batch in flight
    paying_batch: int = -1  # which batch that command pays
    last_failure: str = ""
    node_id: str = ""  # the peer's Lightning node, as its invoices name it
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_BATCHES))
    invoicing: asyncio.Lock = field(default_factory=asyncio.Lock)  # make, cancel: in turn
    client: Client | None = None
    announced: dict[int, float] = field(default_factory=dict)  # pending here: seq -> seen
    releasing_msat: int = 0  # being issued now
    full: bool = False  # the peer announced more than we take: said once


def _expected(p: Pair) -> int:
    return max(max(p.recent, default=0), p.payer.owed_msat)


def _why(exc: BaseException) -> str:
    """Why the settlement stood down (it loads its store again once it leads)."""
    return "this gateway lost the settlement lock" if isinstance(exc, LockLost) else "database down"


def _payer_blob(s: st.PayerState) -> bytes:
    return msgspec.msgpack.encode(replace(s, owed=[]))


def _payee_blob(s: st.PayeeState) -> bytes:
    return msgspec.msgpack.encode(replace(s, pending=[]))


@dataclass
class Settings:
    operator: str
    layout: Layout
    key: SigningKey  # the operator key: seals messages to peers
    issuer: SigningKey  # issues released outputs into this ledger
    peers: dict[str, str]  # peer name -> its NATS URL with the credentials it issued us
    database_url: str
    period_s: float = st.PERIOD_S
    fee_limit_msat: int = 10_000
    max_batch_msat: int = 10**9  # a batch pays at most this (a channel carries it)

    @property
    def counterparts(self) -> list[tuple[str, bytes]]:
        """(name, operator key) of each operator this one settles with: the guild's other
        members, then the neighbours."""
        members = [(m.name, m.key) for m in self.layout.members if m.name != self.operator]
        return members + [(n.name, n.key) for n in self.layout.neighbours]

    def publish_as(self, peer: str) -> str:
        """The name ``peer`` knows this operator by: the user of the credentials it issued
        (a neighbour's guild names its own members as it likes)."""
        return urlsplit(self.peers[peer]).username or self.operator


def _fee(pair: Pair, batch: int, state: PaymentState) -> int:
    """The routing fee batch ``batch``'s settled payment cost: what left the node less the
    batch; where the node does not say (``listpays`` of Core Lightning v24.11's ``xpay``
    has no ``amount_msat``), the whole fee limit, never 0. Negative where what left the
    node was less than the batch: not this batch's payment (``Payer.outcome`` says so)."""
    b = pair.payer.state.batch
    if state.outcome is not Outcome.SETTLED or b is None or b.id != batch:
        return 0
    return spent_at_most(state, b.amount_msat, pair.payer.fee_limit_msat) - b.amount_msat


class Settler:
    def __init__(
        self,
        settings: Settings,
        store: SettleStore,
        backend: LightningBackend,
        ledger: LedgerClient,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        s = self.settings = settings
        self.store = store
        self.backend = backend
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.link = SettleLink(s.key, s.counterparts)
        self.pairs: dict[str, Pair] = {}
        self.departed: dict[str, Departed] = {}  # peers gone from the layout
        self.unsolicited_msat = 0  # received not for any invoice we made (keysend)
        self.by_ledger: dict[bytes, str] = {}
        self.saved: dict[tuple[str, str], bytes] = {}
        self.lock = asyncio.Lock()
        self.leading = False
        self.reserve = Reserve()
        self._tasks: set[asyncio.Task[Any]] = set()
        # a call whose state was not persisted (its database failed): the memory may be
        # ahead of the store, so the settlement stands by and loads the store again
        self.stale = False

    # -- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Stand by until this process holds the lock, then settle until it loses it
        or its database (the state is loaded again from it), and stand by again."""
        while True:
            await self._stand_by()
            try:
                await self._settle()
            except DATABASE_DOWN as exc:  # what the store holds is loaded again
                log.warning(
                    "settlement stopped for its database: standing by", extra={"error": repr(exc)}
                )

    async def _stand_by(self) -> None:
        """Until this process holds the lock (another holds it, or the database is down)."""
        while True:
            try:
                if await self.store.lead(self.settings.database_url):
                    return
            except DATABASE_DOWN as exc:
                log.warning("settlement waits for the database", extra={"error": repr(exc)})
            await asyncio.sleep(LEAD_RETRY_S)

    async def _settle(self) -> None:
        """Settle while this process holds the lock."""
        await self._load()
        self.stale = False
        self.leading = True
        self.metrics.settle_leading.set(1)
        log.info("settling", extra={"peers": list(self.pairs)})
        sub = await self.ledger.nc.subscribe(SETTLE_LISTEN, cb=self._on_message)
        for pair in self.pairs.values():
            self._spawn(self._connect(pair))
        stream = self._spawn(self._paid_stream())
        self._spawn(self._reserve_forever())
        try:
            for pair in self.pairs.values():
                await self._act(pair, pair.payer.resume(self.clock()))
                await self._act(pair, pair.payee.resume())
            while True:
                if not await self.store.still_leading():
                    log.warning("settlement lock lost (its database connection): standing by")
                    return
                if self.stale:
                    log.warning("settlement state not persisted: standing by")
                    return
                if stream.done():  # it ends only by failing (its database: standing by)
                    raise stream.exception() or RuntimeError("the paid invoices' stream ended")
                await self._step()
                await asyncio.sleep(TICK_S)
        finally:
            self.leading = False
            self.metrics.settle_leading.set(0)
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
            for task in list(self._tasks):
                task.cancel()
            for pair in self.pairs.values():
                if pair.client is not None:
                    await close_nats(pair.client)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, DATABASE_DOWN):  # the settlement starts over from its store
            self.stale = True
            log.warning(f"a settlement task stopped: {_why(exc)}", extra={"error": repr(exc)})
        elif exc is not None:
            log.error("a settlement task failed", exc_info=exc)

    async def _load(self) -> None:
        s = self.settings
        states = await self.store.load_states()
        raw = states.get(("reserve", "baseline"))
        if raw:
            self.reserve.baseline = int.from_bytes(raw, "big", signed=True)
        for name, key in s.counterparts:
            raw = states.get(("payer", name))
            payer_state = (
                msgspec.msgpack.decode(raw, type=st.PayerState)
                if raw
                else st.PayerState(s.operator, name)
            )
            payer_state.closed_at = float("-inf")  # the wall clock may have moved back
            raw = states.get(("payee", name))
            payee_state = (
                msgspec.msgpack.decode(raw, type=st.PayeeState)
                if raw
                else st.PayeeState(name, s.operator)
            )
            pair = Pair(
                name,
                ledger_id(key),
                st.Payer(payer_state, s.fee_limit_msat, s.period_s, s.max_batch_msat),
                st.Payee(payee_state),
            )
            after = payer_state.settled_upto
            while batch := await self.store.owed(name, after, TAKE_LIMIT):
                for e in batch:
                    pair.payer.owe(e.seq, e.value_msat)
                    pair.entries[e.seq] = e
                after = batch[-1].seq
            pair.acked = pair.sent = payer_state.settled_upto
            for e in await self.store.pending(name, payee_state.released_upto):
                pair.payee.announced(e.seq, e.value_msat)
            self.saved[("payer", name)] = _payer_blob(payer_state)
            self.saved[("payee", name)] = _payee_blob(payee_state)
            self.pairs[name] = pair
            self.by_ledger[pair.ledger] = name
        gone = {peer for role, peer in states if role in ("payer", "payee")} - set(self.pairs)
        for name in sorted(gone):
            await self._departed(name, states)
        raw = states.get(("stream", "lightning"))
        self.unsolicited_msat = int.from_bytes(raw[8:], "big") if raw else 0

    async def _departed(self, name: str, states: dict[tuple[str, str], bytes]) -> None:
        """A peer with a stored state that is no longer in the layout: kept for the books
        (everything paid to it stays paid), and what is unsettled with it said loudly."""
        s = self.settings
        raw = states.get(("payer", name))
        payer_state = (
            msgspec.msgpack.decode(raw, type=st.PayerState) if raw else st.PayerState("", name)
        )
        raw = states.get(("payee", name))
        payee_state = (
            msgspec.msgpack.decode(raw, type=st.PayeeState) if raw else st.PayeeState(name, "")
        )
        owed = await self.store.owed(name, payer_state.settled_upto, TAKE_LIMIT)
        gone = Departed(
            name,
            st.Payer(payer_state, s.fee_limit_msat),
            st.Payee(payee_state),
            len(owed),
        )
        for e in owed:
            gone.payer.owe(e.seq, e.value_msat)
        for e in await self.store.pending(name, payee_state.released_upto):
            gone.payee.announced(e.seq, e.value_msat)
        self.departed[name] = gone
        unsettled = {
            "peer": name,
            "owed_to_it": len(owed),
            "owed_to_it_msat": gone.payer.owed_msat,
            "batch_in_flight": payer_state.batch is not None,
            "held_from_it": len(payee_state.pending),
            "held_from_it_msat": gone.payee.pending_msat,
            "paid_not_issued_msat": sum(r[3] for r in payee_state.releasing),
        }
        if owed or payer_state.batch is not None or payee_state.pending or payee_state.releasing:
            log.error("a peer gone from the layout is not settled with", extra=unsettled)
        else:
            log.info("a peer gone from the layout, settled with", extra=unsettled)

    async def _connect(self, pair: Pair) -> None:
        pair.client = await connect_peer(
            self.settings.peers[pair.name], f"settle-{self.settings.operator}", pair.name
        )

    async def _send(self, pair: Pair, msg: sp.Message) -> None:
        client = pair.client
        if client is None or not client.is_connected:
            self.metrics.settle_unsent.labels(pair.name).inc()
            return
        data = self.link.seal(pair.name, sp.encode(msg), now_ms())
        try:
            await client.publish(settle_subject(self.settings.publish_as(pair.name)), data)
        except NatsError as exc:  # lost like any message: the machines ask again
            self.metrics.settle_unsent.labels(pair.name).inc()
            log.debug("not sent", extra={"peer": pair.name, "error": str(exc)})

    # -- each tick --------------------------------------------------------------------

    async def _step(self) -> None:
        last = {
            name: p.payer.state.owed[-1][0] if p.payer.state.owed else p.payer.state.settled_upto
            for name, p in self.pairs.items()
        }
        taken = await self.store.take(self.by_ledger, last, TAKE_LIMIT)
        for name, e in taken:
            pair = self.pairs[name]
            pair.payer.owe(e.seq, e.value_msat)
            pair.entries[e.seq] = e
            self.metrics.settle_owed.labels(name).inc(e.value_msat)
        now = self.clock()
        for pair in self.pairs.values():
            await self._announce(pair, now)
            async with self.lock:
                actions = pair.payer.tick(now) + pair.payee.tick(now)
                await self._persist(pair)
            await self._act(pair, actions)
            self._start_release(pair, now)
            self._gauges(pair, now)

    async def _announce(self, pair: Pair, now: float) -> None:
        last = max(pair.entries, default=0)
        if pair.acked < pair.sent and now - pair.announced_at >= ANNOUNCE_RETRY_S:
            pair.sent = pair.acked  # not acknowledged: from there again
        if pair.sent >= last:
            return
        entries = []
        for q in range(pair.sent + 1, min(last, pair.sent + sp.MAX_ENTRIES) + 1):
            if q not in pair.entries:
                break
            entries.append(pair.entries[q])
        if not entries:
            return
        pair.sent, pair.announced_at = entries[-1].seq, now
        await self._send(pair, sp.Announce(entries))

    async def _persist(self, pair: Pair) -> None:
        """Write each machine's state where it changed (called under ``self.lock``)."""
        for role, blob in (
            ("payer", _payer_blob(pair.payer.state)),
            ("payee", _payee_blob(pair.payee.state)),
        ):
            if self.saved.get((role, pair.name)) != blob:
                await self.store.save_state(role, pair.name, blob)
                self.saved[(role, pair.name)] = blob

    def _gauges(self, pair: Pair, now: float) -> None:
        m = self.metrics
        m.settle_pending.labels(pair.name, "owed").set(len(pair.payer.state.owed))
        m.settle_pending.labels(pair.name, "held").set(len(pair.payee.state.pending))
        m.settle_expected.labels(pair.name).set(_expected(pair))
        oldest = next(iter(pair.announced.values()), now)  # seen in the order of seq
        m.settle_pending_age.labels(pair.name).set(now - oldest)

    # -- actions ----------------------------------------------------------------------

    async def _act(self, pair: Pair, actions: list[st.Action]) -> None:
        for a in actions:
            if isinstance(a, st.RequestInvoice):
                await self._send(pair, sp.AskInvoice(a.batch, a.first, a.last, a.amount_msat))
            elif isinstance(a, st.RequestCancel):
                await self._send(pair, sp.AskCancel(a.batch))
            elif isinstance(a, st.Offer):
                await self._send(pair, sp.Offer(a.batch, a.bolt11))
            elif isinstance(a, st.Refuse):
                await self._send(pair, sp.Refuse(a.batch, a.reason[: sp.MAX_REASON]))
            elif isinstance(a, st.Cancelled):
                await self._send(pair, sp.Cancelled(a.batch, a.paid))
            elif isinstance(a, st.Pay):
                self._pay(pair, a)
            elif isinstance(a, st.LookUp):
                self._spawn(self._look_up(pair, a))
            elif isinstance(a, st.MakeInvoice):
                self._spawn(self._make_invoice(pair, a))
            elif isinstance(a, st.CancelInvoice):
                self._spawn(self._cancel_invoice(pair, a))
            else:  # Release
                self._start_release(pair, self.clock())

    async def _call(self, pair: Pair, call: Callable[[], list[st.Action]]) -> None:
        """A call into a machine of ``pair``: its state persisted, then its actions."""
        async with self.lock:
            s = pair.payer.state
            before = (s.batch, s.settled, s.failed)
            actions = call()
            await self._persist(pair)
            self._count(pair, *before)
        await self._act(pair, actions)

    def _pay(self, pair: Pair, a: st.Pay) -> None:
        if pair.paying is not None and not pair.paying.done() and pair.paying_batch == a.batch:
            return  # asked again while its command runs: lightningd pays a hash once
        self.metrics.settle_payments.labels(pair.name).inc()

        b = pair.payer.state.batch
        known = b.payment_hash if b is not None and b.id == a.batch else None

        async def pay() -> None:
            # a successor resumes this payment from the store (PAYING was written through
            # the lock's session) and judges it by when its own command went: one of ours
            # sent after that session ended could land after it gave the payment up
            state = await self.backend.pay(
                a.bolt11, a.fee_limit_msat, known, self.store.still_leading
            )
            fee = _fee(pair, a.batch, state)
            pair.last_failure = state.reason
            await self._call(
                pair,
                lambda: pair.payer.outcome(
                    a.batch,
                    state.outcome,
                    self.clock(),
                    fee,
                    state.amount_msat,
                    state.last_attempt_at,
                ),
            )

        pair.paying, pair.paying_batch = self._spawn(pay()), a.batch

    async def _look_up(self, pair: Pair, a: st.LookUp) -> None:
        state = await self.backend.payment(a.payment_hash, a.attempted)
        outcome = state.outcome
        if outcome is Outcome.FAILED and pair.paying is not None and not pair.paying.done():
            # every attempt so far failed, and the pay command is still trying others
            outcome = Outcome.UNKNOWN
        fee = _fee(pair, a.batch, state)
        await self._call(
            pair,
            lambda: pair.payer.outcome(
                a.batch, outcome, self.clock(), fee, state.amount_msat, state.last_attempt_at
            ),
        )

    def _count(
        self, pair: Pair, b: st.Batch | None, settled_before: int, failed_before: int
    ) -> None:
        """Metrics for a batch the last call settled or gave up."""
        s, m = pair.payer.state, self.metrics
        if b is None:
            return
        if s.settled > settled_before:
            pair.recent.append(b.amount_msat)
            m.settle_batches.labels(pair.name, "settled").inc()
            m.settle_paid.labels(pair.name).inc(b.amount_msat)
            m.settle_batch_seconds.observe(self.clock() - b.since)
            for q in range(b.first, b.last + 1):
                pair.entries.pop(q, None)
            # the payee invoiced them: it held every one
            pair.acked, pair.sent = max(pair.acked, b.last), max(pair.sent, b.last)
        elif s.failed > failed_before:
            m.settle_batches.labels(pair.name, "failed").inc()
            code = "payment_failed" if b.payment_hash else "no_invoice"
            m.settle_failures.labels(code).inc()
            log.warning(
                "settlement batch not paid: its obligations go into the next",
                extra={"peer": pair.name, "batch": b.id, "code": code, "why": pair.last_failure},
            )

    async def _make_invoice(self, pair: Pair, a: st.MakeInvoice) -> None:
        """Make the batch's invoice, only while the batch is open: made after it was
        cancelled, it could be paid with nothing released for it."""
        async with pair.invoicing:
            o = pair.payee.state.open
            if o is None or o.batch != a.batch:
                return
            if o.bolt11:  # made before a restart: found, or deleted by a cancel under way
                try:
                    found = await self.backend.invoice(a.label)
                except LightningError as exc:
                    log.warning("invoice not found", extra={"peer": pair.name, "error": str(exc)})
                    return
                if found is None:
                    await self._call(pair, lambda: pair.payee.cancel_result(a.batch, False))
                else:
                    await self._call(
                        pair, lambda: pair.payee.made(a.batch, found.bolt11, found.expires_at)
                    )
                return
            preimage = st.invoice_preimage(self.settings.key.secret, a.label)
            try:
                inv = await self.backend.create_invoice(
                    a.amount_msat,
                    a.label,
                    f"settlement batch {a.batch} from {pair.name}",
                    INVOICE_EXPIRY_S,
                    preimage,
                )
            except LightningError as exc:  # the payer asks again
                log.warning("no invoice made", extra={"peer": pair.name, "error": str(exc)})
                return
            await self._call(pair, lambda: pair.payee.made(a.batch, inv.bolt11, inv.expires_at))

    async def _cancel_invoice(self, pair: Pair, a: st.CancelInvoice) -> None:
        async with pair.invoicing:
            try:
                cancelled = await self.backend.cancel_invoice(a.label)
            except LightningError as exc:  # the payer asks again
                log.warning("invoice not cancelled", extra={"peer": pair.name, "error": str(exc)})
                return
            await self._call(pair, lambda: pair.payee.cancel_result(a.batch, not cancelled))

    async def _paid_stream(self) -> None:
        """Paid invoices from the node, from where the last run stopped."""
        states = await self.store.load_states()
        raw = states.get(("stream", "lightning"))
        after = int.from_bytes(raw[:8], "big") if raw else 0
        async for inv in self.backend.paid_invoices(after):
            parts = inv.label.split(":")
            pair = self.pairs.get(parts[1]) if len(parts) == 3 and parts[0] == "settle" else None
            if pair is not None and inv.status == "paid":
                received = inv.amount_received_msat or 0
                await self._call(pair, functools.partial(pair.payee.paid, inv.label, received))
            elif inv.status == "paid" and inv.label.startswith(UNSOLICITED):
                # in the channel, owed to nobody: the operator's, like what it earns routing
                self.unsolicited_msat += inv.amount_received_msat or 0
            if inv.pay_index is not None:  # with the sum: one row, so counted once
                blob = inv.pay_index.to_bytes(8, "big") + self.unsolicited_msat.to_bytes(16, "big")
                await self.store.save_state("stream", "lightning", blob)

    def _start_release(self, pair: Pair, now: float) -> None:
        if not pair.payee.state.releasing or now < pair.release_after:
            return
        if pair.releasing is None or pair.releasing.done():
            pair.releasing = self._spawn(self._release(pair))

    async def _release(self, pair: Pair) -> None:
        """Issue the coins of every batch paid and not yet released, then say so; a
        refusal waits, longer each time, and is said loudly."""
        for batch, first, last, amount in list(pair.payee.state.releasing):
            pair.releasing_msat = amount
            try:
                refused = await self._issue(pair, batch, first, last)
            except DATABASE_DOWN:
                raise  # the settlement starts over from its store
            except Exception as exc:  # a bug, or an answer not understood: not at once again
                log.exception("a release failed", extra={"peer": pair.name, "batch": batch})
                refused = f"{type(exc).__name__}: {exc}"
            if refused:
                pair.release_backoff = min(max(1.0, pair.release_backoff * 2), 60.0)
                pair.release_after = self.clock() + pair.release_backoff
                self.metrics.settle_release_refused.labels(pair.name).inc()
                log.error(
                    "a release was refused: tried again later",
                    extra={"peer": pair.name, "batch": batch, "why": refused},
                )
                return
            pair.release_backoff = 0.0
            await self.store.released(pair.name, first, last, batch)
            now = self.clock()
            for q in range(first, last + 1):
                seen = pair.announced.pop(q, None)
                if seen is not None:
                    self.metrics.settle_release_seconds.observe(now - seen)
            self.metrics.settle_released.labels(pair.name).inc(amount)
            async with self.lock:
                pair.payee.released(batch)
                await self._persist(pair)
            pair.releasing_msat = 0

    async def _issue(self, pair: Pair, batch: int, first: int, last: int) -> str:
        """Issue outputs ``first..last`` from ``pair``'s peer here; why not, if not."""
        rows = await self.store.releases(pair.name, first, last)
        if len(rows) != last - first + 1:
            return f"outputs {first}..{last} are not all held here"
        issuer = self.settings.issuer.pubkey
        for e, release_id in rows:
            coin = st.release_coin(issuer, pair.ledger, e.coin_id, e.value_msat, e.owner)
            if coin != release_id:  # the issuer key changed meanwhile
                return f"output {e.seq} was announced as coin {release_id.hex()}"
        # one signature a chunk: the ledger applies each entry once, however often asked
        entries = [(pair.ledger, e.coin_id, e.value_msat, e.owner) for e, _ in rows]
        batches = [
            st.release_batch(issuer, entries[at : at + RELEASE_CHUNK]).signed_by(
                self.settings.issuer.secret
            )
            for at in range(0, len(entries), RELEASE_CHUNK)
        ]
        results = await asyncio.gather(
            *(self.ledger.issue(b, b.encode(), 10.0) for b in batches), return_exceptions=True
        )
        for r in results:
            if isinstance(r, LedgerUnavailable):
                return str(r)
            if isinstance(r, BaseException):
                raise r
            refused = [x for x in r if x.code and x.code != AlreadyCommitted.code]
            if refused:
                return f"{refused[0].code}: {refused[0].detail}"
        return ""

    # -- messages from peers ----------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        try:
            name, body = self.link.open(msg.subject, msg.data, now_ms())
            pair = self.pairs[name]
            message = sp.decode(body)
        except (ConstellationError, KeyError) as exc:
            self.metrics.settle_refused.inc()
            log.info(
                "settlement message refused", extra={"subject": msg.subject, "error": str(exc)}
            )
            return
        try:
            await self._take(pair, message)
        except DATABASE_DOWN as exc:  # the peer tells it again; the store is loaded again
            self.stale = True
            log.warning(
                f"settlement message not taken: {_why(exc)}",
                extra={"peer": pair.name, "error": repr(exc)},
            )

    async def _take(self, pair: Pair, message: sp.Message) -> None:
        now = self.clock()
        if isinstance(message, sp.Announce):
            await self._announced(pair, message, now)
        elif isinstance(message, sp.AskInvoice):
            await self._call(
                pair,
                lambda: pair.payee.request(
                    message.batch, message.first, message.last, message.amount_msat
                ),
            )
        elif isinstance(message, sp.AskCancel):
            await self._call(pair, lambda: pair.payee.cancel(message.batch))
        elif isinstance(message, sp.Announced):
            pair.acked = max(pair.acked, message.upto)
            for q in [q for q in pair.entries if q <= pair.acked and q <= pair.sent]:
                pair.entries.pop(q, None)
        elif isinstance(message, sp.Offer):
            await self._offered(pair, message, now)
        elif isinstance(message, sp.Refuse):
            log.info(
                "invoice refused",
                extra={"peer": pair.name, "batch": message.batch, "reason": message.reason},
            )
            await self._call(pair, lambda: pair.payer.refused(message.batch, now))
        else:
            await self._call(pair, lambda: pair.payer.cancelled(message.batch, message.paid, now))

    async def _announced(self, pair: Pair, msg: sp.Announce, now: float) -> None:
        s = pair.payee.state
        last = s.pending[-1][0] if s.pending else s.released_upto
        fresh = [e for e in msg.entries if e.seq > last]
        room = pair.payee.room
        if len(fresh) > room:  # acknowledged up to what is taken: announced again later
            self.metrics.settle_announce_refused.labels(pair.name).inc(len(fresh) - room)
            if not pair.full:
                log.warning(
                    "a peer announced more outputs than are held pending for it",
                    extra={"peer": pair.name, "pending": len(s.pending), "upto": last},
                )
            pair.full = True
            fresh = fresh[:room]
        elif room:
            pair.full = False
        if fresh and fresh[0].seq == last + 1:
            rows = [
                (
                    e,
                    st.release_coin(
                        self.settings.issuer.pubkey, pair.ledger, e.coin_id, e.value_msat, e.owner
                    ),
                )
                for e in fresh
            ]
            try:
                await self.store.add_pending(pair.name, rows)
            except asyncpg.UniqueViolationError as exc:  # one output under two numbers
                log.error("announcement refused", extra={"peer": pair.name, "error": str(exc)})
                return
            # what the table holds (rows kept from before win over a changed story)
            held = await self.store.pending(pair.name, last, fresh[-1].seq)
            async with self.lock:
                for e in held:
                    pair.payee.announced(e.seq, e.value_msat)
                    pair.announced[e.seq] = now
            last = held[-1].seq if held else last
        await self._send(pair, sp.Announced(last))

    async def _offered(self, pair: Pair, msg: sp.Offer, now: float) -> None:
        """The peer's invoice, where one is asked for: decoded by our node, paid where
        it is for the amount owed (and then its node is the peer's, for the liquidity
        policy). An offer not asked for costs no call to the node."""
        if not pair.payer.asks(msg.batch):
            return
        try:
            decoded = await self.backend.decode(msg.bolt11)
        except LightningError as exc:  # another operator's bytes, or the node is down
            log.warning(
                "an invoice that does not decode", extra={"peer": pair.name, "error": str(exc)}
            )
            await self._call(pair, lambda: pair.payer.refused(msg.batch, now))
            return
        amount = decoded.amount_msat or 0
        # what our node did with that hash (the payer takes only a new one)
        listed = await self.backend.payment(decoded.payment_hash, attempted=False)
        try:  # its command goes from now on (not from the message's arrival, before the
            # node's answers): a cancel waits out a command that may still try from then
            await self._call(
                pair,
                lambda: pair.payer.offered(
                    msg.batch, msg.bolt11, decoded.payment_hash, amount, self.clock(), listed
                ),
            )
        except ValueError as exc:  # not the amount owed, a hash paid: never paid; asked again
            log.warning("an invoice not taken", extra={"peer": pair.name, "error": str(exc)})
            await self._call(pair, lambda: pair.payer.refused(msg.batch, now))
            return
        b = pair.payer.state.batch
        if b is not None and b.id == msg.batch and b.payment_hash == decoded.payment_hash:
            pair.node_id = decoded.payee  # an invoice taken: the node we pay

    def expected(self) -> dict[str, int]:
        """What each peer's node is expected to be sent in a batch: the most of the
        recent batches, or what is owed now if more (for the liquidity policy)."""
        return {p.node_id: _expected(p) for p in self.pairs.values() if p.node_id}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, p in self.pairs.items():
            payer, payee = p.payer.state, p.payee.state
            b = payer.batch
            out[name] = {
                "owed": {
                    "outputs": len(payer.owed),
                    "msat": p.payer.owed_msat,
                    "settled_upto": payer.settled_upto,
                    "paid_msat": payer.paid_msat,
                    "fees_msat": payer.fees_msat,
                    "batches_settled": payer.settled,
                    "batches_failed": payer.failed,
                    "batch": None
                    if b is None
                    else {
                        "id": b.id,
                        "first": b.first,
                        "last": b.last,
                        "amount_msat": b.amount_msat,
                        "status": b.status.value,
                    },
                },
                "held": {
                    "outputs": len(payee.pending),
                    "msat": p.payee.pending_msat,
                    "released_upto": payee.released_upto,
                    "released_msat": payee.released_msat,
                    "open_batch": None if payee.open is None else payee.open.batch,
                },
            }
        for name, d in self.departed.items():  # nothing settles with them now: said here
            payer, payee = d.payer.state, d.payee.state
            out[name] = {
                "departed": True,
                "owed": {
                    "outputs": d.owed,
                    "msat": d.payer.owed_msat,
                    "settled_upto": payer.settled_upto,
                    "paid_msat": payer.paid_msat,
                    "batch_in_flight": payer.batch is not None,
                },
                "held": {
                    "outputs": len(payee.pending),
                    "msat": d.payee.pending_msat,
                    "released_upto": payee.released_upto,
                    "paid_not_issued_msat": sum(r[3] for r in payee.releasing),
                },
            }
        return out

    # -- the reserve invariant --------------------------------------------------------

    async def _reserve_forever(self) -> None:
        """The invariant every second, apart from the tick (a node or a worker slow to
        answer delays only this)."""
        while True:
            try:
                await self._check_reserve()
            except (LedgerUnavailable, LightningError, asyncpg.PostgresError, OSError) as exc:
                log.debug("reserve not checked", extra={"error": repr(exc)})
            await asyncio.sleep(RESERVE_EVERY_S)

    async def _check_reserve(self) -> None:
        states = await asyncio.gather(
            *(self.ledger.state(w, 2.0) for w in self.ledger.pmap.workers)
        )
        channels = await self.backend.channels()
        balances = await self.backend.balances()
        income = await self.backend.income()
        untaken, oldest = await self.store.untaken()
        async with self.store.pool.acquire() as conn:  # the mint's, where it shares the db
            mint = await mint_books(conn) or MintBooks(0, 0, 0, 0, 0)
        self.metrics.settle_untaken.set(untaken)
        self.metrics.settle_untaken_age.set(oldest)
        books = self.books(states, channels, balances, income, mint)
        had = self.reserve.baseline
        verdict = self.reserve.check(books)
        if had is None and self.reserve.baseline is not None:
            log.info("reserve baseline taken", extra={"baseline_msat": self.reserve.baseline})
            await self.store.save_state(
                "reserve", "baseline", self.reserve.baseline.to_bytes(16, "big", signed=True)
            )
        m = self.metrics
        for name, value in verdict.items():
            if name not in ("ok", "broken"):
                m.reserve_msat.labels(name).set(value)
        m.reserve_ok.set(0 if verdict["broken"] else 1)
        if verdict["broken"]:
            log.error("THE RESERVE INVARIANT IS BROKEN", extra=verdict)

    def books(
        self,
        states: list[Any],
        channels: list[Channel],
        balances: Balances,
        income: Income,
        mint: MintBooks,
    ) -> Books:
        """The books from what the ledger's workers, the node and the mint said, and the
        machines of every peer this operator ever settled with: one gone from the layout
        too (all history is in ``outbound``, so what was paid to it is too)."""
        pairs = list(self.pairs.values())
        payers = [p.payer for p in pairs] + [d.payer for d in self.departed.values()]
        payees = [p.payee for p in pairs] + [d.payee for d in self.departed.values()]
        return Books(
            held_msat=sum(x.held_msat for x in states),
            outbound_msat=sum(x.outbound_msat for x in states),
            fees_msat=sum(x.fees_msat for x in states),
            paid_out_msat=sum(p.state.paid_msat for p in payers),
            releasing_msat=sum(r[3] for p in payees for r in p.state.releasing),
            owed_by_others_msat=sum(p.pending_msat for p in payees),
            lightning_msat=our_side_msat(channels),
            onchain_msat=balances.onchain_confirmed_msat
            + balances.onchain_unconfirmed_msat
            + mint.chain_msat,  # the guild's outputs the operator's mint holds
            lightning_fees_msat=sum(p.state.fees_msat for p in payers),
            onchain_fees_msat=income.onchain_fees_msat + mint.chain_fees_msat,
            routed_msat=income.routed_msat,
            in_flight_msat=self._in_flight()
            + sum(d.payer.in_flight_msat for d in self.departed.values())
            + sum(x.pending_msat for x in states)
            + mint.reserved_msat
            + sum(abs(c.splice_msat) for c in channels),  # the wallet's or the channel's
            incoming_msat=sum(p.payee.incoming_msat for p in pairs),
            ecash_msat=mint.outstanding_msat + mint.unissued_msat - mint.l3_msat,
            ecash_fees_msat=mint.fees_msat,
            received_msat=sum(p.state.overpaid_msat for p in payees) + self.unsolicited_msat,
        )

    def _in_flight(self) -> int:
        """What may be on its way, and so counted on one side only for a moment: each
        batch being paid, each release under way (an invoice offered: ``incoming``)."""
        return sum(p.payer.in_flight_msat + p.releasing_msat for p in self.pairs.values())


@dataclass(frozen=True)
class Books:
    held_msat: int  # L3 coins in this ledger
    outbound_msat: int  # paid from this ledger to others, in all (the ledger's books)
    fees_msat: int  # collected by this ledger
    paid_out_msat: int  # of that, settled over Lightning
    releasing_msat: int  # paid to us over Lightning for outputs not yet issued here
    owed_by_others_msat: int  # outputs pending here, not paid yet
    lightning_msat: int  # our side of every channel
    onchain_msat: int
    lightning_fees_msat: int  # paid to route settlements
    onchain_fees_msat: int  # paid to miners (opens, splices, withdrawals: the node's books)
    routed_msat: int  # earned forwarding others' payments (the node's books)
    in_flight_msat: int  # on its way, either way: the books may read short or over by it
    # invoices of ours that may be paid, not yet heard of: the books may read over by it,
    # never short (a peer chooses the amount of the invoice it asks for)
    incoming_msat: int = 0
    ecash_msat: int = 0  # the mint's: outstanding ecash, and quotes paid but not issued,
    # less the L3 coins paid to the mint for ecash (held, but its own: no liability)
    ecash_fees_msat: int = 0  # kept by the mint: input fees, melt margins
    # received owed to nobody: beyond an invoice's amount (a payer may overpay), or for
    # no invoice we made (keysend): the operator's, as what it earns routing is
    received_msat: int = 0


class Reserve:
    """The reserve invariant: L3 coins held + pending outputs owed to others - pending
    outputs owed by others + outstanding ecash = Lightning local balance + on-chain
    funds, up to the fees the books name and a starting difference (coins issued without
    Lightning funds, as the local guild's genesis is).

    Pending outputs owed by others are coins of this ledger's users, held as pending:
    counted on the left as L3 coins and taken off again, they leave what was paid for
    them and not yet issued. So ``slack = funds - (held + owed to others + paid in and
    not yet issued)`` moves only by fees: up by what the ledger collects, the node
    earns forwarding and receives owed to nobody (an invoice overpaid, a keysend), down
    by what Lightning routes and miners take (the node's own books say those two). A
    change beyond what is in flight at that moment breaks it.
    """

    def __init__(self) -> None:
        self.baseline: int | None = None
        self.outside = 0  # checks in a row beyond what was in flight
        self.candidate: int | None = None

    def check(self, b: Books) -> dict[str, Any]:
        held = b.held_msat + b.owed_by_others_msat  # the users' coins, pending ones too
        owed_to_others = b.outbound_msat - b.paid_out_msat
        liabilities = held + owed_to_others - b.owed_by_others_msat
        liabilities += b.releasing_msat  # paid for, being issued
        liabilities += b.ecash_msat
        funds = b.lightning_msat + b.onchain_msat
        slack = funds - liabilities - b.fees_msat - b.ecash_fees_msat + b.lightning_fees_msat
        slack += b.onchain_fees_msat - b.routed_msat - b.received_msat
        if self.baseline is None and b.in_flight_msat == 0:
            # two quiet reads in a row that agree: not a transaction between reads (an
            # invoice of ours paid and not yet heard of can only make it read over, and
            # then the invariant later reads short: said, never hidden; a peer keeping
            # one open does not keep the baseline from being taken)
            if self.candidate == slack:
                self.baseline = slack
            self.candidate = slack
        drift = 0 if self.baseline is None else slack - self.baseline
        within = -b.in_flight_msat <= drift <= b.in_flight_msat + b.incoming_msat
        self.outside = 0 if within else self.outside + 1
        return {
            "l3_held": held,
            "owed_to_others": owed_to_others,
            "owed_by_others": b.owed_by_others_msat,
            "ecash": b.ecash_msat,
            "funds": funds,
            "slack": slack,
            "drift": drift,
            "in_flight": b.in_flight_msat,
            "incoming": b.incoming_msat,
            "ok": within,
            # a total read across workers and the node is not one instant: beyond what
            # was in flight once may be a transaction committing between two reads;
            # CONFIRM checks in a row is not
            "broken": self.outside >= CONFIRM,
        }
