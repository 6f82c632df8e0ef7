"""Machines added and removed under payments: each operator's copies move live between
its machines (``constellation.replication.placement``). No payment is lost or applied
twice and the books balance; at no moment does a copy run on two machines; nobody
holds a proof against anybody (a copy that voted twice would be one); every copy ends on
one machine and the removed machines are gone; a machine that cannot be drained stops
the change, and the machine being removed keeps running until its copies have moved."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from constellation.replication.placement import COPIES, Placement
from services.bus import load_placement, update_placement
from services.devnet import Devnet, DevnetError, guild
from services.devnet.procs import alive
from services.replica.moves import PLACEMENT_FILE, recorded
from services.runtime import connect_nats
from tests.system.guild import local_guild, pay


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-moves-") as directory:
        yield directory


async def watch(where: Path, stop: asyncio.Event) -> tuple[int, set[tuple[str, str, int]]]:
    """Look at every machine's copies until ``stop``: (how many looks, the copies seen
    running on two machines at once)."""
    looks, doubled = 0, set()
    while not stop.is_set():
        rows = await asyncio.to_thread(guild.copies, guild.load(where))
        seen = Counter((r["operator"], r["shard"], r["copy"]) for r in rows)
        doubled |= {copy for copy, n in seen.items() if n > 1}
        looks += 1
        await asyncio.sleep(0.05)
    return looks, doubled


async def change_under_payments(where: Path, machines: dict[str, int]) -> None:
    """Change operators' machines at once while both ledgers take payments."""
    nets = guild.load(where)
    stop = asyncio.Event()
    watching = asyncio.create_task(watch(where, stop))
    paying = [asyncio.create_task(pay(net, 200)) for net in nets[:2]]
    await asyncio.sleep(0.5)
    done = await asyncio.gather(
        *(asyncio.to_thread(guild.set_machines, where, op, n) for op, n in machines.items())
    )
    assert all(await asyncio.gather(*paying))  # conserved, double spend refused, no lock
    stop.set()
    looks, doubled = await watching
    assert looks >= 5 and not doubled, f"copies on two machines at once: {doubled} ({looks} looks)"
    for d in done:
        assert d.after == machines[d.operator] and d.moved > 0, d
        print(f"-- {d}")


async def placement_of(net: Devnet) -> Placement:
    nc = await connect_nats(net.nats_url, "test-placement")
    try:
        found = await load_placement(nc, net.operator)
    finally:
        await nc.close()
    assert found is not None
    return found[0]


async def settled(where: Path, machines: dict[str, int]) -> None:
    nets = guild.load(where)
    by_shard = guild.wait_converged(nets, 90)
    rows = [c for copies in by_shard.values() for c in copies]
    assert not [r for r in rows if r["evidence"]], "a proof against an operator"
    for net in nets:
        assert len(net.machines) == machines[net.operator]
        mine = [r for r in rows if r["operator"] == net.operator]
        assert len(mine) == COPIES * len(nets) * net.shards  # each copy once
        assert {r["machine"] for r in mine} == set(range(machines[net.operator]))
        for shard in by_shard:  # an operator's two copies of a shard on two machines
            assert len({r["machine"] for r in mine if r["shard"] == shard}) == COPIES
        assert (await placement_of(net)).done(machines[net.operator])


async def test_machines_added_and_removed_under_payments_lose_and_double_nothing(
    where: Path,
) -> None:
    await change_under_payments(where, {"op0": 4, "op1": 3})
    await settled(where, {"op0": 4, "op1": 3, "op2": 2})
    gone = [m for m in guild.load(where)[0].machines if m.index >= 2]
    await change_under_payments(where, {"op0": 2, "op1": 2})
    await settled(where, {"op0": 2, "op1": 2, "op2": 2})
    for machine in gone:  # stopped once drained; their folders dropped
        assert not alive(machine.pid)
        assert sorted(p.name for p in Path(machine.state_dir).iterdir()) == [
            "machine.log",
            PLACEMENT_FILE,
        ]
    assert all(await asyncio.gather(*(pay(n, 40) for n in guild.load(where))))


async def test_a_machine_that_cannot_be_drained_is_not_removed(where: Path) -> None:
    await asyncio.to_thread(guild.set_machines, where, "op0", 3)
    net = guild.load(where)[0]
    frozen = net.machines[0]  # what moves off machine 2 goes to 0 and 1: 0 cannot take it
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DevnetError, match=r"waiting: .* -> 0"):
            await asyncio.to_thread(guild.set_machines, where, "op0", 2, stalled_s=3.0)
        leaving = guild.load(where)[0].machines
        assert len(leaving) == 3 and alive(leaving[2].pid)  # it still holds copies
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    done = await asyncio.to_thread(guild.set_machines, where, "op0", 2)
    assert done.after == 2
    await settled(where, {"op0": 2, "op1": 2, "op2": 2})


async def test_a_placement_rolled_back_in_the_kv_is_not_followed(where: Path) -> None:
    """op0's placement in its NATS KV goes back to an older version in which machine 0
    ran the copy machine 1 runs (the KV restored from a backup, or lost and written
    again): a machine once followed it, opening that copy afresh beside the one running
    (a second instance of one copy, with no vote remembered). It is not followed: the
    copies stay where they run, and the machines say why."""
    net = guild.load(where)[0]
    nc = await connect_nats(net.nats_url, "test-rollback")
    try:
        found = await load_placement(nc, net.operator)
        assert found is not None
        now, revision = found
        ahead = msgspec.structs.replace(now, version=now.version + 1)  # as after a move
        revision = await update_placement(nc, net.operator, ahead, revision)
        dirs = [Path(m.state_dir) for m in net.machines]
        while any((recorded(d) or now).version < ahead.version for d in dirs):
            await asyncio.sleep(0.1)
        # the older version: worker 0's two copies the other way round
        swapped = [now.spots[now.workers], *now.spots[1 : now.workers], now.spots[0]]
        swapped += now.spots[now.workers + 1 :]
        older = msgspec.structs.replace(now, spots=swapped)
        revision = await update_placement(nc, net.operator, older, revision)
        stop = asyncio.Event()
        watching = asyncio.create_task(watch(where, stop))
        await asyncio.sleep(3.0)
        stop.set()
        looks, doubled = await watching
        assert looks >= 5 and not doubled, f"copies on two machines at once: {doubled}"
        logs = [(d / "machine.log").read_text() for d in dirs]
        assert all("older than the one followed" in text for text in logs)
        back = msgspec.structs.replace(now, version=ahead.version + 1)
        await update_placement(nc, net.operator, back, revision)
    finally:
        await nc.close()
    await settled(where, {n.operator: len(n.machines) for n in guild.load(where)})
