"""One shard's six (or eight) copies: leadership, confirmation, catch-up, and the
Byzantine cases (an invalid block, equivocation, double votes, acks of what was never
stored, forged leadership)."""

from __future__ import annotations

import functools
from collections import Counter

import msgspec
import pytest

from constellation.errors import MessageError
from constellation.protocol import replication as rp
from constellation.replication.replica import (
    HOLD_LEADERSHIP,
    SEEN_LIMIT,
    TERM_STEP,
    Role,
    body_hash,
)
from tests.replication.harness import KEYS, SETTINGS, Shard, Tamper
from tests.sim.guild import Payments

HEARTBEATS = 6 * SETTINGS.heartbeat_s


def started(operators: int = 3) -> Shard:
    shard = Shard(operators)
    shard.until(lambda: shard.leader() == 0)
    return shard


def test_the_owners_copy_leads_and_a_block_confirms_at_every_copy() -> None:
    shard = started()
    height = shard.pay(3)
    shard.until(lambda: shard.confirmed_everywhere(height))
    roots = {r.state_root() for r in shard.replicas}
    assert len(roots) == 1
    assert all(len(app.state) == 3 for app in shard.apps if isinstance(app, Payments))


def test_the_twin_takes_over_when_the_leader_stops_then_hands_back() -> None:
    shard = started()
    shard.stop(0)
    took = shard.until(lambda: shard.leader() == 1)
    assert took < 2 * SETTINGS.election_s
    height = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(height))
    shard.restart(0)
    shard.until(lambda: shard.leader() == 0)
    assert shard.replicas[0].last >= height


def test_blocks_stand_for_the_leaders_heartbeat_and_a_quiet_shard_beats_again() -> None:
    """A copy sent blocks within the last heartbeat gets no empty Append besides (each
    Append names the term, the last block before its own and the confirmed height); once
    the shard is quiet, every copy is sent its heartbeat again, and no one campaigns."""
    shard = started()
    sent: list[tuple[int, bool]] = []  # (to, an empty Append), from the leader

    def record(src: int, dst: int, msg: rp.Message) -> list[rp.Message]:
        if src == 0 and isinstance(msg, rp.Append):
            sent.append((dst, not msg.blocks))
        return [msg]

    shard.tamper = record
    elections = sum(r.counters.elections for r in shard.replicas)
    for _ in range(50):  # a block every 2/5 of a heartbeat, for 20 heartbeats
        height = shard.pay()
        shard.run(0.4 * SETTINGS.heartbeat_s)
    busy = Counter(sent)
    sent.clear()
    shard.until(lambda: shard.confirmed_everywhere(height))
    shard.run(20 * SETTINGS.heartbeat_s)
    quiet = Counter(sent)
    followers = range(1, shard.copies)
    assert all(busy[c, False] >= 50 for c in followers), busy
    assert not any(busy[c, True] for c in followers), busy
    assert all(quiet[c, True] >= 15 for c in followers), quiet
    assert shard.leader() == 0
    assert sum(r.counters.elections for r in shard.replicas) == elections


def test_the_other_operators_elect_a_leader_when_the_owner_is_down() -> None:
    shard = started()
    before = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(before))
    shard.stop(0, 1)
    shard.until(lambda: shard.leader() in {2, 3, 4, 5})
    height = shard.pay(2)
    shard.until(lambda: shard.confirmed_everywhere(height))
    shard.restart(0, 1)
    shard.until(lambda: shard.leader() == 0 and shard.confirmed_everywhere(height))
    assert len({r.state_root() for r in shard.replicas}) == 1


def test_the_owner_alone_confirms_nothing_and_steps_down() -> None:
    shard = started()
    shard.isolate({0, 1})
    term = shard.replicas[0].term
    height = shard.pay()
    shard.run(2 * SETTINGS.election_s)
    assert shard.replicas[0].confirmed < height
    assert shard.replicas[0].role is not Role.LEADER  # CheckQuorum
    shard.until(lambda: shard.leader() in {2, 3, 4, 5})
    assert shard.replicas[shard.leaders()[0]].term > term


