"""A copy far behind catches up from a snapshot, and fills the gap that leaves in its
events log from its twin, so that the owner's indexer misses nothing whichever copy it
reads from. Snapshots are taken every 16 blocks here (``REPLICA_SNAPSHOT_EVERY``), so
that a machine frozen for a few seconds of payments falls behind the leaders' logs."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.tx import Transaction, partition_of
from services.api_client import Gateway, GatewayError
from services.devnet import Devnet, guild
from services.gateway.errors import NOT_INDEXED
from services.workload import Workload, run_workload

SETTINGS = {"REPLICA_SNAPSHOT_EVERY": "16", "REPLICA_KEEP": "4"}


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cst-catchup-"))
    root.chmod(0o755)
    saved = {k: os.environ.get(k) for k in SETTINGS}
    os.environ.update(SETTINGS)  # the machines' environment (devnet passes it on)
    try:
        guild.up(root / "g", 3, 2, "test")
        yield root / "g"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        guild.down(root / "g")
        shutil.rmtree(root, ignore_errors=True)


async def events_log(net: Devnet, worker: int, copy: int) -> list[proto.BlockEvents]:
    """A copy's whole events log, as it serves it to its twin (with how far it is
    whole)."""
    nc = await nats.connect(net.nats_url)
    try:
        found: list[proto.BlockEvents] = []
        while True:
            after = found[-1].height if found else -1
            query = msgspec.msgpack.encode(proto.EventsQuery(after))
            msg = await nc.request(f"cst.{net.operator}.qe.{worker}.{copy}", query, timeout=5)
            whole, raw = msgspec.msgpack.decode(msg.data, type=tuple[int, msgspec.Raw])
            assert whole >= 0
            page = proto.decode_page(raw)
            if not page.blocks:
                return found
            found += page.blocks
    finally:
        await nc.close()


def gauges(port: int) -> list[tuple[str, float, float]]:
    """A machine's copies' shard, snapshot height and blocks held after it, from its
    /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    since = {s.labels["shard"]: s.value for s in families["replica_blocks_since_snapshot"].samples}
    snap = families["replica_snapshot_height"].samples
    return [(s.labels["shard"], s.value, since[s.labels["shard"]]) for s in snap]


async def test_a_copy_restored_from_a_snapshot_fills_its_events_from_its_twin(
    where: Path,
) -> None:
    nets = guild.load(where)
    op0 = nets[0]
    assert await run_workload(op0, 6, 6, 60, 8, io.StringIO())
    frozen = op0.machines[1]  # op0/0's twin and op0/1's leader
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        await asyncio.to_thread(guild.wait_new_leader, nets, "op0/1", 0)
        assert await run_workload(op0, 6, 6, 150, 8, io.StringIO())
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    by_shard = await asyncio.to_thread(guild.wait_converged, nets, 90)
    end = time.monotonic() + 60
    while any(c["events_gap"] is not None for c in guild.copies(nets)):
        assert time.monotonic() < end, [c for c in guild.copies(nets) if c["events_gap"]]
        await asyncio.sleep(0.2)
    assert by_shard["op0/0"][0]["confirmed"] > 16 * 2
    # Every copy of op0's shards (the others' took few blocks) snapshots, a follower once
    # its leader's acks prove the block confirmed: the log after a snapshot stays short
    # (16 blocks between them, 8 in flight).
    for m in op0.machines:
        heights = gauges(m.http_port)
        assert len(heights) == 6 and all(since < 64 for _, snap, since in heights), heights
        assert all(snap > 0 for shard, snap, _ in heights if shard.startswith("op0/")), heights
    said = (Path(frozen.state_dir) / "machine.log").read_text()
    assert "backfill: events log whole" in said  # it did install a snapshot, and filled
    for worker in (0, 1):
        ours, twins = await events_log(op0, worker, 0), await events_log(op0, worker, 1)
        assert ours == twins and len(ours) > 10
        assert all(b.prev == a.height for a, b in itertools.pairwise(ours))
    await asyncio.to_thread(guild.wait_home, nets)
    assert await run_workload(op0, 6, 6, 30, 8, io.StringIO())  # indexed, conserved


async def test_a_payment_led_by_a_copy_with_a_gap_in_its_events_is_not_said_not_to_exist(
    where: Path,
) -> None:
    """A copy restored from a snapshot leads (its twin stopped, so its events log keeps
    its gap): a payment it commits, which the owner's index cannot take yet, is "not
    indexed yet" at the gateway, never "not found"; found once the twin is back."""
    nets = guild.load(where)
    op0 = nets[0]
    await asyncio.to_thread(guild.wait_home, nets)
    async with aiohttp.ClientSession() as session:
        work = Workload(op0, Gateway(op0.gateway_url, session), 4, io.StringIO())
        await work.fund(4)
        twin, frozen = op0.machines
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            await asyncio.to_thread(guild.wait_new_leader, nets, "op0/1", 0)
            assert await run_workload(op0, 6, 6, 150, 8, io.StringIO())  # past its log
        finally:
            os.kill(twin.pid, signal.SIGSTOP)  # nothing fills the gap it is about to have
            os.kill(frozen.pid, signal.SIGCONT)
        try:
            end = time.monotonic() + 60
            while not (gapped := gapped_leads(nets, frozen.pid)):
                assert time.monotonic() < end, guild.copies(nets)
                await asyncio.sleep(0.2)
            receipt = await work.gw.submit(payment_in(work, gapped[0], op0.shards))
            with pytest.raises(GatewayError) as unknown:
                await work.gw.get(f"/v1/tx/{receipt['txid']}")
            assert unknown.value.code == NOT_INDEXED, unknown.value
        finally:
            os.kill(twin.pid, signal.SIGCONT)
        end = time.monotonic() + 60
        while True:
            try:
                found = await work.gw.get(f"/v1/tx/{receipt['txid']}")
                break
            except GatewayError as exc:
                assert exc.code == NOT_INDEXED and time.monotonic() < end, exc
                await asyncio.sleep(0.5)
        assert found["status"] == "committed"
    await asyncio.to_thread(guild.wait_converged, nets, 90)


def gapped_leads(nets: list[Devnet], pid: int) -> list[int]:
    """The workers of op0 whose shard the copy on machine ``pid`` leads with a gap in
    its events log."""
    return [
        w
        for w in range(nets[0].shards)
        if (c := guild.leader(nets, f"op0/{w}")) is not None
        and c["pid"] == pid
        and c["events_gap"] is not None
    ]


def payment_in(work: Workload, worker: int, workers: int) -> Transaction:
    """A payment whose coin and outputs are all in ``worker``'s shard (so that only that
    shard's events show it)."""
    owners = PartitionMap.even(workers).owners()
    for _ in range(1_000):
        made = work.payment()
        assert made is not None
        src, cid, coin, tx = made
        if all(owners[partition_of(c)] == worker for c in (cid, *tx.output_ids)):
            return tx
        src.coins = {cid: coin, **src.coins}  # kept, first: the next try takes another coin
    raise AssertionError(f"no payment inside worker {worker}'s shard")
