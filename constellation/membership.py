"""A change of a guild's members: one member joins or leaves, in phases that each wait
for the operator's approval, and what each phase waits for.

    join:   Proposed -> Learning -> Voting -> Resharing -> Moving -> Done
    leave:  Proposed ->             Voting -> Resharing -> Moving -> Done

* **Learning**: the joiner's copies get every shard's log as learners (they count for
  nothing yet), until they hold it.
* **Voting**: every shard's voters become the new members, through a joint step
  (``constellation.replication.members``): a joiner votes from here, a leaver stops.
* **Resharing**: the new members make a new guild key by a DKG among themselves
  (``constellation.crypto.dkg``); the old key still signs.
* **Moving**: the guild's on-chain funds move to the new key in one spend that the old
  key's signers sign (ROAST), checked by each as any spend (``constellation.guild``);
  once every coin is under it, the checkpoints hand over to it (a checkpoint the old key
  signs names the new key and members: light clients follow it, ``Pin.follow``) and the
  signers retire the old key (``op.activate_key``).
* **Done**: every coin is under the new key, which alone signs.

A phase begins once the work of the one before is observed done (``Observed``: what the
shards, the signers and the chain say, never assumed) and the operator approved it.
Pure: the operator's reconciler observes, and records the phase it returns.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from constellation.bitcoin import p2tr_script
from constellation.codec import decode_json
from constellation.ecash.onchain import Coin, Withdrawal, sweep
from constellation.errors import MessageError
from constellation.guild import guild_output, owned_derivation
from constellation.hashing import tagged_hasher
from constellation.protocol.signer import KeyInfo


class Kind(StrEnum):
    JOIN = "join"
    LEAVE = "leave"


class Phase(StrEnum):
    PROPOSED = "Proposed"
    LEARNING = "Learning"
    VOTING = "Voting"
    RESHARING = "Resharing"
    MOVING = "Moving"
    DONE = "Done"


def phases(kind: Kind) -> list[Phase]:
    steps = [Phase.VOTING, Phase.RESHARING, Phase.MOVING, Phase.DONE]
    return [Phase.PROPOSED, *([Phase.LEARNING] if kind is Kind.JOIN else []), *steps]


# What each phase's work is, as a phase waiting for it says.
WORK = {
    Phase.PROPOSED: "nothing",
    Phase.LEARNING: "the joiner's copies to hold every shard's log",
    Phase.VOTING: "every shard to confirm its new voters",
    Phase.RESHARING: "the new members' key (their DKG)",
    Phase.MOVING: "the move of the on-chain funds to the new key, confirmed, and the handover",
}


@dataclass(frozen=True)
class Change:
    """``member`` joins or leaves a guild whose voting members are ``members``; the
    new key needs ``threshold`` signers."""

    kind: Kind
    member: str
    members: tuple[str, ...]
    threshold: int

    @property
    def after(self) -> tuple[str, ...]:
        """The members once the change is done (a joiner comes last)."""
        if self.kind is Kind.JOIN:
            return (*self.members, self.member)
        return tuple(m for m in self.members if m != self.member)

    def malformed(self) -> str:
        """Why this change cannot be made, or ''."""
        if len(set(self.members)) != len(self.members):
            return "two members share a name"
        if self.kind is Kind.JOIN and self.member in self.members:
            return f"{self.member} is a member already"
        if self.kind is Kind.LEAVE and self.member not in self.members:
            return f"{self.member} is not a member"
        n = len(self.after)
        if n < 2:
            return "a guild keeps at least two members"
        if not n // 2 < self.threshold <= n:
            return f"the new key's threshold must be a majority of {n} members, at most {n}"
        return ""


@dataclass(frozen=True)
class Observed:
    """What the guild shows of the change's work."""

    learned: bool = False  # every shard names the joiner a learner, and it holds the log
    voted: bool = False  # every shard's voters are the new members alone, confirmed
    new_key: bytes = b""  # the key the new members' DKG made (33 bytes)
    moved: str = ""  # the txid of the funds' move, confirmed (or "none": nothing held),
    # once the checkpoints are handed over to the new key and the old one is retired


def work_done(phase: Phase, seen: Observed) -> bool:
    return {
        Phase.PROPOSED: True,
        Phase.LEARNING: seen.learned,
        Phase.VOTING: seen.voted,
        Phase.RESHARING: len(seen.new_key) == 33,
        Phase.MOVING: bool(seen.moved),
        Phase.DONE: True,
    }[phase]


def advance(
    kind: Kind, phase: Phase, seen: Observed, approved: Collection[Phase]
) -> tuple[Phase, str]:
    """The phase a change in ``phase`` is in now, and what it waits for ('' if
    nothing): the next phase once this one's work is done and the next is approved (the
    end needs no approval)."""
    order = phases(kind)
    if phase not in order:
        raise ValueError(f"a {kind} change has no phase {phase}")
    if phase is Phase.DONE:
        return phase, ""
    if not work_done(phase, seen):
        return phase, f"waiting for {WORK[phase]}"
    following = order[order.index(phase) + 1]
    if following is not Phase.DONE and following not in approved:
        return phase, f"waiting for approval of {following}"
    return following, ""


