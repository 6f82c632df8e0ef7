"""One copy of one shard, hosted by a machine: the replica, the ledger it drives, its
disk, and what it does while it leads.

Every copy runs the worker's engine (``LedgerShard``): followers replay their leader's
blocks, a leader takes packages and writes blocks. The shell's order for each ``Ready``
is the replica's: persist (``CopyStore``, fsynced), then send, then ``stored``. Then the
application's part: the events of newly confirmed blocks go to this copy's events log
(every copy keeps one, so that whichever leads can serve readers), and a leader
publishes them; leadership gained or lost resets the engine's log; a leader whose log
is confirmed subscribes to the shard's subjects on its operator's NATS (packages and
queries), and unsubscribes when it stops leading.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from constellation.errors import MessageError
from constellation.keys import SigningKey
from constellation.ledger.commit import TwoPhaseCommit
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import EVERYONE, Ready, Replica, Role, body_hash
from constellation.replication.replica import Settings as ReplicaSettings
from constellation.replication.shard import Events, LedgerShard, ShardLog
from services.bus import Batching, Packer, query_subject, worker_subject
from services.partition.app import EVENTS_PAGE_BYTES, answer_query
from services.partition.wal import EventLog
from services.partition.worker import state_info
from services.replica.config import Layout
from services.replica.store import CopyStore

log = logging.getLogger("replica.copy")

PACKAGES = Batching(512, 0)
# Blocks proposed and not yet confirmed before the next waits for a confirmation: what
# arrives meanwhile gathers into one block (each block costs every copy a signature
# check, an execution, an fsync and a signed ack, whatever it holds).
IN_FLIGHT = 1
EXIT_DISK = 74  # EX_IOERR: a copy whose disk fails stops; its supervisor restarts it

Deliver = Callable[[Sequence[int], rp.Envelope], None]  # (destination copies, message)


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
        deliver: Deliver,
        publish_events: Callable[[str, bytes], None],
        observe_round: Callable[[float], None] = lambda _: None,
    ) -> None:
        self.layout, self.owner, self.worker, self.me = layout, owner, worker, me
        self.name = f"{layout.members[owner].name}/{worker}"
        self.nc = nc
        self.deliver = deliver
        self.publish_events = publish_events
        self.observe_round = observe_round  # a leader's block: proposed to confirmed, s
        self.proposed: dict[int, float] = {}  # at a leader: height -> when proposed
        owner_name = layout.members[owner].name
        self.subject = worker_subject(owner_name, worker)
        self.events_subject_owner = owner_name
        self.packer = Packer(
            nc, worker, self.subject, lambda: layout.pmap.version, PACKAGES, lambda _: None
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
        )
        self.events = EventLog(folder / "events.log")
        self.events.open()
        self.pending: dict[int, Events] = {}  # events of blocks held, not yet confirmed
        self._take_events(self.replica.blocks(self.replica.first - 1, self.replica.last))
        self.subs: list[Subscription] = []
        self.serving = False  # subscribed to the shard's subjects (or about to be)
        self._sealing = False
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
        self.replica.tick()
        self.shard.tick(self.replica, now)
        self.process()

    def process(self) -> None:
        """Carry out what the replica asked, until it asks nothing more."""
        self._processing = False
        while True:
            ready = self.replica.ready()
            if ready.empty():
                break
            self._persist(ready)
            for to, msg in ready.messages:
                dests = range(self.replica.copies) if to == EVERYONE else (to,)
                self.deliver(
                    [d for d in dests if d != self.me],
                    rp.Envelope(self.owner, self.worker, self.me, msg),
                )
            self.replica.stored(ready.last)
            if ready.leading is not None:
                self.shard.leading(ready.leading, self.replica)
                self.proposed.clear()
                log.info(
                    "leading" if ready.leading else "no longer leading",
                    extra={"shard": self.name, "copy": self.me, "term": self.replica.term},
                )
            if ready.confirmed:
                self._confirmed(ready.confirmed)
        self._serve(self.shard.accepting(self.replica))

    def _persist(self, ready: Ready) -> None:
        try:
            self.store.write(ready)
        except OSError as exc:
            log.critical("a copy's disk failed; stopping", extra={"error": str(exc)})
            raise SystemExit(EXIT_DISK) from exc
        if ready.truncate is not None:
            for h in [h for h in self.pending if h > ready.truncate]:
                del self.pending[h]
        if ready.snapshot is not None:  # the state jumped: earlier events are not derived
            for h in [h for h in self.pending if h <= ready.snapshot.height]:
                del self.pending[h]
        self._take_events(ready.append)

    def _take_events(self, blocks: list[rp.Block]) -> None:
        """Remember the events of blocks now held, by height (a follower derived them
        when it executed the block, a leader when it proposed it)."""
        derived, proposed = self.shard.executor.derived, self.shard.log.events
        for block in blocks:
            h = block.signed.header.height
            events = proposed.pop(h, None) or derived.get(body_hash(block.body))
            if events is not None:
                self.pending[h] = events
        derived.clear()

    def _confirmed(self, height: int) -> None:
        now = self.confirmed_at = time.monotonic()
        leading = self.replica.role is Role.LEADER
        for h in [h for h in self.proposed if h <= height]:
            self.observe_round(now - self.proposed.pop(h))
        if leading:
            self.shard.confirmed(height)
        for h in sorted(h for h in self.pending if h <= height):
            changes, committed = self.pending.pop(h)
            if h <= self.events.last:
                continue
            events = proto.BlockEvents(self.worker, h, self.events.last, changes, committed)
            payload = proto.encode_block_events(events)
            self.events.append(h, payload)
            if leading:
                self.publish_events(self.events_subject_owner, payload)
        if leading and self.shard.log.urgent:  # room in the window: what waited goes now
            self.seal_soon()

    def seal_soon(self) -> None:
        """Propose what the engine wrote, once everything that arrived in this turn of
        the event loop is in, unless ``IN_FLIGHT`` blocks wait for confirmation (the
        next confirmation proposes it then)."""
        if self._sealing or self.replica.last - self.replica.confirmed >= IN_FLIGHT:
            return
        self._sealing = True
        asyncio.get_running_loop().call_soon(self._seal)

    def _seal(self) -> None:
        self._sealing = False
        last = self.replica.last
        self.shard.log.seal(self.replica, self.engine)
        if self.replica.last > last:
            self.proposed[self.replica.last] = time.monotonic()
        self.process()

    # -- leading: the shard's subjects ---------------------------------------------

    def _serve(self, wanted: bool) -> None:
        if wanted == self.serving:
            return
        self.serving = wanted
        asyncio.get_running_loop().create_task(self._subscribe(wanted))

    async def _subscribe(self, wanted: bool) -> None:
        for sub in self.subs:
            await sub.unsubscribe()
        self.subs = []
        if not wanted or not self.serving:
            return
        owner = self.layout.members[self.owner].name
        for subj, cb in (
            (self.subject, self._on_package),
            (query_subject(owner, self.worker, "coins"), self._on_coins),
            (query_subject(owner, self.worker, "state"), self._on_state),
            (query_subject(owner, self.worker, "events"), self._on_events_query),
        ):
            self.subs.append(await self.nc.subscribe(subj, cb=cb, pending_msgs_limit=1_000_000))
        if not self.serving:  # it stopped leading meanwhile
            await self._subscribe(False)

    async def _on_package(self, msg: Msg) -> None:
        if not self.shard.accepting(self.replica):
            return  # a package that reached a copy no longer leading: its sender retries
        try:
            pkg = proto.decode_package(msg.data)
        except MessageError as exc:
            log.info("package rejected", extra={"reason": str(exc)})
            return
        self.engine.handle(pkg)
        if self.shard.log.urgent:  # else it rides with the next block, or the next tick
            self.seal_soon()

    async def _on_coins(self, msg: Msg) -> None:
        engine = self.engine
        await answer_query(
            msg,
            proto.CoinQuery,
            lambda q: msgspec.msgpack.encode([engine.coin_info(c) for c in q.coin_ids[:1000]]),
        )

    async def _on_state(self, msg: Msg) -> None:
        await msg.respond(
            msgspec.msgpack.encode(state_info(self.engine, self.replica.last, self.events.last))
        )

    async def _on_events_query(self, msg: Msg) -> None:
        events = self.events
        await answer_query(
            msg,
            proto.EventsQuery,
            lambda q: proto.encode_page(events.last, events.read_after(q.after, EVENTS_PAGE_BYTES)),
        )

    # -- health ------------------------------------------------------------------------

    def caught_up(self, now: float) -> bool:
        """Leading, or following a leader heard from within an election timeout."""
        r = self.replica
        if r.role is Role.LEADER:
            return True
        return r.leader >= 0 and now - r.heard < 3 * r.settings.election_s

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
        }

    def close(self) -> None:
        self.store.close()
        self.events.close()
