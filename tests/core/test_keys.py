"""BIP32 derivation, BIP39 words, and contact keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.errors import InvalidKey
from constellation.keys import (
    HARDENED,
    ExtendedKey,
    SigningKey,
    contact_address_key,
    contact_spending_key,
    is_valid_xonly,
    schnorr_sign,
    schnorr_verify,
)
from constellation.wallet import Wallet, new_mnemonic

# BIP32 test vector 1 (bitcoin/bips bip-0032.mediawiki; also SLIP-0010 vector 1 secp256k1)
SEED1 = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
BIP32_VECTOR1 = [
    (
        "m",
        "e8f32e723decf4051aefac8e2c93c9c5b214313817cdb01a1494b917c8436b35",
        "873dff81c02f525623fd1fe5167eac3a55a049de3d314bb42ee227ffed37d508",
        "0339a36013301597daef41fbe593a02cc513d0b55527ec2df1050e2e8ff49c85c2",
    ),
    (
        "m/0'",
        "edb2e14f9ee77d26dd93b4ecede8d16ed408ce149b6cd80b0715a2d911a0afea",
        "47fdacbd0f1097043b78c63c20c34ef4ed9a111d980047ad16282c7ae6236141",
        None,
    ),
    (
        "m/0'/1",
        "3c6cb8d0f6a264c91ea8b5030fadaa8e538b020f0a387421a12de9319dc93368",
        None,
        None,
    ),
]


@pytest.mark.parametrize(("path", "secret", "chain_code", "public"), BIP32_VECTOR1)
def test_bip32_vector1(path: str, secret: str, chain_code: str | None, public: str | None) -> None:
    key = ExtendedKey.from_seed(SEED1).derive(path)
    assert key.secret is not None and key.secret.hex() == secret
    if chain_code:
        assert key.chain_code.hex() == chain_code
    if public:
        assert key.public.hex() == public


@given(st.binary(min_size=16, max_size=64), st.integers(0, HARDENED - 1))
@settings(max_examples=30)
def test_public_derivation_matches_private(seed: bytes, index: int) -> None:
    root = ExtendedKey.from_seed(seed)
    assert root.neuter().child(index).public == root.child(index).public


def test_hardened_needs_secret_and_paths_are_checked() -> None:
    root = ExtendedKey.from_seed(SEED1)
    with pytest.raises(InvalidKey):
        root.neuter().child(HARDENED)
    for bad in ("0/1", "m/x", "m/1''", f"m/{HARDENED}", "m/\u00b2"):
        with pytest.raises(InvalidKey):
            root.derive(bad)
    with pytest.raises(InvalidKey):
        ExtendedKey.from_seed(b"short")
    assert root.derive("m/0h").public == root.derive("m/0'").public


def test_bip39_vector_and_checksum() -> None:
    # BIP39 vector (trezor/python-mnemonic vectors.json): entropy 00…00, passphrase TREZOR
    words = " ".join(["abandon"] * 11 + ["about"])
    wallet = Wallet.from_mnemonic(words, "TREZOR")
    expected = Wallet(
        bytes.fromhex(
            "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a698"
            "7599d18264c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04"
        )
    )
    assert wallet.key(0, 0).pubkey == expected.key(0, 0).pubkey
    with pytest.raises(InvalidKey):
        Wallet.from_mnemonic(" ".join(["abandon"] * 12))


def test_wallet_recovers_from_words() -> None:
    words = new_mnemonic(24)
    assert len(words.split()) == 24
    first, again = Wallet.from_mnemonic(words), Wallet.from_mnemonic(words.upper())
    assert [first.fresh_address() for _ in range(3)] == [again.fresh_address() for _ in range(3)]
    assert first.fresh_address() != Wallet.from_mnemonic(new_mnemonic()).fresh_address()


secrets = st.binary(min_size=32, max_size=32).filter(
    lambda b: 0 < int.from_bytes(b, "big") < 2**256 - 2**129
)


@given(secrets, secrets, st.integers(0, 2**32 - 1))
@settings(max_examples=40)
def test_contact_addresses_are_found_and_spent(payer_s: bytes, contact_s: bytes, n: int) -> None:
    payer, contact = SigningKey(payer_s), SigningKey(contact_s)
    address_key = contact_address_key(payer, contact.pubkey, n)
    spending = contact_spending_key(contact, payer.pubkey, n)
    assert spending.pubkey == address_key
    assert schnorr_verify(address_key, b"spend", spending.sign(b"spend"))
    assert address_key != contact.pubkey
    assert address_key != contact_address_key(payer, contact.pubkey, (n + 1) % 2**32)


def test_contact_addresses_depend_on_the_payer() -> None:
    contact = SigningKey(b"\x05" * 32)
    a, b = SigningKey(b"\x06" * 32), SigningKey(b"\x07" * 32)
    assert contact_address_key(a, contact.pubkey, 0) != contact_address_key(b, contact.pubkey, 0)
    with pytest.raises(InvalidKey):
        contact_address_key(a, b"\xff" * 32, 0)


@settings(max_examples=25)
@given(st.integers(1, 2**255), st.lists(st.binary(max_size=80), min_size=1, max_size=4))
def test_a_key_signs_as_the_one_off_function_does_and_checks_answer_the_same_twice(
    n: int, messages: list[bytes]
) -> None:
    """A signing key keeps libsecp256k1's keypair, and parsed public keys are kept:
    neither changes a signature or an answer, however often a key is used."""
    key = SigningKey(n.to_bytes(32, "big"))
    aux = bytes(32)
    for msg in messages * 2:
        sig = key.sign(msg, aux)
        assert sig == schnorr_sign(key.secret, msg, aux)
        assert schnorr_verify(key.pubkey, msg, sig) and schnorr_verify(key.pubkey, msg, sig)
        assert not schnorr_verify(key.pubkey, msg + b"x", sig)
    off_curve = bytes.fromhex("eefdea4cdb677750a420fee807eacf21eb9898ae79b9768766e4faa04a2d4a34")
    for _ in range(2):  # a key that is not one, known as such or not
        assert not is_valid_xonly(off_curve)
        assert not schnorr_verify(off_curve, b"m", sig)
        assert not is_valid_xonly(bytes(31))
