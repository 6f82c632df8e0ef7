"""One shard's copies on a hand-driven network: each test says what happens, step by step."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Sequence

import msgspec

from constellation.keys import SigningKey
from constellation.protocol import replication as rp
from constellation.replication.replica import EVERYONE, Executor, Replica, Role, Settings
from tests.sim.guild import Disk, Payments, restart

SETTINGS = Settings(
    heartbeat_s=0.05, election_s=0.3, window=4, snapshot_every=16, keep=4, chunk_bytes=256
)
KEYS = [SigningKey(hashlib.sha256(b"operator %d" % i).digest()) for i in range(4)]

# (sender, receiver, message) -> the messages actually delivered (a Byzantine sender's)
Tamper = Callable[[int, int, rp.Message], list[rp.Message]]


class Shard:
    """The 2n copies of shard (owner 0, worker 0); time moves only in ``run``."""

    def __init__(
        self,
        operators: int = 3,
        seed: int = 1,
        make: Callable[[], Executor] = Payments,
        members: Sequence[rp.Members] = (),
    ) -> None:
        """``members``: the members the guild agreed the shard may have (by default its
        ``operators`` vote); every operator they name has copies here, taking part or
        not."""
        self.make = make
        self.members = list(members)
        named = {op for m in self.members for op in m.operators()}
        self.operators = max(named, default=operators - 1) + 1
        self.rng = random.Random(seed)
        self.now = 0.0
        self.copies = 2 * self.operators
        self.keys = KEYS[: self.operators]
        self.down: set[int] = set()
        self.cut: set[tuple[int, int]] = set()
        self.liars: set[int] = set()  # copies that ack without storing
        self.tamper: Tamper | None = None
        self.queue: deque[tuple[int, int, bytes]] = deque()
        self.disks = [Disk() for _ in range(self.copies)]
        self.apps: list[Executor] = []
        self.replicas: list[Replica] = []
        for c in range(self.copies):
            self.apps.append(make())
            self.replicas.append(self._start(c))
        self.next_pid = 1

    def _start(self, c: int) -> Replica:
        self.apps[c] = self.make()
        return restart(
            self.disks[c],
            0,
            0,
            c,
            self.keys,
            self.apps[c],
            self.clock,
            self.rng.random,
            SETTINGS,
            self.members,
        )

    def clock(self) -> float:
        return self.now

    # -- the network ---------------------------------------------------------------------

    def flush(self, c: int) -> None:
        r = self.replicas[c]
        while not (ready := r.ready()).empty():
            if c not in self.liars:
                self.disks[c].write(ready)
            for to, msg in ready.messages:
                for dest in range(self.copies) if to == EVERYONE else [to]:
                    if dest == c:
                        continue
                    sent = self.tamper(c, dest, msg) if self.tamper else [msg]
                    for m in sent:
                        self.queue.append((c, dest, rp.encode(rp.Envelope(0, 0, c, m))))
            r.stored(ready.last)

    def deliver(self) -> None:
        while self.queue:
            src, dst, data = self.queue.popleft()
            if dst in self.down or src in self.down or (src, dst) in self.cut:
                continue
            env = rp.decode(data)
            self.replicas[dst].step(env.sender, env.msg)
            self.flush(dst)

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for c in range(self.copies):
                if c not in self.down:
                    self.replicas[c].tick()
                    self.flush(c)
            self.deliver()

    def until(self, done: Callable[[], bool], limit: float = 10.0) -> float:
        """Run until ``done()``; the simulated seconds it took."""
        start = self.now
        while not done():
            assert self.now - start < limit, "did not happen in time"
            self.run(0.01)
        return self.now - start

    # -- faults --------------------------------------------------------------------------

    def stop(self, *copies: int) -> None:
        self.down.update(copies)

    def restart(self, *copies: int) -> None:
        for c in copies:
            self.down.discard(c)
            self.replicas[c] = self._start(c)

    def isolate(self, group: set[int]) -> None:
        self.cut = {(a, b) for a in range(self.copies) for b in range(self.copies)}
        self.cut = {(a, b) for a, b in self.cut if (a in group) != (b in group)}

    # -- looking -------------------------------------------------------------------------

    def leaders(self) -> list[int]:
        return [
            c
            for c in range(self.copies)
            if c not in self.down and self.replicas[c].role is Role.LEADER
        ]

    def leader(self) -> int | None:
        leaders = self.leaders()
        return leaders[0] if len(leaders) == 1 else None

    def pay(self, count: int = 1) -> int:
        """The leader proposes ``count`` new payments in one block; its height."""
        c = self.leader()
        assert c is not None
        batch = [(self.next_pid + i, 10) for i in range(count)]
        self.next_pid += count
        body = msgspec.msgpack.encode(batch)
        root = self.apps[c].execute(body, True)  # as the leader's application applies it
        height = self.replicas[c].propose(body, root)
        self.flush(c)
        return height

    def confirmed_everywhere(self, height: int, copies: list[int] | None = None) -> bool:
        chosen = range(self.copies) if copies is None else copies
        return all(self.replicas[c].confirmed >= height for c in chosen if c not in self.down)
