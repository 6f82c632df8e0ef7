"""Payments between operators over real processes: a local guild of 3 operators, each
with its gateway settling with the others over the simulated Lightning network.

The payer's ledger spends at once and the receiver sees the output pending, then a coin.
Under faults (payments failed, held and their replies lost at the Lightning nodes; the
settling gateways, the machines holding the shards, an operator's PostgreSQL and its NATS
server killed with ``kill -9`` and restarted by their supervisors) every
output is still released exactly once, as the coin it was announced as, and only by a
batch whose invoice was paid for exactly the outputs it released; nothing is paid twice;
each pair's paid and released totals agree; the ledgers' books are conserved; and the
reserve invariant holds at every operator with no drift; every copy of every shard ends
at one height and state root; and no process logged an error (an outage is waited out).
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
import pytest

from services.crossload import CrossWorkload, run_cross, settled_books_agree
from services.devnet import Devnet, guild
from tests.system.guild import (
    a_wallet_pays_a_user_of_another_operator,
    each_release_was_paid_for,
    errors_logged,
    local_guild,
)


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
            kinds = ["fail", "hold", "lose", "kill gateway", "kill machine", "kill postgres"]
            kinds.append("kill nats")
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
            try:
                if kind == "kill postgres":  # the server and its backends
                    os.killpg(net.pg_pid, signal.SIGKILL)
                elif kind == "kill nats":  # the operator's processes and peers reconnect
                    os.kill(net.nats_pid, signal.SIGKILL)
                elif kind == "kill gateway":
                    os.kill(net.gateway_pid, signal.SIGKILL)
                else:
                    os.kill(rng.choice(net.machines).pid, signal.SIGKILL)
            except ProcessLookupError:  # killed a moment ago, not started again yet
                continue
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
        rounds, deadline = 0, time.monotonic() + 300
        # payments in rounds, processes dying and back (a gateway whose PostgreSQL is
        # down refuses payments meanwhile), until 10 faults and 200 payments went through
        while rounds < 6 or len(log) < 10 or work.codes["committed"] < 200:
            assert time.monotonic() < deadline, (log, dict(work.codes))
            if chaos.done():
                await chaos  # it failed: say how
            await gateways_ready(where)
            await work.run(40, 6, cross=True)
            rounds += 1
        stop.set()
        await chaos
        print("faults:", ", ".join(log), "\npayments:", dict(work.codes))
        await gateways_ready(where)
        left = await work.wait_released(180)
        print(out.getvalue())
        assert left == 0, f"{left} outputs never released"
        assert await work.spendable()
        assert await settled_books_agree(nets(where), s, out, 60), out.getvalue()
    await each_release_was_paid_for(nets(where))
    # every copy of every shard re-executed the same payments and releases alike
    by_shard = await asyncio.to_thread(guild.wait_converged, nets(where), 90)
    assert len(by_shard) == 6 and all(len(cs) == 6 for cs in by_shard.values())
    errors = errors_logged(where)  # an outage is waited out, said as a warning
    assert not errors, "\n".join(errors[:3])


async def test_the_wallet_pays_a_user_of_another_operator(where: Path) -> None:
    op0, op1, _ = nets(where)
    await a_wallet_pays_a_user_of_another_operator(where, op0, op1)
