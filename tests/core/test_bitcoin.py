"""BIP341 key-path signature hash, against the BIP341 wallet test vector."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.address import encode_segwit
from constellation.bitcoin import (
    BitcoinTx,
    SpendInput,
    SpendOutput,
    TxIn,
    address_script,
    compact_size,
    p2tr_script,
    parse_tx,
    taproot_sighash,
)
from constellation.errors import DecodeError, InvalidAddress

# bitcoin/bips bip-0341/wallet-test-vectors.json, keyPathSpending[0]: the unsigned
# transaction, the outputs it spends, and input 4 (hashType 0, SIGHASH_DEFAULT).
RAW_UNSIGNED_TX = (
    "02000000097de20cbff686da83a54981d2b9bab3586f4ca7e48f57f5b55963115f3b334e9c010000000000000000"
    "d7b7cab57b1393ace2d064f4d4a2cb8af6def61273e127517d44759b6dafdd990000000000fffffffff8e1f5833843"
    "33689228c5d28eac13366be082dc57441760d957275419a418420000000000fffffffff0689180aa63b30cb162a73c"
    "6d2a38b7eeda2a83ece74310fda0843ad604853b0100000000feffffffaa5202bdf6d8ccd2ee0f0202afbbb7461d92"
    "64a25e5bfd3c5a52ee1239e0ba6c0000000000feffffff956149bdc66faa968eb2be2d2faa29718acbfe3941215893"
    "a2a3446d32acd050000000000000000000e664b9773b88c09c32cb70a2a3e4da0ced63b7ba3b22f848531bbb1d5d5"
    "f4c94010000000000000000e9aa6b8e6c9de67619e6a3924ae25696bb7b694bb677a632a74ef7eadfd4eabf000000"
    "0000ffffffffa778eb6a263dc090464cd125c466b5a99667720b1c110468831d058aa1b82af10100000000ffffffff"
    "0200ca9a3b000000001976a91406afd46bcdfd22ef94ac122aa11f241244a37ecc88ac807840cb0000000020ac9a87"
    "f5594be208f8532db38cff670c450ed2fea8fcdefcc9a663f78bab962b0065cd1d"
)
UTXOS_SPENT = [
    (420_000_000, "512053a1f6e454df1aa2776a2814a721372d6258050de330b3c6d10ee8f4e0dda343"),
    (462_000_000, "5120147c9c57132f6e7ecddba9800bb0c4449251c92a1e60371ee77557b6620f3ea3"),
    (294_000_000, "76a914751e76e8199196d454941c45d1b3a323f1433bd688ac"),
    (504_000_000, "5120e4d810fd50586274face62b8a807eb9719cef49c04177cc6b76a9a4251d5450e"),
    (630_000_000, "512091b64d5324723a985170e4dc5a0f84c041804f2cd12660fa5dec09fc21783605"),
    (378_000_000, "00147dd65592d0ab2fe0d0257d571abf032cd9db93dc"),
    (672_000_000, "512075169f4001aa68f15bbed28b218df1d0a62cbbcf1188c6665110c293c907b831"),
    (546_000_000, "5120712447206d7a5238acc7ff53fbe94a3b64539ad291c7cdbc490b7577e4b17df5"),
    (588_000_000, "512077e30a5522dd9f894c3f8b8bd4c4b2cf82ca7da8a3ea6a239655c39c050ab220"),
]
INPUT_4_SIGHASH = "4f900a0bae3f1446fd48490c2958b5a023228f01661cda3496a11da502a7f7ef"


def parse_unsigned(raw: bytes) -> tuple[int, int, list[SpendInput], list[SpendOutput]]:
    """A legacy-serialized transaction with empty scriptSigs (all the vector needs)."""
    version = int.from_bytes(raw[:4], "little")
    inputs = []
    for k in range(raw[4]):
        base = 5 + k * 41
        assert raw[base + 36] == 0  # empty scriptSig
        amount, script = UTXOS_SPENT[k]
        inputs.append(
            SpendInput(
                raw[base : base + 32],
                int.from_bytes(raw[base + 32 : base + 36], "little"),
                int.from_bytes(raw[base + 37 : base + 41], "little"),
                amount,
                bytes.fromhex(script),
            )
        )
    pos = 5 + len(inputs) * 41
    outputs = []
    for _ in range(raw[pos]):
        amount = int.from_bytes(raw[pos + 1 : pos + 9], "little")
        length = raw[pos + 9]
        outputs.append(SpendOutput(amount, raw[pos + 10 : pos + 10 + length]))
        pos += 9 + length
    locktime = int.from_bytes(raw[pos + 1 : pos + 5], "little")
    assert pos + 5 == len(raw)
    return version, locktime, inputs, outputs


def test_bip341_keypath_default_sighash_vector() -> None:
    version, locktime, inputs, outputs = parse_unsigned(bytes.fromhex(RAW_UNSIGNED_TX))
    assert (version, locktime, len(inputs), len(outputs)) == (2, 500_000_000, 9, 2)
    assert taproot_sighash(version, locktime, inputs, outputs, 4).hex() == INPUT_4_SIGHASH
    # Every field is committed: another index, amount or sequence changes the hash.
    assert taproot_sighash(version, locktime, inputs, outputs, 3).hex() != INPUT_4_SIGHASH
    changed = [*inputs[:2], SpendInput(inputs[2].txid, 0, 0, 1, b""), *inputs[3:]]
    assert taproot_sighash(version, locktime, changed, outputs, 4).hex() != INPUT_4_SIGHASH


def test_compact_size() -> None:
    assert compact_size(0xFC) == b"\xfc"
    assert compact_size(0xFD) == b"\xfd\xfd\x00"
    assert compact_size(0x10000) == b"\xfe\x00\x00\x01\x00"
    assert compact_size(2**32) == b"\xff" + (2**32).to_bytes(8, "little")


def test_the_vector_transaction_parses_and_serializes_back() -> None:
    raw = bytes.fromhex(RAW_UNSIGNED_TX)
    tx = parse_tx(raw)
    assert tx.serialize() == raw and len(tx.inputs) == 9 and len(tx.outputs) == 2
    assert tx.vsize == len(raw)  # no witness: weight is 4 bytes a byte


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32),
            st.integers(0, 2**32 - 1),
            st.lists(st.binary(max_size=80), max_size=3),
        ),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.tuples(st.integers(0, 2**63), st.binary(max_size=60)), max_size=5),
)
@settings(max_examples=200)
def test_transactions_round_trip(
    ins: list[tuple[bytes, int, list[bytes]]], outs: list[tuple[int, bytes]]
) -> None:
    tx = BitcoinTx(
        2, 0, [TxIn(t, v, 0xFFFFFFFD, w) for t, v, w in ins], [SpendOutput(a, s) for a, s in outs]
    )
    if any(w for _, _, w in ins):
        assert parse_tx(tx.serialize()) == tx
    bare = parse_tx(tx.serialize(witness=False))
    assert bare.txid == tx.txid and bare.serialize() == tx.serialize(witness=False)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("0200000000", "without inputs"),
        ("0200000001" + "00" * 36 + "01aa" + "00" * 4, "scriptSig"),
        ("0200000001" + "00" * 36 + "00" + "00" * 4 + "00" + "00" * 4 + "ff", "after the end"),
        ("02000000fd0100", "shortest form"),
        ("0200000001" + "00" * 20, "needs 37 bytes, got 25"),
    ],
)
def test_malformed_transactions_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        parse_tx(bytes.fromhex(raw))


def test_an_address_gives_its_script_on_its_chain_only() -> None:
    key = bytes.fromhex("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    address = encode_segwit("bcrt", 1, key)
    assert address_script(address, "bcrt") == p2tr_script(key)
    with pytest.raises(InvalidAddress, match="not one of this chain"):
        address_script(address, "bc")
    # BIP173's example P2WPKH address
    assert address_script("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "bc") == bytes.fromhex(
        "0014751e76e8199196d454941c45d1b3a323f1433bd6"
    )
