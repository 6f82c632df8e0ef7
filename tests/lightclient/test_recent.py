"""What each signed checkpoint did to an address or a coin, proved from the recent
checkpoints kept in memory (``index.Recent``): what a light client subscribed to them
is pushed. Every touch is told once, at the checkpoint from which its proof verifies,
whichever of a transaction's commit and its changes is signed first."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from constellation.protocol.ledger import BlockEvents, CoinChange, Commit
from tests.lightclient.test_proofs import KEY, LEDGERS, MEMBERS, PIN, SHARDS


def keys_of(placed: list[pf.Placed]) -> set[lc.Key]:
    return {
        key
        for p in placed
        for c in p.record.changes
        for key in (("address", c.owner), ("coin", c.coin_id))
    }


@given(st.integers(0, 2))
def test_every_change_is_told_once_with_a_proof_that_shows_it(seed: int) -> None:
    ledger = LEDGERS[seed]
    recent = lc.Recent(keep=100, horizon=100)
    told: dict[tuple[lc.Key, bytes], int] = {}
    created: list[tuple[bytes, bytes, int, int]] = []
    spent: list[bytes] = []
    for signed in ledger.signed:
        height = signed.checkpoint.checkpoint.height
        touched = recent.add(signed)
        for key, txids in touched.by_key.items():
            for txid in txids:
                assert (key, txid) not in told
                told[(key, txid)] = height
        created += touched.coins.created
        spent += touched.coins.spent
        assert recent.add(signed) == (({}, ([], [])))  # taken again: nothing again
    # every coin the ledger made and spent, with the member whose ledger holds it
    assert sorted(created) == sorted(
        (cid, owner, shard[0], value) for cid, (_, value, owner, _, shard) in ledger.coins.items()
    )
    assert sorted(spent) == sorted(
        cid for cid, c in ledger.coins.items() if c[0] is pf.CoinState.SPENT
    )
    for txid in ledger.txs:
        height = max(h for (_, t), h in told.items() if t == txid)
        proof = recent.proof(txid, height)
        assert proof is not None
        placed = pf.verify_tx(PIN, pf.decode_tx_proof(pf.encode_tx_proof(proof)), txid)
        # what is told of the transaction is exactly what its proof shows
        assert {k for (k, t) in told if t == txid} == keys_of(placed)
        # the same records the store's proof (every checkpoint) shows
        full = lc.tx_proof(map(lc.held, ledger.signed), txid)
        assert full is not None
        assert sorted(p.record.encode() for p in placed) == sorted(
            p.record.encode() for p in pf.verify_tx(PIN, full, txid)
        )


class Split:
    """One transaction whose commit and change land under different checkpoints."""

    def __init__(self) -> None:
        self.rng = random.Random(7)
        self.index = lc.GuildIndex("guild", MEMBERS, SHARDS)
        self.heights = dict.fromkeys(SHARDS, 0)
        self.recent = lc.Recent(keep=3, horizon=6)
        self.txid = self.rng.randbytes(32)
        self.owner = b"\x0a" * 32
        self.coin = self.rng.randbytes(32)
        self.applied: list[tuple[int, BlockEvents]] = []  # to replay at another member

    def block(self, shard: lc.Shard, changes: list[CoinChange], committed: bool) -> None:
        prev = self.heights[shard] or -1
        self.heights[shard] += 1
        ev = BlockEvents(
            shard[1],
            self.heights[shard],
            prev,
            changes,
            [Commit(self.txid, 3)] if committed else [],
            self.rng.randbytes(32),
            self.rng.randbytes(32),
        )
        self.index.apply(shard[0], ev)
        self.applied.append((shard[0], ev))

    def commit(self) -> None:
        self.block(SHARDS[0], [], True)

    def change(self) -> None:
        self.block(SHARDS[4], [CoinChange(self.txid, self.coin, self.owner, 5, True)], False)

    def checkpoint(self) -> dict[lc.Key, list[bytes]]:
        checkpoint, entries = self.index.propose(0)
        sc = pf.SignedCheckpoint(checkpoint, KEY.sign(checkpoint.message()))
        return self.recent.add(self.index.signed(sc, entries)).by_key

    def verified(self, upto: int) -> list[pf.Placed]:
        proof = self.recent.proof(self.txid, upto)
        assert proof is not None
        return pf.verify_tx(PIN, proof, self.txid)


def signed_next(index: lc.GuildIndex) -> lc.Signed:
    """``index``'s next checkpoint, signed by the guild."""
    checkpoint, entries = index.propose(0)
    return index.signed(pf.SignedCheckpoint(checkpoint, KEY.sign(checkpoint.message())), entries)


