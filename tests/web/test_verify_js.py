"""The browser's verifier (``web/src/verify.js``) against the Python one, on the same
proofs: real checkpoints, transaction and coin proofs and handovers, honest and tampered
every way ``tests/lightclient/test_proofs.py`` tampers them, and cut short or padded. For
each, what Python's verifier says (what it returns, or the code of what it raises) is
written to a file; ``node --test web/test/`` checks that the page's verifier says the
same."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from constellation.errors import ConstellationError
from constellation.guild import Checkpoint
from constellation.keys import SigningKey
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from tests.lightclient.test_proofs import (
    COIN_TAMPERS,
    KEY,
    LEDGERS,
    MEMBERS,
    PIN,
    TX_TAMPERS,
    _flip,
)

WEB = Path(__file__).resolve().parents[2] / "web"
NEXT = SigningKey(b"\x43" * 32)
NEXT_MEMBERS = pf.members_root(2, [("a", b"\x01" * 32), ("b", b"\x02" * 32)])


def said(check: Callable[[], Any]) -> dict[str, Any]:
    """What Python's verifier says: its answer, or the code of its refusal."""
    try:
        return {"ok": check()}
    except ConstellationError as exc:
        return {"error": exc.code}


def placed(p: list[pf.Placed]) -> list[dict[str, Any]]:
    return [
        {
            "owner": x.owner,
            "worker": x.worker,
            "checkpoint": x.checkpoint,
            "height": x.record.height,
            "committed": x.record.committed,
            "fee_msat": x.record.fee_msat,
            "changes": [
                [c.kind.name.lower(), c.coin_id.hex(), c.owner.hex(), c.value_msat, c.ledger.hex()]
                for c in x.record.changes
            ],
        }
        for x in p
    ]


def verdict(v: pf.CoinVerdict) -> dict[str, Any]:
    leaf = v.leaf
    return {
        "checkpoint": v.checkpoint,
        "owner": v.owner,
        "worker": v.worker,
        "leaf": None
        if leaf is None
        else [
            leaf.state.name.lower(),
            leaf.value_msat,
            leaf.owner.hex(),
            leaf.txid.hex(),
            leaf.height,
        ],
    }


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    """The bytes cut short, and with a byte more."""
    return [data[: rng.randrange(len(data))], data + b"\x00"]


def tx_vectors(rng: random.Random) -> list[dict[str, Any]]:
    found = []
    for ledger in LEDGERS.values():
        for txid in sorted(ledger.txs):
            proof = lc.tx_proof(map(lc.held, ledger.signed), txid)
            assert proof is not None
            cases = [("honest", txid, pf.encode_tx_proof(proof))]
            for name, (_, change) in sorted(TX_TAMPERS.items()):
                bad = change(proof)
                if bad.parts:
                    asked = _flip(txid) if name == "subject" else txid
                    cases.append((name, asked, pf.encode_tx_proof(bad)))
            cases += [("cut", txid, b) for b in cut(pf.encode_tx_proof(proof), rng)]
            for name, asked, data in cases:

                def check(d: bytes = data, t: bytes = asked) -> Any:
                    return placed(pf.verify_tx(PIN, pf.decode_tx_proof(d), t))

                found.append(
                    {"case": name, "txid": asked.hex(), "proof": data.hex(), **said(check)}
                )
    return found


def coin_vectors(rng: random.Random) -> list[dict[str, Any]]:
    found = []
    for ledger in LEDGERS.values():
        latest = ledger.signed[-1]
        ids = sorted(ledger.coins)
        for coin_id in [*rng.sample(ids, 6), rng.randbytes(32)]:
            shard = ledger.coins[coin_id][4] if coin_id in ledger.coins else (0, 0)
            proof = lc.coin_proof(latest, shard, coin_id)
            cases = [("honest", coin_id, shard, pf.encode_coin_proof(proof))]
            cases.append(
                ("other shard", coin_id, (1, 1) if shard != (1, 1) else (0, 1), cases[0][3])
            )
            for name, (_, change) in sorted(COIN_TAMPERS.items()):
                if name == "coin leaf" and not proof.path.leaf_key:
                    continue
                cases.append((name, coin_id, shard, pf.encode_coin_proof(change(proof))))
            cases += [("cut", coin_id, shard, b) for b in cut(cases[0][3], rng)]
            for name, cid, where, data in cases:

                def check(d: bytes = data, c: bytes = cid, w: lc.Shard = where) -> Any:
                    return verdict(pf.verify_coin(PIN, pf.decode_coin_proof(d), c, w))

                found.append(
                    {
                        "case": name,
                        "coin_id": cid.hex(),
                        "shard": list(where),
                        "proof": data.hex(),
                        **said(check),
                    }
                )
    return found


