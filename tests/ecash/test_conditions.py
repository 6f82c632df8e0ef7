"""Spending conditions (``constellation.ecash.conditions``): the NUT-11 vectors of
``tests/vectors/cashu/11-test.md`` (SIG_INPUTS, multisig, locktime and refund,
SIG_ALL on swaps and melts with their message hashes; HTLCs refused as not enforced),
and a property: a proof spends exactly when enough distinct keys signed it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.ecash.conditions import MAX_CHECKS, ConditionError, check, condition_of
from constellation.keys import SigningKey, schnorr_sign
from constellation.protocol import cashu as nut

VECTORS = Path(__file__).parents[1] / "vectors" / "cashu" / "11-test.md"
NOW = 1_800_000_000
KEY = "0249098aa8b9d2fbec49ff8598feb17b592b986e62319a4fa488a3dc36387157a7"  # the vectors'


def blocks() -> tuple[list[Any], list[str]]:
    """The vectors' JSON blocks, and their message blocks, in order."""
    text = VECTORS.read_text()
    docs = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    msgs = re.findall(r"^```\n(\[\"P2PK\".*?)\n```", text, re.S | re.M)
    return docs, msgs


DOCS, MSGS = blocks()
HASHES = re.findall(r"should look like this: `([0-9a-f]{64})`", VECTORS.read_text())


def proof(doc: dict[str, Any]) -> nut.Proof:
    return msgspec.convert(doc, nut.Proof)


def request(doc: dict[str, Any]) -> tuple[list[nut.Proof], list[nut.BlindedMessage], str]:
    inputs = [proof(p) for p in doc["inputs"]]
    outputs = msgspec.convert(doc["outputs"], list[nut.BlindedMessage])
    return inputs, outputs, doc.get("quote", "")


@pytest.mark.parametrize(
    ("index", "valid"),
    [(1, True), (2, True), (3, True), (4, False), (5, True), (6, False), (7, True), (8, False)],
)
def test_the_sig_inputs_vectors(index: int, valid: bool) -> None:
    p = proof(DOCS[index])
    if valid:
        check([p], [], NOW)
    else:
        with pytest.raises(ConditionError):
            check([p], [], NOW)


def test_a_locked_proof_without_its_witness_is_refused() -> None:
    with pytest.raises(ConditionError, match="signature"):
        check([proof(DOCS[0])], [], NOW)


@pytest.mark.parametrize(("index", "valid"), [(10, True), (11, False), (12, True), (13, True)])
def test_the_sig_all_swap_vectors(index: int, valid: bool) -> None:
    inputs, outputs, _ = request(DOCS[index])
    if valid:
        check(inputs, outputs, NOW)
    else:
        with pytest.raises(ConditionError, match="same conditions"):
            check(inputs, outputs, NOW)


@pytest.mark.parametrize("index", [18, 19])
def test_the_sig_all_melt_vectors(index: int) -> None:
    inputs, outputs, quote = request(DOCS[index])
    check(inputs, outputs, NOW, quote)
    with pytest.raises(ConditionError):  # the signature covers the quote id
        check(inputs, outputs, NOW, quote + "x")
    with pytest.raises(ConditionError):  # and the outputs
        check(inputs, [], NOW, quote)


def test_the_sig_all_messages_hash_as_the_vectors_say() -> None:
    for doc, msg, digest in zip((DOCS[9], DOCS[17]), MSGS, HASHES, strict=True):
        inputs, outputs, quote = request(doc)
        mine = "".join(p.secret + p.C for p in inputs)
        mine += "".join(f"{o.amount}{o.B_}" for o in outputs) + quote
        assert mine == msg and hashlib.sha256(mine.encode()).hexdigest() == digest


