"""The browser's verifier (``web/src/verify.js``) against the Python one, on the same
bytes: real checkpoints, handovers, announced checkpoints, transaction and coin proofs and
descriptors, honest and tampered every way ``tests/lightclient/test_proofs.py`` tampers
them, cut short, padded, and changed a byte at a time at random. For each, what Python's
verifier says (its answer, or the code of what it raises) is written to a file, and
``node --test web/test/verify.test.mjs`` checks that the page's verifier says the same
(the file named: from Node 21 on, ``node --test`` reads its arguments as globs, and a
directory's name matches no test file).

Answers are written as JSON the way ``web/test/verify.test.mjs`` writes the page's:
fields by their Python names, bytes as hex, integers as decimal strings (exact past
2**53), enums by name. Each kind of vector has a function here that answers it with the
Python verifier (``*_answer``), as verify.test.mjs's ``ANSWER`` does with the page's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec
import pytest

from constellation.address import _convert_bits, bech32m_encode, encode_address, encode_bytes
from constellation.codec import u16, u64
from constellation.errors import ConstellationError
from constellation.guild import Checkpoint
from constellation.keys import SigningKey
from constellation.ledger.pmap import PartitionMap
from constellation.lightclient import checkpointer as ck
from constellation.lightclient import index as lc
from constellation.lightclient import merkle, smt
from constellation.lightclient import proof as pf
from constellation.protocol.ledger import BlockEvents, CoinChange, Commit
from constellation.tx import partition_of
from tests.lightclient.test_proofs import (
    COIN_TAMPERS,
    KEY,
    LEDGERS,
    MEMBERS,
    PIN,
    TX_TAMPERS,
    _flip,
)

ROOT = Path(__file__).resolve().parents[2]
NEXT = SigningKey(b"\x43" * 32)  # the key the big ledger's checkpoints are handed over to
NEXT_MEMBERS = pf.members_root(2, [("a", b"\x01" * 32), ("b", b"\x02" * 32)])
THIRD = SigningKey(b"\x44" * 32)
OTHER = SigningKey(b"\x45" * 32)
ODD_GUILD = "\ufeffgilde-ü"  # a BOM is part of a guild's name, never dropped
BIG_SHARDS = [(0, 0), (0, 1), (1, 0)]
U64_MAX = 2**64 - 1
MUTATIONS = 24  # random one-byte changes of each proof that gets them
# every code that a light client's checks raise: the vectors hold a refusal of each
CODES = {
    "malformed",
    "malformed.truncated",
    "malformed.trailing_bytes",
    "malformed.version",
    "malformed.count",
    "malformed.address",
    "proof.guild",
    "proof.members",
    "proof.checkpoint_signature",
    "proof.handover",
    "proof.stale",
    "proof.entry_path",
    "proof.record_path",
    "proof.coin_path",
    "proof.subject",
    "proof.unconfirmed",
}


def plain(x: Any) -> Any:
    """An answer of the Python verifier as the vectors write it."""
    if x is None or isinstance(x, bool | str):
        return x
    if isinstance(x, int):
        return str(x)
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, Enum):
        return x.name.lower()
    if isinstance(x, msgspec.Struct):
        return {f: plain(getattr(x, f)) for f in x.__struct_fields__}
    if isinstance(x, tuple) and hasattr(x, "_asdict"):
        return {k: plain(v) for k, v in x._asdict().items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    raise TypeError(f"no JSON for {type(x).__name__}")


class Vectors:
    """The pins the vectors name, and the vectors: each its kind, a case name, its
    inputs, and what Python's verifier said."""

    def __init__(self) -> None:
        self.pins: dict[str, pf.Pin] = {}
        self.vectors: list[dict[str, Any]] = []

    def pin(self, name: str, pin: pf.Pin) -> str:
        self.pins[name] = pin
        return name

    def add(
        self, kind: str, case: str, inputs: dict[str, Any], answer: Callable[..., Any], *args: Any
    ) -> None:
        """One vector, ``answer(*args)`` the Python verifier's answer (only a
        ``ConstellationError`` is a refusal: anything else it raises fails the test)."""
        try:
            said: dict[str, Any] = {"ok": plain(answer(*args))}
        except ConstellationError as exc:
            said = {"error": exc.code}
        self.vectors.append({"kind": kind, "case": case, **inputs, **said})

    def doc(self) -> dict[str, Any]:
        pins = {
            name: {
                "guild": p.guild,
                "key": p.key.hex(),
                "members": p.members.hex(),
                "handovers": [h.encode().hex() for h in p.handovers],
            }
            for name, p in self.pins.items()
        }
        return {"pins": pins, "vectors": self.vectors}