def test_four_operators_confirm_on_five_copies() -> None:
    shard = started(operators=4)
    shard.stop(2, 3, 4)  # three of eight copies down: still 5
    height = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(height))
    shard.stop(5)  # four down: nothing more confirms
    stuck = shard.pay()
    shard.run(1.0)
    assert shard.replicas[0].confirmed < stuck


def test_a_copy_far_behind_catches_up_from_a_snapshot() -> None:
    shard = started()
    shard.stop(5)
    for _ in range(SETTINGS.snapshot_every + SETTINGS.keep + 8):
        shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    assert shard.replicas[0].first > 1  # the log was truncated behind a snapshot
    shard.restart(5)
    shard.until(lambda: shard.replicas[5].last == shard.replicas[0].last)
    assert shard.replicas[5].counters.snapshots_installed == 1
    assert shard.apps[5].snapshot() == shard.apps[0].snapshot()
    assert shard.replicas[5].state_root() == shard.replicas[0].state_root()


def test_a_snapshot_the_leader_made_up_is_not_installed() -> None:
    """A leader's operator signs a header over a state no block made (a payment of its
    own), chained to the confirmed block, with its two copies' acks: an honest copy
    behind does not take it (before: it installed it, called it confirmed and acked it,
    which with the leader's two copies confirmed it). The real snapshot, proven by the
    acks of honest copies, is still taken."""
    shard = started()
    for _ in range(3):
        height = shard.pay()
    shard.until(functools.partial(shard.confirmed_everywhere, height))
    leader, victim = shard.replicas[0], shard.replicas[2]
    state, confirmed = shard.apps[2].snapshot(), victim.confirmed
    forged = Payments()
    forged.restore(shard.apps[0].snapshot())
    root = forged.execute(msgspec.msgpack.encode([(999, 10**12)]), True)
    data = forged.snapshot()
    header = rp.Header(
        0, 0, leader.term, height + 1, leader.hash_at(height), bytes(32), root, 0, 0,
        leader.members_hash,
    )  # fmt: skip
    signed = rp.Signed(header, KEYS[0].sign(rp.header_hash(header)))
    acks = [
        rp.Ack(c, leader.term, height + 1, rp.header_hash(header), KEYS[0].sign(
            rp.ack_digest(0, 0, leader.term, height + 1, rp.header_hash(header), c)
        ))
        for c in (0, 1)
    ]  # fmt: skip
    before = victim.counters.refused_messages
    for proof in ([], acks):
        victim.step(0, rp.Chunk(leader.term, signed, 0, len(data), data, [], proof))
        answers = victim.ready().messages
        assert not any(isinstance(m, rp.Appended) and m.ok for _, m in answers)
    assert victim.counters.refused_messages == before + 2
    assert victim.counters.snapshots_installed == 0
    assert (victim.confirmed, shard.apps[2].snapshot()) == (confirmed, state)

    shard.stop(5)
    for _ in range(SETTINGS.snapshot_every + SETTINGS.keep + 8):
        shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    shard.stop(0)  # the twin leads and proves the snapshot with acks of its own term
    shard.until(lambda: shard.leader() == 1)
    shard.restart(5)
    shard.until(lambda: shard.replicas[5].last == shard.replicas[1].last)
    assert shard.replicas[5].counters.snapshots_installed == 1
    assert shard.replicas[5].state_root() == shard.replicas[1].state_root()


