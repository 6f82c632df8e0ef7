"""The gateway's Lightning backend, pyln-client unchanged, against the simulated network's
lightningd sockets: every method the backend uses, lightningd's errors, lost replies,
held payments and nodes that are down; and the wire itself (framing, ids, errors)."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyln.client import LightningRpc, RpcError

from constellation.lightning import Outcome
from services.gateway import lightning
from services.gateway.lightning import (
    ClnBackend,
    LightningError,
    NotSent,
    Threads,
    our_side_msat,
)
from services.lnsim.sim import Simulator, socket_path

CHANNEL_SAT = 1_000_000


class Net:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.backends: dict[str, ClnBackend] = {}

    async def backend(self, name: str) -> ClnBackend:
        if name not in self.backends:
            b = self.backends[name] = ClnBackend(socket_path(self.sim.directory, name))
            await b.connect()
        return self.backends[name]

    def rpc(self, name: str) -> LightningRpc:
        return LightningRpc(str(socket_path(self.sim.directory, name)))


async def start(version: str | None = None) -> Net:
    # a short folder: a unix socket's path has room for about 107 bytes
    sim = Simulator(Path(tempfile.mkdtemp(prefix="ln", dir="/tmp")), seed=3)
    if version is not None:
        sim.version = version
    await sim.mesh(["a", "b", "c"], CHANNEL_SAT, 3 * CHANNEL_SAT)
    await sim.add_node("far", 2 * CHANNEL_SAT)  # reached from a through c only: two hops
    sim.open_channel("far", "c", CHANNEL_SAT, CHANNEL_SAT * 500)
    return Net(sim)


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = await start()
    yield n
    await n.sim.close()


async def test_the_version_picks_xpay_and_splicein(net: Net) -> None:
    a = await net.backend("a")
    info = await a.info()
    assert info.version == "v26.06" and info.network == "regtest"
    assert info.node_id == net.sim.network.nodes["a"].node_id
    assert a.xpay and a.splice_v2


async def test_invoices_are_created_once_looked_up_and_cancelled(net: Net) -> None:
    b = await net.backend("b")
    inv = await b.create_invoice(21_000, "quote-1", "a quote", 600)
    assert inv.status == "unpaid" and inv.amount_msat == 21_000 and inv.bolt11.startswith("lnbcrt")
    assert await b.create_invoice(21_000, "quote-1", "a quote", 600) == inv  # a retry
    with pytest.raises(LightningError) as other:
        await b.create_invoice(22_000, "quote-1", "a quote", 600)
    assert other.value.code == 900
    assert await b.invoice("nope") is None
    assert await b.cancel_invoice("quote-1") is True
    assert await b.invoice("quote-1") is None
    paid = await b.create_invoice(1_000, "quote-2", "paid", 600)
    assert (await (await net.backend("a")).pay(paid.bolt11, 0)).outcome is Outcome.SETTLED
    assert await b.cancel_invoice("quote-2") is False  # paid meanwhile: not cancelled
    found = await b.invoice("quote-2")
    assert found is not None and found.status == "paid" and found.pay_index == 1
    assert found.amount_received_msat == 1_000 and found.preimage is not None


async def test_a_payment_settles_with_its_proof_and_a_second_one_pays_nothing(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(50_000, "pay-1", "x", 600)
    before = (await a.balances()).lightning_local_msat
    state = await a.pay(inv.bolt11, 1_000)
    assert state.outcome is Outcome.SETTLED and state.fee_msat == 0
    again = await a.pay(inv.bolt11, 1_000)  # xpay answers 219; the lookup says settled
    assert again.outcome is Outcome.SETTLED and again.preimage == state.preimage
    assert (await a.balances()).lightning_local_msat == before - 50_000
    assert (await a.payment(inv.payment_hash)).outcome is Outcome.SETTLED


async def test_two_hops_pay_the_forwarder_s_fee_within_the_limit(net: Net) -> None:
    a, far = await net.backend("a"), await net.backend("far")
    inv = await far.create_invoice(1_000_000, "far-1", "x", 600)
    too_cheap = await a.pay(inv.bolt11, 0)
    assert too_cheap.outcome is Outcome.FAILED  # 206: nothing was sent
    state = await a.pay(inv.bolt11, 100)
    assert state.outcome is Outcome.SETTLED and state.fee_msat == 1 + 1_000_000 * 10 // 1_000_000
    assert net.sim.network.nodes["c"].fees_collected_msat == state.fee_msat
    # the forwarder's own books (bkpr-listincome) say what it earned
    earned = await (await net.backend("c")).income()
    assert earned.routed_msat == state.fee_msat and earned.onchain_fees_msat == 0


async def test_what_is_refused_before_anything_is_sent_fails(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    huge = await b.create_invoice(5 * CHANNEL_SAT * 1000, "huge", "x", 600)
    assert (await a.pay(huge.bolt11, 1_000)).outcome is Outcome.FAILED  # 205: no route
    expired = await b.create_invoice(1_000, "soon", "x", 1)
    await asyncio.sleep(1.1)
    assert (await a.pay(expired.bolt11, 1_000)).outcome is Outcome.FAILED  # 207
    assert (await a.pay("lnbcrt1garbage", 1_000)).outcome is Outcome.FAILED
    await net.sim.set_online("b", False)
    gone = net.sim.network.invoice("b", 1_000, "offline", "x")
    assert (await a.pay(gone.bolt11, 1_000)).outcome is Outcome.FAILED  # 205: unreachable


async def test_a_payee_s_refusal_fails_and_a_retry_settles_on_the_union(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(10_000, "retry", "x", 600)
    net.sim.network.nodes["b"].faults.fail_next = 1
    assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.FAILED  # 203, then listpays
    assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.SETTLED
    rpc = net.rpc("a")  # blocking: off the loop that serves it
    pays = (await asyncio.to_thread(rpc.listpays, payment_hash=inv.payment_hash.hex()))["pays"]
    assert sorted(p["status"] for p in pays) == ["complete", "failed"]


async def test_a_held_payment_is_pending_never_failed_until_it_settles(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(10_000, "held", "x", 600)
    net.sim.network.nodes["b"].faults.hold = True
    state = await a.pay(inv.bolt11, 1_000)  # the call times out; the lookup says pending
    assert state.outcome is Outcome.PENDING
    assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.PENDING  # 200: in progress
    net.sim.release("b")
    await asyncio.sleep(0.1)
    assert (await a.payment(inv.payment_hash)).outcome is Outcome.SETTLED


async def test_a_reply_lost_after_the_payment_went_through_is_found_settled(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(10_000, "lost", "x", 600)
    net.sim.network.nodes["a"].faults.lose_replies = 1
    state = await a.pay(inv.bolt11, 1_000, inv.payment_hash)  # the pay command's reply
    assert state.outcome is Outcome.SETTLED and state.preimage is not None
    net.sim.network.nodes["b"].faults.lose_replies = 1  # an invoice made, its reply lost
    with pytest.raises(LightningError):
        await b.create_invoice(5_000, "made-once", "x", 600)
    made = await b.create_invoice(5_000, "made-once", "x", 600)  # the retry finds it
    assert made.status == "unpaid"
    assert len([i for i in net.sim.network.nodes["b"].invoices if i == "made-once"]) == 1


async def test_a_payer_node_that_is_down_leaves_the_outcome_unknown(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(10_000, "down", "x", 600)
    await net.sim.set_online("a", False)
    assert (await a.pay(inv.bolt11, 1_000, inv.payment_hash)).outcome is Outcome.UNKNOWN
    with pytest.raises(LightningError):
        await a.balances()
    await net.sim.set_online("a", True)
    # no attempt at the node: our call never reached it, or has not yet; only the
    # caller's own journal can tell, and paying again is safe either way
    assert (await a.payment(inv.payment_hash)).outcome is Outcome.UNKNOWN
    # where the caller knows no attempt can come any more (it sends none, and any call
    # of its would have ended), none seen is a payment never sent
    assert (await a.payment(inv.payment_hash, attempted=False)).outcome is Outcome.FAILED
    net.sim.network.nodes["a"].faults.delay_s = 0.2  # slow, not lost
    assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.SETTLED


async def test_paid_invoices_stream_in_order_and_resume_after_an_index(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    invoices = [await b.create_invoice(1_000 + i, f"s{i}", "x", 600) for i in range(3)]
    for inv in invoices:
        assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.SETTLED
    stream = b.paid_invoices(0)
    got = [await anext(stream) for _ in range(3)]
    assert [(i.label, i.pay_index) for i in got] == [("s0", 1), ("s1", 2), ("s2", 3)]
    resumed = b.paid_invoices(2)
    assert (await anext(resumed)).label == "s2"
    later = asyncio.ensure_future(anext(resumed))  # waits for the next payment
    await asyncio.sleep(0.2)
    assert not later.done()
    inv = await b.create_invoice(7_000, "s3", "x", 600)
    await a.pay(inv.bolt11, 1_000)
    assert (await asyncio.wait_for(later, 5)).pay_index == 4


async def test_channels_balances_splices_and_the_chain(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    b_id = (await b.info()).node_id
    channel = next(c for c in await a.channels() if c.peer_id == b_id)
    assert channel.usable and channel.capacity_msat == CHANNEL_SAT * 1000
    before, paid_before = await a.balances(), (await a.income()).onchain_fees_msat
    funds_before = await funds(a)
    await a.splice_in(channel.channel_id, 200_000)
    during = next(c for c in await a.channels() if c.channel_id == channel.channel_id)
    assert during.splicing and during.usable  # it keeps carrying payments meanwhile
    # the wallet's coins are spent, the channel holds them once the splice confirms:
    # the reserve counts the splice in flight (it read BROKEN, or took a wrong baseline)
    assert during.splice_msat == 200_000_000
    fee = (await a.income()).onchain_fees_msat - paid_before
    assert funds_before - await funds(a) - fee == during.splice_msat
    net.sim.network.mine(1)
    after = next(c for c in await a.channels() if c.channel_id == channel.channel_id)
    assert after.capacity_msat == (CHANNEL_SAT + 200_000) * 1000 and not after.splicing
    assert after.local_msat == channel.local_msat + 200_000_000
    await a.splice_out(channel.channel_id, 100_000)
    out = next(c for c in await a.channels() if c.channel_id == channel.channel_id)
    assert out.splice_msat == -100_000_000
    net.sim.network.mine(1)
    balances = await a.balances()
    assert balances.onchain_confirmed_msat < before.onchain_confirmed_msat
    # what a paid its miners for the two splices, as its bookkeeper says
    funds_now = sum(c.local_msat for c in await a.channels()) + balances.onchain_confirmed_msat
    funds_before = channel.local_msat + sum(
        c.local_msat for c in await a.channels() if c.channel_id != channel.channel_id
    )
    funds_before += before.onchain_confirmed_msat
    paid = (await a.income()).onchain_fees_msat - paid_before
    assert paid == funds_before - funds_now > 0
    address = await b.new_address()
    assert address.startswith("bcrt1p")
    await a.withdraw(address, 50_000)
    net.sim.network.mine(1)
    assert (await b.balances()).onchain_confirmed_msat >= 50_000_000
    newcomer = await net.sim.add_node("new", 2 * CHANNEL_SAT)
    n = await net.backend("new")
    funds_before, fees_before = await funds(n), (await n.income()).onchain_fees_msat
    opened = await n.open_channel(net.sim.network.nodes["a"].node_id, 500_000)
    locking = next(c for c in await n.channels() if c.channel_id == opened)
    assert locking.state == "CHANNELD_AWAITING_LOCKIN" and not locking.usable
    # the funding left the wallet for the channel, not the node's funds (the reserve's)
    fee = (await n.income()).onchain_fees_msat - fees_before
    assert await funds(n) == funds_before - fee
    net.sim.network.mine(1)
    assert await funds(n) == funds_before - fee
    assert any(c.channel_id == opened and c.usable for c in await n.channels())
    assert newcomer.name == "new"
    assert net.sim.network.books()["missing_msat"] == 0


async def funds(node: ClnBackend) -> int:
    """A node's money as the reserve check counts it: its side of each channel that
    holds it, and its wallet's outputs."""
    balances = await node.balances()
    channels = our_side_msat(await node.channels())
    return channels + balances.onchain_confirmed_msat + balances.onchain_unconfirmed_msat


