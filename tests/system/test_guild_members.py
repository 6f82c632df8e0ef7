"""A member leaves a live guild (``constellation devnet leave``): every member agrees, every
shard's members change through a joint step while payments go on, and the leaver stops.
No payment is lost or applied twice and the books balance; every copy at the members
that stay names the new voters, confirmed, and nobody holds a proof against anybody;
the leaver's shards are led by the others' copies, and the two that stay confirm alone.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from constellation.guild import Statement
from constellation.keys import schnorr_verify
from constellation.protocol.signer import KeyRequest, SignRequest
from constellation.replication.members import Agreement
from services.bus import MEMBERS_KEY, load_agreement, map_bucket
from services.devnet import Devnet, DevnetError, guild
from services.devnet.procs import alive
from services.runtime import connect_nats
from tests.system.guild import local_guild, pay


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-members-") as directory:
        yield directory


async def test_a_member_leaves_under_payments_and_the_others_go_on(where: Path) -> None:
    nets = guild.load(where)
    assert set(gauges(nets, "replica_voters")) == {3.0}
    old = (await asyncio.to_thread(guild.signer_request, nets[0], KeyRequest())).threshold_pubkey
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

    # The two that stay made a new key (no coin was held to move); the old one still
    # signs the checkpoints, the new one signs as well, at them only.
    ask = guild.signer_request
    assert left.moved == []
    for net in stay:
        held = await asyncio.to_thread(ask, net, KeyRequest())
        assert held.threshold_pubkey == old
        assert [k.key.hex() for k in held.keys] == [old.hex(), left.key]
    for key in (old, bytes.fromhex(left.key)):
        signing = SignRequest(Statement("after op2 left"), key=key)
        signed = await asyncio.to_thread(ask, stay[1], signing)
        assert signed.ok and signed.threshold_pubkey == key[1:], signed.error
        assert schnorr_verify(signed.threshold_pubkey, signed.message, signed.signature)

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
