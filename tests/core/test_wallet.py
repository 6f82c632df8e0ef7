"""Wallet payments: coin choice, change, and refusals; the gap scan of a restore."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.address import Network, encode_address
from constellation.errors import InsufficientFunds, InvalidAddress
from constellation.ledger import Coin
from constellation.sighash import input_signature_valid
from constellation.wallet import GapScan, Wallet
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


def walk(scan: GapScan, used: set[int]) -> list[range]:
    """The batches a scan asks about, each use in them told before the next."""
    batches = []
    while batch := scan.next():
        batches.append(batch)
        for index in batch:
            if index in used:
                scan.used(index)
    return batches


def test_a_gap_scan_of_nothing_used_asks_the_gap_in_batches() -> None:
    scan = GapScan(gap=20, batch=8)
    assert walk(scan, set()) == [range(0, 8), range(8, 16), range(16, 20)]
    assert scan.end == 0 and not scan.next()


def test_a_gap_scan_stops_gap_past_the_last_use_and_misses_what_lies_further() -> None:
    scan = GapScan(gap=5, batch=5)
    # 4 then 9 are found (4 unused between them); 15 lies past 5 unused: not asked
    assert walk(scan, {4, 9, 15}) == [range(0, 5), range(5, 10), range(10, 15)]
    assert scan.end == 10


@given(
    gap=st.integers(1, 30),
    batch=st.integers(1, 120),
    steps=st.lists(st.integers(0, 29), max_size=12),
)
def test_a_gap_scan_finds_every_use_closer_than_the_gap(
    gap: int, batch: int, steps: list[int]
) -> None:
    """Uses each fewer than ``gap`` unused indexes past the last: every one is found,
    and exactly ``gap`` indexes past the last are asked about, in order, none twice."""
    used, last = set(), -1
    for step in steps:
        last += 1 + step % gap
        used.add(last)
    scan = GapScan(gap, batch)
    batches = walk(scan, used)
    assert scan.end == last + 1
    assert [i for b in batches for i in b] == list(range(last + 1 + gap))
    assert all(0 < len(b) <= batch for b in batches)