async def test_an_older_node_is_paid_with_pay_and_spliced_in_three_steps() -> None:
    old = await start("v24.05")
    try:
        a, b = await old.backend("a"), await old.backend("b")
        assert not a.xpay and not a.splice_v2
        with pytest.raises(RpcError) as unknown:
            await asyncio.to_thread(old.rpc("a").call, "xpay", {"invstring": "x"})
        assert unknown.value.error["code"] == -32601
        inv = await b.create_invoice(10_000, "old", "x", 600)
        assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.SETTLED
        assert (await a.pay(inv.bolt11, 1_000)).outcome is Outcome.SETTLED  # pay: same success
        channel = (await a.channels())[0]
        await a.splice_in(channel.channel_id, 100_000)
        old.sim.network.mine(1)
        after = next(c for c in await a.channels() if c.channel_id == channel.channel_id)
        assert after.capacity_msat == channel.capacity_msat + 100_000_000
        await a.splice_out(channel.channel_id, 50_000)  # to the wallet, through a PSBT output
        old.sim.network.mine(1)
        out = next(c for c in await a.channels() if c.channel_id == channel.channel_id)
        assert out.capacity_msat < after.capacity_msat - 50_000_000
        with pytest.raises(RpcError) as unfunded:  # lightningd wants the PSBT that funds it
            await asyncio.to_thread(
                old.rpc("a").call,
                "splice_init",
                {"channel_id": channel.channel_id, "relative_amount": 1000},
            )
        assert unfunded.value.error["code"] == 357
        assert old.sim.network.books()["missing_msat"] == 0
    finally:
        await old.sim.close()


