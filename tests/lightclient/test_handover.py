"""A handover of the guild's checkpoints from one key and member set to the next (after a
change of members): the checkpointers propose and vouch for it, take it and follow it; a
light client pinned to the first key follows the chain of handovers, each checked, and
nothing signed by a key the chain does not name at its height verifies."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.errors import (
    BadCheckpointSignature,
    BadHandover,
    DecodeError,
    Equivocation,
    ProofRefused,
    WrongMembers,
)
from constellation.guild import Checkpoint, Purpose, SigningPolicy
from constellation.keys import SigningKey
from constellation.lightclient import checkpointer as ck
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from tests.lightclient.test_checkpointer import CADENCE, IDLE, TAKEOVER, Guild
from tests.lightclient.test_proofs import KEY, PIN, SHARDS
from tests.sim.checkpoints import CheckpointSim

NEW = SigningKey(b"\x43" * 32)
NEW_MEMBERS = pf.members_root(2, [("a", b"\x01" * 32), ("b", b"\x02" * 32)])
HANDOVER = (bytes(NEW.pubkey), NEW_MEMBERS)


def signed(checkpoint: Checkpoint, key: SigningKey) -> pf.SignedCheckpoint:
    return pf.SignedCheckpoint(checkpoint, key.sign(checkpoint.message()))


def proposed(g: Guild, now: int) -> tuple[Checkpoint, ck.Evidence]:
    """One payment, every member caught up, and member 0's proposal."""
    g.pay()
    for m in range(3):
        g.catch_up(m, now)
    proposal = g.members[0].due(now)
    assert proposal is not None
    return proposal


def round_of(g: Guild, now: int, key: SigningKey) -> ck.Announced:
    """A checkpoint proposed by member 0 and vouched for by the others, signed by
    ``key`` and taken by all."""
    checkpoint, evidence = proposed(g, now)
    for m in (1, 2):
        assert g.members[m].vouch(checkpoint, evidence, now)[0] == ""
    announced = ck.Announced(signed(checkpoint, key), evidence.entries)
    for m in range(3):
        assert [s.checkpoint.checkpoint for s in g.members[m].take(announced, now)] == [checkpoint]
    return announced


def test_the_checkpoints_are_handed_over_to_the_new_key_and_members() -> None:
    g = Guild()
    first = round_of(g, 0, KEY)
    for m in (0, 1):
        g.members[m].handover = HANDOVER
    checkpoint, evidence = proposed(g, 2000)
    assert (checkpoint.next_key, checkpoint.next_members) == HANDOVER
    assert checkpoint.members == PIN.members  # it names the old members: they sign it
    assert g.members[1].vouch(checkpoint, evidence, 2000)[0] == ""
    # a member whose operator hands over to no key does not vouch for it
    assert "no such key" in str(g.members[2].vouch(checkpoint, evidence, 2000)[0])
    handover = ck.Announced(signed(checkpoint, KEY), evidence.entries)
    for m in range(3):
        g.members[m].take(handover, 2000)
        assert g.members[m].pin.handed == 1
        assert g.members[m].signing_key(1) == PIN.key
        assert g.members[m].pin.at(2) == HANDOVER
        assert g.members[m].index.members == NEW_MEMBERS
    # from the next height on: the new key, the new members, no handover again
    after = round_of(g, 4000, NEW)
    c = after.signed.checkpoint
    assert (c.members, c.next_key) == (NEW_MEMBERS, b"")
    assert g.members[0].signing_key(c.height) == bytes(NEW.pubkey)

    # a light client pinned to the first key follows the handover, checked
    with pytest.raises(WrongMembers):
        pf.verify_checkpoint(PIN, after.signed)
    pin = PIN.follow(handover.signed)
    assert pf.verify_checkpoint(pin, after.signed) == c
    assert pf.verify_checkpoint(pin, first.signed) == first.signed.checkpoint
    assert pf.verify_checkpoint(pin, handover.signed) == checkpoint


