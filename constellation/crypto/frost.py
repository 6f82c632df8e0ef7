"""FROST signing for BIP340 signatures, as specified by BIP445 (v0.8.0).

Participants have ids ``0..n-1``; participant ``i`` holds the share ``f(i+1)``. A signing
session among ``u`` signers (``t <= u <= n``) runs: each signer makes a nonce
(``nonce_gen``), the coordinator sums them (``nonce_agg``), each signer signs
(``sign``), the coordinator checks every partial signature (``partial_sig_verify``,
which names a cheater) and sums them (``partial_sig_agg``) into an ordinary BIP340
signature under the (possibly tweaked) threshold key.

Faithful to the BIP's reference code and vectors, including one deviation from its
text: the nonce coefficient hash is prefixed by the byte length of the serialized ids
(``4*u``), not by ``u`` (see ``NONCECOEF_PREFIX_IS_BYTE_LENGTH``).

Secret nonces are ``SecNonce`` objects that erase themselves when used, so a nonce
cannot be used twice through this API.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from coincurve import PublicKey

from constellation.codec import u32, u64
from constellation.crypto.point import (
    G,
    N,
    Point,
    add,
    add_all,
    base_mul,
    cbytes,
    cbytes_ext,
    cpoint,
    cpoint_ext,
    has_even_y,
    mul,
    scalar,
    scalar_bytes,
    xbytes,
    xor_bytes,
)
from constellation.errors import InvalidContribution, NonceReuse, SigningError
from constellation.hashing import tagged_hash, tagged_hasher

NONCECOEF_PREFIX_IS_BYTE_LENGTH = True

_h_aux = tagged_hasher("BIP0445/aux")
_h_nonce = tagged_hasher("BIP0445/nonce")
_h_noncecoef = tagged_hasher("BIP0445/noncecoef")
_h_det_nonce = tagged_hasher("BIP0445/deterministic/nonce")
_h_challenge = tagged_hasher("BIP0340/challenge")


# -- signer sets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignersContext:
    """The signers of one session: their ids and public shares, and the threshold key."""

    n: int
    t: int
    ids: tuple[int, ...]
    pubshares: tuple[bytes, ...]  # 33-byte compressed points, parallel to ids
    thresh_pk: bytes  # 33-byte compressed point

    @property
    def u(self) -> int:
        return len(self.ids)


def lagrange(ids: Sequence[int], my_id: int) -> int:
    """The interpolating value of ``my_id`` at 0, over shares ``f(id+1)``."""
    num = den = 1
    for j in ids:
        if j != my_id:
            num = num * (j + 1) % N
            den = den * (j - my_id) % N
    return num * pow(den, -1, N) % N


def derive_thresh_pubkey(ids: Sequence[int], pubshares: Sequence[PublicKey]) -> Point:
    return add_all([mul(p, lagrange(ids, i)) for i, p in zip(ids, pubshares, strict=True)])


_validated: dict[SignersContext, None] = {}
_VALIDATED_MAX = 1024


def validate_signers_ctx(ctx: SignersContext) -> None:
    """Raise ``SigningError`` unless the set is consistent with the threshold key.

    Costs ``u`` point multiplications, so a validated context is remembered (bounded).
    """
    if ctx in _validated:
        return
    if not 1 <= ctx.t <= ctx.n:
        raise SigningError("t must be in 1..n")
    if not ctx.t <= ctx.u <= ctx.n:
        raise SigningError("the number of signers must be in t..n")
    if len(ctx.pubshares) != ctx.u:
        raise SigningError("the pubshares and ids arrays must have the same length")
    for i in ctx.ids:
        if not 0 <= i < ctx.n:
            raise SigningError(f"participant identifier {i} is outside 0..n-1")
    if len(set(ctx.ids)) != ctx.u:
        raise SigningError("the participant identifier list contains duplicate elements")
    points = []
    for k, share in enumerate(ctx.pubshares):
        try:
            points.append(cpoint(share))
        except ValueError:
            raise SigningError(f"invalid pubshare at index {k}") from None
    try:
        thresh = cpoint(ctx.thresh_pk)
    except ValueError:
        raise SigningError("invalid threshold public key") from None
    derived = derive_thresh_pubkey(ctx.ids, points)
    if derived is None or cbytes(derived) != cbytes(thresh):
        raise SigningError("the signers' pubshares do not interpolate to the threshold key")
    if len(_validated) >= _VALIDATED_MAX:
        _validated.clear()
    _validated[ctx] = None


# -- tweaks (BIP32 plain tweaks, BIP341 x-only tweaks) -------------------------------------


@dataclass(frozen=True)
class TweakContext:
    q: PublicKey
    gacc: int
    tacc: int

    @classmethod
    def init(cls, thresh_pk: bytes) -> TweakContext:
        return cls(cpoint(thresh_pk), 1, 0)

    def apply(self, tweak: bytes, is_xonly: bool) -> TweakContext:
        if len(tweak) != 32:
            raise SigningError("the tweak must be 32 bytes")
        g = N - 1 if is_xonly and not has_even_y(self.q) else 1
        t = scalar(tweak)
        if t >= N:
            raise SigningError("the tweak must be less than n")
        q = add(mul(self.q, g), base_mul(t))
        if q is None:
            raise SigningError("the tweaked key is infinity")
        return TweakContext(q, g * self.gacc % N, (t + g * self.tacc) % N)

    @property
    def xonly_pk(self) -> bytes:
        return xbytes(self.q)


def tweak_context(
    thresh_pk: bytes, tweaks: Sequence[bytes], is_xonly: Sequence[bool]
) -> TweakContext:
    if len(tweaks) != len(is_xonly):
        raise SigningError("the tweaks and is_xonly arrays must have the same length")
    ctx = TweakContext.init(thresh_pk)
    for tweak, xonly in zip(tweaks, is_xonly, strict=True):
        ctx = ctx.apply(tweak, xonly)
    return ctx


def taproot_tweak(internal_xonly: bytes, merkle_root: bytes = b"") -> bytes:
    """The BIP341 key-path tweak ``hash_TapTweak(x(P) || merkle_root)``."""
    return tagged_hash("TapTweak", internal_xonly + merkle_root)


# -- nonces ---------------------------------------------------------------------------------


class SecNonce:
    """A secret nonce pair. ``take`` hands it out once and erases it."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        if len(data) != 64:
            raise SigningError("a secret nonce is 64 bytes")
        self._data = bytearray(data)

    def take(self) -> tuple[int, int]:
        if not any(self._data):
            raise NonceReuse("this secret nonce was already used (or is zero)")
        k1, k2 = scalar(bytes(self._data[:32])), scalar(bytes(self._data[32:]))
        self._data[:] = bytes(64)
        if not (0 < k1 < N and 0 < k2 < N):
            raise SigningError("secret nonce value out of range")
        return k1, k2

    def __repr__(self) -> str:
        return "SecNonce(<secret>)" if any(self._data) else "SecNonce(<used>)"