def test_under_steady_load_every_copy_snapshots_with_a_short_proof() -> None:
    """Blocks proposed as fast as the window lets, for a while: every copy, the followers
    too, takes its snapshots (proven by the acks the leader sends on its blocks) and keeps
    its log short; each proof is a few headers. (A first version of this change dropped
    the followers' acks whenever a caught-up copy's ack moved the confirmed height: they
    never snapshotted.)"""
    shard = started()
    while shard.replicas[0].last < 20 * SETTINGS.snapshot_every:
        if shard.replicas[0].can_propose():
            shard.pay()
        shard.run(0.01)
    shard.until(functools.partial(shard.confirmed_everywhere, shard.replicas[0].last))
    for r in shard.replicas:
        assert r.snap.height >= 18 * SETTINGS.snapshot_every, (r.me, r.snap.height)
        assert len(r.log) <= 2 * SETTINGS.snapshot_every + SETTINGS.keep
        assert r.snap.proof is not None and len(r.snap.proof[0]) <= 4 * SETTINGS.window


def test_an_invalid_block_is_refused_by_every_honest_copy() -> None:
    shard = started()
    good = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(good))
    leader = shard.replicas[0]
    # The same payment again, with the root the leader claims: never valid.
    body = msgspec.msgpack.encode([(1, 10)])
    bad = leader.propose(body, leader.state_root())
    shard.flush(0)
    shard.run(5 * SETTINGS.heartbeat_s)
    for c in range(1, 6):
        r = shard.replicas[c]
        assert r.last < bad
        assert r.counters.refused_blocks >= 1
    assert leader.confirmed < bad


def _alternative(block: rp.Block, key_index: int) -> rp.Block:
    """Another block at the same (term, height): empty, the state unchanged."""
    header = block.signed.header
    other = rp.Header(
        header.owner,
        header.worker,
        header.term,
        header.height,
        header.prev,
        body_hash(b""),
        header.root,
        header.leader,
        header.time_ms,
        header.members,
    )
    return rp.Block(rp.Signed(other, KEYS[key_index].sign(rp.header_hash(other))), b"")


def test_an_equivocating_leader_is_proven_faulty_and_excluded() -> None:
    shard = started()
    warmup = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(warmup))
    # The leader (operator 0) tells operator 2 a different story than operator 1.
    swapped: dict[bytes, rp.Block] = {}

    def tamper(src: int, dst: int, msg: rp.Message) -> list[rp.Message]:
        if src // 2 == 0 and dst // 2 == 2 and isinstance(msg, rp.Append) and msg.blocks:
            blocks = []
            for b in msg.blocks:
                key = rp.header_hash(b.signed.header)
                if key not in swapped:
                    swapped[key] = _alternative(b, 0)
                blocks.append(swapped[key])
            return [
                rp.Append(msg.term, msg.prev_height, msg.prev_hash, blocks, msg.confirmed, msg.cert)
            ]
        return [msg]

    shard.tamper = tamper
    shard.pay(2)
    honest = [2, 3, 4, 5]
    took = shard.until(lambda: all(0 in shard.replicas[c].evidence for c in honest))
    assert took < 10 * SETTINGS.heartbeat_s
    proof = shard.replicas[2].evidence[0]
    assert isinstance(proof, rp.Equivocation)
    assert shard.replicas[4].check_evidence(proof) == 0
    shard.tamper = None
    shard.until(lambda: shard.leader() in honest)
    after = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(after, honest))
    for c in honest:  # operator 0 no longer counts: its copies get no votes
        assert 0 in shard.replicas[c].evidence


def test_a_double_vote_is_proven_from_two_certificates() -> None:
    shard = started()
    leader = shard.replicas[0]
    term = leader.term
    voter = next(v for v in leader.cert if v.voter == 2)  # operator 1's copy voted for 0
    digest = rp.vote_digest(0, 0, term, 3, voter.last_term, voter.last_height, 2)
    second = rp.Vote(term, 3, voter.last_term, voter.last_height, 2, KEYS[1].sign(digest))
    # Operator 1's other copy claims term ``term`` too, showing its vote for itself.
    forged = rp.Append(term, 0, bytes(32), [], 0, [second])
    shard.queue.append((3, 4, rp.encode(rp.Envelope(0, 0, 3, forged))))
    shard.deliver()
    copy = shard.replicas[4]
    assert copy.leader == 0  # the forged leader was not followed
    proof = copy.evidence[1]
    assert isinstance(proof, rp.DoubleVote)
    assert copy.check_evidence(proof) == 1
    shard.run(3 * SETTINGS.heartbeat_s)
    assert all(1 in shard.replicas[c].evidence for c in (0, 1, 4, 5))


