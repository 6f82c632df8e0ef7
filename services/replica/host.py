"""One copy of one shard, hosted by a machine: the replica, the ledger it drives, its
disk, and what it does while it leads.

Every copy runs the worker's engine (``LedgerShard``): followers replay their leader's
blocks, a leader takes packages and writes blocks. For each ``Ready`` the shell first
does what confirmed blocks (durable at a quorum already) call for: the leader's
callbacks (receipts, votes, decisions), and their events into this copy's events log,
and out to readers from a leader. Then the replica's order: persist (``CopyStore``,
fsynced), send, ``stored``; then leadership gained or lost. A leader whose log is
confirmed subscribes to the shard's subjects on its operator's NATS (packages and
queries), and unsubscribes when it stops leading.

Every copy keeps an events log, so that whichever leads can serve its operator's
indexer, and serves it on ``own_subject`` to its twin and to its operator's readers (a
light-client checkpoint's entries are to be computed from an operator's own copies of
every shard of the guild). A copy restored from a leader's snapshot
lacks the events of the blocks the snapshot skipped: it marks the gap durably, and fills
it from its twin (its operator's other copy), meanwhile serving readers from the twin's
log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from constellation.errors import MessageError
from constellation.keys import SigningKey
from constellation.ledger.commit import TwoPhaseCommit
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import EVERYONE, Ready, Replica, Role, body_hash
from constellation.replication.replica import Settings as ReplicaSettings
from constellation.replication.shard import Events, LedgerShard, ShardLog
from services.bus import (
    Batching,
    Packer,
    Publisher,
    copy_events_subject,
    query_subject,
    worker_subject,
)
from services.partition.app import EVENTS_PAGE_BYTES, READ_S, coins_answer, query_answer
from services.partition.wal import EventLog
from services.partition.worker import state_info
from services.replica.config import Layout
from services.replica.store import CopyStore
from services.runtime import write_atomic

log = logging.getLogger("replica.copy")

PACKAGES = Batching(512, 0)
# Blocks proposed and not yet confirmed before the next waits for a confirmation: what
# arrives meanwhile gathers into one block (each block costs every copy a signature
# check, an execution, an fsync and a signed ack, whatever it holds).
IN_FLIGHT = 1
HELD = 10_000  # packages waiting for room in the next block, at most
GAP_FILE = "events.gap"  # the events log lacks the events of blocks up to the height in it
BACKFILL_S = 1.0
GAPPED_PENDING = 1024  # blocks' events held while the log has a gap; beyond, the gap grows
QUERIES = ("coins", "state", "events")  # what a leader answers, on query_subject(..., what)
ANSWERING = 256  # queries answered at once, at most


def _installed(ready: Ready) -> bool:
    """Whether the Ready installs a leader's snapshot (all the log goes), rather than
    keeping one of the copy's own."""
    return ready.snapshot is not None and ready.truncate == 0


READY_LAG = 64  # blocks a follower may be behind its leader's confirmed and be ready
EXIT_DISK = 74  # EX_IOERR: a copy whose disk fails stops; its supervisor restarts it

Deliver = Callable[[Sequence[int], rp.Envelope], None]  # (destination copies, message)


def _disk_failed(exc: OSError) -> NoReturn:
    """A write or fsync failed: what the replica was promised is not durable. Only a
    restart, which reads the disk back, is safe."""
    log.critical("a copy's disk failed; stopping", extra={"error": str(exc)})
    # at once, as a worker does: no task or callback runs on to write after the failure
    os._exit(EXIT_DISK)