def nonce_gen(
    secshare: bytes | None = None,
    pubshare: bytes | None = None,
    thresh_pk_xonly: bytes | None = None,
    msg: bytes | None = None,
    extra_in: bytes | None = None,
    rand_: bytes | None = None,
) -> tuple[SecNonce, bytes]:
    """A fresh nonce: ``(secnonce, pubnonce)``; pass ``rand_`` only for test vectors."""
    rand_ = os.urandom(32) if rand_ is None else rand_
    if len(rand_) != 32:
        raise SigningError("rand_ must be 32 bytes")
    rand = xor_bytes(secshare, _h_aux(rand_)) if secshare is not None else rand_
    pubshare = pubshare or b""
    tpk = thresh_pk_xonly or b""
    extra = extra_in or b""
    msg_prefixed = b"\x00" if msg is None else b"\x01" + u64(len(msg)) + msg
    prefix = (
        rand
        + bytes([len(pubshare)])
        + pubshare
        + bytes([len(tpk)])
        + tpk
        + msg_prefixed
        + u32(len(extra))
        + extra
    )
    k1 = scalar(_h_nonce(prefix + b"\x00")) % N
    k2 = scalar(_h_nonce(prefix + b"\x01")) % N
    assert k1 != 0 and k2 != 0, "nonce hash was zero"
    r1, r2 = base_mul(k1), base_mul(k2)
    assert r1 is not None and r2 is not None
    secnonce = SecNonce(scalar_bytes(k1) + scalar_bytes(k2))
    return secnonce, cbytes(r1) + cbytes(r2)


