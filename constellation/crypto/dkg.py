"""ChillDKG: distributed key generation for FROST without a trusted dealer.

Implements the ChillDKG draft (v0.3.0-dev, BlockstreamResearch/bip-frost-dkg) and
reproduces its test vectors:

* SimplPedPop — each participant deals a random degree ``t-1`` polynomial with Feldman
  commitments and a proof of possession of its constant term; the coordinator sums
  the commitments.
* EncPedPop — shares travel to each participant encrypted under an ECDH pad between
  the sender's session nonce and the recipient's host key; the coordinator sums the
  ciphertexts without learning any share.
* CertEq — every participant signs the transcript (``eq_input``) with its host key;
  all ``n`` signatures form a certificate that the session succeeded, and transcript
  plus certificate are the recovery data from which a participant that lost its state
  recomputes its share with only its host key.

The threshold key commits to an unspendable BIP341 script path (a TapTweak of the
summed key with an empty merkle root), so no participant can hide a script path in it.
Participant ids are positions in the host key list (0..n-1) and shares are ``f(id+1)``,
exactly what ``constellation.crypto.frost`` expects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from coincurve import PrivateKey, PublicKey

from constellation.codec import u32
from constellation.crypto.point import (
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
from constellation.errors import (
    ConstellationError,
    DKGError,
    DKGProtocolError,
    DuplicateHostPubkeyError,
    FaultyCoordinatorError,
    FaultyParticipantError,
    FaultyParticipantOrCoordinatorError,
    HostSeckeyError,
    InvalidHostPubkeyError,
    RandomnessError,
    ThresholdOrCountError,
)
from constellation.hashing import tagged_hash
from constellation.keys import schnorr_sign, schnorr_verify

BIP_TAG = "BIP DKG/"
POP_TAG_PREFIX = BIP_TAG + "pop message"


def _h(tag: str, data: bytes) -> bytes:
    return tagged_hash(BIP_TAG + tag, data)


# -- BIP340 with a custom tag prefix (the proofs of possession) ---------------------------


def bip340_sign_tagged(prefix: str, msg: bytes, secret: bytes, aux_rand: bytes) -> bytes:
    """BIP340 signing with ``prefix/aux``, ``prefix/nonce``, ``prefix/challenge`` tags.

    With ``prefix="BIP0340"`` this is exactly BIP340 (the tests check it against BIP340's
    vectors); ChillDKG's proofs of possession use their own prefix for domain separation.
    """
    d0 = scalar(secret)
    if not 0 < d0 < N:
        raise DKGError("secret key is zero or not below the curve order")
    p = base_mul(d0)
    assert p is not None
    d = d0 if has_even_y(p) else N - d0
    masked = xor_bytes(scalar_bytes(d), tagged_hash(prefix + "/aux", aux_rand))
    k0 = scalar(tagged_hash(prefix + "/nonce", masked + xbytes(p) + msg)) % N
    assert k0 != 0, "nonce hash was zero"
    r = base_mul(k0)
    assert r is not None
    k = k0 if has_even_y(r) else N - k0
    e = scalar(tagged_hash(prefix + "/challenge", xbytes(r) + xbytes(p) + msg)) % N
    return xbytes(r) + scalar_bytes(k + e * d)


def bip340_verify_tagged(prefix: str, msg: bytes, pubkey: bytes, sig: bytes) -> bool:
    if len(sig) != 64 or len(pubkey) != 32:
        return False
    try:
        p = cpoint(b"\x02" + pubkey)
    except ValueError:
        return False
    s = scalar(sig[32:])
    if s >= N or scalar(sig[:32]) >= 2**256 - 2**32 - 977:
        return False
    e = scalar(tagged_hash(prefix + "/challenge", sig[:32] + pubkey + msg)) % N
    r = add(base_mul(s), mul(p, N - e))
    return r is not None and has_even_y(r) and xbytes(r) == sig[:32]


# -- host keys and session parameters ------------------------------------------------------


def hostpubkey_gen(hostseckey: bytes) -> bytes:
    """The 33-byte compressed host public key of a 32-byte host secret key."""
    if len(hostseckey) != 32:
        raise DKGError("a host secret key is 32 bytes")
    if not 0 < scalar(hostseckey) < N:
        raise HostSeckeyError("host secret key is zero or not below the curve order")
    return PrivateKey(hostseckey).public_key.format()


class SessionParams(NamedTuple):
    """The ordered host public keys of all participants and the threshold ``t``."""

    hostpubkeys: tuple[bytes, ...]
    t: int


def params_validate(params: SessionParams) -> None:
    hostpubkeys, t = params
    if not 1 <= t <= len(hostpubkeys) <= 2**32 - 1:
        raise ThresholdOrCountError(f"need 1 <= t <= n, got t={t}, n={len(hostpubkeys)}")
    for i, key in enumerate(hostpubkeys):
        try:
            cpoint(key)
        except ValueError:
            raise InvalidHostPubkeyError(i) from None
    first: dict[bytes, int] = {}
    for i, key in enumerate(hostpubkeys):
        if key in first:
            raise DuplicateHostPubkeyError(first[key], i)
        first[key] = i


def params_hash(params: SessionParams) -> bytes:
    """A hash of the parameters for participants to compare out of band."""
    params_validate(params)
    return _h("params_hash", u32(params.t) + b"".join(params.hostpubkeys))


# -- VSS -----------------------------------------------------------------------------------


def _vss_coeffs(seed: bytes, t: int) -> list[int]:
    coeffs = [scalar(_h("vss coeffs", seed + u32(k))) for k in range(t)]
    assert all(c < N for c in coeffs), "a coefficient hash exceeded n"
    return coeffs


def _poly_eval(coeffs: Sequence[int], x: int) -> int:
    value = 0
    for c in reversed(coeffs):
        value = (value * x + c) % N
    return value


def _pubshare(coms: Sequence[Point], i: int) -> Point:
    return add_all([mul(c, pow(i + 1, j, N)) for j, c in enumerate(coms)])


def _taproot_commit(
    coms: Sequence[Point], fault: type[ConstellationError] = DKGError
) -> tuple[list[Point], int]:
    """Tweak the commitment so the key commits to an unspendable script path."""
    if coms[0] is None:
        raise fault("the summed key is infinity")
    tweak = scalar(tagged_hash("TapTweak", xbytes(coms[0])))
    assert tweak < N, "TapTweak hash exceeded n"
    return [add(coms[0], base_mul(tweak)), *coms[1:]], tweak


def _ser(points: Sequence[Point]) -> bytes:
    return b"".join(cbytes_ext(p) for p in points)


def _parse_points(data: bytes, count: int, what: str) -> list[Point]:
    try:
        return [cpoint_ext(data[33 * k : 33 * (k + 1)]) for k in range(count)]
    except ValueError:
        raise DKGError(f"{what} holds a value that is not a point") from None


# -- EncPedPop pads ------------------------------------------------------------------------


def _enc_context(t: int, hostpubkeys: Sequence[bytes]) -> bytes:
    return u32(t) + b"".join(hostpubkeys)


def _ecdh_pad(seckey: bytes, my_pub: bytes, their_pub: bytes, context: bytes, sending: bool) -> int:
    shared = hashlib.sha256(PublicKey(their_pub).multiply(seckey).format()).digest()
    keys = my_pub + their_pub if sending else their_pub + my_pub
    return scalar(_h("encpedpop ecdh", shared + keys + context)) % N


def _self_pad(symkey: bytes, nonce: bytes, context: bytes) -> int:
    return scalar(_h("encaps_multi self_pad", symkey + nonce + context)) % N


def _decryption_pads(
    hostseckey: bytes, hostpubkey: bytes, pubnonces: Sequence[bytes], context: bytes, idx: int
) -> list[int]:
    """The pads each sender used for ``idx``; an unparsable nonce blames its sender."""
    context_ = u32(idx) + context
    pads = []
    for sender, pubnonce in enumerate(pubnonces):
        if sender == idx:
            pads.append(_self_pad(hostseckey, pubnonce, context_))
            continue
        try:
            cpoint(pubnonce)
        except ValueError:
            raise FaultyParticipantOrCoordinatorError(sender, "invalid public nonce") from None
        pads.append(_ecdh_pad(hostseckey, hostpubkey, pubnonce, context_, sending=False))
    return pads


# -- outputs -------------------------------------------------------------------------------


class DKGOutput(NamedTuple):
    """A participant's share (None for the coordinator), the threshold key, every pubshare."""

    secshare: bytes | None
    threshold_pubkey: bytes  # 33-byte compressed
    pubshares: tuple[bytes, ...]


