"""Who counts in a shard's replication, and how that changes: one member at a time.

A shard's members (``rp.Members``) live in its log: every block header names the members
in effect from it on (``Header.members``, a hash), so a copy knows them at every height,
a snapshot included, and a block that changes them is an ordinary block whose header
names others. A copy uses the latest members in its log, confirmed or not (Raft's rule).

A change goes through Raft's joint consensus (Raft thesis §4.3), over copies:

1. **Learn.** The joiner's copies become ``learners``: they get the log, never count.
2. **Joint.** Once they hold the log, the voters become the new set and ``old`` the
   previous one: a block confirms, and a leader is elected, only with quorums of both.
3. **New.** Once the joint block is confirmed, its leader appends the new members alone
   (every step waits for the one before to be confirmed). A leaver's copies no longer
   count from here; a leader whose operator left steps down once this block is
   confirmed.

Every confirming quorum and election quorum of one step meets every election quorum of
the next (joint quorums contain quorums of both), so no two leaders share a term and a
confirmed block is never lost across a change. Only the steps the guild agreed to are
taken: a copy refuses a block naming members it was not given (``Replica`` 's
``members``), and ``plan`` spells those steps out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import msgspec

from constellation.codec import decode_json
from constellation.errors import MessageError
from constellation.protocol.replication import Members
from constellation.replication.quorum import COPIES_PER_OPERATOR, Copy, Quorums


def genesis(operators: Iterable[int]) -> Members:
    """The members of a shard whose every operator votes from its first block."""
    return Members(sorted(set(operators)))


def malformed(m: Members) -> str:
    """Why ``m`` is not a well-formed set of members, or ''."""
    for name, ops in (("voters", m.voters), ("old", m.old), ("learners", m.learners)):
        if ops != sorted(set(ops)) or any(op < 0 for op in ops):
            return f"{name} are not sorted, distinct operator numbers"
    if not m.voters:
        return "no voters"
    if set(m.voters) & set(m.learners):
        return "an operator both votes and learns"
    return ""


def next_ok(cur: Members, new: Members) -> str:
    """Why ``new`` may not follow ``cur`` in a shard's log, or ''."""
    why = malformed(new)
    if why:
        return why
    voters, before = set(new.voters), set(cur.voters)
    if cur.old:
        if new.old or voters != before or new.learners != cur.learners:
            return "a joint change ends with its new voters alone"
        return ""
    if not new.old:
        if voters != before:
            return "voters change only through a joint step"
        return "" if new.learners != cur.learners else "the same members"
    if set(new.old) != before:
        return "a joint step keeps the voters before it as old"
    changed = voters ^ before
    if len(changed) != 1:
        return "one member joins or leaves at a time"
    (op,) = changed
    if op in voters:
        if op not in cur.learners:
            return f"operator {op} votes before it learned the log"
        if set(new.learners) != set(cur.learners) - {op}:
            return "the joiner leaves the learners, the others stay"
    elif new.learners != cur.learners:
        return "a leaver's step keeps the learners"
    return ""


def plan(cur: Members, voters: Iterable[int]) -> list[Members]:
    """The members a shard goes through from ``cur`` to ``voters`` alone (no learners
    left of those joining): joiners first, then leavers, one at a time."""
    goal = set(voters)
    if not goal:
        raise ValueError("a shard keeps at least one voter")
    steps: list[Members] = []
    m = cur
    if m.old:
        m = Members(m.voters, [], m.learners)
        steps.append(m)
    for op in sorted(goal - set(m.voters)):
        if op not in m.learners:
            m = Members(m.voters, [], sorted({*m.learners, op}))
            steps.append(m)
        learners = sorted(set(m.learners) - {op})
        m = Members(sorted({*m.voters, op}), m.voters, learners)
        steps.append(m)
        m = Members(m.voters, [], learners)
        steps.append(m)
    for op in sorted(set(m.voters) - goal):
        m = Members(sorted(set(m.voters) - {op}), m.voters, m.learners)
        steps.append(m)
        m = Members(m.voters, [], m.learners)
        steps.append(m)
    return steps


def quorums(m: Members) -> list[Quorums]:
    """The quorums each needed under ``m``: the voters', and the old ones' if joint
    (a copy computes them once per change of members, not per message)."""
    return [Quorums.among(group) for group in ([m.voters, m.old] if m.old else [m.voters])]


def elects(needed: Sequence[Quorums], votes: Iterable[Copy]) -> bool:
    """Whether these copies' votes elect a leader under the members of ``needed``
    (``quorums``)."""
    found = set(votes)
    return all(q.elects(c for c in found if c[0] in q.members) for q in needed)


def confirming(needed: Sequence[Quorums], copies: Iterable[Copy], mine: int) -> bool:
    """Whether a leader of operator ``mine`` may confirm a block these copies hold: in
    each of ``needed`` a confirming quorum, which keeps two copies once any one other
    operator's are taken away (an operator acking what it did not store cannot alone
    make a confirmed block depend on it)."""
    found = set(copies)
    for q in needed:
        held = [c for c in found if c[0] in q.members]
        per_operator = Counter(op for op, _ in held)
        if not q.confirms(held) or any(
            len(held) - n < 2 for op, n in per_operator.items() if op != mine
        ):
            return False
    return True


def copies_of(m: Members) -> list[int]:
    """The copy numbers of every operator that takes part in ``m``."""
    return [
        COPIES_PER_OPERATOR * op + k
        for op in sorted(m.operators())
        for k in range(COPIES_PER_OPERATOR)
    ]


def agreed(voter_sets: Sequence[Sequence[int]]) -> list[Members]:
    """Every step of the changes a guild agreed to, in order: its founders' members
    (``voter_sets[0]``), then the plan from each set of voters to the next."""
    if not voter_sets:
        raise ValueError("a guild has founders")
    steps = [genesis(voter_sets[0])]
    for voters in voter_sets[1:]:
        steps += plan(steps[-1], voters)
    return steps


class Agreement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an operator agreed its guild's voters become, in order (the founders
    first), and the operators whose copies learn every shard's log after the last
    voters (a joiner, before the guild agrees it votes): kept in its NATS KV, where its
    machines follow it (``agreed``)."""

    voters: list[list[int]]
    learning: list[int] = []

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    def steps(self) -> list[Members]:
        steps = agreed(self.voters)
        if self.learning:
            last = steps[-1]
            steps.append(Members(last.voters, [], sorted({*last.learners, *self.learning})))
        return steps

    def extends(self, before: Agreement) -> bool:
        """Whether this agreement takes every step ``before`` did, in the same order (a
        change of members is never taken back: copies may have taken its steps)."""
        mine, theirs = self.steps(), before.steps()
        return mine[: len(theirs)] == theirs


def decode_agreement(data: bytes) -> Agreement:
    found = decode_json(data, Agreement, "agreement on members")
    try:
        found.steps()
    except ValueError as exc:
        raise MessageError(f"bad agreement on members: {exc}") from None
    if any(op < 0 for voters in found.voters for op in [*voters, *found.learning]):
        raise MessageError("bad agreement on members: a negative operator")
    learning = found.learning
    if learning != sorted(set(learning)) or set(learning) & set(found.voters[-1]):
        raise MessageError("bad agreement on members: learners are distinct non-voters")
    return found
