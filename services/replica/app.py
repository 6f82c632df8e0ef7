"""A machine of an operator: the copies of the guild's shards its operator's placement
puts on it (``constellation.replication.placement``: with two machines, one of every
shard), followed as it changes (copies released to, and fetched from, the operator's
other machines: ``moves.py``), their ticks, the replication traffic to and from the other
copies (``transport.py``), and its part of the relay to shards led at other operators
(``relay.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from constellation.errors import ConstellationError, MessageError
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication import members as mb
from constellation.replication.placement import COPIES, Placement
from constellation.replication.replica import Settings as ReplicaSettings
from services.bus import (
    MEMBERS_KEY,
    PLACEMENT_KEY,
    SeenCopy,
    Stale,
    ensure_placement,
    events_subject,
    load_agreement,
    load_placement,
    put_subject,
    report_members,
    update_placement,
)
from services.partition.app import EVENTS_LINGER_S, EVENTS_MAX_BYTES
from services.replica.config import Settings
from services.replica.host import HostedCopy
from services.replica.metrics import MachineMetrics
from services.replica.moves import (
    NotYet,
    clear_drops,
    drop,
    folder_name,
    is_released,
    move_subject,
    record,
    recorded,
    release,
)
from services.replica.moves import fetch as fetch_folder
from services.replica.moves import serve as serve_folder
from services.replica.relay import Relay, Unasked, leaders_subject
from services.replica.transport import (
    ALL,
    Opener,
    Sealer,
    copy_target,
    forward_listen,
    forward_subject,
    listen_subject,
    subject,
)
from services.runtime import (
    ConfigError,
    OpsServer,
    close_nats,
    connect_nats,
    connect_peer,
    now_ms,
)

TICK_S = 0.02
# The operator's placement and its agreement on members are read again at once when
# either is put (a notice on the put's subject), else every PLACEMENT_POLL_S while a
# move or a change of members is under way, and every PLACEMENT_IDLE_S otherwise (a
# notice lost while NATS reconnected). Polling every 0.2 s alone kept an idle guild's
# machines and NATS servers busy: 0.15 of a core of 0.6 on this 2-core machine.
PLACEMENT_POLL_S = 0.2
PLACEMENT_IDLE_S = 2.0
HAND_OVER_S = 0.1
PEER_PING_S = 2
OUTBOX = 100_000  # messages waiting for one NATS client, at most: beyond, the oldest go

log = logging.getLogger("replica")


@dataclass
class Outbox:
    queue: deque[tuple[str, bytes]] = field(default_factory=lambda: deque(maxlen=OUTBOX))
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Machine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.copies: list[HostedCopy] = []
        self.metrics = MachineMetrics(lambda: self.copies)
        self.ops = OpsServer(self.metrics.registry, self.ready)
        self.ops.app.router.add_get("/v1/copies", self._describe)
        self.nc: Client | None = None
        self.relay: Relay | None = None
        self.peers: dict[int, Client] = {}
        s = settings
        names = [m.name for m in s.layout.members]
        self.sealer = Sealer(s.layout.guild, s.key, s.layout.keys)
        self.opener = Opener(s.layout.guild, names, s.layout.keys, s.operator)
        # Per receiving operator, what waits for its NATS client: each is sent by its own
        # task, so that an unreachable peer holds up nobody else's messages.
        self._out = [Outbox() for _ in s.layout.members]
        self._events: dict[str, list[bytes]] = defaultdict(list)
        self._events_wake = asyncio.Event()
        self._subs: dict[str, list[Subscription]] = {}  # a copy's subscriptions, by its name
        self.revision = 0  # of the placement last read
        self.followed = 0  # the version of the placement last recorded
        # Every step of the changes of members the operator agreed to (none: founders).
        self.agreement = mb.Agreement([s.layout.founding])
        self.reported: list[SeenCopy] | None = None  # the copies' members, as last reported
        self._put = asyncio.Event()  # the placement or the agreement was put since read
        self._started = False
        self.failing: dict[str, str] = {}  # copies whose last tick raised: why, by name

    def ready(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "not connected to NATS"
        if not self._started:
            return False, "starting"
        if self.failing:
            why = "; ".join(f"{name}: {exc}" for name, exc in self.failing.items())
            return False, f"ticks failing: {why}"
        now = time.monotonic()
        behind = [c.name for c in self.copies if not c.caught_up(now)]
        if behind:
            return False, f"no live leader known for {', '.join(behind)}"
        gaps = [f"{c.name} up to {c.gap}" for c in self.copies if c.gap is not None]
        if gaps:
            return False, f"events missing (filling from the twin): {', '.join(gaps)}"
        leading = sum(1 for c in self.copies if c.serving)
        return True, f"{len(self.copies)} copies, leading {leading}"

    async def _describe(self, _: web.Request) -> web.Response:
        """Each copy's place in its shard: what ``devnet status`` and tests compare."""
        return web.json_response([c.describe() for c in self.copies])

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        await self.ops.start(s.http_host, s.http_port)
        nc = self.nc = await connect_nats(
            s.nats_url, f"replica-{s.name}-{s.machine}", pending_size=64 << 20
        )
        relay = self.relay = Relay(s.layout, s.operator, s.machine, nc, self._forward)
        self.replication = ReplicaSettings(
            heartbeat_s=s.heartbeat_ms / 1000,
            election_s=s.election_ms / 1000,
            authenticated=True,  # every message is sealed (or from our own machine)
            snapshot_every=s.snapshot_every,
            keep=s.keep,
        )
        clear_drops(s.state_dir)
        known = recorded(s.state_dir)
        first = known or Placement.initial(s.layout.workers, s.layout.members[s.operator].machines)
        placement, self.revision = await ensure_placement(nc, s.name, first)
        if known is not None and placement.version < known.version:
            raise ConfigError(
                f"the placement in NATS KV (v{placement.version}) is older than the one this "
                f"machine followed (v{known.version}): the KV was lost or rolled back"
            )
        started = time.monotonic()
        await self._follow_agreement()
        await self._follow_placement(placement)
        gc.freeze()
        log.info(
            "recovered",
            extra={
                "placement": placement.version,
                "copies": [[c.name, c.me, c.replica.last] for c in self.copies],
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        tasks = self.ops.tasks
        for to in (str(s.machine), ALL):
            await nc.subscribe(
                forward_listen(to), cb=self._take_forward, pending_msgs_limit=1_000_000
            )
        await nc.subscribe(move_subject(s.name, s.machine), cb=self._serve_folder)
        await nc.subscribe(leaders_subject(s.name), cb=self._hear_leaders)
        for key in (PLACEMENT_KEY, MEMBERS_KEY):
            await nc.subscribe(put_subject(s.name, key), cb=self._on_put)
        tasks.start("placement", self._placement)
        tasks.start("relay", relay.follow)
        for peer, member in enumerate(s.layout.members):
            if peer != s.operator:
                tasks.start(f"peer-{member.name}", functools.partial(self._connect_peer, peer))
        await nc.flush()
        tasks.start("send", functools.partial(self._pump, s.operator, nc))
        tasks.start("events", self._publish_events_task)
        tasks.start("tick", self._tick)
        self._started = True
        log.info(
            "machine ready",
            extra={"operator": s.name, "machine": s.machine, "http_port": self.ops.port},
        )
        await stop.wait()
        await self._drain()

    # -- the copies this machine runs, as its operator's placement says -----------------

    def _folder(self, owner: int, worker: int, me: int) -> Path:
        return self.settings.state_dir / folder_name(
            self.settings.layout.members[owner].name, worker, me
        )

    def _slot_copies(self, placement: Placement, slot: int) -> list[tuple[int, int, int]]:
        """(owner, worker, copy) of every shard's copy in ``slot``."""
        s = self.settings
        k, worker = divmod(slot, placement.workers)
        return [(owner, worker, COPIES * s.operator + k) for owner in range(len(s.layout.members))]

    async def _host(self, owner: int, worker: int, me: int) -> None:
        """Open a copy from its folder and run it here."""
        assert self.nc is not None and self.relay is not None
        s = self.settings
        copy = HostedCopy(
            layout=s.layout,
            owner=owner,
            worker=worker,
            me=me,
            key=s.key,
            folder=self._folder(owner, worker, me),
            replication=self.replication,
            prepare_timeout_ms=s.prepare_timeout_ms,
            nc=self.nc,
            publisher=self.relay,
            deliver=self._deliver,
            publish_events=self._publish_events,
            members=self.agreement.steps(),
            observe_round=self.metrics.round_seconds.observe,
        )
        self.copies.append(copy)
        self.relay.add(copy)
        nc = self.nc
        self._subs[copy.name] = [
            await nc.subscribe(
                listen_subject(owner, worker, me),
                cb=self._receiver(copy),
                pending_msgs_limit=1_000_000,
            ),
            await nc.subscribe(copy.own_subject, cb=copy.on_twin_query),
            await nc.subscribe(
                forward_listen(copy_target(owner, worker, me)),
                cb=self._take_forward,
                pending_msgs_limit=1_000_000,
            ),
        ]
        tasks = self.ops.tasks
        tasks.start(f"packages-{copy.name}", copy.packer.run)
        tasks.start(f"serve-{copy.name}", copy.serve)
        tasks.start(f"backfill-{copy.name}", copy.backfill)

    async def _unhost(self, copy: HostedCopy) -> None:
        assert self.relay is not None
        await self.ops.tasks.stop(
            f"packages-{copy.name}", f"serve-{copy.name}", f"backfill-{copy.name}"
        )
        for sub in [*self._subs.pop(copy.name), *copy.subs.values()]:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
        await self.relay.remove(copy)
        self.copies.remove(copy)
        copy.close()

    async def _release(self, copies: list[HostedCopy]) -> None:
        """Stop copies that move to another machine: a leader hands its leadership over
        first, and what reached it meanwhile to its successor once that one serves
        (waiting two election timeouts at most); then each stops."""
        for copy in copies:
            copy.resign()
        leaders = any(c.handing is not None for c in copies)
        deadline = time.monotonic() + 2 * self.replication.election_s
        while time.monotonic() < deadline and not all(
            c.handing is None or c.successor_serving() for c in copies
        ):
            await asyncio.sleep(TICK_S)
        if leaders:
            await asyncio.sleep(HAND_OVER_S)  # the successor subscribes once it serves
        for copy in copies:
            await copy.hand_over()
            await self._unhost(copy)

    async def _follow_placement(self, placement: Placement, fetch: bool = False) -> None:
        """Make what runs here what ``placement`` says: release what moves away, run what
        stays, fetch (where ``fetch``) and run what moves here, drop what runs elsewhere."""
        s = self.settings
        me = s.machine
        running = {(c.owner, c.worker, c.me): c for c in self.copies}
        for slot in placement.outgoing(me):
            shards = self._slot_copies(placement, slot)
            leaving = [running[x] for x in shards if x in running]
            if leaving:
                await self._release(leaving)
                log.info("copies released", extra={"slot": slot, "to": placement.spots[slot].to})
            for x in shards:
                release(self._folder(*x))
        for slot in placement.runs(me):
            for x in self._slot_copies(placement, slot):
                if x not in running:
                    if is_released(self._folder(*x)):  # never: a move does not go back
                        raise RuntimeError(f"{self._folder(*x)} was released, yet placed here")
                    await self._host(*x)
        for slot in placement.incoming(me):
            await self._arrive(placement, slot, fetch)
        for slot, spot in enumerate(placement.spots):
            if me not in (spot.machine, spot.to):
                for x in self._slot_copies(placement, slot):
                    folder = self._folder(*x)
                    if is_released(folder):
                        drop(folder)
                        log.info("folder dropped", extra={"folder": folder.name})

    async def _arrive(self, placement: Placement, slot: int, fetch: bool) -> None:
        """Run a slot that moves here, fetching its folders first; then say it arrived."""
        assert self.nc is not None
        s = self.settings
        shards = self._slot_copies(placement, slot)
        running = {(c.owner, c.worker, c.me) for c in self.copies}
        source = move_subject(s.name, placement.spots[slot].machine)
        for x in shards:
            folder = self._folder(*x)
            if x in running or (folder.is_dir() and not is_released(folder)):
                continue  # fetched already
            if not fetch:
                return
            try:
                size = await fetch_folder(self.nc, source, folder)
            except NotYet as exc:
                log.debug("not fetched yet", extra={"folder": folder.name, "why": str(exc)})
                return
            self.metrics.moved_bytes.inc(size)
            log.info("folder fetched", extra={"folder": folder.name, "bytes": size})
        for x in shards:
            if x not in running:
                await self._host(*x)
        while placement.spots[slot].to == s.machine:
            arrived = placement.arrive(slot, s.machine)
            try:
                self.revision = await update_placement(self.nc, s.name, arrived, self.revision)
                log.info("slot arrived", extra={"slot": slot, "placement": arrived.version})
                return
            except Stale:
                found = await load_placement(self.nc, s.name)
                assert found is not None
                placement, self.revision = found

    async def _follow_agreement(self) -> None:
        """Take the changes of members the operator agreed to since last read. One this
        machine cannot take (it went back, or names an operator the layout lacks) stops
        the task, not ready and saying why, until the agreement is mended."""
        assert self.nc is not None
        s = self.settings
        found = await load_agreement(self.nc, s.name)
        if found is None or found == self.agreement:
            return
        if not found.extends(self.agreement):
            raise ConfigError(
                f"the agreement on members in NATS KV ({found}) does not extend the "
                f"one this machine follows ({self.agreement}): the KV was rolled back"
            )
        steps = found.steps()
        named = max(op for m in steps for op in m.operators())
        if named >= len(s.layout.members):
            raise ConfigError(f"the agreement on members names operator {named}: not in the layout")
        for copy in self.copies:
            copy.agree(steps)
        self.agreement = found
        log.info("members agreed", extra={"voters": found.voters})

    async def _report_members(self) -> None:
        """Report the copies' members where they changed (``bus.report_members``)."""
        assert self.nc is not None
        seen = [
            SeenCopy(
                c.name,
                c.replica.members.voters,
                c.replica.members.old,
                c.replica.members.learners,
                c.replica.changed_at <= c.replica.confirmed,
            )
            for c in sorted(self.copies, key=lambda c: c.name)
        ]
        if seen != self.reported:
            await report_members(self.nc, self.settings.name, self.settings.machine, seen)
            self.reported = seen

    async def _placement(self) -> None:
        """Follow the operator's placement and its agreement on members (a long-running
        task). Its NATS server down or restarting is waited out (said, not a failure of
        the task): the next turn reads both again and goes on from there."""
        while True:
            self._put.clear()  # a put from here on is read by the next turn
            settled = False
            try:
                settled = await self._follow()
            except NatsError as exc:
                log.warning("placement waits for NATS", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                wait = PLACEMENT_IDLE_S if settled else PLACEMENT_POLL_S
                await asyncio.wait_for(self._put.wait(), wait)

    async def _on_put(self, _: Msg) -> None:
        self._put.set()

    async def _follow(self) -> bool:
        """One turn of ``_placement``; whether all is settled (no copy moving, no change
        of members under way), so that the next turn may wait for a put."""
        assert self.nc is not None
        await self._follow_agreement()
        settled = all(c.members_settled() for c in self.copies)  # as reported next
        await self._report_members()
        found = await load_placement(self.nc, self.settings.name)
        if found is not None and found[0].version < self.followed:
            # The KV was lost or rolled back: following it could open a copy that moved
            # away (its folder dropped) afresh here, a second instance with no vote
            # remembered. The copies stay as they are; a restart refuses to start.
            log.error(
                "the placement in NATS KV is older than the one followed: not followed",
                extra={"kv": found[0].version, "followed": self.followed},
            )
            return False
        if found is not None:
            placement, self.revision = found
            if placement.version > self.followed:
                record(self.settings.state_dir, placement)
                self.followed = placement.version
                self.metrics.placement.set(placement.version)
            await self._follow_placement(placement, fetch=True)
            settled = settled and not any(spot.moving for spot in placement.spots)
        return settled

    async def _serve_folder(self, msg: Msg) -> None:
        await msg.respond(serve_folder(self.settings.state_dir, msg.data))

    async def _drain(self) -> None:
        log.info("stopping", extra={"leading": [c.name for c in self.copies if c.serving]})
        await self.ops.tasks.stop()
        for client in [self.nc, *self.peers.values()]:
            if client is not None:
                await close_nats(client)
        for copy in self.copies:
            copy.close()
        await self.ops.stop()

    async def _connect_peer(self, peer: int) -> None:
        """Connect to a peer's NATS with the credentials it issued us, retrying until
        it answers; the client reconnects by itself afterwards."""
        s = self.settings
        member = s.layout.members[peer]
        client = await connect_peer(
            s.peers[member.name],
            f"replica-{s.name}-{s.machine}",
            member.name,
            pending_size=8 << 20,
            ping_interval=PEER_PING_S,  # a peer gone silent is noticed in seconds
            max_outstanding_pings=3,
        )
        self.peers[peer] = client
        await self._pump(peer, client)

    # -- the traffic -------------------------------------------------------------------

    def _deliver(self, dests: Sequence[int], envelope: rp.Envelope) -> None:
        """Seal ``envelope`` once (for every member where it goes to several operators)
        and queue it for each copy."""
        s = self.settings
        me = s.layout.members[s.operator].name
        ops = {d // 2 for d in dests}
        others = ops - {s.operator}
        now = now_ms()
        shared = self.sealer.seal_all(envelope, now) if len(others) > 1 else None
        sealed: dict[int, bytes] = {}
        for dest in dests:
            op = dest // 2
            client = self.nc if op == s.operator else self.peers.get(op)
            if client is None or not client.is_connected:
                self.metrics.undelivered.labels(s.layout.members[op].name).inc()
                continue
            data = sealed.get(op)
            if data is None:
                own = op == s.operator
                data = sealed[op] = (
                    shared if shared and not own else self.sealer.seal(op, envelope, now)
                )
            out = self._out[op]
            if len(out.queue) == OUTBOX:
                self.metrics.undelivered.labels(s.layout.members[op].name).inc()
            out.queue.append((subject(me, envelope.owner, envelope.worker, dest), data))
            out.wake.set()

    async def _pump(self, op: int, client: Client) -> None:
        """Hand what waits for operator ``op`` to its client, for as long as we run."""
        out = self._out[op]
        while True:
            await out.wake.wait()
            out.wake.clear()
            while out.queue:
                subj, data = out.queue.popleft()
                try:
                    await client.publish(subj, data)
                except (NatsError, OSError) as exc:  # lost like any: the protocol resends
                    # (OSError: a full buffer flushed as the server's connection dies)
                    log.debug("not sent", extra={"to": subj, "error": str(exc)})

    def _forward(self, operator: int, to: str, body: bytes) -> None:
        """Queue a relayed message for ``to`` at ``operator`` (``relay.py``), sealed."""
        s = self.settings
        peer = s.layout.members[operator].name
        client = self.peers.get(operator)
        out = self._out[operator]
        if client is None or not client.is_connected or len(out.queue) >= OUTBOX:
            self.metrics.undelivered.labels(peer).inc()
            return
        self.metrics.relayed.labels("out").inc()
        data = self.sealer.seal_body(operator, body, now_ms())
        me = s.layout.members[s.operator].name
        out.queue.append((forward_subject(me, to), data))
        out.wake.set()

    async def _take_forward(self, msg: Msg) -> None:
        assert self.relay is not None
        try:
            sender, body = self.opener.open_forward(msg.subject, msg.data, now_ms())
            await self.relay.receive(sender, body)
        except ConstellationError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            # an answer for the operator's other machine is no news (answers go to both)
            level = logging.DEBUG if isinstance(exc, Unasked) else logging.INFO
            extra = {"subject": msg.subject, "reason": str(exc)}
            log.log(level, "relayed message refused", extra=extra)
            return
        self.metrics.relayed.labels("in").inc()

    async def _hear_leaders(self, msg: Msg) -> None:
        """What another machine of this operator tells of its copies' leaders."""
        assert self.relay is not None
        try:
            self.relay.hear(msg.data, time.monotonic())
        except MessageError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            log.warning("a machine's leaders refused", extra={"reason": str(exc)})

    def _receiver(self, copy: HostedCopy) -> Callable[[Msg], Awaitable[None]]:
        async def receive(msg: Msg) -> None:
            try:
                envelope = self.opener.open(msg.subject, msg.data, now_ms())
            except ConstellationError as exc:
                self.metrics.rejected.labels(exc.code).inc()
                log.info("message refused", extra={"subject": msg.subject, "reason": str(exc)})
                return
            copy.step(envelope.sender, envelope.msg)

        return receive

    async def _tick(self) -> None:
        """Every copy's tick. One that fails (a bug) is said once, with its traceback,
        and keeps the machine from being ready while it fails; the others tick on."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for copy in self.copies:
                try:
                    copy.tick(now)
                except Exception as exc:
                    self.metrics.tick_failures.labels(copy.name).inc()
                    if copy.name not in self.failing:
                        log.exception("a copy's tick failed", extra={"shard": copy.name})
                    self.failing[copy.name] = f"{type(exc).__name__}: {exc}"
                else:
                    self.failing.pop(copy.name, None)

    # -- events of confirmed blocks, to the owner's readers ---------------------------

    def _publish_events(self, owner: str, payload: bytes) -> None:
        self._events[owner].append(payload)
        self._events_wake.set()

    async def _publish_events_task(self) -> None:
        """What gathered in ``EVENTS_LINGER_S`` goes out as few messages: readers wake
        per message. Nothing is retried: what a reader misses, it asks for."""
        assert self.nc is not None
        while True:
            await self._events_wake.wait()
            await asyncio.sleep(EVENTS_LINGER_S)
            self._events_wake.clear()
            pending, self._events = self._events, defaultdict(list)
            for owner, blocks in pending.items():
                while blocks:
                    batch: list[bytes] = []
                    size = 0
                    while blocks and (not batch or size + len(blocks[0]) <= EVENTS_MAX_BYTES):
                        size += len(blocks[0])
                        batch.append(blocks.pop(0))
                    try:
                        await self.nc.publish(events_subject(owner), proto.encode_events(batch))
                    except NatsError as exc:
                        log.warning("events not published", extra={"error": str(exc)})
