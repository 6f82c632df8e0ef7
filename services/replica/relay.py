"""Packages and queries for shards whose leader is at another operator.

Gateways and workers reach a shard on their own operator's NATS: packages on
``cst.<owner>.w.<w>``, queries on ``cst.<owner>.q.<w>.<what>``. A shard led at this
operator is served there by its leader (``HostedCopy.serve``). A shard led elsewhere
(another operator's shard, or this operator's own while its copies here are down or it
is excluded) is served by the relay: this operator's machines that hold a copy of the
shard take its subjects (in one queue group, so that one machine takes each message;
what a leader here sends to a shard no machine of its own holds goes out on the
operator's NATS, for the machines that do) and send what comes to the
machine of the leader, sealed like a replication message (``transport.py``). So a
user whose operator is down pays through any other member's gateway, and a member's
gateway serves every ledger of the guild.

A leading copy's own packages to another shard go out through ``Relay.publish``: to a
leader at another operator they go straight to its machine, so two-phase commit between
shards led at different operators crosses one operator boundary per message.

Answers go back where the request came from. The leader's machine rewrites a relayed
client request's reply subject to ``cst.relay.<operator>.<reply>``: what the engine
answers there returns, sealed once, to every machine of that operator (a resend may
come through either: the engine's memory of a refusal is by reply subject and request
id), and each publishes on the original subject the answers to the requests it
relayed there itself. A relayed query's answer returns to the inbox it came from.

What arrives from another operator is untrusted. A package from a worker is taken only
from the operator whose copy leads that worker's shard as this machine knows it (from
its own copy of that shard, or, where it holds none, as the operator's machines that do
tell one another on ``leaders_subject``, which no peer may publish on), with
only the items workers send each other and that worker's own subject as its reply. A
package from a gateway carries only transactions and issuances, whose signatures the
shard checks as it checks any. A query names a shard, one of ``RELAYED`` and an inbox
(events are not relayed: only the owner's copies fill gaps in their events logs, and
the owner's indexer waits for its own leaders). An answer is published only where this
machine relayed that very request (its inbox, or its reply subject and request id) to
that very operator, for a while. Anything else is refused with its reason, which the
machine counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from constellation.errors import InFlight, MessageError, Misdirected
from constellation.protocol import ledger as proto
from constellation.replication.placement import COPIES, MAX_MACHINES
from services.bus import GATEWAY, query_subject, worker_subject
from services.replica.config import Layout
from services.replica.host import HostedCopy
from services.replica.transport import ALL, copy_target

log = logging.getLogger("replica.relay")

REPLY_PREFIX = "cst.relay"
RELAYED_REPLY = REPLY_PREFIX + "."
SUBJECTS = 4096  # subjects whose shard is remembered, at most
INBOX = "_INBOX."  # a query's reply subject (NATS request/reply)
QUEUE = "relay"  # the queue group of an operator's machines on a shard's subjects
RELAYED = ("coins", "state")  # the queries relayed
FOLLOW_S = 0.05  # how often the subscriptions follow where the shards' leaders are
EXPECTED = 65_536  # requests relayed whose answers may come back, at most (oldest go)
EXPECT_S = 120.0  # how long an answer to a relayed request may take
ANSWERING = 256  # relayed queries answered at once, at most (beyond, the asker asks again)
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){1,15}")
MAX_SUBJECT = 256
TELL_S = 1.0  # a machine tells its copies' leaders this often, and at once on a change
HEARD_S = 5.0  # what another machine told of a shard's leader counts this long
_FROM_GATEWAY = (proto.Submit, proto.Issue)
_FROM_WORKER = (proto.Prepare, proto.Vote, proto.Decide, proto.Ask, proto.Done)


class _Msg(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="k"):
    pass


class Relayed(_Msg, frozen=True, tag="p"):
    """A package for shard (``owner``, ``worker``), from machine ``machine`` of the sender."""

    owner: int
    worker: int
    machine: int
    package: bytes


class Query(_Msg, frozen=True, tag="q"):
    """Query ``what`` of shard (``owner``, ``worker``); the answer goes to ``reply`` at
    machine ``machine`` of the sender."""

    owner: int
    worker: int
    machine: int
    what: str
    data: bytes
    reply: str


class Answer(_Msg, frozen=True, tag="a"):
    """Publish ``data`` on ``subject``: the answer to a request the receiver relayed."""

    subject: str
    data: bytes


Forward = Relayed | Query | Answer


class Leaders(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What machine ``machine`` of an operator knows of the leaders of the shards it
    holds copies of: (owner, worker, term, leader copy or -1)."""

    machine: int
    shards: list[tuple[int, int, int, int]]


def leaders_subject(operator: str) -> str:
    """Where an operator's machines tell one another the leaders their copies know."""
    return f"cst.{operator}.leaders"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Forward)


