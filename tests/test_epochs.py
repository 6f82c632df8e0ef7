"""A checkpoint height's epochs: shares split between proposals at one height move to
the next epoch only on a certificate that no checkpoint can be signed in the one they
leave (``constellation.guild``: ``SigningPolicy``, ``epoch_ended``, ``next_epoch``)."""

from __future__ import annotations

import hashlib

import pytest
from coincurve import PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.errors import CheckpointBound, Equivocation, RequestRefused
from constellation.guild import (
    Checkpoint,
    Purpose,
    Quorum,
    SigningPolicy,
    Stand,
    Standing,
    Statement,
    epoch_ended,
    make_standing,
    next_epoch,
)
from constellation.keys import SigningKey

GUILD = "g"
GUILD_PK = PublicKey.from_secret(b"\x11" * 32).format()
IDENTITY = [SigningKey(hashlib.sha256(b"identity %d" % i).digest()) for i in range(5)]
IDENTITIES = [bytes(k.pubkey) for k in IDENTITY]
HEIGHT = 4


def proposal(n: int) -> Checkpoint:
    return Checkpoint(GUILD, HEIGHT, b"p" * 32, n, b"r" * 32, b"m" * 32)


def signers(n: int) -> list[SigningPolicy]:
    return [SigningPolicy(GUILD, frozenset(Purpose), IDENTITIES) for _ in range(n)]


def share(
    policy: SigningPolicy, target: Checkpoint, epoch: int, cert: list[Standing], q: Quorum
) -> None:
    """The signer checks the request and releases a share (records it)."""
    derived = policy.check(target, GUILD_PK, epoch, cert, [q])
    policy.record(target, derived.msg, epoch, cert)


def stands(policies: list[SigningPolicy], members: list[int]) -> list[Stand]:
    return [policies[i].stand(HEIGHT, i, IDENTITY[i].secret) for i in members]


def test_a_three_way_split_moves_to_the_next_epoch_and_one_checkpoint_is_signed_there() -> None:
    q = Quorum((0, 1, 2), 2)
    policies = signers(3)
    for i in range(3):  # each proposer got its own signer's share, and no other
        share(policies[i], proposal(i), 0, [], q)
    for i in range(3):
        with pytest.raises(CheckpointBound):
            policies[i].check(proposal(3), GUILD_PK, 0, [], [q])
    assert next_epoch(GUILD, HEIGHT, 0, stands(policies, [0, 1]), q, IDENTITIES) is None
    found = next_epoch(GUILD, HEIGHT, 0, stands(policies, [0, 1, 2]), q, IDENTITIES)
    assert found is not None and found[0] == 1
    epoch, cert = found
    with pytest.raises(RequestRefused, match="no certificate"):
        policies[0].check(proposal(3), GUILD_PK, 1, cert[:2], [q])
    share(policies[0], proposal(3), epoch, cert, q)
    share(policies[1], proposal(3), epoch, cert, q)  # t shares: checkpoint 3 can be signed
    # No other checkpoint at this height: not in epoch 1, nor below it, nor above it.
    for target in (proposal(0), proposal(2)):
        with pytest.raises(CheckpointBound):
            policies[0].check(target, GUILD_PK, 1, cert, [q])
        with pytest.raises(CheckpointBound):
            policies[1].check(target, GUILD_PK, 0, [], [q])
    everyone = stands(policies, [0, 1, 2])
    moved = next_epoch(GUILD, HEIGHT, 0, everyone, q, IDENTITIES)  # to where the top is
    assert moved is not None and moved[0] == 1
    assert next_epoch(GUILD, HEIGHT, 1, everyone, q, IDENTITIES) is None  # it holds there
    # The signer left behind in epoch 0 is shown the way to epoch 1 and joins there.
    top = next(s for s in everyone if s.standing.epoch == 1)
    assert epoch_ended(GUILD, HEIGHT, 0, top.cert, q, IDENTITIES)
    share(policies[2], proposal(3), 1, top.cert, q)


