"""A signature authorises one input of one transaction spending one coin, nothing else."""

from __future__ import annotations

from constellation.sighash import input_signature_valid, sighash, sign_transaction
from constellation.tx import Transaction, TxInput, TxOutput
from tests.strategies import KEYS

A, B = KEYS[0], KEYS[1]


def two_input_tx() -> Transaction:
    return sign_transaction(
        Transaction(
            [TxInput(b"\x01" * 32, 700), TxInput(b"\x02" * 32, 300)],
            [TxOutput(990, B.pubkey)],
            10,
        ),
        [A, B],
    )


def test_signatures_verify_for_their_inputs() -> None:
    tx = two_input_tx()
    assert input_signature_valid(tx, 0, A.pubkey)
    assert input_signature_valid(tx, 1, B.pubkey)


def test_signature_bound_to_input_owner_and_transaction() -> None:
    tx = two_input_tx()
    swapped = tx.with_witnesses([tx.witnesses[1], tx.witnesses[0]])
    assert not input_signature_valid(swapped, 0, A.pubkey)
    assert not input_signature_valid(tx, 0, B.pubkey)
    other = Transaction(tx.inputs, [TxOutput(989, B.pubkey)], 11, tx.witnesses)
    assert not input_signature_valid(other, 0, A.pubkey)


def test_sighash_commits_to_every_field() -> None:
    base = sighash(b"\x00" * 32, 0, 1, A.pubkey)
    variants = {
        sighash(b"\x01" + b"\x00" * 31, 0, 1, A.pubkey),
        sighash(b"\x00" * 32, 1, 1, A.pubkey),
        sighash(b"\x00" * 32, 0, 2, A.pubkey),
        sighash(b"\x00" * 32, 0, 1, B.pubkey),
    }
    assert base not in variants and len(variants) == 4
