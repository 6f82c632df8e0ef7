"""A member leaves a live guild (``constellation devnet leave``): every member agrees, every
shard's members change through a joint step while payments go on, and the leaver stops.
No payment is lost or applied twice and the books balance; every copy at the members
that stay names the new voters, confirmed, and nobody holds a proof against anybody;
the leaver's shards are led by the others' copies, and the two that stay confirm alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.bus import load_agreement
from services.devnet import DevnetError, guild
from services.devnet.procs import alive
from services.runtime import connect_nats
from tests.system.guild import local_guild, pay


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-members-") as directory:
        yield directory


async def test_a_member_leaves_under_payments_and_the_others_go_on(where: Path) -> None:
    nets = guild.load(where)
    paying = [asyncio.create_task(pay(net, 200)) for net in nets[:2]]
    await asyncio.sleep(0.5)
    left = await asyncio.to_thread(guild.leave, where, "op2")
    assert all(await asyncio.gather(*paying))  # conserved, double spend refused, no lock
    print(f"-- {left}")
    assert left.voters == ["op0", "op1"]
    assert not any(alive(p) for m in nets[2].machines for p in [m.pid])

    stay = guild.load(where)[:2]
    rows = guild.copies(stay)
    assert len(rows) == 2 * 2 * 3 * 2  # 2 copies x 2 members x 3 owners x 2 workers
    assert all(r["voters"] == [0, 1] and r["members_confirmed"] for r in rows)
    assert not [r for r in rows if r["evidence"]], "a proof against an operator"
    for worker in range(2):
        lead = guild.leader(stay, f"op2/{worker}")
        assert lead is not None and lead["operator"] in ("op0", "op1")
    nc = await connect_nats(stay[0].nats_url, "test-members")
    try:
        agreement = await load_agreement(nc, "op0")
    finally:
        await nc.close()
    assert agreement is not None and agreement.voters == [[0, 1, 2], [0, 1]]

    # The two that stay confirm alone: payments on both ledgers, op2 gone.
    assert all(await asyncio.gather(*(pay(net, 60) for net in stay)))
    with pytest.raises(DevnetError, match="every member runs"):
        await asyncio.to_thread(guild.leave, where, "op2")
