"""One copy of a shard: the guild's replication protocol as a deterministic state machine.

A shard is one worker's block log. Every operator keeps two copies of it; the copies
form one replication group (a modified Raft, ``notes/replication.md``):

* **Blocks.** The leader executes, seals and signs blocks: each header names its term
  and height, chains to the previous header's hash and carries the state root after the
  block. A copy stores a block only after checking it (chain, signature, body hash) and
  executing it against its own state: the root must come out equal. It then acks, signed,
  once the block is durable (``Ready``'s writes come before its messages). An invalid
  block is refused and stays refused.
* **Confirmation.** A block is confirmed when ``Quorums.confirm`` copies (a majority of
  operators) have acked it or a later block in the leader's term, two of them outside
  any one other operator (whose acks might be lies); earlier blocks are confirmed with
  it. Nothing acts on an unconfirmed block: ``Ready.confirmed`` is what
  the application may answer for. Up to ``window`` blocks are in flight per copy.
* **Leadership.** Copies have a preference: the owner's first copy, then its twin, then
  the other operators' copies. Election timeouts follow it (the twin's is short, the
  others' three to four times longer, each in a slot of its own by preference, so that
  one campaigns at a time), and a leader hands leadership to a more preferred copy
  once that copy has its whole log (``TimeoutNow``). An election: PreVote first (no term
  is spent unless ``Quorums.elect`` copies would vote), then votes, one per copy per
  term, persisted before it is sent, for a candidate whose log is at least as up to date.
  A copy that heard from its leader within the election timeout votes for nobody (the
  lease; a leader that does not hear from enough copies for as long steps down:
  CheckQuorum). A new leader proves its election to every copy with the signed votes (the
  certificate) and writes an empty block of its own term at once, which confirms what
  earlier leaders left.
* **Catching up.** A copy behind the leader's log gets a snapshot (the state after a
  confirmed block, whose signed header carries its root: the copy checks the root, and
  that the block is confirmed from the signed acks of a confirming set of copies, which
  the leader sends with it: it cannot execute what it did not receive) and then the
  blocks after it. Every ``snapshot_every`` blocks a copy captures its state
  right after applying a block (a leader: as it proposes it), and keeps the capture as
  its snapshot once that block is confirmed (drops it if the block is dropped); it keeps
  ``keep`` blocks behind its snapshot for copies slightly behind.
* **Evidence.** A copy remembers the headers it saw and gossips its latest one to the
  copies of other operators; two headers one operator signed at one (term, height), or
  two votes one copy signed in one term, are a proof. A copy holding a proof against an
  operator excludes it: it no longer follows, votes for or counts the copies of that
  operator, so the others take leadership of its shards.

Pure: time and randomness come in (``clock``, ``draw``), signing is ``sign``, the state
machine being replicated is an ``Executor``. The shell persists ``Ready``'s writes, then
sends its messages, then calls ``stored``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from constellation.errors import ConstellationError
from constellation.keys import schnorr_verify
from constellation.protocol import replication as rp
from constellation.replication import members as mb

GENESIS = bytes(32)
EVERYONE = -1  # a message's destination: every other copy
SEEN_LIMIT = 4096  # headers and votes remembered for finding equivocation, about
HEAD_AGAIN = 20  # heartbeats after which an unchanged head is shown again
MAX_PROOF_HEADERS = 256  # headers in a snapshot's proof (each ~150 bytes, in every chunk)
# How far ahead of ours a term named by a message that proves nothing (a vote asked or
# refused, an ack) is taken: no copy can push the others' terms to the end of their range
# (``rp.MAX_NUMBER``, where no election could follow) but by 2^48 / 1000 messages. A
# certificate's term (``Append``) is taken whole.
TERM_STEP = 1000
# Election timeouts a leader leads before a copy ahead of it in term deposes it.
HOLD_LEADERSHIP = 5
# Election timeouts before a leader that stepped down (CheckQuorum) campaigns again: after
# every other copy's (``Replica._timeout``: 4 at most).
LAST_RESORT = 4.5


class Executor(Protocol):
    """The state machine a shard's blocks drive (its partitions and their 2PC records)."""

    def execute(self, body: bytes, signatures: bool) -> bytes:
        """Apply one block's body; return the state root after it. Raise a
        ``ConstellationError`` for an invalid body, after which the state is undefined
        (the replica restores it). ``signatures``: check transactions' signatures."""

    def root(self) -> bytes: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> bytes:
        """Replace the state with a snapshot's; return its root. Raise a
        ``ConstellationError`` for a malformed snapshot."""


class Role(Enum):
    FOLLOWER = "follower"
    PRECANDIDATE = "precandidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class Settings:
    heartbeat_s: float = 0.1
    election_s: float = 1.0  # the twin's election timeout; the other operators' is 3x
    window: int = 8  # unconfirmed blocks in flight per copy
    append_bytes: int = 512 * 1024  # blocks per Append: at least one, then up to this
    snapshot_every: int = 1024  # blocks between snapshots
    keep: int = 256  # blocks kept behind a snapshot
    chunk_bytes: int = 256 * 1024
    snapshot_limit: int = 1 << 30  # a larger snapshot from a peer is refused
    # The transport authenticates each message's sender (an envelope signed with its
    # operator's key): an ack's own signature, made with the same key, is not checked
    # again. It is still made, for whoever keeps acks as evidence.
    authenticated: bool = False


Confirmation = tuple[list[rp.Header], list[rp.Ack]]


@dataclass
class Snapshot:
    """The state after a confirmed block (``signed`` is None for the empty genesis), and
    the proof that the block is confirmed, for the copies it is sent to: the headers after
    it and the acks (``proves_confirmed``; None where it is not known)."""

    height: int
    term: int
    hash: bytes
    signed: rp.Signed | None
    data: bytes
    proof: Confirmation | None = None


@dataclass
class Ready:
    """What the shell does after a step: persist ``hard`` (term, vote), the snapshot,
    the truncation and the appends, in that order and durably; then send ``messages``
    ((copy or ``EVERYONE``, message)); then call ``stored(last)``."""

    hard: tuple[int, int] | None = None
    snapshot: Snapshot | None = None
    truncate: int | None = None  # drop blocks above this height
    append: list[rp.Block] = field(default_factory=list)
    compact: int = 0  # blocks at or below this height may be dropped
    messages: list[tuple[int, rp.Message]] = field(default_factory=list)
    confirmed: int = 0  # the confirmed height, when it grew
    leading: bool | None = None  # leadership gained (True) or lost (False)
    members: rp.Members | None = None  # the members in effect, when they changed
    repaired: bool = False  # a damaged copy is whole again: forget that it was damaged
    last: int = 0

    def empty(self) -> bool:
        return not (
            self.hard
            or self.snapshot
            or self.truncate is not None
            or self.append
            or self.compact
            or self.messages
            or self.confirmed
            or self.leading is not None
            or self.members is not None
            or self.repaired
        )


@dataclass
class Progress:
    """What a leader knows of one other copy."""

    match: int = 0  # the copy holds our log up to here
    next: int = 1  # the next height to send
    heard: float = -1e18  # when it last answered
    sent: float = -1e18  # when it was last sent blocks (a beat then would tell it nothing)
    knows: bool = False  # it answered in this term: it has seen our certificate
    offset: int = -1  # snapshot bytes it has; -1 while no snapshot is being sent
    snapshot: int = -1  # the height of the snapshot being sent
    handed: float = 0.0  # leadership is not handed to it again before this time
    ack: rp.Ack | None = None  # its latest ack in this term, for proofs of confirmation
    acks_at: int = -1  # our confirmed height when we last sent it our acks


@dataclass
class Counters:
    elections: int = 0
    refused_blocks: int = 0
    refused_messages: int = 0
    snapshots_sent: int = 0
    snapshots_installed: int = 0