def signed(c: Checkpoint, key: SigningKey) -> pf.SignedCheckpoint:
    return pf.SignedCheckpoint(c, key.sign(c.message()))


def handover_vectors() -> dict[str, Any]:
    """A chain handed over at height 3 to NEXT; checkpoints above it, by each key."""
    base = LEDGERS[0].signed[-1].checkpoint.checkpoint
    fields = {f: getattr(base, f) for f in base.__struct_fields__}

    def at(height: int, **kw: Any) -> Checkpoint:
        return Checkpoint(**{**fields, "height": height, **kw})

    handover = signed(at(3, next_key=bytes(NEXT.pubkey), next_members=NEXT_MEMBERS), KEY)
    pin = PIN.follow(handover)
    above = {
        "new key": signed(at(4, members=NEXT_MEMBERS), NEXT),
        "old key": signed(at(4, members=NEXT_MEMBERS), KEY),
        "old members": signed(at(4), NEXT),
        "below, old key": signed(at(2), KEY),
    }
    no_key = signed(at(5, members=NEXT_MEMBERS), NEXT)

    def height(s: pf.SignedCheckpoint) -> dict[str, Any]:
        return said(lambda: pf.verify_checkpoint(pin, s).height)

    return {
        "handover": handover.encode().hex(),
        "follow twice": said(lambda: len(pin.follow(handover).handovers)),
        "hands over to no key": said(lambda: len(pin.follow(no_key).handovers)),
        "no_key": no_key.encode().hex(),
        "checkpoints": [
            {
                "case": name,
                "signed": s.encode().hex(),
                **height(s),
            }
            for name, s in above.items()
        ],
    }


def vectors() -> dict[str, Any]:
    rng = random.Random(7)
    descriptor = pf.Descriptor(PIN, bytes(range(32))).encode()
    announced = []
    for ledger in LEDGERS.values():
        for held in map(lc.held, ledger.signed):
            data = Announced(held.checkpoint, held.entries).encode()
            forged = Announced(
                held.checkpoint._replace(sig=_flip(held.checkpoint.sig, 9)), held.entries
            ).encode()
            for name, d in (
                ("honest", data),
                ("signature", forged),
                *(("cut", b) for b in cut(data, rng)),
            ):

                def check(d: bytes = d) -> Any:
                    return pf.verify_checkpoint(PIN, Announced.decode(d).signed).height

                announced.append(
                    {"case": name, "encoded": d.hex(), "entries": len(held.entries), **said(check)}
                )
    return {
        "pin": {"guild": PIN.guild, "key": PIN.key.hex(), "members": PIN.members.hex()},
        "members_root": {
            "threshold": 2,
            "members": [["a", "01" * 32], ["b", "02" * 32], ["c", "03" * 32]],
            "root": MEMBERS.hex(),
        },
        "descriptor": {"text": descriptor, "first": bytes(range(32)).hex()},
        "bad_descriptors": [
            descriptor[:-1] + ("q" if descriptor[-1] != "q" else "p"),
            descriptor.upper()[:-3] + "abc",
        ],
        "announced": announced,
        "tx": tx_vectors(rng),
        "coin": coin_vectors(rng),
        "handover": handover_vectors(),
    }


def test_the_pages_verifier_says_what_the_python_one_says(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is installed by scripts/setup"
    assert (WEB / "node_modules").is_dir(), "web/node_modules: run scripts/setup"
    doc = vectors()
    assert any("error" in v for v in doc["tx"]) and any("ok" in v for v in doc["tx"])
    assert {v["error"] for v in doc["tx"] if "error" in v} >= {
        "proof.checkpoint_signature",
        "proof.members",
        "proof.guild",
        "proof.entry_path",
        "proof.record_path",
        "proof.subject",
        "malformed.truncated",
        "malformed.trailing_bytes",
    }
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run(
        [node, "--test", "test/"],
        cwd=WEB,
        env={**os.environ, "CST_VECTORS": str(path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout
