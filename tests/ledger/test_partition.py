"""The partition state machine, one rule at a time."""

from __future__ import annotations

import gc

import pytest

from constellation.errors import (
    AlreadyCommitted,
    BadIssuance,
    BadSignature,
    CoinSpent,
    InputLocked,
    NotHeldHere,
    UnknownCoin,
    UnknownTransaction,
    ValueMismatch,
)
from constellation.keys import SigningKey
from constellation.ledger import CoinStatus, PartitionState
from constellation.ledger.pmap import PartitionMap
from constellation.sighash import sign_transaction
from constellation.tx import (
    PARTITIONS,
    Issuance,
    IssuanceBatch,
    Transaction,
    TxInput,
    TxOutput,
    partition_of,
)
from tests.strategies import KEYS

ISSUER, ALICE, BOB = KEYS[7], KEYS[0], KEYS[1]


def funded(values: list[int], owner: SigningKey = ALICE) -> tuple[PartitionState, list[bytes]]:
    state = PartitionState(range(PARTITIONS), [ISSUER.pubkey])
    iss = Issuance(ISSUER.pubkey, 0, [TxOutput(v, owner.pubkey) for v in values])
    return state, state.issue(iss.signed_by(ISSUER.secret))


def pay(
    cids: list[bytes],
    values: list[int],
    to: SigningKey = BOB,
    fee: int = 1,
    key: SigningKey = ALICE,
) -> Transaction:
    tx = Transaction(
        [TxInput(c, v) for c, v in zip(cids, values, strict=True)],
        [TxOutput(sum(values) - fee, to.pubkey)],
        fee,
    )
    return sign_transaction(tx, [key] * len(cids))


def test_prepare_commit_moves_value() -> None:
    state, (cid,) = funded([1_000])
    tx = pay([cid], [1_000])
    vote = state.prepare(tx)
    assert vote.coordinator and vote.inputs == (cid,)
    assert state.status(cid) is CoinStatus.LOCKED
    state.commit(tx.txid)
    assert state.status(cid) is CoinStatus.SPENT
    out = tx.output_ids[0]
    assert state.coin(out) == TxOutput(999, BOB.pubkey)
    assert state.held_msat == 999 and state.fees_msat == 1
    state.check_invariants()


def test_held_lock_is_a_refusal_and_abort_releases() -> None:
    state, (cid,) = funded([1_000])
    first, second = pay([cid], [1_000]), pay([cid], [1_000], fee=2)
    state.prepare(first)
    with pytest.raises(InputLocked):
        state.prepare(second)
    assert state.abort(first.txid) and not state.abort(first.txid)
    state.prepare(second)
    state.commit(second.txid)
    with pytest.raises(CoinSpent, match=second.txid.hex()):
        state.prepare(first)
    with pytest.raises(AlreadyCommitted):
        state.prepare(second)
    state.check_invariants()


def test_an_output_being_created_is_pending_and_its_spend_is_told_to_come_back() -> None:
    """A receipt may be out before the participant holding an output hears the commit:
    that output is pending (with its value and owner), and a spend of it is refused as
    locked (sent again, it may pass), not as a coin that does not exist. An abort
    leaves nothing."""
    state, (cid,) = funded([1_000])
    tx = pay([cid], [1_000])
    out = tx.output_ids[0]
    assert state.status(out) is CoinStatus.UNKNOWN and state.being_created(out) is None
    state.prepare(tx)
    state.check_invariants()
    assert state.status(out) is CoinStatus.PENDING
    assert state.being_created(out) == (999, BOB.pubkey)
    onwards = pay([out], [999], to=ALICE, key=BOB)
    with pytest.raises(InputLocked, match="being created by transaction"):
        state.prepare(onwards)
    assert state.abort(tx.txid)
    assert state.status(out) is CoinStatus.UNKNOWN
    with pytest.raises(UnknownCoin):
        state.prepare(onwards)
    state.prepare(tx)
    state.commit(tx.txid)
    state.check_invariants()
    assert state.status(out) is CoinStatus.UNSPENT
    state.prepare(onwards)


