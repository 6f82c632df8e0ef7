"""The ledger replicated: a worker's 2PC engine runs at all six copies of its shard.

The leader's engine writes records as a worker does; its blocks carry them; every
copy replays them with the leader's checks and must reach the leader's state root. A
leader that logs a payment whose signature does not verify is refused by the other
operators' copies (its own twin relies on it), so the block never confirms.
"""

from __future__ import annotations

import functools

from constellation.ledger.commit import TwoPhaseCommit
from constellation.protocol import ledger as proto
from constellation.replication.shard import LedgerExecutor, ShardLog, encode_body
from constellation.tx import Transaction
from tests.ledger.test_properties import MemoryLog
from tests.ledger.test_replication import ALICE, BOB, GENESIS, PMAP, engine, pay
from tests.replication.harness import Shard


def ledger_shard() -> Shard:
    shard = Shard(make=lambda: LedgerExecutor(engine(0, log=MemoryLog([]))))
    shard.until(lambda: shard.leader() == 0)
    return shard


def leader_engine(shard: Shard) -> TwoPhaseCommit:
    app = shard.apps[0]
    assert isinstance(app, LedgerExecutor)
    return app.engine


def propose(shard: Shard, records: list[proto.Record]) -> int:
    """What the leader's worker does with a block's worth of records it applied."""
    leader = leader_engine(shard)
    height = shard.replicas[0].propose(encode_body(records), leader.root())
    shard.flush(0)
    return height


def test_every_copy_replays_the_leaders_blocks_to_the_same_root() -> None:
    shard = ledger_shard()
    leader = leader_engine(shard)
    leader.replay([proto.Issued(GENESIS.encode())], False)  # as its engine logged it
    first = propose(shard, [proto.Issued(GENESIS.encode())])
    tx = pay(list(GENESIS.output_ids[:2]))
    record = proto.Committed(tx.txid, tx.encode())
    leader.replay([record], False)
    second = propose(shard, [record])
    shard.until(functools.partial(shard.confirmed_everywhere, second))
    assert second == first + 1
    roots = {app.root() for app in shard.apps}
    assert roots == {leader.root()}
    for app in shard.apps:
        assert isinstance(app, LedgerExecutor)
        assert set(app.engine.state.coins) >= set(tx.output_ids)


def test_a_block_with_a_forged_signature_is_refused_by_the_other_operators() -> None:
    shard = ledger_shard()
    leader = leader_engine(shard)
    leader.replay([proto.Issued(GENESIS.encode())], False)
    issued = propose(shard, [proto.Issued(GENESIS.encode())])
    shard.until(functools.partial(shard.confirmed_everywhere, issued))
    honest = pay(list(GENESIS.output_ids[:1]))
    # Bob signs for Alice's coin: the leader logs it unchecked.
    forged = Transaction(honest.inputs, honest.outputs, honest.fee_msat, [BOB.sign(honest.txid)])
    assert forged.txid == honest.txid and ALICE.pubkey != BOB.pubkey
    record = proto.Committed(forged.txid, forged.encode())
    leader.replay([record], False)
    bad = propose(shard, [record])
    shard.run(0.5)
    assert shard.replicas[1].last >= bad  # the twin relies on its leader's checks
    for c in (2, 3, 4, 5):
        assert shard.replicas[c].last < bad
        assert shard.replicas[c].counters.refused_blocks >= 1
    assert shard.replicas[0].confirmed < bad


def test_a_leader_says_done_only_once_a_block_sealed_after_the_commit_is_told_confirms() -> None:
    """A participant's copy told a commit it holds no PREPARED record of says Done once a
    block sealed after that confirms (an empty one: nothing else gathered), not at once:
    a leader deposed without knowing it has everything it added confirmed, and may lack
    what its successor confirmed. Seed 150049: such a leader's Done ended the
    coordinator's memory of a commit whose PREPARED record it had never seen; the
    participant's real leader, in doubt, asked, was told "aborted" (presumed abort) and
    unlocked its input: a payment committed on one shard only, value created."""
    shard = ledger_shard()
    sent: list[proto.Item] = []
    log = ShardLog()
    participant = engine(1, sent, log=log)
    txid = pay(list(GENESIS.output_ids[:2])).txid
    decide = proto.Decide(txid, True, 7)
    participant.handle(proto.Package(proto.PROTOCOL_VERSION, 0, "w.0", PMAP.version, [decide]))
    assert sent == [] and log.urgent  # nothing in flight, yet no Done
    replica = shard.replicas[0]
    log.seal(replica, leader_engine(shard))
    assert log.proposed == replica.last  # the empty block that answers the question
    shard.flush(0)
    shard.until(lambda: replica.confirmed >= log.proposed)
    assert sent == []
    log.confirm(replica.confirmed)
    assert sent == [proto.Done(txid, 7)]
    # told again, then deposed before its block confirms: nothing is said
    participant.handle(proto.Package(proto.PROTOCOL_VERSION, 0, "w.0", PMAP.version, [decide]))
    log.reset(replica.confirmed, replica.last)
    log.seal(replica, leader_engine(shard))
    log.confirm(replica.last)
    assert sent == [proto.Done(txid, 7)]


def test_a_coordinator_presumes_an_abort_only_once_a_block_sealed_after_the_ask_confirms() -> None:
    """Presumed abort answers from an absence: a coordinator's copy asked about a commit it
    holds no record of says "aborted" once a block sealed after the Ask confirms (only a
    copy that still leads gets there, and its state holds every commit confirmed), not at
    once: a leader deposed without knowing it would tell a participant in doubt to abort
    a commit its successor made."""
    shard = ledger_shard()
    sent: list[proto.Item] = []
    log = ShardLog()
    coordinator = engine(0, sent, log=log)
    txid = pay(list(GENESIS.output_ids[:2])).txid
    ask = proto.Ask(txid, 7)
    coordinator.handle(proto.Package(proto.PROTOCOL_VERSION, 1, "w.1", PMAP.version, [ask]))
    assert sent == [] and log.urgent
    replica = shard.replicas[0]
    log.seal(replica, leader_engine(shard))
    shard.flush(0)
    shard.until(lambda: replica.confirmed >= log.proposed)
    log.confirm(replica.confirmed)
    assert sent == [proto.Decide(txid, False, 7)]
