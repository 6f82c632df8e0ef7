"""MuHash3072: a hash of a multiset that is updated one element at a time.

The construction of Bitcoin Core (``src/crypto/muhash.{h,cpp}``), so that its test
vectors apply: an element is mapped to a number modulo the prime
``p = 2^3072 - 1103717`` (the ChaCha20 keystream keyed by ``SHA256(element)``, nonce and
counter zero, 384 bytes read little-endian); the multiset's value is the product of its
elements' numbers divided by the product of the removed ones; the digest is the SHA256
of that value's 384 little-endian bytes. Inserting and removing commute, so the digest
depends on the multiset only, never on the order that built it.

Removal multiplies a denominator, so that the one modular inverse is paid in ``digest``.
Between operations both products are kept below ``2^3072 + 2^44`` rather than below
``p``: since ``2^3072 = 1103717 (mod p)``, the high part of a product folds onto its low
part with a small multiplication, much cheaper than a division by ``p`` (``digest``
reduces fully). An insertion costs one ChaCha20 call and one 3072-bit multiplication.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MODULUS = (1 << 3072) - 1103717
ELEMENT_BYTES = 384

_FOLD = 1103717  # 2^3072 mod p
_LOW = (1 << 3072) - 1
_ZEROS = bytes(ELEMENT_BYTES)
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: block counter (4 bytes LE), then 12 bytes


def _element(data: bytes) -> int:
    """The number of one element: 384 bytes of ChaCha20 keyed by ``SHA256(data)``."""
    key = hashlib.sha256(data).digest()
    keystream = Cipher(algorithms.ChaCha20(key, _NONCE), None).encryptor().update(_ZEROS)
    return int.from_bytes(keystream, "little")


def _times(a: int, b: int) -> int:
    """``a * b``, congruent modulo p and below ``2^3072 + 2^44`` when a and b are."""
    x = a * b
    x = (x >> 3072) * _FOLD + (x & _LOW)
    return (x >> 3072) * _FOLD + (x & _LOW)


class MuHash3072:
    """The hash of a multiset of byte strings: ``insert``, ``remove``, ``digest``.

    Removing an element that was never inserted is allowed (the value is then a
    fraction); the digest equals that of the empty set once it is inserted.
    """

    __slots__ = ("denominator", "numerator")

    def __init__(self) -> None:
        """The empty multiset."""
        self.numerator = 1
        self.denominator = 1

    def insert(self, data: bytes) -> None:
        self.numerator = _times(self.numerator, _element(data))

    def remove(self, data: bytes) -> None:
        self.denominator = _times(self.denominator, _element(data))

    def combine(self, other: MuHash3072) -> MuHash3072:
        """The hash of both multisets together (Core's ``*=``), as a new object."""
        both = MuHash3072()
        both.numerator = _times(self.numerator, other.numerator)
        both.denominator = _times(self.denominator, other.denominator)
        return both

    def digest(self) -> bytes:
        """SHA256 of ``numerator / denominator mod p``, 384 bytes little-endian."""
        value = self.numerator * pow(self.denominator, -1, MODULUS) % MODULUS
        return hashlib.sha256(value.to_bytes(ELEMENT_BYTES, "little")).digest()
