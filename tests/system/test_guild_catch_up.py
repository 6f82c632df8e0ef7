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
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from constellation.protocol import ledger as proto
from services.devnet import Devnet, guild
from services.workload import run_workload

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
    said = (Path(frozen.state_dir) / "machine.log").read_text()
    assert "backfill: events log whole" in said  # it did install a snapshot, and filled
    for worker in (0, 1):
        ours, twins = await events_log(op0, worker, 0), await events_log(op0, worker, 1)
        assert ours == twins and len(ours) > 10
        assert all(b.prev == a.height for a, b in itertools.pairwise(ours))
    await asyncio.to_thread(guild.wait_home, nets)
    assert await run_workload(op0, 6, 6, 30, 8, io.StringIO())  # indexed, conserved
