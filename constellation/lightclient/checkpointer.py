"""When an operator proposes a checkpoint, whether it vouches for another's, and which
signed checkpoints it takes: sans I/O, driven by the indexer's checkpointing
(``services.indexer.checkpoints``), which passes in the clock and what arrives.

**Proposing.** Members propose by rank (their place among the members of the key that
signs the next checkpoint, ``signers``; their place in the guild where it is not
known): the first proposes every ``cadence_ms`` while some shard moved or a handover
waits (and every ``idle_ms`` at rest, so that a quiet guild still shows it is alive);
the one at ``r`` proposes only once no checkpoint was signed for ``r * takeover_ms``
longer than the first would have waited. While the first is up one proposal is in
flight at a time, and with a threshold of members up the guild goes on checkpointing.
Where every member of the key must sign (a guild of two after a leave), only the first
proposes: another's proposal could make nothing the first could not, and two proposals
at one height, each with one share released, would leave that height unsigned for good.
A proposal is sent again unchanged until its height is signed, by it or by another's
proposal (and after a restart: ``resume``): a signer never signs two checkpoints at one
height, and it sees the same message again.

**Evidence.** A proposal travels with its entries and with the signed checkpoint it
follows (and that one's entries), so that a member that missed the latter takes it
before it vouches.

**Handing over.** Where this operator's guild made a new key (a change of members) and
moved its coins to it, the service sets ``handover`` (the key, x-only, and its member
set): the next checkpoint proposed names them, and is signed by the key that signs at
its height; from the height above, checkpoints are signed by the new key and name the
new members. A member vouches for a handover only to the key its own operator hands
over to. ``pin`` follows every handover heard, in height order, so it says which key
signs each height (``Pin.at``).

**Taking.** A signed checkpoint is taken in height order, once its signature verifies
under the guild's key at its height, its entries are one per shard and make its root, and this
index reached their heights (held until then). A member that missed checkpoints (it was
down) adopts the latest it reached once the gap lasted ``takeover_ms``: its coins and
blocks are checked, its records are left to the members that saw them (``GuildIndex
.adopt``). One that this index disagrees with stops
the taking (``disagreed``): a threshold of operators computed other coins or records
than this one, which an operator must look at; this index serves no proof past it.

A proposer that fails after some signers released shares of its checkpoint but before
the signature was made leaves those signers bound to it at that height (and epoch);
another proposer's checkpoint there is refused by them. With a threshold of the others
it is signed anyway; where the shares split so that no checkpoint can reach the
threshold, the signers' standings show it and the coordinator asks again in the next
epoch (``constellation.guild.SigningPolicy``); otherwise the guild waits for the
proposer whose checkpoint can still be signed to send it again (its service keeps its
last proposal across a restart: ``resume``). A signer whose share at a
height went to a proposal that lost learns what the guild signed there from the next
proposal's evidence (``signed_below``), and signs above it; where the lost proposal was
a handover, it forgets it (after a restart too, from a proposal higher up: its audit log
gives back every share it released). Two proposals at one height each holding a share
of the only signers left (a takeover raced just before a member left) stay unsigned: a
member leaves once no share is out for an unsigned checkpoint, and once the members that
stay took the last one signed, of which it may hold the only copy
(``tests.sim.checkpoints`` drives these rules through faults).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from constellation.codec import Reader, u16
from constellation.errors import BadEntryPath, BadRecordPath, DecodeError
from constellation.guild import Checkpoint
from constellation.keys import schnorr_verify
from constellation.lightclient import merkle
from constellation.lightclient.index import GuildIndex, Held, Signed
from constellation.lightclient.proof import (
    MAX_SHARDS,
    Pin,
    ShardEntry,
    SignedCheckpoint,
    shards_tree,
    verify_checkpoint,
)

MAX_WAITING = 256  # signed checkpoints held for their turn, at most


class Announced(NamedTuple):
    """A signed checkpoint and its entries, as members send it to each other."""

    signed: SignedCheckpoint
    entries: list[ShardEntry]

    def encode(self) -> bytes:
        return self.signed.encode() + encode_entries(self.entries)

    @staticmethod
    def read(r: Reader) -> Announced:
        return Announced(SignedCheckpoint.read(r), read_entries(r))

    @staticmethod
    def decode(data: bytes) -> Announced:
        r = Reader(data, "announced checkpoint")
        announced = Announced.read(r)
        r.finish()
        return announced


class Evidence(NamedTuple):
    """What a proposal's signers' ledgers check it against."""

    entries: list[ShardEntry]
    prev: Announced | None  # the signed checkpoint it follows (None at height 0)

    def encode(self) -> bytes:
        prev = b"\x00" if self.prev is None else b"\x01" + self.prev.encode()
        return encode_entries(self.entries) + prev

    @staticmethod
    def decode(data: bytes) -> Evidence:
        r = Reader(data, "checkpoint evidence")
        entries = read_entries(r)
        flag = r.u8()
        if flag > 1:
            raise DecodeError("checkpoint evidence: unknown flag")
        prev = Announced.read(r) if flag else None
        r.finish()
        return Evidence(entries, prev)


def encode_entries(entries: list[ShardEntry]) -> bytes:
    return u16(len(entries)) + b"".join(e.encode() for e in entries)


def read_entries(r: Reader) -> list[ShardEntry]:
    return [ShardEntry.read(r) for _ in range(r.count(1, MAX_SHARDS, "entries"))]


def signed_below(
    checkpoint: Checkpoint, evidence: bytes, keys: Collection[bytes]
) -> tuple[Checkpoint, bytes] | None:
    """The checkpoint ``checkpoint`` follows, from its proposal's evidence, and the key
    its signature verifies under, one of the guild's ``keys`` (x-only): what the guild
    signed at the height below (a signer learns from it that a share it released there
    lost, ``SigningPolicy.learn``)."""
    try:
        prev = Evidence.decode(evidence).prev
    except ValueError:  # malformed: the indexer says so when it vouches
        return None
    if prev is None:
        return None
    below = prev.signed.checkpoint
    if (below.height + 1, below.message()) != (checkpoint.height, checkpoint.prev_hash):
        return None
    for key in keys:
        if schnorr_verify(key, below.message(), prev.signed.sig):
            return below, key
    return None


class NotYet(NamedTuple):
    """This index has not reached a proposal's heights: ask again shortly."""


