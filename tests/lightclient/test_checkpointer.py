"""The checkpointing rules every operator's indexer follows: who proposes and when, what
a member vouches for, and which signed checkpoints it takes (``constellation.lightclient
.checkpointer``), with three members' indexes fed the same blocks at different times."""

from __future__ import annotations

import random

import msgspec
import pytest

from constellation.errors import (
    BadCheckpointSignature,
    BadEntryPath,
    BadRecordPath,
    DecodeError,
)
from constellation.guild import Checkpoint
from constellation.lightclient import checkpointer as ck
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.protocol.ledger import BlockEvents, CoinChange
from tests.lightclient.test_proofs import KEY, LEDGERS, MEMBERS, PIN, SHARDS

CADENCE, TAKEOVER, IDLE = 1000, 5000, 30_000


def issuance(rng: random.Random, heights: dict[lc.Shard, int]) -> tuple[int, BlockEvents]:
    """An issuance in a random shard of ``heights``: one block, and its owner."""
    shard = rng.choice(list(heights))
    prev = heights[shard] or -1
    heights[shard] += 1
    change = CoinChange(rng.randbytes(32), rng.randbytes(32), b"o" * 32, 5, True)
    events = BlockEvents(shard[1], heights[shard], prev, [change], [], rng.randbytes(32), b"r" * 32)
    return shard[0], events


