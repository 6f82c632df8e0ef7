"""A local guild of real processes: 3 operators, each with its own NATS, gateway,
indexer and two machines holding a copy of every shard (6 copies a shard), under
payments, with leaders killed (``kill -9``) and frozen (SIGSTOP), a whole operator
stopped and started again, and forged traffic on an operator's NATS.

After each: every acknowledged payment is in the books (the workload checks that value
is conserved and its wallets' books equal the ledger), nothing is spent twice (its
double spend is refused), and every copy of every shard reaches the same confirmed
height and state root. The tests share one guild, in order.
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

import nats
import pytest

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.placement import COPIES, MIN_MACHINES, Placement
from services.bus import GATEWAY, worker_subject
from services.devnet import Devnet, guild
from services.replica import relay
from services.replica.transport import Sealer, copy_target, forward_subject, subject
from services.runtime import now_ms
from tests.system.guild import cli, kill_the_leader_under_payments, local_guild, pay


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-guild-") as directory:
        yield directory


def nets(where: Path) -> list[Devnet]:
    return guild.load(where)  # the current pids (the supervisors restart what dies)


def converged(where: Path) -> dict[str, list[dict[str, Any]]]:
    by_shard = guild.wait_converged(nets(where), 90)
    assert len(by_shard) == 6 and all(len(cs) == 6 for cs in by_shard.values())
    return by_shard


def no_two_leaders_in_a_term(where: Path) -> None:
    for shard in {c["shard"] for c in guild.copies(nets(where))}:
        leaders = [
            (c["term"], c["copy"])
            for c in guild.copies(nets(where))
            if c["shard"] == shard and c["role"] == "leader"
        ]
        assert len({t for t, _ in leaders}) == len(leaders), (shard, leaders)


async def test_payments_reach_every_copy_of_their_shards_alike(where: Path) -> None:
    assert all(await asyncio.gather(*(pay(n) for n in nets(where))))
    op0, op1, _ = nets(where)
    before = relayed(op1)
    assert await pay(op0, 60, via=op1)  # relayed to op0's leaders, and answered back
    assert relayed(op1) > before
    by_shard = converged(where)
    for owner in ("op0", "op1", "op2"):
        assert by_shard[f"{owner}/0"][0]["confirmed"] > 1  # payments made blocks
        leaders = [c for c in by_shard[f"{owner}/0"] if c["role"] == "leader"]
        assert [c["operator"] for c in leaders] == [owner]


async def test_kill_9_of_a_leader_under_payments_loses_nothing(where: Path) -> None:
    await kill_the_leader_under_payments(where, "op0/0", 300)
    converged(where)
    no_two_leaders_in_a_term(where)


async def test_a_frozen_leader_is_replaced_and_steps_down_when_it_wakes(where: Path) -> None:
    await asyncio.to_thread(guild.wait_home, nets(where))
    lead = guild.leader(nets(where), "op0/1")
    assert lead is not None
    os.kill(lead["pid"], signal.SIGSTOP)
    try:
        paying = asyncio.create_task(pay(nets(where)[0]))
        new = await asyncio.to_thread(
            guild.wait_new_leader, nets(where), "op0/1", lead["confirmed"]
        )
        assert new["term"] > lead["term"] and new["copy"] != lead["copy"]
        assert await paying
    finally:
        os.kill(lead["pid"], signal.SIGCONT)
    converged(where)
    no_two_leaders_in_a_term(where)


async def test_a_stopped_operator_s_shards_are_led_elsewhere_then_it_catches_up(
    where: Path,
) -> None:
    await asyncio.to_thread(guild.wait_home, nets(where))
    # a user of op2 with the wallet command: it learns its ledger and coins at op2
    alice = str(where.parent / "alice.json")
    op2_dir = str(where / "op2")
    assert (
        await cli("wallet", "create", "--file", alice, "--gateway", nets(where)[2].gateway_url)
    )[0] == 0
    address = (await cli("wallet", "address", "--file", alice))[1].strip()
    assert (await cli("devnet", "fund", address, "5000000", "--dir", op2_dir))[0] == 0
    end = time.monotonic() + 10
    while "5000000 msat in 1 coins" not in (await cli("wallet", "balance", "--file", alice))[1]:
        assert time.monotonic() < end, "the funded coin is not in op2's index"
        await asyncio.sleep(0.2)
    before = {s: guild.leader(nets(where), s) for s in ("op2/0", "op2/1")}
    await asyncio.to_thread(guild.stop_operator, where, "op2")
    for shard, lead in before.items():
        assert lead is not None
        new = await asyncio.to_thread(guild.wait_new_leader, nets(where), shard, lead["confirmed"])
        assert new["operator"] != "op2"
    op0, op1, op2 = nets(where)
    nodes = {n["name"]: n for n in guild.lightning(where, "/v1/nodes")}
    assert not nodes["op2"]["online"] and nodes["op0"]["online"]  # its node went with it
    assert await pay(op0)  # the others go on paying (a majority is up)
    # op2's users pay through op1's gateway: its shards' new leaders, at op0 and op1 or
    # both at one of them, take the payments relayed
    before_relayed = relayed(op0) + relayed(op1)
    assert await pay(op2, via=op1)
    assert relayed(op0) + relayed(op1) > before_relayed
    # and alice pays with the coins her wallet knows, checked at op1's gateway
    bob = SigningKey(os.urandom(32)).pubkey
    bob_address = encode_address(bob, Network.REGTEST)
    code, out = await cli(
        "wallet", "pay", bob_address, "1000000", "--file", alice, "--via", op1.gateway_url
    )
    assert code == 0, out
    code, out = await cli("wallet", "balance", "--file", alice, "--via", op1.gateway_url)
    assert "3999000 msat in 1 coins" in out, out  # the change, after a 1,000 msat fee
    await asyncio.to_thread(guild.start_operator, where, "op2")
    by_shard = converged(where)
    await asyncio.to_thread(guild.wait_home, nets(where))
    assert await pay(nets(where)[2])
    assert by_shard["op0/0"][0]["confirmed"] > 0


def relayed(net: Devnet) -> float:
    """Messages ``net``'s machines relayed to other operators."""
    total = 0.0
    for m in net.machines:
        url = f"http://127.0.0.1:{m.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('replica_relayed_messages_total{direction="out"}'):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def rejected(net: Devnet, machine: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{net.machines[machine].http_port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("replica_rejected_messages_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


