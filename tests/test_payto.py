"""What a scanned payment request is (``constellation.payto``): L3 addresses, BOLT11
invoices (signed by the simulated network's nodes), Bitcoin segwit addresses (the BIP173
and BIP350 examples) and BIP21 URIs; everything else refused with its reason."""

from __future__ import annotations

import os
import time
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.payto import Kind, PayToError, parse
from services.lnsim.network import Network as Lightning

V0 = "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4"  # BIP173: P2WPKH
V1 = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"  # BIP350: P2TR
TESTNET_V0 = "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7"


def invoice(amount_msat: int | None, chain: str = "regtest", age_s: float = 0) -> str:
    ln = Lightning(lambda: time.time() - age_s, chain=chain)
    ln.add_node("payee")
    return ln.invoice("payee", amount_msat, "label", "coffee", 3600).bolt11


def test_an_l3_address_is_paid_in_l3() -> None:
    address = encode_address(SigningKey(os.urandom(32)).pubkey, Network.REGTEST, b"\x01" * 8)
    found = parse(f"  {address}\n", Network.REGTEST)
    assert (found.kind, found.target, found.amount_msat) == (Kind.L3, address, None)
    with pytest.raises(PayToError, match="network"):
        parse(address, Network.MAIN)
    with pytest.raises(PayToError, match="checksum"):
        parse(address[:-1] + ("q" if address[-1] != "q" else "p"), Network.REGTEST)


def test_an_invoice_with_or_without_its_scheme() -> None:
    bolt11 = invoice(21_000)
    for text in (bolt11, bolt11.upper(), f"lightning:{bolt11}", f"LIGHTNING:{bolt11.upper()}"):
        found = parse(text, Network.REGTEST)
        assert (found.kind, found.target, found.amount_msat) == (Kind.BOLT11, bolt11, 21_000)
        assert found.description == "coffee" and len(found.payment_hash) == 64
    assert parse(invoice(None), Network.REGTEST).amount_msat is None
    with pytest.raises(PayToError, match="network"):
        parse(invoice(1000, "bitcoin"), Network.REGTEST)
    with pytest.raises(PayToError, match="expired"):
        parse(invoice(1000, age_s=3601), Network.REGTEST)
    with pytest.raises(PayToError, match="BOLT11"):
        parse(bolt11[:-3] + "qqq", Network.REGTEST)


def test_bitcoin_addresses_by_their_own_checksums() -> None:
    for text, version in ((V0, 0), (V1, 1)):
        found = parse(text, Network.MAIN)
        assert (found.kind, found.target) == (Kind.ONCHAIN, text.lower()) and version in (0, 1)
    assert parse(TESTNET_V0, Network.TEST).kind is Kind.ONCHAIN
    with pytest.raises(PayToError, match="expected 'bc'"):
        parse(TESTNET_V0, Network.MAIN)
    # a version 1 program under bech32 (not bech32m), and the reverse: refused (BIP350)
    with pytest.raises(PayToError, match="checksum"):
        parse("bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd", Network.MAIN)
    with pytest.raises(PayToError, match="checksum"):
        parse("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kmy2z5a", Network.MAIN)


@given(st.integers(1, 21_000_000 * 100_000_000 * 1000))
def test_bip21_amounts_are_exact(msat: int) -> None:
    btc = Decimal(msat) / 100_000_000_000
    found = parse(f"bitcoin:{V1}?amount={btc:f}&label=rent", Network.MAIN)
    assert (found.kind, found.amount_msat, found.description) == (Kind.ONCHAIN, msat, "rent")


def test_bip21_amounts_at_the_edges() -> None:
    def amount(text: str) -> int | None:
        return parse(f"bitcoin:{V1}?amount={text}", Network.MAIN).amount_msat

    assert amount("21000000") == 21_000_000 * 100_000_000_000  # every bitcoin
    assert amount("0.00000000001") == 1  # one msat
    assert amount("1.") == amount("1.000000000000000000") == 100_000_000_000
    assert amount(".5") == amount("0000000000.50") == 50_000_000_000  # as BIP21 writes them


def test_bip21_with_an_invoice_is_paid_over_lightning() -> None:
    bolt11 = invoice(150_000_000)
    uri = f"bitcoin:{V1}?amount=0.0015&lightning={bolt11}"
    found = parse(uri, Network.REGTEST)
    assert (found.kind, found.target, found.amount_msat) == (Kind.BOLT11, bolt11, 150_000_000)
    assert parse(f"bitcoin:?lightning={bolt11}", Network.REGTEST).kind is Kind.BOLT11
    with pytest.raises(PayToError, match="which"):
        parse(f"bitcoin:{V1}?amount=0.002&lightning={bolt11}", Network.REGTEST)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "1 to"),
        ("x" * 5000, "1 to"),
        ("mailto:a@b", "unknown scheme"),
        (f"bitcoin:{V1}?req-pop=1", "requires"),
        (f"bitcoin:{V1}?amount=1&amount=2", "twice"),
        (f"bitcoin:{V1}?amount=-1", "amount"),
        (f"bitcoin:{V1}?amount=0.000000000001", "amount"),
        (f"bitcoin:{V1}?amount=NaN", "amount"),
        (f"bitcoin:{V1}?amount=abc", "amount"),
        (f"bitcoin:{V1}?amount=sNaN", "amount"),
        (f"bitcoin:{V1}?amount=1e3", "amount"),
        (f"bitcoin:{V1}?amount=1_000", "amount"),
        (f"bitcoin:{V1}?amount=99999999999", "amount"),  # more BTC than there will be
        (f"bitcoin:{V1}?amount=21000000.00000000001", "amount"),
        (f"bitcoin:{V1}?amount=1.0000000000000000000000000001", "whole msat"),
        (f"bitcoin:{V1}?amount=1&&label=x", "malformed"),
        (f"bitcoin:{V1}?amount", "malformed"),
        ("bitcoin:", "neither"),
        ("hello", "neither an invoice nor an address"),
    ],
)
def test_what_is_refused_and_why(text: str, why: str) -> None:
    with pytest.raises(PayToError, match=why):
        parse(text, Network.MAIN)
