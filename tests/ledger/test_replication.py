"""What replication asks of the engine: a state root, blocks checked as their leader
had to check them, and snapshots that restore the same state (or are refused).

Blocks here are written by hand, so that each rule can be broken on purpose; the
stateful test (``test_properties``) has replicas follow the blocks real engines write.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from constellation.errors import InvalidBlock, InvalidSnapshot
from constellation.keys import SigningKey, XOnlyPubKey
from constellation.ledger import partition
from constellation.ledger.commit import Check, Log, TwoPhaseCommit, Verifier
from constellation.ledger.partition import CoinStatus
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.sighash import sighash, sign_transaction
from constellation.tx import Issuance, Transaction, TxInput, TxOutput, partition_of
from tests.ledger.test_properties import MemoryLog
from tests.strategies import KEYS

ISSUER, ALICE, BOB = KEYS[7], KEYS[0], KEYS[1]
PMAP = PartitionMap.even(2)
OWNER_OF = PMAP.owners()
GENESIS = Issuance(
    ISSUER.pubkey, 0, [TxOutput(1_000 + i, ALICE.pubkey) for i in range(16)]
).signed_by(ISSUER.secret)
VALUE = dict(zip(GENESIS.output_ids, (o.value_msat for o in GENESIS.outputs), strict=True))


def worker_of(coin_id: bytes) -> int:
    return OWNER_OF[partition_of(coin_id)]


AT = [[c for c in GENESIS.output_ids if worker_of(c) == w] for w in (0, 1)]
assert len(AT[0]) >= 4 and len(AT[1]) >= 4


def engine(
    me: int,
    sent: list[proto.Item] | None = None,
    log: Log | None = None,
    verifiers: Verifier | None = None,
    rooted: bool = True,
) -> TwoPhaseCommit:
    out = [] if sent is None else sent
    return TwoPhaseCommit(
        me=me,
        pmap=PMAP,
        issuers=frozenset([ISSUER.pubkey]),
        prepare_timeout_ms=200,
        send=lambda subject, item, lazy=False: out.append(item),
        subject_of=lambda w: f"w.{w}",
        log=MemoryLog([]) if log is None else log,
        clock=lambda: 0.0,
        draw=lambda: 7,
        verifiers=verifiers,
        rooted=rooted,
    )


def pay(
    coins: list[bytes], key: SigningKey = ALICE, outputs_at: int | None = None, fee: int = 0
) -> Transaction:
    """A payment of ``coins`` to Bob, signed by ``key``; with ``outputs_at``, the fee is
    raised until its output lies in that worker's partitions."""
    total = sum(VALUE.get(c, 500) for c in coins)
    while True:
        tx = Transaction(
            [TxInput(c, VALUE.get(c, 500)) for c in coins], [TxOutput(total - fee, BOB.pubkey)], fee
        )
        if outputs_at is None or worker_of(tx.output_ids[0]) == outputs_at:
            return sign_transaction(tx, [key] * len(coins))
        fee += 1


def genesis(*engines: TwoPhaseCommit) -> None:
    for e in engines:
        e.replay([proto.Issued(GENESIS.encode())], derive=False, verify=True, signatures=True)


def cross() -> Transaction:
    """A payment coordinated by worker 0, with worker 1 a participant (an input and the
    output there)."""
    return pay([AT[0][0], AT[1][0]], outputs_at=1)


def busy(me: int = 0) -> TwoPhaseCommit:
    """Worker ``me`` with coins, spent coins, a transaction in doubt (as worker 1) or a
    commit it remembers (as worker 0), after checked blocks."""
    e = engine(me)
    genesis(e)
    local = pay([AT[me][1]], outputs_at=me)
    tx = cross()
    records: list[proto.Record] = [proto.Committed(local.txid, local.encode())]
    if me == 0:
        records.append(proto.Committed(tx.txid, tx.encode(), 5))
    else:
        records.append(proto.Prepared(tx.encode(), 0, 5))
    e.replay(records, derive=False, verify=True, signatures=True)
    return e


# -- the root ----------------------------------------------------------------------------


def test_copies_fed_the_same_blocks_have_the_same_root() -> None:
    a, b, c = engine(1), engine(1), engine(1)
    before = a.root()
    tx = cross()
    blocks: list[list[proto.Record]] = [
        [proto.Issued(GENESIS.encode())],
        [proto.Prepared(tx.encode(), 0, 5)],
        [proto.Committed(tx.txid, b"")],
    ]
    roots = []
    for records in blocks:
        a.replay(records, derive=False, verify=True, signatures=True)
        b.replay(records, derive=False, verify=True)
        c.replay(records, derive=True)  # this worker's own log
        assert a.root() == b.root() == c.root()
        roots.append(a.root())
    assert len({before, *roots}) == 4 and all(len(r) == 32 for r in roots)