def test_a_leader_without_a_certificate_is_not_followed() -> None:
    shard = started()
    copy = shard.replicas[3]
    before = (copy.term, copy.leader, copy.counters.refused_messages)
    forged = rp.Append(before[0] + 5, 0, bytes(32), [], 0, [])
    shard.queue.append((5, 3, rp.encode(rp.Envelope(0, 0, 5, forged))))
    shard.deliver()
    assert (copy.term, copy.leader) == before[:2]
    assert copy.counters.refused_messages == before[2] + 1


def test_acks_that_were_never_stored_cannot_confirm_alone() -> None:
    shard = started()
    shard.liars = {4, 5}  # operator 2 acks without storing
    shard.stop(1, 2, 3)
    height = shard.pay()
    shard.run(1.0)
    # Three acks (0, 4, 5), but without operator 2 only the leader holds it.
    assert shard.replicas[0].confirmed < height
    shard.restart(2)
    shard.until(lambda: shard.replicas[0].confirmed >= height)


def test_a_stale_leader_paused_by_a_partition_confirms_nothing() -> None:
    shard = started()
    shard.isolate({0})
    stale = shard.pay()
    shard.until(lambda: shard.leader() is not None and shard.leader() != 0, limit=5)
    new = shard.leader()
    assert new is not None
    fresh = shard.pay()
    shard.cut = set()
    shard.until(lambda: shard.confirmed_everywhere(fresh))
    assert shard.replicas[0].role is not Role.LEADER or shard.replicas[0].term > 1
    # The stale block at ``stale`` was replaced: every copy agrees on every height.
    hashes = {r.hash_at(stale) for r in shard.replicas if r.first <= stale}
    assert len(hashes) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x92\x01",
        msgspec.msgpack.encode([0, 0, 1, ["a", 1, 0, b"short", [], 0, []]]),
        msgspec.msgpack.encode([0, 0, 1, ["z", 1]]),
        msgspec.msgpack.encode([0, 0, 1, ["b", 1, True, 0, b"", b"", "", "extra"]]),
    ],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(MessageError):
        rp.decode(data)


# -- found by review: each a sequence that once broke a property -----------------------


def _other_blocks_to_operator_2() -> Tamper:
    """The leader (copy 0) tells operator 2's copies other blocks than everyone else."""
    swapped: dict[bytes, rp.Block] = {}

    def tamper(src: int, dst: int, msg: rp.Message) -> list[rp.Message]:
        if src == 0 and dst // 2 == 2 and isinstance(msg, rp.Append) and msg.blocks:
            blocks = [
                swapped.setdefault(rp.header_hash(b.signed.header), _alternative(b, 0))
                for b in msg.blocks
            ]
            return [
                rp.Append(msg.term, msg.prev_height, msg.prev_hash, blocks, msg.confirmed, msg.cert)
            ]
        return [msg]

    return tamper


def test_a_junk_head_does_not_hide_an_equivocation() -> None:
    shard = started()
    warm = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(warm))
    leader = shard.replicas[0]
    # First a header at the next height naming another operator's copy, badly signed.
    zero = bytes(32)
    junk = rp.Signed(rp.Header(0, 0, leader.term, warm + 1, zero, zero, zero, 4, 0, zero), zero * 2)
    for c in range(2, 6):
        shard.queue.append((0, c, rp.encode(rp.Envelope(0, 0, 0, rp.Head(junk)))))
    shard.deliver()
    assert all(shard.replicas[c].counters.refused_messages for c in range(2, 6))
    shard.tamper = _other_blocks_to_operator_2()
    shard.pay(2)
    shard.until(lambda: all(0 in shard.replicas[c].evidence for c in range(2, 6)))


