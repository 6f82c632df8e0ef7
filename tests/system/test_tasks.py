"""Every long-running task of every service is supervised: one that dies is logged once
with its traceback, counted, makes its service not ready while it is down, and is
restarted; the service then works as before.

A worker, a gateway and an indexer run in this test's process (so that the test can
break their tasks), as operator ``tasks`` on the NATS, Redis and PostgreSQL servers of a
devnet (a database of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
import pytest
from prometheus_client import CollectorRegistry

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.tx import Issuance, TxOutput
from services.api_client import Gateway
from services.bus import events_subject, publish_map
from services.database import DATABASE_DOWN
from services.follow import Follower, FollowMetrics
from services.gateway.app import GatewayNode
from services.gateway.config import Settings as GatewaySettings
from services.indexer.app import Indexer
from services.indexer.config import Settings as IndexerSettings
from services.partition.app import WorkerNode
from services.partition.config import Settings as WorkerSettings
from services.partition.wal import BlockLog
from services.runtime import OpsServer
from tests.system.operator import Operator, pay

OPERATOR = "tasks"
ISSUER = SigningKey(os.urandom(32))


@pytest.fixture(scope="module")
def op() -> Iterator[Operator]:
    operator = Operator(workers=1)
    yield operator
    operator.close()


@dataclass
class Services:
    worker: WorkerNode
    gateway: GatewayNode
    indexer: Indexer
    url: str


@pytest.fixture
async def services(op: Operator, tmp_path: Path) -> AsyncIterator[Services]:
    net = op.net
    database = f"tasks_{os.getpid()}_{int(time.time() * 1000)}"
    conn = await asyncpg.connect(net.database_url)
    await conn.execute(f"CREATE DATABASE {database}")
    await conn.close()
    dsn = net.database_url.rsplit("/", 1)[0] + "/" + database
    nc = await nats.connect(net.nats_url)
    await publish_map(nc, OPERATOR, PartitionMap.even(1))
    await nc.close()
    worker = WorkerNode(
        WorkerSettings.from_env(
            {
                "WORKER_ID": "0",
                "WORKER_OPERATOR": OPERATOR,
                "WORKER_NATS_URL": net.nats_url,
                "WORKER_STATE_DIR": str(tmp_path / "worker"),
                "WORKER_ISSUERS": ISSUER.pubkey.hex(),
            }
        )
    )
    gateway = GatewayNode(
        GatewaySettings.from_env(
            {
                "GATEWAY_OPERATOR": OPERATOR,
                "GATEWAY_NATS_URL": net.nats_url,
                "GATEWAY_REDIS_URL": net.redis_url,
                "GATEWAY_DATABASE_URL": dsn,
                "GATEWAY_HTTP_ADDR": "127.0.0.1:0",
            }
        )
    )
    indexer = Indexer(
        IndexerSettings.from_env(
            {
                "INDEXER_OPERATOR": OPERATOR,
                "INDEXER_NATS_URL": net.nats_url,
                "INDEXER_DATABASE_URL": dsn,
                "INDEXER_STALL_S": "3",
            }
        )
    )
    stop = asyncio.Event()
    running = [asyncio.create_task(n.run(stop)) for n in (worker, gateway, indexer)]
    for node in (worker, gateway, indexer):
        await until(lambda node=node: node.ops.readiness()[0], f"{node} ready")  # type: ignore[misc]
    yield Services(worker, gateway, indexer, f"http://127.0.0.1:{gateway.ops.port}")
    stop.set()
    await asyncio.wait_for(asyncio.gather(*running), 30)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"not {what} after {timeout_s} s"
        await asyncio.sleep(0.02)


async def paid_and_indexed(url: str) -> None:
    """A coin issued and paid through the gateway, then found in the index."""
    alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    async with aiohttp.ClientSession() as session:
        gw = Gateway(url, session)
        issuance = Issuance(ISSUER.pubkey, 1, [TxOutput(5_000, alice.pubkey)])
        issuance = issuance.signed_by(ISSUER.secret)
        await gw.issue(issuance)
        tx = pay([(issuance.output_ids[0], 5_000, alice)], [TxOutput(4_900, bob.pubkey)], 100)
        assert (await gw.submit(tx))["status"] == "committed"
    await until_found(url, tx.txid.hex())


class Broken:
    """Makes a callable raise while ``broken`` is set; counts the calls that raised."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.broken = True
        self.raised = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            self.raised += 1
            raise RuntimeError("injected")
        return self.real(*args, **kwargs)


def failures(ops: OpsServer, task: str) -> float:
    value = ops.registry.get_sample_value("task_failures_total", {"task": task})
    return value or 0.0


async def traffic(url: str) -> None:
    """Payments, one after the other, whatever becomes of them (until cancelled)."""
    while True:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(paid_and_indexed(url), 0.5)
        await asyncio.sleep(0.05)


