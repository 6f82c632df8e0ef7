"""Checkpoints and proofs over random ledgers: every honest proof verifies and says what
the ledger holds; every tampered proof, path, root, signature, height or member set is
refused with its own error; an operator's index vouches only for what it computed."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.errors import (
    BadCheckpointSignature,
    BadCoinPath,
    BadEntryPath,
    BadRecordPath,
    DecodeError,
    ProofRefused,
    StaleCheckpoint,
    Unconfirmed,
    WrongGuild,
    WrongMembers,
    WrongSubject,
)
from constellation.keys import SigningKey
from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.protocol.ledger import BlockEvents, CoinChange, Commit

KEY = SigningKey(b"\x42" * 32)
MEMBERS = pf.members_root(2, [("a", b"\x01" * 32), ("b", b"\x02" * 32), ("c", b"\x03" * 32)])
PIN = pf.Pin("guild", bytes(KEY.pubkey), MEMBERS)
SHARDS = [(o, w) for o in range(3) for w in range(2)]


class Ledger(NamedTuple):
    guild: lc.GuildIndex
    signed: list[lc.Signed]
    coins: dict[bytes, tuple[pf.CoinState, int, bytes, bytes, lc.Shard]]  # id -> state
    txs: dict[bytes, lc.Shard]  # txid -> its coordinator's shard


def build(seed: int, rounds: int = 4, txs_per_round: int = 6) -> Ledger:
    """A guild's shards through ``rounds`` checkpoints of random payments."""
    rng = random.Random(seed)
    index = lc.GuildIndex("guild", MEMBERS, SHARDS)
    heights = dict.fromkeys(SHARDS, 0)
    coins: dict[bytes, tuple[pf.CoinState, int, bytes, bytes, lc.Shard]] = {}
    txs: dict[bytes, lc.Shard] = {}
    signed: list[lc.Signed] = []

    def block(shard: lc.Shard, changes: list[CoinChange], committed: list[Commit]) -> None:
        prev = heights[shard] or -1
        heights[shard] += rng.randint(1, 3)
        h = heights[shard]
        ev = BlockEvents(
            shard[1], h, prev, changes, committed, rng.randbytes(32), rng.randbytes(32)
        )
        index.apply(shard[0], ev)

    for r in range(rounds):
        if r == 0:  # issuances
            for shard in SHARDS:
                iid = rng.randbytes(32)
                made = []
                for _ in range(4):
                    cid, owner, value = rng.randbytes(32), rng.randbytes(32), rng.randint(1, 10**9)
                    made.append(CoinChange(iid, cid, owner, value, True))
                    coins[cid] = (pf.CoinState.UNSPENT, value, owner, iid, shard)
                block(shard, made, [])
        for _ in range(txs_per_round):
            unspent = [c for c, v in coins.items() if v[0] is pf.CoinState.UNSPENT]
            inputs = rng.sample(unspent, min(len(unspent), rng.randint(1, 2)))
            txid = rng.randbytes(32)
            per_shard: dict[lc.Shard, list[CoinChange]] = {}
            total = 0
            for cid in inputs:
                _, value, owner, _, shard = coins[cid]
                total += value
                per_shard.setdefault(shard, []).append(CoinChange(txid, cid, owner, value, False))
                coins[cid] = (pf.CoinState.SPENT, value, owner, txid, shard)
            coordinator = coins[inputs[0]][4]
            fee = rng.randint(0, 10)
            for k in range(rng.randint(1, 3)):
                cid, owner = rng.randbytes(32), rng.randbytes(32)
                value = max(1, (total - fee) // 3)
                if k == 2:  # paid to another ledger: recorded by the coordinator
                    change = CoinChange(txid, cid, owner, value, True, rng.randbytes(8))
                    per_shard.setdefault(coordinator, []).append(change)
                    continue
                shard = rng.choice(SHARDS)
                per_shard.setdefault(shard, []).append(CoinChange(txid, cid, owner, value, True))
                coins[cid] = (pf.CoinState.UNSPENT, value, owner, txid, shard)
            per_shard.setdefault(coordinator, [])
            for shard, changes in per_shard.items():
                block(shard, changes, [Commit(txid, fee)] if shard == coordinator else [])
            txs[txid] = coordinator
        checkpoint, entries = index.propose(1000 * r)
        assert index.check(checkpoint, entries, 1000 * r) is None
        sc = pf.SignedCheckpoint(checkpoint, KEY.sign(checkpoint.message()))
        signed.append(index.signed(sc, entries))
    return Ledger(index, signed, coins, txs)


LEDGERS = {seed: build(seed) for seed in range(3)}


def roundtrip_tx(p: pf.TxProof) -> pf.TxProof:
    return pf.decode_tx_proof(pf.encode_tx_proof(p))


def roundtrip_coin(p: pf.CoinProof) -> pf.CoinProof:
    return pf.decode_coin_proof(pf.encode_coin_proof(p))


@given(st.integers(0, 2), st.data())
def test_every_honest_transaction_proof_verifies(seed: int, data: st.DataObject) -> None:
    ledger = LEDGERS[seed]
    txid = data.draw(st.sampled_from(sorted(ledger.txs)))
    proof = lc.tx_proof(map(lc.held, ledger.signed), txid)
    assert proof is not None and roundtrip_tx(proof) == proof
    placed = pf.verify_tx(PIN, roundtrip_tx(proof), txid)
    coordinator = [p for p in placed if p.record.committed]
    assert [(p.owner, p.worker) for p in coordinator] == [ledger.txs[txid]]
    for p in placed:
        for c in p.record.changes:
            if c.kind is not pf.ChangeKind.PAID_OUT:
                assert ledger.coins[c.coin_id][4] == (p.owner, p.worker)


@given(st.integers(0, 2), st.data())
def test_every_honest_coin_proof_verifies(seed: int, data: st.DataObject) -> None:
    ledger = LEDGERS[seed]
    latest = ledger.signed[-1]
    coin_id = data.draw(st.sampled_from(sorted(ledger.coins)))
    state, value, owner, txid, shard = ledger.coins[coin_id]
    proof = roundtrip_coin(lc.coin_proof(latest, shard, coin_id))
    verdict = pf.verify_coin(PIN, proof, coin_id, shard, not_below=len(ledger.signed) - 1)
    assert (verdict.owner, verdict.worker) == shard
    assert verdict.leaf is not None
    assert (verdict.leaf.state, verdict.leaf.value_msat, verdict.leaf.owner) == (
        state,
        value,
        owner,
    )
    assert verdict.leaf.txid == txid
    absent = data.draw(st.binary(min_size=32, max_size=32).filter(lambda b: b not in ledger.coins))
    nothing = pf.verify_coin(
        PIN, roundtrip_coin(lc.coin_proof(latest, shard, absent)), absent, shard
    )
    other = next(s for s in SHARDS if s != shard)
    with pytest.raises(WrongSubject):  # no such coin, but in a shard that would not hold it
        pf.verify_coin(PIN, lc.coin_proof(latest, other, absent), absent, shard)
    assert nothing.leaf is None


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]


