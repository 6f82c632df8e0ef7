"""The settler's books (``services.gateway.settle``) from its real store in PostgreSQL and
its real Lightning node (``ClnBackend`` over the simulated network):

* a peer gone from the layout (a member that left, a neighbour dropped) keeps what was
  paid to it paid: the ledger's ``outbound`` is all history, and once summed over
  today's peers only, everything ever paid to a departed one read as owed again (the
  reserve invariant broken for good); what is unsettled with it is said;
* a payment nobody asked of us (keysend) is the operator's, counted once across a
  restart;
* an invoice offered for a batch with a hash our node already paid is not taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from constellation import settlement as st
from constellation.keys import SigningKey
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.protocol import settlement as sp
from services.bus import Batching
from services.ecash.store import MintBooks
from services.gateway import settle
from services.gateway.lightning import ClnBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.settle_store import SettleStore
from services.lnsim.network import Attempt
from services.lnsim.sim import Simulator, socket_path
from services.partition.client import LedgerClient
from services.replica.config import Layout, Member
from tests.services.postgres import throwaway_postgres

KEYS = {n: SigningKey(bytes([i + 1]) * 32) for i, n in enumerate("abc")}
PAID_TO_B = 5_000_000_000  # what a settled with b, all of it paid
FEES_TO_B = 7_000
CHANNEL_SAT = 1_000_000


@pytest.fixture
async def world() -> AsyncIterator[tuple[SettleStore, Simulator, str]]:
    sim = Simulator(Path(tempfile.mkdtemp(prefix="ln", dir="/tmp")), seed=5)
    await sim.mesh(["a", "b"], CHANNEL_SAT, 3 * CHANNEL_SAT)
    async with throwaway_postgres("settle-books") as url:
        store = await SettleStore.open(url)
        assert await store.lead(url)  # it writes only while it holds the lock
        try:
            yield store, sim, url
        finally:
            await store.close()
            await sim.close()


async def settler(store: SettleStore, sim: Simulator, members: str) -> settle.Settler:
    """Operator a's settler, in a guild of ``members``, loaded from its store."""
    layout = Layout("g", 1, tuple(Member(n, KEYS[n].pubkey, frozenset(), "") for n in members))
    peers = {n: "nats://x" for n in members if n != "a"}
    settings = settle.Settings("a", layout, KEYS["a"], KEYS["a"], peers, "")
    backend = ClnBackend(socket_path(sim.directory, "a"))
    await backend.connect()
    ledger = LedgerClient(Client(), "a", PartitionMap.even(1), Batching(1, 0), lambda _: None)
    x = settle.Settler(settings, store, backend, ledger, GatewayMetrics())
    await x._load()
    return x


def pay(sim: Simulator, name: str, bolt11: str) -> None:
    attempt = sim.network.start_payment(name, bolt11, None, 1_000, True)
    assert isinstance(attempt, Attempt)
    sim.network.advance(attempt)


async def books(x: settle.Settler, held_msat: int, outbound_msat: int) -> settle.Books:
    """The books as ``_check_reserve`` reads them: the ledger's totals (one worker), and
    the node's own answers."""
    worker = proto.StateInfo(0, 1, 1, held_msat, 0, 0, 1, 0, 0, 0, 1, outbound_msat)
    b = x.backend
    mint = MintBooks(0, 0, 0, 0, 0)
    return x.books([worker], await b.channels(), await b.balances(), await b.income(), mint)


async def test_a_peer_gone_from_the_layout_keeps_what_was_paid_to_it_paid(
    world: tuple[SettleStore, Simulator, str],
) -> None:
    store, sim, _ = world
    in_flight = st.Batch(11, 43, 43, 2_000, st.Status.PAYING, "lnbcrt1x", b"h" * 32)
    b_state = st.PayerState(
        "a", "b", settled_upto=42, next_batch=12, paid_msat=PAID_TO_B, fees_msat=FEES_TO_B
    )
    b_state.batch = in_flight
    await store.save_state("payer", "b", msgspec.msgpack.encode(b_state))
    reserve = settle.Reserve()
    with_b = await settler(store, sim, "ab")
    assert not with_b.departed
    before = await books(with_b, 10**9, PAID_TO_B + 2_000)
    assert before.paid_out_msat == PAID_TO_B and before.lightning_fees_msat == FEES_TO_B
    for _ in range(2):
        reserve.check(before)

    without_b = await settler(store, sim, "ac")  # b left the guild; restarted on it
    assert "b" not in without_b.pairs and set(without_b.departed) == {"b"}
    after = await books(without_b, 10**9, PAID_TO_B + 2_000)
    assert after.paid_out_msat == PAID_TO_B and after.lightning_fees_msat == FEES_TO_B
    assert after.in_flight_msat == before.in_flight_msat > 0  # b's batch may still land
    for _ in range(settle.CONFIRM):
        verdict = reserve.check(after)
    assert verdict["owed_to_others"] == 2_000 and verdict["drift"] == 0, verdict
    assert not verdict["broken"]
    summary = without_b.summary()["b"]
    assert summary["departed"] and summary["owed"]["batch_in_flight"]
    assert summary["owed"]["paid_msat"] == PAID_TO_B


async def test_a_keysend_is_the_operator_s_and_counted_once(
    world: tuple[SettleStore, Simulator, str],
) -> None:
    """lightningd records a keysend received as a paid invoice labelled ``keysend-``."""
    store, sim, _ = world
    x = await settler(store, sim, "ab")
    inv = sim.network.invoice("a", 5_000, "keysend-1700000000.000000001", "keysend")
    stream = asyncio.ensure_future(x._paid_stream())
    try:
        pay(sim, "b", inv.bolt11)
        for _ in range(200):
            if x.unsolicited_msat:
                break
            await asyncio.sleep(0.05)
    finally:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
    assert x.unsolicited_msat == 5_000
    assert (await books(x, 0, 0)).received_msat == 5_000
    again = await settler(store, sim, "ab")  # after a restart: from the store, once
    assert again.unsolicited_msat == 5_000


async def test_an_offer_with_a_hash_our_node_paid_is_not_taken(
    world: tuple[SettleStore, Simulator, str],
) -> None:
    store, sim, _ = world
    x = await settler(store, sim, "ab")
    old = sim.network.invoice("b", 1_000, "something", "paid before", 3600, b"\x07" * 32)
    pay(sim, "a", old.bolt11)
    await sim.add_node("b2")  # the payee's other node: it knows the preimage
    pair = x.pairs["b"]
    pair.payer.owe(1, 2_000)
    pair.payer.tick(100.0)
    reused = sim.network.invoice("b2", 2_000, st.label("a", 1), "batch 1", 3600, b"\x07" * 32)
    await x._offered(pair, sp.Offer(1, reused.bolt11), 100.0)
    assert pair.payer.asks(1) and pair.paying is None  # not taken, nothing paid
    fresh = sim.network.invoice("b", 2_000, st.label("a", 1) + "x", "batch 1", 3600)
    await x._offered(pair, sp.Offer(1, fresh.bolt11), 101.0)
    batch = pair.payer.state.batch
    assert batch is not None and batch.status is st.Status.PAYING
    if pair.paying is not None:
        pair.paying.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pair.paying
