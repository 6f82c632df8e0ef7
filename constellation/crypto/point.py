"""secp256k1 points and scalars over coincurve, with the point at infinity as ``None``.

coincurve's ``PublicKey`` cannot hold infinity, and its ``combine_keys`` raises when a sum
is infinity; FROST meets infinity in nonce sums, so these helpers make it explicit.
"""

from __future__ import annotations

from coincurve import PublicKey

from constellation.keys import CURVE_ORDER

N = CURVE_ORDER
Point = PublicKey | None
G = PublicKey.from_valid_secret((1).to_bytes(32, "big"))
_INFINITY_BYTES = bytes(33)


def scalar(data: bytes) -> int:
    """A big-endian integer (not reduced: callers check the range they need)."""
    return int.from_bytes(data, "big")


def scalar_bytes(k: int) -> bytes:
    """The 32-byte big-endian encoding of ``k mod n``."""
    return (k % N).to_bytes(32, "big")


def xor_bytes(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def cpoint(data: bytes) -> PublicKey:
    """Parse a 33-byte compressed point; raises ValueError if it is not one."""
    if len(data) != 33 or data[0] not in (2, 3):
        raise ValueError("not a compressed point")
    return PublicKey(data)


def cpoint_ext(data: bytes) -> Point:
    """Like ``cpoint``, but 33 zero bytes stand for infinity."""
    return None if data == _INFINITY_BYTES else cpoint(data)


def cbytes(p: PublicKey) -> bytes:
    return p.format()


def cbytes_ext(p: Point) -> bytes:
    return _INFINITY_BYTES if p is None else p.format()


def xbytes(p: PublicKey) -> bytes:
    return p.format()[1:]


def has_even_y(p: PublicKey) -> bool:
    return p.format()[0] == 2


def add(p: Point, q: Point) -> Point:
    if p is None:
        return q
    if q is None:
        return p
    try:
        return PublicKey.combine_keys([p, q])
    except ValueError:  # p == -q
        return None


def add_all(points: list[Point]) -> Point:
    present = [p for p in points if p is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    try:
        return PublicKey.combine_keys(present)
    except ValueError:
        return None


def mul(p: Point, k: int) -> Point:
    k %= N
    if p is None or k == 0:
        return None
    return p.multiply(k.to_bytes(32, "big"))


def base_mul(k: int) -> Point:
    k %= N
    return None if k == 0 else PublicKey.from_valid_secret(k.to_bytes(32, "big"))
