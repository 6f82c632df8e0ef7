"""ChillDKG end to end: the keys it makes sign with FROST; a bad dealer is named."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.crypto import dkg
from constellation.crypto.point import (
    N,
    add,
    add_all,
    base_mul,
    cbytes,
    cpoint,
    mul,
    scalar,
    xbytes,
)
from constellation.crypto.roast import Group
from constellation.errors import FaultyCoordinatorError, FaultyParticipantOrCoordinatorError
from constellation.hashing import tagged_hash
from constellation.keys import schnorr_verify
from tests.crypto.test_frost import run_session

BIP340 = Path(__file__).parents[1] / "vectors" / "bip340" / "test-vectors.csv"


def test_tagged_bip340_is_bip340_with_the_standard_prefix() -> None:
    for row in csv.DictReader(BIP340.open()):
        msg, sig = bytes.fromhex(row["message"]), bytes.fromhex(row["signature"])
        pubkey = bytes.fromhex(row["public key"])
        if row["secret key"]:
            secret, aux = bytes.fromhex(row["secret key"]), bytes.fromhex(row["aux_rand"])
            assert dkg.bip340_sign_tagged("BIP0340", msg, secret, aux) == sig
        expected = row["verification result"] == "TRUE"
        assert dkg.bip340_verify_tagged("BIP0340", msg, pubkey, sig) is expected


def run_dkg(
    n: int, t: int, rng: random.Random, corrupt: int | None = None
) -> tuple[list[bytes], list[dkg.DKGOutput], list[bytes], dkg.SessionParams]:
    seckeys = [rng.randbytes(32) for _ in range(n)]
    params = dkg.SessionParams(tuple(dkg.hostpubkey_gen(k) for k in seckeys), t)
    steps = [dkg.participant_step1(k, params, rng.randbytes(32)) for k in seckeys]
    pmsgs1 = [m for _, m in steps]
    if corrupt is not None:  # participant `corrupt` sends participant 0 a wrong share
        m = bytearray(pmsgs1[corrupt])
        at = 33 * t + 97
        m[at : at + 32] = ((int.from_bytes(m[at : at + 32], "big") + 1) % N).to_bytes(32, "big")
        pmsgs1[corrupt] = bytes(m)
    cstate, cmsg1 = dkg.coordinator_step1(pmsgs1, params)
    states2 = []
    for k, (state1, _) in zip(seckeys, steps, strict=True):
        try:
            states2.append(dkg.participant_step2(k, state1, cmsg1, rng.randbytes(32)))
        except dkg.UnknownFaultyParticipantOrCoordinatorError as exc:
            cinv = dkg.coordinator_investigate(pmsgs1, params)[state1.idx]
            dkg.participant_investigate(exc, cinv)
    cmsg2, _, recovery = dkg.coordinator_finalize(cstate, [m for _, m in states2])
    outputs = [dkg.participant_finalize(s, cmsg2)[0] for s, _ in states2]
    return seckeys, outputs, [recovery], params


@given(st.sampled_from([(2, 3), (3, 5), (1, 1), (5, 7)]), st.integers(0, 2**32))
@settings(max_examples=8, deadline=None)
def test_dkg_keys_sign_with_frost(tn: tuple[int, int], seed: int) -> None:
    t, n = tn
    rng = random.Random(seed)
    seckeys, outputs, (recovery,), _ = run_dkg(n, t, rng)
    first = outputs[0]
    assert all(o.threshold_pubkey == first.threshold_pubkey for o in outputs)
    assert all(o.pubshares == first.pubshares for o in outputs)
    group = Group(n, t, first.threshold_pubkey, first.pubshares)
    shares = [o.secshare for o in outputs if o.secshare is not None]
    signers = rng.sample(range(n), t)
    sig = run_session(group, shares, signers, b"guild checkpoint")
    assert schnorr_verify(first.threshold_pubkey[1:], b"guild checkpoint", sig)
    # a participant that lost its state recovers its share from the recovery data
    lost = rng.randrange(n)
    assert dkg.recover(seckeys[lost], recovery)[0] == outputs[lost]


def test_a_bad_share_is_traced_to_its_sender() -> None:
    with pytest.raises(FaultyParticipantOrCoordinatorError) as info:
        run_dkg(3, 2, random.Random(7), corrupt=2)
    assert info.value.participant == 2


def test_tampered_recovery_data_is_refused() -> None:
    seckeys, _, (recovery,), _ = run_dkg(3, 2, random.Random(8))
    tampered = bytearray(recovery)
    tampered[40] ^= 1
    with pytest.raises(ValueError):
        dkg.recover(seckeys[0], bytes(tampered))
    with pytest.raises(ValueError):
        dkg.recover(os.urandom(32), recovery)


def test_sums_that_make_a_pubshare_infinity_blame_the_coordinator() -> None:
    """The sums of the commitments to the non-constant terms are the coordinator's (no
    proof of possession covers them): one that makes a participant's pubshare the point
    at infinity is the coordinator's fault, said as such (it was an AssertionError, and
    the participant sent no answer and held the session open)."""
    rng = random.Random(7)
    seckeys = [rng.randbytes(32) for _ in range(3)]
    params = dkg.SessionParams(tuple(dkg.hostpubkey_gen(k) for k in seckeys), 2)
    steps = [dkg.participant_step1(k, params, rng.randbytes(32)) for k in seckeys]
    _, cmsg1 = dkg.coordinator_step1([m for _, m in steps], params)
    key = add_all([cpoint(cmsg1[33 * i : 33 * (i + 1)]) for i in range(3)])
    assert key is not None
    tweaked = add(key, base_mul(scalar(tagged_hash("TapTweak", xbytes(key)))))
    # participant 2's pubshare, tweaked + 3 * term, is infinity
    term = mul(tweaked, (N - pow(3, -1, N)) % N)
    assert term is not None
    evil = cmsg1[: 33 * 3] + cbytes(term) + cmsg1[33 * 4 :]
    with pytest.raises(FaultyCoordinatorError, match="infinity"):
        dkg.participant_step2(seckeys[0], steps[0][0], evil, rng.randbytes(32))