def body_hash(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def proves_confirmed(
    chain: Sequence[rp.Header],
    acks: Iterable[rp.Ack],
    keys: Sequence[bytes],
    agreed: Mapping[bytes, rp.Members],
    counts: Callable[[int], bool],
) -> bool:
    """Whether ``acks`` prove the block of ``chain[0]`` confirmed: ``chain`` is that
    header and the headers after it, each chaining to the one before; the acks, each
    signed by its copy's operator (``keys``) for a block of the chain, are those of a
    confirming set of copies (``counts``: not of an excluded operator) in one term T, all
    for blocks at or above a block of T in the chain, under the members in effect at
    that block (``agreed``), its leader's operator being the one that confirms.
    That is the rule by which T's leader confirms (``Replica._confirm``): such a set
    holds that block of T and everything before it, ``chain[0]`` among them; a confirming
    set spans a majority of operators, so at least one honest one checked every block."""
    if not chain:
        return False
    hashes = [rp.header_hash(chain[0])]
    for before, header in itertools.pairwise(chain):
        if (
            (header.owner, header.worker) != (before.owner, before.worker)
            or header.height != before.height + 1
            or header.prev != hashes[-1]
        ):
            return False
        hashes.append(rp.header_hash(header))
    base = chain[0]
    by_term: dict[int, dict[int, int]] = {}  # term -> copy -> the height it acked
    for ack in acks:
        i = ack.height - base.height
        if not (0 <= i < len(chain) and ack.block == hashes[i]) or not counts(ack.copy):
            continue
        if ack.copy // 2 >= len(keys):
            continue
        digest = rp.ack_digest(base.owner, base.worker, ack.term, ack.height, ack.block, ack.copy)
        if schnorr_verify(keys[ack.copy // 2], digest, ack.sig):
            by_term.setdefault(ack.term, {})[ack.copy] = ack.height
    for header in chain:
        held = by_term.get(header.term)
        members = agreed.get(header.members)
        if held is None or members is None:
            continue
        copies = [divmod(c, 2) for c, height in held.items() if height >= header.height]
        if mb.confirming(mb.quorums(members), copies, header.leader // 2):
            return True
    return False


class Replica:
    """One copy of one shard (see the module docstring)."""

    agreed: dict[bytes, rp.Members]  # the members the guild agreed to, by name
    steps: list[rp.Members]  # the same, in the order agreed (``rp.members_hash``'s step)
    step_of: dict[bytes, int]  # each name's place in ``steps``
    leader_confirmed = 0  # the height the leader last said it confirmed (its word)

    def __init__(
        self,
        *,
        owner: int,
        worker: int,
        me: int,
        keys: Sequence[bytes],
        sign: Callable[[bytes], bytes],
        executor: Executor,
        clock: Callable[[], float],
        draw: Callable[[], float],
        settings: Settings = Settings(),
        hard: tuple[int, int] = (0, -1),
        snapshot: Snapshot | None = None,
        blocks: Sequence[rp.Block] = (),
        damaged: bool = False,
        members: Sequence[rp.Members] = (),
    ) -> None:
        """``keys``: each operator's x-only key, by operator index; ``sign`` signs with
        this copy's operator key. ``hard``, ``snapshot`` and ``blocks`` are what an
        earlier run persisted (its blocks in order; those at or below the snapshot's height
        are ignored). ``damaged``: the shell found the log's tail unreadable, so blocks
        this copy acked may be gone: it neither votes nor campaigns until it holds a block
        of a term begun after this start, from that term's leader (else a leader missing
        a confirmed block could be elected with its vote); the shell keeps the mark until
        ``Ready.repaired``.

        ``members``: the shard's members the guild agreed to (``constellation.replication
        .members``), the first in effect from its genesis; a block naming others is
        refused. By default every operator of ``keys`` votes, and that never changes."""
        self.owner, self.worker, self.me = owner, worker, me
        self.keys = list(keys)
        if not self._known(me) or not 0 <= owner < len(self.keys):
            raise ValueError(f"no copy {me} or owner {owner} in a guild of {len(self.keys)}")
        agreed = list(members) or [mb.genesis(range(len(self.keys)))]
        self.agreed, self.steps, self.step_of = {}, [], {}
        self.agree(agreed)
        self.sign = sign
        self.executor = executor
        self.clock = clock
        self.draw = draw
        self.settings = settings
        self.term, self.vote = hard
        self.damaged = damaged
        self.damaged_term = self.term
        self.role = Role.FOLLOWER
        self.leader = -1
        self.heard = -1e18  # when the leader was last heard
        self.counters = Counters()
        self.snap = snapshot or Snapshot(0, 0, GENESIS, None, executor.snapshot())
        self.base = (self.snap.height, self.snap.term, self.snap.hash)  # just before log[0]
        self.log = [b for b in blocks if b.signed.header.height > self.snap.height]
        self._load_members(agreed[0])
        self.confirmed = self.snap.height
        self._rebuild(self.last)
        self.stored_height = self.last
        self.ready_ = Ready()
        self.progress: dict[int, Progress] = {}
        self.prevotes: set[int] = set()
        self.votes: dict[int, rp.Vote] = {}
        self.cert: list[rp.Vote] = []
        self.seen: dict[tuple[int, int], rp.Signed] = {}  # (term, height) -> a header
        self.votes_seen: dict[tuple[int, int], rp.Vote] = {}  # (term, voter) -> its vote
        self.evidence: dict[int, rp.Evidence] = {}  # operator -> a proof against it
        self.invalid: dict[bytes, str] = {}  # hash of a block found invalid -> why
        self.incoming: tuple[rp.Signed, bytearray] | None = None  # a snapshot arriving
        self.captured: tuple[int, bytes] | None = None  # (height, state) for the next snapshot
        self.own_ack: rp.Ack | None = None  # a leader's signed ack of what it stored
        self.leader_acks: list[rp.Ack] = []  # the latest the leader sent
        self.next_beat = 0.0
        self.next_head = 0.0
        self.gossiped: rp.Signed | None = None  # the header last shown to other operators
        self.gossip_again = 0.0
        self.transferred = -1e18
        self.transfer = False  # the PreVote under way is a handed-over leadership's
        self.prevoted = -1e18  # when it began
        self.led_since = 0.0
        self.deadline = 0.0
        self._reset_deadline()

    # -- the log -------------------------------------------------------------------------

    @property
    def first(self) -> int:
        return self.base[0] + 1

    @property
    def last(self) -> int:
        return self.base[0] + len(self.log)

    def _block(self, height: int) -> rp.Block:
        return self.log[height - self.first]

    def hash_at(self, height: int) -> bytes:
        if height == self.base[0]:
            return self.base[2]
        return rp.header_hash(self._block(height).signed.header)

    def term_at(self, height: int) -> int:
        if height == self.base[0]:
            return self.base[1]
        return self._block(height).signed.header.term

    @property
    def last_term(self) -> int:
        return self.term_at(self.last)

    def blocks(self, after: int, upto: int) -> list[rp.Block]:
        """The blocks held in (after, upto]."""
        lo = max(after + 1, self.first)
        if upto < lo:
            return []
        return self.log[lo - self.first : upto - self.first + 1]

    def state_root(self) -> bytes:
        if self.log:
            return self.log[-1].signed.header.root
        return self.executor.root()

    # -- members -------------------------------------------------------------------------

    def _load_members(self, genesis: rp.Members) -> None:
        """The members in effect at the base (``genesis`` at height 0), the heights in the
        log where they change, and those in effect now."""
        signed = self.snap.signed
        self.base_members = signed.header.members if signed else rp.members_hash(genesis)
        self.changes: list[int] = []
        named = self.base_members
        for block in self.log:
            if block.signed.header.members != named:
                self.changes.append(block.signed.header.height)
                named = block.signed.header.members
        if named not in self.agreed or self.base_members not in self.agreed:
            raise ValueError("the log names members this copy was not given")
        self.members_hash, self.members = named, self.agreed[named]
        self.quorums = mb.quorums(self.members)
        self.preference: list[int] = []
        self.rank = 0
        self._prefer()

    def _known(self, copy: int) -> bool:
        """Whether ``copy`` is a copy of an operator the guild has had (with a key)."""
        return 0 <= copy < 2 * len(self.keys)

    def _votes(self, copy: int) -> bool:
        """Whether ``copy`` votes (and may lead) under the members in effect."""
        op = copy // 2
        return op in self.members.voters or op in self.members.old

    @property
    def group(self) -> list[int]:
        """The copies taking part in the shard now (voting or learning): where a message
        to ``EVERYONE`` goes."""
        return mb.copies_of(self.members)

    @property
    def changed_at(self) -> int:
        """The height of the block that put the members in effect (the base's, at most)."""
        return self.changes[-1] if self.changes else self.base[0]

    def _prefer(self) -> None:
        """Preference: the owner's two copies, then the other voters' in order; a copy
        that does not vote comes after all, and never campaigns."""
        voting = [c for c in self.group if self._votes(c)]
        first = [c for c in voting if c // 2 == self.owner]
        self.preference = first + [c for c in voting if c // 2 != self.owner]
        self.rank = self._rank_of(self.me)

    def _rank_of(self, copy: int) -> int:
        """Where ``copy`` comes in the preference (after all if it does not vote)."""
        return self.preference.index(copy) if copy in self.preference else len(self.preference)

    def _adopt(self) -> None:
        """Put in effect the members the log's last block names (after an append, a
        truncation or a snapshot)."""
        named = self.log[-1].signed.header.members if self.log else self.base_members
        if named == self.members_hash:
            return
        self.members_hash, self.members = named, self.agreed[named]
        self.quorums = mb.quorums(self.members)
        self.ready_.members = self.members
        self._prefer()
        if self.role is Role.LEADER:
            now = self.clock()
            for c in self.group:
                if c != self.me and c not in self.progress:
                    self.progress[c] = Progress(next=self.last + 1, heard=now)
            for c in [c for c in self.progress if c not in self.group]:
                del self.progress[c]

    def agree(self, steps: Sequence[rp.Members]) -> None:
        """The guild agreed to these steps of members, every one from its founders' on
        (a change was approved: ``steps`` extends those agreed before): blocks naming
        them are taken from now on, each only as the step after the one in effect."""
        if steps[: len(self.steps)] != self.steps:
            raise ValueError("an agreement takes back steps agreed before")
        for step, m in enumerate(steps):
            why = mb.malformed(m)
            if why or max(m.operators()) >= len(self.keys):
                raise ValueError(f"members {m}: {why or 'an operator without a key'}")
            named = rp.members_hash(m, step)
            self.agreed.setdefault(named, m)
            self.step_of.setdefault(named, step)
        self.steps = list(steps)

    @property
    def at_step(self) -> int:
        """Which of the agreed steps the members in effect are."""
        return self.step_of[self.members_hash]

    def next_members(self) -> rp.Members | None:
        """The agreed step after the members in effect, if any."""
        at = self.at_step + 1
        return self.steps[at] if at < len(self.steps) else None

    def change(self, members: rp.Members) -> str:
        """Propose the next step of a change of members (``constellation.replication
        .members``), once the last step's block is confirmed; say why it cannot be taken
        now, or ''. The step's block confirms like any other. It is empty: as for
        ``propose``, the application's state must be the log's (nothing applied that
        waits for a block), so the application proposes it, a joint step's end too."""
        if self.role is not Role.LEADER:
            return "not the leader"
        why = mb.next_ok(self.members, members)
        if why:
            return why
        named = rp.members_hash(members, self.at_step + 1)
        if named not in self.agreed:
            return "members the guild did not agree to as its next step"
        if self.changed_at > self.confirmed:
            return "the previous change is not confirmed yet"
        now = self.clock()
        for op in set(members.voters) - set(self.members.voters):
            for c in (2 * op, 2 * op + 1):
                p = self.progress[c]
                if not (
                    p.knows
                    and p.match >= self.confirmed
                    and now - p.heard < self.settings.election_s
                ):
                    return f"operator {op}'s copies have not caught up"
        if not self.can_propose():
            return "the leader is busy"
        self._propose(b"", self.state_root(), named)
        return ""

    def _step_down_if_gone(self) -> None:
        """A leader whose operator no longer votes steps down once the block that says so
        is confirmed."""
        if self.changed_at <= self.confirmed and not self._votes(self.me):
            self._follow(self.term, -1)

    # -- the shell's side ----------------------------------------------------------------

    def ready(self) -> Ready:
        """Take what the last steps produced (see ``Ready``)."""
        out, self.ready_ = self.ready_, Ready()
        out.last = self.last
        return out

    def stored(self, height: int) -> None:
        """The shell made the log durable up to ``height``."""
        self.stored_height = max(self.stored_height, min(height, self.last))
        if self.role is Role.LEADER:
            self._confirm()

    def _send(self, to: int, msg: rp.Message) -> None:
        self.ready_.messages.append((to, msg))

    def _persist_hard(self) -> None:
        self.ready_.hard = (self.term, self.vote)

    # -- ticks ---------------------------------------------------------------------------

    def _timeout(self) -> float:
        """The owner's copies: 1 to 1.5 election timeouts (its twin takes over). The
        others: 3 to 4, each in its own slot by preference. Without its owner, a shard
        of 3 operators elects with the votes of all four copies left: two candidates at
        once split them, and a split costs a whole timeout more."""
        t = self.settings.election_s
        if self.rank < 2:
            return t * (1 + 0.5 * self.draw())
        others = max(1, len(self.preference) - 2)
        return t * (3 + (min(self.rank - 2, others - 1) + self.draw()) / others)

    def _reset_deadline(self) -> None:
        self.deadline = self.clock() + self._timeout()

    def tick(self) -> None:
        """Heartbeats, retransmissions, elections and leadership checks that are due."""
        now = self.clock()
        if self.role is Role.LEADER:
            if now >= self.next_beat:
                self.next_beat = now + self.settings.heartbeat_s
                self._beat(now)
            return
        if now >= self.next_head and self.leader >= 0:
            self.next_head = now + 2 * self.settings.heartbeat_s
            self._gossip_head(now)
        if now >= self.deadline:
            self._reset_deadline()
            self._prevote()

    def _beat(self, now: float) -> None:
        s = self.settings
        heard = [self.me] + [
            c
            for c, p in self.progress.items()
            if now - p.heard < s.election_s and not self._excluded(c)
        ]
        if not self._confirming(heard) and now - self.led_since > s.election_s:
            self._follow(self.term, -1)  # CheckQuorum: cut off from a confirming set
            # The others campaign first: preferred, it would win again where it can be
            # elected but not confirm (its operator short of a copy, with one other left).
            self.deadline = now + LAST_RESORT * s.election_s
            return
        for c, p in self.progress.items():
            # A copy sent blocks less than a beat ago heard from us then (that Append
            # named our term, the block before them and the confirmed height): it gets
            # what it lacks, if anything, and no empty Append besides.
            self._send_to(c, p, beat=not p.knows or now - p.sent >= s.heartbeat_s)
        self._hand_back(now)

    def _hand_back(self, now: float) -> None:
        """Give leadership to a more preferred copy that holds the whole log and could
        confirm with the copies that answer (and take no proposals meanwhile, so that it
        still does when it campaigns)."""
        s = self.settings
        if self.rank == 0 or now - self.transferred < s.election_s:
            return
        answer = [self.me] + [
            c
            for c, p in self.progress.items()
            if p.knows and now - p.heard < s.election_s and not self._excluded(c)
        ]
        for c in self.preference[: self.rank]:
            p = self.progress[c]
            if (
                not self._excluded(c)
                and p.knows
                and p.match == self.last
                and now - p.heard < s.heartbeat_s * 3
                and now >= p.handed
                and mb.confirming(self.quorums, [divmod(a, 2) for a in answer], c // 2)
            ):
                self.transferred = now
                p.handed = now + 10 * s.election_s  # if it does not take it
                self._send(c, rp.TimeoutNow(self.term))
                return

    def _gossip_head(self, now: float) -> None:
        """Show the latest header to the copies of other operators: when it changed, and
        again every ``HEAD_AGAIN`` heartbeats (one may have been lost); a header already
        shown tells them nothing new."""
        if not self.log:
            return
        signed = self.log[-1].signed
        if signed is self.gossiped and now < self.gossip_again:
            return
        self.gossiped, self.gossip_again = signed, now + HEAD_AGAIN * self.settings.heartbeat_s
        lead = signed.header.leader // 2
        for c in self.group:
            if c // 2 not in (lead, self.me // 2):
                self._send(c, rp.Head(signed))

    # -- elections -----------------------------------------------------------------------

    def _prevote(self, transfer: bool = False) -> None:
        """Ask whether an election would be won, spending no term. ``transfer``: the
        leader hands leadership over; it stays the leader unless this succeeds."""
        if self._excluded(self.me) or self.damaged or not self._votes(self.me):
            return
        self.role = Role.PRECANDIDATE
        if not transfer:
            self.leader = -1
        self.transfer = transfer
        self.prevoted = self.clock()
        self.prevotes = {self.me}
        self._send(EVERYONE, rp.AskVote(self.term + 1, self.last_term, self.last, True, transfer))

    def _campaign(self, transfer: bool) -> None:
        self.term += 1
        self.vote = self.me
        self._persist_hard()
        self.role = Role.CANDIDATE
        self.leader = -1
        self.counters.elections += 1
        mine = self._signed_vote(self.me)
        self.votes = {self.me: mine}
        self._reset_deadline()
        self._send(EVERYONE, rp.AskVote(self.term, self.last_term, self.last, False, transfer))
        self._won()

    def _signed_vote(self, candidate: int) -> rp.Vote:
        digest = rp.vote_digest(
            self.owner, self.worker, self.term, candidate, self.last_term, self.last, self.me
        )
        return rp.Vote(self.term, candidate, self.last_term, self.last, self.me, self.sign(digest))

    def _elects(self, copies: Iterable[int]) -> bool:
        """Whether these copies' votes (or PreVotes) elect under the members in effect."""
        voters = [divmod(c, 2) for c in copies if not self._excluded(c)]
        return mb.elects(self.quorums, voters)

    def _won(self) -> None:
        if self.role is Role.CANDIDATE and self._elects(self.votes):
            self._lead()

    def _lead(self) -> None:
        self.role = Role.LEADER
        self.leader = self.me
        self.cert = sorted(self.votes.values(), key=lambda v: v.voter)
        now = self.clock()
        self.led_since = now
        self.progress = {
            c: Progress(next=self.last + 1, heard=now) for c in self.group if c != self.me
        }
        self.ready_.leading = True
        self.next_beat = now + self.settings.heartbeat_s
        self.propose(b"", self.state_root())  # confirms what earlier terms left

    def _follow(self, term: int, leader: int) -> None:
        """Become a follower in ``term`` (of ``leader``, or of nobody yet: -1)."""
        if term > self.term:
            self.term, self.vote = term, -1
            self._persist_hard()
        was = self.role
        self.role = Role.FOLLOWER
        self.leader = leader
        if was is Role.LEADER:
            self.ready_.leading = False
            self.progress = {}
            self._rebuild(self.last)  # drop what the application applied past the log
        if leader < 0:
            self._reset_deadline()

    def _up_to_date(self, last_term: int, last_height: int) -> bool:
        return (last_term, last_height) >= (self.last_term, self.last)

    def _in_lease(self) -> bool:
        if self.role is Role.LEADER:
            return True
        return self.leader >= 0 and self.clock() - self.heard < self.settings.election_s

    def _on_ask(self, sender: int, msg: rp.AskVote) -> None:
        # A copy that does not vote here is refused, unless its log is ahead of this
        # one's (it may hold the change that made it a voter).
        outsider = not self._votes(sender) and not (
            (msg.last_term, msg.last_height) > (self.last_term, self.last)
        )
        if self._excluded(sender) or self.damaged or outsider:
            self._send(sender, rp.Voted(self.term, False, msg.pre, None))
            return
        # Leadership is handed only to a copy preferred to its leader: another copy
        # naming a transfer does not break the lease.
        transfer = msg.transfer and (
            self.leader < 0 or self._rank_of(sender) < self._rank_of(self.leader)
        )
        lease = self._in_lease() and not transfer
        if msg.pre:
            grant = (
                msg.term > self.term
                and not lease
                and self._up_to_date(msg.last_term, msg.last_height)
            )
            # A refusal names this copy's term: an asker behind it catches up (else
            # copies behind in term and copies behind in log refuse each other for ever).
            self._send(sender, rp.Voted(msg.term if grant else self.term, grant, True, None))
            return
        if msg.term < self.term or lease:
            self._send(sender, rp.Voted(self.term, False, False, None))
            return
        if msg.term > self.term + TERM_STEP:
            self._follow(self._later(msg.term), -1)
            self._send(sender, rp.Voted(self.term, False, False, None))
            return
        if msg.term > self.term:
            self._follow(msg.term, -1)
        grant = self.vote in (-1, sender) and self._up_to_date(msg.last_term, msg.last_height)
        vote = None
        if grant:
            if self.vote != sender:
                self.vote = sender
                self._persist_hard()
            self._reset_deadline()
            vote = rp.Vote(
                self.term,
                sender,
                msg.last_term,
                msg.last_height,
                self.me,
                self.sign(
                    rp.vote_digest(
                        self.owner,
                        self.worker,
                        self.term,
                        sender,
                        msg.last_term,
                        msg.last_height,
                        self.me,
                    )
                ),
            )
        self._send(sender, rp.Voted(self.term, grant, False, vote))

    def _on_voted(self, sender: int, msg: rp.Voted) -> None:
        if self.role not in (Role.PRECANDIDATE, Role.CANDIDATE):
            return  # nothing was asked: a leader or follower takes no term from answers
        if msg.pre:
            if not msg.granted:
                if msg.term > self.term:
                    self._follow(self._later(msg.term), -1)
                return
            if self.role is Role.PRECANDIDATE and msg.term == self.term + 1:
                self.prevotes.add(sender)
                if self._elects(self.prevotes):
                    self._campaign(self.transfer)
            return
        if msg.term > self.term:
            self._follow(self._later(msg.term), -1)
            return
        if self.role is not Role.CANDIDATE or msg.term != self.term or not msg.granted:
            return
        vote = msg.vote
        if (
            vote is None
            or vote.voter != sender
            or vote.candidate != self.me
            or vote.term != self.term
            or not self._vote_valid(vote)
        ):
            self.counters.refused_messages += 1
            return
        self.votes[sender] = vote
        self._won()

    def _later(self, term: int) -> int:
        """``term``, a later one named by a message that proves nothing (a vote asked or
        refused, an ack), as far as it is taken (``TERM_STEP``)."""
        if term > self.term + TERM_STEP:
            self.counters.refused_messages += 1
            return self.term + TERM_STEP
        return term

    def _vote_valid(self, vote: rp.Vote) -> bool:
        if not self._known(vote.voter):
            return False
        digest = rp.vote_digest(
            self.owner,
            self.worker,
            vote.term,
            vote.candidate,
            vote.last_term,
            vote.last_height,
            vote.voter,
        )
        return schnorr_verify(self.keys[vote.voter // 2], digest, vote.sig)

    def _cert_valid(self, term: int, leader: int, cert: list[rp.Vote]) -> bool:
        """Whether ``cert`` holds enough valid votes for ``leader`` in ``term``, under the
        members ``leader`` was elected under (``_election_steps``), ``leader`` voting
        under them: never under members of another step (an operator that left, its
        votes counted under members it was one of, would be followed)."""
        if self._excluded(leader):
            return False
        if len(cert) > 2 * len(self.keys):
            return False
        voters: set[int] = set()
        for vote in cert:
            if vote.term != term or vote.candidate != leader or vote.voter in voters:
                continue
            if not self._vote_valid(vote):
                continue
            self._saw_vote(vote)
            if not self._excluded(vote.voter):
                voters.add(vote.voter)
        own = [v for v in cert if v.voter == leader and v.term == term]
        if not own or leader not in voters:
            return False  # a candidate votes for itself, naming its log
        copies = [divmod(c, 2) for c in voters]
        return any(
            leader // 2 in (*m.voters, *m.old) and mb.elects(mb.quorums(m), copies)
            for m in self._election_steps(own[0].last_term, own[0].last_height)
        )

    def _election_steps(self, last_term: int, last_height: int) -> list[rp.Members]:
        """The members a candidate whose log ended at (``last_term``, ``last_height``)
        was elected under: those that block names, where this log holds it; where its
        log goes past this one's (or another way after it), one of the steps from the
        one in effect at this copy's confirmed height on (its log holds every confirmed
        block); where it ended before this log's first block, one of the steps up to
        the one in effect there."""
        first, last = self.first, self.last
        if first <= last_height <= last and self.term_at(last_height) == last_term:
            return [self.agreed[self._block(last_height).signed.header.members]]
        if last_height >= first - 1 and last_height >= self.confirmed:
            return self.steps[self._step_at(self.confirmed) :]
        return self.steps[: self._step_at(first - 1) + 1]

    def _step_at(self, height: int) -> int:
        """Which step the members in effect at ``height`` (held, or the base) are."""
        if height < self.first:
            return self.step_of[self.base_members]
        return self.step_of[self._block(height).signed.header.members]

    def _on_timeout_now(self, sender: int, msg: rp.TimeoutNow) -> None:
        if (
            msg.term == self.term
            and sender == self.leader
            and self.role is Role.FOLLOWER
            and not self.damaged
        ):
            self._prevote(transfer=True)

    def resign(self) -> None:
        """Stop leading, ahead of this copy's move to another machine: hand leadership to
        the most preferred copy that holds the whole log (its twin first) and end the
        lease at the others, so that it is elected at once rather than after an election
        timeout. A follower has nothing to do."""
        if self.role is not Role.LEADER:
            return
        now = self.clock()
        ready = [
            c
            for c, p in self.progress.items()
            if not self._excluded(c)
            and p.knows
            and p.match == self.last
            and now - p.heard < self.settings.heartbeat_s * 3
        ]
        twin = self.me ^ 1
        heir = twin if twin in ready else min(ready, key=self._rank_of, default=-1)
        for c in self.group:
            if c not in (self.me, heir):
                self._send(c, rp.Resign(self.term))
        if heir >= 0:
            self._send(heir, rp.TimeoutNow(self.term))
        self._follow(self.term, -1)
        self.deadline = float("inf")  # it stops; it does not campaign meanwhile

    def _on_resign(self, sender: int, msg: rp.Resign) -> None:
        if msg.term == self.term and sender == self.leader:
            self.leader = -1  # no lease: the heir's votes come at once
            self._reset_deadline()

    # -- replication: leader -------------------------------------------------------------

    def can_propose(self) -> bool:
        """Whether a block proposed now would be taken (leading, not handing leadership
        over, the window not full, voting under the members in its log: a leader that
        took the step leaving it out proposes nothing more, which copies would refuse,
        and steps down once that step is confirmed)."""
        return (
            self.role is Role.LEADER
            and self.clock() - self.transferred >= self.settings.election_s
            and self.last - self.confirmed < self.settings.window
            and self._votes(self.me)
        )

    def propose(self, body: bytes, root: bytes) -> int:
        """Seal ``body``, which the application has already applied (its state's root is
        ``root``), as the next block; return its height."""
        return self._propose(body, root, self.members_hash)

    def _propose(self, body: bytes, root: bytes, members: bytes) -> int:
        assert self.role is Role.LEADER, "only a leader proposes"
        height = self.last + 1
        header = rp.Header(
            self.owner,
            self.worker,
            self.term,
            height,
            self.hash_at(self.last),
            body_hash(body),
            root,
            self.me,
            int(self.clock() * 1000),
            members,
        )
        block = rp.Block(rp.Signed(header, self.sign(rp.header_hash(header))), body)
        self._append(block)
        self.seen[(header.term, height)] = block.signed
        for c, p in self.progress.items():
            if p.next == height:
                self._send_to(c, p, beat=False)
        return height

    def _send_to(self, copy: int, p: Progress, beat: bool) -> None:
        """Send ``copy`` what it lacks, within the window; an empty Append if ``beat``."""
        cert = [] if p.knows else self.cert
        # our acks, on what is sent every few blocks confirmed (and on a heartbeat): what
        # it proves a snapshot with
        due = beat or self.confirmed >= p.acks_at + self.settings.window
        if p.offset >= 0 or p.next < self.first:
            if beat or cert:  # leadership news and the confirmed height; it lacks the rest
                base, base_hash = self.base[::2]
                acks = self._acks_for(p) if due else []
                self._send(
                    copy, rp.Append(self.term, base, base_hash, [], self.confirmed, cert, acks)
                )
            self._send_chunk(copy, p)
            return
        # The window counts from what it acked; before its first answer in this term,
        # from where we start sending.
        upto = min(self.last, (p.match if p.knows else p.next - 1) + self.settings.window)
        blocks: list[rp.Block] = []
        size = 0
        for block in self.blocks(p.next - 1, upto):
            if blocks and size + len(block.body) > self.settings.append_bytes:
                break
            blocks.append(block)
            size += len(block.body) + 200
        if not blocks and not beat:
            return
        # A heartbeat names the last block sent: a copy that lacks it (lost on the
        # way) says where to resume.
        prev = max(p.next - 1, self.base[0])
        acks = self._acks_for(p) if due else []
        self._send(
            copy,
            rp.Append(self.term, prev, self.hash_at(prev), blocks, self.confirmed, cert, acks),
        )
        p.next = max(p.next, prev + len(blocks) + 1)
        if blocks:
            p.sent = self.clock()

    def _send_chunk(self, copy: int, p: Progress) -> None:
        snap = self.snap
        assert snap.signed is not None, "a copy behind the log's start, but no snapshot"
        if p.offset < 0 or p.snapshot != snap.height:
            p.offset, p.snapshot = 0, snap.height
            self.counters.snapshots_sent += 1
        proof = self._proof(snap)
        if proof is None:
            return  # not before enough copies acked in this term: on a later heartbeat
        data = snap.data[p.offset : p.offset + self.settings.chunk_bytes]
        self._send(copy, rp.Chunk(self.term, snap.signed, p.offset, len(snap.data), data, *proof))

    def _proof(self, snap: Snapshot) -> Confirmation | None:
        """The proof that the snapshot's block is confirmed: the one it was taken with,
        else (a snapshot kept from before proofs were) from this term's acks."""
        assert snap.signed is not None
        if snap.proof is None:
            snap.proof = self._prove(snap.signed.header, self._acks())
        return snap.proof

    def _acks_for(self, p: Progress) -> list[rp.Ack]:
        p.acks_at = self.confirmed
        return self._acks()

    def _acks(self) -> list[rp.Ack]:
        """A leader's latest signed acks of this term: its own, of what it stored, and
        each copy's."""
        own = self.own_ack
        if own is None or (own.term, own.height) != (self.term, self.stored_height):
            block = self.hash_at(self.stored_height)
            digest = rp.ack_digest(
                self.owner, self.worker, self.term, self.stored_height, block, self.me
            )
            own = rp.Ack(self.me, self.term, self.stored_height, block, self.sign(digest))
            self.own_ack = own
        # (not checked here: an ack whose signature fails, on an authenticated transport,
        # is passed on and proves nothing where a proof is made or checked)
        return [own, *(p.ack for p in self.progress.values() if p.ack is not None)]

    def _prove(self, header: rp.Header, acks: Sequence[rp.Ack]) -> Confirmation | None:
        """The proof that the block of ``header`` (in the log, or the snapshot's) is
        confirmed, from ``acks`` (``proves_confirmed``): those of the fewest copies, the
        lowest first, with the headers up to the highest of them; None where they do not
        prove it."""
        lowest: dict[int, rp.Ack] = {}  # one a copy (of one term: a leader's), the lowest
        for a in sorted(acks, key=lambda a: a.height):
            if header.height <= a.height <= self.last and self._counts(a.copy):
                lowest.setdefault(a.copy, a)
        usable = sorted(lowest.values(), key=lambda a: a.height)
        chain = [header]
        chosen: list[rp.Ack] = []
        for ack in usable:
            chosen.append(ack)
            while chain[-1].height < ack.height:
                chain.append(self._block(chain[-1].height + 1).signed.header)
            if proves_confirmed(chain, chosen, self.keys, self.agreed, self._counts):
                return chain[1:], chosen
        return None

    def _counts(self, copy: int) -> bool:
        return self._known(copy) and not self._excluded(copy)

    def _on_appended(self, sender: int, msg: rp.Appended) -> None:
        if msg.term > self.term:
            # A copy that went ahead in term (a campaign of its own that failed), and
            # cannot be elected nor follow us, waits for an election (Raft's step-down;
            # the term as far as it is taken: it proves nothing). A leader holds one only
            # after leading a while (``HOLD_LEADERSHIP``): else a Byzantine copy could
            # depose every leader it follows, one message an election. A copy that does
            # not lead asked nothing: it takes no term.
            held = self.clock() - self.led_since
            if self.role is Role.LEADER and held >= HOLD_LEADERSHIP * self.settings.election_s:
                self._follow(self._later(msg.term), -1)
            else:
                self.counters.refused_messages += 1
            return
        if self.role is not Role.LEADER or msg.term != self.term:
            return
        p = self.progress.get(sender)
        if p is None:  # a copy that no longer takes part
            return
        p.heard = self.clock()
        p.knows = msg.ok  # a refusal may come from a copy that lost our certificate
        if msg.refused:
            self.counters.refused_blocks += 1
        if not msg.ok:
            # A copy that lost blocks it acked (a damaged disk) resumes below its match.
            p.match = min(p.match, msg.height)
            p.next = max(p.match + 1, min(msg.height + 1, self.last + 1))
            # A snapshot goes on at its own pace; a refused block waits for the heartbeat.
            if p.offset < 0 and not msg.refused:
                self._send_to(sender, p, beat=False)
            return
        if msg.height > self.last or msg.height < self.base[0]:
            return
        if msg.height >= self.first - 1 and self.hash_at(msg.height) != msg.block:
            self.counters.refused_messages += 1
            return
        if msg.height > p.match:
            # An ack counts towards confirmation only with its signature (or its
            # authenticated sender's).
            digest = rp.ack_digest(
                self.owner, self.worker, self.term, msg.height, msg.block, sender
            )
            if not self.settings.authenticated and not schnorr_verify(
                self.keys[sender // 2], digest, msg.sig
            ):
                self.counters.refused_messages += 1
                return
            p.match = msg.height
            p.ack = rp.Ack(sender, msg.term, msg.height, msg.block, msg.sig)
            p.offset = -1
        p.next = max(p.next, msg.height + 1)
        self._confirm()
        if self.role is Role.LEADER:  # not if it stepped down, its operator gone
            self._send_to(sender, p, beat=False)

    def _on_chunk_ack(self, sender: int, msg: rp.ChunkAck) -> None:
        if self.role is not Role.LEADER or msg.term != self.term:
            return
        p = self.progress.get(sender)
        if p is None:
            return
        p.heard = self.clock()
        if p.offset < 0:
            return
        if msg.height != self.snap.height:
            p.offset = 0  # it has another snapshot's bytes: start over with ours
        elif msg.offset >= len(self.snap.data):
            return  # installed (or declined): its Appended follows
        else:
            p.offset = msg.offset  # what it has, even if less than we thought
        self._send_chunk(sender, p)

    def _confirm(self) -> None:
        """Confirm the highest block of this term that enough copies hold: a confirming
        set (``Quorums.confirm`` copies), which also keeps two copies once any one other
        operator's copies are taken away, so that an operator acking what it did not
        store cannot alone make a confirmed block depend on it."""
        held = {c: p.match for c, p in self.progress.items() if not self._excluded(c)}
        held[self.me] = self.stored_height
        for h in sorted(set(held.values()), reverse=True):
            if h <= self.confirmed:
                return
            if self._confirming([c for c, m in held.items() if m >= h]):
                if self.term_at(h) == self.term:
                    self._confirmed(h)
                return

    def _confirming(self, copies: list[int]) -> bool:
        """Whether these copies (this one among them) may confirm a block of ours."""
        return mb.confirming(self.quorums, [divmod(c, 2) for c in copies], self.me // 2)

    def _confirmed(self, height: int) -> None:
        self.confirmed = height
        self.ready_.confirmed = height
        captured = self.captured
        if captured is not None and captured[0] <= height:
            self._snapshot(*captured)
        self._forget()
        if self.role is Role.LEADER:
            self._step_down_if_gone()

    def _forget(self) -> None:
        """Keep the headers and votes remembered for proofs within bounds: those near
        our log's heights and our term, at most half the limit, the nearest first. Any
        copy may send headers it signed at terms of its choosing: a flood of them costs
        one rebuild per half a limit of them, never one per message."""
        if len(self.seen) > SEEN_LIMIT:
            lo, hi = self.confirmed - SEEN_LIMIT // 4, self.last + SEEN_LIMIT // 4
            near = sorted(
                (k for k in self.seen if lo < k[1] <= hi),
                key=lambda k: (abs(k[0] - self.term), abs(k[1] - self.last)),
            )
            self.seen = {k: self.seen[k] for k in near[: SEEN_LIMIT // 2]}
        if len(self.votes_seen) > SEEN_LIMIT:
            near = sorted(self.votes_seen, key=lambda k: abs(k[0] - self.term))
            self.votes_seen = {k: self.votes_seen[k] for k in near[: SEEN_LIMIT // 2]}

    # -- replication: follower -----------------------------------------------------------

    def _on_append(self, sender: int, msg: rp.Append) -> None:
        if msg.term < self.term:
            self._refuse_append(sender, self.last, "")
            return
        if not (msg.term == self.term and self.leader == sender):
            if self.role is Role.LEADER and msg.term == self.term:
                self.counters.refused_messages += 1  # two leaders in a term: a forgery
                return
            if not self._cert_valid(msg.term, sender, msg.cert):
                self.counters.refused_messages += 1
                if not msg.cert:  # a copy that restarted: ask for the certificate
                    self._send(sender, rp.Appended(msg.term, False, self.last, b"", b"", ""))
                return
            self._follow(msg.term, sender)
        elif self.role is not Role.FOLLOWER and not (
            self.transfer and self.clock() - self.prevoted < self.settings.election_s
        ):
            # A handed-over leadership that did not happen. While it may still happen,
            # the leader's messages (it leads until the transfer succeeds) do not end it:
            # they raced its answers, and would leave the leadership where it was.
            self._follow(msg.term, sender)
        self.heard, self.leader_confirmed = self.clock(), msg.confirmed
        self._reset_deadline()
        prev = msg.prev_height
        if prev > self.last:
            self._refuse_append(sender, self.last, "")
            return
        if prev < self.base[0]:
            self._refuse_append(sender, self.confirmed, "")
            return
        if self.hash_at(prev) != msg.prev_hash:
            self._refuse_append(sender, min(self.confirmed, prev - 1), "")
            return
        if self.last == prev:
            self._follower_confirm(min(msg.confirmed, prev))
        height = prev
        for block in msg.blocks:
            height += 1
            header = block.signed.header
            if header.height != height:
                self._refuse_append(sender, self.last, f"block {header.height} at {height}")
                return
            if height <= self.last:
                if self.hash_at(height) == rp.header_hash(header):
                    continue
                if height <= self.confirmed:
                    if self._signed_by_leader(block.signed):
                        self._saw(block.signed)
                    self._refuse_append(sender, self.last, f"replaces confirmed block {height}")
                    return
                self._truncate(height - 1)
            why = self.invalid.get(rp.header_hash(header)) or self._check(block, msg.term)
            if why:
                self.counters.refused_blocks += 1
                self._refuse_append(sender, self.last, why)
                return
            self._append(block)
        self._follower_confirm(min(msg.confirmed, height))
        if msg.acks:
            self.leader_acks = msg.acks
            if self.captured is not None and self.captured[0] <= self.confirmed:
                self._snapshot(*self.captured)
        if self.damaged and msg.term > self.damaged_term and self.last_term == msg.term:
            # It holds a block of a term begun after its restart, so all that leader's
            # log below it: every block confirmed before that term.
            self.damaged = False
            self.ready_.repaired = True
        self._ack(sender, height)

    def _append(self, block: rp.Block) -> None:
        """Add a checked (or our own) block at the log's end."""
        if block.signed.header.members != self.members_hash:
            self.changes.append(block.signed.header.height)
        self.log.append(block)
        self.ready_.append.append(block)
        self._capture()
        self._adopt()

    def _ack(self, leader: int, height: int) -> None:
        """Tell the leader, signed, that this copy holds its log up to ``height``."""
        block = self.hash_at(height)
        digest = rp.ack_digest(self.owner, self.worker, self.term, height, block, self.me)
        self._send(leader, rp.Appended(self.term, True, height, block, self.sign(digest), ""))

    def _refuse_append(self, leader: int, resume: int, why: str) -> None:
        self._send(leader, rp.Appended(self.term, False, max(resume, 0), b"", b"", why))

    def _follower_confirm(self, height: int) -> None:
        if height > self.confirmed:
            self._confirmed(height)

    def _truncate(self, height: int) -> None:
        assert height >= self.confirmed, "a confirmed block would be dropped"
        assert height >= self.snap.height, "a snapshot's block would be dropped"
        del self.log[height - self.first + 1 :]
        self.stored_height = min(self.stored_height, height)
        if self.captured is not None and self.captured[0] > height:
            self.captured = None
        before = self.ready_.truncate
        self.ready_.truncate = height if before is None else min(before, height)
        self.ready_.append = [b for b in self.ready_.append if b.signed.header.height <= height]
        self.changes = [h for h in self.changes if h <= height]
        self._rebuild(height)
        self._adopt()

    def _check(self, block: rp.Block, term: int) -> str:
        """Why ``block`` may not follow the log (it is then not applied), or ''."""
        header = block.signed.header
        if (header.owner, header.worker) != (self.owner, self.worker):
            return "a block of another shard"
        if not self._known(header.leader):
            return f"no copy {header.leader}"
        if not self._votes(header.leader):
            return f"copy {header.leader} does not vote under the members in effect"
        if header.members != self.members_hash:
            new = self.agreed.get(header.members)
            if new is None:
                return "names members the guild did not agree to"
            if self.step_of[header.members] != self.at_step + 1:
                return "names members agreed as another step than the next"
            why = mb.next_ok(self.members, new)
            if why:
                return f"a change of members refused: {why}"
        if header.term > term or header.term < self.last_term:
            return f"term {header.term} out of order"
        if header.prev != self.hash_at(self.last):
            return "does not chain to the previous block"
        if body_hash(block.body) != header.body:
            return "the body does not match its hash"
        # A convicted operator's old blocks may be history; its new leadership is not
        # followed (``_cert_valid``).
        signer = header.leader // 2
        if not schnorr_verify(self.keys[signer], rp.header_hash(header), block.signed.sig):
            return "bad header signature"
        self._saw(block.signed)
        try:
            root = self.executor.execute(block.body, signer != self.me // 2)
        except ConstellationError as exc:
            self._rebuild(self.last)
            return self._invalid(header, f"invalid block {header.height}: {exc}")
        if root != header.root:
            self._rebuild(self.last)
            return self._invalid(header, f"block {header.height}: state root differs")
        return ""

    def _invalid(self, header: rp.Header, why: str) -> str:
        """Remember a block found invalid, so that it is refused again without work."""
        if len(self.invalid) >= SEEN_LIMIT:
            self.invalid.clear()
        self.invalid[rp.header_hash(header)] = why
        return why

    def _rebuild(self, height: int) -> None:
        """Bring the executor to the state after ``height``: the snapshot, then the log."""
        root = self.executor.restore(self.snap.data)
        assert self.snap.signed is None or root == self.snap.signed.header.root, (
            "our own snapshot does not match its root"
        )
        for block in self.blocks(self.snap.height, height):
            root = self.executor.execute(block.body, False)
            assert root == block.signed.header.root, "re-execution is not deterministic"

    def _capture(self) -> None:
        """The executor has applied exactly the log: take its state if a snapshot is due."""
        if self.captured is None and self.last - self.snap.height >= self.settings.snapshot_every:
            self.captured = (self.last, self.executor.snapshot())

    def _snapshot(self, height: int, data: bytes) -> None:
        """A captured state's block is confirmed: it becomes the snapshot, once acks
        prove it confirmed (a follower's, those its leader sent; kept until then)."""
        block = self._block(height)
        header = block.signed.header
        acks = self._acks() if self.role is Role.LEADER else self.leader_acks
        proof = self._prove(header, acks)
        if proof is None:
            return
        if len(proof[0]) > MAX_PROOF_HEADERS:  # captured long ago: again at the next block
            self.captured = None
            return
        self.snap = Snapshot(height, header.term, self.hash_at(height), block.signed, data, proof)
        self.captured = None
        self.ready_.snapshot = self.snap
        self._compact(height - self.settings.keep)

    def _compact(self, upto: int) -> None:
        if upto < self.first:
            return
        base = (upto, self.term_at(upto), self.hash_at(upto))
        self.base_members = self._block(upto).signed.header.members
        del self.log[: upto - self.first + 1]
        self.base = base
        self.changes = [h for h in self.changes if h > upto]
        self.ready_.compact = upto

    def _on_chunk(self, sender: int, msg: rp.Chunk) -> None:
        if msg.term != self.term or sender != self.leader or self.role is not Role.FOLLOWER:
            return
        self.heard = self.clock()
        self._reset_deadline()
        header = msg.signed.header
        if msg.total > self.settings.snapshot_limit or header.height <= self.confirmed:
            self.counters.refused_messages += 1
            return
        h = header.height
        if self.first - 1 <= h <= self.last and self.hash_at(h) == rp.header_hash(header):
            # It holds that block: no need of the state; the log goes on from there.
            self.incoming = None
            self._send(sender, rp.ChunkAck(self.term, h, msg.total))
            self._ack(sender, h)
            return
        if msg.offset == 0 and not (self.incoming and self.incoming[0] == msg.signed):
            self.incoming = (msg.signed, bytearray())
        incoming = self.incoming
        if incoming is None or incoming[0] != msg.signed or len(incoming[1]) != msg.offset:
            have = len(incoming[1]) if incoming and incoming[0] == msg.signed else 0
            self._send(sender, rp.ChunkAck(self.term, header.height, have))
            return
        incoming[1].extend(msg.data)
        if len(incoming[1]) < msg.total:
            self._send(sender, rp.ChunkAck(self.term, header.height, len(incoming[1])))
            return
        self.incoming = None
        self._send(sender, rp.ChunkAck(self.term, header.height, msg.total))
        self._install(sender, msg, bytes(incoming[1]))

    def _install(self, sender: int, msg: rp.Chunk, data: bytes) -> None:
        """Take a snapshot the leader sent, once proven: the state is checked against its
        block's root, and the block shown confirmed by the acks of enough copies (a
        leader's word alone would let one operator hand every copy a state of its own
        making)."""
        header = msg.signed.header
        signer = header.leader // 2
        if (header.owner, header.worker) != (self.owner, self.worker) or not (
            header.term <= msg.term
            and self._known(header.leader)
            and header.members in self.agreed
            and schnorr_verify(self.keys[signer], rp.header_hash(header), msg.signed.sig)
            and proves_confirmed(
                [header, *msg.after], msg.acks, self.keys, self.agreed, self._counts
            )
        ):
            self.counters.refused_messages += 1
            return
        try:
            root = self.executor.restore(data)
        except ConstellationError:
            root = b""
        if root != header.root:
            self.counters.refused_messages += 1
            self._rebuild(self.last)
            return
        h = header.height
        proof = (msg.after, msg.acks)
        self.snap = Snapshot(h, header.term, rp.header_hash(header), msg.signed, data, proof)
        self.captured = None
        self.log = []
        self.base = (h, header.term, self.snap.hash)
        self.base_members, self.changes = header.members, []
        self._adopt()
        self.ready_.snapshot = self.snap
        self.ready_.truncate = 0
        self.ready_.append = []
        self.confirmed = self.stored_height = h
        self.ready_.confirmed = h
        self.counters.snapshots_installed += 1
        self._ack(sender, h)

    # -- evidence ------------------------------------------------------------------------

    def _excluded(self, copy: int) -> bool:
        return copy // 2 in self.evidence

    def _saw(self, signed: rp.Signed) -> None:
        """Remember a header (its signature checked); two signed by one operator at one
        (term, height) are a proof."""
        key = (signed.header.term, signed.header.height)
        other = self.seen.setdefault(key, signed)
        if len(self.seen) > SEEN_LIMIT:
            self._forget()
        if other == signed or other.header == signed.header:
            return
        if other.header.leader // 2 != signed.header.leader // 2:
            return
        self._evidence(rp.Equivocation(other, signed))

    def _saw_vote(self, vote: rp.Vote) -> None:
        other = self.votes_seen.setdefault((vote.term, vote.voter), vote)
        if len(self.votes_seen) > SEEN_LIMIT:
            self._forget()
        if other.candidate != vote.candidate:
            self._evidence(rp.DoubleVote(self.owner, self.worker, other, vote))

    def _on_head(self, sender: int, msg: rp.Head) -> None:
        header = msg.signed.header
        if self.first <= header.height <= self.last and self.hash_at(header.height) == (
            rp.header_hash(header)
        ):
            return  # the block this copy holds
        if not self._signed_by_leader(msg.signed):
            self.counters.refused_messages += 1
            return
        self._saw(msg.signed)

    def _signed_by_leader(self, signed: rp.Signed) -> bool:
        """Whether a header is of this shard and signed by its leader's operator."""
        h = signed.header
        return (
            (h.owner, h.worker) == (self.owner, self.worker)
            and self._known(h.leader)
            and schnorr_verify(self.keys[h.leader // 2], rp.header_hash(h), signed.sig)
        )

    def _on_proof(self, sender: int, msg: rp.Proof) -> None:
        self._evidence(msg.evidence)

    def _evidence(self, evidence: rp.Evidence) -> None:
        culprit = self.check_evidence(evidence)
        if culprit is None:
            self.counters.refused_messages += 1
            return
        if culprit in self.evidence:
            return
        self.evidence[culprit] = evidence
        self._send(EVERYONE, rp.Proof(evidence))
        self._distrust(culprit)
        if self.leader >= 0 and self._excluded(self.leader):
            if self.role is Role.LEADER:
                self._follow(self.term, -1)
            else:
                self.leader = -1
                self.heard = -1e18

    def _distrust(self, culprit: int) -> None:
        """Take back what this copy confirmed on the word of a convicted leader: the
        blocks of its last term here. It may have told other copies another story at
        those heights (the confirming set may have been two operators meeting only in
        the liar), so the next leader's log decides them. A copy that snapshotted past
        them keeps them."""
        h = self.last
        while h > max(self.snap.height, self.base[0]):
            header = self._block(h).signed.header
            if header.leader // 2 != culprit:
                break
            term = header.term
            h -= 1
            if h > self.base[0] and self._block(h).signed.header.term != term:
                break
        self.confirmed = min(self.confirmed, h)

    def check_evidence(self, evidence: rp.Evidence) -> int | None:
        """The operator a proof convicts, or None if it proves nothing."""
        if isinstance(evidence, rp.Equivocation):
            a, b = evidence.a.header, evidence.b.header
            if (
                (a.owner, a.worker, a.term, a.height) != (b.owner, b.worker, b.term, b.height)
                or (a.owner, a.worker) != (self.owner, self.worker)
                or a == b
                or not (self._known(a.leader) and self._known(b.leader))
                or a.leader // 2 != b.leader // 2
            ):
                return None
            key = self.keys[a.leader // 2]
            if all(
                schnorr_verify(key, rp.header_hash(s.header), s.sig)
                for s in (evidence.a, evidence.b)
            ):
                return a.leader // 2
            return None
        a_vote, b_vote = evidence.a, evidence.b
        if (
            (evidence.owner, evidence.worker) != (self.owner, self.worker)
            or a_vote.term != b_vote.term
            or a_vote.voter != b_vote.voter
            or a_vote.candidate == b_vote.candidate
        ):
            return None
        if self._vote_valid(a_vote) and self._vote_valid(b_vote):
            return a_vote.voter // 2
        return None

    # -- messages ------------------------------------------------------------------------

    def step(self, sender: int, msg: rp.Message) -> None:
        """Take one message from copy ``sender`` (authenticated by the transport)."""
        if (
            not self._known(sender)
            or sender == self.me
            or (self._excluded(sender) and not isinstance(msg, rp.Proof))
        ):
            self.counters.refused_messages += 1
            return
        if isinstance(msg, rp.Append):
            self._on_append(sender, msg)
        elif isinstance(msg, rp.Appended):
            self._on_appended(sender, msg)
        elif isinstance(msg, rp.AskVote):
            self._on_ask(sender, msg)
        elif isinstance(msg, rp.Voted):
            self._on_voted(sender, msg)
        elif isinstance(msg, rp.Chunk):
            self._on_chunk(sender, msg)
        elif isinstance(msg, rp.ChunkAck):
            self._on_chunk_ack(sender, msg)
        elif isinstance(msg, rp.TimeoutNow):
            self._on_timeout_now(sender, msg)
        elif isinstance(msg, rp.Resign):
            self._on_resign(sender, msg)
        elif isinstance(msg, rp.Head):
            self._on_head(sender, msg)
        else:
            self._on_proof(sender, msg)