class Guild:
    """Three members' checkpointers, and the shards' blocks each has applied."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.blocks: list[tuple[int, BlockEvents]] = []
        self.heights = dict.fromkeys(SHARDS, 0)
        self.members = [
            ck.Checkpointer(
                lc.GuildIndex("guild", MEMBERS, SHARDS), PIN, rank, CADENCE, TAKEOVER, IDLE
            )
            for rank in range(3)
        ]
        self.applied = [0, 0, 0]  # how many of ``blocks`` each member applied

    def pay(self) -> None:
        self.blocks.append(issuance(self.rng, self.heights))

    def catch_up(self, m: int, now: int) -> list[lc.Signed]:
        c = self.members[m]
        for owner, ev in self.blocks[self.applied[m] :]:
            c.index.apply(owner, ev)
        self.applied[m] = len(self.blocks)
        return c.advance(now)

    def sign(self, proposal: tuple[Checkpoint, ck.Evidence]) -> ck.Announced:
        checkpoint, evidence = proposal
        return ck.Announced(
            pf.SignedCheckpoint(checkpoint, KEY.sign(checkpoint.message())), evidence.entries
        )

    def signed_then_next(
        self, now: int
    ) -> tuple[tuple[Checkpoint, ck.Evidence], tuple[Checkpoint, ck.Evidence]]:
        """Member 0 proposes checkpoint 0, takes it signed, and proposes checkpoint 1 at
        ``now`` (after a payment each)."""
        self.pay()
        self.catch_up(0, 0)
        first = self.members[0].due(0)
        assert first is not None
        self.members[0].take(self.sign(first), 0)
        self.pay()
        self.catch_up(0, now)
        second = self.members[0].due(now)
        assert second is not None
        return first, second


def test_member_zero_proposes_and_the_others_vouch_once_they_reached_its_heights() -> None:
    g = Guild()
    for _ in range(5):
        g.pay()
    g.catch_up(0, 0)
    proposal = g.members[0].due(0)
    assert proposal is not None
    checkpoint, evidence = proposal
    assert checkpoint.height == 0 and evidence.prev is None
    assert isinstance(g.members[1].vouch(checkpoint, evidence, 0)[0], ck.NotYet)
    g.catch_up(1, 0)
    assert g.members[1].vouch(checkpoint, evidence, 0)[0] == ""
    # its evidence travels as bytes
    assert ck.Evidence.decode(evidence.encode()) == evidence
    announced = g.sign(proposal)
    assert ck.Announced.decode(announced.encode()) == announced
    for m in range(3):
        g.catch_up(m, 10)
        assert [s.checkpoint.checkpoint for s in g.members[m].take(announced, 10)] == [checkpoint]
        assert g.members[m].index.next_height == 1
    # taken once: heard again, nothing more
    assert g.members[2].take(announced, 11) == []


def test_a_proposal_is_sent_again_unchanged_until_its_height_is_signed() -> None:
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    first = g.members[0].due(0)
    assert first is not None
    assert g.members[0].due(500) is None  # not before the cadence
    g.pay()
    g.catch_up(0, 1000)
    assert g.members[0].due(1000) == first  # the same, though the shards moved on
    g.members[0].take(g.sign(first), 1100)
    second = g.members[0].due(2000)
    assert second is not None and second[0].height == 1
    assert second[1].prev is not None and second[1].prev.signed.checkpoint == first[0]


def test_others_take_over_by_rank_only_after_the_guild_is_quiet() -> None:
    g = Guild()
    g.pay()
    for m in range(3):
        g.catch_up(m, 0)
    assert g.members[1].due(0) is None and g.members[2].due(0) is None
    late = CADENCE + TAKEOVER  # member 0 would have proposed after a cadence
    assert g.members[1].due(late - 1) is None
    proposal = g.members[1].due(late)
    assert proposal is not None and proposal[0].height == 0
    assert g.members[2].due(late) is None  # rank 2 waits longer
    announced = g.sign(proposal)
    g.members[2].take(announced, late)
    g.pay()
    g.catch_up(2, late)
    # a checkpoint was signed: rank 2 waits from then on
    assert g.members[2].due(late + CADENCE + 2 * TAKEOVER - 1) is None
    assert g.members[2].due(late + CADENCE + 2 * TAKEOVER) is not None


def test_at_rest_the_others_wait_for_the_idle_checkpoint_before_taking_over() -> None:
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    g.catch_up(1, 0)
    p = g.members[0].due(0)
    assert p is not None
    announced = g.sign(p)
    g.members[0].take(announced, 0)
    g.members[1].take(announced, 0)
    assert g.members[1].due(IDLE) is None  # member 0's idle checkpoint is due then
    assert g.members[1].due(IDLE + TAKEOVER - 1) is None
    assert g.members[1].due(IDLE + TAKEOVER) is not None


def test_a_guild_at_rest_checkpoints_only_every_idle_period() -> None:
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    p = g.members[0].due(0)
    assert p is not None
    g.members[0].take(g.sign(p), 0)
    assert g.members[0].due(CADENCE) is None  # nothing moved
    assert g.members[0].due(IDLE - 1) is None
    idle = g.members[0].due(IDLE)
    assert idle is not None and idle[0].height == 1


def test_a_member_that_missed_a_checkpoint_takes_it_from_the_next_proposal() -> None:
    g = Guild()
    first, second = g.signed_then_next(1000)
    g.catch_up(2, 1000)  # member 2 never heard that checkpoint 0 was signed
    assert g.members[2].index.next_height == 0
    reason, taken = g.members[2].vouch(*second, 1000)
    assert reason == "" and [s.checkpoint.checkpoint for s in taken] == [first[0]]
    assert g.members[2].index.next_height == 1


def test_a_forged_or_foreign_checkpoint_is_refused_and_changes_nothing() -> None:
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    g.catch_up(1, 0)
    p = g.members[0].due(0)
    assert p is not None
    good = g.sign(p)
    forged = good._replace(signed=good.signed._replace(sig=bytes(64)))
    with pytest.raises(BadCheckpointSignature):
        g.members[1].take(forged, 0)
    # a true signature with entries that are not the ones it signed
    wrong = good._replace(entries=[good.entries[0]._replace(size=9), *good.entries[1:]])
    with pytest.raises(BadEntryPath):
        g.members[1].take(wrong, 0)
    assert g.members[1].waiting == {}
    g.members[2].take(good, 0)  # held: member 2 has not reached its heights
    other = msgspec.structs.replace(p[0], time_ms=p[0].time_ms + 1)
    assert "another checkpoint" in str(g.members[2].vouch(other, p[1], 0)[0])
    # a proposal following a forged checkpoint is not vouched for
    evidence = p[1]._replace(prev=forged)
    assert "not signed by the guild key" in str(g.members[1].vouch(p[0], evidence, 0)[0])
    with pytest.raises(DecodeError):
        ck.Evidence.decode(p[1].encode() + b"\x00")
    with pytest.raises(DecodeError):
        ck.Evidence.decode(p[1].encode()[:-1] + b"\x02")


def test_a_signed_checkpoint_this_index_disagrees_with_stops_the_taking() -> None:
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    p = g.members[0].due(0)
    assert p is not None
    checkpoint, evidence = p
    lie = evidence.entries[0]._replace(coins=b"\x07" * 32)
    entries = [lie, *evidence.entries[1:]]
    bad = Checkpoint(
        checkpoint.guild,
        checkpoint.height,
        checkpoint.prev_hash,
        checkpoint.time_ms,
        pf.shards_tree(entries).root(),
        checkpoint.members,
    )
    # its own index would not vouch for it ...
    assert "differs here" in str(g.members[0].vouch(bad, ck.Evidence(entries, None), 0)[0])
    # ... but the guild signed it: this member stops, and says why
    signed = ck.Announced(pf.SignedCheckpoint(bad, KEY.sign(bad.message())), entries)
    assert g.members[0].take(signed, 0) == []
    assert g.members[0].disagreed is not None and "differs here" in g.members[0].disagreed
    assert g.members[0].due(10_000) is None
    assert "disagrees with the guild" in str(g.members[0].vouch(*p, 0)[0])


def test_a_member_that_missed_checkpoints_adopts_the_latest_after_a_while() -> None:
    g = Guild()
    signed = []
    for r in range(3):  # checkpoints 0, 1, 2: member 1 hears only the last two
        g.pay()
        g.catch_up(0, 1000 * r)
        p = g.members[0].due(1000 * r)
        assert p is not None
        signed.append(g.sign(p))
        g.members[0].take(signed[-1], 1000 * r)
    m = g.members[1]
    g.catch_up(1, 5000)
    assert m.take(signed[1], 5000) == [] and m.behind() is not None
    assert m.take(signed[2], 5000) == [] and m.behind() is not None
    assert m.advance(5000 + TAKEOVER - 1) == []
    [adopted] = m.advance(5000 + TAKEOVER)  # the latest: the one it passed goes, no gap
    assert adopted.checkpoint == signed[2].signed and m.behind() is None
    assert m.index.next_height == 3 and adopted.covered[SHARDS[0]].records == []
    # from there it checks the next one as any member does
    g.pay()
    g.catch_up(0, 9000)
    g.catch_up(1, 9000)
    p = g.members[0].due(9000)
    assert p is not None and m.vouch(*p, 9000)[0] == ""
    # coins that differ from its own are not adopted: it stops, and says why
    lying = Guild()
    for _ in range(2):
        lying.pay()
    lying.catch_up(0, 0)
    first = lying.members[0].due(0)
    assert first is not None
    entries = first[1].entries
    entries = [entries[0]._replace(coins=b"\x05" * 32), *entries[1:]]
    cp = msgspec.structs.replace(
        first[0], height=4, prev_hash=b"\x01" * 32, shards=pf.shards_tree(entries).root()
    )
    forged = ck.Announced(pf.SignedCheckpoint(cp, KEY.sign(cp.message())), entries)
    lying.catch_up(1, 0)
    lying.members[1].take(forged, 0)
    assert lying.members[1].advance(TAKEOVER) == []
    assert "differs here" in str(lying.members[1].disagreed)


def test_filled_checkpoints_from_another_member_are_taken_only_as_signed() -> None:
    """A member that missed checkpoints takes them, with their records, from another;
    whatever does not match the guild's signature and entries is refused."""
    signed = LEDGERS[0].signed[1]
    honest = lc.held(signed)
    filled = ck.Filled(ck.Announced(honest.checkpoint, honest.entries), dict(honest.records))
    assert ck.verify_filled(PIN, filled) == honest
    position, records = next(iter(honest.records.items()))
    tampered = {**honest.records, position: [records[0][:-1] + b"\x00", *records[1:]]}
    withheld = {**honest.records, position: records[1:]}
    extra = {**honest.records, len(honest.entries): records}
    for bad in (tampered, withheld, extra):
        with pytest.raises(BadRecordPath):
            ck.verify_filled(PIN, filled._replace(records=bad))
    forged = pf.SignedCheckpoint(signed.checkpoint.checkpoint, bytes(64))
    with pytest.raises(BadCheckpointSignature):
        ck.verify_filled(PIN, filled._replace(announced=ck.Announced(forged, honest.entries)))