@pytest.mark.parametrize("index", [14, 15, 16])
def test_htlcs_are_refused_not_spent_as_plain_secrets(index: int) -> None:
    inputs, outputs, _ = request(DOCS[index])
    with pytest.raises(ConditionError, match="not supported"):
        check(inputs, outputs, NOW)


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ('["P2PK", "x"]', "nonce, data, tags"),
        (f'["P2PK", {{"data": "{KEY}", "tags": [["n_sigs", "two"]]}}]', "not a positive"),
        (f'["P2PK", {{"data": "{KEY}", "tags": [["n_sigs", "+1"]]}}]', "not a positive"),
        ('["P2PK", {"data": "02aa", "tags": [["sigflag", "SIG_SOME"]]}]', "sigflag"),
        ('["P2PK", {"data": "02aa", "tags": "sigflag"}]', "lists of strings"),
        ('["P2PK", {"data": "02aa"}]', "compressed public key"),
        (f'["P2PK", {{"data": "{KEY}", "tags": [["n_sigs", "0"]]}}]', "at least 1"),
        # NUT-11's malformed secrets: a tag twice (a wallet may read the other value), a
        # key twice in one path (by x: either parity), more signatures than keys
        (
            f'["P2PK", {{"data": "{KEY}", "tags": [["locktime", "1"], ["refund", "{KEY}"],'
            ' ["locktime", "4102444800"]]}]',
            "'locktime' given more than once",
        ),
        (
            f'["P2PK", {{"data": "{KEY}", "tags": [["n_sigs", "1"], ["n_sigs", "1"]]}}]',
            "'n_sigs' given more than once",
        ),
        (
            f'["P2PK", {{"data": "{KEY}", "tags": [["pubkeys", "03{KEY[2:]}"]]}}]',
            "a key given twice in its keys",
        ),
        (
            f'["P2PK", {{"data": "{KEY}", "tags": [["locktime", "1"],'
            f' ["refund", "{KEY}", "{KEY.upper()}"]]}}]',
            "a key given twice in its refund keys",
        ),
        (f'["P2PK", {{"data": "{KEY}", "tags": [["n_sigs", "2"]]}}]', "at most 1"),
        (
            f'["P2PK", {{"data": "{KEY}", "tags": [["locktime", "1"], ["refund", "{KEY}"],'
            ' ["n_sigs_refund", "2"]]}]',
            "at most 1",
        ),
        (f'["P2PK", {{"data": "{KEY}", "tags": [["n_sigs_refund", "1"]]}}]', "without refund"),
        (
            f'["P2PK", {{"data": "{KEY}", "tags": [["locktime", "1"], ["refund", "{KEY}"],'
            ' ["n_sigs_refund", "-1"]]}]',
            "not a positive number",
        ),
    ],
)
def test_malformed_conditions_are_refused(secret: str, why: str) -> None:
    p = nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32, '{"signatures": []}')
    with pytest.raises(ConditionError, match=why):
        check([p], [], NOW)


def test_a_locktime_that_is_not_a_unix_time_is_a_permanent_lock() -> None:
    """NUT-11: spent by its keys, never by its refund keys; digits only, as wallets read
    them (Python's int would take "1_0", " 1" or "+1")."""
    for when in ("never", "1_0", " 1", "+1", "-1", "1.5", "\u0661", ""):
        lock = [["locktime", when], ["refund", "02" + KEYS[3].pubkey.hex()]]
        secret = locked(0, [], 1, lock)
        check([signed(secret, [0])], [], NOW)
        with pytest.raises(ConditionError, match="valid signature"):
            check([signed(secret, [3])], [], NOW)
    expired = locked(0, [], 1, [["locktime", "10"], ["refund", "02" + KEYS[3].pubkey.hex()]])
    check([signed(expired, [3])], [], NOW)


def test_plain_secrets_have_no_condition() -> None:
    for secret in (os.urandom(32).hex(), "[not json", "[1, 2]", "[]", '"text"'):
        assert condition_of(secret) is None


def test_what_a_wallet_may_read_as_locked_is_never_spent_as_plain() -> None:
    """Whitespace around the array, another length, JSON nested deeper than this mint
    reads: a wallet may see a lock there; the mint never spends it as a plain secret."""
    body = {"nonce": "00", "data": "02" + "11" * 32}
    deep = '["P2PK", {"nonce": ' + "[" * 1000 + "]" * 1000 + "}]"
    with pytest.raises(ConditionError, match="nested too deeply"):
        check([nut.Proof(1, "009a1f293253e41e", deep, "02" + "11" * 32)], [], NOW)
    witness = '{"signatures": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ConditionError, match="witness"):
        check([msgspec.structs.replace(signed(locked(0, [], 1), [0]), witness=witness)], [], NOW)
    for secret in (
        " " + json.dumps(["P2PK", body]),
        "\t\r\n " + json.dumps(["P2PK", body]),
        json.dumps(["P2PK", body]) + "\n",
        json.dumps(["P2PK"]),
        json.dumps(["P2PK", body, "x"]),
    ):
        with pytest.raises(ConditionError):
            check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32)], [], NOW)


@given(
    st.one_of(
        st.text(),
        st.builds(
            lambda space, doc: space + json.dumps(doc),
            st.text(" \t\n\r\x0b\x0c\xa0"),
            st.recursive(st.none() | st.integers() | st.text(), st.lists, max_leaves=4),
        ),
    )
)
def test_a_secret_is_plain_exactly_where_json_reads_no_kind_from_it(secret: str) -> None:
    """A secret is looked at as a condition only where JSON reads an array that starts with
    a string from it (plain secrets skip the JSON parse)."""
    try:
        doc = json.loads(secret)
    except ValueError:
        doc = None
    if isinstance(doc, list) and doc and isinstance(doc[0], str):
        with pytest.raises(ConditionError):  # a kind with no well-formed P2PK body
            condition_of(secret)
    else:
        assert condition_of(secret) is None


