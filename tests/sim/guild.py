"""A deterministic simulator of a guild's replication (TigerBeetle's VOPR, in small).

One process, one seeded PRNG, a fake clock and an event queue. Every operator has two
machines; every machine holds one copy of every shard (copy ``2 * operator + machine``),
a real ``Replica`` over a simulated disk. The network delays, loses, duplicates and
reorders messages (all encoded and decoded as on the wire) and can be partitioned, one
way or both. Faults come from a weighted schedule until ``heal_s``: crashes (at rest, or
between a step's fsync and its sends, or during a write, tearing it), corrupt log tails,
two machines or a whole operator and one more down, power loss of every machine, long
pauses of a leader, forward clock jumps, partitions. Then everything heals and the guild
must make progress again.

An oracle sees every copy. After every event it checks that no two confirmed blocks sit
at one (shard, height) and no two leaders lead one (shard, term), and that no message
loop floods the network; at the end, that no confirmed block was lost, every
acknowledged payment is in the confirmed log exactly once, every copy has caught up with
its leader to the same state root, and a leader confirms payments again.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from constellation.errors import ConstellationError
from constellation.keys import SigningKey
from constellation.protocol import replication as rp
from constellation.replication import members as mb
from constellation.replication.replica import EVERYONE, Executor, Ready, Replica, Role, Settings
from services.replica.store import Loaded

SETTINGS = Settings(
    heartbeat_s=0.05,
    election_s=0.3,
    window=4,
    snapshot_every=24,
    keep=8,
    chunk_bytes=512,
)
TICK_S = 0.01
MESSAGES_PER_TENTH = 5_000  # about 30 times the usual: more is a loop with no timer in it
RETRY_S = 0.4  # a client resubmits a payment not acknowledged in this long


class Violation(AssertionError):
    pass


class Payments:
    """A toy shard state for the replication tests: payment id -> amount, each id once
    (a repeated id makes a block invalid, so a payment cannot land twice)."""

    def __init__(self) -> None:
        self.state: dict[int, int] = {}
        self._root: bytes | None = None

    def execute(self, body: bytes, signatures: bool) -> bytes:
        items = decode_body(body)
        for pid, amount in items:
            if pid in self.state or amount <= 0:
                raise ConstellationError(f"payment {pid} again, or of {amount}")
            self.state[pid] = amount
        if items:
            self._root = None
        return self.root()

    def root(self) -> bytes:
        if self._root is None:
            self._root = hashlib.sha256(msgspec.msgpack.encode(sorted(self.state.items()))).digest()
        return self._root

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(sorted(self.state.items()))

    def restore(self, data: bytes) -> bytes:
        try:
            items = msgspec.msgpack.decode(data, type=list[tuple[int, int]])
        except msgspec.DecodeError as exc:
            raise ConstellationError(f"malformed snapshot: {exc}") from None
        self.state = dict(items)
        self._root = None
        return self.root()


def decode_body(body: bytes) -> list[tuple[int, int]]:
    if not body:
        return []
    try:
        return msgspec.msgpack.decode(body, type=list[tuple[int, int]])
    except msgspec.DecodeError as exc:
        raise ConstellationError(f"malformed body: {exc}") from None


class Disk(Loaded):
    """What one copy persisted, in memory: exactly what survives a crash."""

    def write(self, r: Ready, upto: int | None = None) -> None:
        """Persist a Ready (``upto``: only that many of its appends, a torn write)."""
        if r.hard:
            self.hard = r.hard
        if r.snapshot:
            self.snapshot = r.snapshot
        if r.truncate is not None:
            self.blocks = [b for b in self.blocks if b.signed.header.height <= r.truncate]
        self.blocks += r.append if upto is None else r.append[:upto]
        if r.compact:
            self.blocks = [b for b in self.blocks if b.signed.header.height > r.compact]


@dataclass
class Copy:
    """One copy of one shard on a machine, with the leader's side of the application
    (``queue`` and ``waiting``: the toy payments')."""

    shard: int
    replica: Replica
    app: Executor
    disk: Disk
    queue: dict[int, int] = field(default_factory=dict)  # pid -> amount, to propose
    waiting: dict[int, list[int]] = field(default_factory=dict)  # height -> pids
    reported: int = 0  # the confirmed height the oracle has checked


class Guild:
    """The simulated guild, with the toy ``Payments`` as every shard's state; subclasses
    run another application through the hooks ``_executor``, ``_propose``, ``_on_ready``,
    ``_workload`` and ``_check_app``."""

    def __init__(
        self,
        seed: int,
        operators: int = 3,
        shards: list[tuple[int, int]] | None = None,
        change: str = "",
    ) -> None:
        """``change``: "join" (a new operator joins the ``operators``), "leave" (one of
        them leaves) or "join-leave" (one joins, then leaves: the founders' voters
        again), driven through every shard's log while the faults go on."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.change = change
        founders = list(range(operators))
        voters = [founders]
        if change.startswith("join"):
            voters.append([*founders, operators])
            operators += 1
        if change.endswith("leave"):
            leaver = operators - 1 if change == "join-leave" else self.rng.randrange(operators)
            voters.append([op for op in voters[-1] if op != leaver])
        self.members = mb.agreed(voters)
        self.steps = self.members[1:]
        self.operators = operators
        self.machines = 2 * operators
        # (owner, worker) of each shard; by default one shard each of two operators
        self.shard_ids = shards or [(0, 0), (1, 0)]
        self.shards = len(self.shard_ids)
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.keys = [SigningKey(hashlib.sha256(b"op%d" % i).digest()) for i in range(operators)]
        self.up = [True] * self.machines
        self.paused_until = [0.0] * self.machines
        self.offset = [0.0] * self.machines
        self.blocked: set[tuple[int, int]] = set()  # (from machine, to machine)
        self.loss = 0.0
        self.crash_at_write: dict[int, str] = {}  # machine -> "after" | "torn"
        self.sent: dict[int, int] = {}  # tenth of a second -> messages sent
        self.copies: dict[tuple[int, int], Copy] = {}
        # oracle
        self.confirmed: dict[tuple[int, int], bytes] = {}  # (shard, height) -> hash
        self.leaders: dict[tuple[int, int], int] = {}  # (shard, term) -> copy
        self.acked: dict[int, int] = {}  # pid -> amount
        self.submitted: dict[int, tuple[int, int, float]] = {}  # pid -> (shard, amount, at)
        self.next_pid = 1
        self.last_confirm_at = [0.0] * self.shards
        self.log: list[str] = []
        for m in range(self.machines):
            for s in range(self.shards):
                self.copies[(m, s)] = self._start(m, s, Disk())
            self._at(self.rng.uniform(0, TICK_S), functools.partial(self._tick, m))

    # -- plumbing ------------------------------------------------------------------------

    def _at(self, t: float, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, action))

    def _executor(self, m: int, s: int) -> Executor:
        """A fresh state machine for copy ``m`` of shard ``s`` (a start or restart)."""
        return Payments()

    def _start(self, m: int, s: int, disk: Disk) -> Copy:
        app = self._executor(m, s)
        owner, worker = self.shard_ids[s]
        clock = functools.partial(self._clock, m)
        replica = restart(
            disk, owner, worker, m, self.keys, app, clock, self.rng.random, SETTINGS, self.members
        )
        return Copy(s, replica, app, disk)

    def _clock(self, m: int) -> float:
        return self.now + self.offset[m]

    def _runnable(self, m: int) -> bool:
        return self.up[m] and self.paused_until[m] <= self.now

    def _tick(self, m: int) -> None:
        self._at(max(self.now, self.paused_until[m]) + TICK_S, lambda: self._tick(m))
        if not self._runnable(m):
            return
        for s in range(self.shards):
            if not self.up[m]:
                return  # crashed while writing another shard's step
            c = self.copies[(m, s)]
            c.replica.tick()
            self._propose(c)
            self._flush(m, c)

    def _propose(self, c: Copy) -> None:
        """A tick of the copy's application (the leader's proposals)."""
        r = c.replica
        assert isinstance(c.app, Payments)
        if not c.queue or not r.can_propose():
            return
        batch = [(pid, amt) for pid, amt in c.queue.items() if pid not in c.app.state][:16]
        # Already in the log (a retry): acknowledged once the log so far is confirmed.
        c.waiting.setdefault(r.last, []).extend(p for p in c.queue if p in c.app.state)
        c.queue.clear()
        if not batch:
            return
        body = msgspec.msgpack.encode(batch)
        root = c.app.execute(body, True)
        height = r.propose(body, root)
        c.waiting[height] = [pid for pid, _ in batch]

    def _flush(self, m: int, c: Copy) -> None:
        r = c.replica
        while True:
            ready = r.ready()
            if ready.empty():
                return
            crash = self.crash_at_write.pop(m, None) if ready.append else None
            if crash == "torn":
                c.disk.write(ready, upto=self.rng.randrange(len(ready.append)))
                self._crash(m, "torn write")
                return
            c.disk.write(ready)
            if crash == "after":
                self._crash(m, "after fsync, before sending")
                return
            for to, msg in ready.messages:
                for dest in range(self.machines) if to == EVERYONE else [to]:
                    if dest != m:
                        self._send(m, dest, c.shard, msg)
            if ready.repaired:
                c.disk.damaged = False
            r.stored(ready.last)
            if ready.leading:
                key = (c.shard, r.term)
                if self.leaders.setdefault(key, m) != m:
                    raise Violation(f"two leaders of shard {c.shard} in term {r.term}")
            if ready.confirmed:
                self._check_confirmed(c)
            self._on_ready(m, c, ready)

    def _on_ready(self, m: int, c: Copy, ready: Ready) -> None:
        """The application's part of a step: leadership gained or lost, confirmations."""
        if ready.leading is not None:
            c.queue.clear()
            c.waiting.clear()
        r = c.replica
        if ready.confirmed and r.role is Role.LEADER:
            for h in [h for h in c.waiting if h <= r.confirmed]:
                for pid in c.waiting.pop(h):
                    self.acked[pid] = self.submitted[pid][1]

    def _check_confirmed(self, c: Copy) -> None:
        r = c.replica
        for h in range(max(c.reported + 1, r.first), r.confirmed + 1):
            digest = r.hash_at(h)
            known = self.confirmed.setdefault((c.shard, h), digest)
            if known != digest:
                raise Violation(f"shard {c.shard}: two confirmed blocks at height {h}")
        if r.snap.height == r.confirmed and r.snap.height > c.reported:
            at = self.confirmed.get((c.shard, r.snap.height))
            if at is not None and at != r.snap.hash:
                raise Violation(f"shard {c.shard}: a snapshot off the confirmed chain")
        c.reported = r.confirmed
        if r.role is Role.LEADER:
            self.last_confirm_at[c.shard] = self.now

    def _send(self, src: int, dst: int, shard: int, msg: rp.Message) -> None:
        bucket = int(self.now * 10)
        self.sent[bucket] = self.sent.get(bucket, 0) + 1
        if self.sent[bucket] > MESSAGES_PER_TENTH:
            raise Violation(f"{MESSAGES_PER_TENTH} messages in 0.1 s: a message loop")
        if not self.up[src] or (src, dst) in self.blocked or self.rng.random() < self.loss:
            return
        data = rp.encode(rp.Envelope(*self.shard_ids[shard], src, msg))
        delay = self.rng.uniform(0.0005, 0.003)
        if self.rng.random() < 0.02:
            delay += self.rng.uniform(0.01, 0.1)  # reordered behind later messages
        self._at(self.now + delay, lambda: self._deliver(dst, shard, data))
        if self.rng.random() < 0.01:
            self._at(self.now + delay * 2, lambda: self._deliver(dst, shard, data))

    def _deliver(self, dst: int, shard: int, data: bytes) -> None:
        if not self.up[dst]:
            return
        if self.paused_until[dst] > self.now:
            self._at(self.paused_until[dst], lambda: self._deliver(dst, shard, data))
            return
        env = rp.decode(data)
        c = self.copies[(dst, shard)]
        c.replica.step(env.sender, env.msg)
        self._flush(dst, c)

    # -- clients -------------------------------------------------------------------------

    def _submit(self, pid: int) -> None:
        """Send a payment to its shard's leader; again after RETRY_S until acknowledged."""
        if pid in self.acked:
            return
        shard, amount, _ = self.submitted[pid]
        for m in range(self.machines):
            c = self.copies[(m, shard)]
            if self._runnable(m) and c.replica.role is Role.LEADER:
                c.queue[pid] = amount
                break
        self._at(self.now + RETRY_S, lambda: self._submit(pid))

    def _new_payment(self) -> None:
        pid = self.next_pid
        self.next_pid += 1
        self.submitted[pid] = (self.rng.randrange(self.shards), self.rng.randint(1, 1000), self.now)
        self._submit(pid)

    # -- faults --------------------------------------------------------------------------

    def _crash(self, m: int, why: str, down_s: float | None = None) -> None:
        if not self.up[m]:
            return
        self.up[m] = False
        self.log.append(f"{self.now:.3f} crash machine {m} ({why})")
        self._at(self.now + (down_s or self.rng.uniform(0.05, 1.0)), lambda: self._restart(m))

    def _restart(self, m: int) -> None:
        if self.up[m]:
            return
        # One corrupt disk at a time (the fault model): copies that may have lost acked
        # blocks do not vote, so with more the guild rightly stalls.
        damaged = any(c.disk.damaged for c in self.copies.values())
        corrupt = not damaged and self.rng.random() < 0.15
        for s in range(self.shards):
            disk = self.copies[(m, s)].disk
            if corrupt and disk.blocks:
                # A bit flip in the log's tail: the checksum drops it and what follows.
                cut = self.rng.randrange(max(0, len(disk.blocks) - 3), len(disk.blocks))
                disk.blocks = disk.blocks[:cut]
                disk.damaged = True
            self.copies[(m, s)] = self._start(m, s, disk)
        self.up[m] = True
        self.log.append(f"{self.now:.3f} restart machine {m}{' (corrupt tail)' if corrupt else ''}")

    def _leader_machine(self) -> int:
        shard = self.rng.randrange(self.shards)
        for m in range(self.machines):
            if self.up[m] and self.copies[(m, shard)].replica.role is Role.LEADER:
                return m
        return self.rng.randrange(self.machines)

    def _fault(self) -> None:
        rng = self.rng
        kind = rng.choices(
            [
                "crash",
                "crash_leader",
                "crash_at_write",
                "two_down",
                "operator_and_one",
                "power_loss",
                "partition_owner",
                "one_way",
                "pause_leader",
                "clock_jump",
                "lossy",
                "move",
            ],
            weights=[3, 4, 3, 2, 1, 1, 2, 2, 2, 1, 1, 2],
        )[0]
        self.log.append(f"{self.now:.3f} fault {kind}")
        machines = range(self.machines)
        if kind == "crash":
            self._crash(rng.randrange(self.machines), kind)
        elif kind == "crash_leader":
            self._crash(self._leader_machine(), kind)
        elif kind == "crash_at_write":
            self.crash_at_write[self._leader_machine()] = rng.choice(["after", "torn"])
            self.crash_at_write[rng.randrange(self.machines)] = rng.choice(["after", "torn"])
        elif kind == "two_down":
            for m in rng.sample(list(machines), 2):
                self._crash(m, kind)
        elif kind == "operator_and_one":
            op = rng.randrange(self.operators)
            down = [2 * op, 2 * op + 1, rng.choice([m for m in machines if m // 2 != op])]
            for m in down:
                self._crash(m, kind, down_s=rng.uniform(0.5, 1.5))
        elif kind == "power_loss":
            for m in machines:
                self._crash(m, kind, down_s=rng.uniform(0.1, 0.6))
        elif kind == "partition_owner":
            op = rng.randrange(self.operators)
            inside = {2 * op, 2 * op + 1}
            cut = {(a, b) for a in machines for b in machines if (a in inside) != (b in inside)}
            self._cut(cut, rng.uniform(0.3, 1.5))
        elif kind == "one_way":
            m = self._leader_machine()
            if rng.random() < 0.5:
                cut = {(other, m) for other in machines}  # it sends, hears nothing
            else:
                cut = {(m, other) for other in machines}  # it hears, nobody hears it
            self._cut(cut, rng.uniform(0.3, 1.5))
        elif kind == "pause_leader":
            m = self._leader_machine()
            self.paused_until[m] = self.now + rng.uniform(0.3, 2.0)
        elif kind == "clock_jump":
            self.offset[rng.randrange(self.machines)] += rng.uniform(0.1, 3.0)
        elif kind == "move":
            # Its copies move to another machine of the operator: its leaders resign, it
            # stops, and they start again from their folders (moved whole) a moment later.
            m = self._leader_machine()
            if self.up[m]:
                for s in range(self.shards):
                    self.copies[(m, s)].replica.resign()
                    self._flush(m, self.copies[(m, s)])
                self._crash(m, kind, down_s=rng.uniform(0.05, 0.5))
        else:
            self.loss = rng.uniform(0.05, 0.3)
            self._at(self.now + rng.uniform(0.2, 1.0), self._no_loss)

    def _drive_change(self) -> None:
        """The guild's change of members: each shard's leader takes the next step when it
        can (a joint step ends by itself)."""
        self._at(self.now + 0.05, self._drive_change)
        for m in range(self.machines):
            if not self._runnable(m):
                continue
            for s in range(self.shards):
                c = self.copies[(m, s)]
                step = self._change_members(m, c)
                if step is not None:
                    self.log.append(f"{self.now:.3f} shard {s} members {step}")
                    self._flush(m, c)

    def _change_members(self, m: int, c: Copy) -> rp.Members | None:
        """A leader's next step of the change (the application's hook): the step taken."""
        r = c.replica
        step = r.next_members()
        if r.role is not Role.LEADER or step is None or r.change(step):
            return None
        return step

    def _no_loss(self) -> None:
        self.loss = 0.0

    def _cut(self, links: set[tuple[int, int]], seconds: float) -> None:
        self.blocked |= links
        self._at(self.now + seconds, lambda: self._mend(links))

    def _mend(self, links: set[tuple[int, int]]) -> None:
        self.blocked -= links

    def _heal(self) -> None:
        self.log.append(f"{self.now:.3f} heal")
        self.blocked.clear()
        self.loss = 0.0
        self.crash_at_write.clear()
        for m in range(self.machines):
            self.paused_until[m] = min(self.paused_until[m], self.now)
            if not self.up[m]:
                self._restart(m)
        self.healed = True

    # -- running -------------------------------------------------------------------------

    def _workload(self, end_s: float) -> None:
        t = 0.0
        while t < end_s - 1.5:
            t += self.rng.expovariate(150.0)
            self._at(t, self._new_payment)

    def run(self, heal_s: float = 4.0, end_s: float = 8.0) -> None:
        self.healed = False
        self._workload(end_s)
        t = 0.3
        while True:
            t += self.rng.expovariate(2.5)
            if t >= heal_s:
                break
            self._at(t, self._fault)
        self._at(heal_s, self._heal)
        if self.steps:
            self._at(self.rng.uniform(0.3, 1.5), self._drive_change)
        while self.events and self.events[0][0] <= end_s:
            self.now, _, action = heapq.heappop(self.events)
            action()
        self.check_end(heal_s)

    def check_end(self, heal_s: float) -> None:
        for s in range(self.shards):
            leaders = [
                self.copies[(m, s)]
                for m in range(self.machines)
                if self.copies[(m, s)].replica.role is Role.LEADER
            ]
            if len(leaders) != 1:
                raise Violation(f"shard {s}: {len(leaders)} leaders once faults stopped")
            if self.last_confirm_at[s] <= heal_s:
                raise Violation(f"shard {s}: nothing confirmed after the faults stopped")
            lead = leaders[0].replica
            final = self.members[-1]
            if lead.at_step != len(self.members) - 1:
                raise Violation(f"shard {s}: the change of members did not finish")
            for (shard, h), digest in self.confirmed.items():
                if shard != s:
                    continue
                if h >= lead.first and lead.hash_at(h) != digest:
                    raise Violation(f"shard {s}: confirmed block {h} lost")
                if h > lead.last:
                    raise Violation(f"shard {s}: confirmed block {h} is beyond the leader's log")
            for m in [m for m in range(self.machines) if m // 2 in final.operators()]:
                r = self.copies[(m, s)].replica
                if r.last != lead.last:
                    raise Violation(
                        f"shard {s}: copy {m} is at {r.last}, its leader at {lead.last}"
                    )
                if r.state_root() != lead.state_root():
                    raise Violation(f"shard {s}: copy {m} is caught up with another state")
        self._check_app(heal_s)

    def leader_copy(self, s: int) -> Copy:
        (lead,) = [
            self.copies[(m, s)]
            for m in range(self.machines)
            if self.copies[(m, s)].replica.role is Role.LEADER
        ]
        return lead

    def _check_app(self, heal_s: float) -> None:
        for s in range(self.shards):
            confirmed_state = self._confirmed_state(self.leader_copy(s))
            for pid, amount in self.acked.items():
                if self.submitted[pid][0] == s and confirmed_state.get(pid) != amount:
                    raise Violation(f"shard {s}: acknowledged payment {pid} is not confirmed")
            for pid in confirmed_state:
                if pid not in self.submitted or self.submitted[pid][0] != s:
                    raise Violation(f"shard {s}: payment {pid} appeared from nowhere")
        late = [
            pid
            for pid, (_, _, at) in self.submitted.items()
            if at < heal_s and pid not in self.acked
        ]
        if late:
            raise Violation(f"{len(late)} payments made before the heal were never acknowledged")

    def _confirmed_state(self, c: Copy) -> dict[int, int]:
        """The leader's state as of its confirmed height."""
        r = c.replica
        app = Payments()
        app.restore(r.snap.data)
        assert isinstance(c.app, Payments)
        for block in r.blocks(r.snap.height, r.confirmed):
            app.execute(block.body, False)
        return app.state


def restart(
    disk: Loaded,
    owner: int,
    worker: int,
    me: int,
    keys: list[SigningKey],
    executor: Executor,
    clock: Callable[[], float],
    draw: Callable[[], float],
    settings: Settings,
    members: Sequence[rp.Members] = (),
) -> Replica:
    """Copy ``me`` of shard (owner, worker), started from what it persisted."""
    return Replica(
        owner=owner,
        worker=worker,
        me=me,
        keys=[k.pubkey for k in keys],
        sign=functools.partial(_sign, keys[me // 2]),
        executor=executor,
        clock=clock,
        draw=draw,
        settings=settings,
        hard=disk.hard,
        snapshot=disk.snapshot,
        blocks=list(disk.blocks),
        damaged=disk.damaged,
        members=members,
    )


def _sign(key: SigningKey, digest: bytes) -> bytes:
    return key.sign(digest, bytes(32))  # deterministic: a seed replays byte for byte


def replay_command(seed: int, operators: int, ledger: bool = False, change: str = "") -> str:
    flag = (" --ledger" if ledger else "") + (f" --change {change}" if change else "")
    return f".venv/bin/python -m tests.sim --seed {seed} --operators {operators}{flag}"