async def test_forged_replayed_and_impersonating_traffic_is_refused(where: Path) -> None:
    op0, op1, _ = nets(where)
    layout = guild.layout(nets(where))
    machine = 0
    placement = Placement.initial(layout.workers, MIN_MACHINES)
    (dest,) = [k for k in range(COPIES) if placement.spots[placement.slot(k, 0)].machine == 0]
    key = SigningKey(bytes.fromhex(op1.operator_key))
    stale = rp.Envelope(0, 0, 2, rp.Appended(0, False, 0, bytes(32), bytes(64), ""))
    good = Sealer(layout.guild, key, layout.keys).seal(0, stale, now_ms())
    url = f"nats://op1:{op0.issued['op1']}@127.0.0.1:{op0.nats_port}"  # what op0 issued op1
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    before = rejected(op0, machine)
    nc = await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0)
    try:
        await nc.publish(subject("op1", 0, 0, dest), good)
        await nc.publish(subject("op1", 0, 0, dest), good)  # replayed
        await nc.publish(subject("op1", 0, 0, dest), b"\x00forged")
        await nc.publish(subject("op2", 0, 0, dest), good)  # as another: not permitted
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors
    after = rejected(op0, machine)
    assert after.get("protocol.replay", 0) == before.get("protocol.replay", 0) + 1
    assert sum(after.values()) == sum(before.values()) + 2  # the replay and the garbage
    with pytest.raises(Exception, match=r"[Aa]uthoriz"):
        bad = f"nats://op1:wrong@127.0.0.1:{op0.nats_port}"
        await nats.connect(bad, max_reconnect_attempts=0, allow_reconnect=False)
    started = time.monotonic()
    assert await pay(op0, 20)  # and the guild goes on
    assert time.monotonic() - started < 60


