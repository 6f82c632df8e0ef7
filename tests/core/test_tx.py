"""Transactions: canonical encoding, ids, and every way bad bytes are refused."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.codec import u16, u64
from constellation.errors import (
    BadIssuance,
    ConstellationError,
    CountOutOfRange,
    DecodeError,
    DuplicateInput,
    InvalidKey,
    NonCanonical,
    TrailingBytes,
    Truncated,
    Unbalanced,
    UnsupportedVersion,
    ValueOutOfRange,
)
from constellation.hashing import tagged_hash
from constellation.keys import XOnlyPubKey
from constellation.tx import (
    HERE,
    MAX_INPUTS,
    Issuance,
    IssuanceBatch,
    Transaction,
    TxInput,
    TxOutput,
    coin_id,
    decode_issuance,
    decode_transaction,
    ledger_id,
    partition_of,
)
from tests.strategies import KEYS, transactions

OWNER = KEYS[0].pubkey
CID = b"\x11" * 32


def simple(fee: int = 10) -> Transaction:
    return Transaction(
        [TxInput(CID, 1_000)], [TxOutput(990 - fee + 10, OWNER)], fee, [b"\x00" * 64]
    )


@given(transactions())
def test_roundtrip(tx: Transaction) -> None:
    data = tx.encode()
    again = decode_transaction(data)
    assert again == tx and again.txid == tx.txid and again.encode() == data
    assert again.output_ids == tuple(coin_id(tx.txid, i) for i in range(len(tx.outputs)))


def test_txid_is_tagged_hash_of_body_without_witnesses() -> None:
    tx = simple()
    assert tx.txid == tagged_hash("constellation/tx", tx.body)
    assert tx.with_witnesses([b"\x01" * 64]).txid == tx.txid
    assert coin_id(tx.txid, 1) == tagged_hash("constellation/coin", tx.txid + b"\x00\x01")
    assert partition_of(bytes([0xAB, 0xCD]) + b"\x00" * 30) == 0xABCD


@given(transactions(), st.data())
def test_every_truncation_is_refused(tx: Transaction, data: st.DataObject) -> None:
    encoded = tx.encode()
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(Truncated):
        decode_transaction(encoded[:cut])


@given(transactions(), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_refused(tx: Transaction, extra: bytes) -> None:
    with pytest.raises(TrailingBytes):
        decode_transaction(tx.encode() + extra)


@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ConstellationError):
        tx = decode_transaction(data)
        # Whatever decodes is canonical, and its id is the id of the same rebuilt tx.
        assert tx.encode() == data
        assert Transaction(tx.inputs, tx.outputs, tx.fee_msat, tx.witnesses).txid == tx.txid


@given(transactions(), st.data())
def test_bit_flips_decode_to_another_tx_or_a_typed_error(
    tx: Transaction, data: st.DataObject
) -> None:
    encoded = bytearray(tx.encode())
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:
        other = decode_transaction(bytes(encoded))
    except ConstellationError:
        return
    assert other != tx
    assert other.encode() == bytes(encoded)
    assert Transaction(other.inputs, other.outputs, other.fee_msat, other.witnesses) == other


def body(inputs: list[tuple[bytes, int]], outputs: list[tuple[int, bytes]], fee: int) -> bytes:
    return (
        b"\x01"
        + u16(len(inputs))
        + b"".join(c + u64(v) for c, v in inputs)
        + u16(len(outputs))
        + b"".join(u64(v) + k for v, k in outputs)
        + u64(fee)
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            b"\x03" + body([(CID, 10)], [(10, OWNER)], 0)[1:] + b"\x00" + b"\x00" * 64,
            UnsupportedVersion,
        ),
        (body([], [(10, OWNER)], 0), CountOutOfRange),
        (b"\x01" + u16(MAX_INPUTS + 1), CountOutOfRange),
        (body([(CID, 10)], [], 10) + b"\x00" + b"\x00" * 64, CountOutOfRange),
        (body([(CID, 10)], [(10, OWNER)], 0) + b"\x01" + b"\x00" * 64, UnsupportedVersion),
        (body([(CID, 10)], [(0, OWNER)], 10) + b"\x00" + b"\x00" * 64, ValueOutOfRange),
        (body([(CID, 0)], [(1, OWNER)], 0) + b"\x00" + b"\x00" * 64, ValueOutOfRange),
        (body([(CID, 10)], [(9, OWNER)], 0) + b"\x00" + b"\x00" * 64, Unbalanced),
        (body([(CID, 2**64 - 1)], [(2**64 - 1, OWNER)], 1) + b"\x00" + b"\x00" * 64, Unbalanced),
        (body([(CID, 10)], [(10, b"\xff" * 32)], 0) + b"\x00" + b"\x00" * 64, InvalidKey),
        (
            body([(CID, 5), (CID, 5)], [(10, OWNER)], 0) + (b"\x00" + b"\x00" * 64) * 2,
            DuplicateInput,
        ),
    ],
    ids=[
        "version",
        "no-inputs",
        "too-many-inputs",
        "no-outputs",
        "witness-kind",
        "zero-output",
        "zero-input",
        "unbalanced",
        "overflowing-sum",
        "bad-key",
        "duplicate",
    ],
)
def test_specific_errors(data: bytes, error: type[ConstellationError]) -> None:
    with pytest.raises(error) as info:
        decode_transaction(data)
    assert info.value.code.startswith(("malformed", "invalid"))


def test_constructor_checks() -> None:
    with pytest.raises(NonCanonical):
        Transaction([TxInput(b"\x00" * 31, 10)], [TxOutput(10, OWNER)])
    with pytest.raises(CountOutOfRange):
        Transaction([TxInput(CID, 10)], [TxOutput(10, OWNER)], 0, [b"\x00" * 64] * 2)
    with pytest.raises(NonCanonical):
        Transaction([TxInput(CID, 10)], [TxOutput(10, OWNER)], 0, [b"\x00" * 63])
    with pytest.raises(ValueOutOfRange):
        Transaction([TxInput(CID, 10)], [TxOutput(10, OWNER)], -1)
    with pytest.raises(ValueError, match="unsigned"):
        Transaction([TxInput(CID, 10)], [TxOutput(10, OWNER)]).encode()


def test_issuance_roundtrip_and_signature() -> None:
    issuer = KEYS[1]
    iss = Issuance(issuer.pubkey, 7, [TxOutput(5, OWNER), TxOutput(6, OWNER)])
    signed = iss.signed_by(issuer.secret)
    signed.verify()
    again = decode_issuance(signed.encode())
    assert again.issuance_id == iss.issuance_id and again.output_ids == iss.output_ids
    assert iss.issuance_id != Issuance(issuer.pubkey, 8, iss.outputs).issuance_id
    with pytest.raises(DecodeError):
        decode_issuance(signed.encode() + b"\x00")
    with pytest.raises(ConstellationError):
        Issuance(issuer.pubkey, 7, iss.outputs, KEYS[2].sign(iss.issuance_id)).verify()


# -- outputs to other ledgers (version 2) ------------------------------------------------

OTHER = ledger_id(KEYS[2].pubkey)


def test_outputs_to_another_ledger_roundtrip() -> None:
    tx = Transaction(
        [TxInput(CID, 30)],
        [TxOutput(10, OWNER), TxOutput(19, KEYS[1].pubkey)],
        1,
        [b"\x07" * 64],
        ledgers=[HERE, OTHER],
    )
    assert tx.body[0] == 2 and tx.remote() == [(1, OTHER)]
    assert tx.here(0) and not tx.here(1)
    again = decode_transaction(tx.encode())
    assert again.txid == tx.txid and again.ledgers == (HERE, OTHER)
    assert again.with_witnesses([b"\x08" * 64]).txid == tx.txid
    # the ledger is signed: the same outputs kept here are another transaction
    local = Transaction([TxInput(CID, 30)], tx.outputs, 1, [b"\x07" * 64])
    assert local.txid != tx.txid and local.body[0] == 1 and not local.remote()


def test_all_local_ledgers_are_version_1() -> None:
    outputs = [TxOutput(10, OWNER)]
    tx = Transaction([TxInput(CID, 10)], outputs, 0, [b"\x07" * 64], ledgers=[HERE])
    assert tx.body[0] == 1 and tx.ledgers == ()
    v2 = b"\x02" + tx.body[1 : -8 - 40 - 2] + u16(1) + u64(10) + OWNER + HERE + u64(0)
    with pytest.raises(NonCanonical, match="names no other ledger"):
        decode_transaction(v2 + b"\x00" + b"\x07" * 64)


def test_ledger_ids_checked() -> None:
    with pytest.raises(NonCanonical):
        Transaction([TxInput(CID, 10)], [TxOutput(10, OWNER)], ledgers=[b"\x01" * 7])
    with pytest.raises(CountOutOfRange):
        Transaction([TxInput(CID, 10)], [TxOutput(10, OWNER)], ledgers=[OTHER, OTHER])
    assert ledger_id(KEYS[2].pubkey) != ledger_id(KEYS[3].pubkey)
    assert len(OTHER) == 8


def test_an_issuance_batch_issues_entries_whose_coins_are_known_before_it() -> None:
    issuer = KEYS[1]
    entries = [(bytes([n]) * 32, TxOutput(5 + n, OWNER)) for n in range(3)]
    batch = IssuanceBatch(issuer.pubkey, entries).signed_by(issuer.secret)
    batch.verify()
    again = decode_issuance(batch.encode())
    assert isinstance(again, IssuanceBatch) and again.issuance_id == batch.issuance_id
    assert again.encode() == batch.encode()
    # each entry's coin is known from the entry alone, whatever batch carries it
    coins = [IssuanceBatch.coin_of(issuer.pubkey, nonce, out) for nonce, out in entries]
    assert again.output_ids == tuple(coins)
    other = IssuanceBatch(issuer.pubkey, entries[::-1]).signed_by(issuer.secret)
    assert other.issuance_id != batch.issuance_id and set(other.output_ids) == set(coins)
    # never a version 1 issuance's id
    single = Issuance(issuer.pubkey, 0, [entries[0][1]])
    assert single.issuance_id not in {iid for iid, _, _ in batch.entries()}
    with pytest.raises(DuplicateInput):
        IssuanceBatch(issuer.pubkey, [entries[0], entries[0]])
    with pytest.raises(NonCanonical):
        IssuanceBatch(issuer.pubkey, [(b"\x01" * 31, entries[0][1])])
    with pytest.raises(InvalidKey):
        IssuanceBatch(issuer.pubkey, [(b"\x01" * 32, TxOutput(1, XOnlyPubKey(b"\xff" * 32)))])
    forged = IssuanceBatch(issuer.pubkey, entries[:2], batch.signature)
    with pytest.raises(BadIssuance):
        forged.verify()
    with pytest.raises(TrailingBytes):
        decode_issuance(batch.encode() + b"\x00")