@dataclass(frozen=True)
class InvestigationData:
    """What a participant keeps to find out who sent it a bad share."""

    n: int
    idx: int
    secshare: int  # untweaked sum of the decrypted partial shares
    pubshare: Point  # untweaked
    enc_secshare: int
    pads: tuple[int, ...]


class UnknownFaultyParticipantOrCoordinatorError(DKGProtocolError):
    """The summed share does not match its commitment: someone sent a bad share.

    ``participant_investigate`` with the coordinator's investigation message names them.
    """

    code = "dkg.unknown_faulty"

    def __init__(self, inv_data: InvestigationData) -> None:
        super().__init__(
            "received an invalid secret share; run participant_investigate to find the sender"
        )
        self.inv_data = inv_data


def _outputs(
    sum_coms: Sequence[Point], n: int, fault: type[ConstellationError] = DKGError
) -> tuple[int, bytes, tuple[bytes, ...]]:
    """The tweak, the key and each participant's pubshare the summed commitments make;
    ``fault``: raised where one is infinity (whoever sent the sums is at fault: a
    participant names its coordinator)."""
    tweaked, tweak = _taproot_commit(sum_coms, fault)
    thresh = tweaked[0]
    if thresh is None:
        raise fault("the tweaked key is infinity")
    pubshares = []
    for i in range(n):
        p = _pubshare(tweaked, i)
        if p is None:
            raise fault(f"participant {i}'s pubshare is infinity")
        pubshares.append(cbytes(p))
    return tweak, cbytes(thresh), tuple(pubshares)