def test_the_root_is_of_the_state_not_of_its_history() -> None:
    second = Issuance(ISSUER.pubkey, 1, [TxOutput(5, ALICE.pubkey)] * 3).signed_by(ISSUER.secret)
    a, b = engine(0), engine(0)
    a.replay([proto.Issued(GENESIS.encode()), proto.Issued(second.encode())], derive=False)
    b.replay([proto.Issued(second.encode()), proto.Issued(GENESIS.encode())], derive=False)
    assert a.root() == b.root()
    # Prepared then aborted leaves the state as it was, and so the root.
    c, d = engine(1), engine(1)
    genesis(c, d)
    tx = cross()
    c.replay([proto.Prepared(tx.encode(), 0, 5)], derive=False, verify=True)
    assert c.root() != d.root()
    c.replay([proto.Aborted(tx.txid)], derive=False, verify=True)
    assert c.root() == d.root()


def test_what_is_coordinated_is_not_in_the_root() -> None:
    """A coordinator's locks are not logged: after a restart they are gone (presumed
    abort), so a copy re-executing the log never has them."""
    sent: list[proto.Item] = []
    e = engine(0, sent)
    genesis(e)
    before = e.root()
    tx = cross()
    e.handle(proto.Package(proto.PROTOCOL_VERSION, -1, "gw", 1, [proto.Submit(1, tx.encode())]))
    assert tx.txid in e.coordinating and isinstance(sent[-1], proto.Prepare)
    assert e.root() == before


# -- snapshots -------------------------------------------------------------------------------


@pytest.mark.parametrize("me", [0, 1])
def test_a_snapshot_restores_the_state_and_the_tables(me: int) -> None:
    e = busy(me)
    data = e.snapshot()
    copy = engine(me)
    assert copy.restore(data) == e.root() == copy.root()
    assert copy.snapshot() == data
    assert copy.state.coins == e.state.coins and copy.state.spent == e.state.spent
    assert copy.state.pending == e.state.pending and copy.state.locks == e.state.locks
    assert copy.state.issued_ids == e.state.issued_ids
    assert copy.in_doubt == e.in_doubt and copy.logged == e.logged
    assert copy.decided == e.decided
    # The restored copy goes on with the blocks that follow.
    tx = cross()
    after: list[proto.Record] = [proto.Ended(tx.txid) if me == 0 else proto.Committed(tx.txid, b"")]
    for x in (e, copy):
        x.replay(after, derive=False, verify=True, signatures=True)
    assert copy.root() == e.root() and copy.snapshot() == e.snapshot()


def test_restore_forgets_what_was_coordinated_and_waits_for_every_participant() -> None:
    e = busy(0)
    [decided] = e.decided.values()
    decided.waiting.clear()  # every participant said Done, not yet logged
    tx = pay([AT[0][2], AT[1][1]])
    e.handle(proto.Package(proto.PROTOCOL_VERSION, -1, "gw", 1, [proto.Submit(1, tx.encode())]))
    assert e.coordinating
    e.restore(e.snapshot())
    assert not e.coordinating and not e.state.locks
    assert [d.waiting for d in e.decided.values()] == [{1}]


def _mutations(snap: proto.Snapshot) -> dict[str, proto.Snapshot]:
    """One change each to a snapshot of ``busy(1)``, keeping it consistent."""
    replace = msgspec.structs.replace
    (cid, value, owner), *coins = snap.coins
    (spent_id, _), *spent = snap.spent
    [doubt] = snap.in_doubt
    (out_id, out_value, out_owner), *outs = doubt.outputs
    issued = int.from_bytes(snap.issued_msat, "big")
    return {
        "coin value": replace(
            snap,
            coins=[(cid, value + 1, owner), *coins],
            issued_msat=(issued + 1).to_bytes(16, "big"),
        ),
        "coin owner": replace(snap, coins=[(cid, value, KEYS[5].pubkey), *coins]),
        "spent by": replace(snap, spent=[(spent_id, bytes(32)), *spent]),
        "issued id": replace(snap, issued=[bytes(32), *snap.issued]),
        "fees": replace(snap, fees_msat=(1).to_bytes(16, "big")),
        "doubt attempt": replace(snap, in_doubt=[replace(doubt, attempt=6)]),
        "doubt output": replace(
            snap, in_doubt=[replace(doubt, outputs=[(out_id, out_value + 1, out_owner), *outs])]
        ),
        "doubt gone": replace(snap, in_doubt=[]),
    }


