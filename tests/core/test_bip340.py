"""BIP340's public test vectors through the project's own sign and verify."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.errors import InvalidKey
from constellation.keys import SigningKey, is_valid_xonly, schnorr_sign, schnorr_verify

VECTORS = Path(__file__).parents[1] / "vectors" / "bip340" / "test-vectors.csv"
ROWS = list(csv.DictReader(VECTORS.open()))


def test_all_rows_present() -> None:
    assert len(ROWS) == 19


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"vector{r['index']}")
def test_vector(row: dict[str, str]) -> None:
    pubkey = bytes.fromhex(row["public key"])
    msg = bytes.fromhex(row["message"])
    sig = bytes.fromhex(row["signature"])
    expected = row["verification result"] == "TRUE"
    if row["secret key"]:
        key = SigningKey(bytes.fromhex(row["secret key"]))
        assert key.pubkey == pubkey
        assert schnorr_sign(key.secret, msg, bytes.fromhex(row["aux_rand"])) == sig
    assert schnorr_verify(pubkey, msg, sig) is expected
    if not is_valid_xonly(pubkey):
        assert not expected


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200))
def test_sign_verify_roundtrip(secret: bytes, msg: bytes) -> None:
    try:
        key = SigningKey(secret)
    except InvalidKey:
        return
    sig = key.sign(msg)
    assert schnorr_verify(key.pubkey, msg, sig)
    assert not schnorr_verify(key.pubkey, msg + b"\x00", sig)
    assert not schnorr_verify(key.pubkey, msg, sig[:63] + bytes([sig[63] ^ 1]))


def test_verify_never_raises_on_garbage() -> None:
    assert not schnorr_verify(b"\x00" * 31, b"m", b"\x00" * 64)
    assert not schnorr_verify(b"\xff" * 32, b"m", b"\x00" * 64)
    assert not schnorr_verify(SigningKey(b"\x01" * 32).pubkey, b"m", b"\x00" * 63)


@pytest.mark.parametrize("secret", [b"\x00" * 32, bytes.fromhex("ff" * 32), b"\x01" * 31])
def test_invalid_secret_rejected(secret: bytes) -> None:
    with pytest.raises(InvalidKey):
        SigningKey(secret)
