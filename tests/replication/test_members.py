"""A shard's members change one at a time through its log: the quorums of each step meet
those of the step before (checked over every set of copies), and copies of one shard
take a joiner in, let a leaver go, refuse changes the guild did not agree to, and keep
every confirmed block across all of it."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given

from constellation.errors import MessageError
from constellation.protocol import replication as rp
from constellation.replication import members as mb
from constellation.replication.quorum import Copy
from constellation.replication.replica import Role
from tests.replication.harness import KEYS, Shard
from tests.sim.guild import Payments

THREE = mb.genesis(range(3))


def quorums(m: rp.Members, elect: bool) -> list[frozenset[Copy]]:
    """The minimal sets of copies that elect (or, for any leader, confirm) under ``m``."""
    copies = [(op, k) for op in sorted(m.operators()) for k in (0, 1)]
    found: list[frozenset[Copy]] = []
    for size in range(1, len(copies) + 1):
        for chosen in itertools.combinations(copies, size):
            s = frozenset(chosen)
            if any(q <= s for q in found):
                continue
            needed = mb.quorums(m)
            ok = (
                mb.elects(needed, s)
                if elect
                else any(mb.confirming(needed, s, mine) for mine in m.voters)
            )
            if ok:
                found.append(s)
    return found


def meet(a: list[frozenset[Copy]], b: list[frozenset[Copy]]) -> bool:
    return all(x & y for x in a for y in b)


def test_each_step_s_quorums_meet_the_step_before() -> None:
    """A leader elected under a step meets every election and every confirmation of the
    step before, for joins and leaves from one to four operators; two steps apart (the
    members before and after a change) they need not, which is why the joint step is
    there."""
    cases = [(n, [*range(n), n]) for n in range(1, 5)] + [
        (n, list(range(1, n))) for n in range(2, 5)
    ]
    for n, goal in cases:
        steps = [mb.genesis(range(n)), *mb.plan(mb.genesis(range(n)), goal)]
        for a, b in itertools.pairwise(steps):
            assert mb.next_ok(a, b) == "", (a, b)
            elect_b = quorums(b, elect=True)
            assert meet(elect_b, quorums(a, elect=True)), (a, b)
            assert meet(elect_b, quorums(a, elect=False)), (a, b)
            assert meet(quorums(a, elect=True), quorums(b, elect=False)), (a, b)
    # Without the joint step, three operators and a fourth share no quorum.
    four = mb.genesis(range(4))
    assert not meet(quorums(four, elect=True), quorums(THREE, elect=False))


operator_sets = st.sets(st.integers(0, 6), min_size=1, max_size=5)


@given(operator_sets, st.sets(st.integers(0, 6), max_size=3), operator_sets)
def test_a_plan_takes_legal_steps_to_its_goal(
    voters: set[int], learners: set[int], goal: set[int]
) -> None:
    cur = rp.Members(sorted(voters), [], sorted(learners - voters))
    steps = mb.plan(cur, goal)
    m = cur
    for step in steps:
        assert mb.next_ok(m, step) == ""
        assert len(set(step.voters) ^ set(m.voters)) <= 1
        m = step
    assert set(m.voters) == goal and not m.old
    assert not set(m.learners) & goal


def test_steps_the_guild_did_not_plan_are_refused() -> None:
    learning = rp.Members([0, 1, 2], [], [3])
    assert "learned" in mb.next_ok(THREE, rp.Members([0, 1, 2, 3], [0, 1, 2]))
    assert "one member" in mb.next_ok(learning, rp.Members([0, 1, 3], [0, 1, 2]))
    assert "one member" in mb.next_ok(THREE, rp.Members([0], [0, 1, 2]))
    assert "joint" in mb.next_ok(THREE, rp.Members([0, 1]))
    assert "ends" in mb.next_ok(rp.Members([0, 1], [0, 1, 2]), rp.Members([0, 1, 2]))
    assert "sorted" in mb.malformed(rp.Members([2, 1]))
    assert "both" in mb.malformed(rp.Members([0, 1], [], [1]))
    assert "no voters" in mb.malformed(rp.Members([]))


# -- one shard's copies ------------------------------------------------------------------


def joining() -> tuple[Shard, list[rp.Members]]:
    steps = mb.plan(THREE, [0, 1, 2, 3])
    shard = Shard(members=[THREE, *steps])
    shard.until(lambda: shard.leader() == 0)
    return shard, steps


def drive(shard: Shard, steps: list[rp.Members]) -> None:
    """Take each step as its leader allows."""
    for i, step in enumerate(steps):

        def taken(i: int = i, step: rp.Members = step) -> bool:
            lead = shard.leader()
            if lead is None:
                return False
            r = shard.replicas[lead]
            if r.members in steps[i:]:
                return r.confirmed >= r.changed_at
            if mb.next_ok(r.members, step) == "":
                r.change(step)
                shard.flush(lead)
            return False

        shard.until(taken)


def test_a_joiner_learns_then_votes_and_its_copies_count() -> None:
    shard, steps = joining()
    paid = shard.pay(5)
    shard.until(lambda: shard.confirmed_everywhere(paid, [0, 1, 2, 3, 4, 5]))
    assert shard.replicas[6].last == 0  # not a member: nobody sends it the log
    learn, joint, final = steps
    leader = shard.replicas[0]
    assert "learned" in leader.change(joint)
    assert leader.change(learn) == ""
    shard.flush(0)
    shard.until(lambda: shard.confirmed_everywhere(leader.last))
    shard.stop(6, 7)
    shard.run(0.5)
    assert "not caught up" in leader.change(joint)
    shard.restart(6, 7)
    drive(shard, [joint, final])
    shard.until(lambda: all(r.members == final for r in shard.replicas))
    assert {r.last for r in shard.replicas} == {leader.last}
    # Five of eight copies now: the four of operators 0 and 2 no longer confirm alone.
    shard.stop(2, 3, 6, 7)
    stuck = shard.pay()
    shard.run(1.0)
    assert leader.confirmed < stuck
    shard.restart(6)
    shard.until(lambda: leader.confirmed >= stuck)
    apps = [a for a in shard.apps if isinstance(a, Payments)]
    assert len(apps[6].state) == 6  # the joiner executed every payment


def test_a_joiner_far_behind_catches_up_from_a_snapshot() -> None:
    shard, steps = joining()
    for _ in range(40):  # past snapshot_every: the first blocks are compacted away
        shard.pay()
        shard.run(0.02)
    shard.until(lambda: shard.replicas[0].snap.height > 0)
    drive(shard, steps)
    shard.until(lambda: shard.confirmed_everywhere(shard.replicas[0].last))
    joiner = shard.replicas[6]
    assert joiner.counters.snapshots_installed == 1
    assert joiner.members == steps[-1] and joiner.state_root() == shard.replicas[0].state_root()


def test_a_restarted_copy_resumes_the_members_in_its_log() -> None:
    shard, steps = joining()
    drive(shard, steps[:1])
    shard.stop(4)
    shard.restart(4)
    assert shard.replicas[4].members == steps[0]


def test_the_owner_leaves_its_copies_stop_counting_and_the_others_lead() -> None:
    steps = mb.plan(THREE, [1, 2])
    shard = Shard(members=[THREE, *steps])
    shard.until(lambda: shard.leader() == 0)
    paid = shard.pay(3)
    drive(shard, steps)
    shard.until(lambda: shard.leader() in {2, 3, 4, 5})
    new_leader = shard.replicas[shard.leader() or 0]
    assert new_leader.members == steps[-1] and new_leader.confirmed >= paid
    assert shard.replicas[0].role is Role.FOLLOWER
    # The leaver's copies can be gone: operators 1 and 2 confirm alone (3 of 4 copies),
    # with a leader at operator 2. Copy 2 led (the first preferred); its twin, copy 3, is
    # elected first but cannot confirm (operator 2's copies would make up the confirming
    # set alone): it steps down, a copy of operator 2 is elected and keeps leading.
    shard.stop(0, 1, 2)
    shard.until(lambda: shard.leader() in {3, 4, 5})
    more = shard.pay(2)
    shard.until(lambda: shard.confirmed_everywhere(more, [3, 4, 5]))
    shard.run(3.0)
    assert shard.leader() in {4, 5} and shard.replicas[3].counters.elections == 1
    # And a leaver no longer campaigns.
    shard.restart(0, 1)
    shard.run(3.0)
    assert shard.replicas[0].counters.elections == 0


def test_a_change_the_guild_did_not_agree_to_is_refused() -> None:
    steps = mb.plan(THREE, [0, 1, 2, 3])
    shard = Shard(members=[THREE, *steps])
    shard.until(lambda: shard.leader() == 0)
    leader = shard.replicas[0]
    assert "did not agree" in leader.change(rp.Members([0, 1, 2], [], [5]))
    # A leader that was told of another change than its followers: they refuse its block.
    rogue = rp.Members([0, 1, 2], [], [3])
    for c in range(1, 8):
        shard.replicas[c].agreed.pop(rp.members_hash(rogue, 1))
    assert leader.change(rogue) == ""
    shard.flush(0)
    shard.run(1.0)
    assert leader.confirmed < leader.last
    assert all(shard.replicas[c].counters.refused_blocks for c in range(1, 6))


def test_a_guild_back_to_voters_it_had_ends_its_change_there() -> None:
    """Operator 3 joins, then leaves: the last step's members are the founders' again.
    Named by their step, the change ends there. A leader at its end once found its
    members at the first step and took the whole change again (operator 3 learning and
    voting again, which nobody agreed to, then leaving again), for ever."""
    steps = mb.Agreement([[0, 1, 2], [0, 1, 2, 3], [0, 1, 2]]).steps()
    assert steps[-1] == steps[0] == THREE
    shard = Shard(members=steps)
    shard.until(lambda: shard.leader() == 0)
    taken: list[rp.Members] = []

    def ended() -> bool:
        lead = shard.leader()
        if lead is None:
            return False
        r = shard.replicas[lead]
        step = r.next_members()
        if step is None:
            return r.confirmed >= r.changed_at
        if r.change(step) == "":
            taken.append(step)
            shard.flush(lead)
        return False

    shard.until(ended)
    assert taken == steps[1:]
    leader = shard.replicas[shard.leader() or 0]
    assert leader.at_step == len(steps) - 1 and leader.members == THREE
    at = leader.changed_at
    paid = shard.pay(3)
    shard.until(lambda: shard.confirmed_everywhere(paid, list(range(6))))
    shard.run(1.0)
    assert leader.changed_at == at and leader.next_members() is None
    assert "did not agree" in leader.change(steps[1])  # the first step, taken again


def test_a_copy_that_does_not_vote_is_neither_elected_nor_followed() -> None:
    """Operator 3 learns the log; operator 0 (the owner) and a copy of operator 2 are
    down. A faulty copy of operator 3 campaigns as if the change were done (counting
    votes by its final members): the voters once granted it their votes and followed
    it, a learner leading the shard. Now a copy that does not vote gets no vote (unless
    its log is ahead), and a block led by one is refused."""
    learn, joint, final = mb.plan(THREE, [0, 1, 2, 3])
    shard = Shard(members=[THREE, learn, joint, final])
    shard.until(lambda: shard.leader() == 0)
    lead = shard.replicas[0]
    assert lead.change(learn) == ""
    shard.flush(0)
    shard.until(lambda: shard.confirmed_everywhere(lead.last))
    block = lead.log[-1]  # one the voters hold, as a copy of operator 3 would lead it
    shard.stop(0, 1, 4)
    shard.run(0.32)  # the owner's lease is over
    faulty = shard.replicas[6]
    faulty._votes = lambda copy: True  # type: ignore[method-assign]
    faulty.quorums = mb.quorums(final)
    faulty._prevote()
    shard.flush(6)
    shard.run(0.3)
    assert faulty.role is not Role.LEADER
    assert all(shard.replicas[c].leader != 6 for c in (2, 3, 5, 7))
    led = msgspec.structs.replace(
        block,
        signed=msgspec.structs.replace(
            block.signed, header=msgspec.structs.replace(block.signed.header, leader=6)
        ),
    )
    voter = shard.replicas[2]
    assert "does not vote" in voter._check(led, voter.term)


def test_votes_counted_under_members_of_an_earlier_step_elect_nobody() -> None:
    """Operator 2 left the shard. Its two copies' votes and one each of operators 0
    and 1 elect under the founders' members, not under those in effect: a certificate
    of them once made a copy follow operator 2's copy as leader."""
    steps = mb.plan(THREE, [0, 1])
    shard = Shard(members=[THREE, *steps])
    shard.until(lambda: shard.leader() == 0)
    drive(shard, steps)
    lead = shard.replicas[0]
    shard.until(lambda: shard.confirmed_everywhere(lead.last, [0, 1, 2, 3]))
    follower = shard.replicas[3]
    term = follower.term + 1

    def vote(voter: int) -> rp.Vote:
        digest = rp.vote_digest(0, 0, term, 4, follower.last_term, follower.last, voter)
        return rp.Vote(
            term, 4, follower.last_term, follower.last, voter, KEYS[voter // 2].sign(digest)
        )

    cert = [vote(4), vote(5), vote(1), vote(2)]
    assert mb.elects(mb.quorums(THREE), [divmod(v.voter, 2) for v in cert])
    assert not follower._cert_valid(term, 4, cert)


def test_an_agreement_to_learn_first_then_to_vote_extends_step_by_step() -> None:
    """A joiner's Learning is agreed before its Voting: the first agreement's steps end
    with its copies learning, and the second's continue from there (each extends the
    one before; nothing taken back). Malformed agreements are refused."""
    founders = mb.Agreement([[0, 1, 2]])
    learning = mb.Agreement([[0, 1, 2]], learning=[3])
    voting = mb.Agreement([[0, 1, 2], [0, 1, 2, 3]])
    assert learning.steps() == [THREE, rp.Members([0, 1, 2], [], [3])]
    assert voting.steps()[:2] == learning.steps() and len(voting.steps()) == 4
    assert learning.extends(founders) and voting.extends(learning) and voting.extends(founders)
    assert not founders.extends(learning)  # the learners' step taken back
    assert not mb.Agreement([[0, 1, 2]], learning=[4]).extends(learning)
    leaving = mb.Agreement([[0, 1, 2], [0, 1]])
    assert not leaving.extends(learning)
    for bad in (
        b'{"voters": [[0, 1, 2]], "learning": [2]}',
        b'{"voters": [[0, 1]], "learning": [3, 2]}',
    ):
        with pytest.raises(MessageError, match="learners are distinct non-voters"):
            mb.decode_agreement(bad)
    assert mb.decode_agreement(learning.encode()) == learning