async def test_relayed_packages_and_answers_from_a_peer_are_checked(where: Path) -> None:
    """op1 relays to op0's machine that leads op0/0: a decision from a shard op1 does not
    lead, a gateway's package with a worker's message, an answer to a request nobody
    relayed to op1 and garbage are refused, counted, and change nothing."""
    await asyncio.to_thread(guild.wait_home, nets(where))
    op0, op1, _ = nets(where)
    layout = guild.layout(nets(where))
    placement = Placement.initial(layout.workers, MIN_MACHINES)
    machine = placement.spots[placement.slot(0, 0)].machine  # op0/0's leader is there
    sealer = Sealer(layout.guild, SigningKey(bytes.fromhex(op1.operator_key)), layout.keys)
    decide = proto.Decide(bytes(32), True, 1)
    bodies: list[relay.Forward] = [
        # as if op0/1's leader told op0/0 a decision: op1 leads no such shard
        relay.Relayed(
            0,
            0,
            0,
            proto.encode(
                proto.Package(proto.PROTOCOL_VERSION, 1, worker_subject("op0", 1), 1, [decide])
            ),
        ),
        # a "gateway" package carrying a worker's message
        relay.Relayed(
            0,
            0,
            0,
            proto.encode(proto.Package(proto.PROTOCOL_VERSION, GATEWAY, "cst.x.y", 1, [decide])),
        ),
        # a "committed" answer to a gateway's request that was never relayed to op1
        relay.Answer(
            "cst.op0.gw.forged",
            proto.encode(
                proto.Package(
                    proto.PROTOCOL_VERSION, 0, "cst.op0.w.0", 1, [proto.Result(1, "", "", [])]
                )
            ),
        ),
    ]
    before = rejected(op0, machine)
    ledger_before = await totals(op0)
    url = f"nats://op1:{op0.issued['op1']}@127.0.0.1:{op0.nats_port}"
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        for body in bodies:
            data = sealer.seal_body(0, relay.encode(body), now_ms())
            await nc.publish(forward_subject("op1", copy_target(0, 0, 0)), data)
        junk = sealer.seal_body(0, b"junk", now_ms())
        await nc.publish(forward_subject("op1", copy_target(0, 0, 0)), junk)
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    after = rejected(op0, machine)
    assert after.get("protocol.misdirected", 0) == before.get("protocol.misdirected", 0) + 1
    assert after.get("protocol.malformed", 0) == before.get("protocol.malformed", 0) + 2
    assert after.get("protocol.unasked", 0) == before.get("protocol.unasked", 0) + 1
    assert await totals(op0) == ledger_before
    assert await pay(op0, 20, via=op1)
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, f"{op1.gateway_url}/v1/ledger?ledger=op7")
    assert refused.value.code == 400
    assert json.load(refused.value)["error"]["code"] == "malformed.ledger"


async def totals(net: Devnet) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"{net.gateway_url}/v1/ledger", timeout=10) as r:
            doc: dict[str, Any] = json.load(r)
        return {k: doc[k] for k in ("held_msat", "issued_msat", "fees_msat", "coins", "locks")}

    return await asyncio.to_thread(get)


def gauges(net: Devnet, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{net.gateway_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name)
    }


async def test_every_gateway_watches_its_lightning_node_with_a_channel_to_each_peer(
    where: Path,
) -> None:
    for net in nets(where):
        end = time.monotonic() + 30
        while gauges(net, "gateway_lightning_up").get("gateway_lightning_up") != 1:
            assert time.monotonic() < end, f"{net.operator}'s gateway sees no Lightning node"
            await asyncio.sleep(0.5)
        money = gauges(net, "gateway_lightning_msat")
        half = guild.CHANNEL_SAT * 1000 // 2  # each channel starts balanced
        assert money['gateway_lightning_msat{kind="local"}'] == 3 * half
        channels = gauges(net, "gateway_lightning_channel_msat")
        # one per peer, and one to the network's outside node (users' own wallets)
        assert sum(1 for k in channels if 'kind="local"' in k) == 3
    assert guild.lightning(where, "/v1/books")["missing_msat"] == 0