def test_any_change_to_the_state_changes_the_root() -> None:
    e = busy(1)
    snap = proto.decode_snapshot(e.snapshot())
    for what, changed in _mutations(snap).items():
        assert engine(1).restore(proto.encode_snapshot(changed)) != e.root(), what
    decided = proto.decode_snapshot(busy(0).snapshot())
    [entry] = decided.decided
    for change in (
        msgspec.structs.replace(entry, attempt=6),
        msgspec.structs.replace(entry, txid=bytes(32)),
    ):
        changed = msgspec.structs.replace(decided, decided=[change])
        assert engine(0).restore(proto.encode_snapshot(changed)) != busy(0).root()


def test_snapshots_and_roots_do_not_depend_on_the_hash_seed() -> None:
    """Sets of bytes iterate in an order that depends on PYTHONHASHSEED."""
    script = (
        "from tests.ledger.test_replication import busy\n"
        "e = busy(0)\n"
        "print(e.root().hex(), __import__('hashlib').sha256(e.snapshot()).hexdigest())\n"
    )
    root = Path(__file__).parents[2]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def _bad_snapshots() -> dict[str, bytes]:
    snap = proto.decode_snapshot(busy(1).snapshot())
    replace, encode = msgspec.structs.replace, proto.encode_snapshot
    coins, spent = snap.coins, snap.spent
    [doubt] = snap.in_doubt
    elsewhere = next(c for c in GENESIS.output_ids if worker_of(c) == 0)
    return {
        "empty": b"",
        "not msgpack": b"\xc1",
        "truncated": encode(snap)[:-1],
        "trailing": encode(snap) + b"\x00",
        "wrong version": encode(replace(snap, version=1)),
        "another worker": encode(replace(snap, worker=0)),
        "another map": encode(replace(snap, map_version=2)),
        "unsorted coins": encode(replace(snap, coins=coins[::-1])),
        "duplicate coin": encode(replace(snap, coins=[coins[0], *coins])),
        "short coin id": msgspec.msgpack.encode(
            [2, 1, 1, [[b"\x00" * 31, 5, ALICE.pubkey]], *([[]] * 4), *[bytes(16)] * 5]
        ),
        "zero value": encode(replace(snap, coins=[(coins[0][0], 0, coins[0][2]), *coins[1:]])),
        "coin not here": encode(replace(snap, coins=[(elsewhere, 5, ALICE.pubkey)])),
        "spent and unspent": encode(replace(snap, spent=[(coins[0][0], bytes(32))])),
        "spent twice": encode(replace(snap, spent=[*spent, *spent])),
        "lock of no coin": encode(replace(snap, in_doubt=[replace(doubt, inputs=[bytes(32)])])),
        "lock twice": encode(
            replace(snap, in_doubt=[replace(doubt, inputs=[doubt.inputs[0]] * 2)])
        ),
        "output exists": encode(
            replace(snap, in_doubt=[replace(doubt, outputs=[(coins[0][0], 5, ALICE.pubkey)])])
        ),
        "doubt touches nothing": encode(
            replace(snap, in_doubt=[replace(doubt, inputs=[], outputs=[])])
        ),
        "coordinator unknown": encode(replace(snap, in_doubt=[replace(doubt, coordinator=9)])),
        "negative attempt": encode(replace(snap, in_doubt=[replace(doubt, attempt=-1)])),
        "participant is me": encode(
            replace(snap, decided=[proto.DecidedCommit(bytes(32), 1, [1])])
        ),
        "no participants": encode(replace(snap, decided=[proto.DecidedCommit(bytes(32), 1, [])])),
        "totals disagree": encode(replace(snap, received_msat=(1).to_bytes(16, "big"))),
        "short total": msgspec.msgpack.encode([2, 1, 1, *([[]] * 5), *[bytes(15)] * 5]),
    }


@pytest.mark.parametrize("what", sorted(_bad_snapshots()))
def test_a_malformed_snapshot_is_refused_and_changes_nothing(what: str) -> None:
    e = busy(1)
    root, data = e.root(), e.snapshot()
    with pytest.raises(InvalidSnapshot):
        e.restore(_bad_snapshots()[what])
    assert e.root() == root and e.snapshot() == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_restore_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(InvalidSnapshot):
        engine(1).restore(data)


SNAPSHOT = busy(1).snapshot()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(SNAPSHOT) - 1), st.integers(1, 255))
def test_a_corrupted_snapshot_is_refused_or_has_another_root(at: int, flip: int) -> None:
    data = bytearray(SNAPSHOT)
    data[at] ^= flip
    try:
        decoded = proto.decode_snapshot(bytes(data))
    except InvalidSnapshot:
        return
    assume(decoded != proto.decode_snapshot(SNAPSHOT))
    try:
        root = engine(1).restore(bytes(data))
    except InvalidSnapshot:
        return
    assert root != busy(1).root()


