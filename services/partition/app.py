"""Wiring: the partition map from NATS KV, the logs, subscriptions, ops, a clean drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from constellation.errors import MessageError
from constellation.ledger.commit import TwoPhaseCommit
from constellation.protocol import ledger as proto
from services.bus import (
    Packer,
    await_map,
    events_subject,
    query_subject,
    worker_subject,
)
from services.partition.client import RESEND_S
from services.partition.config import Settings
from services.partition.metrics import WorkerMetrics
from services.partition.verify import Verifiers
from services.partition.wal import BlockLog, DamagedLog, EventLog
from services.partition.worker import EXIT_DISK, Worker, state_info
from services.runtime import OpsServer, close_nats, connect_nats

TICK_S = 0.05
# One events message per this many seconds at most: every reader wakes per message,
# not per block.
EVENTS_LINGER_S = 0.025
EVENTS_MAX_BYTES = 512 << 10  # in one message (NATS refuses more than 1 MiB)
# Blocks' events waiting to be published, at most: beyond, the oldest are not published
# (readers find them in the events log).
EVENTS_QUEUE = 4096
EVENTS_PAGE_BYTES = 512 << 10  # in one answer to an EventsQuery (at least one block)
MAP_WAIT_S = 30.0

log = logging.getLogger("partition")

Q = TypeVar("Q", proto.CoinQuery, proto.EventsQuery)
MAX_COINS = 1000  # coins in one CoinQuery answered, at most
# A coins query waits this long, at most, for what it read to be durable (the asker
# asks again after as long).
READ_S = RESEND_S


class WorkerNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.ops = OpsServer(self.metrics.registry, self.ready)
        self.worker: Worker | None = None
        self.nc: Client | None = None
        self.packer: Packer | None = None
        self.verifiers: Verifiers | None = None
        self._events: deque[bytes] = deque(maxlen=EVENTS_QUEUE)
        self._events_waiting = asyncio.Event()
        self._recovered = False

    def ready(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "not connected to NATS"
        if not self._recovered or self.worker is None:
            return False, "recovering"
        if self.worker.engine.draining:
            return False, "draining"
        return True, f"serving partition map v{self.worker.engine.pmap.version}"

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        await self.ops.start(s.http_host, s.http_port)
        nc = self.nc = await connect_nats(
            s.nats_url, f"worker-{s.operator}-{s.worker}", pending_size=64 << 20
        )
        pmap = await await_map(nc, s.operator, MAP_WAIT_S)
        own = worker_subject(s.operator, s.worker)
        m = self.metrics
        packer = self.packer = Packer(
            nc, s.worker, own, lambda: pmap.version, s.packages, m.package_items.observe
        )
        verifiers = self.verifiers = Verifiers(s.verifiers) if s.verifiers else None
        if verifiers is not None:
            await verifiers.start()
        tasks = self.ops.tasks
        tasks.start("packages", packer.run)
        worker = self.worker = Worker(
            me=s.worker,
            pmap=pmap,
            issuers=s.issuers,
            wal=BlockLog(s.state_dir / "blocks.log"),
            events=EventLog(s.state_dir / "events.log"),
            blocks=s.blocks,
            prepare_timeout_ms=s.prepare_timeout_ms,
            metrics=m,
            send=packer.send,
            subject_of=lambda w: worker_subject(s.operator, w),
            publish=self._publish,
            verifiers=verifiers,
        )
        started = time.monotonic()
        try:
            height = worker.recover()
        except DamagedLog as exc:  # never ready: said once, then the process stops
            log.critical("the block log is damaged: not starting", extra={"error": str(exc)})
            raise SystemExit(EXIT_DISK) from None
        gc.freeze()  # the recovered state is long-lived: keep it out of collections
        log.info(
            "recovered",
            extra={
                "blocks": height,
                "coins": len(worker.engine.state.coins),
                "in_doubt": len(worker.engine.in_doubt),
                "events_height": worker.writer.events.last,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        m.queue.labels("outbox").set_function(lambda: packer.depth)
        m.queue.labels("block").set_function(lambda: worker.writer.depth)
        m.queue.labels("coordinating").set_function(lambda: len(worker.engine.coordinating))
        m.queue.labels("in_doubt").set_function(lambda: len(worker.engine.in_doubt))
        m.queue.labels("decided").set_function(lambda: len(worker.engine.decided))
        m.queue.labels("events").set_function(lambda: len(self._events))
        if verifiers is not None:
            m.queue.labels("verifying").set_function(lambda: verifiers.in_flight)
        for sub_subject, cb in (
            (own, self._on_package),
            (query_subject(s.operator, s.worker, "coins"), self._on_coins),
            (query_subject(s.operator, s.worker, "state"), self._on_state),
            (query_subject(s.operator, s.worker, "events"), self._on_events_query),
        ):
            await nc.subscribe(sub_subject, cb=cb, pending_msgs_limit=1_000_000)
        await nc.flush()
        worker.engine.ask_in_doubt(time.monotonic(), at_once=True)  # a restarted participant
        self._recovered = True
        tasks.start("tick", self._tick)
        tasks.start("events", self._publish_events)
        log.info(
            "worker ready",
            extra={
                "worker": s.worker,
                "map_version": pmap.version,
                "partitions": [[r.start, r.stop] for r in pmap.held_by(s.worker)],
                "http_port": self.ops.port,
            },
        )
        await stop.wait()
        await self._drain()

    async def _drain(self) -> None:
        worker, nc, packer = self.worker, self.nc, self.packer
        assert worker is not None and nc is not None and packer is not None
        worker.engine.draining = True
        log.info("draining", extra={"coordinating": len(worker.engine.coordinating)})
        deadline = time.monotonic() + worker.engine.timeout_s + 1
        verifiers = self.verifiers
        while (worker.engine.coordinating or (verifiers and verifiers.in_flight)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(TICK_S)
        worker.writer.flush()
        await packer.drain()
        with contextlib.suppress(TimeoutError):  # readers are told of every block's events
            await asyncio.wait_for(self._published(), max(0.0, deadline - time.monotonic()))
        await self.ops.tasks.stop()
        # Close, not drain: what had to go out went above, and a drain waits (up to 30 s)
        # for answers to requests cut short by the cancel.
        await close_nats(nc)
        if verifiers is not None:
            verifiers.close()
        worker.wal.close()
        worker.writer.events.close()
        await self.ops.stop()

    async def _tick(self) -> None:
        assert self.worker is not None
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self.worker.engine.expire(now)
            self.worker.engine.ask_in_doubt(now)
            self.worker.engine.retell(now)

    def _publish(self, events: bytes) -> None:
        self._events.append(events)
        self._events_waiting.set()

    async def _published(self) -> None:
        while self._events:
            await asyncio.sleep(EVENTS_LINGER_S)

    async def _publish_events(self) -> None:
        """Each durable block's events, to the readers that listen: what gathered in
        ``EVENTS_LINGER_S`` after a block goes out as one message. Nothing is retried:
        what a reader misses, it reads from the events log."""
        assert self.nc is not None
        nc, queue = self.nc, self._events
        subject = events_subject(self.settings.operator)
        while True:
            await self._events_waiting.wait()
            await asyncio.sleep(EVENTS_LINGER_S)
            self._events_waiting.clear()
            while queue:
                batch = [queue.popleft()]
                size = len(batch[0])
                while queue and size + len(queue[0]) <= EVENTS_MAX_BYTES:
                    size += len(queue[0])
                    batch.append(queue.popleft())
                try:
                    await nc.publish(subject, proto.encode_events(batch))
                except NatsError as exc:
                    log.warning("events not published", extra={"error": str(exc)})

    async def _on_package(self, msg: Msg) -> None:
        assert self.worker is not None
        try:
            pkg = proto.decode_package(msg.data)
        except MessageError as exc:
            self.metrics.rejected_packages.inc()
            log.info("package rejected", extra={"reason": str(exc)})
            return
        self.worker.engine.handle(pkg)

    async def _on_coins(self, msg: Msg) -> None:
        assert self.worker is not None
        answer = await coins_answer(self.worker.engine, msg.data, READ_S, lambda: None)
        if answer is not None:
            await msg.respond(answer)

    async def _on_state(self, msg: Msg) -> None:
        assert self.worker is not None
        worker = self.worker
        info = state_info(worker.engine, worker.wal.height, worker.writer.events.last)
        await msg.respond(msgspec.msgpack.encode(info))

    async def _on_events_query(self, msg: Msg) -> None:
        """A page of the events log, for a reader that missed what was published."""
        assert self.worker is not None
        events = self.worker.writer.events
        answer = query_answer(
            msg.data,
            proto.EventsQuery,
            lambda q: proto.encode_page(events.last, events.read_after(q.after, EVENTS_PAGE_BYTES)),
        )
        await msg.respond(answer)


def query_answer(data: bytes, kind: type[Q], answer: Callable[[Q], bytes]) -> bytes:
    """The answer to a query of type ``kind``, or why it is not one."""
    try:
        query = msgspec.msgpack.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _bad_query(exc)
    return answer(query)


async def coins_answer(
    engine: TwoPhaseCommit, data: bytes, wait_s: float, flush: Callable[[], None]
) -> bytes | None:
    """The answer to a ``CoinQuery``: what the engine's state says now, said once that
    state is durable (``TwoPhaseCommit.coin_infos``; ``flush`` writes or proposes what
    waits). None where it is not within ``wait_s``: a leader deposed meanwhile says
    nothing, and the asker asks again."""
    try:
        query = msgspec.msgpack.decode(data, type=proto.CoinQuery)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _bad_query(exc)
    said: asyncio.Future[list[proto.CoinInfo]] = asyncio.get_running_loop().create_future()

    def say(infos: list[proto.CoinInfo]) -> None:
        if not said.done():  # the asker may have stopped waiting
            said.set_result(infos)

    engine.coin_infos(query.coin_ids[:MAX_COINS], say)
    flush()
    try:
        return msgspec.msgpack.encode(await asyncio.wait_for(said, wait_s))
    except TimeoutError:
        return None


def _bad_query(exc: Exception) -> bytes:
    return msgspec.msgpack.encode({"error": f"bad query: {exc}"})
