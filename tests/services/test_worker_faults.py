"""Two-phase commit between partition workers under randomized fault schedules.

Three ``Worker``s (the real ledger logic, block logs on disk) exchange packages through
a network that this test controls: packages are delivered out of order, lost or
delivered twice; workers crash (whatever was not yet durable is lost) and recover from
their logs; timeouts fire; clients retry, race for coins and forge signatures. Each
schedule comes from a seed, printed with every failed assertion. Once the network heals
and everything settles:

* every transaction a client was told is committed is committed everywhere it touches;
* no coin is spent twice, no forgery commits, value is conserved;
* no lock, doubt or remembered commit is left;
* replaying every worker's log rebuilds exactly the state it holds;
* every worker's events log (whose tail a crash may cut, as a machine's crash loses what
  was not synced) holds every block's changes exactly as the block log derives them, and
  they add up to the coins the worker holds.

Half the schedules have a slow disk (blocks close 5 ms late), so that much happens
between a record and its durability; some check signatures in verifier processes, whose
answers arrive whenever they arrive, between the other events.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from constellation.keys import SigningKey
from constellation.ledger.commit import Check, TwoPhaseCommit
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.sighash import sign_transaction
from constellation.tx import (
    Issuance,
    Transaction,
    TxInput,
    TxOutput,
)
from services.bus import Batching
from services.partition.metrics import WorkerMetrics
from services.partition.verify import Done, Verifiers
from services.partition.wal import BlockLog, EventLog
from services.partition.worker import Worker

WORKERS = 3
GATEWAY = "gw"
ISSUER = SigningKey(b"\x07" * 32)
OWNERS = [SigningKey(bytes([i + 1]) * 32) for i in range(4)]
BY_PUB = {k.pubkey: k for k in OWNERS}
PMAP = PartitionMap.even(WORKERS)
Net = list[tuple[str, proto.Package]]


def subject_of(worker: int) -> str:
    return f"w.{worker}"


def package(sender: int, item: proto.Item) -> proto.Package:
    """``item`` alone in a package from worker ``sender`` (-1: the gateway)."""
    reply = subject_of(sender) if sender >= 0 else GATEWAY
    return proto.Package(proto.PROTOCOL_VERSION, sender, reply, PMAP.version, [item])


class CrashableVerifiers(Verifiers):
    """Real verifier processes; answers asked for before the worker's last crash are
    dropped, as they die with it (the processes are kept to spare the test restarts)."""

    def __init__(self, processes: int) -> None:
        super().__init__(processes)
        self.incarnation = 0

    def check(self, checks: list[Check], done: Done) -> None:
        asked_in = self.incarnation

        def answered(answer: int | None) -> None:
            if asked_in == self.incarnation:
                done(answer)

        super().check(checks, answered)


class Node:
    """One worker process: its ``Worker``, and what it sends into the network."""

    def __init__(
        self,
        me: int,
        folder: Path,
        cluster: Cluster,
        verifiers: CrashableVerifiers | None,
        slow: bool,
    ) -> None:
        self.me, self.folder, self.cluster, self.verifiers = me, folder, cluster, verifiers
        # A slow disk: blocks close 5 ms late, so that much happens (crashes too) between
        # a record and its durability.
        self.blocks = Batching(64, 5_000 if slow else 0)
        self.events_path = folder / f"w{me}.events"
        # Attempt numbers from the schedule's seed: a schedule replays exactly (save for
        # when verifier processes answer).
        self.attempts = random.Random(cluster.seed * WORKERS + me)
        self.shell = self._start()

    @property
    def worker(self) -> TwoPhaseCommit:
        return self.shell.engine

    def _start(self) -> Worker:
        shell = Worker(
            me=self.me,
            pmap=PMAP,
            issuers=frozenset([ISSUER.pubkey]),
            wal=BlockLog(self.folder / f"w{self.me}.log"),
            events=EventLog(self.events_path),
            blocks=self.blocks,
            prepare_timeout_ms=200,
            metrics=WorkerMetrics(),
            send=self._send,
            subject_of=subject_of,
            publish=lambda _: None,
            verifiers=self.verifiers,
            clock=lambda: self.cluster.now,
            draw=lambda: self.attempts.getrandbits(63),
        )
        shell.recover()
        return shell

    def _send(self, subject: str, item: proto.Item, lazy: bool = False) -> None:
        # One package per item: the network may reorder, lose or repeat each of them.
        self.cluster.net.append((subject, package(self.me, item)))

    def crash(self, unsynced: int = 0) -> None:
        """kill -9: what was not durable is gone (and the last ``unsynced`` bytes of the
        events log, as in a machine's crash); then recover from the log."""
        writer = self.shell.writer
        if writer._timer is not None:
            writer._timer.cancel()
        self.shell.wal.close()
        writer.events.close()
        if unsynced:
            size = self.events_path.stat().st_size
            os.truncate(self.events_path, max(0, size - unsynced))
        if self.verifiers is not None:
            self.verifiers.incarnation += 1
        self.shell = self._start()
        self.worker.ask_in_doubt(self.cluster.now, at_once=True)


class Cluster:
    def __init__(
        self, folder: Path, seed: int, verifiers: list[CrashableVerifiers], slow: bool
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0  # the schedule's clock: a step takes a millisecond
        self.net: Net = []
        self.nodes = [
            Node(w, folder, self, verifiers[w] if verifiers else None, slow) for w in range(WORKERS)
        ]
        self.results: dict[int, list[proto.Result]] = {}
        self.txs: dict[int, Transaction] = {}
        self.coins: dict[bytes, TxOutput] = {}  # every coin a payment may name (some never were)
        self.live: set[bytes] = set()  # issued, or created by a payment told it committed
        self.issued = 0
        self.forged: set[int] = set()  # payments signed with a key that does not own a coin

    def owner(self, coin_id: bytes) -> int:
        return PMAP.owners()[(coin_id[0] << 8) | coin_id[1]]

    async def settle_loop(self) -> None:
        """Let the event loop run what it scheduled (block flushes)."""
        for _ in range(3):
            await asyncio.sleep(0)

    def deliver(self, subject: str, package: proto.Package) -> None:
        if subject == GATEWAY:
            for item in package.items:
                assert isinstance(item, proto.Result)
                self.results.setdefault(item.rid, []).append(item)
                if not item.code:
                    self.live.update(self.txs[item.rid].output_ids)
            return
        self.nodes[int(subject.split(".")[1])].worker.handle(package)

    def gateway_send(self, worker: int, item: proto.Item) -> None:
        self.net.append((subject_of(worker), package(-1, item)))

    async def fund(self, count: int) -> None:
        outputs = [TxOutput(self.rng.randrange(1_000, 100_000), k.pubkey) for k in OWNERS]
        issuance = Issuance(ISSUER.pubkey, 0, outputs * (count // len(OWNERS)))
        issuance = issuance.signed_by(ISSUER.secret)
        for w in sorted({self.owner(c) for c in issuance.output_ids}):
            self.nodes[w].worker.handle(package(-1, proto.Issue(0, issuance.encode())))
        for node in self.nodes:
            node.shell.writer.flush()  # the issuance's answers, not a payment's
        await self.settle_loop()
        self.coins.update(zip(issuance.output_ids, issuance.outputs, strict=True))
        self.live.update(issuance.output_ids)
        self.issued = issuance.total_msat
        self.net.clear()

    def payment(self, rid: int) -> None:
        """A payment from 1-2 random coins to 1-3 outputs; mostly coins that exist or did
        (spent ones too), else any ever named; every 16th with a bad signature."""
        pool = self.live if self.rng.random() < 0.8 else self.coins
        picks = self.rng.sample(sorted(pool), self.rng.randint(1, 2))
        total = sum(self.coins[c].value_msat for c in picks)
        n_out = min(self.rng.randint(1, 3), total)
        fee = self.rng.randint(0, min(50, total - n_out))
        values = [1] * (n_out - 1) + [total - fee - (n_out - 1)]
        outputs = [TxOutput(v, self.rng.choice(OWNERS).pubkey) for v in values]
        tx = Transaction([TxInput(c, self.coins[c].value_msat) for c in picks], outputs, fee)
        keys = [BY_PUB[self.coins[c].owner] for c in picks]
        forged = rid % 16 == 5
        if forged:
            k = self.rng.randrange(len(keys))
            keys[k] = OWNERS[(OWNERS.index(keys[k]) + 1) % len(OWNERS)]
        signed = sign_transaction(tx, keys)
        if forged:
            self.forged.add(rid)
        self.txs[rid] = signed
        self.coins.update(zip(signed.output_ids, signed.outputs, strict=True))
        self.gateway_send(self.owner(picks[0]), proto.Submit(rid, signed.encode()))

    async def step(self) -> None:
        """One random event of the schedule."""
        self.now += 0.001
        roll = self.rng.random()
        if roll < 0.55 and self.net:
            subject, package = self.net.pop(self.rng.randrange(len(self.net)))
            fate = self.rng.random()
            if fate < 0.05:
                return  # lost
            if fate < 0.10:
                self.net.append((subject, package))  # delivered again later
            self.deliver(subject, package)
        elif roll < 0.75:
            self.payment(len(self.txs))
        elif roll < 0.80:  # the roll also picks how much of the events log is lost
            unsynced = (0, 7, 300, 10_000)[int((roll - 0.75) * 80)]
            self.rng.choice(self.nodes).crash(unsynced)
        elif roll < 0.85:
            node = self.rng.choice(self.nodes)
            node.worker.expire(float("inf"))
            node.worker.ask_in_doubt(self.now, at_once=True)
            node.worker.retell(self.now, at_once=True)
        elif roll < 0.88:
            await asyncio.sleep(0.012)  # lazy records are written
        await self.settle_loop()

    async def heal(self) -> None:
        """No more faults: deliver everything and write every block, until nothing
        moves; then fire timeouts (what could still finish has finished), and again."""
        for _ in range(200):
            while self.net:
                self.deliver(*self.net.pop(0))
                await self.settle_loop()
                if not self.net:
                    for node in self.nodes:
                        node.shell.writer.flush()
                    await self.settle_loop()
            busy = False
            for node in self.nodes:
                worker = node.worker
                busy = busy or bool(worker.coordinating or worker.in_doubt or worker.decided)
                if node.verifiers is not None and node.verifiers.in_flight:
                    busy = True
                    await asyncio.sleep(0.005)
                worker.expire(float("inf"))
                worker.ask_in_doubt(self.now, at_once=True)
                worker.retell(self.now, at_once=True)
                node.shell.writer.flush()
            await self.settle_loop()
            if not busy and not self.net:
                return
        raise AssertionError("the cluster did not settle")

    def committed(self) -> Iterator[int]:
        """The payments a client was told are committed."""
        for rid, results in self.results.items():
            if any(not r.code for r in results):
                yield rid


@pytest.fixture(scope="module")
def verifier_processes() -> Iterator[list[CrashableVerifiers]]:
    pools = [CrashableVerifiers(1) for _ in range(WORKERS)]

    async def start() -> None:
        await asyncio.gather(*(pool.start() for pool in pools))

    asyncio.run(start())
    yield pools
    for pool in pools:
        pool.close()


@pytest.mark.parametrize("seed", range(16))
async def test_random_fault_schedules_keep_every_promise(tmp_path: Path, seed: int) -> None:
    await run_schedule(tmp_path, seed, [])


@pytest.mark.parametrize("seed", range(100, 106))
async def test_random_fault_schedules_with_verifier_processes(
    tmp_path: Path, seed: int, verifier_processes: list[CrashableVerifiers]
) -> None:
    for pool in verifier_processes:
        pool.incarnation += 1  # nothing of an earlier schedule reaches this one
    await run_schedule(tmp_path, seed, verifier_processes)


async def run_schedule(tmp_path: Path, seed: int, verifiers: list[CrashableVerifiers]) -> None:
    cluster = Cluster(tmp_path, seed, verifiers, slow=seed % 2 == 1)
    await cluster.fund(24)
    for _ in range(400):
        await cluster.step()
    await cluster.heal()
    why = f"(seed {seed})"

    states = [node.worker.state for node in cluster.nodes]
    spent: dict[bytes, bytes] = {}
    for state in states:
        state.check_invariants()
        assert not state.locks and not state.pending, f"a lock was left {why}"
        for cid, txid in state.spent.items():
            assert cid not in spent, f"coin {cid.hex()} spent twice {why}"
            spent[cid] = txid
    acknowledged = [cluster.txs[rid] for rid in cluster.committed()]
    assert acknowledged, f"the schedule committed nothing {why}"
    assert cluster.forged, f"the schedule forged no signature {why}"
    assert not cluster.forged & set(cluster.committed()), f"a forged payment committed {why}"
    # A forgery may share its txid with an honest payment (witnesses are not part of it):
    # every committed transaction must be one that was honestly signed.
    honest = {tx.txid for rid, tx in cluster.txs.items() if rid not in cluster.forged}
    assert set(spent.values()) <= honest, f"a forged spend committed {why}"
    for tx in acknowledged:
        for cid, _ in tx.inputs:
            assert spent.get(cid) == tx.txid, f"an acknowledged spend is missing {why}"
        for cid in tx.output_ids:
            held = states[cluster.owner(cid)]
            assert cid in held.coins or cid in held.spent, f"an acknowledged output is lost {why}"
    fees = sum(s.fees_msat for s in states)
    assert sum(s.held_msat for s in states) + fees == cluster.issued, f"value changed {why}"
    for node in cluster.nodes:
        assert not node.worker.in_doubt and not node.worker.coordinating, why
        assert not node.worker.decided, f"a commit is remembered after every Done {why}"

    # What each worker holds, its log alone rebuilds.
    for node in cluster.nodes:
        before = node.worker.state
        node.crash()
        after = node.worker.state
        assert after.coins == before.coins and after.spent == before.spent, why
        assert after.fees_msat == before.fees_msat and not after.locks, why
        assert not node.worker.decided, f"a log forgot that a commit ended {why}"

    # Every block's events, as the block log derives them afresh, and they add up.
    for node in cluster.nodes:
        kept = all_events(node.shell)
        node.events_path.unlink()
        node.crash()
        assert all_events(node.shell) == kept, f"the events log differs from its blocks {why}"
        created: set[bytes] = set()
        spent_here: set[bytes] = set()
        prev = -1
        for ev in map(proto.decode_block_events, kept):
            assert ev.prev == prev, why
            prev = ev.height
            for c in ev.changes:
                (created if c.created else spent_here).add(c.coin_id)
        state = node.worker.state
        assert created - spent_here == set(state.coins), f"events miss a change {why}"
        assert spent_here == set(state.spent), f"events miss a spend {why}"


def all_events(worker: Worker) -> list[bytes]:
    return worker.writer.events.read_after(-1, 1 << 40)


async def test_a_late_vote_of_an_aborted_attempt_does_not_count_in_the_next(
    tmp_path: Path,
) -> None:
    """Attempt A times out at the coordinator after the participant voted YES; the client
    submits the same transaction again (attempt B). A's YES arriving during B must not
    count: the participant may still refuse B (here it is in doubt about A, so it must)."""
    cluster = Cluster(tmp_path, 0, [], slow=False)
    await cluster.fund(24)
    a = next(c for c in sorted(cluster.live) if cluster.owner(c) == 0)
    b = next(c for c in sorted(cluster.live) if cluster.owner(c) == 1)
    coins = [cluster.coins[a], cluster.coins[b]]
    total = sum(c.value_msat for c in coins)
    tx = Transaction(
        [TxInput(a, coins[0].value_msat), TxInput(b, coins[1].value_msat)],
        [TxOutput(total, OWNERS[0].pubkey)],
    )
    signed = sign_transaction(tx, [BY_PUB[c.owner] for c in coins])
    w0, w1 = cluster.nodes[0].worker, cluster.nodes[1].worker

    async def run(item: proto.Item, worker: TwoPhaseCommit, sender: int) -> list[proto.Item]:
        worker.handle(package(sender, item))
        await cluster.settle_loop()
        sent = [i for _, p in cluster.net for i in p.items]
        cluster.net.clear()
        return sent

    [prepare_a] = await run(proto.Submit(1, signed.encode()), w0, -1)
    [yes_a] = await run(prepare_a, w1, 0)
    assert isinstance(yes_a, proto.Vote) and not yes_a.code
    w0.expire(float("inf"))  # A times out; its Decide(abort) to worker 1 is lost
    cluster.net.clear()
    [prepare_b] = await run(proto.Submit(2, signed.encode()), w0, -1)
    assert isinstance(prepare_b, proto.Prepare) and prepare_b.attempt != yes_a.attempt
    told = await run(yes_a, w0, 1)  # the late YES of A
    assert told == [proto.Decide(signed.txid, False, yes_a.attempt)]
    assert signed.txid in w0.coordinating and signed.txid not in w0.decided
    [refusal] = await run(prepare_b, w1, 0)  # still in doubt about A
    assert isinstance(refusal, proto.Vote) and refusal.code == "ledger.in_flight"
    sent = await run(refusal, w0, 1)
    [result] = [i for i in sent if isinstance(i, proto.Result)]
    assert result.rid == 2 and result.code == "ledger.in_flight"
    assert proto.Decide(signed.txid, False, prepare_b.attempt) in sent
    assert not w0.state.locks and w1.state.locks  # worker 1 waits to learn A's outcome
    w1.ask_in_doubt(cluster.now, at_once=True)
    [ask] = [i for _, p in cluster.net for i in p.items]
    cluster.net.clear()
    [abort_a] = await run(ask, w0, 1)
    await run(abort_a, w1, 0)
    assert not w1.state.locks and not w1.in_doubt


async def test_a_request_sent_again_after_its_refusal_hears_the_refusal_again(
    tmp_path: Path,
) -> None:
    """A gateway sends a request again when no answer came in time (the leader may have
    died). If the first was refused meanwhile (here: timed out), the copy that refused it
    answers the same again rather than starting a new attempt that could commit after
    the client was told of the refusal. A new request (another id) is a new attempt."""
    cluster = Cluster(tmp_path, 0, [], slow=False)
    await cluster.fund(24)
    a = next(c for c in sorted(cluster.live) if cluster.owner(c) == 0)
    b = next(c for c in sorted(cluster.live) if cluster.owner(c) == 1)
    coins = [cluster.coins[a], cluster.coins[b]]
    tx = Transaction(
        [TxInput(a, coins[0].value_msat), TxInput(b, coins[1].value_msat)],
        [TxOutput(sum(c.value_msat for c in coins), OWNERS[0].pubkey)],
    )
    signed = sign_transaction(tx, [BY_PUB[c.owner] for c in coins])
    w0 = cluster.nodes[0].worker

    async def run(item: proto.Item) -> list[proto.Item]:
        w0.handle(package(-1, item))
        await cluster.settle_loop()
        sent = [i for _, p in cluster.net for i in p.items]
        cluster.net.clear()
        return sent

    [prepare] = await run(proto.Submit(1, signed.encode()))
    assert isinstance(prepare, proto.Prepare)
    w0.expire(float("inf"))  # no vote came: aborted
    await cluster.settle_loop()
    told = [i for _, p in cluster.net for i in p.items if isinstance(i, proto.Result)]
    cluster.net.clear()
    assert [(r.rid, r.code) for r in told] == [(1, "ledger.timeout")]
    assert await run(proto.Submit(1, signed.encode())) == told  # the same, nothing new
    [again] = await run(proto.Submit(2, signed.encode()))  # the client retries anew
    assert isinstance(again, proto.Prepare) and again.attempt != prepare.attempt