# -- checked blocks --------------------------------------------------------------------------

Case = Callable[[], tuple[int, list[proto.Record]]]


def _double_spend() -> tuple[int, list[proto.Record]]:
    a, b = pay([AT[0][0]]), pay([AT[0][0]], fee=1)
    return 0, [proto.Committed(a.txid, a.encode()), proto.Committed(b.txid, b.encode())]


def _committed(tx: Transaction, txid: bytes | None = None) -> proto.Record:
    return proto.Committed(tx.txid if txid is None else txid, tx.encode())


def _bad_owner() -> proto.Record:
    """A payment to 32 bytes that are no public key, signed as a client would."""
    cid = AT[0][0]
    ins, outs = [TxInput(cid, VALUE[cid])], [TxOutput(VALUE[cid], XOnlyPubKey(b"\xff" * 32))]
    txid = Transaction(ins, outs, check_owners=False).txid
    sig = ALICE.sign(sighash(txid, 0, VALUE[cid], ALICE.pubkey))
    return _committed(Transaction(ins, outs, 0, [sig], check_owners=False))


def _wrong_value() -> proto.Record:
    cid = AT[0][0]
    tx = Transaction([TxInput(cid, VALUE[cid] + 1)], [TxOutput(VALUE[cid] + 1, BOB.pubkey)])
    return _committed(sign_transaction(tx, [ALICE]))


ROGUE = Issuance(BOB.pubkey, 0, [TxOutput(5, BOB.pubkey)] * 8).signed_by(BOB.secret)
ELSEWHERE = next(
    issuance.signed_by(ISSUER.secret)
    for issuance in (Issuance(ISSUER.pubkey, n, [TxOutput(5, BOB.pubkey)]) for n in range(10, 99))
    if worker_of(issuance.output_ids[0]) == 1
)

INVALID: dict[str, tuple[Case, str]] = {
    "double spend": (_double_spend, "already spent"),
    "unknown coin": (lambda: (0, [_committed(pay([bytes(32)]))]), "does not exist"),
    "wrong value": (lambda: (0, [_wrong_value()]), "states"),
    "bad signature": (lambda: (0, [_committed(pay([AT[0][0]], key=BOB))]), "signature"),
    "output owner is no key": (lambda: (0, [_bad_owner()]), "public key"),
    "txid does not match": (
        lambda: (0, [_committed(pay([AT[0][0]]), bytes(32))]),
        "carries",
    ),
    "committed by another coordinator": (lambda: (1, [_committed(cross())]), "coordinates"),
    "commit of a transaction not in doubt": (
        lambda: (1, [proto.Committed(cross().txid, b"")]),
        "not in doubt",
    ),
    "abort of a transaction not in doubt": (
        lambda: (1, [proto.Aborted(cross().txid)]),
        "not in doubt",
    ),
    "ended without a commit": (lambda: (0, [proto.Ended(cross().txid)]), "no commit"),
    "issued by no issuer": (lambda: (0, [proto.Issued(ROGUE.encode())]), "not an issuer"),
    "issued nothing here": (lambda: (0, [proto.Issued(ELSEWHERE.encode())]), "no coin here"),
    "issued twice": (lambda: (0, [proto.Issued(GENESIS.encode())]), "already applied"),
    "a transaction not touching the shard": (
        lambda: (1, [proto.Prepared(pay([AT[0][0]], outputs_at=0).encode(), 0, 1)]),
        "touches no partition",
    ),
    "prepared at its coordinator": (
        lambda: (0, [proto.Prepared(cross().encode(), 0, 1)]),
        "coordinator",
    ),
    "prepared naming another coordinator": (
        lambda: (1, [proto.Prepared(pay([AT[0][0], AT[1][0]]).encode(), 2, 1)]),
        "coordinator",
    ),
    "prepared twice": (
        lambda: (1, [proto.Prepared(cross().encode(), 0, 1)] * 2),
        "prepared here already",
    ),
    "negative attempt": (lambda: (1, [proto.Prepared(cross().encode(), 0, -1)]), "u64"),
    "malformed transaction": (lambda: (1, [proto.Prepared(b"\x01\x00", 0, 1)]), "needs"),
}


