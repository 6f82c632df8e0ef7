"""What the services share on NATS: subjects, the partition map, placement and
agreement on members in NATS KV (with what machines report of them), and
packages (items batched per destination, closed by size or deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from constellation.codec import decode_json
from constellation.ledger.pmap import PartitionMap, decode_map
from constellation.membership import KeyPlan, KeysSeen, decode_plan, decode_seen
from constellation.protocol.ledger import (
    MAX_PACKAGE_BYTES,
    PROTOCOL_VERSION,
    Item,
    Package,
    encode,
    size_of,
)
from constellation.replication.members import Agreement, decode_agreement
from constellation.replication.placement import Placement, decode_placement
from services.runtime import env_int


@dataclass(frozen=True)
class Batching:
    """How packages and blocks close: at ``max_items`` or ``deadline_us`` after the first
    item, whichever comes first; a deadline of 0 closes at the end of the event loop's
    current turn (when everything that had already arrived has been handled)."""

    max_items: int
    deadline_us: int

    @staticmethod
    def from_env(env: Mapping[str, str], prefix: str, max_items: int, deadline_us: int) -> Batching:
        return Batching(
            env_int(env, f"{prefix}_MAX", max_items, 1, 1_000_000),
            env_int(env, f"{prefix}_DEADLINE_US", deadline_us, 0, 1_000_000),
        )


MAP_KEY = "partition-map"
PLACEMENT_KEY = "placement"
MEMBERS_KEY = "members"
KEY_PLAN_KEY = "guild-key"
LAZY_S = 0.05  # how long an item nobody waits for may wait for a package that goes anyway
GATEWAY = -1  # the sender id of a gateway

log = logging.getLogger("partition.transport")


def worker_subject(operator: str, worker: int) -> str:
    return f"cst.{operator}.w.{worker}"


def query_subject(operator: str, worker: int, what: str) -> str:
    return f"cst.{operator}.q.{worker}.{what}"


def copy_events_subject(owner: str, worker: int, copy: int) -> str:
    """Where copy ``copy`` of shard (``owner``, ``worker``) serves its events log, on the
    NATS of the operator hosting it (to its twin, and to that operator's indexer)."""
    return f"cst.{owner}.qe.{worker}.{copy}"


def lc_subject(operator: str) -> str:
    """Where an operator's indexer answers its gateway about checkpoints and proofs."""
    return f"cst.{operator}.lc"


def lc_taken_subject(operator: str) -> str:
    """Where an operator's indexer tells its gateways of each signed checkpoint it stored
    (``Announced``): what they push to light clients."""
    return f"cst.{operator}.lc.taken"


def events_subject(operator: str) -> str:
    return f"cst.{operator}.events"


def map_bucket(operator: str) -> str:
    return f"cst-{operator}"


def put_subject(operator: str, key: str) -> str:
    """The subject a put of ``key`` in the operator's bucket goes out on: a plain
    subscriber to it hears of each put (a notice to read it again, not the read)."""
    return f"$KV.{map_bucket(operator)}.{key}"


async def load_map(nc: Client, operator: str) -> PartitionMap | None:
    """The current partition map, or None where none was published yet."""
    try:
        kv = await nc.jetstream().key_value(map_bucket(operator))
        entry = await kv.get(MAP_KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    assert entry.value is not None
    return decode_map(entry.value)


async def await_map(nc: Client, operator: str, wait_s: float = 30.0) -> PartitionMap:
    """The current partition map, waiting up to ``wait_s`` for one to be published."""
    deadline = time.monotonic() + wait_s
    while (pmap := await load_map(nc, operator)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("no partition map was published in NATS KV")
        await asyncio.sleep(0.2)
    return pmap


async def drop_legacy_events_stream(nc: Client, operator: str) -> None:
    """Readers once consumed the events from a JetStream stream, which kept every
    message; they follow the workers' events logs now, and the stream goes."""
    with contextlib.suppress(NotFoundError):
        await nc.jetstream().delete_stream(f"cst-{operator}-events")


async def publish_map(nc: Client, operator: str, pmap: PartitionMap) -> None:
    """Publish ``pmap``, refusing to go back to an older or equal version that differs."""
    current = await load_map(nc, operator)
    if current is not None and current.version >= pmap.version and current != pmap:
        raise ValueError(f"the partition map is at v{current.version}; publish a newer one")
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=map_bucket(operator), history=16)
    await kv.put(MAP_KEY, pmap.encode())


class Stale(Exception):
    """The placement changed since it was read: read it again."""


async def load_placement(nc: Client, operator: str) -> tuple[Placement, int] | None:
    """The operator's placement of its copies and its KV revision, or None where none
    was published yet."""
    try:
        kv = await nc.jetstream().key_value(map_bucket(operator))
        entry = await kv.get(PLACEMENT_KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    assert entry.value is not None and entry.revision is not None
    return decode_placement(entry.value), entry.revision


async def ensure_placement(nc: Client, operator: str, first: Placement) -> tuple[Placement, int]:
    """The operator's placement, publishing ``first`` where there is none yet (every
    machine of the operator computes the same first one, and one of them writes it)."""
    while (found := await load_placement(nc, operator)) is None:
        kv = await nc.jetstream().create_key_value(bucket=map_bucket(operator), history=16)
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(PLACEMENT_KEY, first.encode())
    return found


async def update_placement(nc: Client, operator: str, new: Placement, revision: int) -> int:
    """Write ``new`` over the placement read at ``revision``; its new revision. Raises
    ``Stale`` where another wrote since (read again and redo)."""
    kv = await nc.jetstream().key_value(map_bucket(operator))
    try:
        return await kv.update(PLACEMENT_KEY, new.encode(), last=revision)
    except KeyWrongLastSequenceError:
        raise Stale(f"placement revision {revision} is no longer the last") from None


class Publisher(Protocol):
    """Where packages go: a NATS client, or what relays them (``services/replica/relay.py``)."""

    async def publish(self, subject: str, payload: bytes) -> None: ...


class Packer:
    """Batches items per destination subject into packages (by count, bytes or
    deadline: ``MAX_PACKAGE_BYTES`` keeps one within a NATS message).

    Closed packages queue for one publishing task (``run``, which its owner starts as a
    supervised task), which hands them to the NATS client in order; the client writes
    what gathered in one loop turn with one system call.
    """

    def __init__(
        self,
        nc: Publisher,
        sender: int,
        reply: str,
        map_version: Callable[[], int],
        batching: Batching,
        observe: Callable[[int], None],
    ) -> None:
        self.nc = nc
        self.sender = sender
        self.reply = reply
        self.map_version = map_version
        self.batching = batching
        self.observe = observe
        self._out: dict[str, list[Item]] = {}
        self._bytes: dict[str, int] = {}  # about the encoded size of each open package
        self._lazy: set[str] = set()  # subjects whose open package holds only lazy items
        self._closed: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def depth(self) -> int:
        return sum(len(items) for items in self._out.values()) + len(self._closed)

    def send(self, subject: str, item: Item, lazy: bool = False) -> None:
        """Queue ``item`` for ``subject``. A ``lazy`` item (one nobody waits for) opens no
        package of its own: it rides with the next one to that subject, or goes
        ``LAZY_S`` later."""
        items = self._out.get(subject)
        if items is None or (not lazy and subject in self._lazy):
            loop = asyncio.get_running_loop()
            if items is None:
                items = self._out[subject] = []
            if lazy:
                self._lazy.add(subject)
                loop.call_later(LAZY_S, self._close, subject, items)
            else:
                self._lazy.discard(subject)  # its lazy items go with this package
                if self.batching.deadline_us:
                    loop.call_later(self.batching.deadline_us / 1e6, self._close, subject, items)
                else:
                    loop.call_soon(self._close, subject, items)
        items.append(item)
        size = self._bytes[subject] = self._bytes.get(subject, 0) + size_of(item)
        if len(items) >= self.batching.max_items or size >= MAX_PACKAGE_BYTES:
            self._close(subject, items)

    def _close(self, subject: str, items: list[Item]) -> None:
        if self._out.get(subject) is not items:
            return  # closed already (by size, or a lazy package by a timely one)
        del self._out[subject]
        del self._bytes[subject]
        self._lazy.discard(subject)
        self.observe(len(items))
        package = Package(PROTOCOL_VERSION, self.sender, self.reply, self.map_version(), items)
        self._closed.append((subject, encode(package)))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """Hand the closed packages to the client, in order, until cancelled."""
        closed = self._closed
        while True:
            while closed:
                subject, data = closed[0]
                try:
                    await self.nc.publish(subject, data)
                except NatsError as exc:
                    # Lost like a package lost in transit: the sender's timeout covers it.
                    log.warning("package not sent", extra={"to": subject, "error": str(exc)})
                closed.popleft()
            self._idle.set()
            await self._wake.wait()
            self._wake.clear()

    async def drain(self) -> None:
        """Close every open package and wait until ``run`` has handed all to the client."""
        for subject, items in list(self._out.items()):
            self._close(subject, items)
        await self._idle.wait()


async def _load(nc: Client, operator: str, key: str) -> bytes | None:
    try:
        kv = await nc.jetstream().key_value(map_bucket(operator))
        entry = await kv.get(key)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    return entry.value


async def load_agreement(nc: Client, operator: str) -> Agreement | None:
    """The changes of members the operator agreed to, or None where it agreed to none
    (its guild's founders vote)."""
    data = await _load(nc, operator, MEMBERS_KEY)
    return None if data is None else decode_agreement(data)


async def publish_agreement(nc: Client, operator: str, agreement: Agreement) -> None:
    """Agree to ``agreement``: it must extend what was agreed before (a change of
    members is never taken back once agreed: copies may have taken its steps)."""
    before = await load_agreement(nc, operator)
    if before is not None and not agreement.extends(before):
        raise ValueError(f"the agreement {before} is not extended by {agreement}")
    kv = await nc.jetstream().create_key_value(bucket=map_bucket(operator), history=16)
    await kv.put(MEMBERS_KEY, agreement.encode())


async def load_key_plan(nc: Client, operator: str) -> KeyPlan | None:
    """The guild key the operator agreed its guild re-makes, if any
    (``constellation.membership.KeyPlan``)."""
    data = await _load(nc, operator, KEY_PLAN_KEY)
    return None if data is None else decode_plan(data)


async def publish_key_plan(nc: Client, operator: str, plan: KeyPlan) -> None:
    kv = await nc.jetstream().create_key_value(bucket=map_bucket(operator), history=16)
    await kv.put(KEY_PLAN_KEY, plan.encode())


async def load_keys_seen(nc: Client, operator: str) -> KeysSeen | None:
    """What the operator's services last reported of its key plan."""
    data = await _load(nc, operator, f"{KEY_PLAN_KEY}-seen")
    return None if data is None else decode_seen(data)


async def report_keys(nc: Client, operator: str, seen: KeysSeen) -> None:
    kv = await nc.jetstream().key_value(map_bucket(operator))
    await kv.put(f"{KEY_PLAN_KEY}-seen", seen.encode())


class SeenCopy(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A copy's shard members, as its machine reports them."""

    shard: str  # "owner/worker"
    voters: list[int]
    old: list[int]
    learners: list[int]
    confirmed: bool  # the block that made them is confirmed


def _seen_key(machine: int) -> str:
    return f"{MEMBERS_KEY}-seen-{machine}"


async def report_members(nc: Client, operator: str, machine: int, seen: list[SeenCopy]) -> None:
    """What a machine's copies say of their shards' members (for its operator's
    operator, which follows a change of members by them)."""
    kv = await nc.jetstream().key_value(map_bucket(operator))
    await kv.put(_seen_key(machine), msgspec.json.encode(seen))


async def load_members_seen(nc: Client, operator: str, machines: int) -> list[SeenCopy]:
    """What machines ``0 .. machines - 1`` of the operator reported last."""
    kv = await nc.jetstream().key_value(map_bucket(operator))
    found: list[SeenCopy] = []
    for machine in range(machines):
        try:
            entry = await kv.get(_seen_key(machine))
        except KeyNotFoundError:
            continue
        assert entry.value is not None
        found += decode_json(entry.value, list[SeenCopy], "members seen")
    return found