def test_a_quiet_guild_proposes_its_handover_without_waiting_for_the_idle_checkpoint() -> None:
    g = Guild()
    round_of(g, 0, KEY)
    assert g.members[0].due(CADENCE) is None  # at rest: the idle checkpoint is not due
    for m in (0, 1):
        g.members[m].handover = HANDOVER
    proposal = g.members[0].due(CADENCE)  # a change of members waits on it
    assert proposal is not None
    checkpoint, evidence = proposal
    assert (checkpoint.height, checkpoint.next_key) == (1, HANDOVER[0])
    assert g.members[1].vouch(checkpoint, evidence, CADENCE)[0] == ""
    handover = ck.Announced(signed(checkpoint, KEY), evidence.entries)
    for m in range(3):
        g.members[m].take(handover, CADENCE)
    # handed over: at rest again, the next waits for the idle period
    assert g.members[0].due(2 * CADENCE) is None
    assert g.members[0].due(CADENCE + IDLE) is not None


def test_a_signer_that_missed_the_handover_learns_which_key_signs_above_it() -> None:
    """A signer restarted with no share of the handover in its audit log (it was down,
    or its share went to a checkpoint that lost) learns from the next proposal's
    evidence that the new key signs the chain, and signs nothing by the old key above."""
    g = Guild()
    round_of(g, 0, KEY)
    for m in range(3):
        g.members[m].handover = HANDOVER
    round_of(g, 2000, KEY)  # the handover, at height 1
    round_of(g, 4000, NEW)
    g.pay()
    for m in range(3):
        g.catch_up(m, 6000)
    proposal = g.members[0].due(6000)
    assert proposal is not None
    checkpoint, evidence = proposal
    assert checkpoint.height == 3
    policy = SigningPolicy("guild", frozenset(Purpose))
    below = ck.signed_below(checkpoint, evidence.encode(), [PIN.key, bytes(NEW.pubkey)])
    assert below is not None and below[1] == bytes(NEW.pubkey)
    policy.learn(*below)
    with pytest.raises(Equivocation, match="signs above height 1"):
        policy.check(checkpoint, b"\x02" + PIN.key)  # the old key, above the handover
    assert policy.check(checkpoint, b"\x02" + bytes(NEW.pubkey)).msg == checkpoint.message()


def test_a_checkpoint_by_the_old_key_above_its_handover_is_refused() -> None:
    g = Guild()
    round_of(g, 0, KEY)
    for m in range(3):
        g.members[m].handover = HANDOVER
    handover = round_of(g, 2000, KEY)
    checkpoint, evidence = proposed(g, 4000)
    forged = ck.Announced(signed(checkpoint, KEY), evidence.entries)
    with pytest.raises(BadCheckpointSignature):
        g.members[1].take(forged, 4000)
    # one by the old key, naming the old members, above a handover not heard yet: held
    # until the handover is heard, then dropped
    old = msgspec.structs.replace(checkpoint, members=PIN.members)
    fresh = Guild().members[2]
    fresh.take(ck.Announced(signed(old, KEY), evidence.entries), 4000)
    assert set(fresh.waiting) == {2}
    fresh.take(handover, 4000)
    assert set(fresh.waiting) == {1} and fresh.pin.handed == 1