def test_prepare_is_idempotent_for_the_same_transaction() -> None:
    state, (cid,) = funded([1_000])
    tx = pay([cid], [1_000])
    assert state.prepare(tx) == state.prepare(tx)
    state.commit(tx.txid)
    with pytest.raises(UnknownTransaction):
        state.commit(tx.txid)


def test_rejections_change_nothing() -> None:
    state, (a, b) = funded([600, 400])
    cases = [
        (pay([a, b"\x00" * 32], [600, 5]), UnknownCoin),
        (pay([a, b], [600, 401]), ValueMismatch),
        (pay([a, b], [600, 400], key=BOB), BadSignature),
        (Transaction([TxInput(a, 600)], [TxOutput(600, BOB.pubkey)]), BadSignature),
    ]
    for tx, error in cases:
        with pytest.raises(error):
            state.prepare(tx)
        assert not state.locks and not state.pending
    state.check_invariants()


def test_bad_signature_on_second_input_releases_nothing_taken() -> None:
    state, (a, b) = funded([600, 400])
    tx = pay([a, b], [600, 400])
    forged = tx.with_witnesses([tx.witnesses[0], tx.witnesses[0]])
    with pytest.raises(BadSignature, match="input 1"):
        state.prepare(forged)
    assert state.status(a) is CoinStatus.UNSPENT
    state.prepare(tx)
    state.commit(tx.txid)
    state.check_invariants()


def test_verify_false_skips_signatures_only() -> None:
    state, (cid,) = funded([1_000])
    unsigned = Transaction([TxInput(cid, 1_000)], [TxOutput(1_000, BOB.pubkey)])
    state.prepare(unsigned, verify=False)
    state.commit(unsigned.txid)
    state.check_invariants()


def test_not_held_here() -> None:
    _state, (cid,) = funded([1_000])
    tx = pay([cid], [1_000])
    p = partition_of(cid)
    elsewhere = PartitionState(
        [
            q
            for q in range(PARTITIONS)
            if q != p and q not in {partition_of(o) for o in tx.output_ids}
        ]
    )
    with pytest.raises(NotHeldHere):
        elsewhere.prepare(tx)
    with pytest.raises(ValueError):
        PartitionState([PARTITIONS])


def test_issuance_rules() -> None:
    state, _ = funded([1])
    iss = Issuance(ISSUER.pubkey, 1, [TxOutput(5, ALICE.pubkey)]).signed_by(ISSUER.secret)
    state.issue(iss)
    with pytest.raises(AlreadyCommitted):
        state.issue(iss)
    stranger = Issuance(BOB.pubkey, 1, [TxOutput(5, BOB.pubkey)]).signed_by(BOB.secret)
    with pytest.raises(BadIssuance, match="not an issuer"):
        state.issue(stranger)
    forged = Issuance(ISSUER.pubkey, 2, [TxOutput(5, BOB.pubkey)], BOB.sign(b"x" * 32))
    with pytest.raises(BadIssuance):
        state.issue(forged)
    assert state.issued_msat == 6
    state.check_invariants()


def test_an_issuance_applied_before_its_issuer_was_retired_is_told_already_applied() -> None:
    """A retry of an issuance whose first answer was lost, after its issuer's key was
    retired: "already applied" (its sender spends what it issued for), not a refusal (its
    sender would take it as never applied, and keep both). One never applied is refused."""
    state, _ = funded([1])
    iss = Issuance(ISSUER.pubkey, 7, [TxOutput(5, ALICE.pubkey)]).signed_by(ISSUER.secret)
    state.issue(iss)
    state.issuers = frozenset(state.issuers - {ISSUER.pubkey})
    with pytest.raises(AlreadyCommitted):
        state.issue(iss)
    later = Issuance(ISSUER.pubkey, 8, [TxOutput(5, ALICE.pubkey)]).signed_by(ISSUER.secret)
    with pytest.raises(BadIssuance, match="not an issuer"):
        state.issue(later)
    state.check_invariants()