def test_a_flood_of_heads_at_new_terms_stays_bounded_and_hides_no_equivocation() -> None:
    """Another operator's copy sends headers it signed, each at a new term and a height
    within the log's: a copy remembers at most ``SEEN_LIMIT`` of them, rebuilding its
    memory once per half a limit of them (before: it kept all, and rebuilt it on every
    one past the limit, its CPU quadratic in the flood), and the leader's equivocation
    afterwards is still proven."""
    shard = started()
    warm = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(warm))
    victim = shard.replicas[2]
    rebuilt = 0
    for term in range(10, 10 + 3 * SEEN_LIMIT):
        header = rp.Header(0, 0, term, warm, bytes(32), bytes(32), bytes(32), 4, 0, bytes(32))
        before = victim.seen
        victim.step(4, rp.Head(rp.Signed(header, KEYS[2].sign(rp.header_hash(header)))))
        rebuilt += victim.seen is not before
        assert len(victim.seen) <= SEEN_LIMIT
    assert rebuilt <= 6
    assert not victim.evidence
    shard.tamper = _other_blocks_to_operator_2()
    shard.pay(2)
    shard.until(lambda: 0 in victim.evidence)


def test_a_copy_that_lost_acked_blocks_catches_up_and_votes_again_in_a_later_term() -> None:
    shard = started()
    for _ in range(3):
        shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    shard.stop(5)
    shard.disks[5].blocks = shard.disks[5].blocks[:-2]  # a corrupt tail, cut
    shard.disks[5].damaged = True
    shard.restart(5)
    shard.run(1.0)
    copy, leader = shard.replicas[5], shard.replicas[0]
    assert copy.last == leader.last  # the leader went back below what it had acked
    assert copy.damaged  # its own disk may hold blocks of this term: not proof enough
    shard.stop(0)
    shard.until(lambda: shard.leader() == 1)
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    assert not copy.damaged


def test_copies_ahead_in_term_and_copies_ahead_in_log_still_elect() -> None:
    shard = started()
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    term = shard.replicas[0].term
    shard.stop(0, 1)

    def only_copy_3_campaigns(src: int, dst: int, msg: rp.Message) -> list[rp.Message]:
        if isinstance(msg, rp.AskVote) and (src != 3 or (not msg.pre and dst not in (2, 4))):
            return []
        return [msg]

    shard.tamper = only_copy_3_campaigns
    shard.until(lambda: any(shard.replicas[c].term > term for c in range(2, 6)), limit=5)
    shard.tamper = None
    shard.down -= {0, 1}
    shard.isolate({0, 1, 5})
    shard.pay()  # the old leader confirms one more block on 0, 1 and 5
    shard.deliver()
    shard.stop(5)
    shard.run(2 * SETTINGS.election_s)
    shard.restart(5)
    shard.cut = set()
    shard.until(lambda: shard.leader() is not None, limit=10)


def test_a_snapshot_transfer_starts_over_when_the_leader_snapshots_again() -> None:
    shard = started()
    shard.stop(5)
    for _ in range(SETTINGS.snapshot_every + SETTINGS.keep + 8):
        shard.until(functools.partial(shard.confirmed_everywhere, shard.pay(20)))
    leader = shard.replicas[0]
    cut = [True]
    shard.tamper = lambda src, dst, m: (
        [] if cut[0] and isinstance(m, rp.Chunk) and m.offset >= 512 else [m]
    )
    shard.restart(5)
    shard.until(lambda: leader.progress[5].offset >= 512)
    old = leader.snap.height
    while leader.snap.height == old:
        shard.pay(20)
        shard.deliver()
    cut[0] = False
    shard.until(lambda: shard.replicas[5].last == leader.last, limit=2)
    assert shard.replicas[5].state_root() == leader.state_root()


