"""A partition worker's shell: the two-phase commit engine wired to its logs.

The engine (``constellation.ledger.commit``) decides; this module makes its records
durable. Everything runs on one event loop, one core: a package's items are handled at
once, without awaiting, and what must wait for the disk runs once the block that holds
its record, and every block before it, is durable (group commit, one fsync per block).
Each durable block's coin changes then go to the events log, which readers follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Sequence

from constellation.ledger.commit import Send, TwoPhaseCommit, Verifier
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from services.bus import Batching
from services.partition.metrics import WorkerMetrics
from services.partition.wal import BlockLog, EventLog

# How long a record that nothing waits for may wait for a block that something does.
LAZY_S = 0.01
EXIT_DISK = 74  # EX_IOERR: the worker stops when its disk fails; its supervisor restarts it

log = logging.getLogger("partition.worker")


class BlockWriter:
    """Gathers records into blocks and makes them durable, one fsync per block.

    A block closes at ``max_items`` records (or at the bytes and coin changes a block
    holds: ``MAX_BLOCK_BYTES``, ``MAX_BLOCK_CHANGES``) or at its deadline (0: at the end
    of the event loop's turn, so that one block holds everything handled in that turn).
    The ``after`` callbacks run, in order, once their block is durable, with its height.
    A ``lazy`` record (one that nothing waits for: a participant's record of an outcome
    it learned, which it would learn again by asking) closes no block of its own; it
    rides with the next block, or is written ``LAZY_S`` later. Records stay in order.

    A durable block's coin changes go to the events log and are then published: readers
    follow the events log by height, and publishing only tells them sooner.

    The write and its fsync run on the event loop itself. Handing them to a thread cost
    more CPU than the fsync (two cross-thread wake-ups per block: about 150 us of CPU
    per block on the benchmark machine, against 43 us for write and fdatasync), and
    nothing a block holds can be answered before it is durable anyway. What arrives
    meanwhile waits in the socket and goes into the next block (group commit).
    """

    def __init__(
        self,
        wal: BlockLog,
        events: EventLog,
        worker: int,
        batching: Batching,
        metrics: WorkerMetrics,
        publish: Callable[[bytes], None],
    ) -> None:
        self.wal = wal
        self.events = events
        self.worker = worker
        self.batching = batching
        self.metrics = metrics
        self.publish = publish
        self.records: list[proto.Record] = []
        self.after: list[Callable[[int], None]] = []
        self.changes: list[proto.CoinChange] = []
        self.committed: list[proto.Commit] = []
        self.size = 0  # about the encoded size of ``records``
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._lazy = False  # the timer is a lazy record's

    def add(
        self,
        record: proto.Record,
        after: Callable[[int], None] | None = None,
        lazy: bool = False,
        changes: Sequence[proto.CoinChange] = (),
        committed: Sequence[proto.Commit] = (),
    ) -> None:
        self.records.append(record)
        self.size += proto.size_of(record)
        self.changes += changes
        self.committed += committed
        if after is not None:
            self.after.append(after)
        if (
            len(self.records) >= self.batching.max_items
            or self.size >= proto.MAX_BLOCK_BYTES
            or len(self.changes) >= proto.MAX_BLOCK_CHANGES
        ):
            self.flush()
            return
        timer = self._timer
        if timer is not None and (lazy or not self._lazy):
            return  # the block closes soon enough
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._lazy = lazy
        if lazy:
            self._timer = loop.call_later(LAZY_S, self.flush)
        elif self.batching.deadline_us:
            self._timer = loop.call_later(self.batching.deadline_us / 1e6, self.flush)
        else:
            self._timer = loop.call_soon(self.flush)

    def after_durable(self, callback: Callable[[int], None]) -> None:
        """Run ``callback`` once everything added so far is durable (now, if it is)."""
        if self.records:
            self.after.append(callback)
        else:
            callback(self.wal.height - 1)

    @property
    def depth(self) -> int:
        return len(self.records)

    def flush(self) -> None:
        """Write the gathered records as one block, if there are any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.records:
            return
        records, after, changes, committed = self.records, self.after, self.changes, self.committed
        self.records, self.after, self.changes, self.committed = [], [], [], []
        self.size = 0
        height = self.wal.height
        payload = proto.encode(proto.Block(self.worker, height, records))
        started = time.perf_counter()
        try:
            self.wal.append(payload)
            self.events_of(height, changes, committed)
        except OSError as exc:
            # The records are applied in memory but not (all) on disk: only a restart,
            # which replays the block log and derives the missing events, is safe.
            log.critical(
                "a log write failed; stopping", extra={"height": height, "error": str(exc)}
            )
            os._exit(EXIT_DISK)
        self.metrics.fsync_seconds.observe(time.perf_counter() - started)
        self.metrics.block_records.observe(len(records))
        self.metrics.height.set(self.wal.height)
        for callback in after:
            callback(height)

    def events_of(
        self, height: int, changes: list[proto.CoinChange], committed: list[proto.Commit]
    ) -> None:
        """Block ``height`` is durable: its changes (if any) into the events log, then
        out to readers."""
        if not changes and not committed:
            return
        events = proto.BlockEvents(self.worker, height, self.events.last, changes, committed)
        payload = proto.encode_block_events(events)
        self.events.append(height, payload)
        self.publish(payload)


class Worker:
    """One worker: its engine, its block log and its events log."""

    def __init__(
        self,
        *,
        me: int,
        pmap: PartitionMap,
        issuers: frozenset[bytes],
        wal: BlockLog,
        events: EventLog,
        blocks: Batching,
        prepare_timeout_ms: int,
        metrics: WorkerMetrics,
        send: Send,
        subject_of: Callable[[int], str],
        publish: Callable[[bytes], None],
        verifiers: Verifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], int] = lambda: random.getrandbits(63),
    ) -> None:
        self.wal = wal
        self.metrics = metrics
        self.writer = BlockWriter(wal, events, me, blocks, metrics, publish)

        def confirmed(seconds: float) -> None:
            metrics.committed.inc()
            metrics.confirm_seconds.observe(seconds)

        self.engine = TwoPhaseCommit(
            me=me,
            pmap=pmap,
            issuers=issuers,
            prepare_timeout_ms=prepare_timeout_ms,
            send=send,
            subject_of=subject_of,
            log=self.writer,
            clock=clock,
            draw=draw,
            verifiers=verifiers,
            refused=lambda code: metrics.aborted.labels(code).inc(),
            confirmed=confirmed,
            rooted=False,  # one operator's worker: no copies compare its root yet
        )

    def recover(self) -> int:
        """Replay the block log; returns the number of blocks read. The events of blocks
        that a crash cut from the events log's tail are derived again and written (and
        published) as they were the first time."""
        engine, writer = self.engine, self.writer
        writer.events.open()
        for block in self.wal.replay():
            derive = block.height > writer.events.last
            writer.events_of(block.height, *engine.replay(block.records, derive))
        writer.events.cut_from(self.wal.height)  # only a damaged block log is shorter
        engine.state.check_invariants()
        self.metrics.height.set(self.wal.height)
        return self.wal.height


def state_info(engine: TwoPhaseCommit, height: int, events_height: int) -> proto.StateInfo:
    """What a worker (or the copy leading its shard) says of its state."""
    s = engine.state
    return proto.StateInfo(
        worker=engine.me,
        map_version=engine.pmap.version,
        height=height,
        held_msat=s.held_msat,
        issued_msat=s.issued_msat,
        fees_msat=s.fees_msat,
        coins=len(s.coins),
        locks=len(s.locks),
        in_doubt=len(engine.in_doubt),
        coordinating=len(engine.coordinating),
        events_height=events_height,
        outbound_msat=s.outbound_msat,
        pending_msat=s.pending_msat(),
    )
