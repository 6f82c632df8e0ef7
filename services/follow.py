"""Following the ledger's committed changes, by worker and height.

The readers of the ledger (the history index; later light-client proofs and settlement)
follow each worker's events log, which its worker writes once a block is durable. A
worker also publishes each block's events; a reader takes them in height order per
worker (``prev`` chains a worker's blocks with events, so a gap shows at once) and reads
whatever it missed from the worker's events log: a message lost, events a worker did
not publish before it crashed, everything while the reader itself was down. Publishing
only makes readers quicker: the logs are the truth, and a reader's cursor per worker
(the last block it stored) says how far it is. Storing a block twice is harmless, so a
reader stores first and moves its cursor after.

A reader that wants only what comes next (the websocket pushes) starts at the end of
each log instead of at a cursor it stored.

Once shards are replicated, the same pages come from any copy of a worker's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry, Counter, Gauge

from constellation.errors import MessageError
from constellation.protocol import ledger as proto
from services.bus import events_subject, query_subject

POLL_S = 1.0  # each worker's log is read this often, whatever was published
LIVE_QUEUE = 1024  # published messages waiting; beyond, the oldest are left to the logs
LIVE_BATCH = 64  # published messages stored at once (each up to 512 KiB)
CATCH_UP_PAGES = 8  # pages read from one worker's log before the others have their turn
QUERY_TIMEOUT_S = 5.0
END = 2**62  # a height beyond every log: what to ask to learn only where a log ends

log = logging.getLogger("follow")

Sink = Callable[[list[proto.BlockEvents]], Awaitable[None]]


class FollowMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.stored = Gauge(
            f"{prefix}_stored_height",
            "the last block with events stored, by worker",
            ["worker"],
            registry=registry,
        )
        self.log_height = Gauge(
            f"{prefix}_log_height",
            "the worker's latest block with events, as last heard",
            ["worker"],
            registry=registry,
        )
        self.blocks = Counter(
            f"{prefix}_blocks",
            "blocks of events stored, by where they came from (live or log)",
            ["source"],
            registry=registry,
        )
        self.gaps = Counter(
            f"{prefix}_gaps",
            "published events that did not follow the cursor (read from the log)",
            ["worker"],
            registry=registry,
        )
        self.refused = Counter(
            f"{prefix}_refused",
            "published messages or log pages refused as malformed or out of order",
            registry=registry,
        )
        self.dropped = Counter(
            f"{prefix}_dropped",
            "published messages dropped unread, the queue full (read from the logs)",
            registry=registry,
        )


class Follower:
    """Follows the workers' events logs into ``sink``, in height order per worker."""

    def __init__(
        self,
        nc: Client,
        operator: str,
        workers: Sequence[int],
        cursors: dict[int, int] | None,
        sink: Sink,
        metrics: FollowMetrics,
        waits_out: tuple[type[Exception], ...] = (),
    ) -> None:
        """Follow from ``cursors`` (-1 for a worker not named), or from the end of each
        log (what it holds when first read) if ``cursors`` is None. A ``sink`` that fails
        with one of ``waits_out`` (its database down) is tried again each ``POLL_S``."""
        self.nc = nc
        self.operator = operator
        self.workers = list(workers)
        self.sink = sink
        self.metrics = metrics
        self.waits_out = waits_out
        self.sink_down: str | None = None  # why the sink failed last, until it stores again
        # worker -> the height of the last block with events stored (-1: none)
        self.cursor = {w: (cursors or {}).get(w, -1) for w in self.workers}
        self._at_end = set() if cursors is not None else set(self.workers)  # not read yet
        self.started = asyncio.Event()  # every worker's log was read once (or tried)
        # worker -> the height of its latest block with events, as last heard
        self.last: dict[int, int] = {}
        self.unreachable: dict[int, str] = {}  # worker -> why its log could not be read
        # worker -> how its log no longer follows what was stored (reset, or rewritten):
        # nothing more is stored from it; an operator must look
        self.diverged: dict[int, str] = {}
        self.turned_at = 0.0  # when the following last made progress (loop time)
        self._live: deque[bytes] = deque(maxlen=LIVE_QUEUE)
        self._behind: set[int] = set()  # workers whose catching up was cut short
        self._wake = asyncio.Event()
        for w in self.workers:
            self._show(w)

    def behind(self, worker: int) -> int:
        """How many heights the stored blocks are behind the worker's log, as last heard."""
        return max(0, self.last.get(worker, -1) - self.cursor[worker])

    def progress(self, max_behind: int, stall_s: float) -> tuple[bool, str]:
        """Whether every worker's log is stored to within ``max_behind`` heights, and the
        following went round in the last ``stall_s`` seconds (storing can hang)."""
        stalled = asyncio.get_running_loop().time() - self.turned_at
        if stalled > stall_s:
            return False, f"stalled: no progress for {stalled:.0f} s"
        if self.sink_down is not None:
            return False, f"not storing: {self.sink_down}"
        if self.diverged:
            return False, "; ".join(
                f"worker {w}'s log does not follow what was stored: {why}"
                for w, why in self.diverged.items()
            )
        if self.unreachable:
            return False, "; ".join(
                f"worker {w} unreachable: {why}" for w, why in self.unreachable.items()
            )
        if len(self.last) < len(self.workers):
            missing = [w for w in self.workers if w not in self.last]
            return False, f"not yet heard from worker {', '.join(map(str, missing))}"
        late = {w: self.behind(w) for w in self.workers if self.behind(w) > max_behind}
        if late:
            return False, "behind the ledger: " + ", ".join(
                f"worker {w} by {n} blocks" for w, n in late.items()
            )
        heights = ", ".join(f"{w}: {self.cursor[w]}" for w in self.workers)
        return True, f"stored to heights {heights}"

    async def run(self) -> None:
        """Follow until cancelled: what is published at once, every log each ``POLL_S``."""
        sub = await self.nc.subscribe(events_subject(self.operator), cb=self._on_live)
        loop = asyncio.get_running_loop()
        poll_at = 0.0
        try:
            while True:
                self.turned_at = loop.time()
                wait = poll_at - loop.time()
                if not self._live and not self._behind and wait > 0:
                    # Not wait_for: in Python 3.11 it can swallow a cancel that comes as
                    # the event is set, and this loop would outlive its stop.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                self._wake.clear()
                try:
                    gaps = await self._take_live()
                    poll = loop.time() >= poll_at
                    if poll:
                        poll_at = loop.time() + POLL_S
                    for w in self.workers:
                        if poll or w in gaps or w in self._behind:
                            await self._catch_up(w)
                except self.waits_out as exc:  # what was not stored is read from the logs
                    self.sink_down = repr(exc)
                    log.warning("following waits for its store", extra={"error": repr(exc)})
                    await asyncio.sleep(POLL_S)
                    continue
                self.sink_down = None
                self.started.set()
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _on_live(self, msg: Msg) -> None:
        if len(self._live) == LIVE_QUEUE:
            self.metrics.dropped.inc()  # the oldest goes; a gap, read from the log
        self._live.append(msg.data)
        self._wake.set()

    async def _take_live(self) -> set[int]:
        """Store the published blocks that follow the cursors; the workers with a gap."""
        taken: list[proto.BlockEvents] = []
        cursor = dict(self.cursor)
        gaps: set[int] = set()
        for _ in range(min(len(self._live), LIVE_BATCH)):
            try:
                blocks = proto.decode_events(self._live.popleft())
            except MessageError as exc:
                self.metrics.refused.inc()
                log.warning("published events refused", extra={"error": str(exc)})
                continue
            for ev in blocks:
                w = ev.worker
                if w not in cursor or w in self.diverged:
                    continue  # not followed (any more)
                if w in self._at_end:
                    # its log's end not read yet (its query timed out): it is followed
                    # from this block on, the first heard (else what committed after a
                    # subscription was answered, before the log was read, was lost)
                    self._at_end.discard(w)
                    self.cursor[w] = cursor[w] = ev.prev
                    self._show(w)
                self.last[w] = max(self.last.get(w, -1), ev.height)
                if ev.height <= cursor[w] or w in gaps:
                    continue  # stored already, or read from the log below
                if ev.prev == cursor[w]:
                    taken.append(ev)
                    cursor[w] = ev.height
                else:
                    gaps.add(w)
                    self.metrics.gaps.labels(str(w)).inc()
        if taken:
            await self._store(taken, "live")
        return gaps

    async def _catch_up(self, worker: int) -> None:
        """Read the worker's events log from the cursor on, page by page (a few pages at
        a time: the other workers, and what is published, have their turn)."""
        subject = query_subject(self.operator, worker, "events")
        self._behind.discard(worker)
        if worker in self.diverged:
            return
        for _ in range(CATCH_UP_PAGES):
            after = END if worker in self._at_end else self.cursor[worker]
            query = msgspec.msgpack.encode(proto.EventsQuery(after))
            try:
                reply = await self.nc.request(subject, query, timeout=QUERY_TIMEOUT_S)
                page = proto.decode_page(reply.data)
            except (TimeoutError, NatsError) as exc:
                self.unreachable[worker] = f"{type(exc).__name__}: {exc}"
                return
            except MessageError as exc:
                self.metrics.refused.inc()
                log.warning("events page refused", extra={"worker": worker, "error": str(exc)})
                return
            self.unreachable.pop(worker, None)
            if page.last < self.cursor[worker]:
                self._diverged(worker, f"its last block with events is {page.last}", page.last)
                return
            self.last[worker] = page.last
            if worker in self._at_end:  # what comes next, from here
                self._at_end.discard(worker)
                self.cursor[worker] = page.last
                self._show(worker)
                return
            blocks = page.blocks
            if not blocks:
                self._show(worker)
                return
            first = blocks[0]
            if first.prev != self.cursor[worker] or any(b.worker != worker for b in blocks):
                why = f"its block {first.height} follows block {first.prev}"
                self._diverged(worker, why, page.last)
                return
            await self._store(blocks, "log")
            if self.cursor[worker] >= page.last:
                return
        self._behind.add(worker)

    def _diverged(self, worker: int, why: str, last: int) -> None:
        """The worker's log is not the one stored from (reset, or rewritten)."""
        self.metrics.refused.inc()
        self.diverged[worker] = f"{why}, but block {self.cursor[worker]} was stored"
        log.error(
            "a worker's events log does not follow what was stored; not following it",
            extra={"worker": worker, "stored": self.cursor[worker], "log_last": last, "why": why},
        )

    async def _store(self, blocks: list[proto.BlockEvents], source: str) -> None:
        await self.sink(blocks)
        self.turned_at = asyncio.get_running_loop().time()
        for ev in blocks:
            self.cursor[ev.worker] = max(self.cursor[ev.worker], ev.height)
            self.last[ev.worker] = max(self.last.get(ev.worker, -1), ev.height)
        self.metrics.blocks.labels(source).inc(len(blocks))
        for w in {ev.worker for ev in blocks}:
            self._show(w)

    def _show(self, worker: int) -> None:
        label = str(worker)
        self.metrics.stored.labels(label).set(self.cursor[worker])
        self.metrics.log_height.labels(label).set(self.last.get(worker, -1))