def _cp(p: Any, **kw: Any) -> pf.SignedCheckpoint:
    sc: pf.SignedCheckpoint = p
    return sc._replace(checkpoint=sc.checkpoint.__class__(**{**_fields(sc.checkpoint), **kw}))


def _fields(c: Any) -> dict[str, Any]:
    return {f: getattr(c, f) for f in c.__struct_fields__}


TX_TAMPERS: dict[str, tuple[type[ProofRefused], Callable[[pf.TxProof], pf.TxProof]]] = {
    "signature": (
        BadCheckpointSignature,
        lambda p: p._replace(checkpoints=[c._replace(sig=_flip(c.sig, 5)) for c in p.checkpoints]),
    ),
    "checkpoint height": (
        BadCheckpointSignature,
        lambda p: p._replace(
            checkpoints=[_cp(c, height=c.checkpoint.height + 1) for c in p.checkpoints]
        ),
    ),
    "checkpoint root": (
        BadCheckpointSignature,
        lambda p: p._replace(
            checkpoints=[_cp(c, shards=_flip(c.checkpoint.shards)) for c in p.checkpoints]
        ),
    ),
    "member set": (
        WrongMembers,
        lambda p: p._replace(
            checkpoints=[_cp(c, members=_flip(c.checkpoint.members)) for c in p.checkpoints]
        ),
    ),
    "guild": (
        WrongGuild,
        lambda p: p._replace(checkpoints=[_cp(c, guild="other") for c in p.checkpoints]),
    ),
    "entry path": (
        BadEntryPath,
        lambda p: p._replace(
            parts=[
                x._replace(entry=x.entry._replace(path=[_flip(h) for h in x.entry.path]))
                for x in p.parts
            ]
        ),
    ),
    "entry": (
        BadEntryPath,
        lambda p: p._replace(
            parts=[
                x._replace(
                    entry=x.entry._replace(
                        entry=x.entry.entry._replace(height=x.entry.entry.height + 1)
                    )
                )
                for x in p.parts
            ]
        ),
    ),
    "record": (
        BadRecordPath,
        lambda p: p._replace(
            parts=[x._replace(record=_flip(x.record, len(x.record) - 1)) for x in p.parts]
        ),
    ),
    "record path": (
        BadRecordPath,
        lambda p: p._replace(
            parts=[x._replace(path=[_flip(h) for h in x.path] or [bytes(32)]) for x in p.parts]
        ),
    ),
    "record index": (
        BadRecordPath,
        lambda p: p._replace(parts=[x._replace(position=x.position + 1) for x in p.parts]),
    ),
    "subject": (WrongSubject, lambda p: p),  # checked against another txid
    "no commit": (
        Unconfirmed,
        lambda p: p._replace(parts=[x for x in p.parts if not _committed(x)]),
    ),
    "record twice": (BadRecordPath, lambda p: p._replace(parts=[*p.parts, p.parts[0]])),
}


