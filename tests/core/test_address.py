"""Bech32m addresses: BIP350's vectors, network prefixes and checksums."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.address import (
    CHARSET,
    Network,
    _convert_bits,
    bech32m_decode,
    bech32m_encode,
    decode_address,
    decode_destination,
    encode_address,
)
from constellation.errors import InvalidAddress
from constellation.keys import SigningKey

# bitcoin/bips bip-0350.mediawiki, "Test vectors for Bech32m"
VALID_BECH32M = [
    "A1LQFN3A",
    "a1lqfn3a",
    "an83characterlonghumanreadablepartthatcontainsthetheexcludedcharactersbioandnumber11sg7hg6",
    "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx",
    "11llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllludsr8",
    "split1checkupstagehandshakeupstreamerranterredcaperredlc445v",
    "?1v759aa",
]
INVALID_BECH32M = [
    "\x201xj0phk",
    "\x7f1g6xzxy",
    "\x801vctc34",
    "an84characterslonghumanreadablepartthatcontainsthetheexcludedcharactersbioandnumber11d6pts4",
    "qyrz8wqd2c9m",
    "1qyrz8wqd2c9m",
    "y1b0jsk6g",
    "lt1igcx5c0",
    "in1muywd",
    "mm1crxm3i",
    "au1s5cgom",
    "M1VUXWEZ",
    "16plkw9",
    "1p2gdwpf",
    # a bech32 (BIP173) string is not bech32m
    "a12uel5l",
]


@pytest.mark.parametrize("text", VALID_BECH32M)
def test_bip350_valid(text: str) -> None:
    hrp, _ = bech32m_decode(text)
    assert hrp == text.lower()[: text.rfind("1")]


@pytest.mark.parametrize("text", INVALID_BECH32M)
def test_bip350_invalid(text: str) -> None:
    with pytest.raises(InvalidAddress):
        bech32m_decode(text)


def test_same_layout_as_p2tr() -> None:
    # BIP350 segwit v1 vector: the program is the x coordinate of the generator G
    g = bytes.fromhex("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    address = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"
    assert encode_address(g, "bc") == address
    assert decode_address(address, "bc") == g


keys = st.binary(min_size=32, max_size=32).filter(lambda b: 0 < int.from_bytes(b, "big") < 2**255)


@given(keys, st.sampled_from(list(Network)))
def test_roundtrip_and_network_separation(secret: bytes, net: Network) -> None:
    key = SigningKey(secret).pubkey
    address = encode_address(key, net)
    assert address.startswith(net.value + "1")
    assert decode_address(address, net) == key
    assert decode_address(address.upper(), net) == key
    for other in Network:
        if other is not net:
            with pytest.raises(InvalidAddress, match="network"):
                decode_address(address, other)


@given(keys, st.data())
def test_any_single_typo_is_caught(secret: bytes, data: st.DataObject) -> None:
    address = encode_address(SigningKey(secret).pubkey, Network.TEST)
    pos = data.draw(st.integers(len("tcst1"), len(address) - 1))
    char = data.draw(st.sampled_from(CHARSET).filter(lambda c: c != address[pos]))
    with pytest.raises(InvalidAddress):
        decode_address(address[:pos] + char + address[pos + 1 :], Network.TEST)


def test_invalid_key_and_version_rejected() -> None:
    with pytest.raises(InvalidAddress):
        encode_address(b"\xff" * 32)
    key = SigningKey(b"\x01" * 32).pubkey
    address = encode_address(key, Network.MAIN)
    with pytest.raises(InvalidAddress, match="mixes"):
        decode_address(address[:5] + address[5:].upper())
    assert Network.from_name("regtest") is Network.REGTEST
    with pytest.raises(InvalidAddress):
        Network.from_name("moon")


def test_an_address_may_name_the_ledger_of_its_coins() -> None:
    key = SigningKey(b"\x05" * 32).pubkey
    ledger = bytes.fromhex("0102030405060708")
    text = encode_address(key, Network.REGTEST, ledger)
    assert len(text) <= 90 and text != encode_address(key, Network.REGTEST)
    assert decode_destination(text, Network.REGTEST) == (key, ledger)
    assert decode_address(text, Network.REGTEST) == key  # the owner, either version
    old = encode_address(key, Network.REGTEST)
    assert decode_destination(old, Network.REGTEST) == (key, None)  # old addresses decode
    with pytest.raises(InvalidAddress):
        encode_address(key, Network.REGTEST, bytes(8))
    with pytest.raises(InvalidAddress):
        encode_address(key, Network.REGTEST, b"\x01" * 7)
    # a version 2 payload of the wrong length, checksummed correctly
    short = bech32m_encode("rcst", [2, *_convert_bits(key, 8, 5, pad=True)])
    with pytest.raises(InvalidAddress, match="holds 40 bytes"):
        decode_destination(short, Network.REGTEST)
    zero = bech32m_encode("rcst", [2, *_convert_bits(key + bytes(8), 8, 5, pad=True)])
    with pytest.raises(InvalidAddress, match="all-zero"):
        decode_destination(zero, Network.REGTEST)
