"""A member leaves a live guild (``constellation devnet leave``): every member agrees, every
shard's members change through a joint step while payments go on, and the leaver stops.
No payment is lost or applied twice and the books balance; every copy at the members
that stay names the new voters, confirmed, and nobody holds a proof against anybody;
the leaver's shards are led by the others' copies, and the two that stay confirm alone.
The two that stay make a new key, the checkpoints hand over to it and the old key
retires: a light client pinned before the leave follows the handover.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from constellation.errors import WrongMembers
from constellation.guild import Statement
from constellation.keys import schnorr_verify
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.protocol.signer import KeyRequest, SignRequest
from constellation.replication.members import Agreement
from services.bus import MEMBERS_KEY, load_agreement, map_bucket
from services.devnet import Devnet, DevnetError, guild
from services.devnet.procs import alive
from services.light import LightClient, Rpc
from services.runtime import connect_nats
from tests.system.guild import local_guild, pay

LC_TABLES = ["checkpoints", "records", "txs", "touches", "created", "spent", "pin", "proposal"]


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-members-") as directory:
        yield directory


async def test_a_member_leaves_under_payments_and_the_others_go_on(where: Path) -> None:
    nets = guild.load(where)
    assert set(gauges(nets, "replica_voters")) == {3.0}
    old = (await asyncio.to_thread(guild.signer_request, nets[0], KeyRequest())).threshold_pubkey
    descriptor = pf.Descriptor.decode((await _get(nets[1], "/v1/lc/descriptor"))["descriptor"])
    assert descriptor.pin.key == old[1:]
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
    assert set(gauges(stay, "replica_voters")) == {2.0}  # as the dashboards show it
    assert set(gauges(stay, "replica_members_joint")) == set(gauges(stay, "replica_learners"))
    assert set(gauges(stay, "replica_learners")) == {0.0}
    for worker in range(2):
        lead = guild.leader(stay, f"op2/{worker}")
        assert lead is not None and lead["operator"] in ("op0", "op1")
    nc = await connect_nats(stay[0].nats_url, "test-members")
    try:
        agreement = await load_agreement(nc, "op0")
    finally:
        await nc.close()
    assert agreement is not None and agreement.voters == [[0, 1, 2], [0, 1]]

    # The two that stay made a new key (no coin was held to move), the checkpoints were
    # handed over to it, and the old key retired: it signs nothing more.
    ask = guild.signer_request
    new = bytes.fromhex(left.key)
    assert left.moved == []
    for net in stay:
        held = await asyncio.to_thread(ask, net, KeyRequest())
        assert held.threshold_pubkey == new and [k.key for k in held.keys] == [new]
        assert held.first is not None and held.first.key == old  # where the chain starts
    refused = await asyncio.to_thread(ask, stay[1], SignRequest(Statement("after"), key=old))
    assert not refused.ok and "no usable guild key" in refused.error
    signing = SignRequest(Statement("after op2 left"), key=new)
    signed = await asyncio.to_thread(ask, stay[1], signing)
    assert signed.ok and schnorr_verify(new[1:], signed.message, signed.signature)
    await _handed_over(stay, descriptor, new)
    await _indexer_restarts_after_the_handover(where, descriptor, new)
    await _indexer_loses_its_store_after_the_handover(where, descriptor)

    # The two that stay confirm alone: payments on both ledgers, op2 gone.
    assert all(await asyncio.gather(*(pay(net, 60) for net in stay)))
    with pytest.raises(DevnetError, match="every member runs"):
        await asyncio.to_thread(guild.leave, where, "op2")


async def test_an_agreement_a_machine_cannot_take_makes_it_not_ready(where: Path) -> None:
    """One naming an operator the layout lacks: the machine says why, and is ready again
    once the agreement is mended."""
    net = guild.load(where)[0]
    port = net.machines[0].http_port
    nc = await connect_nats(net.nats_url, "test-members")
    kv = await nc.jetstream().key_value(map_bucket("op0"))
    good = (await kv.get(MEMBERS_KEY)).value
    try:
        await kv.put(MEMBERS_KEY, Agreement([[0, 1, 2], [0, 1], [0, 1, 7]]).encode())
        why = await asyncio.to_thread(_not_ready, port, 10.0)
        assert "names operator 7" in why
    finally:
        await kv.put(MEMBERS_KEY, good or b"")
        await nc.close()
    await asyncio.to_thread(guild.wait_machines, [net], 30)


def _not_ready(port: int, wait_s: float) -> str:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
        except urllib.error.HTTPError as exc:
            return str(json.loads(exc.read())["reason"])
        time.sleep(0.1)
    raise AssertionError(f"machine on {port} stayed ready")


def gauges(nets: list[Devnet], name: str) -> list[float]:
    """Every copy's value of gauge ``name``, from its machine's ``/metrics``."""
    found = []
    for m in (m for net in nets for m in net.machines):
        with urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            found += [s.value for s in family.samples if s.name == name]
    assert found, f"no {name}"
    return found


async def _handed_over(stay: list[Devnet], descriptor: pf.Descriptor, new: bytes) -> None:
    """Each member that stays serves one handover, from the pinned key to ``new`` and the
    two members; the chain verifies from the pin through it, and what is above it does
    not under the pin alone. A light client pinned before follows it (and so does one
    made again from the handovers it kept)."""
    keys = (await _get(stay[0], "/v1/lc/descriptor"))["member_keys"][:2]
    members = pf.members_root(2, [(k["name"], bytes.fromhex(k["key"])) for k in keys])
    async with aiohttp.ClientSession() as session:
        served = [(await _get(net, "/v1/lc/handovers", 5))["handovers"] for net in stay]
        assert served[0] == served[1] and len(served[0]) == 1, served
        ws_url = stay[0].gateway_url.replace("http", "ws", 1) + "/v1/lc/ws"
        async with session.ws_connect(ws_url) as ws:  # the same over the websocket
            assert (await Rpc(ws).call("guild.handovers"))["handovers"] == served[0]
            nothing = await Rpc(ws).call("guild.handovers", start=served[0][0]["height"] + 1)
            assert nothing["handovers"] == []
        [doc] = served[0]
        assert (doc["next_key"], doc["next_members"]) == (new[1:].hex(), members.hex())
        pin = descriptor.pin.follow(pf.SignedCheckpoint.decode(bytes.fromhex(doc["encoded"])))
        height = doc["height"]
        end = time.monotonic() + 30
        while True:  # until a checkpoint above the handover is signed
            async with session.get(stay[0].gateway_url + "/v1/lc/checkpoints/latest") as r:
                latest = Announced.decode(bytes.fromhex((await r.json())["encoded"]))
            if latest.signed.checkpoint.height > height:
                break
            assert time.monotonic() < end, "no checkpoint above the handover"
            await asyncio.sleep(0.5)
        async with session.get(f"{stay[1].gateway_url}/v1/lc/checkpoints?start=0&count=100") as r:
            chain = [
                Announced.decode(bytes.fromhex(c["encoded"]))
                for c in (await r.json())["checkpoints"]
            ]
        for a in chain:
            c = pf.verify_checkpoint(pin, a.signed)
            assert c.members == (members if c.height > height else descriptor.pin.members)
            if c.height > height:
                with pytest.raises(WrongMembers):
                    pf.verify_checkpoint(descriptor.pin, a.signed)
        assert chain[-1].signed.checkpoint.height > height

        client = LightClient(descriptor, [stay[1].gateway_url], session)
        _, found = await client.latest()
        assert found.signed.checkpoint.height > height and client.pin.handed == height
        again = LightClient(
            descriptor, [stay[0].gateway_url], session, handovers=client.pin.handovers
        )
        assert again.pin == client.pin
        await again.latest()


async def _indexer_restarts_after_the_handover(
    where: Path, descriptor: pf.Descriptor, new: bytes
) -> None:
    """``kill -9`` of op1's indexer (its signer vouches through it: the new key needs
    both members): restored from its store, it follows the handover again, and the
    guild goes on checkpointing under the new key (payments move the shards), served by
    op1 too."""
    op0, op1 = guild.load(where)[:2]
    latest = await _get(op1, "/v1/lc/checkpoints/latest")
    os.kill(op1.indexer_pid, signal.SIGKILL)
    started = time.monotonic()
    end = started + 60
    while (pid := guild.load(where)[1].indexer_pid) == op1.indexer_pid or not alive(pid):
        assert time.monotonic() < end, "the indexer was not restarted"
        await asyncio.sleep(0.2)
    assert await pay(op0, 30)
    after = await _latest_above(op1, latest["height"], end - time.monotonic())
    print(f"-- a checkpoint {time.monotonic() - started:.1f} s after op1's indexer was killed")
    signed = Announced.decode(bytes.fromhex(after["encoded"])).signed
    assert schnorr_verify(new[1:], signed.checkpoint.message(), signed.sig)
    [handover] = (await _get(op1, "/v1/lc/handovers"))["handovers"]
    pin = descriptor.pin.follow(pf.SignedCheckpoint.decode(bytes.fromhex(handover["encoded"])))
    assert pf.verify_checkpoint(pin, signed) == signed.checkpoint


async def _indexer_loses_its_store_after_the_handover(
    where: Path, descriptor: pf.Descriptor
) -> None:
    """op1's indexer loses every checkpoint it stored, and restarts: it pins the first
    key again (its signer's first share: the key that signs now is the new one), follows
    the handover another member announces, adopts the latest checkpoint and fills the
    rest from the others, and serves the same descriptor and handover as before."""
    op0, op1 = guild.load(where)[:2]
    latest = await _get(op1, "/v1/lc/checkpoints/latest")
    [handover] = (await _get(op1, "/v1/lc/handovers"))["handovers"]
    conn = await asyncpg.connect(op1.database_url)
    try:
        lost = ", ".join(f"lc_{t}" for t in LC_TABLES)
        await conn.execute(f"DROP TABLE {lost}")
    finally:
        await conn.close()
    os.kill(op1.indexer_pid, signal.SIGKILL)
    started = time.monotonic()
    while (pid := guild.load(where)[1].indexer_pid) == op1.indexer_pid or not alive(pid):
        assert time.monotonic() < started + 60, "the indexer was not restarted"
        await asyncio.sleep(0.2)
    assert await pay(op0, 30)
    await _latest_above(op1, latest["height"], 60)
    assert (await _get(op1, "/v1/lc/handovers", 60))["handovers"] == [handover]
    served = await _get(op1, "/v1/lc/descriptor", 60)  # checkpoint 0 filled from the others
    assert served["descriptor"] == descriptor.encode()
    print(
        f"-- op1's indexer, its store lost, served again after {time.monotonic() - started:.1f} s"
    )


async def _latest_above(net: Devnet, height: int, wait_s: float) -> Any:
    """The latest checkpoint ``net`` serves, once it is above ``height``."""
    end = time.monotonic() + wait_s
    while (latest := await _get(net, "/v1/lc/checkpoints/latest", wait_s))["height"] <= height:
        assert time.monotonic() < end, f"no checkpoint above {height} at {net.operator}"
        await asyncio.sleep(0.5)
    return latest


async def _get(net: Devnet, path: str, wait_s: float = 30.0) -> Any:
    """``path`` at ``net``'s gateway, once it answers (its indexer may be starting)."""
    end = time.monotonic() + wait_s
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(net.gateway_url + path) as r:
                if r.status == 200:
                    return await r.json()
                assert time.monotonic() < end, await r.text()
            await asyncio.sleep(0.2)