async def test_each_kind_of_task_dies_is_seen_and_comes_back(
    services: Services, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "runtime")
    await paid_and_indexed(services.url)
    worker, gateway, indexer = services.worker, services.gateway, services.indexer
    assert worker.worker is not None and worker.nc is not None
    assert gateway.api is not None and indexer.follower is not None
    cases: list[tuple[OpsServer, str, object, str]] = [
        (worker.ops, "tick", worker.worker.engine, "expire"),
        (worker.ops, "events", proto, "encode_events"),
        (worker.ops, "packages", worker.nc, "publish"),
        (gateway.ops, f"packages-{OPERATOR}", gateway.api.ledger.nc, "publish"),
        (gateway.ops, "limits", gateway.api.limits, "sync"),
        (indexer.ops, "follow", indexer.follower, "sink"),
    ]
    for ops, task, target, attribute in cases:
        caplog.clear()
        before = failures(ops, task)
        broken = Broken(getattr(target, attribute))
        load = asyncio.create_task(traffic(services.url))
        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, broken)
            # It fails again and again (backing off) and says so while it waits.
            await until(lambda: failures(ops, task) >= before + 3, f"{task} failing")  # noqa: B023
            await until(lambda: not ops.readiness()[0], f"{task}: not ready")  # noqa: B023
            why = ops.readiness()[1]
            assert f"task {task} failed" in why and "injected" in why, why
            # (Another task may fail with it: the worker's tasks share their NATS client.)
            failed = [r for r in caplog.records if getattr(r, "task", "") == task]
            failed = [r for r in failed if r.getMessage() == "task failed"]
            assert failed and all(r.exc_info for r in failed)
            broken.broken = False
            await until(lambda: ops.readiness()[0], f"ready once {task} is mended")  # noqa: B023
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        assert any(r.getMessage() == "task restarted" for r in caplog.records)
        await paid_and_indexed(services.url)  # and it works as before


async def test_what_a_worker_did_not_publish_is_pushed_and_indexed_all_the_same(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker publishes nothing (as when it crashes right after writing a block): a
    websocket subscriber is still told, and the index still finds the payment, from the
    worker's events log."""
    assert services.worker.worker is not None
    monkeypatch.setattr(services.worker.worker.writer, "publish", lambda _: None)
    alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    address = encode_address(bob.pubkey, Network.REGTEST)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(services.url + "/v1/ws") as ws,
    ):
        await ws.send_json({"subscribe": [address]})
        assert (await ws.receive_json(timeout=10))["type"] == "subscribed"
        gw = Gateway(services.url, session)
        issuance = Issuance(ISSUER.pubkey, 2, [TxOutput(5_000, alice.pubkey)])
        issuance = issuance.signed_by(ISSUER.secret)
        await gw.issue(issuance)
        tx = pay([(issuance.output_ids[0], 5_000, alice)], [TxOutput(4_900, bob.pubkey)], 100)
        assert (await gw.submit(tx))["status"] == "committed"
        note = await ws.receive_json(timeout=10)
        assert note["type"] == "coin" and note["txid"] == tx.txid.hex()
        assert note["kind"] == "received" and note["address"] == address
    await until_found(services.url, tx.txid.hex())


