"""MuHash3072 against Bitcoin Core's test vectors, and the multiset laws."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from constellation.muhash import ELEMENT_BYTES, MODULUS, MuHash3072

# bitcoin/bitcoin src/test/crypto_tests.cpp, BOOST_AUTO_TEST_CASE(muhash_tests), and
# test/functional/test_framework/crypto/muhash.py (TestFrameworkMuhash).
CORE_DIGEST = "10d312b100cbd32ada024a6646e40d3482fcff103668d2625f10002a607d5863"
# The numerator half of crypto_tests.cpp's ``ser_exp``: FromInt(1) *= FromInt(2),
# serialized as numerator then denominator (384 bytes each, little-endian).
CORE_NUMERATOR = (
    "1fa093295ea30a6a3acdc7b3f770fa538eff537528e990e2910e40bbcfd7f6696b125690192909469"
    "4b56316de342f593303dd12ac43e06dce1be1ff8301c845beb15468fff0ef002dbf80c29f26e6452b"
    "ccc91b5cb9437ad410d2a67ea847887fa3c6a6553309946880fe20db2c73fe0641adbd4e86edfee0d"
    "9f8cd0ee1230898873dc13ed8ddcaf045c80faa082774279007a2253f8922ee3ef361d378a6af3dda"
    "f180b190ac97e556888c36b3d1fb1c85aab9ccd46e3deaeb7b7cf5db067a7e9ff86b658cf3acd6662"
    "bbcce37232daa753c48b794356c020090c831a8304416e2aa7ad633c0ddb2f11be1be316a81be7f7e"
    "472071c042cb68faef549c221ebff209273638b741aba5a81675c45a5fa92fea4ca821d7a324cb1e1"
    "a2ccd3b76c4228ec8066dad2a5df6e1bd0de45c7dd5de8070bdb46db6c554cf9aefc9b7b2bbf9f75b"
    "1864d9f95005314593905c0109b71f703d49944ae94477b51dac10a816bb6d1c700bafabc8bd86fac"
    "8df24be519a2f2836b16392e18036cb13e48c5c"
)
# The overflow case: a deserialized numerator of 384 bytes 0xff (2^3072 - 1, above the
# modulus) over a denominator of 1. Core prints this digest with HexStr: not reversed.
CORE_OVERFLOW_DIGEST = "3a31e6903aff0de9f62f9a9f7f8b861de76ce2cda09822b90014319ae5dc2271"

elements = st.binary(max_size=80)


def from_int(i: int) -> bytes:
    """Core's ``FromInt(i)``: the 32-byte element ``{i, 0, ...}``."""
    return bytes([i]) + bytes(31)


def test_core_vector_insert_insert_remove() -> None:
    acc = MuHash3072()
    acc.insert(from_int(0))
    acc.insert(from_int(1))
    acc.remove(from_int(2))
    # Core compares against a uint256 literal, which is written byte-reversed.
    assert acc.digest()[::-1].hex() == CORE_DIGEST


def test_core_vector_serialized_numerator() -> None:
    acc = MuHash3072()
    acc.insert(from_int(1))
    acc.insert(from_int(2))
    assert (acc.numerator % MODULUS).to_bytes(ELEMENT_BYTES, "little").hex() == CORE_NUMERATOR
    assert acc.denominator == 1


def test_core_vector_overflow() -> None:
    acc = MuHash3072()
    acc.numerator = (1 << 3072) - 1
    assert acc.digest().hex() == CORE_OVERFLOW_DIGEST


@given(st.lists(st.tuples(st.booleans(), elements), max_size=8), st.randoms())
def test_the_order_of_operations_does_not_matter(
    ops: list[tuple[bool, bytes]], rng: random.Random
) -> None:
    def run(order: list[tuple[bool, bytes]]) -> bytes:
        acc = MuHash3072()
        for remove, data in order:
            (acc.remove if remove else acc.insert)(data)
        return acc.digest()

    shuffled = list(ops)
    rng.shuffle(shuffled)
    assert run(shuffled) == run(ops)


@given(st.lists(elements, max_size=6), elements)
def test_remove_undoes_insert(base: list[bytes], extra: bytes) -> None:
    acc, ref = MuHash3072(), MuHash3072()
    for data in base:
        acc.insert(data)
        ref.insert(data)
    acc.insert(extra)
    assert acc.digest() != ref.digest()
    acc.remove(extra)
    assert acc.digest() == ref.digest()


@given(st.lists(elements, max_size=5), st.lists(elements, max_size=5))
def test_combine_is_the_union(left: list[bytes], right: list[bytes]) -> None:
    a, b, both = MuHash3072(), MuHash3072(), MuHash3072()
    for data in left:
        a.insert(data)
        both.insert(data)
    for data in right:
        b.remove(data)
        both.remove(data)
    assert a.combine(b).digest() == both.digest()


def test_a_product_stays_partly_reduced() -> None:
    """The folded products never leave the bound the next multiplication relies on."""
    acc = MuHash3072()
    for i in range(200):
        acc.insert(i.to_bytes(2, "big"))
        acc.remove((i + 1000).to_bytes(2, "big"))
        assert acc.numerator < (1 << 3072) + (1 << 44)
        assert acc.denominator < (1 << 3072) + (1 << 44)
