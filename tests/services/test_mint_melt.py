"""The mint's melts against a real PostgreSQL and the simulated Lightning network
(``services.lnsim``), the mint's processes in this one (``MintApp``, its handlers called
directly): what a melt settled late through ``listpays`` cost, a melt request sent or run
again, and a payment that can never go out after the resolver's fence (a second process
may have failed the melt and freed its proofs by then), nor wait for ever for one of the
node's payment places; and a deposit paid just before its quote expired."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from aiohttp import web

from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.ecash.keyset import split
from constellation.lightning import Outcome
from constellation.protocol import cashu as nut
from services.ecash import app as mint_app
from services.ecash.app import MintApp
from services.ecash.config import Settings
from services.ecash.store import MintStore
from services.gateway import lightning
from services.gateway.lightning import ClnBackend
from services.lnsim.sim import Simulator, socket_path
from services.runtime import ConfigError
from tests.services.postgres import throwaway_postgres

CHANNEL_SAT = 1_000_000


class Body:
    """What the handlers read of an HTTP request: its body."""

    def __init__(self, body: Any) -> None:
        self.body = nut.encode(body)
        self.match_info: dict[str, str] = {}
        self.path = "/"

    async def read(self) -> bytes:
        return self.body


def request(body: Any) -> web.Request:
    return cast(web.Request, Body(body))


@dataclass
class World:
    sim: Simulator
    database_url: str

    async def mint(self) -> MintApp:
        """A mint process on the database, paying from node ``a``."""
        backend = ClnBackend(socket_path(self.sim.directory, "a"))
        await backend.connect()
        settings = Settings(
            operator="op0",
            database_url=self.database_url,
            lightning_rpc=socket_path(self.sim.directory, "a"),
            storage_key=b"k" * 32,
            http_host="127.0.0.1",
            http_port=0,
            name="melt test",
            input_fee_ppk=0,
            quote_expiry_s=3600,
            max_amount_sat=10_000_000,
            fee_reserve_ppm=10_000,  # 1 %
            fee_reserve_min_sat=2,
            log_level="INFO",
        )
        app = MintApp(settings, backend)
        store = app.store = await MintStore.open(self.database_url)
        app.master = await store.master(settings.storage_key)
        keysets = await store.keysets(app.master, "sat", 0)
        app.mint = m.Mint(keysets, settings.max_amount_sat)
        return app

    async def invoice(self, node: str, sat: int, label: str) -> str:
        backend = ClnBackend(socket_path(self.sim.directory, node))
        await backend.connect()
        return (await backend.create_invoice(sat * 1000, label, "x", 3600)).bolt11

    def paid(self, bolt11: str) -> bool:
        """Whether node ``a`` paid ``bolt11`` (an attempt of it completed)."""
        h = bytes.fromhex(self.sim.network.decode(bolt11).payment_hash or "")
        parts = self.sim.network.nodes["a"].parts
        return any(p.payment_hash == h and p.status == "complete" for p in parts)


async def shut(app: MintApp) -> None:
    """What ``MintApp.run`` closes at its end, of a mint made by ``World.mint``."""
    await app.ec.close()
    await app.db.close()


def ecash(app: MintApp, amount: int) -> list[nut.Proof]:
    """Proofs worth ``amount`` signed by the mint's active keyset (as if minted)."""
    kid = app.rules.active("sat").id
    outputs, secrets = client.outputs_of(split(amount), kid)
    keys = {kid: app.rules.keysets[kid].keys}
    return client.unblind(app.rules.sign(outputs), outputs, secrets, keys)


async def melt_body(app: MintApp, bolt11: str, blanks: int = 0) -> dict[str, Any]:
    """A melt of ``bolt11`` (its quote made), with proofs for the amount and the reserve,
    and ``blanks`` outputs for the change."""
    q = await app.melt_quote(request({"request": bolt11, "unit": "sat"}))
    body: dict[str, Any] = {
        "quote": q["quote"],
        "inputs": ecash(app, q["amount"] + q["fee_reserve"]),
    }
    if blanks:
        body["outputs"] = client.outputs_of([1] * blanks, app.rules.active("sat").id)[0]
    return body


