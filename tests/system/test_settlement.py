"""Payments between operators over real processes: a local guild of 3 operators, each
with its gateway settling with the others over the simulated Lightning network.

The payer's ledger spends at once and the receiver sees the output pending, then a coin.
Under faults (payments failed, held and their replies lost at the Lightning nodes; the
settling gateways and the machines holding the shards killed with ``kill -9`` and
restarted by their supervisors) every
output is still released exactly once, as the coin it was announced as, and only by a
batch whose invoice was paid for exactly the outputs it released; nothing is paid twice;
each pair's paid and released totals agree; the ledgers' books are conserved; and the
reserve invariant holds at every operator with no drift; and every copy of every shard
ends at one height and state root.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from pyln.client import LightningRpc

from constellation.address import Network, decode_destination
from constellation.lightning import msat
from services.crossload import CrossWorkload, run_cross, settled_books_agree
from services.devnet import Devnet, guild
from services.wallet import Gateway
from tests.system.guild import cli, local_guild


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-settle-") as directory:
        yield directory


def nets(where: Path) -> list[Devnet]:
    return guild.load(where)


async def test_a_payment_to_another_operator_is_pending_then_a_coin(where: Path) -> None:
    out = io.StringIO()
    ok = await run_cross(nets(where), 4, 3, 60, 8, out)
    print(out.getvalue())
    assert ok, out.getvalue()
    async with aiohttp.ClientSession() as s:
        work = CrossWorkload(nets(where), s, 2, io.StringIO())
        await work.setup(1)
        await work.run(1, 1, cross=True)
        seen = await work.show_pending(work.crossings[0])
    # seen at once as pending (never a coin before its batch is paid), then a coin
    assert "pending" in seen and seen[-1] == "unspent", seen
    assert seen.index("pending") < seen.index("unspent")


async def faults(where: Path, stop: asyncio.Event, log: list[str]) -> None:
    """Faults at random, one after another, until ``stop``."""
    rng = random.Random(os.urandom(8))
    kinds: list[str] = []
    while not stop.is_set():
        if not kinds:  # every kind in each round, in a random order
            kinds = ["fail", "hold", "lose", "kill gateway", "kill machine"]
            rng.shuffle(kinds)
        kind = kinds.pop()
        node = f"op{rng.randrange(3)}"
        if kind == "fail":  # the next payments to it fail: their batches are cancelled
            guild.lightning_faults(where, node, {"fail_next": 2})
        elif kind == "hold":  # payments to it hang, then settle
            guild.lightning_faults(where, node, {"hold": True})
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            guild.lightning(where, f"/v1/release/{node}", {})
        elif kind == "lose":  # the payer's node pays, and the reply is lost
            guild.lightning_faults(where, node, {"lose_replies": 2})
        else:  # the supervisor starts it again
            net = next(n for n in nets(where) if n.operator == node)
            pid = net.gateway_pid if kind == "kill gateway" else rng.choice(net.machines).pid
            os.kill(pid, signal.SIGKILL)
        log.append(f"{kind} {node}")
        await asyncio.sleep(rng.uniform(0.3, 1.5))
    for node in ("op0", "op1", "op2"):
        guild.lightning_faults(where, node, {"fail_next": 0, "lose_replies": 0, "hold": False})
        guild.lightning(where, f"/v1/release/{node}", {})


async def gateways_ready(where: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        for net in nets(where):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{net.gateway_url}/readyz") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, f"{net.operator}'s gateway is not back"
                await asyncio.sleep(0.5)


async def test_settlement_under_faults_releases_each_output_once_after_paying(
    where: Path,
) -> None:
    out = io.StringIO()
    log: list[str] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as s:
        work = CrossWorkload(nets(where), s, 6, out)
        await work.setup(4)
        chaos = asyncio.create_task(faults(where, stop, log))
        rounds = 0
        while rounds < 6 or len(log) < 10:  # payments in rounds, processes dying and back
            await gateways_ready(where)
            await work.run(40, 6, cross=True)
            rounds += 1
        stop.set()
        await chaos
        print("faults:", ", ".join(log), "\npayments:", dict(work.codes))
        assert work.codes["committed"] >= 200
        await gateways_ready(where)
        left = await work.wait_released(180)
        print(out.getvalue())
        assert left == 0, f"{left} outputs never released"
        assert await work.spendable()
        assert await settled_books_agree(nets(where), s, out, 60), out.getvalue()
    await each_release_was_paid_for(where)
    # every copy of every shard re-executed the same payments and releases alike
    by_shard = await asyncio.to_thread(guild.wait_converged, nets(where), 90)
    assert len(by_shard) == 6 and all(len(cs) == 6 for cs in by_shard.values())


async def each_release_was_paid_for(where: Path) -> None:
    """At every payee: each batch that released outputs has its invoice paid, once, for
    exactly their sum; every output is released in one batch; the node was paid nothing
    under a settlement label that released nothing."""
    for net in nets(where):
        conn = await asyncpg.connect(net.database_url)
        try:
            rows = await conn.fetch(
                "SELECT peer, batch, sum(value_msat) AS msat, count(*) AS n,"
                " bool_and(released_at IS NOT NULL) AS released FROM settle_pending"
                " GROUP BY peer, batch"
            )
        finally:
            await conn.close()
        released = {(r["peer"], r["batch"]): int(r["msat"]) for r in rows}
        assert all(r["released"] and r["batch"] is not None for r in rows), rows
        node = LightningRpc(net.lightning_rpc)
        paid: dict[tuple[str, int], int] = {}
        for inv in node.listinvoices()["invoices"]:
            parts = inv["label"].split(":")
            if parts[0] == "settle" and inv["status"] == "paid":
                paid[(parts[1], int(parts[2]))] = msat(inv["amount_received_msat"])
        assert paid == released, f"{net.operator}: paid {paid}, released {released}"


async def test_the_wallet_pays_a_user_of_another_operator(where: Path) -> None:
    op0, op1, _ = nets(where)
    alice, bob = str(where.parent / "alice.json"), str(where.parent / "bob.json")
    for file, net in ((alice, op0), (bob, op1)):
        assert (await cli("wallet", "create", "--file", file, "--gateway", net.gateway_url))[0] == 0
    funding = (await cli("wallet", "address", "--file", alice))[1].strip()
    assert (await cli("devnet", "fund", funding, "5000000", "--dir", op0.dir))[0] == 0
    # bob's address names op1's ledger: alice's payment goes there, settled by op0
    to_bob = (await cli("wallet", "address", "--file", bob))[1].strip()
    _, named = decode_destination(to_bob, Network.REGTEST)
    async with aiohttp.ClientSession() as s:
        assert named == bytes.fromhex((await Gateway(op1.gateway_url, s).totals())["ledger_id"])
    end = time.monotonic() + 10
    while "5000000 msat in 1 coins" not in (await cli("wallet", "balance", "--file", alice))[1]:
        assert time.monotonic() < end, "the funded coin is not in op0's index"
        await asyncio.sleep(0.2)
    # hold op1's node's incoming payments: bob sees the payment pending meanwhile
    guild.lightning_faults(where, "op1", {"hold": True})
    try:
        code, out = await cli("wallet", "send", to_bob, "1000000", "--file", alice)
        assert code == 0 and "pending at op1" in out, out
        end = time.monotonic() + 10
        while "1000000 msat pending in 1 payments from op0" not in (
            out := (await cli("wallet", "balance", "--file", bob))[1]
        ):
            assert time.monotonic() < end, out
            await asyncio.sleep(0.2)
        assert out.startswith("0 msat in 0 coins"), out  # not spendable yet
    finally:
        guild.lightning_faults(where, "op1", {"hold": False})
        guild.lightning(where, "/v1/release/op1", {})
    end = time.monotonic() + 20
    while not (out := (await cli("wallet", "balance", "--file", bob))[1]).startswith(
        "1000000 msat in 1 coins"
    ):
        assert time.monotonic() < end, out
        await asyncio.sleep(0.3)
    assert "pending" not in out
    # and bob spends it in op1's ledger
    code, out = await cli("wallet", "send", funding, "500000", "--file", bob)
    assert code == 0 and "pending at op0" in out, out  # alice's address names op0's ledger
