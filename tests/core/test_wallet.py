"""Wallet payments: coin choice, change, and refusals."""

from __future__ import annotations

import pytest

from constellation.address import Network, encode_address
from constellation.errors import InsufficientFunds, InvalidAddress
from constellation.ledger import Coin
from constellation.sighash import input_signature_valid
from constellation.wallet import Wallet
from tests.strategies import KEYS


def test_pay_picks_coins_signs_and_returns_change() -> None:
    wallet = Wallet(b"\x01" * 32, Network.TEST)
    a, b = wallet.fresh_key(), wallet.fresh_key()
    coins = {
        b"\x0a" * 32: Coin(700, a.pubkey),
        b"\x0b" * 32: Coin(500, b.pubkey),
        b"\x0c" * 32: Coin(9_999, KEYS[3].pubkey),
    }  # not ours: ignored
    to = encode_address(KEYS[0].pubkey, Network.TEST)
    tx = wallet.pay(coins, to, 1_000, fee_msat=10)
    assert [c for c, _ in tx.inputs] == [b"\x0a" * 32, b"\x0b" * 32]
    assert tx.outputs[0] == (1_000, KEYS[0].pubkey)
    assert tx.outputs[1].value_msat == 190 and tx.outputs[1].owner in wallet.owners
    assert input_signature_valid(tx, 0, a.pubkey) and input_signature_valid(tx, 1, b.pubkey)


def test_pay_refuses_what_it_cannot_cover_or_address() -> None:
    wallet = Wallet(b"\x02" * 32, Network.TEST)
    coins = {b"\x0a" * 32: Coin(700, wallet.fresh_key().pubkey)}
    with pytest.raises(InsufficientFunds, match="holds 700"):
        wallet.pay(coins, KEYS[0].pubkey, 700, fee_msat=1)
    with pytest.raises(InvalidAddress, match="network"):
        wallet.pay(coins, encode_address(KEYS[0].pubkey, Network.MAIN), 100)
    exact = wallet.pay(coins, KEYS[0].pubkey, 699, fee_msat=1)
    assert len(exact.outputs) == 1  # no change output when nothing is left over