def _certeq_message(eq_input: bytes, idx: int) -> bytes:
    prefix = (BIP_TAG + "certeq message").encode()
    return prefix + bytes(33 - len(prefix)) + u32(idx) + eq_input


def _cert_invalid_signer(hostpubkeys: Sequence[bytes], eq_input: bytes, cert: bytes) -> int | None:
    for i, key in enumerate(hostpubkeys):
        if not schnorr_verify(key[1:], _certeq_message(eq_input, i), cert[64 * i : 64 * (i + 1)]):
            return i
    return None


# -- participant ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParticipantState1:
    params: SessionParams
    idx: int
    hostpubkey: bytes
    com_to_secret: bytes
    pubnonce: bytes


@dataclass(frozen=True)
class ParticipantState2:
    params: SessionParams
    eq_input: bytes
    output: DKGOutput


def participant_step1(
    hostseckey: bytes, params: SessionParams, random: bytes
) -> tuple[ParticipantState1, bytes]:
    """Deal this participant's polynomial: returns its state and the first message.

    ``random`` must be 32 FRESH random bytes (all zero is refused).
    """
    hostpubkey = hostpubkey_gen(hostseckey)
    params_validate(params)
    hostpubkeys, t = params
    if hostpubkey not in hostpubkeys:
        raise HostSeckeyError("Host secret key does not match any host public key")
    idx = hostpubkeys.index(hostpubkey)
    if len(random) != 32:
        raise DKGError("randomness must be 32 bytes")
    if not any(random):
        raise RandomnessError("randomness is all zero")
    n = len(hostpubkeys)
    context = _enc_context(t, hostpubkeys)
    seed = _h("encpedpop seed", hostseckey + random + context)
    secnonce = _h("encpedpop secnonce", seed)
    pubnonce = PrivateKey(secnonce).public_key.format()
    coeffs = _vss_coeffs(seed, t)
    coms = [base_mul(c) for c in coeffs]
    pop = bip340_sign_tagged(
        POP_TAG_PREFIX, u32(idx), scalar_bytes(coeffs[0]), _h("simplpedpop aux", seed)
    )
    enc_shares = []
    for j, key in enumerate(hostpubkeys):
        context_ = u32(j) + context
        if j == idx:
            pad = _self_pad(hostseckey, pubnonce, context_)
        else:
            pad = _ecdh_pad(secnonce, pubnonce, key, context_, sending=True)
        enc_shares.append(scalar_bytes(_poly_eval(coeffs, j + 1) + pad))
    com_bytes = _ser(coms)
    pmsg1 = com_bytes + pop + pubnonce + b"".join(enc_shares)
    assert len(pmsg1) == 33 * t + 97 + 32 * n
    return ParticipantState1(params, idx, hostpubkey, com_bytes[:33], pubnonce), pmsg1


