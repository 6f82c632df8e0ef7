"""The mint's rules (``constellation.ecash.mint``) with the wallet's side
(``constellation.ecash.client``): swaps that balance and sign with valid DLEQ proofs,
every refusal with its NUT code, fees, NUT-08 change and NUT-20 signatures."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.ecash.keyset import Keyset, ecash_for, input_fee, split
from constellation.keys import SigningKey
from constellation.protocol import cashu as nut

MASTER = bytes(range(32))
OLD = Keyset.derive(MASTER, "sat", 0, 0)
NOW = Keyset.derive(MASTER, "sat", 1, 100)  # 100 ppk: 10 inputs cost 1 sat
MSAT = Keyset.derive(MASTER, "msat", 0, 0)
MINT = m.Mint([Keyset(OLD.unit, OLD.index, 0, OLD.secrets, active=False), NOW, MSAT])
KEYS = {k.id: k.keys for k in MINT.keysets.values()}
MSAT_BLANK = client.Secret.fresh().output(MSAT.id, 1)
T = 1_800_000_000  # the rules' clock


def issue(amount: int, keyset: Keyset = NOW) -> list[nut.Proof]:
    """Proofs worth ``amount`` as the mint issues them (for a paid quote)."""
    outputs, secrets = client.outputs_for(amount, keyset.id)
    return client.unblind(MINT.sign(outputs), outputs, secrets, KEYS)


def swap(inputs: list[nut.Proof], amount: int) -> tuple[m.Spend, list[nut.Proof]]:
    outputs, secrets = client.outputs_for(amount, NOW.id)
    spend, checked = MINT.swap(nut.SwapRequest(inputs, outputs), T)
    assert checked.amount == amount
    return spend, client.unblind(MINT.sign(outputs), outputs, secrets, KEYS)


def test_a_swap_balances_and_signs_proofs_that_verify() -> None:
    inputs = issue(1000)
    assert sorted(p.amount for p in inputs) == [8, 32, 64, 128, 256, 512]
    spend, proofs = swap(inputs, 999)  # 6 inputs of a 100 ppk keyset: a fee of 1
    assert spend.fee == 1 and spend.amount == 1000 and len(spend.ys) == 6
    assert sum(p.amount for p in proofs) == 999
    assert MINT.spend(proofs, T).amount == 999  # the new proofs are the mint's
    with pytest.raises(m.CashuError) as e:
        swap(issue(1000), 1000)  # the fee is not paid
    assert e.value.code == m.UNBALANCED


def refused(code: int, inputs: list[nut.Proof], outputs: list[nut.BlindedMessage]) -> None:
    with pytest.raises(m.CashuError) as e:
        MINT.swap(nut.SwapRequest(inputs, outputs), T)
    assert e.value.code == code, e.value


def test_a_wallet_takes_only_signatures_of_the_keyset_and_amount_it_asked() -> None:
    """A DLEQ proof checks a signature by the key the mint names: a mint that signs a
    512-sat output with its 1-sat key passes it, and is caught by the amount."""
    outputs, secrets = client.outputs_of([512, 8], NOW.id)
    cheap = [msgspec.structs.replace(o, amount=1) for o in outputs]
    signed = MINT.sign(cheap)  # valid signatures, DLEQ proofs and all: of 1 sat each
    with pytest.raises(client.BadSignature, match="a signature of 1 in keyset"):
        client.unblind(signed, outputs, secrets, KEYS)
    elsewhere = MINT.sign([msgspec.structs.replace(o, id=MSAT.id) for o in outputs])
    with pytest.raises(client.BadSignature, match=f"in keyset {MSAT.id}"):
        client.unblind(elsewhere, outputs, secrets, KEYS)
    # change (NUT-08): blank outputs' amounts are the mint's to give, the keyset is not
    assert [p.amount for p in client.unblind(signed, cheap, secrets, KEYS)] == [1, 1]
    assert len(client.unblind(signed, outputs, secrets, KEYS, change=True)) == 2


def test_what_a_swap_refuses() -> None:
    p = issue(64)
    [good] = client.outputs_for(64, NOW.id)[0]
    forged = nut.Proof(p[0].amount, p[0].id, p[0].secret, issue(64)[0].C)
    refused(m.PROOF_INVALID, [forged], [good])
    refused(m.PROOF_INVALID, [nut.Proof(64, NOW.id, "x", "02" + "00" * 32)], [good])
    refused(m.KEYSET_UNKNOWN, [nut.Proof(64, "00" * 8, p[0].secret, p[0].C)], [good])
    refused(m.PROOF_INVALID, [nut.Proof(32, NOW.id, p[0].secret, p[0].C)], [good])
    refused(m.DUPLICATE_INPUTS, [p[0], p[0]], [good])
    refused(m.DUPLICATE_OUTPUTS, issue(128), [good, good])
    refused(m.KEYSET_INACTIVE, issue(65), [nut.BlindedMessage(64, OLD.id, good.B_)])
    refused(m.AMOUNT_LIMIT, issue(65), [nut.BlindedMessage(63, NOW.id, good.B_)])
    refused(m.UNIT_MISMATCH, issue(65), [nut.BlindedMessage(64, MSAT.id, good.B_)])
    refused(m.MULTIPLE_UNITS, issue(64) + issue(64, MSAT), [good])
    bad_point = nut.BlindedMessage(64, NOW.id, "02" + "ff" * 32)
    refused(m.PROOF_INVALID, issue(65), [bad_point])
    # NUT-10 secrets: P2PK without its signature, or a kind it does not enforce (HTLC):
    # refused, never spent as a plain secret
    for kind in ("P2PK", "HTLC"):
        locked = json.dumps([kind, {"nonce": "00", "data": "02" + "11" * 32}])
        outputs = [client.Secret(locked, 7).output(NOW.id, 64)]
        [lp] = client.unblind(MINT.sign(outputs), outputs, [client.Secret(locked, 7)], KEYS)
        refused(m.PROOF_INVALID, [lp], [good])


def test_an_inactive_keyset_is_spent_from_but_signs_nothing() -> None:
    old = issue(64, OLD)  # issued while it was active
    spend, proofs = swap(old, 64)  # its fee: 0 ppk
    assert spend.fee == 0 and sum(p.amount for p in proofs) == 64
    assert MINT.active("sat") is NOW
    with pytest.raises(m.CashuError) as e:
        MINT.active("usd")
    assert e.value.code == m.UNIT_UNSUPPORTED


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=4), st.integers(0, 4))
def test_a_swap_never_creates_value(amounts: list[int], extra: int) -> None:
    inputs = [p for a in amounts for p in issue(a)]
    fee = (len(inputs) * 100 + 999) // 1000
    total = sum(amounts)
    assume(total > fee)
    spend, proofs = swap(inputs, total - fee)
    assert spend.amount - spend.fee == sum(p.amount for p in proofs) == total - fee
    if extra:
        with pytest.raises(m.CashuError):
            swap(inputs, total - fee + extra)


def test_melt_checks_and_change() -> None:
    quote = m.MeltQuote("q", "lnbc", "00" * 32, 900, 10, "sat", m.MELT_UNPAID, 2_000)
    blanks = [client.Secret.fresh().output(NOW.id, 1) for _ in range(4)]
    spend, n = MINT.check_melt(quote, nut.MeltRequest("q", issue(1000), blanks), 1_000)
    assert n == 4 and spend.amount == 1000 and spend.fee == 1
    refusals = [
        (quote, nut.MeltRequest("q", issue(910), None), m.UNBALANCED),  # the fee is short
        (quote, nut.MeltRequest("q", issue(1000), [MSAT_BLANK]), m.UNIT_MISMATCH),
        (replace(quote, expiry=1_000), nut.MeltRequest("q", issue(1000)), m.QUOTE_EXPIRED),
        (replace(quote, state=m.MELT_PENDING), nut.MeltRequest("q", issue(1000)), m.QUOTE_PENDING),
        (replace(quote, state=m.MELT_PAID), nut.MeltRequest("q", issue(1000)), m.INVOICE_PAID),
    ]
    for q, req, code in refusals:
        with pytest.raises(m.CashuError) as e:
            MINT.check_melt(q, req, 1_000)
        assert e.value.code == code
    # NUT-08: 900 sat overpaid, over 10 blanks: 512 + 256 + 128 + 4, the largest first
    ten = [client.Secret.fresh().output(NOW.id, 1) for _ in range(10)]
    assert [o.amount for o in m.change(900, ten)] == [512, 256, 128, 4]
    assert [o.amount for o in m.change(7, ten[:2])] == [4, 2]  # what two can carry


VECTORS = Path(__file__).parents[1] / "vectors" / "cashu" / "20-test.md"


def test_nut20_signatures() -> None:
    doc = VECTORS.read_text()
    pubkey = re.findall(r"`pubkey` in the `PostMintQuoteBolt11Request` is `([0-9a-f]{66})`", doc)
    good, bad = (
        nut.decode(b.encode(), nut.MintRequest)
        for b in re.findall(r"```json\n(.*?)```", doc, re.S)[:2]
    )
    assert m.check_mint_signature(pubkey[0], good)
    assert not m.check_mint_signature(pubkey[1], bad)
    # A quote's key must be a point: else, once paid, it could never be minted (20009).
    m.check_quote_key(pubkey[0])
    for key in ("02" + "ff" * 32, "04" + pubkey[0][2:], "zz" + pubkey[0][2:], pubkey[0][:-2]):
        with pytest.raises(m.CashuError) as refused:
            m.check_quote_key(key)
        assert refused.value.code == m.PUBKEY_INVALID


def test_a_mint_quote_issues_once_its_invoice_is_paid() -> None:
    key = SigningKey(bytes(31) + b"\x07")
    outputs, _ = client.outputs_for(100, NOW.id)
    req = nut.MintRequest("q1", outputs)
    for state, now, code in (
        (m.UNPAID, 1_000, m.QUOTE_UNPAID),
        (m.UNPAID, 3_000, m.QUOTE_EXPIRED),
        (m.ISSUED, 1_000, m.QUOTE_ISSUED),
    ):
        with pytest.raises(m.CashuError) as e:
            MINT.check_mint(m.MintQuote("q1", "lnbc", "00", 100, "sat", state, 2_000), req, now)
        assert e.value.code == code
    paid = m.MintQuote("q1", "lnbc", "00", 100, "sat", m.PAID, 2_000)
    assert MINT.check_mint(paid, req, 3_000).amount == 100  # paid: mintable after expiry
    with pytest.raises(m.CashuError) as e:
        MINT.check_mint(paid, nut.MintRequest("q1", client.outputs_for(99, NOW.id)[0]), 0)
    assert e.value.code == m.UNBALANCED
    # a quote locked to a key (NUT-20) needs its holder's signature
    locked = m.MintQuote("q1", "lnbc", "00", 100, "sat", m.PAID, 2_000, "02" + key.pubkey.hex())
    with pytest.raises(m.CashuError) as e:
        MINT.check_mint(locked, req, 0)
    assert e.value.code == m.SIGNATURE_INVALID
    signed = nut.MintRequest("q1", outputs, client.sign_mint_request(key, "q1", outputs))
    assert MINT.check_mint(locked, signed, 0).amount == 100


def test_a_withdrawal_pays_a_key_that_names_its_outputs() -> None:
    mint_key = SigningKey(bytes(31) + b"\x09").pubkey
    outputs = [bytes.fromhex(o.B_) for o in client.outputs_for(600, NOW.id)[0]]
    key = m.withdrawal_key(mint_key, outputs)
    assert len(key) == 32 and key != mint_key
    assert m.withdrawal_key(mint_key, outputs) == key  # the wallet and the mint agree
    assert m.withdrawal_key(mint_key, outputs[:-1]) != key  # other outputs: another key
    assert m.withdrawal_key(mint_key, list(reversed(outputs))) != key  # in their order


def test_a_withdrawal_buys_outputs_of_exactly_what_it_paid() -> None:
    outputs = MINT.outputs(client.outputs_for(600, NOW.id)[0])
    m.check_withdraw(600_000, outputs)
    for paid in (599_000, 601_000, 600_001, 0):
        with pytest.raises(m.CashuError) as e:
            m.check_withdraw(paid, outputs)
        assert e.value.code == m.UNBALANCED
    with pytest.raises(m.CashuError) as e:
        m.check_withdraw(1_000, MINT.outputs([MSAT_BLANK]))
    assert e.value.code == m.UNIT_UNSUPPORTED


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**40), st.integers(0, 1000))
def test_the_ecash_a_payment_buys_pays_its_own_input_fee_and_no_more(amount: int, ppk: int) -> None:
    """``ecash_for``: fresh ecash worth T pays ``amount`` once the mint took the fee for
    spending T's proofs, and T - 1 would not."""
    total = ecash_for(amount, ppk)

    def left(t: int) -> int:
        return t - input_fee([ppk] * len(split(t)))

    assert left(total) >= amount and (total == amount or left(total - 1) < amount)
    assert total - amount <= input_fee([ppk] * 64) + 64  # bounded: a fee's worth of slack