async def test_lightningd_s_wire_framing_ids_and_errors(net: Net) -> None:
    rpc = net.rpc("a")
    with pytest.raises(RpcError) as unknown:
        await asyncio.to_thread(rpc.call, "nosuch", {})
    assert unknown.value.error == {"code": -32601, "message": "Unknown command 'nosuch'"}
    with pytest.raises(RpcError) as bad:
        await asyncio.to_thread(rpc.call, "invoice", {"amount_msat": 1, "label": "x", "oops": 1})
    assert bad.value.error["code"] == -32602
    with pytest.raises(RpcError) as missing:
        await asyncio.to_thread(rpc.call, "invoice", {"amount_msat": 1})
    assert missing.value.error["code"] == -32602
    positional = await asyncio.to_thread(rpc.call, "invoice", ["1000msat", "pos", "by position"])
    assert positional["payment_hash"] and positional["bolt11"]
    with pytest.raises(RpcError) as dup:
        await asyncio.to_thread(rpc.invoice, 1000, "pos", "again")
    assert dup.value.error["code"] == 900

    def raw(data: bytes, answers: int) -> list[dict[str, object]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(socket_path(net.sim.directory, "a")))
            s.sendall(data)
            buf = b""
            while buf.count(b"\n\n") < answers:
                chunk = s.recv(65536)
                assert chunk
                buf += chunk
        return [json.loads(part) for part in buf.split(b"\n\n") if part]

    # two requests back to back, no delimiter: two answers, each closed by a blank line
    two = (
        b'{"jsonrpc":"2.0","id":"x1","method":"getinfo","params":{}}'
        + json.dumps({"jsonrpc": "2.0", "id": 7, "method": "listfunds", "params": []}).encode()
    )
    first, second = await asyncio.to_thread(raw, two, 2)
    assert first["id"] == "x1" and "result" in first and second["id"] == 7
    [no_id] = await asyncio.to_thread(raw, b'{"jsonrpc":"2.0","method":"getinfo"}', 1)
    assert no_id["error"]["code"] == -32600  # type: ignore[index]