def encode(msg: Forward) -> bytes:
    return _encoder.encode(msg)


def decode(body: bytes) -> Forward:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"not a relayed message: {exc}") from None


def _subject(text: str, what: str) -> str:
    if len(text) > MAX_SUBJECT or not _SUBJECT.fullmatch(text):
        raise MessageError(f"{what} is not a subject one may publish on: {text[:64]!r}")
    return text


class Unasked(Misdirected):
    """An answer to a request this machine did not relay to its sender: forged, or
    answered to the operator's other machine too (answers go to both)."""

    code = "protocol.unasked"


class _Expected:
    """Bounded memory of the requests relayed whose answers may come back: the oldest
    go beyond ``EXPECTED``, and any after ``EXPECT_S``."""

    def __init__(self) -> None:
        self._keys: OrderedDict[tuple[str, int, int], float] = OrderedDict()

    def add(self, key: tuple[str, int, int], now: float) -> None:
        keys = self._keys
        keys[key] = now
        keys.move_to_end(key)
        while keys and (len(keys) > EXPECTED or next(iter(keys.values())) < now - EXPECT_S):
            keys.popitem(last=False)

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        return key in self._keys

    def discard(self, key: tuple[str, int, int]) -> None:
        self._keys.pop(key, None)


Send = Callable[[int, str, bytes], None]  # (operator, forward target, relayed message)