class Checkpointer:
    def __init__(
        self,
        index: GuildIndex,
        pin: Pin,
        rank: int,
        cadence_ms: int,
        takeover_ms: int,
        idle_ms: int,
    ) -> None:
        self.index, self.pin, self.rank = index, pin, rank
        self.cadence_ms, self.takeover_ms, self.idle_ms = cadence_ms, takeover_ms, idle_ms
        self.waiting: dict[int, Announced] = {}  # height -> signed, not taken yet
        self.proposal: tuple[Checkpoint, Evidence] | None = None
        self.proposed_at: int | None = None
        self.signed_at: int | None = None  # when a signed checkpoint was last taken
        self.started_at: int | None = None
        self.gap_since: int | None = None  # when a gap in the held heights was first seen
        self.disagreed: str | None = None
        self.handover: tuple[bytes, bytes] | None = None  # the key and members to hand to
        # each key (x-only): the members that hold it, in order, and how many sign
        self.signers: dict[bytes, tuple[list[int], int]] = {}

    def signing_key(self, height: int) -> bytes:
        """The key (x-only) that signs the checkpoint at ``height``."""
        return self.pin.at(height)[0]

    def _rank(self, height: int) -> int | None:
        """This member's rank among the proposers of ``height`` (None: it proposes none)."""
        found = self.signers.get(self.signing_key(height))
        if found is None:
            return self.rank
        members, t = found
        if self.rank not in members:
            return None
        rank = members.index(self.rank)
        return rank if rank == 0 or len(members) > t else None

    def due(self, now_ms: int) -> tuple[Checkpoint, Evidence] | None:
        """The proposal to send to the signer now, if one is due (at most one per
        ``cadence_ms``; the caller sends one at a time)."""
        if self.started_at is None:
            self.started_at = now_ms
        if self.disagreed is not None:
            return None
        index = self.index
        rank = self._rank(index.next_height)
        if rank is None:
            return None
        quiet = now_ms - (self.signed_at if self.signed_at is not None else self.started_at)
        handover = self.handover
        if handover is not None and handover[0] == self.signing_key(index.next_height):
            handover = None  # handed over already
        at_rest = not index.moved() and index.last is not None and handover is None
        if rank:
            expected = self.idle_ms if at_rest else self.cadence_ms
            if quiet < expected + rank * self.takeover_ms:
                return None
        if self.proposed_at is not None and now_ms - self.proposed_at < self.cadence_ms:
            return None
        if self.proposal is not None and self.proposal[0].height > index.next_height:
            return None  # restarted behind its own proposal: the heights below are signed
        if self.proposal is None or self.proposal[0].height != index.next_height:
            if at_rest and quiet < self.idle_ms:
                return None
            checkpoint, entries = index.propose(now_ms, handover)
            prev = None
            if index.last is not None:
                covered = index.last.covered.values()
                prev = Announced(index.last.checkpoint, [c.entry for c in covered])
            self.proposal = checkpoint, Evidence(entries, prev)
        self.proposed_at = now_ms
        return self.proposal

    def take(self, announced: Announced, now_ms: int) -> list[Signed]:
        """A signed checkpoint heard of (announced by a member, in a proposal's
        evidence, or from this operator's store): checked against the pinned guild
        (raises ``ProofRefused``) and held for its turn. Returns what is taken now."""
        checkpoint = announced.signed.checkpoint
        shards = [(e.owner, e.worker) for e in announced.entries]
        if shards != sorted(set(shards)) or shards_tree(announced.entries).root() != (
            checkpoint.shards
        ):
            raise BadEntryPath(
                f"checkpoint {checkpoint.height}'s entries are not one per shard, in order,"
                " making its shards root"
            )
        height = checkpoint.height
        self.follow(announced.signed)
        waiting = self.waiting
        if height >= self.index.next_height and height not in waiting:
            if len(waiting) >= MAX_WAITING:  # the highest goes: it is heard again
                highest = max(waiting)
                if height > highest:
                    return self.advance(now_ms)
                del waiting[highest]
            waiting[height] = announced
        return self.advance(now_ms)

    def resume(self, proposal: tuple[Checkpoint, Evidence]) -> None:
        """The proposal this member sent last before it restarted (its service keeps
        it): sent again unchanged while its height is the next, since signers that
        released shares of it sign no other checkpoint at that height; none is made
        below it (those heights were signed) while this index catches up."""
        self.proposal = proposal

    def restore(self, announced: Announced) -> None:
        """A signed checkpoint from this operator's own store (given in height order):
        held to be taken again as the index reaches it, a handover followed."""
        self.follow(announced.signed)
        self.waiting[announced.signed.checkpoint.height] = announced

    def follow(self, signed: SignedCheckpoint) -> None:
        """A signed checkpoint heard (raises ``ProofRefused`` where it does not verify):
        where it is a handover above the last one followed, ``pin`` follows it, and what
        is held above it that its key did not sign is dropped."""
        c = signed.checkpoint
        if not c.next_key or c.height <= self.pin.handed:
            verify_checkpoint(self.pin, signed)
            return
        self.pin = self.pin.follow(signed)
        for above in [h for h in self.waiting if h > c.height]:
            try:
                verify_checkpoint(self.pin, self.waiting[above].signed)
            except ValueError:
                del self.waiting[above]

    def advance(self, now_ms: int) -> list[Signed]:
        """Take the held checkpoints whose turn it is and whose heights this index
        reached (call after applying blocks); after ``takeover_ms`` of a gap (this member
        missed checkpoints: it was down), adopt the latest held one it reached."""
        taken: list[Signed] = []
        index = self.index
        while self.disagreed is None:
            announced = self.waiting.get(index.next_height)
            if announced is None or not index.reached(announced.entries):
                break
            del self.waiting[index.next_height]
            try:
                taken.append(index.signed(*announced))
            except ValueError as exc:
                self.disagreed = str(exc)
                break
            self.signed_at = now_ms
        for h in [h for h in self.waiting if h < index.next_height]:  # passed: no gap
            del self.waiting[h]
        if not self.waiting or index.next_height in self.waiting or self.disagreed:
            self.gap_since = None
        elif self.gap_since is None:
            self.gap_since = now_ms
        elif now_ms - self.gap_since >= self.takeover_ms:
            reached = [h for h in self.waiting if index.reached(self.waiting[h].entries)]
            if reached:
                self.gap_since = None
                try:
                    taken.append(index.adopt(*self.waiting.pop(max(reached))))
                except ValueError as exc:
                    self.disagreed = str(exc)
                else:
                    self.signed_at = now_ms
                    return taken + self.advance(now_ms)  # those held above it
        return taken

    def behind(self) -> str | None:
        """Why this member is behind the guild's checkpoints, if it is."""
        if self.gap_since is None:
            return None
        return (
            f"missed checkpoints from {self.index.next_height} (the guild is at "
            f"{max(self.waiting)}): adopting the latest once its blocks are here"
        )

    def vouch(
        self, checkpoint: Checkpoint, evidence: Evidence, now_ms: int
    ) -> tuple[str | NotYet, list[Signed]]:
        """Why this operator's signer must not sign ``checkpoint`` ("" if it may), or
        ``NotYet`` while this index has not reached its entries; and the checkpoints
        taken meanwhile (the one the evidence says it follows, where it was missed)."""
        taken: list[Signed] = []
        if evidence.prev is not None:
            try:
                taken = self.take(evidence.prev, now_ms)
            except ValueError as exc:  # ProofRefused among them
                return f"the checkpoint it follows: {exc}", taken
        if self.disagreed is not None:
            return f"this operator disagrees with the guild: {self.disagreed}", taken
        last = self.index.last
        if last is not None and checkpoint == last.checkpoint.checkpoint:
            return "", taken  # signed already: a signer that missed it may sign it too
        held = self.waiting.get(checkpoint.height)
        if held is not None and held.signed.checkpoint != checkpoint:
            return f"the guild signed another checkpoint at height {checkpoint.height}", taken
        if checkpoint.next_key and (checkpoint.next_key, checkpoint.next_members) != (
            self.handover
        ):
            return "this operator hands the checkpoints over to no such key", taken
        if not self.index.reached(evidence.entries):
            return NotYet(), taken
        return self.index.check(checkpoint, evidence.entries, now_ms) or "", taken