def nonce_agg(pubnonces: Sequence[bytes], ids: Sequence[int] | None = None) -> bytes:
    """Sum the signers' public nonces; a bad one raises ``InvalidContribution`` naming it."""
    sums: list[Point] = [None, None]
    for k, pubnonce in enumerate(pubnonces):
        who = ids[k] if ids is not None else k
        if len(pubnonce) != 66:
            raise InvalidContribution(who, "pubnonce")
        for j in (0, 1):
            try:
                sums[j] = add(sums[j], cpoint(pubnonce[33 * j : 33 * (j + 1)]))
            except ValueError:
                raise InvalidContribution(who, "pubnonce") from None
    return cbytes_ext(sums[0]) + cbytes_ext(sums[1])


# -- sessions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionContext:
    signers: SignersContext
    aggnonce: bytes
    tweaks: tuple[bytes, ...]
    is_xonly: tuple[bool, ...]
    msg: bytes


@dataclass(frozen=True)
class SessionValues:
    q: PublicKey
    gacc: int
    tacc: int
    b: int
    r: PublicKey
    e: int


def serialize_ids(ids: Sequence[int]) -> bytes:
    return b"".join(u32(i) for i in sorted(ids))


def get_session_values(session: SessionContext) -> SessionValues:
    validate_signers_ctx(session.signers)
    tweak = tweak_context(session.signers.thresh_pk, session.tweaks, session.is_xonly)
    ser_ids = serialize_ids(session.signers.ids)
    count = len(ser_ids) if NONCECOEF_PREFIX_IS_BYTE_LENGTH else session.signers.u
    b = (
        scalar(
            _h_noncecoef(u32(count) + ser_ids + session.aggnonce + xbytes(tweak.q) + session.msg)
        )
        % N
    )
    if len(session.aggnonce) != 66:
        raise InvalidContribution(None, "aggnonce")
    try:
        r1 = cpoint_ext(session.aggnonce[:33])
        r2 = cpoint_ext(session.aggnonce[33:])
    except ValueError:
        raise InvalidContribution(None, "aggnonce") from None
    r = add(r1, mul(r2, b)) or G  # infinity becomes G: all valid psigs still sum to valid
    e = scalar(_h_challenge(xbytes(r) + xbytes(tweak.q) + session.msg)) % N
    return SessionValues(tweak.q, tweak.gacc, tweak.tacc, b, r, e)


def sign(secnonce: SecNonce, secshare: bytes, my_id: int, session: SessionContext) -> bytes:
    """This signer's partial signature; ``secnonce`` is erased and cannot sign again."""
    values = get_session_values(session)
    k1_, k2_ = secnonce.take()
    k1, k2 = (k1_, k2_) if has_even_y(values.r) else (N - k1_, N - k2_)
    d_ = scalar(secshare)
    if not 0 < d_ < N:
        raise SigningError("the secret share is out of range")
    signers = session.signers
    if my_id not in signers.ids:
        raise SigningError("the signer's id must be present in the participant identifier list")
    pubshare = base_mul(d_)
    assert pubshare is not None
    if signers.pubshares[signers.ids.index(my_id)] != cbytes(pubshare):
        raise SigningError("the secret share does not match the signer's public share")
    lam = lagrange(signers.ids, my_id)
    g = 1 if has_even_y(values.q) else N - 1
    d = g * values.gacc * d_ % N
    s = (k1 + values.b * k2 + values.e * lam * d) % N
    psig = scalar_bytes(s)
    r1, r2 = base_mul(k1_), base_mul(k2_)
    assert r1 is not None and r2 is not None
    assert partial_sig_verify_internal(
        psig, my_id, cbytes(r1) + cbytes(r2), cbytes(pubshare), session, values
    )
    return psig