@pytest.mark.parametrize("what", sorted(INVALID))
def test_an_invalid_record_is_refused(what: str) -> None:
    case, why = INVALID[what]
    me, records = case()
    e = engine(me)
    genesis(e)
    honest = pay([AT[me][3]])
    block = [proto.Committed(honest.txid, honest.encode()), *records]
    with pytest.raises(InvalidBlock, match=why) as refused:
        e.replay(block, derive=False, verify=True, signatures=True)
    assert refused.value.index == len(block) - 1
    assert str(refused.value).startswith(f"record {len(block) - 1}: ")


def test_a_copy_of_the_leaders_operator_may_skip_signatures() -> None:
    e = engine(0)
    genesis(e)
    forged = pay([AT[0][0]], key=BOB)
    e.replay([_committed(forged)], derive=False, verify=True)
    assert AT[0][0] in e.state.spent
    with pytest.raises(ValueError, match="verify"):
        e.replay([], derive=False, signatures=True)


def test_recovery_replays_without_checks() -> None:
    """A worker's own log is not checked again: an abort of what it never logged (an
    older version wrote those) is skipped."""
    e = engine(1)
    e.replay([proto.Aborted(bytes(32))], derive=False)
    assert not e.state.pending


# -- the participant's side of what replicas check -------------------------------------------


def test_a_participant_refuses_a_prepare_from_a_worker_that_does_not_coordinate() -> None:
    sent: list[proto.Item] = []
    e = engine(1, sent)
    genesis(e)
    tx = cross()
    e.handle(proto.Package(proto.PROTOCOL_VERSION, 2, "w.2", 1, [proto.Prepare(tx.encode(), 5)]))
    [vote] = sent
    assert isinstance(vote, proto.Vote) and vote.code == "protocol.misdirected"
    assert not e.state.pending


class HeldVerifier:
    """Signature checks whose answers the test gives."""

    def __init__(self) -> None:
        self.asked: list[Callable[[int | None], None]] = []

    def check(self, checks: list[Check], done: Callable[[int | None], None]) -> None:
        self.asked.append(done)


def test_an_abort_before_the_signatures_are_checked_logs_nothing() -> None:
    verifier, log = HeldVerifier(), MemoryLog([])
    e = engine(1, log=log, verifiers=verifier)
    genesis(e)
    root, tx = e.root(), cross()
    e.handle(proto.Package(proto.PROTOCOL_VERSION, 0, "w.0", 1, [proto.Prepare(tx.encode(), 5)]))
    assert tx.txid in e.in_doubt and not log.records
    e.handle(proto.Package(proto.PROTOCOL_VERSION, 0, "w.0", 1, [proto.Decide(tx.txid, True, 5)]))
    assert tx.txid in e.in_doubt, "a commit before this worker voted is not taken"
    e.handle(proto.Package(proto.PROTOCOL_VERSION, 0, "w.0", 1, [proto.Decide(tx.txid, False, 5)]))
    [done] = verifier.asked
    done(-1)  # the signatures verify, too late
    assert not log.records and not e.in_doubt and not e.state.pending
    assert e.root() == root


def test_the_oldest_spent_coins_are_forgotten_alike_at_every_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(partition, "SPENT_KEPT", 3)
    a = engine(0)
    genesis(a)
    mine = [c for c in GENESIS.output_ids if worker_of(c) == 0]
    txs = [pay([cid], outputs_at=0) for cid in mine[:6]]
    for tx in txs[:5]:
        a.replay([_committed(tx)], False, verify=True, signatures=True)
    assert list(a.state.spent) == mine[2:5]  # the two spent first are forgotten
    assert a.state.status(mine[0]) is CoinStatus.UNKNOWN
    with pytest.raises(InvalidBlock, match="does not exist"):
        a.replay([_committed(txs[0])], False, verify=True, signatures=True)
    b = engine(0)
    assert b.restore(a.snapshot()) == a.root()
    for e in (a, b):  # the restored copy forgets the same coin next
        e.replay([_committed(txs[5])], False, verify=True, signatures=True)
        e.state.check_invariants()
    assert list(b.state.spent) == list(a.state.spent) == [*mine[3:5], mine[5]]
    assert a.root() == b.root()


def test_a_shard_nobody_replicates_keeps_the_same_state_without_a_root() -> None:
    rooted, bare = engine(0), engine(0, rooted=False)
    mine = [c for c in GENESIS.output_ids if worker_of(c) == 0]
    for e in (rooted, bare):
        genesis(e)
        e.replay([_committed(pay(mine[:2], outputs_at=0))], False, verify=True)
    assert bare.snapshot() == rooted.snapshot()
    assert engine(0).restore(bare.snapshot()) == rooted.root()
    with pytest.raises(AssertionError, match="no state root"):
        bare.root()
