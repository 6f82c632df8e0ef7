"""Two settlers of operator a over one PostgreSQL and one Lightning node, one after the
other: O led and lost its lock's session; N took the lock and loaded the store. O may
still be in a call (a peer's message, a pay task) before its next tick sees so.

* O writes nothing once its session ended: its PAYING written over N's store, then its
  payment, left N asking for an invoice its node had paid (the payment off the books);
* O sends no pay command once its session ended, PAYING written before or not;
* a settler whose store says it only asked for a batch's invoice while its node paid it
  (a record lost) takes that payment as the batch's once the payee offers the invoice
  again: it asked again for ever, the books short by the payment.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from constellation import settlement as st
from constellation.protocol import settlement as sp
from services.database import DATABASE_DOWN
from services.gateway.settle import Settler
from services.gateway.settle_store import SettleStore
from services.lnsim.sim import Simulator
from tests.lightning.test_settle_books import KEYS, pay, settler
from tests.services.postgres import throwaway_postgres

AMOUNT_MSAT = 2_000


@pytest.fixture
async def world() -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(Path(tempfile.mkdtemp(prefix="ln", dir="/tmp")), seed=5)
    await sim.mesh(["a", "b"], 1_000_000, 3_000_000)
    async with throwaway_postgres("settle-fence") as url:
        try:
            yield sim, url
        finally:
            await sim.close()


def batch_invoice(sim: Simulator) -> tuple[str, bytes]:
    """b's invoice for a's batch 1, as b's settler makes it: its bolt11 and hash."""
    preimage = st.invoice_preimage(KEYS["b"].secret, st.label("a", 1))
    inv = sim.network.invoice("b", AMOUNT_MSAT, st.label("a", 1), "batch 1", 3600, preimage)
    return inv.bolt11, inv.payment_hash


def completed(sim: Simulator, payment_hash: bytes) -> int:
    return sum(p["status"] == "complete" for p in sim.network.pays("a", payment_hash))


async def asking(store: SettleStore, sim: Simulator) -> Settler:
    """a's settler, owing b one obligation (in the store, as taken), having asked for
    batch 1's invoice (persisted, as its tick does)."""
    await store.pool.execute(
        "INSERT INTO settle_owed (peer, seq, coin_id, txid, owner, value_msat)"
        " VALUES ('b', 1, $1, $1, $1, $2)",
        b"\x01" * 32,
        AMOUNT_MSAT,
    )
    x = await settler(store, sim, "ab")
    p = x.pairs["b"]
    async with x.lock:
        assert p.payer.tick(100.0) == [st.RequestInvoice(1, 1, 1, AMOUNT_MSAT)]
        await x._persist(p)
    return x


async def stored_payer(store: SettleStore) -> st.PayerState:
    raw = (await store.load_states())[("payer", "b")]
    return msgspec.msgpack.decode(raw, type=st.PayerState)


async def take_over(o: SettleStore, url: str, sim: Simulator) -> tuple[SettleStore, Settler]:
    """O's lock session ends (its backend terminated); N takes the lock and loads."""
    admin = await asyncpg.connect(url)
    try:
        pid = o._leader.get_server_pid() if o._leader is not None else None
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    n = await SettleStore.open(url)
    for _ in range(50):  # until the server has ended O's session
        if await n.lead(url):
            return n, await settler(n, sim, "ab")
        await asyncio.sleep(0.1)
    raise AssertionError("N never took the lock")


async def test_a_settler_that_lost_its_lock_writes_nothing(world: tuple[Simulator, str]) -> None:
    sim, url = world
    store_o = await SettleStore.open(url)
    assert await store_o.lead(url)
    o = await asking(store_o, sim)
    bolt11, payment_hash = batch_invoice(sim)
    store_n, n = await take_over(store_o, url, sim)
    try:
        with pytest.raises(DATABASE_DOWN):  # b's Offer, taken by O's NATS callback
            await o._offered(o.pairs["b"], sp.Offer(1, bolt11), 101.0)
        assert o.pairs["b"].paying is None and completed(sim, payment_hash) == 0
        b = (await stored_payer(store_n)).batch
        assert b is not None and b.status is st.Status.ASKED

        pn = n.pairs["b"]
        await n._offered(pn, sp.Offer(1, bolt11), 102.0)  # b answers N's request
        assert pn.paying is not None
        await asyncio.wait_for(pn.paying, 30)
        assert completed(sim, payment_hash) == 1
        s = await stored_payer(store_n)
        assert s.batch is None and s.paid_msat == AMOUNT_MSAT and s.settled_upto == 1
    finally:
        await store_o.close()
        await store_n.close()


async def test_a_settler_that_lost_its_lock_sends_no_payment(
    world: tuple[Simulator, str],
) -> None:
    """O wrote PAYING while it led, and its pay task starts only after its session
    ended: the command never goes; N resumes the batch from the store and pays it."""
    sim, url = world
    store_o = await SettleStore.open(url)
    assert await store_o.lead(url)
    o = await asking(store_o, sim)
    bolt11, payment_hash = batch_invoice(sim)
    po = o.pairs["b"]
    async with o.lock:
        [pay_action] = po.payer.offered(1, bolt11, payment_hash, AMOUNT_MSAT, 101.0)
        await o._persist(po)
    assert isinstance(pay_action, st.Pay)
    store_n, n = await take_over(store_o, url, sim)
    try:
        o._pay(po, pay_action)
        assert po.paying is not None
        with pytest.raises(DATABASE_DOWN):  # its outcome is not written either
            await asyncio.wait_for(po.paying, 30)
        assert completed(sim, payment_hash) == 0

        pn = n.pairs["b"]
        b = pn.payer.state.batch
        assert b is not None and b.status is st.Status.PAYING
        await n._act(pn, pn.payer.resume(102.0))
        assert pn.paying is not None
        await asyncio.wait_for(pn.paying, 30)
        assert completed(sim, payment_hash) == 1
        assert (await stored_payer(store_n)).paid_msat == AMOUNT_MSAT
    finally:
        await store_o.close()
        await store_n.close()


async def test_a_payment_whose_record_was_lost_is_taken_from_the_node(
    world: tuple[Simulator, str],
) -> None:
    """The store says batch 1's invoice was only asked for; a's node paid it. b, which
    released the batch, says so (Cancelled, paid) and then offers its invoice again."""
    sim, url = world
    store = await SettleStore.open(url)
    try:
        assert await store.lead(url)
        x = await asking(store, sim)
        bolt11, _ = batch_invoice(sim)
        pay(sim, "a", bolt11)
        p = x.pairs["b"]
        await x._take(p, sp.Cancelled(1, True))  # no hash of ours to look up: asked again
        assert p.payer.asks(1)
        await x._take(p, sp.Offer(1, bolt11))
        assert p.paying is None  # nothing paid again
        s = await stored_payer(store)
        assert s.batch is None and s.settled_upto == 1 and s.owed == []
        assert s.paid_msat == AMOUNT_MSAT and s.fees_msat >= 0
    finally:
        await store.close()