def test_a_leader_that_cannot_confirm_steps_down_for_those_who_can() -> None:
    shard = started()
    shard.stop(1)  # the owner's twin is down, and the owner cannot reach operator 2
    shard.cut = {(0, 4), (4, 0), (0, 5), (5, 0)}
    height = shard.pay()
    shard.until(lambda: shard.leader() in {2, 3}, limit=5)
    new = shard.pay()
    shard.until(lambda: all(shard.replicas[c].confirmed >= new for c in (2, 3, 4, 5)))
    assert height <= new


def test_a_transfer_request_from_a_copy_not_preferred_breaks_no_lease() -> None:
    shard = started()
    term = shard.replicas[0].term
    for _ in range(15):
        ask = rp.AskVote(max(r.term for r in shard.replicas) + 1, 0, 0, False, True)
        for c in range(6):
            if c != 4:
                shard.queue.append((4, c, rp.encode(rp.Envelope(0, 0, 4, ask))))
        shard.run(0.2)
    assert shard.leader() == 0 and shard.replicas[0].term == term


def test_terms_beyond_any_real_one_are_refused() -> None:
    voted = rp.Voted(1 << 63, False, True, None)
    with pytest.raises(MessageError):
        rp.decode(rp.encode(rp.Envelope(0, 0, 1, voted)))


def test_a_proof_longer_than_any_real_one_is_refused_before_any_work() -> None:
    """Acks or headers past ``MAX_ACKS`` and ``MAX_AFTER`` (a leader's list of acks was
    checked ack by ack, each prefix again: 2,000 of them took two minutes)."""
    ack = rp.Ack(4, 1, 1, bytes(32), bytes(64))
    many = rp.Append(1, 0, bytes(32), [], 0, [], [ack] * (rp.MAX_ACKS + 1))
    with pytest.raises(MessageError):
        rp.decode(rp.encode(rp.Envelope(0, 0, 0, many)))
    header = rp.Header(0, 0, 1, 1, bytes(32), bytes(32), bytes(32), 0, 0, bytes(32))
    after = [header] * (rp.MAX_AFTER + 1)
    chunk = rp.Chunk(1, rp.Signed(header, bytes(64)), 0, 1, b"x", after, [ack])
    with pytest.raises(MessageError):
        rp.decode(rp.encode(rp.Envelope(0, 0, 0, chunk)))
    fine = rp.Append(1, 0, bytes(32), [], 0, [], [ack] * rp.MAX_ACKS)
    assert rp.decode(rp.encode(rp.Envelope(0, 0, 0, fine))).msg == fine


def test_no_copy_can_push_the_terms_to_the_end_of_their_range() -> None:
    """One operator's copy names the largest term there is in every message that proves
    nothing (refused PreVotes and votes, acks, asks): no copy takes more than
    ``TERM_STEP`` of each, a leader is elected again, and after the owner stops the others
    still elect (before: every term went to 2^48 - 1 at once, and no AskVote of
    term 2^48 could be sent again, so no leader was ever elected)."""
    shard = started()
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    end = rp.MAX_NUMBER - 1
    lies: list[rp.Message] = [
        rp.Voted(end, False, True, None),
        rp.Voted(end, False, False, None),
        rp.Appended(end, False, 0, b"", b"", ""),
        rp.AskVote(end, end, end, False, False),
    ]
    for lie in lies:
        for c in (0, 1, 2, 3, 5):
            shard.queue.append((4, c, rp.encode(rp.Envelope(0, 0, 4, lie))))
    term = shard.replicas[0].term
    shard.deliver()
    assert max(r.term for r in shard.replicas) <= term + len(lies) * TERM_STEP
    shard.until(lambda: shard.leader() is not None)
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    shard.stop(0, 1)
    for _ in range(3):  # while they elect, too
        for lie in lies:
            for c in (2, 3, 5):
                shard.queue.append((4, c, rp.encode(rp.Envelope(0, 0, 4, lie))))
        shard.run(SETTINGS.election_s)
    shard.until(lambda: shard.leader() is not None, limit=10)
    assert max(r.term for r in shard.replicas) <= term + 4 * len(lies) * TERM_STEP + 10
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))