_move_label = tagged_hasher("Constellation/move-label")


def move_label(new_key: bytes) -> bytes:
    """The label of the address of ``new_key``'s that a member's coins move to."""
    return _move_label(new_key)


def move_funds(
    coins: Sequence[Coin], new_key: bytes, owner: bytes, feerate: int, max_fee_sat: int
) -> Withdrawal | None:
    """The spend that moves the guild's ``coins`` that member ``owner`` holds to its
    address under ``new_key`` (``move_label``: the member holds it there too): as many
    as one transaction takes (``onchain.sweep``: the next move takes the rest); the old
    key signs each input (``onchain.spend_requests``). None where
    there is nothing to move or the fee is too high."""
    address = guild_output(new_key, owned_derivation(owner, move_label(new_key)))
    return sweep(coins, p2tr_script(address.xonly), feerate, max_fee_sat)


# -- the new key, at one operator ----------------------------------------------------------


class KeyPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The guild key an operator agreed its guild re-makes after a change of members,
    kept in its NATS KV, where its own services act on it: made among ``members``
    (member indices, in order), ``t`` of them signing; with ``move``, its mint moves the
    guild's coins it holds to that key, once made."""

    members: list[int]
    t: int
    move: bool = False

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    def malformed(self, n: int) -> str:
        """Why a guild of ``n`` members cannot make this key, or ''."""
        m = self.members
        if not m or sorted(set(m)) != m or not 0 <= m[0] <= m[-1] < n:
            return f"its members must be distinct member indices below {n}, in order"
        if not len(m) // 2 < self.t <= len(m):
            return f"its threshold must be a majority of its {len(m)} members, at most all"
        return ""


def decode_plan(data: bytes) -> KeyPlan:
    return decode_json(data, KeyPlan, "key plan")


class KeysSeen(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an operator's services report of its key plan: the plan they act on, the
    key made for it (empty until then), the moves of the coins to it, and whether the
    checkpoints are handed over to it and its signer retired the keys before it."""

    members: list[int]
    t: int
    key: bytes = b""
    txids: list[str] = []  # the moves sent or under way
    moved: bool = False  # every coin its mint holds is under the key, in a block
    handed: bool = False  # its checkpoints are signed by the key, which alone signs
    waiting: str = ""  # what they wait for ('' once done)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    def of(self, plan: KeyPlan) -> bool:
        """Whether this report is about ``plan``'s key."""
        return (self.members, self.t) == (plan.members, plan.t)


def decode_seen(data: bytes) -> KeysSeen:
    seen = decode_json(data, KeysSeen, "keys seen")
    if seen.key and len(seen.key) != 33:
        raise MessageError("keys seen: a key is 33 bytes")
    return seen


class KeyStep(StrEnum):
    AGREE = "agree"  # tell the signer its operator agrees to the plan's key
    KEYGEN = "keygen"  # coordinate the DKG (the plan's first member does)
    MOVE = "move"  # ask the mint to move the coins it holds to the key
    HAND_OVER = "hand_over"  # the checkpoints hand over to the key (its indexer proposes)
    RETIRE = "retire"  # the signer signs with the key alone (``op.activate_key``)
    WAIT = "wait"


def planned(plan: KeyPlan, held: Sequence[KeyInfo]) -> KeyInfo | None:
    """The key made for ``plan`` among those the signer holds (the newest such)."""
    made = [k for k in held if (k.members, k.t) == (plan.members, plan.t)]
    return made[-1] if made else None


def key_step(
    plan: KeyPlan,
    me: int,
    held: Sequence[KeyInfo],
    agreed: KeyInfo | None,
    to_move: bool,
    moved: bool = False,
    handed: bool = False,
) -> tuple[KeyStep, str]:
    """What member ``me``'s services do next for ``plan``, given the keys its signer
    holds (the one it signs with first), the key it agreed to, whether its mint holds
    coins under another key that may move (confirmed, no move under way), whether every
    coin is under the plan's key (``moved``), and whether the checkpoints are signed by
    it (``handed``); and what they wait for."""
    made = planned(plan, held)
    if made is None:
        if me not in plan.members:
            return KeyStep.WAIT, "the new members' key (this member takes no part)"
        if agreed is None or (agreed.members, agreed.t) != (plan.members, plan.t):
            return KeyStep.AGREE, ""
        if me == plan.members[0]:
            return KeyStep.KEYGEN, ""
        return KeyStep.WAIT, f"member {plan.members[0]} to make the key"
    if not plan.move:
        return KeyStep.WAIT, "approval to move the coins"
    if to_move:
        return KeyStep.MOVE, ""
    if not moved or me not in plan.members:
        return KeyStep.WAIT, ""
    if not handed:
        return KeyStep.HAND_OVER, "the checkpoints' handover to the key"
    if held[0].key != made.key:
        return KeyStep.RETIRE, ""
    return KeyStep.WAIT, ""