@pytest.fixture
async def postgres() -> AsyncIterator[str]:
    async with throwaway_postgres("melt") as url:
        yield url


async def world(database_url: str, version: str) -> World:
    # a short folder: a unix socket's path has room for about 107 bytes
    sim = Simulator(Path(tempfile.mkdtemp(prefix="ln", dir="/tmp")), seed=5, version=version)
    await sim.mesh(["a", "b", "c"], CHANNEL_SAT, 3 * CHANNEL_SAT)
    await sim.add_node("far", 2 * CHANNEL_SAT)  # reached from a through c only: two hops
    sim.open_channel("far", "c", CHANNEL_SAT, CHANNEL_SAT * 500)
    return World(sim, database_url)


async def unpaid_and_free(app: MintApp, quote_id: str) -> None:
    """The melt quote is UNPAID and none of the proofs it held is held any more."""
    quote, _ = await app.db.melt_quote(quote_id, m.BOLT11) or (None, [])
    assert quote is not None and quote.state == m.MELT_UNPAID
    held = "SELECT count(*) FROM mint_proofs WHERE reserved_by = $1"
    assert await app.db.pool.fetchval(held, quote_id) == 0


async def test_a_melt_settled_late_through_xpay_s_listpays_keeps_its_routing_fee(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core Lightning v24.11's xpay lists no ``amount_msat``: the fee its node paid is
    what it sent less the invoice, not 0 (the whole reserve handed back as change)."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)  # the payee holds the HTLC past it
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        bolt11 = await w.invoice("far", 100_000, "late")
        body = await melt_body(app, bolt11, blanks=10)
        reserve = sum(p.amount for p in body["inputs"]) - 100_000
        w.sim.network.nodes["far"].faults.hold = True
        doc = await app.melt(request(body))
        assert doc["state"] == "PENDING"  # the pay call timed out: in flight
        w.sim.release("far")
        await asyncio.sleep(0.2)
        await app._resolve()
        quote, change = await app.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
        assert quote is not None and quote.state == m.MELT_PAID
        fee_msat = 1 + 100_000_000 * 10 // 1_000_000  # c's: base 1 msat, 10 ppm
        assert w.sim.network.nodes["c"].fees_collected_msat == fee_msat
        assert quote.fee_paid == 2  # 1001 msat, rounded up; never 0
        assert sum(c.amount for c in change) == reserve - 2
        kept = await app.db.pool.fetchval(
            "SELECT coalesce(sum(msat), 0) FROM mint_fees WHERE kind = 'melt'"
        )
        assert kept == 2000 - fee_msat  # what the mint kept is what it did not pay
    finally:
        await shut(app)
        await w.sim.close()


async def test_a_melt_sent_again_is_answered_with_its_quote_as_it_stands(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wallet that lost a melt's answer sends the request again: it gets the quote as
    it stands, PENDING and then PAID with its change (before: refused, "pending" 20005
    and then "paid" 20006, the change out of its reach). A melt of that quote with other
    proofs is still refused."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)  # the payee holds the HTLC past it
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        bolt11 = await w.invoice("far", 100_000, "again")
        body = await melt_body(app, bolt11, blanks=10)
        other = {**body, "inputs": ecash(app, sum(p.amount for p in body["inputs"]))}
        w.sim.network.nodes["far"].faults.hold = True
        assert (await app.melt(request(body)))["state"] == "PENDING"
        again = await app.melt(request(body))
        assert (again["quote"], again["state"]) == (body["quote"], "PENDING")
        with pytest.raises(m.CashuError) as refused:
            await app.melt(request(other))
        assert refused.value.code == m.QUOTE_PENDING
        w.sim.release("far")
        await asyncio.sleep(0.2)
        await app._resolve()
        paid = await app.melt(request(body))
        assert paid["state"] == "PAID" and paid["payment_preimage"]
        assert sum(c.amount for c in paid["change"]) > 0
        with pytest.raises(m.CashuError) as refused:
            await app.melt(request(other))
        assert refused.value.code == m.INVOICE_PAID
    finally:
        await shut(app)
        await w.sim.close()


async def test_a_melt_whose_node_is_not_reachable_fails_at_once_and_frees_its_proofs(
    postgres: str,
) -> None:
    """The mint's node serves no socket (it restarts) when a melt's payment is asked:
    nothing reached it, and the melt fails (20004), its proofs free (before: PENDING, its
    proofs held until its invoice expired, days perhaps); once the node is back the same
    melt pays."""
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        bolt11 = await w.invoice("c", 10_000, "down")
        body = await melt_body(app, bolt11)
        await w.sim.set_online("a", False)
        with pytest.raises(m.CashuError) as refused:
            await app.melt(request(body))
        assert refused.value.code == m.PAYMENT_FAILED
        await unpaid_and_free(app, body["quote"])
        await w.sim.set_online("a", True)
        assert (await app.melt(request(body)))["state"] == "PAID" and w.paid(bolt11)
    finally:
        await shut(app)
        await w.sim.close()


async def test_an_invoice_its_node_paid_outside_the_mint_is_not_melted(postgres: str) -> None:
    """The gateway, on the mint's node, paid an invoice (an L3 withdrawal to it): a melt
    quote of it is refused "paid" (20006), and so is a melt of a quote made before, its
    proofs free (before: the node answered with that payment, and the melt took the
    ecash, PAID, for a payment made for another)."""
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        bolt11 = await w.invoice("c", 10_000, "twice")
        body = await melt_body(app, bolt11)
        gateway = await gateway_of(w)
        assert (await gateway.pay(bolt11, 10_000)).outcome is Outcome.SETTLED
        with pytest.raises(m.CashuError) as refused:
            await app.melt_quote(request({"request": bolt11, "unit": "sat"}))
        assert refused.value.code == m.INVOICE_PAID
        with pytest.raises(m.CashuError) as refused:
            await app.melt(request(body))
        assert refused.value.code == m.INVOICE_PAID
        await unpaid_and_free(app, body["quote"])
    finally:
        await shut(app)
        await w.sim.close()


async def test_a_paid_melt_whose_settling_a_deadlock_aborted_is_not_refused(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL aborts a melt's settling to break a deadlock (with a group of swaps,
    over their totals' rows), after its invoice was paid: the request, run again by the
    mint, answers the quote as it stands (before: "pending", 20005, for a paid
    invoice, which a wallet takes for a failure), and the resolver makes it PAID."""
    real = MintStore.finish_melt
    aborted: list[str] = []

    async def deadlocked_once(self: MintStore, quote: str, *args: Any) -> bool:
        if not aborted:
            aborted.append(quote)
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await real(self, quote, *args)

    monkeypatch.setattr(MintStore, "finish_melt", deadlocked_once)
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        bolt11 = await w.invoice("c", 10_000, "deadlock")
        body = await melt_body(app, bolt11, blanks=4)
        answer = await app._op("melt", app.melt)(request(body))
        assert aborted == [body["quote"]] and w.paid(bolt11)
        assert answer.status == 200, answer.body
        assert json.loads(cast(bytes, answer.body))["state"] == "PENDING"
        await app._resolve()
        quote, change = await app.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
        assert quote is not None and quote.state == m.MELT_PAID and change
    finally:
        await shut(app)
        await w.sim.close()


async def test_a_deposit_paid_before_its_quote_expired_is_minted_while_the_follower_lags(
    postgres: str,
) -> None:
    """A mint quote's invoice is paid just before it expires, and the follower of paid
    invoices has not seen it yet (here: not running): the mint request asks the node,
    and mints (before: refused, "expired" 20007, which a wallet takes for a lost
    deposit)."""
    w = await world(postgres, "v24.11")
    app = await w.mint()
    app.settings = dataclasses.replace(app.settings, quote_expiry_s=2)
    try:
        q = await app.mint_quote(request({"amount": 1000, "unit": "sat"}))
        payer = ClnBackend(socket_path(w.sim.directory, "b"))
        await payer.connect()
        assert (await payer.pay(q["request"], 10_000)).outcome is Outcome.SETTLED
        await asyncio.sleep(max(0.0, q["expiry"] - time.time() + 0.2))
        outputs, _ = client.outputs_of(split(1000), app.rules.active("sat").id)
        minted = await app.mint_ecash(request({"quote": q["quote"], "outputs": outputs}))
        assert sum(s.amount for s in minted["signatures"]) == 1000
        unpaid = await app.mint_quote(request({"amount": 1000, "unit": "sat"}))
        with pytest.raises(m.CashuError) as refused:
            await app.mint_ecash(request({"quote": unpaid["quote"], "outputs": outputs}))
        assert refused.value.code == m.QUOTE_UNPAID
    finally:
        await shut(app)
        await w.sim.close()


async def gateway_of(w: World) -> ClnBackend:
    """Another payer on the mint's node (node a): the gateway, paying for L3 users."""
    gateway = ClnBackend(socket_path(w.sim.directory, "a"))
    await gateway.connect()
    return gateway


async def fill_places(w: World, app: MintApp) -> list[str]:
    """Melts at ``app`` of invoices whose payees (b and far, each as many as one payee
    may have in flight) hold the HTLCs, with no room left for held payments (as when
    ``HELD_PAYMENTS`` of them are held already): each pay call times out (the melt
    answers PENDING) and keeps its payment place."""
    cast(ClnBackend, app.backend).payments.held_max = 0
    payees = ("b", "far")
    assert len(payees) * mint_app.PER_PAYEE.held >= lightning.THREADS
    held = []
    for i in range(lightning.THREADS):
        payee = payees[i % len(payees)]
        w.sim.network.nodes[payee].faults.hold = True
        bolt11 = await w.invoice(payee, 1_000, f"held-{i}")
        doc = await app.melt(request(await melt_body(app, bolt11)))
        assert doc["state"] == "PENDING"
        held.append(bolt11)
    return held


async def test_a_pay_call_late_for_its_window_is_never_sent_once_another_process_failed_it(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two mint processes, A and B, on one database. The attacker's melt of X fails;
    it fills A's payment places with melts to invoices it holds, and melts X again at A:
    the pay call waits for a place. B's resolver, which cannot see what A is paying, sees
    only the first attempt's failed group and, past its fence, fails the melt: the proofs
    are swapped away. A held HTLC is released, a place frees: A's pay call must not go
    out now (paid and refunded)."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    monkeypatch.setattr(lightning, "PLACE_S", 30.0, raising=False)
    monkeypatch.setattr(mint_app, "SEND_WINDOW_S", 1.0, raising=False)
    monkeypatch.setattr(mint_app, "ATTEMPTING_S", 1.0, raising=False)
    monkeypatch.setattr(mint_app, "FAIL_AFTER_S", 2.0, raising=False)  # before the fix
    w = await world(postgres, "v24.11")
    a, b = await w.mint(), await w.mint()
    try:
        x = await w.invoice("c", 50_000, "x")
        body = await melt_body(a, x)
        w.sim.network.nodes["c"].faults.fail_next = 1
        with pytest.raises(m.CashuError) as failed:
            await a.melt(request(body))
        assert failed.value.code == m.PAYMENT_FAILED
        await fill_places(w, a)
        second = asyncio.create_task(a.melt(request(body)))
        await asyncio.sleep(2.5)  # past the resolver's fence
        await b._resolve()
        quote, _ = await b.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
        assert quote is not None and quote.state == m.MELT_UNPAID  # B failed it
        kid = b.rules.active("sat").id  # the attacker swaps the freed proofs
        outputs, _ = client.outputs_of([p.amount for p in body["inputs"]], kid)
        await b.swap(request({"inputs": body["inputs"], "outputs": outputs}))
        w.sim.release("b")  # the places free: A's pay call takes one
        with pytest.raises(m.CashuError):
            await asyncio.wait_for(second, 10)
        await asyncio.sleep(0.2)
        assert not w.paid(x), "X paid out, and its proofs refunded"
        quote, _ = await a.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
        assert quote is not None and quote.state == m.MELT_UNPAID
    finally:
        for app in (a, b):
            await shut(app)
        await w.sim.close()


async def test_a_melt_waits_a_bounded_time_for_a_payment_place_and_never_sends_later(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Payment places held by HTLCs a payee holds for hours block no melt for ever: a
    melt given no place in time sends nothing, then or later, and is answered."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    monkeypatch.setattr(lightning, "PLACE_S", 0.5, raising=False)
    w = await world(postgres, "v26.06")
    app = await w.mint()
    try:
        await fill_places(w, app)
        x = await w.invoice("c", 20_000, "x")
        body = await melt_body(app, x)
        with pytest.raises(m.CashuError) as failed:  # answered, not stuck
            await asyncio.wait_for(app.melt(request(body)), 10)
        assert failed.value.code == m.PAYMENT_FAILED
        quote, _ = await app.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
        assert quote is not None and quote.state == m.MELT_UNPAID
        assert not await app.db.pool.fetchval(
            "SELECT count(*) FROM mint_proofs WHERE reserved_by = $1", body["quote"]
        )
        w.sim.release("b")
        await asyncio.sleep(0.5)
        assert not w.paid(x)
        assert not w.sim.network.nodes["a"].parts or all(
            p.bolt11 != x for p in w.sim.network.nodes["a"].parts
        )
    finally:
        await shut(app)
        await w.sim.close()


async def hold_melts(w: World, app: MintApp, payee: str, count: int) -> list[dict[str, Any]]:
    """``count`` 1-sat melts at ``app`` to ``payee``, which holds their HTLCs: each
    answered PENDING (its pay call timed out)."""
    w.sim.network.nodes[payee].faults.hold = True
    bodies = []
    for i in range(count):
        body = await melt_body(app, await w.invoice(payee, 1, f"hold-{payee}-{i}"))
        assert (await app.melt(request(body)))["state"] == "PENDING"
        bodies.append(body)
    return bodies


async def test_payments_their_payees_hold_leave_their_places_to_other_melts(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker melts a few sats to invoices of its own two nodes, which hold the
    HTLCs (for hours, and at no cost: failed, they give the ecash back), as many melts as
    the node has payment places: another user's melt is paid at once (before: every
    place held until the HTLCs were, any other melt refused 20004 after 15 s)."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)  # the attacker's calls answer PENDING fast
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        half = lightning.THREADS // 2  # two payees: each has no more in flight
        attack = await hold_melts(w, app, "b", half) + await hold_melts(w, app, "far", half)
        assert len(attack) == lightning.THREADS
        victim = await melt_body(app, await w.invoice("c", 50_000, "victim"))
        started = time.monotonic()
        doc = await asyncio.wait_for(app.melt(request(victim)), lightning.PLACE_S)
        assert doc["state"] == "PAID" and time.monotonic() - started < 5
        for body in attack:  # still in flight: nothing freed while a payee holds it
            quote, _ = await app.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
            assert quote is not None and quote.state == m.MELT_PENDING
    finally:
        for payee in ("b", "far"):
            w.sim.release(payee)
        await shut(app)
        await w.sim.close()


async def test_a_payee_holding_its_htlcs_has_only_so_many_melts_in_flight(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Melts to one payee with ``PER_PAYEE.held`` melts pending past a pay call (the
    payee holds their HTLCs) are refused (20004) before their proofs are reserved, at
    every mint process: one payee holding its HTLCs holds only so many of the node's
    payment places. Once they end, that payee is paid again."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    monkeypatch.setattr(
        mint_app, "PER_PAYEE", dataclasses.replace(mint_app.PER_PAYEE, held_after_s=0.5)
    )
    w = await world(postgres, "v24.11")
    a, b = await w.mint(), await w.mint()
    try:
        bodies = await hold_melts(w, a, "b", mint_app.PER_PAYEE.held)
        for app in (a, b):
            more = await melt_body(app, await w.invoice("b", 1, f"more-{id(app)}"))
            with pytest.raises(m.CashuError) as refused:
                await app.melt(request(more))
            assert refused.value.code == m.PAYMENT_FAILED
            await unpaid_and_free(app, more["quote"])
        w.sim.release("b")
        await asyncio.sleep(0.2)
        await a._resolve()
        for body in bodies:
            quote, _ = await a.db.melt_quote(body["quote"], m.BOLT11) or (None, [])
            assert quote is not None and quote.state == m.MELT_PAID
        assert (await b.melt(request(more)))["state"] == "PAID"
    finally:
        w.sim.release("b")
        for app in (a, b):
            await shut(app)
        await w.sim.close()


async def test_many_users_paying_one_payee_at_once_are_all_paid(postgres: str) -> None:
    """Twice as many melts to one payee as the node has payment places, all at once, at
    two mint processes: every one is paid (before: past four in flight to one payee,
    refused 20004, as if the payee held them; many users paying one popular node, as
    ``bench/mint.py``'s melts, were refused)."""
    w = await world(postgres, "v24.11")
    a, b = await w.mint(), await w.mint()
    try:
        apps = [a, b] * lightning.THREADS
        bodies = [
            await melt_body(app, await w.invoice("b", 1_000, f"popular-{i}"))
            for i, app in enumerate(apps)
        ]
        docs = await asyncio.gather(
            *(app.melt(request(body)) for app, body in zip(apps, bodies, strict=True))
        )
        assert [d["state"] for d in docs] == ["PAID"] * len(apps)
    finally:
        for app in (a, b):
            await shut(app)
        await w.sim.close()


async def test_a_burst_of_melts_to_one_payee_is_refused_past_its_in_flight_bound(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of melts to a payee that holds their HTLCs, all sent before any pay call
    ends (none held yet): past ``PER_PAYEE.in_flight`` in flight, the next is refused
    (20004), its proofs free; the burst would otherwise hold as many places once its pay
    calls end. The payee released, every melt of the burst is paid."""
    monkeypatch.setattr(mint_app, "PER_PAYEE", dataclasses.replace(mint_app.PER_PAYEE, in_flight=6))
    w = await world(postgres, "v24.11")
    app = await w.mint()
    w.sim.network.nodes["b"].faults.hold = True
    try:
        bodies = [
            await melt_body(app, await w.invoice("b", 1, f"burst-{i}"))
            for i in range(mint_app.PER_PAYEE.in_flight)
        ]
        burst = [asyncio.create_task(app.melt(request(body))) for body in bodies]
        pending = "SELECT count(*) FROM melt_quotes WHERE state = 'PENDING'"
        for _ in range(100):
            if await app.db.pool.fetchval(pending) == len(burst):
                break
            await asyncio.sleep(0.05)
        more = await melt_body(app, await w.invoice("b", 1, "one-more"))
        with pytest.raises(m.CashuError) as refused:
            await app.melt(request(more))
        assert refused.value.code == m.PAYMENT_FAILED
        await unpaid_and_free(app, more["quote"])
        w.sim.release("b")
        docs = await asyncio.wait_for(asyncio.gather(*burst), 30)
        assert [d["state"] for d in docs] == ["PAID"] * len(burst)
    finally:
        w.sim.release("b")
        await shut(app)
        await w.sim.close()


async def test_a_payment_the_gateway_made_while_a_melt_waited_to_send_is_not_the_melt_s(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway (same node, an L3 withdrawal) pays X after mint process A's melt of X
    began and before its pay command goes (here: while it waits for a payment place).
    Process B's resolver finds X settled at the node: not the melt's payment, its
    command has not gone (before: B made the melt PAID). A's command never goes: the
    melt fails, "paid" (20006), its proofs free (before: PAID, the ecash taken for the
    gateway's payment)."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    w = await world(postgres, "v24.11")
    a, b = await w.mint(), await w.mint()
    try:
        await fill_places(w, a)
        x = await w.invoice("c", 20_000, "x")
        body = await melt_body(a, x)
        melt = asyncio.create_task(a.melt(request(body)))
        await asyncio.sleep(1.0)  # the melt began, and waits for a place
        gateway = await gateway_of(w)
        assert (await gateway.pay(x, 10_000)).outcome is Outcome.SETTLED
        await b._resolve()
        found = await b.db.melt_quote(body["quote"], m.BOLT11)
        assert found is not None and found[0].state == m.MELT_PENDING
        w.sim.release("b")  # places free: the melt's turn comes
        with pytest.raises(m.CashuError) as refused:
            await asyncio.wait_for(melt, 30)
        assert refused.value.code == m.INVOICE_PAID
        await unpaid_and_free(a, body["quote"])
        parts = [p for p in w.sim.network.nodes["a"].parts if p.bolt11 == x]
        assert [p.status for p in parts] == ["complete"]  # the gateway's, once
    finally:
        for payee in ("b", "far"):
            w.sim.release(payee)
        for app in (a, b):
            await shut(app)
        await w.sim.close()


@pytest.mark.parametrize("version", ["v24.11", "v24.08"])
async def test_a_melt_that_cannot_see_the_node_before_sending_sends_nothing(
    postgres: str, version: str
) -> None:
    """The gateway paid X. The melt's look at the node before sending gets no answer
    (its reply lost): it sends nothing, and fails "paid" (20006), its proofs free.
    Before, its command went: ``xpay`` (from v24.11) was refused "already paid" (219),
    and before that the gateway's payment, found by listpays, made the melt PAID;
    ``pay`` (before v24.11) answers a hash's earlier success as its own, and still made
    it PAID."""
    w = await world(postgres, version)
    app = await w.mint()
    try:
        x = await w.invoice("c", 20_000, "x")
        body = await melt_body(app, x)
        gateway = await gateway_of(w)
        assert (await gateway.pay(x, 10_000)).outcome is Outcome.SETTLED
        if gateway.xpay:  # a retry of its command is refused 219: it sent nothing
            again = await gateway.pay(x, 10_000)
            assert (again.outcome, again.sent) == (Outcome.SETTLED, False)
        w.sim.network.nodes["a"].faults.lose_replies = 1  # the melt's listpays, before paying
        with pytest.raises(m.CashuError) as refused:
            await app.melt(request(body))
        assert refused.value.code == m.INVOICE_PAID
        await unpaid_and_free(app, body["quote"])
        parts = [p for p in w.sim.network.nodes["a"].parts if p.bolt11 == x]
        assert [p.status for p in parts] == ["complete"]  # the gateway's, once
    finally:
        await shut(app)
        await w.sim.close()


async def test_a_pay_command_refused_in_progress_sent_nothing(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's payment of X is in flight (its payee holds the HTLC); another
    command for X is refused "in progress" (200): it sent nothing (``sent`` False), and
    the state is that of the gateway's payment (before: answered as this command's own
    pending payment, a melt's would have been PAID once the gateway's settled)."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    w = await world(postgres, "v24.11")
    try:
        x = await w.invoice("c", 20_000, "x")
        w.sim.network.nodes["c"].faults.hold = True
        gateway = await gateway_of(w)
        assert (await gateway.pay(x, 10_000)).outcome is Outcome.PENDING  # held by c
        again = await (await gateway_of(w)).pay(x, 10_000)  # another payer on the node
        assert (again.outcome, again.sent) == (Outcome.PENDING, False)
    finally:
        w.sim.release("c")
        await w.sim.close()


async def test_a_melt_never_sent_fails_once_it_can_be_sent_no_more(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Process A reserved a melt's proofs (PENDING) and stopped before its pay command
    went; the gateway pays the invoice later. The resolver takes nothing from the
    node's payment of the hash: the melt stays PENDING while its command could still be
    given leave to go (``may_pay``), then fails, its proofs free (before: the resolver
    made it PAID, its ecash taken for a payment the mint never sent)."""
    monkeypatch.setattr(mint_app, "SEND_WINDOW_S", 1.0)
    w = await world(postgres, "v24.11")
    a, b = await w.mint(), await w.mint()
    try:
        x = await w.invoice("c", 20_000, "x")
        body = await melt_body(a, x)
        req = nut.decode(nut.encode(body), nut.MeltRequest)
        now = int(time.time())
        await a.db.start_melt(  # A's melt up to PENDING; A stops here
            req, m.BOLT11, lambda q: a.rules.check_melt(q, req, now), mint_app.PER_PAYEE
        )
        gateway = await gateway_of(w)
        assert (await gateway.pay(x, 10_000)).outcome is Outcome.SETTLED
        await b._resolve()
        found = await b.db.melt_quote(body["quote"], m.BOLT11)
        assert found is not None and found[0].state == m.MELT_PENDING
        await asyncio.sleep(1.1)
        await b._resolve()
        await unpaid_and_free(b, body["quote"])
    finally:
        for app in (a, b):
            await shut(app)
        await w.sim.close()


async def test_melt_quote_options_the_mint_does_not_offer_are_refused(postgres: str) -> None:
    """NUT-15 ``mpp`` (pay part of the invoice) is refused (11000, as nutshell's mint
    without mpp), and so is NUT-23 ``amountless`` for an invoice with an amount (11012),
    never ignored (before: a quote for 40,000 sat of a 100,000 sat invoice was made, and
    paid, for all of it). NUT-15 is not advertised; ``options: null`` is no option."""
    w = await world(postgres, "v24.11")
    app = await w.mint()
    try:
        bolt11 = await w.invoice("c", 100_000, "mpp")
        info = json.loads(cast(bytes, (await app.info(request({}))).body))
        assert "15" not in info["nuts"]
        asks = [
            ({"mpp": {"amount": 40_000_000}}, m.NOT_SERVED),
            ({"mpp": {"amount": 100_000_000}}, m.NOT_SERVED),
            ({"amountless": {"amount_msat": 100_000_000}}, m.AMOUNT_MISMATCH),
        ]
        for options, code in asks:
            with pytest.raises(m.CashuError) as refused:
                await app.melt_quote(
                    request({"request": bolt11, "unit": "sat", "options": options})
                )
            assert refused.value.code == code
        assert not await app.db.pool.fetchval("SELECT count(*) FROM melt_quotes")
        q = await app.melt_quote(request({"request": bolt11, "unit": "sat", "options": None}))
        assert q["amount"] == 100_000
    finally:
        await shut(app)
        await w.sim.close()


def test_a_feerate_floor_over_its_cap_or_over_bitcoin_core_s_is_refused() -> None:
    """Bitcoin Core's sendrawtransaction refuses over 10,000 sat/vB (its maxfeerate): a
    withdrawal built at more would stay unsent; a floor over the cap is a mistake."""
    env = {"MINT_STORAGE_KEY": "11" * 32, "MINT_BITCOIND_URL": "http://127.0.0.1:1"}
    with pytest.raises(ConfigError, match="over MINT_CHAIN_MAX_FEERATE"):
        Settings.from_env({**env, "MINT_CHAIN_FEERATE": "50", "MINT_CHAIN_MAX_FEERATE": "10"})
    with pytest.raises(ConfigError, match=r"MINT_CHAIN_MAX_FEERATE must be in 1\.\.10000"):
        Settings.from_env({**env, "MINT_CHAIN_MAX_FEERATE": "20000"})
