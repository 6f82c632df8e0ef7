"""A worker's ledger on a replicated shard.

A block's body is the list of records the leader's engine wrote (``proto.Record``).
Every copy replays them with every check a leader had to make (``TwoPhaseCommit.replay``
with ``verify``); a copy of the leader's own operator may skip transaction signatures,
which its leader checked (``signatures``). The state root is the engine's
(``LedgerExecutor``).

At the leader, what waited for the disk in a lone worker waits for confirmation
(``ShardLog``): a receipt, a YES vote, a decision. And a new leader acts on nothing its
log holds until the log is confirmed (``LedgerShard``): a remembered commit in an
unconfirmed block may still vanish, so it is told to nobody before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from constellation.errors import InvalidBlock
from constellation.ledger.commit import TwoPhaseCommit
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import Replica, Role, body_hash

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[proto.Record])


def encode_body(records: list[proto.Record]) -> bytes:
    return _encoder.encode(records) if records else b""


def decode_body(body: bytes) -> list[proto.Record]:
    """A block's records, or ``InvalidBlock`` (an empty body is a block of no records:
    a new leader's first)."""
    if not body:
        return []
    try:
        return _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidBlock(0, f"the block body is malformed: {exc}") from None


Events = tuple[list[proto.CoinChange], list[proto.Commit]]


class LedgerExecutor:
    """``Executor`` over one worker's engine. With ``derive``, each block's events (its
    coin changes and what it coordinated) are kept by body hash in ``derived`` until
    the shell, which knows the block's height, takes them."""

    def __init__(self, engine: TwoPhaseCommit, derive: bool = False) -> None:
        self.engine = engine
        self.derive = derive
        self.derived: dict[bytes, Events] = {}

    def execute(self, body: bytes, signatures: bool) -> bytes:
        events = self.engine.replay(
            decode_body(body), self.derive, verify=True, signatures=signatures
        )
        if events[0] or events[1]:
            self.derived[body_hash(body)] = events
        return self.engine.root()

    def root(self) -> bytes:
        return self.engine.root()

    def snapshot(self) -> bytes:
        return self.engine.snapshot()

    def restore(self, data: bytes) -> bytes:
        return self.engine.restore(data)


class ShardLog:
    """A leader's block log as its engine sees it (the engine's ``Log``): records
    gather into the next block; their callbacks run once the block holding them is
    confirmed. The events of each proposed block wait in ``events`` (by height) for
    the shell. ``urgent``: something gathered that a client or another worker waits
    for (a ``lazy`` record, nothing waits for, may wait for the leader's next tick)."""

    def __init__(self) -> None:
        self.records: list[proto.Record] = []
        self.after: list[Callable[[int], None]] = []
        self.changes: list[proto.CoinChange] = []
        self.committed: list[proto.Commit] = []
        self.events: dict[int, Events] = {}
        self.urgent = False
        self.size = 0  # about the encoded size of ``records``
        self.waiting: dict[int, list[Callable[[int], None]]] = {}
        self.confirmed = 0
        self.proposed = 0

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
        self.urgent = self.urgent or not lazy
        if after is not None:
            self.after.append(after)

    @property
    def full(self) -> bool:
        """What gathered fills a block: it must be sealed before anything more is taken."""
        return self.size >= proto.MAX_BLOCK_BYTES or len(self.changes) >= proto.MAX_BLOCK_CHANGES

    def after_durable(self, callback: Callable[[int], None]) -> None:
        """``callback`` once the next block sealed is confirmed (an empty one where
        nothing else gathers): everything added so far is durable then, and this copy
        still leads. Not sooner, though nothing may wait: a leader deposed without
        knowing it has all it added confirmed, and a state that may lack what its
        successors confirmed (a participant's Done said from there once ended the
        coordinator's memory of a commit the worker had not applied; seed 150049)."""
        self.after.append(callback)
        self.urgent = True

    def seal(self, replica: Replica, engine: TwoPhaseCommit) -> None:
        """Propose what gathered as the next block, if the replica takes one now."""
        if not (self.records or self.after) or not replica.can_propose():
            return
        height = replica.propose(encode_body(self.records), engine.root())
        self.proposed = height
        self.waiting[height] = self.after
        if self.changes or self.committed:
            self.events[height] = (self.changes, self.committed)
        self.records, self.after, self.changes, self.committed = [], [], [], []
        self.urgent, self.size = False, 0

    def confirm(self, height: int) -> None:
        self.confirmed = max(self.confirmed, height)
        for h in sorted(h for h in self.waiting if h <= height):
            for callback in self.waiting.pop(h):
                callback(h)

    def reset(self, confirmed: int, last: int) -> None:
        """Leadership changed: what was in no block went with the engine's old state."""
        self.records, self.after, self.waiting, self.events = [], [], {}, {}
        self.changes, self.committed, self.urgent, self.size = [], [], False, 0
        self.confirmed, self.proposed = confirmed, last


class LedgerShard:
    """One copy's engine and log, and the rules of leading with them."""

    def __init__(self, engine: TwoPhaseCommit, log: ShardLog, derive: bool = False) -> None:
        assert engine.log is log, "the engine must write to this shard's log"
        self.engine = engine
        self.log = log
        self.executor = LedgerExecutor(engine, derive)
        self.settling: int | None = None  # a new leader's log, up to here, not yet confirmed
        self.led: int | None = None  # the term it was told it leads in (``leading``)

    def leading(self, gained: bool, replica: Replica) -> None:
        """Leadership gained or lost (``Ready.leading``)."""
        self.log.reset(replica.confirmed, replica.last)
        self.settling = replica.last if gained else None
        self.led = replica.term if gained else None

    def leads(self, replica: Replica) -> bool:
        """Whether the replica leads and the shard has been told so: between the step
        that won an election and the ``Ready`` that says so (a shell processes it
        later), the engine's state is not yet the log's, and the log is to be reset."""
        return replica.role is Role.LEADER and self.led == replica.term

    def accepting(self, replica: Replica) -> bool:
        """Whether packages may be handed to the engine: leading, its log confirmed."""
        return self.leads(replica) and self.settling is None

    def confirmed(self, height: int) -> None:
        self.log.confirm(height)

    def change_members(self, replica: Replica) -> rp.Members | None:
        """At a leader, take the next of the agreed steps of a change of members
        (``constellation.replication.members``) once every record gathered is sealed (a
        members block is empty: the state must be the log's). The step taken, or None."""
        if not self.leads(replica) or self.log.records:
            return None
        step = replica.next_members()
        if step is None or replica.change(step):
            return None
        return step

    def tick(self, replica: Replica, now: float) -> None:
        """The engine's timers and the next block, at a leader. Once a new leader's log
        is confirmed it asks and tells at once, as a restarted worker does."""
        if not self.leads(replica):
            return
        engine = self.engine
        if self.settling is not None:
            if replica.confirmed < self.settling:
                return
            self.settling = None
            engine.ask_in_doubt(now, at_once=True)
            engine.retell(now, at_once=True)
        engine.expire(now)
        engine.retell(now)
        engine.ask_in_doubt(now)
        self.log.seal(replica, engine)
