"""A member joins a live guild (``constellation devnet join``): the members restart on
the layout that names it, its copies learn every shard's log and then vote, the voters
make a new key, the checkpoints hand over to it, and the joiner's own ledger takes
payments. No payment is lost or applied twice and the books balance; every copy at every
member names the new voters, confirmed, and nobody holds a proof against anybody; a
light client pinned before the join follows the handover.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.protocol.signer import KeyRequest
from services.bus import load_agreement
from services.devnet import DevnetError, guild
from services.light import LightClient
from services.runtime import connect_nats
from tests.system.guild import local_guild, pay
from tests.system.test_guild_members import _get, _latest_above, gauges


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-join-", operators=2) as directory:
        yield directory


async def test_a_member_joins_and_votes_signs_and_takes_payments(where: Path) -> None:
    founders = guild.load(where)
    assert all(await asyncio.gather(*(pay(net, 60) for net in founders)))
    old = (await asyncio.to_thread(guild.signer_request, founders[0], KeyRequest())).first
    assert old is not None
    descriptor = pf.Descriptor.decode((await _get(founders[0], "/v1/lc/descriptor"))["descriptor"])
    with pytest.raises(DevnetError, match="name taken"):
        await asyncio.to_thread(guild.join, where, "op1")

    joined = await asyncio.to_thread(guild.join, where, "op2")
    print(f"-- {joined}")
    assert joined.voters == ["op0", "op1", "op2"]
    nets = guild.load(where)
    assert [n.operator for n in nets] == ["op0", "op1", "op2"]
    rows = guild.copies(nets)
    assert len(rows) == 2 * 3 * 3 * 2  # 2 copies x 3 members x 3 owners x 2 workers
    assert all(r["voters"] == [0, 1, 2] and r["members_confirmed"] for r in rows)
    assert not [r for r in rows if r["evidence"]], "a proof against an operator"
    assert set(gauges(nets, "replica_voters")) == {3.0}
    for worker in range(2):
        assert guild.leader(nets, f"op2/{worker}") is not None
    nc = await connect_nats(nets[2].nats_url, "test-join")
    try:
        agreement = await load_agreement(nc, "op2")
    finally:
        await nc.close()
    assert agreement is not None and agreement.voters == [[0, 1], [0, 1, 2]]

    # The three made a new key; the founders' signers retired the old one, and the
    # joiner's holds only the new one (the chain still starts at the old).
    new = bytes.fromhex(joined.key)
    for net in nets:
        held = await asyncio.to_thread(guild.signer_request, net, KeyRequest())
        assert held.threshold_pubkey == new and [k.key for k in held.keys] == [new]
        assert held.keys[0].members == [0, 1, 2]

    # Every member, the joiner too, serves the handover and checkpoints above it; a
    # light client pinned before the join follows it.
    served = [(await _get(net, "/v1/lc/handovers", 60))["handovers"] for net in nets]
    assert served[0] == served[1] == served[2] and len(served[0]) == 1, served
    [doc] = served[0]
    assert doc["next_key"] == new[1:].hex()
    latest = await _latest_above(nets[2], doc["height"], 60)
    signed = Announced.decode(bytes.fromhex(latest["encoded"])).signed
    pin = descriptor.pin.follow(pf.SignedCheckpoint.decode(bytes.fromhex(doc["encoded"])))
    assert pf.verify_checkpoint(pin, signed) == signed.checkpoint
    assert (await _get(nets[2], "/v1/lc/descriptor"))["descriptor"] == descriptor.encode()
    async with aiohttp.ClientSession() as session:
        client = LightClient(descriptor, [nets[2].gateway_url], session)
        _, found = await client.latest()
        assert client.pin.handed == doc["height"] and found.signed.checkpoint.height > doc["height"]

    # Payments on every ledger, the joiner's too, and through the joiner's gateway.
    assert all(await asyncio.gather(*(pay(net, 60) for net in nets)))
    assert await pay(nets[0], 30, via=nets[2])