def test_a_copy_ahead_in_term_deposes_a_leader_only_once_it_has_led_a_while() -> None:
    """One operator's copy answers every leader, each heartbeat, with an ack of a later
    term (a copy whose campaign failed, as it would say it): a leader steps down for it
    only after leading ``HOLD_LEADERSHIP`` election timeouts, so payments go on between
    (before: every leader was deposed by the first such answer, one election each)."""
    shard = started()
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    first = shard.replicas[0].term
    seconds = 4 * HOLD_LEADERSHIP * SETTINGS.election_s
    end = shard.now + seconds
    paid = 0
    while shard.now < end:
        lead = shard.leader()
        if lead is not None and lead // 2 != 2:
            term = shard.replicas[lead].term
            shard.queue.append(
                (
                    4,
                    lead,
                    rp.encode(rp.Envelope(0, 0, 4, rp.Appended(term + 1, False, 0, b"", b"", ""))),
                )
            )
            if shard.replicas[lead].confirmed == shard.replicas[lead].last:
                shard.pay()
                paid += 1
        shard.run(SETTINGS.heartbeat_s)
    terms = shard.replicas[0].term - first
    assert 1 <= terms <= 2 * (seconds / (HOLD_LEADERSHIP * SETTINGS.election_s) + 1), terms
    assert paid >= seconds / SETTINGS.heartbeat_s / 2
    # A copy that does not lead takes no term from an ack.
    follower = next(r for r in shard.replicas[:4] if r.role is Role.FOLLOWER)
    before = follower.term
    follower.step(4, rp.Appended(before + 5, False, 0, b"", b"", ""))
    assert follower.term == before


def test_an_ack_whose_signature_fails_does_not_count() -> None:
    shard = started()
    shard.stop(1, 2, 3, 4, 5)
    leader = shard.replicas[0]
    height = shard.pay()
    before = leader.counters.refused_messages
    for c in (2, 4):  # two other operators' copies, as forgers would claim them
        forged = rp.Appended(leader.term, True, height, leader.hash_at(height), bytes(64), "")
        leader.step(c, forged)
    assert leader.confirmed < height
    assert leader.counters.refused_messages == before + 2


def test_a_leader_that_resigns_hands_over_at_once_and_its_moved_copy_takes_back() -> None:
    shard = started()
    shard.until(functools.partial(shard.confirmed_everywhere, shard.pay()))
    shard.run(3 * SETTINGS.heartbeat_s)  # every copy answered in this term
    shard.replicas[0].resign()
    shard.flush(0)
    took = shard.until(lambda: shard.leader() == 1)
    assert took < SETTINGS.election_s / 2  # not an election timeout: handed over
    assert shard.replicas[0].role is Role.FOLLOWER
    # The copy moves: stopped, and started elsewhere from its folder (the same disk).
    shard.stop(0)
    height = shard.pay(2)
    shard.until(functools.partial(shard.confirmed_everywhere, height, [1, 2, 3, 4, 5]))
    shard.restart(0)
    shard.until(lambda: shard.leader() == 0 and shard.confirmed_everywhere(height))
    assert not any(r.evidence for r in shard.replicas)
    assert len({r.state_root() for r in shard.replicas}) == 1


def test_resigning_breaks_no_lease_of_another_term_and_a_follower_has_nothing_to_do() -> None:
    shard = started()
    follower = shard.replicas[2]
    follower.resign()
    assert follower.ready().empty()
    leader = shard.replicas[0]
    follower.step(0, rp.Resign(leader.term + 1))  # not its leader's term: ignored
    assert follower.leader == 0
