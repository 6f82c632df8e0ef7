"""The Cashu vectors (``tests/vectors/cashu``: NUT-00, NUT-01, NUT-02, NUT-12, NUT-13
and nutshell's own crypto tests) through the project's BDHKE, DLEQ, keyset and
deterministic-secret code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from coincurve import PublicKey

from constellation.crypto import bdhke
from constellation.ecash.client import Secret, derived_outputs
from constellation.ecash.keyset import keyset_id_v1, keyset_id_v2, parse_keys
from constellation.wallet import seed_of

HERE = Path(__file__).parents[1] / "vectors" / "cashu"


def text(name: str) -> str:
    return (HERE / name).read_text()


def pt(h: str) -> PublicKey:
    return PublicKey(bytes.fromhex(h))


def sc(h: str) -> int:
    return int(h, 16)


def json_blocks(doc: str) -> list[dict[str, object]]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.S)]


def test_hash_to_curve() -> None:
    pairs = re.findall(r"Message: ([0-9a-f]{64})\nPoint: +([0-9a-f]{66})", text("00-tests.md"))
    assert len(pairs) == 3
    for message, point in pairs:
        assert bdhke.hash_to_curve(bytes.fromhex(message)).format().hex() == point


def test_blinded_messages_and_signatures() -> None:
    doc = text("00-tests.md")
    blinded = re.findall(r"x: +([0-9a-f]{64}).*?\nr: +([0-9a-f]{64}).*?\nB_: ([0-9a-f]{66})", doc)
    assert len(blinded) == 2
    for x, r, b in blinded:
        assert bdhke.blind(bytes.fromhex(x), sc(r)).format().hex() == b
    signed = re.findall(
        r"mint private key: ([0-9a-f]{64})\nB_: ([0-9a-f]{66})\nC_: ([0-9a-f]{66})", doc
    )
    assert len(signed) == 2
    for k, b, c in signed:
        assert bdhke.sign(sc(k), pt(b)).format().hex() == c


def test_nutshell_steps_and_fixed_nonce_proofs() -> None:
    v = json.loads(text("nutshell_test_crypto_extra.json"))
    secret = v["step1"]["secret_utf8"].encode()
    blinded = bdhke.blind(secret, sc(v["step1"]["r"]))
    assert blinded.format().hex() == v["step1"]["B_"]
    assert bdhke.sign(sc(v["step2"]["a"]), blinded).format().hex() == v["step2"]["C_"]
    c = bdhke.unblind(pt(v["step3"]["C_"]), sc(v["step3"]["r"]), pt(v["step3"]["A"]))
    assert c.format().hex() == v["step3"]["C"]
    for case in v["dleq_fixed_nonce"]:
        e, s = bdhke.prove(sc(case["a"]), blinded, nonce=sc(case["p"]))
        assert (e.hex(), s.hex()) == (case["e"], case["s"])
        key = bdhke.public_key(sc(case["a"]))
        assert bdhke.check(key, blinded, bdhke.sign(sc(case["a"]), blinded), e, s)


def test_dleq() -> None:
    doc = text("12-tests.md")
    shell = dict(re.findall(r'(\w+): "?([0-9a-f]{64,66})"?', doc.split("```shell", 3)[1]))
    expect = re.search(r'hash\(R1, R2, K, C_\): "([0-9a-f]{64})"', doc)
    assert expect is not None
    points = [pt(shell[n]) for n in ("R1", "R2", "K", "C_")]
    assert bdhke.hash_e(*points).hex() == expect.group(1)
    # the deterministic nonce: e and s exactly
    nonce = re.search(
        r"a: +([0-9a-f]{64})\nA: +([0-9a-f]{66})\nB_: ([0-9a-f]{66})\nC_: ([0-9a-f]{66})"
        r".*?e: ([0-9a-f]{64})\ns: ([0-9a-f]{64})",
        doc,
        re.S,
    )
    assert nonce is not None
    a, key, b, c, e, s = nonce.groups()
    assert bdhke.sign(sc(a), pt(b)).format().hex() == c
    assert bdhke.public_key(sc(a)).format().hex() == key
    assert tuple(x.hex() for x in bdhke.prove(sc(a), pt(b))) == (e, s)
    assert bdhke.check(pt(key), pt(b), pt(c), bytes.fromhex(e), bytes.fromhex(s))
    # on a BlindSignature, and on a Proof that carries r
    keys = re.findall(r'A: "([0-9a-f]{66})"', doc)
    sig_b = re.search(r'B_: "([0-9a-f]{66})"', doc)
    assert len(keys) == 2 and sig_b is not None
    blind_sig, proof = json_blocks(doc)
    d = blind_sig["dleq"]
    assert isinstance(d, dict)
    e_b, s_b = bytes.fromhex(d["e"]), bytes.fromhex(d["s"])
    c_ = pt(str(blind_sig["C_"]))
    assert bdhke.check(pt(keys[0]), pt(sig_b.group(1)), c_, e_b, s_b)
    assert not bdhke.check(pt(keys[0]), pt(sig_b.group(1)), c_, e_b, bytes(31) + b"\x01")
    d = proof["dleq"]
    assert isinstance(d, dict)
    args = (pt(keys[1]), str(proof["secret"]).encode(), pt(str(proof["C"])))
    e_p, s_p, r_p = bytes.fromhex(d["e"]), bytes.fromhex(d["s"]), sc(d["r"])
    assert bdhke.check_proof(*args, e_p, s_p, r_p)
    assert not bdhke.check_proof(*args, e_p, s_p, r_p + 1)


def keys_of(block: dict[str, object]) -> dict[int, PublicKey]:
    return parse_keys({str(a): str(k) for a, k in block.items()})


def test_keyset_ids() -> None:
    doc = text("02-tests.md")
    v1, v2 = doc.split("## Version 2")
    ids = re.findall(r"Keyset id: `([0-9a-f]+)`", v1)
    blocks = json_blocks(v1)
    assert len(ids) == len(blocks) == 2
    for kid, block in zip(ids, blocks, strict=True):
        assert keyset_id_v1(keys_of(block)) == kid
    vectors = v2.split("### Vector")[1:]
    assert len(vectors) == 3
    for vector in vectors:
        kid = re.search(r"Keyset id: `([0-9a-f]+)`", vector)
        unit = re.search(r"Unit: `(\w+)`", vector)
        fee = re.search(r"Input fee ppk: `(\d+)`", vector)
        expiry = re.search(r"Final expiry: `(\d+)`", vector)
        assert kid and unit and fee
        keys = keys_of(json_blocks(vector)[0])
        got = keyset_id_v2(
            keys, unit.group(1), int(fee.group(1)), int(expiry.group(1)) if expiry else 0
        )
        assert got == kid.group(1)


def test_malformed_keysets_are_refused_and_good_ones_read() -> None:
    bad1, bad2, good1, good2 = json_blocks(text("01-tests.md"))
    for block in (bad1, bad2):
        with pytest.raises(ValueError):
            parse_keys({str(a): str(k) for a, k in block.items()})
    for block in (good1, good2):
        assert len(parse_keys({str(a): str(k) for a, k in block.items()})) == len(block)
    assert max(parse_keys({str(a): str(k) for a, k in good2.items()})) == 2**63


def test_deterministic_secrets() -> None:
    """NUT-13, both versions: each secret and blinding factor from the wallet's words,
    and the outputs the wallet makes of them."""
    v1, v2 = text("13-tests.md").split("## Version 2")
    keyset, *v1_blocks, paths = json_blocks(v1)
    v1_id = str(keyset["keyset_id"])
    assert int(v1_id, 16) % (2**31 - 1) == keyset["keyest_id_int"]
    assert paths["derivation_path_4"] == str(keyset["derivation_path"]).format(counter=4)
    v2_id = re.search(r"keyset ID `([0-9a-f]+)`", v2)
    assert v2_id is not None
    for kid, blocks in ((v1_id, v1_blocks), (v2_id.group(1), json_blocks(v2))):
        words, secrets, rs = blocks
        seed = seed_of(str(words["mnemonic"]))
        got = [Secret.derived(seed, kid, i) for i in range(5)]
        assert [s.secret for s in got] == [secrets[f"secret_{i}"] for i in range(5)]
        assert [s.r for s in got] == [sc(str(rs[f"r_{i}"])) for i in range(5)]
        outputs, made = derived_outputs([1, 2, 4], kid, seed, 2)
        assert made == got[2:]
        assert [o.B_ for o in outputs] == [s.blinded.format().hex() for s in got[2:]]
        assert [(o.id, o.amount) for o in outputs] == [(kid, 1), (kid, 2), (kid, 4)]
    for unknown in ("02" + "ab" * 32, "9mlfd5vCzgGl"):
        with pytest.raises(ValueError, match="no secrets"):
            Secret.derived(seed, unknown, 0)