def test_two_states_commit_together_and_a_held_lock_refuses() -> None:
    """The steps of a two-phase commit across two states (one per worker): a rival's
    lock at the second makes it refuse; once the rival aborts, both commit."""
    pmap = PartitionMap.even(2)
    states = [PartitionState(pmap.held_by(w)[0], [ISSUER.pubkey]) for w in range(2)]
    owners = pmap.owners()
    iss = Issuance(ISSUER.pubkey, 0, [TxOutput(500, ALICE.pubkey) for _ in range(8)])
    cids = [c for s in states for c in s.issue(iss.signed_by(ISSUER.secret))]
    a = cids[0]
    b = next(c for c in cids if owners[partition_of(c)] != owners[partition_of(a)])
    first, second = states[owners[partition_of(a)]], states[owners[partition_of(b)]]
    tx = pay([a, b], [500, 500])
    rival = pay([b], [500], fee=3)
    second.prepare(rival)
    first.prepare(tx)
    with pytest.raises(InputLocked):
        second.prepare(tx)
    first.abort(tx.txid)
    assert first.status(a) is CoinStatus.UNSPENT
    second.abort(rival.txid)
    first.prepare(tx)
    second.prepare(tx)
    first.commit(tx.txid)
    second.commit(tx.txid)
    assert first.status(a) is CoinStatus.SPENT and second.status(b) is CoinStatus.SPENT
    for s in states:
        s.check_invariants()
    held = sum(s.held_msat for s in states) + sum(s.fees_msat for s in states)
    assert held == sum(s.issued_msat for s in states) == 4_000


def test_a_repeated_prepare_after_commit_is_refused_where_only_outputs_are_held() -> None:
    """A participant holding none of a transaction's inputs must still refuse to prepare
    it again once committed, or a late repeated PREPARE would create its outputs twice."""
    _, (cid,) = funded([1_000])
    tx = pay([cid], [1_000])
    out = tx.output_ids[0]
    outputs_only = PartitionState([partition_of(out)])
    assert partition_of(out) != partition_of(cid)
    outputs_only.prepare(tx)
    outputs_only.commit(tx.txid)
    with pytest.raises(AlreadyCommitted):
        outputs_only.prepare(tx)
    assert not outputs_only.pending
    outputs_only.check_invariants()


def test_stored_coins_leave_the_garbage_collectors_walk() -> None:
    """A full collection must not walk every coin of the ledger: once collected, the
    coins (issued and committed) and the maps of a state with nothing pending are no
    longer tracked by the collector."""
    state, cids = funded([1_000] * 50)
    for cid in cids[:25]:
        tx = pay([cid], [1_000])
        state.prepare(tx)
        state.commit(tx.txid)
    gc.collect()
    assert len(state.coins) == 50
    assert not any(gc.is_tracked(coin) for coin in state.coins.values())
    assert not gc.is_tracked(state.coins)
    assert not gc.is_tracked(state.spent)
    assert state.coin(cids[30]) == TxOutput(1_000, ALICE.pubkey)


def test_a_batch_issues_each_entry_once_and_a_retry_only_what_is_missing() -> None:
    state = PartitionState(range(PARTITIONS), [ISSUER.pubkey])
    entries = [(bytes([n]) * 32, TxOutput(10 + n, BOB.pubkey)) for n in range(4)]
    # two of them issued already, in a batch of their own
    state.issue(IssuanceBatch(ISSUER.pubkey, entries[:2]).signed_by(ISSUER.secret))
    batch = IssuanceBatch(ISSUER.pubkey, entries).signed_by(ISSUER.secret)
    created = state.issue(batch)
    assert created == list(batch.output_ids[2:])
    assert state.held_msat == sum(10 + n for n in range(4)) == state.issued_msat
    with pytest.raises(AlreadyCommitted):
        state.issue(batch)
    with pytest.raises(AlreadyCommitted):  # one of its entries, alone again
        state.issue(IssuanceBatch(ISSUER.pubkey, entries[3:]).signed_by(ISSUER.secret))
    state.check_invariants()
    lone = IssuanceBatch(ISSUER.pubkey, [(b"\x09" * 32, TxOutput(1, BOB.pubkey))])
    with pytest.raises(BadIssuance):
        state.issue(lone.signed_by(ALICE.secret))