def test_handovers_are_followed_only_in_order_and_as_signed() -> None:
    root = Checkpoint("guild", 0, bytes(32), 0, b"s" * 32, PIN.members)
    plain = signed(root, KEY)
    with pytest.raises(BadHandover, match="no key"):
        PIN.follow(plain)
    hand = msgspec.structs.replace(root, height=3, next_key=HANDOVER[0], next_members=NEW_MEMBERS)
    with pytest.raises(BadCheckpointSignature):
        PIN.follow(signed(hand, NEW))  # not by the key that signs at its height
    pin = PIN.follow(signed(hand, KEY))
    with pytest.raises(BadHandover, match="not above"):
        pin.follow(signed(hand, KEY))  # the same again: checked by the old key's pin first
    assert pin.at(3) == (PIN.key, PIN.members) and pin.at(4) == HANDOVER
    # a second handover is signed by the key the first handed over to
    third = SigningKey(b"\x44" * 32)
    again = msgspec.structs.replace(
        hand, height=9, members=NEW_MEMBERS, next_key=bytes(third.pubkey)
    )
    with pytest.raises(BadCheckpointSignature):
        pin.follow(signed(again, KEY))
    pin = pin.follow(signed(again, NEW))
    keys = [pin.at(h)[0] for h in (0, 3, 4, 9, 10)]
    assert keys == [PIN.key, PIN.key, bytes(NEW.pubkey), bytes(NEW.pubkey), bytes(third.pubkey)]


def test_a_handover_travels_as_bytes() -> None:
    root = Checkpoint("guild", 3, b"p" * 32, 7, b"s" * 32, PIN.members, *HANDOVER)
    for c in (root, msgspec.structs.replace(root, next_key=b"", next_members=b"")):
        one = signed(c, KEY)
        assert pf.SignedCheckpoint.decode(one.encode()) == one
    data = bytearray(signed(root, KEY).encode())
    data[1 + len("guild") + 8 + 32 + 8 + 64] = 2  # the handover flag
    with pytest.raises(DecodeError, match="handover flag"):
        pf.SignedCheckpoint.decode(bytes(data))


def _chain(handover_at: int, length: int) -> tuple[Guild, list[ck.Announced]]:
    """A guild's honest chain of ``length`` checkpoints, handed over at ``handover_at``."""
    g = Guild()
    chain = []
    for height in range(length):
        if height == handover_at:
            for m in range(3):
                g.members[m].handover = HANDOVER
        chain.append(round_of(g, 2000 * height, KEY if height <= handover_at else NEW))
    return g, chain


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 4),
    st.randoms(use_true_random=False),
    st.lists(st.integers(0, 5), max_size=6),
)
def test_in_any_order_a_member_takes_the_honest_chain_through_its_handover(
    handover_at: int, rng: random.Random, forged_heights: list[int]
) -> None:
    """Checkpoints heard in any order, again and again, with forgeries among them (the
    old key above its handover, the new key at or below it): a member that follows the
    shards takes exactly the honest chain and follows its one handover."""
    length = 6
    g, chain = _chain(handover_at, length)
    forged = []
    for h in forged_heights:
        c = chain[h].signed.checkpoint
        wrong = NEW if h <= handover_at else KEY
        forged.append(ck.Announced(signed(c, wrong), chain[h].entries))
    heard = [*chain, *chain, *forged]
    rng.shuffle(heard)
    fresh = Guild().members[1]
    for owner, events in g.blocks:
        fresh.index.apply(owner, events)
    taken = []
    for announced in [*heard, *chain]:  # the members announce their latest again
        try:
            taken += fresh.take(announced, 0)
        except ProofRefused:
            assert announced in forged or announced.signed.checkpoint.height > handover_at
    assert [t.checkpoint for t in taken] == [a.signed for a in chain]
    assert fresh.pin.handed == handover_at and fresh.index.members == NEW_MEMBERS


def test_where_every_holder_of_the_key_must_sign_only_the_first_proposes() -> None:
    """Members propose by their rank among the key's holders that are still members;
    where all of them must sign, the others never take over (two proposals at one
    height, a share of each released, would leave it unsigned for good)."""
    g = Guild()
    g.pay()
    for m in range(3):
        g.catch_up(m, 0)
    for m in range(3):
        g.members[m].due(0)  # each starts waiting
    late = 10 * (CADENCE + 2 * TAKEOVER + IDLE)
    assert g.members[1].due(late) is not None  # by rank in the guild: it takes over
    for m in range(3):
        g.members[m].signers = {PIN.key: ([1, 2], 2)}  # member 0 left: 2 of 2
    assert g.members[0].due(late) is None  # no longer a holder
    assert g.members[1].due(late + CADENCE) is not None  # the first holder now
    assert g.members[2].due(late) is None  # both must sign: it never takes over
    g.members[2].signers = {PIN.key: ([0, 1, 2], 2)}
    assert g.members[2].due(late) is not None  # 2 of 3: it takes over at its turn


