"""FROST properties: any t shares sign, fewer cannot, cheaters are named, nonces die."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.crypto import frost
from constellation.crypto.point import N, xbytes
from constellation.crypto.roast import Group, SignRequest
from constellation.errors import NonceReuse, SigningError
from constellation.keys import schnorr_verify
from tests.crypto.dealer import deal


def run_session(
    group: Group,
    shares: list[bytes],
    ids: list[int],
    msg: bytes,
    tweaks: tuple[bytes, ...] = (),
    is_xonly: tuple[bool, ...] = (),
) -> bytes:
    nonces = {i: frost.nonce_gen(shares[i], group.pubshares[i]) for i in ids}
    ids_t = tuple(sorted(ids))
    request = SignRequest(0, ids_t, tuple(nonces[i][1] for i in ids_t), msg, tweaks, is_xonly)
    session = request.session(group)
    psigs = [frost.sign(nonces[i][0], shares[i], i, session) for i in ids_t]
    for k, psig in enumerate(psigs):
        assert frost.partial_sig_verify(
            psig, request.pubnonces, session.signers, tweaks, is_xonly, msg, k
        )
    return frost.partial_sig_agg(psigs, session)


@given(st.integers(1, 7), st.data())
@settings(max_examples=25, deadline=None)
def test_any_t_of_n_sign(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    group, shares = deal(n, t, random.Random(data.draw(st.integers(0, 2**32))))
    ids = data.draw(st.lists(st.integers(0, n - 1), min_size=t, max_size=n, unique=True))
    msg = data.draw(st.binary(max_size=64))
    sig = run_session(group, shares, ids, msg)
    assert schnorr_verify(group.thresh_pk[1:], msg, sig)


def test_fewer_than_t_cannot_sign() -> None:
    group, shares = deal(5, 3, random.Random(1))
    with pytest.raises(SigningError, match=r"in t\.\.n"):
        run_session(group, shares, [0, 1], b"m")
    # two shares used as if they were a full set interpolate to a different key
    fake = Group(group.n, 2, group.thresh_pk, group.pubshares)
    with pytest.raises(SigningError, match="interpolate"):
        run_session(fake, shares, [0, 1], b"m")


@given(st.data())
@settings(max_examples=15, deadline=None)
def test_tweaked_signatures_verify_under_the_tweaked_key(data: st.DataObject) -> None:
    group, shares = deal(3, 2, random.Random(data.draw(st.integers(0, 2**32))))
    n_tweaks = data.draw(st.integers(0, 3))
    tweaks = tuple(data.draw(st.binary(min_size=32, max_size=32)) for _ in range(n_tweaks))
    is_xonly = tuple(data.draw(st.booleans()) for _ in range(n_tweaks))
    sig = run_session(group, shares, [0, 2], b"tweaked", tweaks, is_xonly)
    key = frost.tweak_context(group.thresh_pk, tweaks, is_xonly)
    assert schnorr_verify(key.xonly_pk, b"tweaked", sig)


def test_taproot_tweak_gives_the_p2tr_output_key() -> None:
    group, shares = deal(3, 2, random.Random(5))
    internal = group.thresh_pk[1:]
    tweak = frost.taproot_tweak(internal)
    sig = run_session(group, shares, [1, 2], b"spend", (tweak,), (True,))
    output = frost.tweak_context(group.thresh_pk, [tweak], [True])
    assert schnorr_verify(xbytes(output.q), b"spend", sig)


def test_tampered_partial_signature_is_identified() -> None:
    group, shares = deal(4, 3, random.Random(2))
    ids = (0, 1, 3)
    nonces = {i: frost.nonce_gen(shares[i], group.pubshares[i]) for i in ids}
    request = SignRequest(0, ids, tuple(nonces[i][1] for i in ids), b"m")
    session = request.session(group)
    psigs = [frost.sign(nonces[i][0], shares[i], i, session) for i in ids]
    bad = ((int.from_bytes(psigs[1], "big") + 1) % N).to_bytes(32, "big")
    verdicts = [
        frost.partial_sig_verify(p, request.pubnonces, session.signers, [], [], b"m", k)
        for k, p in enumerate([psigs[0], bad, psigs[2]])
    ]
    assert verdicts == [True, False, True]


def test_a_nonce_signs_once() -> None:
    group, shares = deal(2, 2, random.Random(3))
    nonces = {i: frost.nonce_gen(shares[i], group.pubshares[i]) for i in (0, 1)}
    request = SignRequest(0, (0, 1), (nonces[0][1], nonces[1][1]), b"m")
    session = request.session(group)
    frost.sign(nonces[0][0], shares[0], 0, session)
    with pytest.raises(NonceReuse):
        frost.sign(nonces[0][0], shares[0], 0, session)
    assert "used" in repr(nonces[0][0])


def test_deterministic_sign_completes_a_session() -> None:
    group, shares = deal(3, 3, random.Random(4))
    msg = b"checkpoint"
    ids = (0, 1, 2)
    first = {i: frost.nonce_gen(shares[i], group.pubshares[i]) for i in (0, 1)}
    other = frost.nonce_agg([first[0][1], first[1][1]])
    signers = group.signers(ids)
    pubnonce2, psig2 = frost.deterministic_sign(shares[2], 2, other, signers, [], [], msg)
    again = frost.deterministic_sign(shares[2], 2, other, signers, [], [], msg)
    assert again == (pubnonce2, psig2)  # stateless: the same inputs give the same answer
    request = SignRequest(0, ids, (first[0][1], first[1][1], pubnonce2), msg)
    session = request.session(group)
    psigs = [frost.sign(first[i][0], shares[i], i, session) for i in (0, 1)] + [psig2]
    sig = frost.partial_sig_agg(psigs, session)
    assert schnorr_verify(group.thresh_pk[1:], msg, sig)
