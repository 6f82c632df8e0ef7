"""The guild's checkpoints at one operator (the indexer's part of issue 16's light
clients): follow every shard of the guild, propose, vouch, take and store signed
checkpoints, and answer the gateway's questions about them.

* **Following.** Every machine of this operator holds a copy of every shard of the
  guild, and each copy serves its events log (confirmed blocks only) on its own subject
  (``services.bus.copy_events_subject``). The checkpointer reads each shard from this
  operator's two copies (the other when one does not answer), each shard every ``POLL_S``
  unless its copy holds more than one read takes, into its ``GuildIndex``: so what it
  vouches for is what this operator's own copies executed.
* **Proposing** (``constellation.lightclient.checkpointer`` says who and when): a
  proposal goes to this operator's signer, which coordinates ROAST among the members'
  signers; each asks its own indexer to vouch (``Vouch`` on ``vouch_subject``). A signed
  checkpoint is taken here and announced to every member on its NATS
  (``checkpoint_subject``), where its indexer takes it once its signature verifies and
  its own index computed the same entries. Every member announces its latest checkpoint
  again every ``ANNOUNCE_S``, so one that missed it (down, or just started) hears it.
* **Handing over** (after a change of members, ``services.indexer.keys``): once this
  operator's guild key was re-made and its coins moved to it, ``hand_over`` names the new
  key and members; the next checkpoint proposed is a handover to them, signed by the old
  key, and the later ones are signed by the new key (``Checkpointer.signing_key``). The
  pin the descriptor names stays the first key (kept in the store): light clients follow
  the handovers from it (``Handovers``). Every member announces the handovers it
  followed every ``HANDOVERS_S``: one that lost its store follows them again.
* **Storing.** Each signed checkpoint taken is stored with its entries and the records
  its entries cover (``Index.store_checkpoints``): transaction proofs come from there;
  coin proofs from the coin trees as of the latest checkpoint, in memory. After a
  restart, the index is rebuilt from the copies' logs and the stored checkpoints are
  taken again as it reaches them.
* **Answering** the gateway on ``lc_subject`` (``constellation.protocol.lightclient``),
  and telling it of each checkpoint stored (``lc_taken_subject``): it asks then what the
  checkpoint did to the addresses and coins its light clients subscribe to, proved from
  the last ``RECENT`` checkpoints' records kept in memory (``index.Recent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from constellation.errors import DecodeError, MessageError, ProofRefused
from constellation.guild import Checkpoint
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import (
    Announced,
    Checkpointer,
    Evidence,
    Filled,
    NotYet,
    verify_filled,
)
from constellation.protocol import ledger as proto
from constellation.protocol import lightclient as lcp
from constellation.protocol.signer import (
    KeyInfo,
    KeyRequest,
    OpReply,
    SignRequest,
    decode_target,
    encode_target,
)
from constellation.replication.placement import COPIES
from constellation.tx import partition_of
from services.bus import copy_events_subject, lc_subject, lc_taken_subject
from services.database import DATABASE_DOWN
from services.indexer.store import Index
from services.replica.config import Layout
from services.replica.transport import (
    CHECKPOINT_LISTEN,
    FILL_LISTEN,
    RANGE_LISTEN,
    checkpoint_subject,
    fill_subject,
    range_subject,
)
from services.runtime import Tasks, close_nats, connect_peer, now_ms, raise_lost_cancel
from services.signer.client import SignerClient
from services.signer.config import SignerAccess

POLL_S = 0.1  # each shard's copies are read this often
PAGES = 8  # pages read from one shard's copy in a round
PAGE_TIMEOUT_S = 2.0
SIGN_TIMEOUT_S = 10.0
KEY_RETRY_S = 1.0  # the guild's key is asked of the signer this often until it has one
VOUCH_WAIT_S = 4.0  # how long a vouch waits for the index to reach a proposal (the signer
# waits 5 s: services.signer.app.VOUCH_S)
ANNOUNCE_S = 2.0  # each member tells the others of its latest checkpoint this often
HANDOVERS_S = 10.0  # ...and of the handovers it followed
MAX_RANGE = 100  # checkpoints answered at once
RESTORE_PAGE = 1000
RECENT = 64  # checkpoints whose records are kept in memory to prove pushes at once
COMMIT_HORIZON = 1024  # checkpoints whose commits are remembered (index.Recent)
MAX_KEYS = 1000  # keys in one push query
MAX_ANSWER = 512 << 10  # bytes of pushes in one answer (NATS carries 1 MiB)
MAX_HISTORY = 1000
MAX_REQUESTS = 32  # answered at once
BACKFILL_S = 5.0  # how often a member that missed checkpoints asks another for them
ANSWER_EVERY_S = 1.0  # a member is answered one range request this often, at most
# the database unreachable, or a statement it refused: said, and tried again
NOT_STORED = (*DATABASE_DOWN, asyncpg.PostgresError)

log = logging.getLogger("indexer.checkpoints")


@dataclass(frozen=True)
class CheckpointSettings:
    layout: Layout
    me: int  # this operator's index in the layout
    peers: dict[str, str]  # member name -> its NATS URL, with the credentials it issued us
    signer: SignerAccess
    vouch_subject: str  # where this operator's signer asks (its SIGNER_VOUCH_SUBJECT)
    cadence_ms: int
    takeover_ms: int
    idle_ms: int
    pin: KeyInfo | None = None  # the guild's first key, for a member that joined after it


@dataclass
class _Unstored:
    """Checkpoints taken and not stored (the database down), with their records' keys:
    stored with the next ones taken, or by ``_backfill`` once the database is back. Past
    ``MAX_RANGE`` the oldest are let go: gaps that ``_backfill`` asks another member for."""

    held: list[lc.Held] = field(default_factory=list)
    touches: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # (address, height, txid)
    coins: dict[int, lc.Coins] = field(default_factory=dict)

    def add(
        self,
        held: list[lc.Held],
        touches: list[tuple[bytes, int, bytes]],
        coins: dict[int, lc.Coins],
    ) -> None:
        self.held += held
        self.touches += touches
        self.coins.update(coins)
        if len(self.held) > MAX_RANGE:
            self.held = self.held[-MAX_RANGE:]
            low = self.held[0].checkpoint.checkpoint.height
            self.touches = [t for t in self.touches if t[1] >= low]
            self.coins = {h: c for h, c in self.coins.items() if h >= low}


class CheckpointMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.height = Gauge(
            "indexer_checkpoint_height", "the latest signed checkpoint taken", registry=registry
        )
        self.time = Gauge(
            "indexer_checkpoint_time_seconds",
            "the latest signed checkpoint's time (its proposer's clock)",
            registry=registry,
        )
        self.proposals = Counter(
            "indexer_checkpoint_proposals",
            "checkpoints this operator proposed, by outcome (signed, refused, failed)",
            ["outcome"],
            registry=registry,
        )
        self.vouches = Counter(
            "indexer_checkpoint_vouches",
            "checkpoints this operator's signer asked about, by answer (yes, no, late)",
            ["answer"],
            registry=registry,
        )
        self.refused = Counter(
            "indexer_checkpoint_refused",
            "announced checkpoints or pages refused (malformed, badly signed, not chaining)",
            registry=registry,
        )
        self.lag = Histogram(
            "indexer_checkpoint_lag_seconds",
            "from a block's events read here to a signed checkpoint covering it taken here",
            buckets=(0.25, 0.5, 1, 1.5, 2, 2.5, 3, 5, 10, 30),
            registry=registry,
        )


async def apply_blocks(
    index: lc.ShardIndex, blocks: list[proto.BlockEvents], seen: deque[tuple[int, float]]
) -> None:
    """Apply a page of a shard's blocks to its index (each noted in ``seen``, with when),
    raising ``ValueError`` at one that does not belong or chain. A page can hold
    thousands of coin changes, each a path of the tree in Python: between blocks the
    event loop runs (SIGTERM, the other shards, the ops port); it did not for a whole
    page, and an indexer catching up was killed at the end of its grace for not
    stopping, which held up the stop of its operator's machines by as long."""
    for events in blocks:
        if events.worker != index.worker:
            raise ValueError(f"a block of worker {events.worker}")
        index.apply(events)
        seen.append((events.height, time.monotonic()))
        await asyncio.sleep(0)