def _committed(part: pf.TxPart) -> bool:
    return pf.Record.decode(part.record).committed


@pytest.mark.parametrize("tamper", sorted(TX_TAMPERS))
@settings(max_examples=20)
@given(seed=st.integers(0, 2), data=st.data())
def test_a_tampered_transaction_proof_is_refused_by_its_check(
    tamper: str, seed: int, data: st.DataObject
) -> None:
    ledger = LEDGERS[seed]
    txid = data.draw(st.sampled_from(sorted(ledger.txs)))
    proof = lc.tx_proof(map(lc.held, ledger.signed), txid)
    assert proof is not None
    error, change = TX_TAMPERS[tamper]
    bad = change(proof)
    if tamper == "no commit" and not bad.parts:
        return  # the commit was its only record: nothing left to send
    asked = _flip(proof.txid) if tamper == "subject" else proof.txid
    with pytest.raises(error):
        pf.verify_tx(PIN, roundtrip_tx(bad), asked)


COIN_TAMPERS: dict[str, tuple[type[ProofRefused], Callable[[pf.CoinProof], pf.CoinProof]]] = {
    "signature": (
        BadCheckpointSignature,
        lambda p: p._replace(checkpoint=p.checkpoint._replace(sig=_flip(p.checkpoint.sig))),
    ),
    "member set": (
        WrongMembers,
        lambda p: p._replace(checkpoint=_cp(p.checkpoint, members=bytes(32))),
    ),
    "entry path": (
        BadEntryPath,
        lambda p: p._replace(
            entry=p.entry._replace(entry=p.entry.entry._replace(coins=_flip(p.entry.entry.coins)))
        ),
    ),
    "coin path": (
        BadCoinPath,
        lambda p: p._replace(path=p.path._replace(siblings=[_flip(h) for h in p.path.siblings])),
    ),
    "coin leaf": (
        BadCoinPath,
        lambda p: p._replace(path=p.path._replace(leaf_value=_flip(p.path.leaf_value))),
    ),
    "subject": (WrongSubject, lambda p: p._replace(coin_id=_flip(p.coin_id, 31))),
}


@pytest.mark.parametrize("tamper", sorted(COIN_TAMPERS))
@settings(max_examples=20)
@given(seed=st.integers(0, 2), data=st.data())
def test_a_tampered_coin_proof_is_refused_by_its_check(
    tamper: str, seed: int, data: st.DataObject
) -> None:
    ledger = LEDGERS[seed]
    coin_id = data.draw(st.sampled_from(sorted(ledger.coins)))
    proof = lc.coin_proof(ledger.signed[-1], ledger.coins[coin_id][4], coin_id)
    error, change = COIN_TAMPERS[tamper]
    with pytest.raises(error):
        pf.verify_coin(PIN, roundtrip_coin(change(proof)), coin_id, ledger.coins[coin_id][4])