def mutations(data: bytes, rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """``data`` cut short, with a byte more, and changed ``n`` ways at random: a byte
    changed (to another value, or to 0, 1 or 255), dropped or added."""
    yield "cut short", data[: rng.randrange(len(data))]
    yield "a byte more", data + bytes([rng.randrange(256)])
    for _ in range(n):
        i = rng.randrange(len(data))
        how = rng.randrange(4)
        if how == 0:
            new = data[i] ^ rng.randrange(1, 256)
            yield f"byte {i} changed", data[:i] + bytes([new]) + data[i + 1 :]
        elif how == 1:
            value = rng.choice([0, 1, 255])
            yield f"byte {i} set to {value}", data[:i] + bytes([value]) + data[i + 1 :]
        elif how == 2:
            yield f"byte {i} dropped", data[:i] + data[i + 1 :]
        else:
            yield f"a byte added at {i}", data[:i] + bytes([rng.randrange(256)]) + data[i:]


def signed(c: Checkpoint, key: SigningKey) -> pf.SignedCheckpoint:
    return pf.SignedCheckpoint(c, key.sign(c.message(), bytes(32)))


def replaced(c: Checkpoint, **fields: Any) -> Checkpoint:
    return msgspec.structs.replace(c, **fields)


class Big:
    """A guild whose u64s are past 2**53 (heights, values, fees and times near 2**64),
    through three checkpoints: 0, and 1 handing over to NEXT and NEXT_MEMBERS, signed by
    KEY; 2 signed by NEXT. Transaction ``spanning`` has records under checkpoints 1 and 2
    (its commit under 2), ``paid`` (with an output paid out) under 1, and the issuances
    ``issued`` under 0."""

    def __init__(self) -> None:
        rng = self.rng = random.Random(11)
        self.index = lc.GuildIndex(PIN.guild, MEMBERS, BIG_SHARDS)
        self.heights = {(0, 0): 2**62, (0, 1): 2**63 + 1, (1, 0): U64_MAX - 100}
        self.last = dict.fromkeys(BIG_SHARDS, -1)
        self.signed: list[lc.Signed] = []
        self.coins: dict[bytes, lc.Shard] = {}
        self.issued: list[bytes] = []
        for n, shard in enumerate(BIG_SHARDS):
            iid = rng.randbytes(32)
            self.block(shard, [self.coin(iid, shard, U64_MAX - n - k) for k in range(3)], iid, 0)
            self.issued.append(iid)
        self.sign(U64_MAX - 10, KEY)
        self.spanning = rng.randbytes(32)
        spent = next(c for c, s in self.coins.items() if s == (1, 0))
        self.block((1, 0), [self.spend(self.spanning, spent, 2**63)])
        self.block((0, 1), [self.coin(self.spanning, (0, 1), 2**62 + 1)])
        self.paid = rng.randbytes(32)
        inputs = [c for c, s in self.coins.items() if s == (0, 0)][:2]
        changes = [self.spend(self.paid, c, 2**63) for c in inputs]
        changes += [
            self.coin(self.paid, (0, 0), 2**53 + 1),
            CoinChange(self.paid, rng.randbytes(32), rng.randbytes(32), 2**60, True, b"l" * 8),
        ]
        self.block((0, 0), changes, self.paid, U64_MAX)
        self.block((1, 0), [self.coin(self.paid, (1, 0), 2**54 + 3)])
        self.sign(U64_MAX - 5, KEY, (bytes(NEXT.pubkey), NEXT_MEMBERS))
        self.block((0, 0), [], self.spanning, 2**63 + 7)
        self.sign(U64_MAX, NEXT)

    def coin(self, txid: bytes, shard: lc.Shard, value: int) -> CoinChange:
        coin_id = self.rng.randbytes(32)
        self.coins[coin_id] = shard
        return CoinChange(txid, coin_id, self.rng.randbytes(32), value, True)

    def spend(self, txid: bytes, coin_id: bytes, value: int) -> CoinChange:
        return CoinChange(txid, coin_id, self.rng.randbytes(32), value, False)

    def block(
        self, shard: lc.Shard, changes: list[CoinChange], commit: bytes = b"", fee: int = 0
    ) -> None:
        """The shard's next block, with ``changes`` and the commit of ``commit``."""
        height = self.heights[shard] = self.heights[shard] + self.rng.randint(1, 9)
        committed = [Commit(commit, fee)] if commit else []
        block, root = self.rng.randbytes(32), self.rng.randbytes(32)
        events = BlockEvents(shard[1], height, self.last[shard], changes, committed, block, root)
        self.index.apply(shard[0], events)
        self.last[shard] = height

    def sign(
        self, time_ms: int, key: SigningKey, handover: tuple[bytes, bytes] | None = None
    ) -> None:
        checkpoint, entries = self.index.propose(time_ms, handover)
        self.signed.append(self.index.signed(signed(checkpoint, key), entries))


# -- each kind of vector, and the Python verifier's answer ------------------------------------


def descriptor_vector(out: Vectors, case: str, text: str) -> None:
    out.add("descriptor", case, {"text": text}, pf.Descriptor.decode, text)


def checkpoint_answer(pin: pf.Pin, data: bytes, not_below: int) -> dict[str, Any]:
    c = pf.verify_checkpoint(pin, pf.SignedCheckpoint.decode(data), not_below)
    return {"checkpoint": c, "message": c.message()}


def checkpoint_vector(out: Vectors, case: str, pin: str, data: bytes, not_below: int = 0) -> None:
    inputs = {"pin": pin, "signed": data.hex(), "not_below": str(not_below)}
    out.add("checkpoint", case, inputs, checkpoint_answer, out.pins[pin], data, not_below)


def follow_answer(pin: pf.Pin, data: bytes, heights: list[int]) -> dict[str, Any]:
    new = pin.follow(pf.SignedCheckpoint.decode(data))
    return {"pin": new, "at": [new.at(h) for h in heights]}


def follow_vector(out: Vectors, case: str, pin: str, data: bytes) -> None:
    heights = [0, 1, 2, 3, U64_MAX]
    inputs = {"pin": pin, "signed": data.hex(), "heights": [str(h) for h in heights]}
    out.add("follow", case, inputs, follow_answer, out.pins[pin], data, heights)


def announced_answer(
    pin: pf.Pin, data: bytes, not_below: int, records: dict[int, list[bytes]]
) -> dict[str, Any]:
    """The checkpoint verified, and its entries checked as ``verify_filled`` checks
    another member's (with the records that the entries honestly cover)."""
    announced = ck.Announced.decode(data)
    checkpoint = pf.verify_checkpoint(pin, announced.signed, not_below)
    ck.verify_filled(pin, ck.Filled(announced, records))
    return {"checkpoint": checkpoint, "entries": announced.entries}


def announced_vector(
    out: Vectors, case: str, pin: str, data: bytes, held: lc.Held, not_below: int = 0
) -> None:
    inputs = {"pin": pin, "encoded": data.hex(), "not_below": str(not_below)}
    out.add(
        "announced", case, inputs, announced_answer, out.pins[pin], data, not_below, held.records
    )


def tx_answer(pin: pf.Pin, data: bytes, txid: bytes) -> list[pf.Placed]:
    return pf.verify_tx(pin, pf.decode_tx_proof(data), txid)


def tx_vector(out: Vectors, case: str, pin: str, txid: bytes, data: bytes) -> None:
    inputs = {"pin": pin, "txid": txid.hex(), "proof": data.hex()}
    out.add("tx", case, inputs, tx_answer, out.pins[pin], data, txid)


def coin_answer(
    pin: pf.Pin, data: bytes, coin_id: bytes, shard: lc.Shard, not_below: int
) -> pf.CoinVerdict:
    return pf.verify_coin(pin, pf.decode_coin_proof(data), coin_id, shard, not_below)


def coin_vector(
    out: Vectors,
    case: str,
    pin: str,
    coin_id: bytes,
    shard: lc.Shard,
    data: bytes,
    not_below: int = 0,
) -> None:
    inputs = {
        "pin": pin,
        "coin_id": coin_id.hex(),
        "shard": list(shard),
        "proof": data.hex(),
        "not_below": str(not_below),
    }
    out.add("coin", case, inputs, coin_answer, out.pins[pin], data, coin_id, shard, not_below)


def worker_of(coin_id: bytes, workers: int) -> int:
    """The worker that holds a coin by the even partition map of ``workers`` workers."""
    p = partition_of(coin_id)
    return next(w for w, lo, hi in PartitionMap.even(workers).ranges if lo <= p < hi)


# -- the vectors ----------------------------------------------------------------------------


def descriptor_vectors(out: Vectors) -> None:
    first = bytes(range(32))
    text = pf.Descriptor(PIN, first).encode()
    hrp = pf.DESCRIPTOR_HRP
    data = bytes([pf.VERSION, 5]) + b"guild" + PIN.key + PIN.members + first
    words = _convert_bits(data, 8, 5, True)
    odd = pf.Descriptor(pf.Pin(ODD_GUILD, PIN.key, PIN.members), first).encode()
    texts = {
        "honest": text,
        "upper case": text.upper(),
        "with spaces around": f" \n{text}\t ",
        "with Python's other whitespace around": f"\x1c\x85{text}\u3000",
        "after a BOM": f"\ufeff{text}",
        "a typo": text[:-1] + ("q" if text[-1] != "q" else "p"),
        "mixed case": text[:10].upper() + text[10:],
        "another prefix": encode_bytes("cstguilt", data),
        "too long": encode_bytes(hrp, data * 3),
        "non-zero padding": bech32m_encode(hrp, [*words[:-1], words[-1] | 1]),
        "version 2": encode_bytes(hrp, b"\x02" + data[1:]),
        "cut short": encode_bytes(hrp, data[:-1]),
        "a byte more": encode_bytes(hrp, data + b"\x00"),
        "no guild name": encode_bytes(hrp, b"\x01\x00" + data[7:]),
        "a guild name not UTF-8": encode_bytes(hrp, b"\x01\x05guil\xff" + data[7:]),
        "a guild name with a BOM": odd,
        "not bech32m": "cstguild1",
    }
    for case, t in texts.items():
        descriptor_vector(out, case, t)


def small_vectors(out: Vectors, rng: random.Random) -> None:
    """The commitments and encodings that a page computes itself."""
    sets = [
        (2, [("a", b"\x01" * 32), ("b", b"\x02" * 32), ("c", b"\x03" * 32)]),
        (1, [("ünïcode", bytes(KEY.pubkey))]),
        (0, []),
    ]
    for t, members in sets:
        inputs = {"threshold": t, "members": [[name, key.hex()] for name, key in members]}
        out.add("members_root", f"{t} of {len(members)}", inputs, pf.members_root, t, members)
    for n in range(3):
        block, root = rng.randbytes(32), rng.randbytes(32)
        inputs = {"block": block.hex(), "root": root.hex()}
        out.add("block_state", f"block {n}", inputs, pf.block_state, block, root)
    keys = {
        "a key": bytes(KEY.pubkey),
        "another": bytes(NEXT.pubkey),
        "x = 0": bytes(32),
        "x >= p": b"\xff" * 32,
        "31 bytes": bytes(KEY.pubkey)[:31],
    }
    for case, key in keys.items():
        for hrp in ("cst", "tcst", "rcst"):
            inputs = {"key": key.hex(), "hrp": hrp}
            out.add("address", f"{case} on {hrp}", inputs, encode_address, key, hrp)
    for workers in (1, 2, 3, 7, 255, 2**16):
        for _ in range(8):
            coin_id = rng.randbytes(32)
            inputs = {"coin_id": coin_id.hex(), "workers": workers}
            out.add("shard_of", f"{workers} workers", inputs, worker_of, coin_id, workers)


def checkpoint_vectors(out: Vectors, big: Big, followed: str) -> None:
    """The big ledger's checkpoints around its handover, each signed by either key, under
    a pin that followed the handover or not; odd ones; one changed at random."""
    sc = [s.checkpoint for s in big.signed]
    c = [s.checkpoint for s in sc]
    top = replaced(c[0], height=U64_MAX, time_ms=U64_MAX)
    odd = out.pin("a guild name with a BOM", pf.Pin(ODD_GUILD, PIN.key, PIN.members))
    cases = [
        ("0", followed, sc[0], 0),
        ("0, stale", followed, sc[0], 1),
        ("1, the handover", followed, sc[1], 1),
        ("2, by the new key", followed, sc[2], 2),
        ("2, stale", followed, sc[2], U64_MAX),
        ("2, the handover not followed", "pinned", sc[2], 0),
        ("2, by the old key", followed, signed(c[2], KEY), 0),
        ("2, naming the old members", followed, signed(replaced(c[2], members=MEMBERS), NEXT), 0),
        ("0, by the new key", followed, signed(c[0], NEXT), 0),
        ("1, by the new key", followed, signed(c[1], NEXT), 0),
        ("the top height", "pinned", signed(top, KEY), U64_MAX),
        ("the top height, after the handover", followed, signed(top, KEY), 0),
        ("a guild name with a BOM", odd, signed(replaced(c[0], guild=ODD_GUILD), KEY), 0),
        ("another guild's name", "pinned", signed(replaced(c[0], guild=ODD_GUILD), KEY), 0),
        ("another key pinned", "another key", sc[0], 0),
        ("another guild pinned", "another guild", sc[0], 0),
        ("a signature flipped", "pinned", sc[0]._replace(sig=_flip(sc[0].sig, 40)), 0),
    ]
    for case, pin, s, not_below in cases:
        checkpoint_vector(out, case, pin, s.encode(), not_below)
    data = sc[1].encode()
    flag = 1 + len(PIN.guild) + 8 + 32 + 8 + 32 + 32
    checkpoint_vector(
        out, "a handover flag of 2", "pinned", data[:flag] + b"\x02" + data[flag + 1 :]
    )
    checkpoint_vector(out, "no handover flag", "pinned", data[:flag])
    for case, d in mutations(data, random.Random(3), MUTATIONS):
        checkpoint_vector(out, f"the handover: {case}", "pinned", d)


def follow_vectors(out: Vectors, big: Big, followed: str) -> None:
    """Handovers followed (the new pin, and the key and members it names at some heights)
    or refused."""
    handover = big.signed[1].checkpoint
    c = [s.checkpoint.checkpoint for s in big.signed]
    onward = replaced(c[2], next_key=bytes(THIRD.pubkey), next_members=MEMBERS)
    below = replaced(onward, height=0, members=MEMBERS)
    cases = [
        ("the handover", "pinned", handover),
        ("the handover again", followed, handover),
        ("a checkpoint handing over to no key", "pinned", big.signed[0].checkpoint),
        ("a handover's signature flipped", "pinned", handover._replace(sig=_flip(handover.sig, 3))),
        ("the handover signed by the new key", "pinned", signed(c[1], NEXT)),
        ("the next handover", followed, signed(onward, NEXT)),
        ("the next handover, the first not followed", "pinned", signed(onward, NEXT)),
        ("a handover below the last", followed, signed(below, KEY)),
        ("a handover of another guild", "another guild", handover),
    ]
    for case, pin, s in cases:
        follow_vector(out, case, pin, s.encode())


def announced_vectors(out: Vectors, ledgers: list[tuple[str, str, list[lc.Signed]]]) -> None:
    """Checkpoints with their entries, as the gateway serves them; tampered entries."""
    rng = random.Random(5)
    for name, pin, signed_list in ledgers:
        for s in signed_list:
            held = lc.held(s)
            sc, entries = held.checkpoint, held.entries
            at = f"{name} checkpoint {sc.checkpoint.height}"
            honest = ck.Announced(sc, entries).encode()
            moved = [entries[0]._replace(height=entries[0].height + 1), *entries[1:]]
            forged = sc._replace(sig=_flip(sc.sig, 9))
            too_many = (pf.MAX_SHARDS + 1).to_bytes(2)
            announced_vector(out, f"{at}: honest", pin, honest, held)
            announced_vector(out, f"{at}: stale", pin, honest, held, sc.checkpoint.height + 1)
            cases = [
                ("a signature flipped", ck.Announced(forged, entries).encode()),
                ("an entry moved", ck.Announced(sc, moved).encode()),
                ("entries swapped", ck.Announced(sc, entries[::-1]).encode()),
                ("an entry left out", ck.Announced(sc, entries[:-1]).encode()),
                ("no entries", sc.encode() + b"\x00\x00"),
                ("too many entries", sc.encode() + too_many),
                *mutations(honest, rng, MUTATIONS // 2),
            ]
            for case, data in cases:
                announced_vector(out, f"{at}: {case}", pin, data, held)


def edited(data: bytes, at: int, new: bytes) -> bytes:
    """``data`` with the bytes at ``at`` replaced by ``new``."""
    return data[:at] + new + data[at + len(new) :]


def tx_edits(proof: pf.TxProof) -> list[tuple[str, bytes]]:
    """A transaction proof's counts out of their range; its first record shorter than a
    height (and the proof cut there, so that a reader that goes on says otherwise)."""
    data = pf.encode_tx_proof(proof)
    parts = 34 + sum(len(c.encode()) for c in proof.checkpoints)
    record = parts + 2 + len(proof.parts[0].entry.encode())
    return [
        ("no checkpoints", edited(data, 33, b"\x00")),
        ("17 checkpoints", edited(data, 33, bytes([pf.MAX_PROOF_CHECKPOINTS + 1]))),
        ("no parts", edited(data, parts, b"\x00")),
        ("65 parts", edited(data, parts, bytes([pf.MAX_PARTS + 1]))),
        ("a record of 7 bytes", data[:record] + u16(7) + data[record + 2 : record + 9]),
    ]


def coin_edits(proof: pf.CoinProof) -> list[tuple[str, bytes]]:
    """A coin proof's path deeper than a key, with bits set past its depth, with an
    unknown end, or a leaf longer than the proof."""
    data = pf.encode_coin_proof(proof)
    path = proof.path
    at = 33 + len(proof.checkpoint.encode()) + len(proof.entry.encode())
    present = (len(path.siblings) + 7) // 8
    end = at + 2 + present + 32 * sum(h != smt.EMPTY for h in path.siblings)
    edits = [
        ("257 deep", data[:at] + u16(smt.KEY_BITS + 1)),  # cut there, as a record above
        ("an unknown end of path", edited(data, end, b"\x02")),
    ]
    if len(path.siblings) % 8:
        last = at + 2 + present - 1
        edits.append(("a bit past its depth", edited(data, last, bytes([data[last] | 0x80]))))
    if path.leaf_key:
        longer = u16(len(path.leaf_value) + 1)
        edits.append(("a leaf longer than the proof", edited(data, end + 33, longer)))
    return edits


def tx_vectors(out: Vectors, big: Big, followed: str) -> None:
    """Every transaction's proof of the ledgers of test_proofs.py, honest and tampered
    (the first 8 of each also changed at random); the big ledger's."""
    rng = random.Random(7)
    for seed, ledger in LEDGERS.items():
        for n, txid in enumerate(sorted(ledger.txs)):
            proof = lc.tx_proof(map(lc.held, ledger.signed), txid)
            assert proof is not None
            honest = pf.encode_tx_proof(proof)
            at = f"ledger {seed} tx {n}"
            tx_vector(out, f"{at}: honest", "pinned", txid, honest)
            for pin in ("another key", "another guild"):
                tx_vector(out, f"{at}: {pin} pinned", pin, txid, honest)
            for tamper, (_, change) in sorted(TX_TAMPERS.items()):
                bad = change(proof)
                asked = _flip(txid) if tamper == "subject" else txid  # another txid asked
                if bad.parts:  # "no commit" leaves none where the commit was all
                    tx_vector(out, f"{at}: {tamper}", "pinned", asked, pf.encode_tx_proof(bad))
            part = proof.parts[0]._replace(checkpoint=len(proof.checkpoints))
            lacking = pf.encode_tx_proof(proof._replace(parts=[part]))
            tx_vector(out, f"{at}: a part under no checkpoint", "pinned", txid, lacking)
            tx_vector(out, f"{at}: version 9", "pinned", txid, b"\x09" + honest[1:])
            for case, data in tx_edits(proof):
                tx_vector(out, f"{at}: {case}", "pinned", txid, data)
            for case, data in mutations(honest, rng, MUTATIONS if n < 8 else 0):
                tx_vector(out, f"{at}: {case}", "pinned", txid, data)
    held = [lc.held(s) for s in big.signed]
    txids = [("spanning", big.spanning), ("paid", big.paid)]
    txids += [(f"issuance {n}", iid) for n, iid in enumerate(big.issued)]
    for name, txid in txids:
        proof = lc.tx_proof(held, txid)
        assert proof is not None
        honest = pf.encode_tx_proof(proof)
        for pin in (followed, "pinned"):
            tx_vector(out, f"big {name}: {pin}", pin, txid, honest)
        for case, data in mutations(honest, rng, MUTATIONS // 2):
            tx_vector(out, f"big {name}: {case}", followed, txid, data)


def absent(rng: random.Random, signed: lc.Signed, coins: dict[bytes, Any], leaf: bool) -> bytes:
    """An id of no coin whose path in shard 0/0 ends at another coin's leaf (or, not
    ``leaf``, in an empty subtree)."""
    while True:
        coin_id = rng.randbytes(32)
        path = lc.coin_proof(signed, (0, 0), coin_id).path
        if coin_id not in coins and bool(path.leaf_key) == leaf:
            return coin_id


def coin_vectors(out: Vectors, big: Big, followed: str) -> None:
    """Coin proofs of coins unspent, spent and absent (another leaf, or nothing, in their
    place), honest, tampered and changed at random; the big ledger's coins."""
    rng = random.Random(9)
    for seed, ledger in LEDGERS.items():
        latest = ledger.signed[-1]
        height = latest.checkpoint.checkpoint.height
        chosen = [
            (f"{state.name.lower()} {k}", coin_id)
            for state in pf.CoinState
            for k, coin_id in enumerate(
                sorted(c for c, v in ledger.coins.items() if v[0] is state)[:2]
            )
        ]
        chosen += [
            ("absent, a leaf in its place", absent(rng, latest, ledger.coins, True)),
            ("absent, nothing in its place", absent(rng, latest, ledger.coins, False)),
        ]
        for what, coin_id in chosen:
            at = f"ledger {seed} {what}"
            shard = ledger.coins[coin_id][4] if coin_id in ledger.coins else (0, 0)
            other = (1, 1) if shard != (1, 1) else (0, 1)
            proof = lc.coin_proof(latest, shard, coin_id)
            honest = pf.encode_coin_proof(proof)
            there = pf.encode_coin_proof(lc.coin_proof(latest, other, coin_id))
            coin_vector(out, f"{at}: honest", "pinned", coin_id, shard, honest)
            coin_vector(out, f"{at}: not below {height}", "pinned", coin_id, shard, honest, height)
            coin_vector(out, f"{at}: stale", "pinned", coin_id, shard, honest, height + 1)
            coin_vector(out, f"{at}: another shard asked", "pinned", coin_id, other, honest)
            coin_vector(out, f"{at}: from another shard", "pinned", coin_id, shard, there)
            coin_vector(out, f"{at}: another key pinned", "another key", coin_id, shard, honest)
            for tamper, (_, change) in sorted(COIN_TAMPERS.items()):
                if tamper != "coin leaf" or proof.path.leaf_key:
                    data = pf.encode_coin_proof(change(proof))
                    coin_vector(out, f"{at}: {tamper}", "pinned", coin_id, shard, data)
            for case, data in [*coin_edits(proof), *mutations(honest, rng, MUTATIONS)]:
                coin_vector(out, f"{at}: {case}", "pinned", coin_id, shard, data)
        ids = sorted(ledger.coins)
        a, b = ids[0], ids[-1]  # first bits differ: b's leaf is not on a's path
        shard = ledger.coins[b][4]
        off = pf.encode_coin_proof(lc.coin_proof(latest, shard, b)._replace(coin_id=a))
        coin_vector(out, f"ledger {seed}: a leaf off the path", "pinned", a, shard, off)
    latest = big.signed[-1]
    chosen = [(f"coin {n}", c) for n, c in enumerate(big.coins)]
    chosen.append(("absent", absent(rng, latest, big.coins, True)))
    for what, coin_id in chosen:
        shard = big.coins.get(coin_id, (0, 0))
        honest = pf.encode_coin_proof(lc.coin_proof(latest, shard, coin_id))
        for pin in (followed, "pinned"):
            coin_vector(out, f"big {what}: {pin}", pin, coin_id, shard, honest)
        coin_vector(out, f"big {what}: not below 2", followed, coin_id, shard, honest, 2)


def forged_vectors(out: Vectors) -> None:
    """Proofs under a checkpoint that the guild key signed over entries made by hand, whose
    records and coin trees hold what no honest index makes: the checks that only bytes
    under a valid signature reach (a record or a coin leaf that does not decode, a record
    above its entry, a leaf shown where a tree of two equal halves lets it pass for
    another coin's)."""
    rng = random.Random(13)
    txid, coin_id, owner = rng.randbytes(32), rng.randbytes(32), rng.randbytes(32)
    height = 2**60
    created = b"\x01" + coin_id + owner + u64(7)

    def record(committed: int = 1, changes: bytes = u16(0), at: int = height) -> bytes:
        return u64(at) + txid + bytes([committed]) + u64(5) + changes

    records = {
        "its entry's height": record(),
        "a coin paid out": record(changes=u16(1) + b"\x02" + coin_id + owner + u64(9) + b"L" * 8),
        "committed 2": record(committed=2),
        "a change of an unknown kind": record(changes=u16(1) + b"\x03" + created[1:]),
        "1025 changes": record(changes=u16(pf.MAX_CHANGES + 1) + created),
        "a change cut short": record(changes=u16(1) + created[:-1]),
        "a byte more": record(changes=u16(1) + created + b"\x00"),
        "above its entry": record(at=height + 1),
    }
    tree = merkle.MerkleTree(list(records.values()))
    # coins: two equal halves (leaf ``twin`` on both sides), and leaves that do not decode
    twin = rng.randbytes(32)
    twin_value = pf.CoinLeaf(pf.CoinState.UNSPENT, 3, owner, txid, height).encode()
    half = smt.leaf_hash(twin, twin_value)
    leaves = {
        "a leaf of state 2": b"\x02" + twin_value[1:],
        "a leaf cut short": twin_value[:-1],
        "a leaf with a byte more": twin_value + b"\x00",
        "an honest leaf": twin_value,
    }
    keyed = {case: rng.randbytes(32) for case in leaves}
    tree_of_leaves = smt.apply(None, [(keyed[case], value) for case, value in leaves.items()])
    # a records tree of 2**31 + 1 (its sizes and positions past a signed 32-bit integer):
    # its last record is under the root, beside the hash of the 2**31 before it
    first_half = rng.randbytes(32)
    last = 2**31
    huge = merkle.node_hash(first_half, merkle.leaf_hash(record()))
    state = pf.block_state(rng.randbytes(32), rng.randbytes(32))
    entries = [
        pf.ShardEntry(0, 0, height, tree.size, tree.root(), smt.EMPTY, state),
        pf.ShardEntry(0, 1, height, 0, merkle.EMPTY_ROOT, smt.node_hash(half, half), state),
        pf.ShardEntry(1, 0, height, 0, merkle.EMPTY_ROOT, smt.root_hash(tree_of_leaves), state),
        pf.ShardEntry(1, 1, height, last + 1, huge, smt.EMPTY, state),
    ]
    shards = pf.shards_tree(entries)
    checkpoint = Checkpoint(PIN.guild, 7, rng.randbytes(32), 1, shards.root(), MEMBERS)
    sc = signed(checkpoint, KEY)

    def tx(case: str, at: int, data: bytes, position: int, path: list[bytes]) -> None:
        """The proof of ``data``, record ``position`` of the entry at ``at``."""
        entry = pf.EntryProof(entries[at], at, shards.size, shards.path(at))
        part = pf.TxPart(0, entry, data, position, path)
        proof = pf.encode_tx_proof(pf.TxProof(txid, [sc], [part]))
        tx_vector(out, f"forged: {case}", "pinned", txid, proof)

    def coin(case: str, at: int, key: bytes, path: smt.Path) -> None:
        """The proof of coin ``key`` by ``path`` in the coin tree of the entry at ``at``."""
        entry = pf.EntryProof(entries[at], at, shards.size, shards.path(at))
        proof = pf.encode_coin_proof(pf.CoinProof(key, sc, entry, path))
        shard = (entries[at].owner, entries[at].worker)
        coin_vector(out, f"forged: {case}", "pinned", key, shard, proof)

    for i, (case, data) in enumerate(records.items()):
        tx(case, 0, data, i, tree.path(i))
    tx("record 2**31 of 2**31 + 1", 3, record(), last, [first_half])
    tx("record 2**31 of 2**31 + 1, at another position", 3, record(), last - 1, [first_half])
    for case, key in keyed.items():
        coin(case, 2, key, smt.prove(tree_of_leaves, key))
    beside = smt.Path([half], twin, twin_value)
    coin("the leaf of two equal halves", 1, twin, beside)
    coin("another coin on that leaf's side", 1, bytes([twin[0]]) + rng.randbytes(31), beside)
    coin("another coin on the other side", 1, bytes([twin[0] ^ 0x80]) + rng.randbytes(31), beside)


def vectors() -> dict[str, Any]:
    out = Vectors()
    big = Big()
    out.pin("pinned", PIN)
    followed = out.pin("handover followed", PIN.follow(big.signed[1].checkpoint))
    out.pin("another key", PIN._replace(key=bytes(OTHER.pubkey)))
    out.pin("another guild", PIN._replace(guild="other"))
    descriptor_vectors(out)
    small_vectors(out, random.Random(1))
    checkpoint_vectors(out, big, followed)
    follow_vectors(out, big, followed)
    ledgers = [(f"ledger {seed}", "pinned", ledger.signed) for seed, ledger in LEDGERS.items()]
    announced_vectors(out, [*ledgers, ("big", followed, big.signed)])
    tx_vectors(out, big, followed)
    coin_vectors(out, big, followed)
    forged_vectors(out)
    return out.doc()


def test_the_pages_verifier_says_what_the_python_one_says(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (ROOT / "web" / "node_modules").is_dir():
        pytest.skip("web/node_modules is missing (npm ci in web/)")
    doc = vectors()
    refused = {v["error"] for v in doc["vectors"] if "error" in v}
    assert refused == CODES, f"the vectors' refusals: {sorted(refused)}, not {sorted(CODES)}"
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run(
        [node, "--test", "--test-reporter=tap", "web/test/verify.test.mjs"],
        cwd=ROOT,
        env={**os.environ, "CST_VECTORS": str(path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = f"CST_VECTORS={path}\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, report
    assert "# fail 0" in done.stdout and "# skipped 0" in done.stdout, report
