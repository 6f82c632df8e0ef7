"""The simulated guild running the real ledger: operator 0's two workers, each a shard
replicated at six copies, with the production two-phase commit engine at every copy.

The leader of a shard runs its ``TwoPhaseCommit`` live through ``LedgerShard`` (the
production adapter): it takes packages, writes records, and its records become the
shard's blocks; what waits for the disk in a worker waits for the block's confirmation.
Followers replay the blocks (``LedgerExecutor``).
Packages between workers go to whichever copy leads the destination shard, over the
same faulty network. Wallets pay each other with signed transactions, most of them
across both shards, and retry until they hear how it ended.

At the end, on top of the replication checks: every payment made before the heal was
acknowledged; each transaction is all or nothing across the shards (every input spent
by it and every output created, or none); nothing stays locked; value is conserved
(coins plus fees equal what was issued); each wallet's view equals the ledger.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from constellation.errors import AlreadyCommitted
from constellation.keys import SigningKey
from constellation.ledger.commit import TwoPhaseCommit
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import Ready, Role
from constellation.replication.shard import LedgerExecutor, LedgerShard, ShardLog
from constellation.sighash import sighash
from constellation.tx import (
    HERE,
    Issuance,
    Transaction,
    TxInput,
    TxOutput,
    decode_transaction,
    ledger_id,
)
from tests.sim.guild import RETRY_S, Copy, Guild, Violation

PMAP = PartitionMap.even(2)
OWNERS = PMAP.owners()
ISSUER = SigningKey(hashlib.sha256(b"issuer").digest())
WALLETS = [SigningKey(hashlib.sha256(b"wallet %d" % i).digest()) for i in range(6)]
OTHER_LEDGER = ledger_id(SigningKey(hashlib.sha256(b"another operator").digest()).pubkey)
GENESIS = Issuance(
    ISSUER.pubkey, 0, [TxOutput(10_000 + i, WALLETS[i % len(WALLETS)].pubkey) for i in range(36)]
).signed_by(ISSUER.secret)


def worker_of(coin_id: bytes) -> int:
    return OWNERS[(coin_id[0] << 8) | coin_id[1]]


@dataclass
class Node:
    """A copy's ledger, and what its engine sent in this step."""

    shard: LedgerShard
    outbox: list[tuple[str, proto.Item]] = field(default_factory=list)

    @property
    def engine(self) -> TwoPhaseCommit:
        return self.shard.engine


@dataclass
class Payment:
    tx: Transaction
    payer: int
    at: float
    done: bool = False