@dataclass(frozen=True)
class _CoordinatorMsg1:
    coms_to_secrets: list[Point]
    sum_nonconst: list[Point]
    pops: list[bytes]
    pubnonces: list[bytes]
    enc_secshares: list[int]

    @staticmethod
    def parse(data: bytes, n: int, t: int) -> _CoordinatorMsg1:
        sizes = [33 * n, 33 * (t - 1), 64 * n, 33 * n, 32 * n]
        if len(data) != sum(sizes):
            raise DKGError(f"cmsg1 is {len(data)} bytes, expected {sum(sizes)}")
        parts = []
        at = 0
        for size in sizes:
            parts.append(data[at : at + size])
            at += size
        return _CoordinatorMsg1(
            _parse_points(parts[0], n, "coms_to_secrets"),
            _parse_points(parts[1], t - 1, "sum_coms_to_nonconst_terms"),
            [parts[2][64 * i : 64 * (i + 1)] for i in range(n)],
            [parts[3][33 * i : 33 * (i + 1)] for i in range(n)],
            [scalar(parts[4][32 * i : 32 * (i + 1)]) for i in range(n)],
        )

    def eq_input(self, t: int, hostpubkeys: Sequence[bytes]) -> bytes:
        return (
            u32(t)
            + _ser(self.sum_coms())
            + b"".join(hostpubkeys)
            + b"".join(self.pubnonces)
            + b"".join(scalar_bytes(s) for s in self.enc_secshares)
        )

    def sum_coms(self) -> list[Point]:
        return [add_all(self.coms_to_secrets), *self.sum_nonconst]


def participant_step2(
    hostseckey: bytes, state1: ParticipantState1, cmsg1: bytes, aux_rand: bytes
) -> tuple[ParticipantState2, bytes]:
    """Decrypt and check this participant's share, then sign the transcript (pmsg2)."""
    if len(aux_rand) != 32:
        raise DKGError("aux randomness must be 32 bytes")
    if hostpubkey_gen(hostseckey) != state1.hostpubkey:
        raise HostSeckeyError("Host secret key does not match the one used in participant_step1")
    hostpubkeys, t = state1.params
    n, idx = len(hostpubkeys), state1.idx
    msg = _CoordinatorMsg1.parse(cmsg1, n, t)
    if msg.pubnonces[idx] != state1.pubnonce:
        raise FaultyCoordinatorError("Coordinator replied with wrong pubnonce")
    pads = _decryption_pads(
        hostseckey, state1.hostpubkey, msg.pubnonces, _enc_context(t, hostpubkeys), idx
    )
    secshare = (msg.enc_secshares[idx] - sum(pads)) % N
    if cbytes_ext(msg.coms_to_secrets[idx]) != state1.com_to_secret:
        raise FaultyCoordinatorError(
            "Coordinator sent unexpected first group element for local participant id"
        )
    for i, com in enumerate(msg.coms_to_secrets):
        if i == idx:
            continue
        if com is None:
            raise FaultyParticipantOrCoordinatorError(i, "Participant sent invalid commitment")
        if not bip340_verify_tagged(POP_TAG_PREFIX, u32(i), xbytes(com), msg.pops[i]):
            raise FaultyParticipantOrCoordinatorError(
                i, "Participant sent invalid proof-of-knowledge"
            )
    sum_coms = msg.sum_coms()
    tweak, thresh, pubshares = _outputs(sum_coms, n, FaultyCoordinatorError)
    mine = base_mul(secshare + tweak)
    if mine is None or cbytes(mine) != pubshares[idx]:
        inv = InvestigationData(
            n, idx, secshare, _pubshare(sum_coms, idx), msg.enc_secshares[idx], tuple(pads)
        )
        raise UnknownFaultyParticipantOrCoordinatorError(inv)
    eq_input = msg.eq_input(t, hostpubkeys)
    output = DKGOutput(scalar_bytes(secshare + tweak), thresh, pubshares)
    sig = schnorr_sign(hostseckey, _certeq_message(eq_input, idx), aux_rand)
    return ParticipantState2(state1.params, eq_input, output), sig