def test_a_restarted_proposer_sends_its_last_proposal_again() -> None:
    g = Guild()
    g.pay()
    g.catch_up(0, 0)
    first = g.members[0].due(0)
    assert first is not None
    restarted = ck.Checkpointer(
        lc.GuildIndex("guild", PIN.members, SHARDS), PIN, 0, CADENCE, TAKEOVER, IDLE
    )
    for owner, events in g.blocks:
        restarted.index.apply(owner, events)
    g.pay()  # the shards moved on meanwhile
    for owner, events in g.blocks[-1:]:
        restarted.index.apply(owner, events)
    restarted.resume(first)
    assert restarted.due(5000) == first  # its signers' shares are of this one
    g.members[0].take(g.sign(first), 5000)
    restarted.take(g.sign(first), 5000)
    again = restarted.due(10_000)
    assert again is not None and again[0].height == 1


def test_a_proposer_restarted_behind_its_last_proposal_proposes_none_below_it() -> None:
    """Its index starts again below the height of the proposal it sent last (its stored
    checkpoints end lower): it proposes nothing until it caught up, then that one
    again. A proposal below would be refused anyway, and, sent, would have replaced the
    one its own signer holds a share of: a second checkpoint of its own at that height
    (found by ``--splits``, where only two of the key's three holders are left)."""
    g = Guild()
    first, second = g.signed_then_next(5000)
    assert second[0].height == 1
    restarted = ck.Checkpointer(
        lc.GuildIndex("guild", PIN.members, SHARDS), PIN, 0, CADENCE, TAKEOVER, IDLE
    )
    for owner, events in g.blocks:
        restarted.index.apply(owner, events)
    restarted.resume(second)
    assert restarted.index.next_height == 0
    assert restarted.due(10_000) is None and restarted.due(100_000) is None
    restarted.take(g.sign(first), 100_000)
    assert restarted.index.next_height == 1
    assert restarted.due(200_000) == second


def test_a_signer_whose_share_lost_at_a_height_signs_the_next_once_it_learns() -> None:
    """Two proposals at one height, one signed by the guild: a signer that released a
    share of the other refuses the next height until the next proposal's evidence
    shows it what the guild signed (checked under a guild key); forged evidence, or
    evidence of another height, teaches it nothing."""
    g = Guild()
    g.pay()
    for m in range(3):
        g.catch_up(m, 0)
    won = g.members[0].due(0)
    g.members[1].due(0)
    lost = g.members[1].due(10 * (CADENCE + TAKEOVER + IDLE))
    assert won is not None and lost is not None and won[0] != lost[0]
    policy = SigningPolicy("guild", frozenset(Purpose))
    policy.record(lost[0], lost[0].message())
    for m in range(3):
        g.members[m].take(g.sign(won), 100)
    g.pay()
    g.catch_up(0, 2000)
    after = g.members[0].due(20_000)
    assert after is not None
    checkpoint, evidence = after
    key = b"\x02" + PIN.key
    with pytest.raises(Equivocation, match="does not extend"):
        policy.check(checkpoint, key)
    assert ck.signed_below(checkpoint, evidence.encode(), [bytes(NEW.pubkey)]) is None
    forged = evidence._replace(prev=ck.Announced(signed(won[0], NEW), won[1].entries))
    assert ck.signed_below(checkpoint, forged.encode(), [PIN.key]) is None
    assert ck.signed_below(checkpoint, b"garbage", [PIN.key]) is None
    below = ck.signed_below(checkpoint, evidence.encode(), [PIN.key])
    assert below == (won[0], PIN.key)
    policy.learn(*below)
    assert policy.check(checkpoint, key).msg == checkpoint.message()