async def test_a_lookup_says_when_the_index_is_behind_the_ledger(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert services.indexer.follower is not None
    broken = Broken(services.indexer.follower.sink)
    monkeypatch.setattr(services.indexer.follower, "sink", broken)
    alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    async with aiohttp.ClientSession() as session:
        gw = Gateway(services.url, session)
        issuance = Issuance(ISSUER.pubkey, 3, [TxOutput(5_000, alice.pubkey)])
        issuance = issuance.signed_by(ISSUER.secret)
        await gw.issue(issuance)
        tx = pay([(issuance.output_ids[0], 5_000, alice)], [TxOutput(4_900, bob.pubkey)], 100)
        await gw.submit(tx)
        async with session.get(f"{services.url}/v1/tx/{tx.txid.hex()}") as resp:
            error = (await resp.json())["error"]
        assert resp.status == 404 and error["code"] == "not_found.not_indexed_yet", error
        assert "worker 0: indexed to height" in error["message"], error
        broken.broken = False
        await until_found(services.url, tx.txid.hex())
        async with session.get(f"{services.url}/v1/tx/{os.urandom(32).hex()}") as resp:
            error = (await resp.json())["error"]
        assert resp.status == 404 and error["code"] == "not_found", error


async def until_found(url: str, txid: str) -> None:
    end = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/v1/tx/{txid}") as resp:
                if resp.status == 200:
                    return
            assert time.monotonic() < end, "the payment was not indexed"
            await asyncio.sleep(0.05)


async def test_a_reader_ahead_of_a_workers_log_stops_following_it_and_says_so(
    op: Operator, services: Services
) -> None:
    """A cursor beyond the worker's log (its state restored from an older backup, or
    wiped) must not skip what the log holds now: the reader follows it no more and is
    not ready, saying why."""
    await paid_and_indexed(services.url)
    nc = await nats.connect(op.net.nats_url)
    stored: list[proto.BlockEvents] = []

    async def sink(blocks: list[proto.BlockEvents]) -> None:
        stored.extend(blocks)

    follower = Follower(
        nc, OPERATOR, [0], {0: 10**6}, sink, FollowMetrics(CollectorRegistry(), "test")
    )
    task = asyncio.create_task(follower.run())
    try:
        await until(lambda: 0 in follower.diverged, "diverged")
        await paid_and_indexed(services.url)  # and the log goes on
        await asyncio.sleep(1.5)  # a poll
        ok, why = follower.progress(10**9, 60)
        assert not ok and "worker 0's log does not follow what was stored" in why, why
        assert not stored and follower.cursor[0] == 10**6
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()


async def test_a_reader_whose_store_is_down_waits_and_then_stores_every_block(
    op: Operator, services: Services
) -> None:
    """A store that fails as a database that is down does (``DATABASE_DOWN``): the reader
    keeps its task, says it is not storing (not ready), and once the store takes blocks
    again it holds every block of the log, each once and in order."""
    await paid_and_indexed(services.url)
    nc = await nats.connect(op.net.nats_url)
    stored: list[proto.BlockEvents] = []
    down = [True]

    async def sink(blocks: list[proto.BlockEvents]) -> None:
        if down[0]:
            raise ConnectionRefusedError(111, "Connection refused")
        stored.extend(blocks)

    metrics = FollowMetrics(CollectorRegistry(), "test")
    follower = Follower(nc, OPERATOR, [0], {0: -1}, sink, metrics, DATABASE_DOWN)
    task = asyncio.create_task(follower.run())
    try:
        await until(lambda: follower.sink_down is not None, "seen down")
        ok, why = follower.progress(10**9, 60)
        assert not ok and why.startswith("not storing: ConnectionRefusedError"), why
        await paid_and_indexed(services.url)  # the log goes on meanwhile
        down[0] = False
        await until(lambda: follower.sink_down is None and follower.behind(0) == 0, "caught up")
        assert not task.done()
        assert follower.progress(10**9, 60)[0]
        heights = [b.height for b in stored]
        assert heights and heights == sorted(set(heights)), heights
        assert heights[-1] == follower.cursor[0] == follower.last[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()


async def test_a_reader_from_the_end_follows_a_worker_whose_log_did_not_answer(
    op: Operator,
) -> None:
    """Followed from the end (pushes to subscribers), a worker whose log does not answer
    at the start (its leader slow, or changing) is followed from the first block it
    publishes: what commits after the subscription was answered is pushed (it was
    dropped until the log answered, and the cursor then jumped to its end)."""
    nc = await nats.connect(op.net.nats_url)
    stored: list[proto.BlockEvents] = []

    async def sink(blocks: list[proto.BlockEvents]) -> None:
        stored.extend(blocks)

    silent = 9  # no worker answers for it
    follower = Follower(
        nc, OPERATOR, [silent], None, sink, FollowMetrics(CollectorRegistry(), "test")
    )
    task = asyncio.create_task(follower.run())
    try:
        await until(lambda: silent in follower.unreachable, "its log did not answer")
        block = proto.BlockEvents(silent, 5, 4, [], [proto.Commit(os.urandom(32), 0)])
        await nc.publish(
            events_subject(OPERATOR), proto.encode_events([proto.encode_block_events(block)])
        )
        await until(lambda: bool(stored), "the published block is taken")
        assert [(b.worker, b.height) for b in stored] == [(silent, 5)]
        assert follower.cursor[silent] == 5
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()


async def test_a_worker_whose_block_log_is_damaged_says_so_and_stops(
    op: Operator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Damage before the block log's end (blocks after it were acknowledged) is not cut:
    the worker says so in one critical line and stops with EX_IOERR, never ready (it
    once went out as a bare traceback)."""
    state = tmp_path / "worker"
    log = BlockLog(state / "blocks.log")
    list(log.replay())
    for height in range(3):
        log.append(proto.encode(proto.Block(0, height, [proto.Aborted(bytes(32))])))
    log.close()
    data = bytearray((state / "blocks.log").read_bytes())
    data[20] ^= 1  # inside block 0's payload: blocks 1 and 2 after it
    (state / "blocks.log").write_bytes(bytes(data))
    nc = await nats.connect(op.net.nats_url)
    await publish_map(nc, OPERATOR, PartitionMap.even(1))
    await nc.close()
    settings = {
        "WORKER_ID": "0",
        "WORKER_OPERATOR": OPERATOR,
        "WORKER_NATS_URL": op.net.nats_url,
        "WORKER_STATE_DIR": str(state),
        "WORKER_ISSUERS": ISSUER.pubkey.hex(),
    }
    worker = WorkerNode(WorkerSettings.from_env(settings))
    with caplog.at_level(logging.CRITICAL, "partition"), pytest.raises(SystemExit) as stopped:
        await worker.run(asyncio.Event())  # (SystemExit would escape a task of its own)
    assert stopped.value.code == 74 and not worker.ready()[0]
    (said,) = [r for r in caplog.records if r.getMessage().startswith("the block log is")]
    assert "nothing was cut" in said.__dict__["error"]
    assert (state / "blocks.log").read_bytes() == bytes(data)
