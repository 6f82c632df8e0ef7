"""Hypothesis attacks the two-phase commit engine, the code the workers run.

Three engines (``constellation.ledger.commit``) with logs in memory exchange packages
through a network that hypothesis drives: messages are delivered in any order, lost or
delivered twice; logs become durable whenever hypothesis says; engines crash (losing
what was not durable) and are rebuilt from their logs; the clock jumps, so timeouts
fire. Payments conflict (the same coins, spent coins, coins that never were, wrong
values, bad signatures). After every step: each state's invariants hold and no coin is
both spent and unspent. At the end, once the network heals: no lock or doubt is left,
value is conserved, every payment a client was told is committed is committed
everywhere, and an honest payment of an unspent coin commits (the engine still works).

Each worker also has a replica: a copy of its shard that re-executes every block as it
becomes durable, checking every record and signature (``replay`` with ``verify``). It
refuses no block and reaches the worker's state root after each; a restarted worker has
that root again; a snapshot restored elsewhere has it too, and the replica, restored
from its own snapshot, goes on re-executing the blocks that follow.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from constellation.errors import MessageError
from constellation.keys import XOnlyPubKey
from constellation.ledger.commit import TwoPhaseCommit
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.sighash import sign_transaction
from constellation.tx import (
    Issuance,
    Transaction,
    TxInput,
    TxOutput,
    decode_issuance,
    decode_transaction,
    partition_of,
)
from tests.strategies import KEYS

ISSUER = KEYS[7]
OWNERS = KEYS[:4]
BY_PUB = {k.pubkey: k for k in OWNERS}
WORKERS = 3
PMAP = PartitionMap.even(WORKERS)
OWNER_OF = PMAP.owners()
GATEWAY = "gw"
TIMEOUT_MS = 200
# 100 examples take seconds; the seeded fault schedules (tests/services/
# test_worker_faults.py) hunt deeper. CST_FUZZ_EXAMPLES=300 or more for a long hunt.
EXAMPLES = int(os.environ.get("CST_FUZZ_EXAMPLES", "100"))


def subject_of(worker: int) -> str:
    return f"w.{worker}"


class MemoryLog:
    """A block log in memory: records wait until ``flush`` makes them durable (and go
    to ``cut`` then, as a block)."""

    def __init__(
        self,
        blocks: list[list[proto.Record]],
        cut: Callable[[list[proto.Record]], None] = lambda _: None,
    ) -> None:
        self.blocks = blocks  # durable: what a crash keeps
        self.cut = cut
        self.records: list[proto.Record] = []
        self.after: list[Callable[[int], None]] = []

    def add(
        self,
        record: proto.Record,
        after: Callable[[int], None] | None = None,
        lazy: bool = False,
        changes: Sequence[proto.CoinChange] = (),
        committed: Sequence[proto.Commit] = (),
    ) -> None:
        self.records.append(record)
        if after is not None:
            self.after.append(after)

    def after_durable(self, callback: Callable[[int], None]) -> None:
        if self.records:
            self.after.append(callback)
        else:
            callback(len(self.blocks) - 1)

    def flush(self) -> None:
        if not self.records:
            return
        height = len(self.blocks)
        self.blocks.append(self.records)
        self.cut(self.records)
        after, self.records, self.after = self.after, [], []
        for callback in after:
            callback(height)


def copy_of(me: int) -> TwoPhaseCommit:
    """An engine that only re-executes blocks: a replica, or one restored from a snapshot."""
    return TwoPhaseCommit(
        me=me,
        pmap=PMAP,
        issuers=frozenset([ISSUER.pubkey]),
        prepare_timeout_ms=TIMEOUT_MS,
        send=lambda subject, item, lazy=False: None,
        subject_of=subject_of,
        log=MemoryLog([]),
        clock=lambda: 0.0,
        draw=lambda: 0,
    )


class Node:
    def __init__(self, me: int, machine: CommitMachine) -> None:
        self.me, self.machine = me, machine
        self.blocks: list[list[proto.Record]] = []
        self.attempts = random.Random(me)
        self.replica = copy_of(me)
        self.log, self.engine = self._start()

    def _start(self) -> tuple[MemoryLog, TwoPhaseCommit]:
        log = MemoryLog(self.blocks, self._cut)
        engine = TwoPhaseCommit(
            me=self.me,
            pmap=PMAP,
            issuers=frozenset([ISSUER.pubkey]),
            prepare_timeout_ms=TIMEOUT_MS,
            send=self._send,
            subject_of=subject_of,
            log=log,
            clock=lambda: self.machine.now,
            draw=lambda: self.attempts.getrandbits(63),
        )
        for records in self.blocks:
            engine.replay(records, derive=False)
        engine.state.check_invariants()
        assert engine.root() == self.replica.root(), "a restart changed the state root"
        return log, engine

    def _cut(self, records: list[proto.Record]) -> None:
        """A block became durable: the replica re-executes it and agrees on the root."""
        self.replica.replay(records, derive=False, verify=True, signatures=True)
        assert self.replica.root() == self.engine.root(), "a replica's root differs"

    def _send(self, subject: str, item: proto.Item, lazy: bool = False) -> None:
        reply = subject_of(self.me)
        package = proto.Package(proto.PROTOCOL_VERSION, self.me, reply, PMAP.version, [item])
        self.machine.net.append((subject, package))

    def crash(self) -> None:
        """What was not durable is gone; the engine is rebuilt from the log."""
        self.log, self.engine = self._start()
        self.engine.ask_in_doubt(self.machine.now, at_once=True)


class CommitMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.net: list[tuple[str, proto.Package]] = []
        self.nodes = [Node(w, self) for w in range(WORKERS)]
        self.known: dict[bytes, TxOutput] = {}  # every coin a payment may name
        self.issued = 0
        self.txs: dict[int, Transaction] = {}
        self.acked: set[int] = set()  # rids a client was told are committed
        self.rid = 0

    def owner(self, coin_id: bytes) -> Node:
        return self.nodes[OWNER_OF[partition_of(coin_id)]]

    def submit(self, item: proto.Item, to: Node) -> None:
        package = proto.Package(proto.PROTOCOL_VERSION, -1, GATEWAY, PMAP.version, [item])
        self.net.append((subject_of(to.me), package))

    def deliver(self, subject: str, package: proto.Package) -> None:
        if subject == GATEWAY:
            for item in package.items:
                assert isinstance(item, proto.Result)
                if not item.code and item.rid in self.txs:
                    self.acked.add(item.rid)
            return
        self.nodes[int(subject.split(".")[1])].engine.handle(package)

    @initialize(values=st.lists(st.integers(1, 10**6), min_size=6, max_size=12))
    def genesis(self, values: list[int]) -> None:
        outs = [TxOutput(v, OWNERS[i % len(OWNERS)].pubkey) for i, v in enumerate(values)]
        issuance = Issuance(ISSUER.pubkey, 0, outs).signed_by(ISSUER.secret)
        for node in {self.owner(c).me: self.owner(c) for c in issuance.output_ids}.values():
            self.submit(proto.Issue(0, issuance.encode()), node)
        self.heal()
        self.known.update(zip(issuance.output_ids, issuance.outputs, strict=True))
        self.issued = issuance.total_msat

    @rule(data=st.data())
    def pay(self, data: st.DataObject) -> None:
        """A payment from 1-3 coins (now and then one that never was, a wrong value or a
        wrong key) to 1-3 outputs, sent to its coordinator."""
        pool = sorted(self.known)
        picks = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        if data.draw(st.integers(0, 9)) == 0:
            picks[-1] = data.draw(st.binary(min_size=32, max_size=32))
        values = [self.known[c].value_msat if c in self.known else 7 for c in picks]
        if data.draw(st.integers(0, 9)) == 0:
            values[0] += 1
        total = sum(values)
        fee = data.draw(st.integers(0, min(total - 1, 1000)))
        n_out = data.draw(st.integers(1, 3))
        split = [total - fee - (n_out - 1)] + [1] * (n_out - 1)
        if split[0] < 1:
            return
        outs = [TxOutput(v, data.draw(st.sampled_from(OWNERS)).pubkey) for v in split]
        tx = Transaction([TxInput(c, v) for c, v in zip(picks, values, strict=True)], outs, fee)
        signers = [BY_PUB[self.known[c].owner] if c in self.known else OWNERS[0] for c in picks]
        if data.draw(st.integers(0, 9)) == 0:
            signers[0] = OWNERS[(OWNERS.index(signers[0]) + 1) % len(OWNERS)]
        tx = sign_transaction(tx, signers)
        self.rid += 1
        self.txs[self.rid] = tx
        self.known.update(zip(tx.output_ids, tx.outputs, strict=True))
        self.submit(proto.Submit(self.rid, tx.encode()), self.owner(tx.inputs[0].coin_id))

    @precondition(lambda self: bool(self.txs))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A client sends a payment again, the same bytes (a new attempt if it runs)."""
        tx = self.txs[data.draw(st.sampled_from(sorted(self.txs)))]
        self.rid += 1
        self.txs[self.rid] = tx
        self.submit(proto.Submit(self.rid, tx.encode()), self.owner(tx.inputs[0].coin_id))

    @precondition(lambda self: bool(self.net))
    @rule(data=st.data())
    def deliver_one(self, data: st.DataObject) -> None:
        """A message in flight arrives (or is lost, or arrives and comes again later)."""
        subject, package = self.net.pop(data.draw(st.integers(0, len(self.net) - 1)))
        fate = data.draw(st.sampled_from(["deliver"] * 8 + ["lose", "repeat"]))
        if fate == "lose":
            return
        if fate == "repeat":
            self.net.append((subject, package))
        self.deliver(subject, package)

    @precondition(lambda self: any(n.engine.in_doubt for n in self.nodes))
    @rule(data=st.data())
    def forge_decide(self, data: st.DataObject) -> None:
        """A worker that is not an attempt's coordinator (another operator's, leading
        one of our shards) tells a participant in doubt how it ended: ignored."""
        node = data.draw(st.sampled_from([n for n in self.nodes if n.engine.in_doubt]))
        txid = data.draw(st.sampled_from(sorted(node.engine.in_doubt)))
        coordinator, attempt, _ = node.engine.in_doubt[txid]
        forger = data.draw(st.sampled_from([w for w in range(WORKERS) if w != coordinator]))
        decide = proto.Decide(txid, data.draw(st.booleans()), attempt)
        package = proto.Package(
            proto.PROTOCOL_VERSION, forger, subject_of(forger), PMAP.version, [decide]
        )
        node.engine.handle(package)

    @rule(data=st.data())
    def hostile_prepare(self, data: st.DataObject) -> None:
        """A coordinator (another operator's worker, leading one of our shards) sends a
        participant what the copies' replay refuses: an output owned by no key, an
        attempt out of range. Refused, nothing logged: no block the copies refuse
        (``Node._cut``). Its input is made up: the participant holds only the output."""
        target = data.draw(st.integers(0, WORKERS - 1))
        coordinator = (target + 1) % WORKERS
        made_up = next(
            c
            for i in range(1 << 16)
            if OWNER_OF[partition_of(c := i.to_bytes(2) + bytes(30))] == coordinator
        )
        no_key, attempt = data.draw(st.sampled_from([(True, 5), (False, -1), (False, 1 << 64)]))
        owner = b"\xff" * 32 if no_key else OWNERS[0].pubkey
        for fee in range(1000):
            outputs = [TxOutput(5000 - fee, XOnlyPubKey(owner))]
            tx = Transaction(
                [TxInput(made_up, 5000)], outputs, fee, [bytes(64)], check_owners=False
            )
            if OWNER_OF[partition_of(tx.output_ids[0])] == target:
                break
        prepare = proto.Prepare(tx.encode(), attempt)
        package = proto.Package(
            proto.PROTOCOL_VERSION, coordinator, subject_of(coordinator), PMAP.version, [prepare]
        )
        node = self.nodes[target]
        records = len(node.log.records)
        node.engine.handle(package)
        assert len(node.log.records) == records, "a record the copies refuse"

    @rule(w=st.integers(0, WORKERS - 1))
    def flush(self, w: int) -> None:
        self.nodes[w].log.flush()

    @rule(w=st.integers(0, WORKERS - 1))
    def crash(self, w: int) -> None:
        self.nodes[w].crash()

    @rule(w=st.integers(0, WORKERS - 1))
    def snapshot(self, w: int) -> None:
        """A worker's state, restored from its snapshot elsewhere, is the same state; its
        replica catches up from its own snapshot and follows the log from there."""
        node = self.nodes[w]
        data = node.engine.snapshot()
        copy = copy_of(w)
        assert copy.restore(data) == node.engine.root()
        copy.state.check_invariants()  # outputs being created, too
        assert copy.snapshot() == data
        logged = {t: node.engine.in_doubt[t][:2] for t in node.engine.logged}
        assert {t: doubt[:2] for t, doubt in copy.in_doubt.items()} == logged
        decided = {t: (d.attempt, d.participants) for t, d in node.engine.decided.items()}
        assert {t: (d.attempt, d.participants) for t, d in copy.decided.items()} == decided
        behind, root = node.replica.snapshot(), node.replica.root()
        node.replica = copy_of(w)
        assert node.replica.restore(behind) == root

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for node in self.nodes:
            node.engine.expire(self.now)
            node.engine.ask_in_doubt(self.now)
            node.engine.retell(self.now)

    @invariant()
    def states_are_consistent(self) -> None:
        for node in self.nodes:
            state = node.engine.state
            state.check_invariants()
            assert not state.spent.keys() & state.coins.keys(), "a coin spent and unspent"

    def heal(self) -> None:
        """No more faults: deliver everything, make logs durable, let timeouts fire."""
        for _ in range(100):
            while self.net:
                self.deliver(*self.net.pop(0))
            for node in self.nodes:
                node.log.flush()
            if self.net:
                continue
            engines = [node.engine for node in self.nodes]
            if not any(e.coordinating or e.in_doubt or e.decided for e in engines):
                return
            self.now += 1.0
            for e in engines:
                e.expire(self.now)
                e.ask_in_doubt(self.now, at_once=True)
                e.retell(self.now, at_once=True)
        raise AssertionError("the engines did not settle")

    def teardown(self) -> None:
        if not self.known:
            return
        self.heal()
        states = [node.engine.state for node in self.nodes]
        for state in states:
            assert not state.locks and not state.pending, "a lock was left"
        fees = sum(s.fees_msat for s in states)
        assert sum(s.held_msat for s in states) + fees == self.issued, "value changed"
        spent_by = {cid: txid for s in states for cid, txid in s.spent.items()}
        for rid in self.acked:
            tx = self.txs[rid]
            for cid, _ in tx.inputs:
                assert spent_by.get(cid) == tx.txid, "an acknowledged spend is missing"
            for cid in tx.output_ids:
                held = self.owner(cid).engine.state
                assert cid in held.coins or cid in held.spent, "an acknowledged output is lost"
        # The engines still work: an honest payment of an unspent coin commits.
        cid, (value, owner) = next((c, coin) for s in states for c, coin in sorted(s.coins.items()))
        key = BY_PUB[XOnlyPubKey(owner)]
        tx = sign_transaction(
            Transaction([TxInput(cid, value)], [TxOutput(value, key.pubkey)]), [key]
        )
        self.rid += 1
        self.txs[self.rid] = tx
        self.submit(proto.Submit(self.rid, tx.encode()), self.owner(cid))
        self.heal()
        assert self.rid in self.acked, "an honest payment did not commit"


CommitMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=60, deadline=None
)
TestCommitEngine = CommitMachine.TestCase


def summary(record: proto.Record) -> tuple[str, bytes, int]:
    """A record as (kind, txid, attempt): signatures differ between runs (BIP340 signing
    draws fresh auxiliary randomness), nothing else may."""
    if isinstance(record, proto.Prepared):
        return "P", decode_transaction(record.tx).txid, record.attempt
    if isinstance(record, proto.Committed):
        return ("C" if record.tx else "c"), record.txid, record.attempt
    if isinstance(record, proto.Aborted | proto.Ended):
        return type(record).__name__, record.txid, 0
    return "I", decode_issuance(record.issuance).issuance_id, 0


def test_the_engine_replays_a_run_exactly() -> None:
    """The engines read no clock and draw no number of their own: the same inputs give
    the same messages and the same logs, attempt numbers included."""

    def run(seed: int) -> list[list[list[tuple[str, bytes, int]]]]:
        rng = random.Random(seed)
        machine = CommitMachine()
        for node in machine.nodes:
            node.attempts.seed(seed * WORKERS + node.me)
        machine.genesis([rng.randrange(1_000, 10**6) for _ in range(12)])
        for _ in range(40):
            cid = rng.choice(sorted(c for n in machine.nodes for c in n.engine.state.coins))
            value, owner = machine.owner(cid).engine.state.coins[cid]
            key = BY_PUB[XOnlyPubKey(owner)]
            to = rng.choice(OWNERS).pubkey
            tx = Transaction([TxInput(cid, value)], [TxOutput(value, to)])
            machine.rid += 1
            machine.txs[machine.rid] = tx
            machine.submit(
                proto.Submit(machine.rid, sign_transaction(tx, [key]).encode()), machine.owner(cid)
            )
            machine.heal()
        machine.teardown()
        return [[[summary(r) for r in block] for block in n.blocks] for n in machine.nodes]

    first = run(1)
    assert run(1) == first
    assert run(2) != first
    attempts = {a for blocks in first for block in blocks for kind, _, a in block if kind == "C"}
    assert len(attempts) > 10  # cross-worker commits, each with its drawn attempt


def test_an_attempt_out_of_range_is_refused_as_the_package_is_read() -> None:
    """No worker draws a negative attempt (and msgpack carries none past 2^64 - 1): a
    package naming one is malformed, before any engine sees it."""
    txid = bytes(32)
    for item in (
        proto.Prepare(b"tx", -1),
        proto.Vote(txid, "", "", 0, -1),
        proto.Decide(txid, True, -1),
        proto.Ask(txid, -1),
        proto.Done(txid, -1),
    ):
        data = proto.encode(proto.Package(proto.PROTOCOL_VERSION, 0, "w.0", PMAP.version, [item]))
        with pytest.raises(MessageError, match="malformed package"):
            proto.decode_package(data)