def many_locked(count: int, n: int, tags: list[list[str]] | None = None) -> tuple[str, bytes]:
    """A secret locked to ``count`` keys (``MANY``), ``n`` of which must sign; its digest."""
    pubkeys = ["pubkeys", *("02" + k.pubkey.hex() for k in MANY[1:count])]
    body = {
        "nonce": "00",
        "data": "02" + MANY[0].pubkey.hex(),
        "tags": [pubkeys, ["n_sigs", str(n)], *(tags or [])],
    }
    secret = json.dumps(["P2PK", body])
    return secret, hashlib.sha256(secret.encode()).digest()


MANY = [SigningKey(bytes([i + 1]) * 32) for i in range(20)]


def test_a_request_is_bounded_in_signature_checks() -> None:
    """10 of 10 keys signed, the signatures in the reverse order of the keys: each key
    is checked against signatures until one is its own, 55 checks a proof; proofs that
    need more than MAX_CHECKS in all are refused."""
    secret, digest = many_locked(10, 10)
    sigs = [schnorr_sign(k.secret, digest).hex() for k in reversed(MANY[:10])]
    p = nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32, json.dumps({"signatures": sigs}))
    fit = MAX_CHECKS // 55
    check([p] * fit, [], NOW)
    with pytest.raises(ConditionError, match="checks in one request"):
        check([p] * (fit + 1), [], NOW)


def test_a_lock_of_many_keys_spends_as_any_other() -> None:
    """The mint signs outputs blind, so it cannot refuse to issue a lock of many keys:
    spending one is bounded by the request's checks, not by a count of its keys."""
    secret, digest = many_locked(20, 1)
    last = json.dumps({"signatures": [schnorr_sign(MANY[19].secret, digest).hex()]})
    check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32, last)], [], NOW)
    secret, digest = many_locked(12, 12)
    every = json.dumps({"signatures": [schnorr_sign(k.secret, digest).hex() for k in MANY[:12]]})
    check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32, every)], [], NOW)
    # a lock of many keys whose locktime passed, naming no refund key: anyone's (its
    # tags and witness well formed still)
    secret, _ = many_locked(20, 20, [["locktime", str(NOW - 1)]])
    check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32)], [], NOW)
    with pytest.raises(ConditionError, match="witness"):
        check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32, "[1]")], [], NOW)
    secret, _ = many_locked(20, 0, [["locktime", str(NOW - 1)]])
    with pytest.raises(ConditionError, match="n_sigs"):
        check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32)], [], NOW)
    secret, _ = many_locked(20, 20, [["locktime", str(NOW + 1)]])
    with pytest.raises(ConditionError, match="20 valid signature"):
        check([nut.Proof(1, "009a1f293253e41e", secret, "02" + "11" * 32)], [], NOW)


KEYS = [SigningKey(bytes([i + 1]) * 32) for i in range(5)]


def locked(data: int, pubkeys: list[int], n: int, tags: list[list[str]] | None = None) -> str:
    extra = [["pubkeys", *("02" + KEYS[i].pubkey.hex() for i in pubkeys)]] if pubkeys else []
    body = {
        "nonce": os.urandom(8).hex(),
        "data": "02" + KEYS[data].pubkey.hex(),
        "tags": [*extra, ["n_sigs", str(n)], *(tags or [])],
    }
    return json.dumps(["P2PK", body])


def signed(secret: str, signers: list[int]) -> nut.Proof:
    digest = hashlib.sha256(secret.encode()).digest()
    sigs = [schnorr_sign(KEYS[i].secret, digest).hex() for i in signers]
    return nut.Proof(
        1, "009a1f293253e41e", secret, "02" + "11" * 32, json.dumps({"signatures": sigs})
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.integers(0, 4), max_size=6),
    st.booleans(),
)
def test_a_proof_spends_exactly_when_enough_of_its_keys_signed(
    n: int, signers: list[int], expired: bool
) -> None:
    """Keys 0 (data), 1, 2 (pubkeys) of which ``n`` must sign; key 3 the refund key once
    the locktime passed; key 4 nobody's. Repeated signers count once."""
    lock = [
        ["locktime", str(NOW - 1 if expired else NOW + 1)],
        ["refund", "02" + KEYS[3].pubkey.hex()],
    ]
    p = signed(locked(0, [1, 2], n, lock), signers)
    signing = len({s for s in signers if s in (0, 1, 2)})
    enough = n <= 3 and (signing >= n or (expired and 3 in signers))  # 4 of 3: malformed
    if enough:
        check([p], [], NOW)
    else:
        with pytest.raises(ConditionError):
            check([p], [], NOW)