def test_a_checkpoint_that_can_still_be_signed_leaves_no_certificate() -> None:
    q = Quorum((0, 1, 2), 2)
    policies = signers(3)
    share(policies[0], proposal(1), 0, [], q)
    share(policies[1], proposal(1), 0, [], q)
    share(policies[2], proposal(2), 0, [], q)
    assert next_epoch(GUILD, HEIGHT, 0, stands(policies, [0, 1, 2]), q, IDENTITIES) is None
    policies = signers(3)  # one share of checkpoint 1; signer 2 shared none
    share(policies[0], proposal(1), 0, [], q)
    share(policies[1], proposal(2), 0, [], q)
    assert next_epoch(GUILD, HEIGHT, 0, stands(policies, [0, 1, 2]), q, IDENTITIES) is None


def test_bad_certificates_are_refused() -> None:
    q = Quorum((0, 1, 2), 2)
    policies = signers(3)
    for i in range(3):
        share(policies[i], proposal(i), 0, [], q)
    good = [s.standing for s in stands(policies, [0, 1, 2])]
    assert epoch_ended(GUILD, HEIGHT, 0, good, q, IDENTITIES)
    forged = make_standing(IDENTITY[3].secret, GUILD, 2, HEIGHT, 0, proposal(2).message())
    stranger = make_standing(IDENTITY[3].secret, GUILD, 3, HEIGHT, 0, proposal(3).message())
    elsewhere = make_standing(IDENTITY[2].secret, GUILD, 2, HEIGHT + 1, 0, bytes(32))
    later = make_standing(IDENTITY[2].secret, GUILD, 2, HEIGHT, 1, bytes(32))
    bad = {
        "badly signed": [*good[:2], forged],
        "no certificate that epoch 0 ended": [*good[:2], stranger],  # not counted
        "not one at height 4": [*good[:2], elsewhere],
        "not one of a certificate of epoch 0": [*good[:2], later],
        "member 2's standing is not one of a certificate": [*good, good[2]],
    }
    fresh = signers(1)[0]
    for why, cert in bad.items():
        with pytest.raises(RequestRefused, match=why):
            fresh.check(proposal(3), GUILD_PK, 1, cert, [q])
    with pytest.raises(RequestRefused, match="certificate of epoch 1"):
        fresh.check(proposal(3), GUILD_PK, 2, good, [q])
    said = [Stand(s, []) for s in [*good[:2], forged]]
    assert next_epoch(GUILD, HEIGHT, 0, said, q, IDENTITIES) is None
    with pytest.raises(RequestRefused, match="only with an epoch above 0"):
        fresh.check(proposal(3), GUILD_PK, 0, good, [q])
    with pytest.raises(RequestRefused, match="only a checkpoint"):
        fresh.check(Statement("hi there"), GUILD_PK, 1, good, [q])


def test_what_the_guild_signed_at_a_height_binds_in_every_epoch() -> None:
    q = Quorum((0, 1, 2), 2)
    policy = signers(1)[0]
    policy.learn(proposal(1), GUILD_PK[1:])
    # Standings that say epoch 0 ended (signed by every member's identity: made up here)
    cert = [
        make_standing(IDENTITY[i].secret, GUILD, i, HEIGHT, 0, proposal(i + 5).message())
        for i in range(3)
    ]
    with pytest.raises(Equivocation, match="guild signed another"):
        policy.check(proposal(2), GUILD_PK, 1, cert, [q])
    policy.check(proposal(1), GUILD_PK, 1, cert, [q])