def test_a_joiners_shards_come_in_once_a_member_runs_the_new_layout_and_never_go() -> None:
    """Member 3 joins: its shards are in the checkpoints from the first one proposed by a
    member that runs the layout with it; a member still on the layout before waits for
    such a checkpoint (it cannot check the new shards) rather than disagree, and a
    checkpoint that leaves out a shard the last one had is refused."""
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    first = g.members[0].due(0)
    assert first is not None
    for m in range(3):
        g.catch_up(m, 0)
        assert g.members[m].take(g.sign(first), 0)
    grown = [*SHARDS, (3, 0), (3, 1)]
    ahead = ck.Checkpointer(lc.GuildIndex("guild", MEMBERS, grown), PIN, 1, CADENCE, TAKEOVER, 0)
    for owner, ev in g.blocks:
        ahead.index.apply(owner, ev)
    assert ahead.take(g.sign(first), 0)  # the chain before the join, with fewer shards
    g.pay()
    g.catch_up(0, 1000)
    # a proposal from a member on the old layout: a member on the new one vouches for it
    old = g.members[0].due(1000)
    assert old is not None and len(old[1].entries) == len(SHARDS)
    for owner, ev in g.blocks[1:]:
        ahead.index.apply(owner, ev)
    assert ahead.vouch(*old, 1000)[0] == ""
    # one from a member on the new layout names the joiner's shards (at genesis) ...
    new = ahead.index.propose(1000)
    assert [(e.owner, e.worker) for e in new[1]] == grown
    evidence = ck.Evidence(new[1], g.sign(first))
    # ... which a member on the old layout cannot check: it waits, and does not disagree
    verdict = g.members[0].vouch(new[0], evidence, 1000)[0]
    assert isinstance(verdict, ck.NotYet)
    announced = ck.Announced(pf.SignedCheckpoint(new[0], KEY.sign(new[0].message())), new[1])
    assert g.members[0].take(announced, 1000) == [] and g.members[0].disagreed is None
    [taken] = ahead.take(announced, 1000)
    assert set(taken.covered) == set(grown)
    # from here on no checkpoint may leave a shard out
    g.pay()
    for owner, ev in g.blocks[2:]:
        ahead.index.apply(owner, ev)
    fewer, entries = ahead.index.propose(2000)
    entries = [e for e in entries if e.owner != 3]
    fewer = msgspec.structs.replace(fewer, shards=pf.shards_tree(entries).root())
    why = ahead.vouch(fewer, ck.Evidence(entries, None), 2000)[0]
    assert "shard 3/0 of the last checkpoint is missing" in str(why)