def partial_sig_verify_internal(
    psig: bytes,
    my_id: int,
    pubnonce: bytes,
    pubshare: bytes,
    session: SessionContext,
    values: SessionValues,
) -> bool:
    """Check one partial signature against values computed once for the session."""
    s = scalar(psig)
    if len(psig) != 32 or s >= N:
        return False
    try:
        r1, r2 = cpoint(pubnonce[:33]), cpoint(pubnonce[33:66])
        p = cpoint(pubshare)
    except ValueError:
        return False
    re_ = add(r1, mul(r2, values.b))
    if not has_even_y(values.r):
        re_ = mul(re_, N - 1)
    g = 1 if has_even_y(values.q) else N - 1
    lam = lagrange(session.signers.ids, my_id)
    expected = add(re_, mul(p, values.e * lam * g * values.gacc))
    actual = base_mul(s)
    if actual is None or expected is None:
        return actual is None and expected is None
    return cbytes(actual) == cbytes(expected)


def partial_sig_verify(
    psig: bytes,
    pubnonces: Sequence[bytes],
    signers: SignersContext,
    tweaks: Sequence[bytes],
    is_xonly: Sequence[bool],
    msg: bytes,
    i: int,
) -> bool:
    """Check signer ``signers.ids[i]``'s partial signature against its own nonce."""
    if len(pubnonces) != signers.u:
        raise SigningError("the pubnonces and ids arrays must have the same length")
    aggnonce = nonce_agg(pubnonces, signers.ids)
    session = SessionContext(signers, aggnonce, tuple(tweaks), tuple(is_xonly), msg)
    values = get_session_values(session)
    return partial_sig_verify_internal(
        psig, signers.ids[i], pubnonces[i], signers.pubshares[i], session, values
    )


def partial_sig_agg(psigs: Sequence[bytes], session: SessionContext) -> bytes:
    """Sum the partial signatures into a BIP340 signature under the tweaked key."""
    signers = session.signers
    if len(psigs) != signers.u:
        raise SigningError("the psigs and ids arrays must have the same length")
    values = get_session_values(session)
    s = 0
    for k, psig in enumerate(psigs):
        si = scalar(psig)
        if len(psig) != 32 or si >= N:
            raise InvalidContribution(signers.ids[k], "psig")
        s = (s + si) % N
    g = 1 if has_even_y(values.q) else N - 1
    s = (s + values.e * g * values.tacc) % N
    return xbytes(values.r) + scalar_bytes(s)


def deterministic_sign(
    secshare: bytes,
    my_id: int,
    aggothernonce: bytes,
    signers: SignersContext,
    tweaks: Sequence[bytes],
    is_xonly: Sequence[bool],
    msg: bytes,
    aux_rand: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Sign without keeping nonce state: for the one signer that contributes its nonce last.

    Returns ``(pubnonce, psig)``. The nonce is derived from the share, the signer set,
    the other signers' aggregated nonce, the tweaked key and the message, so it is never
    reused for a different session.
    """
    secshare_ = xor_bytes(secshare, _h_aux(aux_rand)) if aux_rand is not None else secshare
    tweak = tweak_context(signers.thresh_pk, tweaks, is_xonly)
    prefix = (
        secshare_
        + u32(my_id)
        + u32(signers.u)
        + serialize_ids(signers.ids)
        + aggothernonce
        + tweak.xonly_pk
        + u64(len(msg))
        + msg
    )
    k1 = scalar(_h_det_nonce(prefix + b"\x00")) % N
    k2 = scalar(_h_det_nonce(prefix + b"\x01")) % N
    r1, r2 = base_mul(k1), base_mul(k2)
    assert r1 is not None and r2 is not None, "nonce hash was zero"
    pubnonce = cbytes(r1) + cbytes(r2)
    try:
        others = [cpoint_ext(aggothernonce[33 * j : 33 * (j + 1)]) for j in (0, 1)]
    except ValueError:
        raise InvalidContribution(None, "aggothernonce") from None
    aggnonce = cbytes_ext(add(others[0], r1)) + cbytes_ext(add(others[1], r2))
    session = SessionContext(signers, aggnonce, tuple(tweaks), tuple(is_xonly), msg)
    secnonce = SecNonce(scalar_bytes(k1) + scalar_bytes(k2))
    return pubnonce, sign(secnonce, secshare, my_id, session)
