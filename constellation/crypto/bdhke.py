"""Blind Diffie-Hellman key exchange, as Cashu mints sign ecash (NUT-00), with the
discrete-log equality proofs that let a wallet check a signature (NUT-12).

The mint holds one secret scalar ``k`` per amount, published as ``K = k·G``::

    wallet:  Y = hash_to_curve(secret);  B_ = Y + r·G      (blind)
    mint:    C_ = k·B_                                     (sign)
    wallet:  C = C_ - r·K                                  (unblind: C = k·Y)
    mint:    C == k·hash_to_curve(secret)                  (verify, once: Y is then spent)

A DLEQ proof ``(e, s)`` shows that ``C_`` and ``K`` share the scalar ``k`` without
revealing it; its nonce is derived from the key and the points (``dleq_nonce``), so a
signature is reproducible. A proof held by a third party also carries ``r``, from which
it recomputes ``B_`` and ``C_``.

Secrets are bytes here: a Cashu proof's ``secret`` string is hashed as its UTF-8 bytes
(the caller encodes it); the NUT-00 vectors give raw bytes in hex.
"""

from __future__ import annotations

import hashlib
import hmac

from coincurve import PublicKey

from constellation.crypto.point import N, add, base_mul, cbytes, mul

DOMAIN = b"Secp256k1_HashToCurve_Cashu_"
DLEQ_NONCE = b"Cashu_DLEQ_R_v1"
MAX_COUNTER = 2**16


class NoPoint(ValueError):
    """hash_to_curve found no point (one message in 2^65536: never, in practice)."""


def hash_to_curve(message: bytes) -> PublicKey:
    """The point Y of a secret: the first x = SHA256(SHA256(DOMAIN || message) || counter)
    (counter a little-endian u32) that is on the curve, with even Y."""
    msg_hash = hashlib.sha256(DOMAIN + message).digest()
    for counter in range(MAX_COUNTER):
        x = hashlib.sha256(msg_hash + counter.to_bytes(4, "little")).digest()
        try:
            return PublicKey(b"\x02" + x)
        except ValueError:
            continue
    raise NoPoint("no point found for this message")


def blind(secret: bytes, r: int) -> PublicKey:
    """B_ = Y + r·G."""
    _check_scalar(r)
    point = add(hash_to_curve(secret), base_mul(r))
    assert point is not None, "Y = -r·G: r is the discrete log of Y"
    return point


def public_key(k: int) -> PublicKey:
    """K = k·G."""
    _check_scalar(k)
    point = base_mul(k)
    assert point is not None
    return point


def sign(k: int, blinded: PublicKey) -> PublicKey:
    """C_ = k·B_."""
    _check_scalar(k)
    point = mul(blinded, k)
    assert point is not None
    return point


def unblind(signature: PublicKey, r: int, key: PublicKey) -> PublicKey:
    """C = C_ - r·K."""
    neg = mul(key, N - r % N)
    point = add(signature, neg)
    if point is None:
        raise ValueError("the unblinded signature is the point at infinity")
    return point


def verify(k: int, y: PublicKey, unblinded: bytes) -> bool:
    """Whether C = k·Y (Y = hash_to_curve(secret)), C given as its 33 bytes (a point has
    one compressed encoding: bytes that are none are no k·Y)."""
    return cbytes(sign(k, y)) == unblinded


def hash_e(*points: PublicKey) -> bytes:
    """SHA256 over the lowercase hex text of each point's uncompressed encoding."""
    return _hash_e(*(p.format(compressed=False) for p in points))


def _hash_e(*uncompressed: bytes) -> bytes:
    return hashlib.sha256("".join(u.hex() for u in uncompressed).encode()).digest()


def dleq_nonce(k: int, key: bytes, blinded: bytes, signature: bytes) -> int:
    """The deterministic nonce of a DLEQ proof: HMAC-SHA256 keyed by ``k`` over the
    domain, K, B_, C_ (their uncompressed encodings) and a counter byte, the first value
    in [1, n)."""
    body = DLEQ_NONCE + key + blinded + signature
    secret = k.to_bytes(32, "big")
    for counter in range(256):
        r = int.from_bytes(hmac.new(secret, body + bytes([counter]), hashlib.sha256).digest())
        if 0 < r < N:
            return r
    raise AssertionError("256 HMAC outputs out of range")  # probability 2^-32768


def prove(
    k: int,
    blinded: PublicKey,
    nonce: int | None = None,
    *,
    key: PublicKey | None = None,
    signature: PublicKey | None = None,
) -> tuple[bytes, bytes]:
    """(e, s) showing that C_ = k·B_ and K = k·G share k; ``nonce`` for test vectors
    only (by default the deterministic one). K and C_ where the caller has them already
    (they are computed otherwise)."""
    key = public_key(k) if key is None else key
    signature = sign(k, blinded) if signature is None else signature
    # K and C_ are in both hashes: encoded once
    key_u, signature_u = key.format(compressed=False), signature.format(compressed=False)
    blinded_u = blinded.format(compressed=False)
    p = dleq_nonce(k, key_u, blinded_u, signature_u) if nonce is None else nonce
    _check_scalar(p)
    r1, r2 = base_mul(p), mul(blinded, p)
    assert r1 is not None and r2 is not None
    e = _hash_e(r1.format(compressed=False), r2.format(compressed=False), key_u, signature_u)
    s = (p + int.from_bytes(e) * k) % N
    return e, s.to_bytes(32, "big")


def check(key: PublicKey, blinded: PublicKey, signature: PublicKey, e: bytes, s: bytes) -> bool:
    """Whether (e, s) proves that ``signature`` = k·``blinded`` for K = k·G."""
    if len(e) != 32 or len(s) != 32:
        return False
    e_int, s_int = int.from_bytes(e), int.from_bytes(s)
    if e_int >= N or s_int >= N:
        return False
    r1 = add(base_mul(s_int), mul(key, N - e_int))
    r2 = add(mul(blinded, s_int), mul(signature, N - e_int))
    if r1 is None or r2 is None:
        return False
    return hmac.compare_digest(hash_e(r1, r2, key, signature), e)


def check_proof(
    key: PublicKey, secret: bytes, unblinded: PublicKey, e: bytes, s: bytes, r: int
) -> bool:
    """A third party's check of a proof that carries its blinding factor ``r``:
    B_ = Y + r·G and C_ = C + r·K, then ``check``."""
    if not 0 < r < N:
        return False
    blinded = add(hash_to_curve(secret), base_mul(r))
    signature = add(unblinded, mul(key, r))
    if blinded is None or signature is None:
        return False
    return check(key, blinded, signature, e, s)


def _check_scalar(k: int) -> None:
    if not 0 < k < N:
        raise ValueError("a scalar must be in [1, n)")