async def test_a_channel_short_of_what_it_must_send_is_spliced_in_never_closed(net: Net) -> None:
    a = await net.backend("a")
    before = {c.channel_id: c for c in await a.channels()}
    # each channel can send about half its capacity; twice 400,000 sat is more than that
    started = [s for s, error in await lightning.rebalance(a, 400_000_000, {}) if error is None]
    assert started and all(s.relative_sat > 0 for s in started)
    during = {c.channel_id: c for c in await a.channels()}
    assert all(during[s.channel_id].splicing and during[s.channel_id].usable for s in started)
    again = await lightning.rebalance(a, 400_000_000, {})  # one splice a channel at a time
    assert not {s.channel_id for s, _ in again} & {s.channel_id for s in started}
    for _ in range(4):  # the wallet's change confirms block by block
        net.sim.network.mine(1)
        await lightning.rebalance(a, 400_000_000, {})
    net.sim.network.mine(1)
    after = await a.channels()
    assert {c.channel_id for c in after} == set(before)  # none closed
    assert all(c.spendable_msat >= 2 * 400_000_000 and not c.splicing for c in after)
    assert await lightning.rebalance(a, 400_000_000, {}) == []  # enough now
    assert net.sim.network.books()["missing_msat"] == 0


async def test_a_lost_answer_over_failed_attempts_is_unknown_until_looked_up_again(
    net: Net,
) -> None:
    """Without the command's own answer, every attempt failed may be a pay between its
    retries: unknown. A later lookup, the command over, says failed."""
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(10_000, "retrying", "x", 600)
    net.sim.network.nodes["b"].faults.fail_next = 1
    net.sim.network.nodes["a"].faults.lose_replies = 1
    assert (await a.pay(inv.bolt11, 1_000, inv.payment_hash)).outcome is Outcome.UNKNOWN
    assert (await a.payment(inv.payment_hash)).outcome is Outcome.FAILED