def participant_finalize(state2: ParticipantState2, cmsg2: bytes) -> tuple[DKGOutput, bytes]:
    """Check the certificate; returns the DKG output and the recovery data."""
    hostpubkeys = state2.params.hostpubkeys
    if len(cmsg2) != 64 * len(hostpubkeys):
        raise DKGError("the certificate has the wrong length")
    if _cert_invalid_signer(hostpubkeys, state2.eq_input, cmsg2) is not None:
        raise FaultyCoordinatorError(
            "Coordinator has provided a certificate with an invalid signature"
        )
    return state2.output, state2.eq_input + cmsg2


# -- coordinator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinatorState:
    params: SessionParams
    eq_input: bytes
    output: DKGOutput


def _parse_pmsg1(
    data: bytes, n: int, t: int, who: int
) -> tuple[list[Point], bytes, bytes, list[int]]:
    if len(data) != 33 * t + 97 + 32 * n:
        raise DKGError(f"participant {who}'s first message has the wrong length")
    coms = _parse_points(data[: 33 * t], t, f"participant {who}'s commitment")
    pop = data[33 * t : 33 * t + 64]
    pubnonce = data[33 * t + 64 : 33 * t + 97]
    shares = [scalar(data[33 * t + 97 + 32 * j : 33 * t + 129 + 32 * j]) for j in range(n)]
    return coms, pop, pubnonce, shares


def coordinator_step1(
    pmsgs1: Sequence[bytes], params: SessionParams
) -> tuple[CoordinatorState, bytes]:
    """Sum the commitments and the encrypted shares; returns cmsg1 for every participant."""
    params_validate(params)
    hostpubkeys, t = params
    n = len(hostpubkeys)
    if len(pmsgs1) != n:
        raise DKGError(f"{len(pmsgs1)} first messages for {n} participants")
    parsed = [_parse_pmsg1(m, n, t, i) for i, m in enumerate(pmsgs1)]
    msg = _CoordinatorMsg1(
        [coms[0] for coms, _, _, _ in parsed],
        [add_all([coms[k] for coms, _, _, _ in parsed]) for k in range(1, t)],
        [pop for _, pop, _, _ in parsed],
        [pubnonce for _, _, pubnonce, _ in parsed],
        [sum(shares[j] for _, _, _, shares in parsed) % N for j in range(n)],
    )
    cmsg1 = (
        _ser(msg.coms_to_secrets)
        + _ser(msg.sum_nonconst)
        + b"".join(msg.pops)
        + b"".join(msg.pubnonces)
        + b"".join(scalar_bytes(s) for s in msg.enc_secshares)
    )
    _, thresh, pubshares = _outputs(msg.sum_coms(), n)
    state = CoordinatorState(
        params, msg.eq_input(t, hostpubkeys), DKGOutput(None, thresh, pubshares)
    )
    return state, cmsg1


def coordinator_finalize(
    state: CoordinatorState, pmsgs2: Sequence[bytes]
) -> tuple[bytes, DKGOutput, bytes]:
    """Assemble the certificate; returns cmsg2, the output and the recovery data."""
    hostpubkeys = state.params.hostpubkeys
    if len(pmsgs2) != len(hostpubkeys) or any(len(s) != 64 for s in pmsgs2):
        raise DKGError("need one 64-byte signature from every participant")
    cert = b"".join(pmsgs2)
    bad = _cert_invalid_signer(hostpubkeys, state.eq_input, cert)
    if bad is not None:
        raise FaultyParticipantError(
            bad, "Participant has provided an invalid signature for the certificate"
        )
    return cert, state.output, state.eq_input + cert


# -- recovery ------------------------------------------------------------------------------