def _take_all(g: Guild, announced: ck.Announced, now: int) -> None:
    for m in range(3):
        g.catch_up(m, now)
        g.members[m].take(announced, now)


def test_a_signer_whose_share_of_a_handover_lost_signs_the_guild_s_chain_above_it() -> None:
    """Member 0 proposed a handover at height 1 and its signer released a share; the
    guild signed member 1's plain checkpoint there. Above it the signer follows the
    guild's chain (signed by the first key), once the evidence shows it, and again after
    a restart, when its audit log gives back the lost share and nothing it learned."""
    g = Guild()
    round_of(g, 0, KEY)
    g.members[0].handover = HANDOVER
    g.pay()
    for m in range(3):
        g.catch_up(m, 100)
    lost = g.members[0].due(CADENCE)
    won = g.members[1].due(CADENCE + TAKEOVER + IDLE)
    assert lost is not None and won is not None
    assert (lost[0].height, won[0].height) == (1, 1)
    assert lost[0].next_key and not won[0].next_key
    policy = SigningPolicy("guild", frozenset(Purpose))
    key = b"\x02" + PIN.key
    policy.record(lost[0], lost[0].message())
    audit = [lost[0]]  # what its audit log holds
    _take_all(g, g.sign(won), 20_000)
    g.members[0].handover = None  # its operator's plan moved on: no handover now

    # the next height: refused until the evidence shows what the guild signed below
    g.pay()
    g.catch_up(0, 21_000)
    second = g.members[0].due(21_000 + IDLE)
    assert second is not None and second[0].height == 2
    with pytest.raises(Equivocation, match="signs above height 1"):
        policy.check(second[0], key)
    below = ck.signed_below(second[0], second[1].encode(), [PIN.key])
    assert below == (won[0], PIN.key)
    policy.learn(*below)
    assert policy.check(second[0], key).msg == second[0].message()

    # restarted later: the lost handover is back, the guild's chain two heights up
    _take_all(g, g.sign(second), 40_000)
    g.pay()
    g.catch_up(0, 41_000)
    third = g.members[0].due(41_000 + IDLE)
    assert third is not None and third[0].height == 3
    restarted = SigningPolicy("guild", frozenset(Purpose))
    for c in audit:
        restarted.record(c, c.message())
    with pytest.raises(Equivocation, match="signs above height 1"):
        restarted.check(third[0], key)
    below = ck.signed_below(third[0], third[1].encode(), [bytes(NEW.pubkey), PIN.key])
    assert below is not None and below[1] == PIN.key
    restarted.learn(*below)
    assert restarted.check(third[0], key).msg == third[0].message()


# seeds a hunt failed once: a handover's share lost, its signer refused the guild's chain
# (20547, 21297, 21691); three proposals at one height each held one signer's share, and
# the height stayed unsigned for good (52463: they go on in the next epoch now)
FOUND = [20547, 21297, 21691, 52463]


@pytest.mark.parametrize("seed", [*range(25), *FOUND])
def test_the_checkpoints_simulator_through_a_leave_and_its_handover(seed: int) -> None:
    """``python -m tests.sim --checkpoints --seeds N`` for a longer hunt."""
    CheckpointSim(seed).run()


@pytest.mark.parametrize("seed", range(25))
def test_the_checkpoints_simulator_with_shares_split_between_proposals(seed: int) -> None:
    """Proposers take over sooner and sessions fail after one share: the shares of one
    height split between proposals, and the signers go on in later epochs.
    ``python -m tests.sim --checkpoints --splits --seeds N`` for a longer hunt."""
    CheckpointSim(seed, splits=True).run()