async def test_each_channel_is_kept_for_what_its_peer_is_expected_to_be_sent(net: Net) -> None:
    a = await net.backend("a")
    b_id = net.sim.network.nodes["b"].node_id
    # settlements expected to b outgrow its channel; nothing is expected elsewhere
    started = [s for s, e in await lightning.rebalance(a, 0, {b_id: 400_000_000}) if e is None]
    assert [s.peer for s in started] == [b_id] and started[0].relative_sat > 0
    assert await lightning.rebalance(a, 0, {}) == []  # nothing expected: nothing to do


async def test_the_node_decodes_invoices_and_refuses_what_is_not_one(net: Net) -> None:
    a, b = await net.backend("a"), await net.backend("b")
    inv = await b.create_invoice(12_345, "decoded", "x", 600)
    decoded = await a.decode(inv.bolt11)
    assert decoded.payment_hash == inv.payment_hash and decoded.amount_msat == 12_345
    assert decoded.payee == (await b.info()).node_id
    assert decoded.expires_at == inv.expires_at  # what the payee's node says of it
    with pytest.raises(LightningError) as info:
        await a.decode("lnbcrt1garbage")
    assert info.value.code == -32602
    # paying what does not decode sends nothing
    assert (await a.pay("lnbcrt1garbage", 1_000)).outcome is Outcome.FAILED


async def test_calls_run_on_daemon_threads_a_bounded_number_at_once() -> None:
    """A stopping gateway never waits for lightningd (the threads are daemons), and a
    call given up on keeps its place until its thread ends."""
    threads = Threads(2, "test")
    gate = threading.Event()
    ran: list[threading.Thread] = []

    def call() -> int:
        ran.append(threading.current_thread())
        gate.wait(10)
        return 7

    with pytest.raises(TimeoutError):
        await threads.run(call, 0.05)
    second = asyncio.ensure_future(threads.run(call, 10))
    third = asyncio.ensure_future(threads.run(call, 10))
    await asyncio.sleep(0.2)
    assert len(ran) == 2 and all(t.daemon for t in ran)  # the third waits its turn
    gate.set()
    assert await second == 7 and await third == 7 and len(ran) == 3
    with pytest.raises(ValueError):
        await threads.run(lambda: int("not a number"), 1)


async def test_a_call_with_a_last_moment_is_never_started_after_it() -> None:
    """A payment that may wait only so long for a place, or that its caller says is too
    late to send once it has one, is never called (``NotSent``), and its place is free."""
    threads = Threads(1, "test")
    gate = threading.Event()
    called: list[int] = []

    def call() -> int:
        called.append(1)
        gate.wait(10)
        return 7

    busy = asyncio.ensure_future(threads.run(call, 10))
    await asyncio.sleep(0.05)
    with pytest.raises(NotSent):
        await threads.run(call, 10, wait_s=0.1)
    gate.set()
    assert await busy == 7 and len(called) == 1

    async def too_late() -> bool:
        return False

    async def broken() -> bool:
        raise ConnectionError("the database is down")

    for ready in (too_late, broken):
        with pytest.raises(NotSent):
            await threads.run(call, 10, wait_s=1, ready=ready)
    assert len(called) == 1 and not threads.places.locked()  # nothing ran; the place free

    async def in_time() -> bool:
        return True

    assert await threads.run(call, 10, wait_s=1, ready=in_time) == 7 and len(called) == 2


async def test_xpay_on_v24_11_lists_no_amount_and_a_late_payment_says_what_it_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Core Lightning v24.11's listpays has no ``amount_msat`` for xpay's payments
    (lightning#7881): a payment found settled there says what it sent, not its fee."""
    monkeypatch.setattr(lightning, "PAY_S", 0.5)
    net = await start("v24.11")
    try:
        a, far = await net.backend("a"), await net.backend("far")
        inv = await far.create_invoice(1_000_000, "late", "x", 600)
        net.sim.network.nodes["far"].faults.hold = True
        assert (await a.pay(inv.bolt11, 100)).outcome is Outcome.PENDING
        net.sim.release("far")
        await asyncio.sleep(0.1)
        state = await a.payment(inv.payment_hash)
        assert state.outcome is Outcome.SETTLED and state.fee_msat is None
        assert state.sent_msat == 1_000_000 + 11
    finally:
        await net.sim.close()