class HostedCopy:
    """Copy ``me`` of shard (``owner``, ``worker``), its state in ``folder``."""

    def __init__(
        self,
        *,
        layout: Layout,
        owner: int,
        worker: int,
        me: int,
        key: SigningKey,
        folder: Path,
        replication: ReplicaSettings,
        prepare_timeout_ms: int,
        nc: Client,
        publisher: Publisher,
        deliver: Deliver,
        publish_events: Callable[[str, bytes], None],
        members: Sequence[rp.Members],
        observe_round: Callable[[float], None] = lambda _: None,
    ) -> None:
        """``members``: every step of the changes of members the operator agreed to
        (``constellation.replication.members.agreed``); a leader takes them."""
        self.layout, self.owner, self.worker, self.me = layout, owner, worker, me
        self.name = f"{layout.members[owner].name}/{worker}"
        self.nc = nc
        self.publisher = publisher
        self.deliver = deliver
        self.publish_events = publish_events
        self.observe_round = observe_round  # a leader's block: proposed to confirmed, s
        self.proposed: dict[int, float] = {}  # at a leader: height -> when proposed
        owner_name = layout.members[owner].name
        self.subject = worker_subject(owner_name, worker)
        self.events_subject_owner = owner_name
        # Packages go out through ``publisher``: on NATS, or relayed to a shard's leader
        # at another operator (``relay.py``).
        self.packer = Packer(
            publisher, worker, self.subject, lambda: layout.pmap.version, PACKAGES, lambda _: None
        )
        self.store = CopyStore(folder)
        loaded = self.store.load()
        shard_log = ShardLog()
        engine = TwoPhaseCommit(
            me=worker,
            pmap=layout.pmap,
            issuers=layout.members[owner].issuers,
            prepare_timeout_ms=prepare_timeout_ms,
            send=self.packer.send,
            subject_of=lambda w: worker_subject(owner_name, w),
            log=shard_log,
            clock=time.monotonic,
            draw=lambda: random.getrandbits(63),
        )
        self.shard = LedgerShard(engine, shard_log, derive=True)
        self.replica = Replica(
            owner=owner,
            worker=worker,
            me=me,
            keys=layout.keys,
            sign=key.sign,
            executor=self.shard.executor,
            clock=time.monotonic,
            draw=random.random,
            settings=replication,
            hard=loaded.hard,
            snapshot=loaded.snapshot,
            blocks=loaded.blocks,
            damaged=loaded.damaged,
            members=members,
        )
        self.folder = folder
        self.events = EventLog(folder / "events.log")
        self.events.open()
        self.gap = self._load_gap()  # the events log lacks blocks' events up to here
        if self.gap is not None and self.events.last >= self.gap:
            self.gap = None  # filled, and the mark's removal was lost in a crash
        self._gap_found = asyncio.Event()
        # Every copy fills a gap in its events log from its twin (the copy on the other
        # machine of the same operator), so that its operator can read every shard's
        # events from its own copies (for light-client checkpoints).
        self.own_subject = copy_events_subject(owner_name, worker, me)
        self.twin_subject = copy_events_subject(owner_name, worker, me ^ 1)
        # Events of blocks held, not yet confirmed, with each block's header hash and root.
        self.pending: dict[int, tuple[Events, bytes, bytes]] = {}
        # Events are written up to here (synced before every snapshot of our own).
        self.written = self.replica.confirmed
        self._take_events(self.replica.blocks(self.replica.first - 1, self.replica.last))
        self.subs: dict[str, Subscription] = {}
        self.serving = False  # wants the shard's subjects (``serve`` subscribes)
        self._serve_changed = asyncio.Event()
        self.closed = False
        self.held: deque[proto.Package] = deque()  # packages waiting for a block's room
        self.handing: list[proto.Package] | None = None  # resigned: kept for the next leader
        self.dropped = 0  # packages refused while HELD waited
        self._sealing = False
        self._answering: set[asyncio.Task[None]] = set()  # queries being answered
        self._processing = False  # a process() is due
        self.confirmed_at = time.monotonic()

    @property
    def engine(self) -> TwoPhaseCommit:
        return self.shard.engine

    # -- driving the replica ---------------------------------------------------------

    def step(self, sender: int, msg: rp.Message) -> None:
        """Take a message; what it asks for is done once this turn of the event loop
        has taken every message that had arrived (one write and fsync for them all)."""
        self.replica.step(sender, msg)
        if not self._processing:
            self._processing = True
            asyncio.get_running_loop().call_soon(self.process)

    def tick(self, now: float) -> None:
        if self.closed:
            return
        self.replica.tick()
        self._proposing(lambda: self.shard.tick(self.replica, now))
        if self.held:
            self._seal_full()
        self._change_members()
        self.process()

    def agree(self, steps: Sequence[rp.Members]) -> None:
        """The operator agreed to more changes of members (``members``)."""
        self.replica.agree(steps)

    def members_settled(self) -> bool:
        """Whether the copy's members are the last step its operator agreed to (or all
        its log told it), made by a confirmed block: no change of members under way."""
        r = self.replica
        return r.next_members() is None and r.changed_at <= r.confirmed

    def _change_members(self) -> None:
        """A leader takes the next agreed step of a change of members."""
        step = self.shard.change_members(self.replica)
        if step is not None:
            log.info("members change", extra={"shard": self.name, "members": str(step)})

    def process(self) -> None:
        """Carry out what the replica asked, until it asks nothing more: the events of
        new blocks and of confirmed ones first (confirmed blocks are durable already:
        their callbacks run, even where this step also lost the leadership), then the
        Ready's writes, its messages, ``stored``, and leadership gained or lost."""
        self._processing = False
        if self.closed:
            return
        while True:
            ready = self.replica.ready()
            if ready.empty():
                break
            self._note_blocks(ready)
            own = None if _installed(ready) or ready.snapshot is None else ready.snapshot
            if ready.confirmed:
                self._confirmed(ready.confirmed, own.height if own is not None else None)
            elif own is not None:  # taken as acks came, nothing newly confirmed
                self._cover(self.replica.confirmed, own.height)
            self._persist(ready)
            for to, msg in ready.messages:
                dests = self.replica.group if to == EVERYONE else (to,)
                self.deliver(
                    [d for d in dests if d != self.me],
                    rp.Envelope(self.owner, self.worker, self.me, msg),
                )
            self.replica.stored(ready.last)
            if ready.leading is not None:
                self.shard.leading(ready.leading, self.replica)
                self.proposed.clear()
                self.held.clear()
                log.info(
                    "leading" if ready.leading else "no longer leading",
                    extra={"shard": self.name, "copy": self.me, "term": self.replica.term},
                )
        self._serve(self.shard.accepting(self.replica) or self.handing is not None)

    # -- moving to another machine -------------------------------------------------------

    def resign(self) -> None:
        """Hand the leadership over, ahead of this copy's move to another machine: the
        packages that wait for a block, and those that arrive meanwhile, are kept for the
        next leader (``hand_over``) rather than left to their senders' resends."""
        if self.replica.role is not Role.LEADER:
            return
        self.handing = list(self.held)
        self.replica.resign()
        self.process()

    def successor_serving(self) -> bool:
        """Whether another copy leads and has its own term's first block confirmed (it
        takes packages from then on)."""
        r = self.replica
        return r.leader not in (-1, self.me) and r.term_at(r.confirmed) == r.term

    async def hand_over(self) -> None:
        """Pass the packages kept since ``resign`` to the shard's leader now."""
        handing, self.handing = self.handing or [], None
        for pkg in handing:
            await self.publisher.publish(self.subject, proto.encode(pkg))

    def _persist(self, ready: Ready) -> None:
        try:
            self.store.write(ready)
        except OSError as exc:
            _disk_failed(exc)

    def _note_blocks(self, ready: Ready) -> None:
        """Events of blocks dropped go; those of blocks now held are remembered, by
        height (a follower derived them when it executed the block, a leader when it
        proposed it). A truncation below what the events log holds (confirmed blocks
        taken back from a convicted leader) cuts the log there; an installed snapshot
        does not: the log holds confirmed blocks only."""
        if ready.truncate is not None:
            for h in [h for h in self.pending if h > ready.truncate]:
                del self.pending[h]
            floor = ready.truncate
            if ready.snapshot is not None:
                floor = max(floor, ready.snapshot.height)
            if floor < self.events.last:
                self.events.cut_from(floor + 1)
            snap = ready.snapshot
            installed = _installed(ready) and snap is not None
            if installed and snap is not None and snap.height > self.events.last:
                self._set_gap(max(self.gap or 0, snap.height))
        self._take_events(ready.append)

    def _take_events(self, blocks: list[rp.Block]) -> None:
        derived, proposed = self.shard.executor.derived, self.shard.log.events
        for block in blocks:
            h = block.signed.header.height
            events = proposed.pop(h, None) or derived.get(body_hash(block.body))
            if events is not None:
                header = block.signed.header
                self.pending[h] = (events, rp.header_hash(header), header.root)
        derived.clear()

    def _cover(self, confirmed: int, snapshot: int | None) -> None:
        """The events of blocks confirmed up to ``confirmed`` into the events log; where
        this copy is about to write its own ``snapshot`` (which drops the blocks below
        it), those it covers synced first, or, while the log has a gap, the gap grown
        over them (the blocks of the events waiting for it go with the snapshot)."""
        if self.gap is not None and snapshot is not None:
            for h in [h for h in self.pending if h <= snapshot]:
                del self.pending[h]
            self._set_gap(max(self.gap, snapshot))
        self._write_events(confirmed, snapshot is not None)

    def _confirmed(self, height: int, snapshot: int | None) -> None:
        """Blocks up to ``height`` are confirmed: the leader's callbacks run, and their
        events go to the events log and out to readers (see ``_write_events``)."""
        now = self.confirmed_at = time.monotonic()
        for h in [h for h in self.proposed if h <= height]:
            self.observe_round(now - self.proposed.pop(h))
        self.shard.confirmed(height)
        self._cover(height, snapshot)
        if self.replica.role is Role.LEADER and (self.shard.log.urgent or self.held):
            self.seal_soon()  # what waited goes now

    def _write_events(self, height: int, sync: bool) -> None:
        """The events of confirmed blocks up to ``height``, in order, into the events
        log (synced where ``sync``: a snapshot about to be written covers them, and the
        blocks they are derived from go with it), and out to readers from a leader.
        Nothing while the log has a gap: they wait for it to be filled."""
        if self.gap is not None:
            if len(self.pending) > GAPPED_PENDING:  # the twin has them: fill them too
                confirmed = [h for h in self.pending if h <= self.replica.confirmed]
                for h in confirmed:
                    del self.pending[h]
                if confirmed:
                    self._set_gap(max(self.gap, *confirmed))
            return
        leading = self.replica.role is Role.LEADER
        try:
            for h in sorted(h for h in self.pending if h <= height):
                if h > self.events.last:
                    (changes, committed), block, root = self.pending[h]
                    events = proto.BlockEvents(
                        self.worker, h, self.events.last, changes, committed, block, root
                    )
                    payload = proto.encode_block_events(events)
                    self.events.append(h, payload)
                    if leading:
                        self.publish_events(self.events_subject_owner, payload)
                del self.pending[h]
            if sync:
                self.events.sync()
        except OSError as exc:
            _disk_failed(exc)
        self.written = max(self.written, height)

    # -- a gap in the events log: filled from the twin ---------------------------------

    def _set_gap(self, upto: int | None) -> None:
        """Mark (durably) that the events log lacks the events of blocks up to ``upto``
        (a snapshot from the leader skipped their blocks), or that it is whole again."""
        path = self.folder / GAP_FILE
        try:
            if upto is None:  # a removal lost in a crash is found again (``events.last``)
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, str(upto).encode())
        except OSError as exc:
            _disk_failed(exc)
        self.gap = upto
        if upto is not None:
            self._gap_found.set()

    def _load_gap(self) -> int | None:
        try:
            return int((self.folder / GAP_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _disk_failed(OSError(f"unreadable {GAP_FILE}: {exc}"))

    def whole(self) -> int:
        """The height up to which this copy's events log holds every confirmed block's
        events: what it wrote, or while it has a gap, what it held before it."""
        return self.events.last if self.gap is not None else self.written

    async def backfill(self) -> None:
        """Fill a gap in the events log from the twin, which serves its own log on
        ``own_subject`` (a long-running task of the machine)."""
        while True:
            if self.gap is None:
                await self._gap_found.wait()
                self._gap_found.clear()
                continue
            try:
                query = msgspec.msgpack.encode(proto.EventsQuery(self.events.last))
                msg = await self.nc.request(self.twin_subject, query, timeout=BACKFILL_S)
                whole, page = proto.decode_copy_page(msg.data)
            except (NatsError, MessageError) as exc:
                log.debug("backfill: twin unavailable", extra={"error": repr(exc)})
                await asyncio.sleep(BACKFILL_S)
                continue
            if not self._fill(whole, page):
                await asyncio.sleep(BACKFILL_S)  # the twin lacks them too, for now

    def _fill(self, whole: int, page: proto.EventsPage) -> bool:
        """Take a page of the twin's events log (``whole``: how far it is whole);
        return whether the gap shrank or closed."""
        assert self.gap is not None
        blocks = [b for b in page.blocks if self.events.last < b.height <= self.gap]
        if blocks and (
            blocks[0].prev != self.events.last or any(b.worker != self.worker for b in blocks)
        ):
            log.error(
                "backfill: the twin's events do not chain to ours",
                extra={"shard": self.name, "ours": self.events.last, "prev": blocks[0].prev},
            )
            return False
        try:
            for b in blocks:
                self.events.append(b.height, proto.encode_block_events(b))
            # Whole once the twin is whole past the gap and showed us a block past it,
            # or nothing more (pages come in order from where we ask).
            past = len(blocks) < len(page.blocks) or not page.blocks
            if whole >= self.gap and past:
                self.events.sync()
                log.info("backfill: events log whole", extra={"shard": self.name})
                self.written = self.gap
                self._set_gap(None)
                self._write_events(self.replica.confirmed, False)
                return True
        except OSError as exc:
            _disk_failed(exc)
        return bool(blocks)

    async def on_twin_query(self, msg: Msg) -> None:
        """The twin fills a gap (or serves a reader while it has one): a page of this
        copy's events log as readers get it, and how far the log is whole."""
        await msg.respond(query_answer(msg.data, proto.EventsQuery, self._twin_page))

    def _twin_page(self, query: proto.EventsQuery) -> bytes:
        events = self.events
        page = proto.encode_page(events.last, events.read_after(query.after, EVENTS_PAGE_BYTES))
        return proto.encode_copy_page(self.whole(), page)

    def seal_soon(self) -> None:
        """Propose what the engine wrote, once everything that arrived in this turn of
        the event loop is in, unless ``IN_FLIGHT`` blocks wait for confirmation (the
        next confirmation proposes it then; the tick proposes what waits, whatever is
        in flight, within the replica's window)."""
        if self._sealing or self.replica.last - self.replica.confirmed >= IN_FLIGHT:
            return
        self._sealing = True
        asyncio.get_running_loop().call_soon(self._seal)

    def _seal(self) -> None:
        self._sealing = False
        if self.closed:
            return
        self._proposing(lambda: self.shard.log.seal(self.replica, self.engine))
        if self.held:
            self._seal_full()
        self.process()

    def _proposing(self, propose: Callable[[], None]) -> None:
        """Run ``propose``, noting when a block it proposed was proposed."""
        last = self.replica.last
        propose()
        if self.replica.role is Role.LEADER and self.replica.last > last:
            self.proposed[self.replica.last] = time.monotonic()

    # -- leading: the shard's subjects ---------------------------------------------

    def _serve(self, wanted: bool) -> None:
        if wanted != self.serving:
            self.serving = wanted
            self._serve_changed.set()

    async def serve(self) -> None:
        """Keep the subscriptions to the shard's subjects in line with ``serving``
        (a long-running task of the machine: restarted, it picks up where it failed)."""
        owner = self.layout.members[self.owner].name
        handlers = {self.subject: self._on_package}
        for what in QUERIES:
            handlers[query_subject(owner, self.worker, what)] = functools.partial(
                self._on_query, what
            )
        while True:
            self._serve_changed.clear()
            if self.serving:
                for subj, cb in handlers.items():
                    if subj not in self.subs:
                        self.subs[subj] = await self.nc.subscribe(
                            subj, cb=cb, pending_msgs_limit=1_000_000
                        )
            else:
                for subj in list(self.subs):
                    await self.subs[subj].unsubscribe()
                    del self.subs[subj]
            if self.serving == bool(self.subs):
                await self._serve_changed.wait()

    async def _on_package(self, msg: Msg) -> None:
        try:
            pkg = proto.decode_package(msg.data)
        except MessageError as exc:
            log.info("package rejected", extra={"reason": str(exc)})
            return
        self.take(pkg)

    def take(self, pkg: proto.Package) -> None:
        """A package for the shard, from this operator's NATS or relayed to it."""
        if not self.shard.accepting(self.replica):
            if self.handing is not None and len(self.handing) < HELD:
                self.handing.append(pkg)  # for the next leader
            return  # a package that reached a copy no longer leading: its sender retries
        if self.held or self.shard.log.full:
            # A block's worth waits to be sealed: the package waits for the next block
            # (as many as HELD fit; beyond, its sender's timeout or resend covers it).
            if len(self.held) < HELD:
                self.held.append(pkg)
            else:
                self.dropped += 1
            self._seal_full()
            return
        self._handle(pkg)
        if self.shard.log.full:
            self._seal_full()
        elif self.shard.log.urgent:  # else it rides with the next block, or the next tick
            self.seal_soon()

    def _handle(self, pkg: proto.Package) -> None:
        """Handle ``pkg``'s items while the next block has room; where it fills, the
        items left wait first in ``held`` for the block after. Small items may write
        large records (a vote's Committed carries its transaction, a Decide hundreds of
        coin changes): a block filled only once the whole package was in went past the
        limits without bound, its events or its Append over what NATS carries (the
        shard stalled). As a lone worker's, a block ends within one item of them."""
        log = self.shard.log
        for i, item in enumerate(pkg.items):
            if log.full:
                self.held.appendleft(msgspec.structs.replace(pkg, items=pkg.items[i:]))
                return
            self.engine.handle(msgspec.structs.replace(pkg, items=[item]))

    def _seal_full(self) -> None:
        """Seal a full block now, whatever is in flight (within the replica's window),
        then take what waited, as far as the next block has room."""
        if self.shard.log.full:
            self._proposing(lambda: self.shard.log.seal(self.replica, self.engine))
        while self.held and not self.shard.log.full and self.shard.accepting(self.replica):
            self._handle(self.held.popleft())
        if self.held and not self.shard.accepting(self.replica):
            self.held.clear()  # no longer leading: their senders retry with the leader
        self.process()

    async def _on_query(self, what: str, msg: Msg) -> None:
        """Each query answered by a task of its own: a coins query waits for a block's
        confirmation, and the ones that arrive meanwhile wait for that same block (the
        subscription's callbacks run one at a time). Beyond ``ANSWERING`` at once, the
        asker asks again."""
        if len(self._answering) >= ANSWERING:
            return
        task = asyncio.get_running_loop().create_task(self._respond(what, msg))
        self._answering.add(task)
        task.add_done_callback(self._answered)

    async def _respond(self, what: str, msg: Msg) -> None:
        answer = await self.answer(what, msg.data)
        if answer is not None:
            with contextlib.suppress(NatsError):  # gone: the asker asks again
                await msg.respond(answer)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._answering.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # a bug: said, with its traceback (the asker asks again)
            log.error("a query failed", exc_info=exc)

    async def answer(self, what: str, data: bytes) -> bytes | None:
        """The answer to query ``what`` (one of ``QUERIES``), or None where this copy
        does not lead (the asker asks again, and the leader answers)."""
        if not self.shard.accepting(self.replica):
            return None
        engine = self.engine
        if what == "coins":  # said once the block after what it read is confirmed
            return await coins_answer(engine, data, READ_S, self.seal_soon)
        if what == "state":
            info = state_info(engine, self.replica.last, self.events_height())
            r = self.replica
            info = msgspec.structs.replace(info, leader=self.me, term=r.term, confirmed=r.confirmed)
            return msgspec.msgpack.encode(info)
        if self.gap is not None:  # the twin's log answers, while ours has a gap
            try:
                answer = await self.nc.request(self.twin_subject, data, timeout=BACKFILL_S)
                return proto.split_copy_page(answer.data)[1]
            except (NatsError, MessageError):
                return None  # the reader asks again
        events = self.events
        return query_answer(
            data,
            proto.EventsQuery,
            lambda q: proto.encode_page(events.last, events.read_after(q.after, EVENTS_PAGE_BYTES)),
        )

    def events_height(self) -> int:
        """How far the shard's events go, as readers may take them: this copy's events
        log's last block; while that log has a gap (its own events wait for it to be
        filled, and readers are served from the twin's log), the last block it knows
        confirmed. A reader that has indexed less is behind: a gateway must not take a
        payment committed meanwhile for one that does not exist."""
        if self.gap is None:
            return self.events.last
        return max(self.events.last, self.replica.confirmed)

    # -- health ------------------------------------------------------------------------

    def caught_up(self, now: float) -> bool:
        """Leading, or following a leader heard from within an election timeout whose
        confirmed blocks this copy holds (within ``READY_LAG``). A copy that restarted
        far behind hears its leader at once: it was ready then, and its machine's roll
        let the next machine go (the operator's only copy up to date with the leader)
        while it still caught up."""
        r = self.replica
        if r.role is Role.LEADER:
            return True
        heard = r.leader >= 0 and now - r.heard < 3 * r.settings.election_s
        return heard and r.confirmed >= r.leader_confirmed - READY_LAG

    def describe(self) -> dict[str, object]:
        r = self.replica
        return {
            "shard": self.name,
            "copy": self.me,
            "role": r.role.value,
            "term": r.term,
            "leader": r.leader,
            "confirmed": r.confirmed,
            "last": r.last,
            "root": r.state_root().hex(),
            "evidence": sorted(r.evidence),
            "events_gap": self.gap,
            # The members in effect, and whether the block that made them is confirmed.
            "voters": r.members.voters,
            "old": r.members.old,
            "learners": r.members.learners,
            "members_confirmed": r.changed_at <= r.confirmed,
        }

    def close(self) -> None:
        self.closed = True  # what was scheduled before does nothing now
        self.store.close()
        self.events.close()