def recover(hostseckey: bytes | None, recovery_data: bytes) -> tuple[DKGOutput, SessionParams]:
    """Recompute a session's output from its recovery data (and a host key, for a share).

    The recovery data holds no secret in the clear, so anyone may store it; a
    participant that lost everything but its host secret key gets its share back.
    """
    if len(recovery_data) < 4:
        raise DKGError("recovery data is truncated")
    t = scalar(recovery_data[:4])
    rest = recovery_data[4 + 33 * t :]
    n, remainder = divmod(len(rest), 33 + 33 + 32 + 64)
    if t == 0 or remainder or len(recovery_data) < 4 + 33 * t:
        raise DKGError("recovery data has the wrong length")
    sum_coms = _parse_points(recovery_data[4 : 4 + 33 * t], t, "sum_coms")
    hostpubkeys = tuple(rest[33 * i : 33 * (i + 1)] for i in range(n))
    pubnonces = [rest[33 * (n + i) : 33 * (n + i + 1)] for i in range(n)]
    enc = rest[66 * n : 98 * n]
    enc_secshares = [scalar(enc[32 * i : 32 * (i + 1)]) for i in range(n)]
    params = SessionParams(hostpubkeys, t)
    params_validate(params)
    eq_input, cert = recovery_data[: -64 * n], recovery_data[-64 * n :]
    if _cert_invalid_signer(hostpubkeys, eq_input, cert) is not None:
        raise DKGError("the recovery data's certificate does not verify")
    tweak, thresh, pubshares = _outputs(sum_coms, n)
    if hostseckey is None:
        return DKGOutput(None, thresh, pubshares), params
    hostpubkey = hostpubkey_gen(hostseckey)
    if hostpubkey not in hostpubkeys:
        raise HostSeckeyError("this host key took no part in the session")
    idx = hostpubkeys.index(hostpubkey)
    pads = _decryption_pads(hostseckey, hostpubkey, pubnonces, _enc_context(t, hostpubkeys), idx)
    secshare = (enc_secshares[idx] - sum(pads) + tweak) % N
    mine = base_mul(secshare)
    # Every participant signed only after checking its own share, this one included.
    assert mine is not None and cbytes(mine) == pubshares[idx], "certified share mismatch"
    return DKGOutput(scalar_bytes(secshare), thresh, pubshares), params


# -- investigation: who sent the bad share -------------------------------------------------


def coordinator_investigate(pmsgs1: Sequence[bytes], params: SessionParams) -> list[bytes]:
    """One message per participant: the encrypted partial shares sent to it, and the
    partial pubshares they must match."""
    hostpubkeys, t = params
    n = len(hostpubkeys)
    parsed = [_parse_pmsg1(m, n, t, i) for i, m in enumerate(pmsgs1)]
    return [
        b"".join(scalar_bytes(shares[i]) for _, _, _, shares in parsed)
        + _ser([_pubshare(coms, i) for coms, _, _, _ in parsed])
        for i in range(n)
    ]


def participant_investigate(error: UnknownFaultyParticipantOrCoordinatorError, cinv: bytes) -> None:
    """Name whoever sent the bad share (raises; returning would mean no fault found)."""
    inv = error.inv_data
    n = inv.n
    if len(cinv) != 65 * n:
        raise DKGError("investigation message has the wrong length")
    enc_partials = [scalar(cinv[32 * j : 32 * (j + 1)]) for j in range(n)]
    partial_pubshares = _parse_points(cinv[32 * n :], n, "partial pubshares")
    if cbytes_ext(add_all(partial_pubshares)) != cbytes_ext(inv.pubshare):
        raise FaultyCoordinatorError("Sum of partial pubshares not equal to pubshare")
    if sum(enc_partials) % N != inv.enc_secshare:
        raise FaultyCoordinatorError("Sum of encrypted partial secshares not equal to secshare")
    for j in range(n):
        partial = (enc_partials[j] - inv.pads[j]) % N
        if cbytes_ext(base_mul(partial)) != cbytes_ext(partial_pubshares[j]):
            if j == inv.idx:
                raise FaultyCoordinatorError("Coordinator fiddled with the share from me to myself")
            raise FaultyParticipantOrCoordinatorError(
                j, "Participant sent invalid partial secshare"
            )
    raise AssertionError("participant_investigate found every partial share consistent")