class Checkpoints:
    def __init__(
        self,
        settings: CheckpointSettings,
        nc: Client,
        store: Index,
        registry: CollectorRegistry,
        tasks: Tasks,
    ) -> None:
        self.s = settings
        self.nc = nc
        self.store = store
        self.metrics = CheckpointMetrics(registry)
        self.tasks = tasks
        self.pin: pf.Pin | None = None  # the first key's: the descriptor's
        self.keys: dict[bytes, bytes] = {}  # x-only -> the signer's 33-byte key
        self.holders: dict[bytes, tuple[list[int], int]] = {}  # x-only -> members, t
        self.staying: list[int] | None = None  # the members a key plan keeps
        self.saved: tuple[Checkpoint, Evidence] | None = None  # the proposal kept
        self.members: lcp.Members | None = None  # what the pin's member-set root is over
        self.ck: Checkpointer | None = None
        self.first: bytes = b""  # checkpoint 0's message, once known
        self.stored = -1  # the highest checkpoint in the store
        self.unstored = _Unstored()
        self.peers: dict[str, Client] = {}
        self.diverged: dict[lc.Shard, str] = {}  # shards whose copies' logs do not chain
        self.seen: dict[lc.Shard, deque[tuple[int, float]]] = {}  # blocks read, not covered
        self.recent = lc.Recent(RECENT, COMMIT_HORIZON)  # made anew each run
        self.requests: set[asyncio.Task[None]] = set()  # answering, each in its own task
        self.slots = asyncio.Semaphore(MAX_REQUESTS)
        self.taking = asyncio.Lock()
        self.complete_below = 0  # every checkpoint below is stored with its records
        self.answered: dict[str, float] = {}  # member -> when its last range was answered
        self.asked: set[int] = set()  # the missed heights last asked for

    # -- readiness -----------------------------------------------------------------------

    def progress(self) -> tuple[bool, str]:
        """Not ready only where this operator's ledger disagrees with the guild's or its
        copies' logs do not chain: waiting for the guild's key (its first start, before
        the members' key generation) or for the shards is part of running."""
        ck = self.ck
        if ck is None:
            return True, "checkpoints: waiting for the guild's key"
        if ck.disagreed is not None:
            return False, f"disagrees with a checkpoint the guild signed: {ck.disagreed}"
        behind = ck.behind()
        if behind is not None:
            return False, behind
        if self.diverged:
            return False, "; ".join(
                f"shard {o}/{w}: {why}" for (o, w), why in self.diverged.items()
            )
        last = ck.index.last
        at = "none yet" if last is None else str(last.checkpoint.checkpoint.height)
        return True, f"checkpoints: latest {at}"

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled (a task of the indexer)."""
        s = self.s
        async with SignerClient(s.signer) as signer:
            while True:
                try:
                    ck = await self._start(signer)
                    break
                except NOT_STORED as exc:
                    log.warning("checkpointing waits for the database", extra={"error": repr(exc)})
                    await asyncio.sleep(KEY_RETRY_S)
            layout = s.layout
            self.ck = ck
            self._signers()
            subs = [
                await self.nc.subscribe(s.vouch_subject, cb=self._each(self._on_vouch)),
                await self.nc.subscribe(CHECKPOINT_LISTEN, cb=self._on_announced),
                await self.nc.subscribe(
                    lc_subject(layout.members[s.me].name), cb=self._each(self._on_query)
                ),
                await self.nc.subscribe(RANGE_LISTEN, cb=self._on_range),
                await self.nc.subscribe(FILL_LISTEN, cb=self._on_fills),
            ]
            connecting = [
                asyncio.create_task(self._connect(member.name))
                for i, member in enumerate(layout.members)
                if i != s.me and member.name in s.peers
            ]
            for task in connecting:
                self.tasks.watch("peer", task)
            log.info("checkpointing", extra={"shards": len(ck.index.shards), "rank": s.me})
            try:
                async with asyncio.TaskGroup() as group:  # one fails: all stop, run again
                    group.create_task(self._follow(ck))
                    group.create_task(self._propose(ck, signer))
                    group.create_task(self._backfill())
            finally:
                for sub in subs:
                    with contextlib.suppress(NatsError):
                        await sub.unsubscribe()
                for task in [*connecting, *self.requests]:
                    task.cancel()
                peers, self.peers = self.peers, {}
                for peer in peers.values():
                    await close_nats(peer)

    async def _start(self, signer: SignerClient) -> Checkpointer:
        """The checkpointer, from the pin and what the store holds."""
        s = self.s
        pin = self.pin = await self._pin(signer)
        layout = s.layout
        shards = [(o, w) for o in range(len(layout.members)) for w in layout.pmap.workers]
        index = lc.GuildIndex(layout.guild, pin.members, shards)
        self.seen = {shard: deque() for shard in shards}
        ck = Checkpointer(index, pin, s.me, s.cadence_ms, s.takeover_ms, s.idle_ms)
        self.recent = lc.Recent(RECENT, COMMIT_HORIZON)
        await self._restore(ck)
        saved = await self.store.proposal()
        if saved is not None:
            target = decode_target(saved[0])
            assert isinstance(target, Checkpoint)  # stored only by _propose
            self.saved = target, Evidence.decode(saved[1])
            ck.resume(self.saved)
        return ck

    async def _pin(self, signer: SignerClient) -> pf.Pin:
        """The guild's first key, threshold and members: the store's, or else the one
        configured (a member that joined after the guild's first key was made), or else
        the first the signer held a share of (kept in the store for good). The member set
        is the key's holders, not the layout's members: those change as members join."""
        first = self.s.pin
        while first is None:
            reply = await self._signer_keys(signer)
            if reply is not None and reply.first is not None:
                first = reply.first
            else:
                await asyncio.sleep(KEY_RETRY_S)
        pin = await self.store.pin(first)
        key, layout = pin.key, self.s.layout
        self.keys[key[1:]] = key
        members = [(layout.members[i].name, layout.members[i].key) for i in pin.members]
        self.holders.setdefault(key[1:], (pin.members, pin.t))
        self.members = lcp.Members(pin.t, members)
        return pf.Pin(layout.guild, key[1:], pf.members_root(pin.t, members))

    async def _signer_keys(self, signer: SignerClient) -> OpReply | None:
        """The keys the signer signs with (kept in ``keys``), or None where it has none
        or does not answer."""
        try:
            reply = await signer.request(KeyRequest(), SIGN_TIMEOUT_S)
        except (NatsError, TimeoutError, MessageError) as exc:
            log.debug("signer unavailable", extra={"error": repr(exc)})
            return None
        if not reply.ok:
            return None
        self.keys.update((k.key[1:], k.key) for k in reply.keys)
        self.holders.update((k.key[1:], (k.members, k.t)) for k in reply.keys)
        self._signers()
        return reply

    def stay(self, members: list[int]) -> None:
        """A key plan names the members that stay: only they sign, with any key."""
        if self.staying != members:
            self.staying = members
            self._signers()

    def _signers(self) -> None:
        """Who signs with each key, for the checkpointer's proposers: its holders that
        are still members."""
        if self.ck is not None:
            stay = self.staying
            self.ck.signers = {
                key: ([m for m in held if stay is None or m in stay], t)
                for key, (held, t) in self.holders.items()
            }

    def hand_over(self, key: bytes, members: list[int], t: int) -> None:
        """Hand the checkpoints over to ``key`` (33 bytes), made among ``members``
        (member indices), ``t`` of them signing: the next checkpoint proposed names them,
        and this operator vouches for such a handover only."""
        layout = self.s.layout
        root = pf.members_root(
            t, [(layout.members[i].name, layout.members[i].key) for i in members]
        )
        self.keys[key[1:]] = key
        if self.ck is not None and self.ck.handover != (key[1:], root):
            self.ck.handover = key[1:], root
            log.info("handing the checkpoints over", extra={"key": key.hex(), "members": members})

    def handed(self, key: bytes) -> bool:
        """Whether the checkpoints are signed by ``key`` (33 bytes) from the next on."""
        ck = self.ck
        return ck is not None and ck.signing_key(ck.index.next_height) == key[1:]

    async def _restore(self, ck: Checkpointer) -> None:
        """The stored checkpoints, held to be taken again as the index reaches them."""
        start = 0
        while page := await self.store.checkpoints(start, RESTORE_PAGE):
            for data in page:
                announced = Announced.decode(data)
                checkpoint = announced.signed.checkpoint
                ck.restore(announced)
                if checkpoint.height == 0:
                    self.first = checkpoint.message()
            start = max(ck.waiting) + 1
        self.stored = start - 1
        if ck.waiting:
            log.info("restoring checkpoints", extra={"stored": len(ck.waiting)})

    async def _connect(self, peer: str) -> None:
        name = f"indexer-{self.s.layout.members[self.s.me].name}"
        self.peers[peer] = await connect_peer(self.s.peers[peer], name, peer)

    # -- following the shards -----------------------------------------------------------

    async def _follow(self, ck: Checkpointer) -> None:
        """Each shard read by a task of its own, at its own pace: one whose copy holds
        more than a read takes is read again at once, any other every ``POLL_S`` (a busy
        shard does not make the idle ones be read more often)."""
        async with asyncio.TaskGroup() as group:
            for shard in ck.index.shards:
                group.create_task(self._follow_shard(ck, shard))

    async def _follow_shard(self, ck: Checkpointer, shard: lc.Shard) -> None:
        while True:
            behind = await self._read(ck, shard)
            await self._took(ck.advance(now_ms()))
            if not behind:
                await asyncio.sleep(POLL_S)

    async def _read(self, ck: Checkpointer, shard: lc.Shard) -> bool:
        """Read a shard's new blocks from one of this operator's copies (the other where
        one does not answer); whether that copy holds more than was read."""
        if shard in self.diverged:
            return False
        owner, worker = shard
        name = self.s.layout.members[owner].name
        for copy in range(COPIES * self.s.me, COPIES * self.s.me + COPIES):
            behind = await self._pages(ck, shard, copy, copy_events_subject(name, worker, copy))
            if behind is not None:
                return behind
        return False

    async def _pages(
        self, ck: Checkpointer, shard: lc.Shard, copy: int, subject: str
    ) -> bool | None:
        """Up to ``PAGES`` pages of one copy's events log into the index: whether the copy
        holds more, or None where it did not answer."""
        index = ck.index.shards[shard]
        for _ in range(PAGES):
            query = msgspec.msgpack.encode(proto.EventsQuery(index.height))
            try:
                reply = await self.nc.request(subject, query, timeout=PAGE_TIMEOUT_S)
                raise_lost_cancel()  # else its task group would wait for it (Tasks.stop)
                _, page = proto.decode_copy_page(reply.data)
            except (NatsError, TimeoutError) as exc:
                log.debug("copy unavailable", extra={"subject": subject, "error": repr(exc)})
                return None
            except MessageError as exc:
                self.metrics.refused.inc()
                log.warning("events page refused", extra={"subject": subject, "error": str(exc)})
                return None
            fresh = [b for b in page.blocks if b.height > index.height]
            try:
                await apply_blocks(index, fresh, self.seen[shard])
            except ValueError as exc:  # an operator must look: this copy's log is damaged
                self.diverged[shard] = f"copy {copy}'s events log does not chain: {exc}"
                log.error(
                    "a copy's events do not chain", extra={"subject": subject, "error": str(exc)}
                )
                return False
            if not fresh or index.height >= page.last:
                return False
        return True

    # -- proposing ----------------------------------------------------------------------

    async def _propose(self, ck: Checkpointer, signer: SignerClient) -> None:
        announced_at = handovers_at = 0.0
        while True:
            proposal = ck.due(now_ms())
            if proposal is None:
                if time.monotonic() - announced_at > ANNOUNCE_S and ck.index.last is not None:
                    announced_at = time.monotonic()
                    last = ck.index.last
                    entries = [c.entry for c in last.covered.values()]
                    await self._announce(Announced(last.checkpoint, entries))
                if time.monotonic() - handovers_at > HANDOVERS_S and ck.pin.handovers:
                    handovers_at = time.monotonic()
                    await self._announce_handovers(ck)
                await asyncio.sleep(0.05)
                continue
            if not await self._keep_proposal(proposal):
                await asyncio.sleep(KEY_RETRY_S)
                continue
            checkpoint, evidence = proposal
            xonly = ck.signing_key(checkpoint.height)
            if xonly not in self.keys:  # a key made since: the signer says its parity
                await self._signer_keys(signer)
            key = self.keys.get(xonly)
            if key is None:
                log.warning("the signer holds no share of the key that signs now")
                await asyncio.sleep(KEY_RETRY_S)
                continue
            request = SignRequest(checkpoint, evidence.encode(), key)
            try:
                reply = await signer.request(request, SIGN_TIMEOUT_S)
            except (NatsError, TimeoutError, MessageError) as exc:
                self.metrics.proposals.labels("failed").inc()
                log.warning("the signer did not answer", extra={"error": repr(exc)})
                continue
            if not reply.ok:
                self.metrics.proposals.labels("refused").inc()
                log.info(
                    "checkpoint not signed",
                    extra={"height": checkpoint.height, "code": reply.code, "error": reply.error},
                )
                continue
            announced = Announced(
                pf.SignedCheckpoint(checkpoint, reply.signature), evidence.entries
            )
            try:
                taken = ck.take(announced, now_ms())
            except ProofRefused as exc:  # the signer's bug: said loudly, not announced
                self.metrics.proposals.labels("failed").inc()
                log.error(
                    "the signer's checkpoint signature does not verify", extra={"error": str(exc)}
                )
                continue
            self.metrics.proposals.labels("signed").inc()
            await self._took(taken)
            await self._announce(announced)
            announced_at = time.monotonic()

    async def _keep_proposal(self, proposal: tuple[Checkpoint, Evidence]) -> bool:
        """Store ``proposal`` before it is sent (it is sent again unchanged after a
        restart); whether it is stored."""
        if proposal is self.saved:
            return True
        try:
            await self.store.save_proposal(encode_target(proposal[0]), proposal[1].encode())
        except NOT_STORED as exc:
            log.warning("a proposal not stored: not sent", extra={"error": repr(exc)})
            return False
        self.saved = proposal
        return True

    async def _announce_handovers(self, ck: Checkpointer) -> None:
        """Every handover followed here, as stored (with its entries): a member that
        lost its store follows them before it can check what is signed above them."""
        for handover in ck.pin.handovers:
            try:
                found = await self.store.checkpoints(handover.checkpoint.height, 1)
            except NOT_STORED as exc:
                log.warning("handovers not announced", extra={"error": repr(exc)})
                return
            if found and Announced.decode(found[0]).signed == handover:  # stored here
                await self._announce(Announced.decode(found[0]))

    async def _announce(self, announced: Announced) -> None:
        """Tell every member (a member that misses it hears it again, or takes it from
        the next proposal's evidence)."""
        data = announced.encode()
        subject = checkpoint_subject(self.s.layout.members[self.s.me].name)
        for peer, client in list(self.peers.items()):
            try:
                await client.publish(subject, data)
            except NatsError as exc:
                log.debug("announcing failed", extra={"peer": peer, "error": repr(exc)})

    async def _took(self, taken: list[lc.Signed]) -> None:
        """Signed checkpoints just taken: stored (unless restored from the store), and the
        gateways told, in height order (one call at a time: the checkpointer hands them
        over in order, and the proposing, following, vouching and announced tasks all
        take)."""
        if not taken:
            return
        async with self.taking:
            await self._store(taken)

    async def _store(self, taken: list[lc.Signed]) -> None:
        now = time.monotonic()
        for signed in taken:
            for shard, covered in signed.covered.items():
                seen = self.seen[shard]
                while seen and seen[0][0] <= covered.entry.height:
                    self.metrics.lag.observe(now - seen.popleft()[1])
        fresh: list[lc.Held] = []
        touches: list[tuple[bytes, int, bytes]] = []  # (address, height, txid)
        coins: dict[int, lc.Coins] = {}
        for signed in taken:
            touched = self.recent.add(signed)
            height = signed.checkpoint.checkpoint.height
            if height > self.stored:
                fresh.append(lc.held(signed))
                coins[height] = touched.coins
                touches += [
                    (key, height, txid)
                    for (kind, key), txids in touched.by_key.items()
                    if kind == "address"
                    for txid in txids
                ]
        last = taken[-1].checkpoint.checkpoint
        if taken[0].checkpoint.checkpoint.height == 0:
            self.first = taken[0].checkpoint.checkpoint.message()
        self.metrics.height.set(last.height)
        self.metrics.time.set(last.time_ms / 1000)
        if fresh:
            self.unstored.add(fresh, touches, coins)
            await self._keep_taken()

    async def _keep_taken(self) -> bool:
        """Store what was taken and not stored yet; once stored, the gateways are told.
        Whether it was done."""
        pending = self.unstored
        if not await self._keep(pending.held, pending.touches, pending.coins):
            return False
        self.unstored = _Unstored()
        self.stored = max(self.stored, pending.held[-1].checkpoint.checkpoint.height)
        subject = lc_taken_subject(self.s.layout.members[self.s.me].name)
        for h in pending.held:
            with contextlib.suppress(NatsError):  # the gateways catch up by asking
                await self.nc.publish(subject, Announced(h.checkpoint, h.entries).encode())
        return True

    async def _keep(
        self,
        fresh: list[lc.Held],
        touches: list[tuple[bytes, int, bytes]],
        coins: dict[int, lc.Coins],
    ) -> bool:
        """Store checkpoints; whether it was done. PostgreSQL down loses none for good:
        what was taken is kept to be stored again (``_Unstored``), and a checkpoint let
        go is a gap that ``_backfill`` asks another member for."""
        try:
            await self.store.store_checkpoints(fresh, touches, coins)
        except NOT_STORED as exc:
            height = fresh[0].checkpoint.checkpoint.height
            log.warning("checkpoints not stored", extra={"from": height, "error": repr(exc)})
            return False
        return True

    # -- checkpoints missed -------------------------------------------------------------

    async def _backfill(self) -> None:
        """Store what was taken while the database was down, and ask the other members,
        in turn, for the checkpoints this operator missed (it was down and adopted a
        later one), with their records: they prove the transactions under them here too."""
        turn = 0
        while True:
            await asyncio.sleep(BACKFILL_S)
            async with self.taking:  # the database was down: what was taken, stored now
                held = len(self.unstored.held)
                if held and await self._keep_taken():
                    log.info("checkpoints taken in the outage stored", extra={"count": held})
            upto = self.stored
            try:
                missing = await self.store.missing(self.complete_below, upto, MAX_RANGE)
            except NOT_STORED as exc:
                log.warning("missed checkpoints not looked for", extra={"error": repr(exc)})
                continue
            self.complete_below = missing[0] if missing else upto + 1
            peers = sorted(self.peers)
            if not missing or not peers:
                continue
            peer = peers[turn % len(peers)]
            turn += 1
            self.asked = set(missing)
            request = lcp.RangeRequest(missing[0], missing[-1] - missing[0] + 1)
            log.info("asking for missed checkpoints", extra={"peer": peer, "from": missing[0]})
            with contextlib.suppress(NatsError):
                me = self.s.layout.members[self.s.me].name
                await self.peers[peer].publish(range_subject(me), msgspec.msgpack.encode(request))

    async def _on_range(self, msg: Msg) -> None:
        """A member's ``RangeRequest``: answered with what this operator stored, at most
        one a second for each member, in messages of at most ``MAX_ANSWER`` bytes."""
        sender = msg.subject.split(".")[2]
        peer = self.peers.get(sender)
        now = time.monotonic()
        if peer is None or now - self.answered.get(sender, -ANSWER_EVERY_S) < ANSWER_EVERY_S:
            return
        self.answered[sender] = now
        try:
            request = msgspec.msgpack.decode(msg.data, type=lcp.RangeRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.metrics.refused.inc()
            log.warning("range request refused", extra={"peer": sender, "error": str(exc)})
            return
        try:
            found = await self.store.filled(
                max(0, request.start), max(1, min(request.count, MAX_RANGE))
            )
        except NOT_STORED as exc:  # it asks again, maybe another
            log.warning("range request not answered", extra={"peer": sender, "error": repr(exc)})
            return
        me = self.s.layout.members[self.s.me].name
        items: list[lcp.FilledItem] = []
        size = 0
        for f in found:
            item = lcp.FilledItem(f.announced.encode(), list(f.records.items()))
            length = len(item.announced) + sum(len(r) + 8 for _, rs in item.records for r in rs)
            if length > MAX_ANSWER:
                log.warning("a checkpoint's records too large to send", extra={"peer": sender})
                continue
            if size + length > MAX_ANSWER:
                await peer.publish(fill_subject(me), msgspec.msgpack.encode(lcp.Fills(items)))
                items, size = [], 0
            items.append(item)
            size += length
        if items:
            await peer.publish(fill_subject(me), msgspec.msgpack.encode(lcp.Fills(items)))

    async def _on_fills(self, msg: Msg) -> None:
        """Checkpoints another member sent with their records: each checked against the
        pin and its entries (another operator is not trusted) and stored where missing."""
        ck = self.ck
        assert ck is not None
        try:
            fills = msgspec.msgpack.decode(msg.data, type=lcp.Fills)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.metrics.refused.inc()
            log.warning(
                "filled checkpoints refused", extra={"subject": msg.subject, "error": str(exc)}
            )
            return
        fresh: list[lc.Held] = []
        for item in fills.items:  # only what was asked for and is missing is looked at
            try:
                announced = Announced.decode(item.announced)
                if announced.signed.checkpoint.height not in self.asked:
                    continue
                fresh.append(verify_filled(ck.pin, Filled(announced, dict(item.records))))
                ck.follow(announced.signed)  # a handover missed: followed, in height order
            except (DecodeError, ProofRefused) as exc:
                self.metrics.refused.inc()
                log.warning(
                    "a filled checkpoint refused", extra={"subject": msg.subject, "error": str(exc)}
                )
                continue
            self.asked.discard(announced.signed.checkpoint.height)
        touches: list[tuple[bytes, int, bytes]] = []
        coins: dict[int, lc.Coins] = {}
        commits: dict[int, list[bytes]] = {}
        for h in fresh:
            height = h.checkpoint.checkpoint.height
            if height == 0:
                self.first = h.checkpoint.checkpoint.message()
            found = coins[height] = lc.Coins([], [])
            committed = commits[height] = []
            for position, records in h.records.items():
                for record in map(pf.Record.decode, records):
                    found.add(h.entries[position].owner, record)
                    touches += [(c.owner, height, record.txid) for c in record.changes]
                    if record.committed:
                        committed.append(record.txid)
            # changes taken later whose commit this checkpoint holds: in the history now
            later = self.recent.waiting_for(committed)
            touches += [(key, at, txid) for (kind, key), at, txid in later if kind == "address"]
        if fresh and await self._keep(fresh, touches, coins):
            for height, committed in commits.items():  # (asked for again where not stored)
                self.recent.filled(height, committed)
            log.info("missed checkpoints filled", extra={"count": len(fresh)})

    # -- what other services and members send ---------------------------------------------

    def _each(
        self, handler: Callable[[Msg], Coroutine[Any, Any, None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """A subscription's callback that answers each request in a task of its own (NATS
        hands a subscription's messages over one at a time: a vouch waiting for the index,
        or a slow query, would hold up the next)."""

        async def callback(msg: Msg) -> None:
            await self.slots.acquire()  # at most MAX_REQUESTS at once: NATS holds the rest
            task = asyncio.create_task(handler(msg))
            self.requests.add(task)
            task.add_done_callback(self._answered)
            self.tasks.watch("request", task)

        return callback

    def _answered(self, task: asyncio.Task[None]) -> None:
        self.requests.discard(task)
        self.slots.release()

    async def _on_vouch(self, msg: Msg) -> None:
        ck = self.ck
        assert ck is not None
        reason: str | NotYet
        try:
            vouch = msgspec.msgpack.decode(msg.data, type=lcp.Vouch)
            evidence = Evidence.decode(vouch.evidence)
        except (msgspec.ValidationError, msgspec.DecodeError, DecodeError) as exc:
            reason = f"malformed: {exc}"
        else:
            end = time.monotonic() + VOUCH_WAIT_S
            while True:
                reason, taken = ck.vouch(vouch.checkpoint, evidence, now_ms())
                await self._took(taken)
                if not isinstance(reason, NotYet) or time.monotonic() > end:
                    break
                await asyncio.sleep(0.05)
        if isinstance(reason, NotYet):
            self.metrics.vouches.labels("late").inc()
            reason = "this operator has not reached the checkpoint's blocks yet"
        self.metrics.vouches.labels("yes" if not reason else "no").inc()
        if reason:
            log.info("not vouching for a checkpoint", extra={"reason": reason})
        await msg.respond(msgspec.msgpack.encode(reason))

    async def _on_announced(self, msg: Msg) -> None:
        ck = self.ck
        assert ck is not None
        try:
            taken = ck.take(Announced.decode(msg.data), now_ms())
        except (DecodeError, ProofRefused) as exc:
            self.metrics.refused.inc()
            log.warning(
                "announced checkpoint refused", extra={"subject": msg.subject, "error": str(exc)}
            )
            return
        await self._took(taken)

    async def _on_query(self, msg: Msg) -> None:
        try:
            query = msgspec.msgpack.decode(msg.data, type=lcp.Query)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            answer = lcp.Answer(error=f"bad query: {exc}")
        else:
            try:
                answer = await self._answer(query)
            except NOT_STORED as exc:  # the database down: the gateway says to retry
                log.warning("a query not answered", extra={"error": repr(exc)})
                answer = lcp.Answer(error="the indexer cannot read its database", unavailable=True)
            except Exception:  # a bug: said, and the gateway told
                log.exception("a query failed", extra={"query": type(query).__name__})
                answer = lcp.Answer(
                    error="the indexer failed to answer (it is logged)", unavailable=True
                )
        await msg.respond(msgspec.msgpack.encode(answer))

    async def _answer(self, query: lcp.Query) -> lcp.Answer:
        ck, pin = self.ck, self.pin
        assert ck is not None and pin is not None
        last = ck.index.last
        if isinstance(query, lcp.DescriptorQuery):
            if not self.first:
                return lcp.Answer(error="the guild has signed no checkpoint yet")
            assert self.members is not None
            descriptor = pf.Descriptor(pin, self.first).encode().encode()
            return lcp.Answer([descriptor, msgspec.msgpack.encode(self.members)])
        if isinstance(query, lcp.Handovers):
            handovers = [h for h in ck.pin.handovers if h.checkpoint.height >= query.start]
            return lcp.Answer([h.encode() for h in handovers[:MAX_RANGE]])
        if isinstance(query, lcp.Checkpoints):
            if query.start < 0:
                if last is None:
                    return lcp.Answer(error="the guild has signed no checkpoint yet")
                entries = [c.entry for c in last.covered.values()]
                return lcp.Answer([Announced(last.checkpoint, entries).encode()])
            return lcp.Answer(
                await self.store.checkpoints(query.start, max(1, min(query.count, MAX_RANGE)))
            )
        if isinstance(query, lcp.TxProofQuery):
            held = await self.store.holding(query.txid, pf.MAX_PROOF_CHECKPOINTS)
            proof = lc.tx_proof(held, query.txid)
            if proof is None:
                return lcp.Answer(error="no checkpoint covers this transaction (yet)")
            return lcp.Answer([pf.encode_tx_proof(proof)])
        if isinstance(query, lcp.PushQuery):
            return await self._pushes(query)
        if isinstance(query, lcp.CoinsQuery):
            limit = max(1, min(query.limit, MAX_HISTORY))
            owned = await self.store.lc_coins(query.owner, query.after, limit)
            return lcp.Answer([msgspec.msgpack.encode(o) for o in owned])
        if isinstance(query, lcp.HistoryQuery):
            limit = max(1, min(query.limit, MAX_HISTORY))
            before = (query.before, query.before_txid)
            found = await self.store.lc_history(query.owner, before, limit)
            return lcp.Answer([msgspec.msgpack.encode(t) for t in found])
        if last is None:
            return lcp.Answer(error="the guild has signed no checkpoint yet")
        if not 0 <= query.owner < len(self.s.layout.members) or len(query.coin_id) != 32:
            return lcp.Answer(error="no such ledger in the guild, or not a coin id")
        shard = (query.owner, self.s.layout.pmap.owners()[partition_of(query.coin_id)])
        if shard not in last.covered:  # a member that joined after the last checkpoint
            return lcp.Answer(error="no checkpoint covers this ledger yet")
        return lcp.Answer([pf.encode_coin_proof(lc.coin_proof(last, shard, query.coin_id))])

    async def _pushes(self, query: lcp.PushQuery) -> lcp.Answer:
        touched = self.recent.touched.get(query.height)
        if touched is None:
            return lcp.Answer(error=f"checkpoint {query.height} is not among the last taken here")
        if len(query.keys) > MAX_KEYS:
            return lcp.Answer(error=f"at most {MAX_KEYS} keys")
        items: list[bytes] = []
        size = 0
        for n, (kind, key) in enumerate(query.keys):
            txids = touched.get((kind, key), [])
            for i in range(query.skip if n == 0 else 0, len(txids)):
                if size > MAX_ANSWER:
                    return lcp.Answer(items, more=n, skip=i)
                txid = txids[i]
                proof = self.recent.proof(txid, query.height) or lc.tx_proof(
                    await self.store.holding(txid, pf.MAX_PROOF_CHECKPOINTS), txid
                )
                if proof is None:  # a bug: said, and the rest answered
                    log.error("a touched transaction has no proof", extra={"txid": txid.hex()})
                    continue
                pushed = lcp.Pushed(kind, key, txid, pf.encode_tx_proof(proof))
                items.append(msgspec.msgpack.encode(pushed))
                size += len(items[-1])
        return lcp.Answer(items)