class LedgerGuild(Guild):
    def __init__(self, seed: int, operators: int = 3, change: str = "") -> None:
        self.nodes: dict[tuple[int, int], Node] = {}
        super().__init__(seed, operators, shards=[(0, 0), (0, 1)], change=change)
        self.wallets: list[dict[bytes, int]] = [{} for _ in WALLETS]
        self.busy: set[int] = set()  # wallets with a payment in flight
        self.outbound = 0  # paid to another ledger by committed payments
        self.payments: dict[bytes, Payment] = {}
        self.rids: dict[int, tuple[str, bytes]] = {}  # rid -> ("issue", shard) | ("pay", txid)
        self.next_rid = 1
        self.issued: set[int] = set()  # shards that applied the genesis issuance

    # -- the application at each copy ----------------------------------------------------

    def _executor(self, m: int, s: int) -> LedgerExecutor:
        log = ShardLog()
        outbox: list[tuple[str, proto.Item]] = []
        engine = TwoPhaseCommit(
            me=self.shard_ids[s][1],
            pmap=PMAP,
            issuers=frozenset([ISSUER.pubkey]),
            prepare_timeout_ms=300,
            send=lambda subject, item, lazy=False: outbox.append((subject, item)),
            subject_of=lambda w: f"w{w}",
            log=log,
            clock=functools.partial(self._clock, m),
            draw=functools.partial(self.rng.randrange, 1, 1 << 31),
        )
        shard = LedgerShard(engine, log)
        self.nodes[(m, s)] = Node(shard, outbox)
        return shard.executor

    def _propose(self, c: Copy) -> None:
        m = c.replica.me
        self.nodes[(m, c.shard)].shard.tick(c.replica, self._clock(m))
        self._route(m, c.shard)

    def _change_members(self, m: int, c: Copy) -> rp.Members | None:
        return self.nodes[(m, c.shard)].shard.change_members(c.replica)

    def _on_ready(self, m: int, c: Copy, ready: Ready) -> None:
        node = self.nodes[(m, c.shard)]
        if ready.leading is not None:
            node.shard.leading(ready.leading, c.replica)
            node.outbox.clear()
        if ready.confirmed and c.replica.role is Role.LEADER:
            node.shard.confirmed(ready.confirmed)
        self._route(m, c.shard)

    def _route(self, m: int, s: int) -> None:
        """Send what the engine of copy ``m`` of shard ``s`` queued: to the leaders of
        other shards, or to clients."""
        node = self.nodes[(m, s)]
        if not node.outbox or not self.up[m]:
            node.outbox.clear()
            return
        out, node.outbox[:] = list(node.outbox), []
        worker = self.shard_ids[s][1]
        for subject, item in out:
            delay = self.rng.uniform(0.0005, 0.003)
            if subject.startswith("c"):
                self._at(self.now + delay, functools.partial(self._answer, item))
                continue
            dest = self.shard_ids.index((0, int(subject[1:])))
            pkg = proto.Package(proto.PROTOCOL_VERSION, worker, f"w{worker}", PMAP.version, [item])
            self._package(m, dest, proto.encode(pkg), delay)

    def _package(self, src: int, shard: int, data: bytes, delay: float) -> None:
        """A package for a shard's leader, over the network (as NATS would carry it to
        the one copy subscribed: the leader)."""
        for m in range(self.machines):
            if self._runnable(m) and self.copies[(m, shard)].replica.role is Role.LEADER:
                if src >= 0 and ((src, m) in self.blocked or self.rng.random() < self.loss):
                    return
                self._at(self.now + delay, functools.partial(self._handle, m, shard, data))
                return

    def _handle(self, m: int, s: int, data: bytes) -> None:
        if not self.up[m]:
            return
        if self.paused_until[m] > self.now:
            self._at(self.paused_until[m], functools.partial(self._handle, m, s, data))
            return
        node = self.nodes[(m, s)]
        if not node.shard.accepting(self.copies[(m, s)].replica):
            return  # not subscribed (yet, or any more)
        node.engine.handle(proto.decode_package(data))
        self._route(m, s)

    # -- wallets -------------------------------------------------------------------------

    def _client(self, items: list[proto.Item], shard: int) -> None:
        rid = self.next_rid
        self.next_rid += 1
        first = items[0]
        if isinstance(first, proto.Issue):
            items = [proto.Issue(rid, first.issuance)]
            self.rids[rid] = ("issue", bytes([shard]))
        elif isinstance(first, proto.Submit):
            items = [proto.Submit(rid, first.tx)]
            self.rids[rid] = ("pay", decode_transaction(first.tx).txid)
        pkg = proto.Package(proto.PROTOCOL_VERSION, -1, f"c{rid}", PMAP.version, items)
        self._package(-1, shard, proto.encode(pkg), self.rng.uniform(0.0005, 0.003))

    def _issue(self) -> None:
        for s in range(self.shards):
            if s not in self.issued:
                self._client([proto.Issue(0, GENESIS.encode())], s)
        if len(self.issued) < self.shards:
            self._at(self.now + RETRY_S, self._issue)

    def _answer(self, item: proto.Item) -> None:
        if not isinstance(item, proto.Result) or item.rid not in self.rids:
            return
        kind, key = self.rids.pop(item.rid)
        ok = not item.code or item.code == AlreadyCommitted.code
        if kind == "issue":
            if ok and key[0] not in self.issued:
                self.issued.add(key[0])
                if len(self.issued) == self.shards:
                    for cid, out in zip(GENESIS.output_ids, GENESIS.outputs, strict=True):
                        self.wallets[self._wallet(out.owner)][cid] = out.value_msat
            return
        payment = self.payments[key]
        if ok and not payment.done:
            payment.done = True
            self.busy.discard(payment.payer)
            for inp in payment.tx.inputs:
                del self.wallets[payment.payer][inp.coin_id]
            tx = payment.tx
            for i, (cid, out) in enumerate(zip(tx.output_ids, tx.outputs, strict=True)):
                if tx.here(i):
                    self.wallets[self._wallet(out.owner)][cid] = out.value_msat
                else:
                    self.outbound += out.value_msat

    def _wallet(self, owner: bytes) -> int:
        return next(i for i, k in enumerate(WALLETS) if k.pubkey == owner)

    def _new_payment(self) -> None:
        idle = [i for i, w in enumerate(self.wallets) if w and i not in self.busy]
        if not idle:
            return
        payer = self.rng.choice(idle)
        coins = self.rng.sample(sorted(self.wallets[payer]), min(2, len(self.wallets[payer])))
        total = sum(self.wallets[payer][c] for c in coins)
        fee = self.rng.randint(0, min(3, total - 1))
        payee = WALLETS[self.rng.randrange(len(WALLETS))].pubkey
        outputs = [TxOutput(total - fee, payee)]
        ledgers: list[bytes] = []
        if total - fee > 2:
            half = (total - fee) // 2
            outputs = [TxOutput(half, payee), TxOutput(total - fee - half, WALLETS[payer].pubkey)]
            if self.rng.random() < 0.25:  # the payee's coins are at another operator
                ledgers = [OTHER_LEDGER, HERE]
        tx = Transaction(
            [TxInput(c, self.wallets[payer][c]) for c in coins], outputs, fee, ledgers=ledgers
        )
        key = WALLETS[payer]
        tx = tx.with_witnesses(
            [
                key.sign(sighash(tx.txid, i, inp.value_msat, key.pubkey), bytes(32))
                for i, inp in enumerate(tx.inputs)
            ]
        )
        self.busy.add(payer)
        self.payments[tx.txid] = Payment(tx, payer, self.now)
        self._try(tx.txid)

    def _try(self, txid: bytes) -> None:
        payment = self.payments[txid]
        if payment.done:
            return
        first = worker_of(payment.tx.inputs[0].coin_id)
        self._client([proto.Submit(0, payment.tx.encode())], self.shard_ids.index((0, first)))
        self._at(self.now + RETRY_S, functools.partial(self._try, txid))

    def _workload(self, end_s: float) -> None:
        self._at(0.2, self._issue)
        t = 0.5
        while t < end_s - 2.0:
            t += self.rng.expovariate(60.0)
            self._at(t, self._new_payment)

    # -- the end -------------------------------------------------------------------------

    def _check_app(self, heal_s: float) -> None:
        engines = [self.nodes[(self.leader_copy(s).replica.me, s)].engine for s in range(2)]
        late = [p for p in self.payments.values() if not p.done]
        if len(self.issued) < self.shards or late:
            raise Violation(f"{len(late)} payments were never answered")
        for engine in engines:
            engine.state.check_invariants()
            if engine.state.pending or engine.in_doubt:
                raise Violation(f"worker {engine.me}: transactions still locked at the end")
        issued = sum(e.state.issued_msat for e in engines)
        held = sum(e.state.held_msat + e.state.fees_msat for e in engines)
        outbound = sum(e.state.outbound_msat for e in engines)
        if outbound != self.outbound:
            raise Violation(f"{outbound} msat recorded as paid out, {self.outbound} committed")
        if issued != sum(o.value_msat for o in GENESIS.outputs) or held + outbound != issued:
            raise Violation(
                f"value not conserved: {held} held and paid in fees, {outbound} paid to"
                f" another ledger, {issued} issued"
            )
        for txid, payment in self.payments.items():
            spent = [engines[worker_of(c)].state.spent.get(c) == txid for c, _ in payment.tx.inputs]
            made = [
                cid in engines[worker_of(cid)].state.coins
                or cid in engines[worker_of(cid)].state.spent
                for i, cid in enumerate(payment.tx.output_ids)
                if payment.tx.here(i)
            ]
            if len(set(spent + made)) != 1 or (payment.done and not spent[0]):
                raise Violation(f"transaction {txid.hex()[:16]} is not all or nothing")
        for i, wallet in enumerate(self.wallets):
            held_coins = {
                cid: value
                for e in engines
                for cid, (value, owner) in e.state.coins.items()
                if owner == WALLETS[i].pubkey
            }
            if held_coins != wallet:
                raise Violation(f"wallet {i} sees other coins than the ledger holds")
