"""A trusted-dealer Shamir split, only to give the signing tests shares quickly.

The product generates keys with the DKG; signing does not care where shares came from.
"""

from __future__ import annotations

import random

from constellation.crypto.point import N, base_mul, cbytes
from constellation.crypto.roast import Group


def deal(n: int, t: int, rng: random.Random) -> tuple[Group, list[bytes]]:
    coeffs = [rng.randrange(1, N) for _ in range(t)]

    def f(x: int) -> int:
        return sum(c * pow(x, k, N) for k, c in enumerate(coeffs)) % N

    shares = [f(i + 1) for i in range(n)]
    points = [base_mul(s) for s in shares]
    thresh = base_mul(coeffs[0])
    assert thresh is not None and all(p is not None for p in points)
    group = Group(n, t, cbytes(thresh), tuple(cbytes(p) for p in points if p is not None))
    return group, [s.to_bytes(32, "big") for s in shares]