def test_an_epoch_ends_for_every_key_a_signer_holds_or_for_none() -> None:
    """Between a key's making and the old key's retirement a signer signs with both,
    and its binding at a height holds for both: a certificate that ends an epoch for
    the new key's signers only would let the old key sign a second checkpoint there
    (the old key 3 of members 0..4, the new one 3 of 0..3 after member 4 left)."""
    old, new = GUILD_PK, PublicKey.from_secret(b"\x22" * 32).format()
    q_old, q_new = Quorum((0, 1, 2, 3, 4), 3), Quorum((0, 1, 2, 3), 3)
    policies = signers(5)
    signed = proposal(7)
    for i in (2, 3, 4):  # the old key signs checkpoint 7 in epoch 0
        derived = policies[i].check(signed, old, 0, [], [q_old])
        policies[i].record(signed, derived.msg, 0, [])
    for i in (0, 1):
        derived = policies[i].check(proposal(i), old, 0, [], [q_old, q_new])
        policies[i].record(proposal(i), derived.msg, 0, [])
    cert = [policies[i].stand(HEIGHT, i, IDENTITY[i].secret).standing for i in range(4)]
    assert epoch_ended(GUILD, HEIGHT, 0, cert, q_new, IDENTITIES)  # for the new key only
    for i in range(4):
        with pytest.raises(RequestRefused, match="no certificate that epoch 0 ended"):
            policies[i].check(proposal(10 + i), new, 1, cert, [q_old, q_new])
    everyone = [*cert, policies[4].stand(HEIGHT, 4, IDENTITY[4].secret).standing]
    assert not epoch_ended(GUILD, HEIGHT, 0, everyone, q_old, IDENTITIES)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Quorum((0, 1, 2), 2), Quorum((0, 1, 2, 3), 3)]),
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 2), st.booleans()),
        max_size=60,
    ),
)
def test_one_checkpoint_per_height_whatever_coordinators_ask(
    q: Quorum, steps: list[tuple[int, int, int, bool]]
) -> None:
    """Coordinators (any of them faulty) ask any signer for any of three checkpoints in
    any epoch, with the best certificate the standings they heard make. At most one
    checkpoint ever holds t shares of one epoch (what a signature needs); and from
    every state, with all standings heard, a checkpoint can still be signed."""
    n = len(q.holders)
    policies = signers(n)
    heard: dict[tuple[int, int], Standing] = {}  # (member, epoch) -> its standing
    shares: dict[tuple[int, bytes], set[int]] = {}  # (epoch, message) -> sharers
    for signer, which, epoch, listen in steps:
        i = signer % n
        if listen:  # every signer's standing, as a coordinator gathers them
            for s, _ in stands(policies, list(range(n))):
                heard[(s.member, s.epoch)] = s
            continue
        cert = [s for (_, e), s in heard.items() if e == epoch - 1]
        target = proposal(which)
        try:
            share(policies[i], target, epoch, cert, q)
        except RequestRefused:
            continue
        shares.setdefault((epoch, target.message()), set()).add(i)
        signable = {msg for (_, msg), who in shares.items() if len(who) >= q.t}
        assert len(signable) <= 1, f"two checkpoints at one height: {steps}"
    everyone = stands(policies, list(range(n)))
    top = max(s.standing.epoch for s in everyone)
    found = next_epoch(GUILD, HEIGHT, top, everyone, q, IDENTITIES)
    if found is not None:
        epoch, cert, want = found[0], found[1], proposal(9)
    else:  # a checkpoint of the top epoch can still get t shares: ask for it there
        at_top = [s for s, _ in everyone if s.epoch == top and s.msg]
        counts = {m: sum(s.msg == m for s in at_top) for m in {s.msg for s in at_top}}
        best = max(counts, key=lambda m: counts[m], default=b"")
        want = next((proposal(k) for k in range(4) if proposal(k).message() == best), proposal(9))
        epoch = top
        cert = next((c for s, c in everyone if s.epoch == top), [])
    took = 0
    for i in range(n):
        try:
            share(policies[i], want, epoch, cert, q)
            took += 1
        except RequestRefused:
            pass
    assert took >= q.t, f"no checkpoint can be signed any more: {steps}"