class Relay:
    """This machine's part of the relay (see the module docstring). ``send`` seals a
    message for an operator's copy or machines (``transport.forward_subject``) and
    queues it."""

    def __init__(self, layout: Layout, operator: int, machine: int, nc: Client, send: Send) -> None:
        self.layout, self.operator, self.machine = layout, operator, machine
        self.nc = nc
        self.send = send
        self.names = {m.name: i for i, m in enumerate(layout.members)}
        self.copies: dict[tuple[int, int], HostedCopy] = {}
        self.subs: dict[tuple[int, int], list[Subscription]] = {}
        self.expected = _Expected()  # (inbox, operator, 0) or (reply, operator, rid)
        # what each subject a copy publishes on is, parsed once (the shards' subjects and
        # their clients' reply subjects: few, but a gateway's restart makes a new one)
        self._shards: dict[str, tuple[int, int] | None] = {}
        self.answering: set[asyncio.Task[None]] = set()
        # what the operator's other machines told: shard -> (term, leader copy, when)
        self.heard: dict[tuple[int, int], tuple[int, int, float]] = {}
        self._told: tuple[list[tuple[int, int, int, int]], float] = ([], -TELL_S)

    def add(self, copy: HostedCopy) -> None:
        self.copies[(copy.owner, copy.worker)] = copy

    async def remove(self, copy: HostedCopy) -> None:
        """The copy leaves this machine: its shard's subjects are no longer relayed here."""
        shard = (copy.owner, copy.worker)
        del self.copies[shard]
        for sub in self.subs.pop(shard, []):
            await sub.unsubscribe()

    def leader_at(self, owner: int, worker: int) -> tuple[int, str] | None:
        """(operator, forward target) of the shard's leader where it is at another
        operator; None where it is here or unknown (or the copy here moved away)."""
        copy = self.copies.get((owner, worker))
        if copy is None:
            return None
        leader = copy.replica.leader
        operator = leader // 2
        if leader < 0 or operator == self.operator:
            return None
        return operator, copy_target(owner, worker, leader)

    def _leading_operator(self, owner: int, worker: int) -> int:
        """The operator whose copy leads the shard, as this machine knows it: from its
        own copy, or what the operator's other machines told lately, the later term of
        the two (-1 where none is known to lead)."""
        known = []
        copy = self.copies.get((owner, worker))
        if copy is not None:
            known.append((copy.replica.term, copy.replica.leader))
        heard = self.heard.get((owner, worker))
        if heard is not None and heard[2] > time.monotonic() - HEARD_S:
            known.append(heard[:2])
        if not known:
            raise Misdirected(
                f"no copy of shard ({owner}, {worker}) here, nor word of its leader from"
                " this operator's machines that hold one"
            )
        leader = max(known)[1]
        return leader // 2 if leader >= 0 else -1

    def tell(self, now: float) -> bytes | None:
        """What this machine tells the operator's others of its copies' leaders, where
        that changed or ``TELL_S`` passed since it last told; else None."""
        shards = sorted(
            (owner, worker, c.replica.term, c.replica.leader)
            for (owner, worker), c in self.copies.items()
            if not c.closed
        )
        told, at = self._told
        if shards == told and now < at + TELL_S:
            return None
        self._told = (shards, now)
        return msgspec.msgpack.encode(Leaders(self.machine, shards))

    def hear(self, data: bytes, now: float) -> None:
        """What another machine of the operator told (``tell``); raises MessageError
        where it is not that."""
        try:
            told = msgspec.msgpack.decode(data, type=Leaders)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MessageError(f"not a machine's leaders: {exc}") from None
        if told.machine == self.machine:
            return
        operators, workers = len(self.layout.members), self.layout.workers
        for owner, worker, term, leader in told.shards:  # all checked before any is taken
            if not (0 <= owner < operators and 0 <= worker < workers):
                raise MessageError(f"no shard ({owner}, {worker})")
            if not -1 <= leader < COPIES * operators or term < 0:
                raise MessageError(f"no leader {leader} in term {term}")
        for owner, worker, term, leader in told.shards:
            known = self.heard.get((owner, worker))
            if known is None or (term, leader) >= known[:2]:  # in a term, one leader
                self.heard[(owner, worker)] = (term, leader, now)

    def _send(self, operator: int, to: str, msg: Forward) -> None:
        self.send(operator, to, encode(msg))

    # -- going out -------------------------------------------------------------------

    async def publish(self, subject: str, payload: bytes) -> None:
        """A leading copy's package: relayed where it goes to another operator (a leader
        there, or an answer to a request relayed here), else on our own NATS."""
        if subject.startswith(RELAYED_REPLY):
            # cst.relay.<operator>.<reply>, as ``_checked`` wrote it
            operator, _, reply = subject[len(RELAYED_REPLY) :].partition(".")
            if not operator.isdecimal() or not 0 <= int(operator) < len(self.layout.members):
                log.warning("an answer to an unknown relay dropped", extra={"to": subject})
                return
            self._send(int(operator), ALL, Answer(reply, payload))
            return
        if subject in self._shards:
            shard = self._shards[subject]
        else:
            if len(self._shards) > SUBJECTS:  # gateways restarted many times: start over
                self._shards.clear()
            shard = self._shards[subject] = self._shard_of(subject)
        if shard is not None:
            at = self.leader_at(*shard)
            if at is not None:
                self._send(*at, Relayed(shard[0], shard[1], self.machine, payload))
                return
        await self.nc.publish(subject, payload)

    def _shard_of(self, subject: str) -> tuple[int, int] | None:
        """The shard whose packages ``subject`` carries (``cst.<owner>.w.<worker>``)."""
        parts = subject.split(".")
        if len(parts) != 4 or parts[0] != "cst" or parts[2] != "w" or not parts[3].isdecimal():
            return None
        owner = self.names.get(parts[1])
        if owner is None or int(parts[3]) >= self.layout.workers:
            return None
        return owner, int(parts[3])

    async def follow(self) -> None:
        """Keep this machine in the relay's queue group for every shard led at another
        operator, and out of it for the others, and tell the operator's other machines
        the leaders its copies know (a long-running task of the machine)."""
        subject = leaders_subject(self.layout.members[self.operator].name)
        while True:
            told = self.tell(time.monotonic())
            if told is not None:
                with contextlib.suppress(NatsError, OSError):  # told again within TELL_S
                    await self.nc.publish(subject, told)
            for shard in [s for s in self.subs if s not in self.copies]:  # moved away
                for sub in self.subs.pop(shard):
                    await sub.unsubscribe()
            for (owner, worker), copy in list(self.copies.items()):
                wanted = not copy.closed and self.leader_at(owner, worker) is not None
                subs = self.subs.get((owner, worker))
                if wanted and subs is None:
                    self.subs[(owner, worker)] = await self._subscribe(owner, worker)
                elif subs is not None and not wanted:
                    for sub in subs:
                        await sub.unsubscribe()
                    del self.subs[(owner, worker)]
            await asyncio.sleep(FOLLOW_S)

    async def _subscribe(self, owner: int, worker: int) -> list[Subscription]:
        name = self.layout.members[owner].name
        subs: list[Subscription] = []
        try:
            subs.append(
                await self.nc.subscribe(
                    worker_subject(name, worker),
                    queue=QUEUE,
                    cb=functools.partial(self._on_package, owner, worker),
                    pending_msgs_limit=1_000_000,
                )
            )
            for what in RELAYED:
                subs.append(
                    await self.nc.subscribe(
                        query_subject(name, worker, what),
                        queue=QUEUE,
                        cb=functools.partial(self._on_query, owner, worker, what),
                    )
                )
        except BaseException:
            for sub in subs:  # none left behind: the restarted task subscribes again
                await sub.unsubscribe()
            raise
        return subs

    async def _on_package(self, owner: int, worker: int, msg: Msg) -> None:
        at = self.leader_at(owner, worker)
        if at is None:
            return  # the leadership came here or is changing: the sender resends
        try:
            pkg = proto.decode_package(msg.data)
        except MessageError as exc:
            log.info("package rejected", extra={"reason": str(exc)})
            return
        if pkg.sender == GATEWAY:
            now = time.monotonic()
            for item in pkg.items:
                if isinstance(item, _FROM_GATEWAY):
                    self.expected.add((pkg.reply, at[0], item.rid), now)
        self._send(*at, Relayed(owner, worker, self.machine, msg.data))

    async def _on_query(self, owner: int, worker: int, what: str, msg: Msg) -> None:
        at = self.leader_at(owner, worker)
        if at is None or not msg.reply:
            return  # the asker asks again
        self.expected.add((msg.reply, at[0], 0), time.monotonic())
        self._send(*at, Query(owner, worker, self.machine, what, msg.data, msg.reply))

    # -- coming in -------------------------------------------------------------------

    async def receive(self, sender: int, body: bytes) -> None:
        """What operator ``sender`` relayed to this machine (authenticated already), or a
        ``ConstellationError`` saying why it is refused."""
        msg = decode(body)
        if isinstance(msg, Answer):
            await self._answer(sender, msg)
            return
        copy = self.copies.get((msg.owner, msg.worker))
        if copy is None or not 0 <= msg.machine < MAX_MACHINES:
            raise Misdirected(f"no shard ({msg.owner}, {msg.worker}) or machine {msg.machine}")
        if isinstance(msg, Relayed):
            copy.take(self._checked(sender, msg))
            return
        if msg.what not in RELAYED:
            raise MessageError(f"no query {msg.what!r} is relayed")
        if not msg.reply.startswith(INBOX):
            raise MessageError("a query's reply is an inbox")
        _subject(msg.reply, "the reply")
        if len(self.answering) >= ANSWERING:
            return  # the asker asks again
        task = asyncio.get_running_loop().create_task(self._answer_query(sender, copy, msg))
        self.answering.add(task)
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self.answering.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # a bug: said, with its traceback (the asker asks again)
            log.error("a relayed query failed", exc_info=exc)

    async def _answer_query(self, sender: int, copy: HostedCopy, msg: Query) -> None:
        answer = await copy.answer(msg.what, msg.data)
        if answer is not None:  # else this copy no longer leads: the asker asks again
            self._send(sender, str(msg.machine), Answer(msg.reply, answer))

    def _checked(self, sender: int, msg: Relayed) -> proto.Package:
        """The package, where operator ``sender`` may relay it (see the docstring)."""
        pkg = proto.decode_package(msg.package)
        if pkg.sender == GATEWAY:
            if not all(isinstance(i, _FROM_GATEWAY) for i in pkg.items):
                raise MessageError("a gateway's package carries transactions and issuances only")
            reply = _subject(pkg.reply, "the reply")
            return msgspec.structs.replace(pkg, reply=f"{REPLY_PREFIX}.{sender}.{reply}")
        if not 0 <= pkg.sender < self.layout.workers:
            raise MessageError(f"no worker {pkg.sender}")
        if not all(isinstance(i, _FROM_WORKER) for i in pkg.items):
            raise MessageError("a worker's package carries two-phase commit messages only")
        if pkg.reply != worker_subject(self.layout.members[msg.owner].name, pkg.sender):
            raise Misdirected("a worker's package must name its own subject as the reply")
        if self._leading_operator(msg.owner, pkg.sender) != sender:
            raise Misdirected(
                f"member {sender} does not lead shard ({msg.owner}, {pkg.sender}) as this "
                "machine knows it"
            )
        return pkg

    async def _answer(self, sender: int, msg: Answer) -> None:
        """Publish what answers requests relayed to ``sender`` from here: a query's
        whole answer, or a package's results for the requests this machine relayed."""
        if msg.subject.startswith(INBOX):  # a query's answer (its inbox is its own)
            inbox = (msg.subject, sender, 0)
            if inbox not in self.expected:
                raise Unasked(f"an answer on {msg.subject[:64]!r}, which awaits none from it")
            self.expected.discard(inbox)
            await self.nc.publish(msg.subject, msg.data)
            return
        pkg = proto.decode_package(msg.data)
        asked = [
            i
            for i in pkg.items
            if isinstance(i, proto.Result) and (msg.subject, sender, i.rid) in self.expected
        ]
        if not asked:
            raise Unasked(f"an answer on {msg.subject[:64]!r} that no request relayed here awaits")
        for item in asked:
            if item.code != InFlight.code:  # "in flight" is not the answer: the first will be
                self.expected.discard((msg.subject, sender, item.rid))
        data = (
            msg.data
            if len(asked) == len(pkg.items)
            else proto.encode(msgspec.structs.replace(pkg, items=asked))
        )
        await self.nc.publish(msg.subject, data)