class Filled(NamedTuple):
    """A signed checkpoint and the records its entries cover (by the shard's position
    among the entries; shards without records left out): what a member that missed
    checkpoints (it adopted a later one) asks another for, to prove their transactions."""

    announced: Announced
    records: dict[int, list[bytes]]


def verify_filled(pin: Pin, filled: Filled) -> Held:
    """A filled checkpoint from another member, checked (raises ``ProofRefused``): signed
    by the pinned guild, its entries making its shards root, and each shard's records
    exactly those its entry's records root and count commit to."""
    announced = filled.announced
    checkpoint = verify_checkpoint(pin, announced.signed)
    entries = announced.entries
    if shards_tree(entries).root() != checkpoint.shards:
        raise BadEntryPath(f"checkpoint {checkpoint.height}'s entries do not make its root")
    for position, entry in enumerate(entries):
        records = filled.records.get(position, [])
        tree = merkle.MerkleTree(records)
        if (tree.size, tree.root()) != (entry.size, entry.records):
            raise BadRecordPath(
                f"checkpoint {checkpoint.height}: shard {entry.owner}/{entry.worker}'s records"
                " are not those its entry commits to"
            )
    if set(filled.records) - set(range(len(entries))):
        raise BadRecordPath(f"checkpoint {checkpoint.height}: records of no entry")
    return Held(announced.signed, entries, {p: r for p, r in filled.records.items() if r})