def test_a_change_whose_commit_a_member_adopted_is_told_once_that_checkpoint_is_filled() -> None:
    """A member that was down adopts a checkpoint (no records) above the one holding a
    commit; the change signed after waits for the commit, which the fill of the missed
    checkpoint brings: the change is in the history from then on, at its checkpoint."""
    s = Split()
    s.commit()
    first = signed_next(s.index)  # the commit's checkpoint, which the other member misses
    s.block(SHARDS[1], [], False)
    second = signed_next(s.index)
    other, recent = lc.GuildIndex("guild", MEMBERS, SHARDS), lc.Recent(keep=3, horizon=6)
    for owner, ev in s.applied:
        other.apply(owner, ev)
    adopted = other.adopt(second.checkpoint, [c.entry for c in second.covered.values()])
    assert recent.add(adopted).by_key == {}
    s.change()
    third = signed_next(s.index)
    other.apply(*s.applied[-1])
    taken = other.signed(third.checkpoint, [c.entry for c in third.covered.values()])
    assert ("address", s.owner) not in recent.add(taken).by_key  # its commit unknown here
    assert s.txid in recent.waiting
    held = lc.held(first)
    commits = [
        r.txid
        for records in held.records.values()
        for r in map(pf.Record.decode, records)
        if r.committed
    ]
    later = [(("address", s.owner), 2, s.txid), (("coin", s.coin), 2, s.txid)]
    assert sorted(recent.waiting_for(commits)) == sorted(later)
    assert sorted(recent.waiting_for(commits)) == sorted(later)  # until stored: asked again
    recent.filled(0, commits)
    assert s.txid not in recent.waiting and recent.waiting_for(commits) == []  # told once
    proof = lc.tx_proof([held, lc.held(taken)], s.txid)  # provable from checkpoint 2 on
    assert proof is not None
    assert keys_of(pf.verify_tx(PIN, proof, s.txid)) >= {("address", s.owner)}


@pytest.mark.parametrize("commit_first", [True, False])
def test_a_change_is_told_once_its_commit_is_signed_too(commit_first: bool) -> None:
    s = Split()
    s.commit() if commit_first else s.change()
    first = s.checkpoint()
    s.change() if commit_first else s.commit()
    second = s.checkpoint()
    address, coin = ("address", s.owner), ("coin", s.coin)
    assert address not in first and coin not in first
    assert second[address] == [s.txid] and second[coin] == [s.txid]
    placed = s.verified(1)
    assert sorted(p.checkpoint for p in placed) == [0, 1]
    assert keys_of(placed) >= {address, coin}


def test_a_change_long_after_its_commit_is_told_and_the_store_proves_it() -> None:
    s = Split()
    s.commit()
    s.checkpoint()
    for _ in range(3):  # three more checkpoints: the commit's is no longer kept
        s.block(SHARDS[1], [], False)
        s.checkpoint()
    s.change()
    touched = s.checkpoint()
    assert touched[("address", s.owner)] == [s.txid]
    assert s.recent.proof(s.txid, 4) is None
    assert 0 not in s.recent.touched and len(s.recent.kept) == 3
    # past the horizon, its commit is forgotten too: a change is not told
    for _ in range(6):
        s.block(SHARDS[1], [], False)
        s.checkpoint()
    s.change()
    assert ("address", s.owner) not in s.checkpoint()


def test_a_change_whose_commit_never_comes_is_forgotten() -> None:
    s = Split()
    s.change()
    s.checkpoint()
    for _ in range(3):
        s.block(SHARDS[1], [], False)
        assert ("address", s.owner) not in s.checkpoint()
    assert s.txid not in s.recent.waiting and s.txid not in s.recent.places