def test_a_stale_checkpoint_is_refused_where_the_latest_state_matters() -> None:
    ledger = LEDGERS[0]
    coin_id, (_, _, _, _, shard) = next(iter(ledger.coins.items()))
    old = lc.coin_proof(ledger.signed[0], shard, coin_id)
    assert pf.verify_coin(PIN, old, coin_id, shard).checkpoint == 0
    with pytest.raises(StaleCheckpoint):
        pf.verify_coin(PIN, old, coin_id, shard, not_below=len(ledger.signed) - 1)


def test_a_leaf_off_the_coins_path_is_not_an_absence() -> None:
    ledger = LEDGERS[1]
    ids = sorted(ledger.coins)
    latest = ledger.signed[-1]
    a, b = ids[0], ids[-1]  # first bits differ: b's leaf is not on a's path
    shard = ledger.coins[b][4]
    proof = lc.coin_proof(latest, shard, b)
    with pytest.raises((BadCoinPath, WrongSubject)):
        pf.verify_coin(PIN, proof._replace(coin_id=a), a, shard)


@given(st.integers(0, 2), st.data())
def test_truncated_or_padded_proofs_are_malformed(seed: int, data: st.DataObject) -> None:
    ledger = LEDGERS[seed]
    txid = data.draw(st.sampled_from(sorted(ledger.txs)))
    proof = lc.tx_proof(map(lc.held, ledger.signed), txid)
    assert proof is not None
    raw = pf.encode_tx_proof(proof)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DecodeError):
        pf.decode_tx_proof(raw[:cut])
    with pytest.raises(DecodeError):
        pf.decode_tx_proof(raw + b"\x00")
    with pytest.raises(DecodeError):
        pf.decode_tx_proof(b"\x09" + raw[1:])  # another version


def test_an_index_vouches_only_for_what_it_computed() -> None:
    """Two operators' indexes of the same blocks agree; one that saw a different block,
    has not reached a height, is on another member set, or is asked about a checkpoint
    dated ahead of its clock refuses the proposal and says why; a signed checkpoint it
    disagrees with changes nothing."""
    a, b = build(7, rounds=1).guild, build(7, rounds=1).guild
    last = a.shards[(0, 0)].height
    ev = BlockEvents(0, 50, last, [CoinChange(b"t" * 32, b"c" * 32, b"o" * 32, 5, True)], [])
    a.apply(0, ev)
    b.apply(0, BlockEvents(0, 50, last, [CoinChange(b"t" * 32, b"c" * 32, b"o" * 32, 6, True)], []))
    checkpoint, entries = a.propose(5000)
    assert a.check(checkpoint, entries, 5000) is None
    assert b.check(checkpoint, entries, 5000) == "shard 0/0 at 50 differs here"
    assert "ahead of this operator's clock" in (a.check(checkpoint, entries, -6000) or "")
    late = lc.GuildIndex("guild", MEMBERS, SHARDS)
    assert late.check(checkpoint, entries, 5000) is not None
    fork = checkpoint.__class__(**{**_fields(checkpoint), "height": checkpoint.height + 1})
    assert a.check(fork, entries, 5000) is not None
    other = lc.GuildIndex("guild", b"x" * 32, SHARDS)
    assert other.check(checkpoint, entries, 5000) == "another guild or member set"
    signed = pf.SignedCheckpoint(checkpoint, KEY.sign(checkpoint.message()))
    before = dict(b.shards[(0, 0)].heads)
    with pytest.raises(ValueError, match="differs here"):
        b.signed(signed, entries)
    assert b.shards[(0, 0)].heads == before and b.last is not None
    assert b.last.checkpoint.checkpoint.height == checkpoint.height - 1


def test_a_block_that_does_not_follow_is_refused() -> None:
    index = lc.GuildIndex("guild", MEMBERS, SHARDS)
    index.apply(0, BlockEvents(0, 3, -1, [], []))
    with pytest.raises(ValueError, match="does not follow"):
        index.apply(0, BlockEvents(0, 9, 5, [], []))  # the block at 5 was missed
    with pytest.raises(ValueError, match="does not follow"):
        index.apply(0, BlockEvents(0, 3, -1, [], []))
    index.apply(0, BlockEvents(0, 9, 3, [], []))
