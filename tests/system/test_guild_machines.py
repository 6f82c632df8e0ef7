"""A local guild whose operators run three machines each: an operator's two copies of a
shard are on two of them (``constellation.replication.placement``), payments reach every
copy alike, and ``kill -9`` of the machine holding a leader hands the shard to its twin
on another."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from constellation.replication.placement import COPIES
from services.devnet import Devnet, guild
from tests.system.guild import kill_the_leader_under_payments, local_guild, pay

MACHINES = 3


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-machines-", operators=2, machines=MACHINES) as directory:
        yield directory


def nets(where: Path) -> list[Devnet]:
    return guild.load(where)


async def test_the_copies_spread_over_three_machines(where: Path) -> None:
    assert all(await asyncio.gather(*(pay(n, 60) for n in nets(where))))
    by_shard = guild.wait_converged(nets(where), 90)
    assert len(by_shard) == 2 * 2  # shards: operators x workers
    for shard, copies in by_shard.items():
        assert len(copies) == COPIES * 2, shard  # two copies at each operator
        for operator in ("op0", "op1"):
            machines = [c["machine"] for c in copies if c["operator"] == operator]
            assert len(machines) == COPIES and len(set(machines)) == COPIES, (shard, machines)
    for net in nets(where):
        assert len(net.machines) == MACHINES
        used = {c["machine"] for c in guild.copies([net])}
        assert used == set(range(MACHINES)), f"{net.operator}: machines {used} hold copies"


async def test_kill_9_of_a_leaders_machine_hands_the_shard_to_its_twin(where: Path) -> None:
    await asyncio.to_thread(guild.wait_home, nets(where))
    lead, new = await kill_the_leader_under_payments(where, "op0/1", 200)
    assert new["machine"] != lead["machine"]
    guild.wait_converged(nets(where), 90)
