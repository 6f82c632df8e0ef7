"""Where an operator's copies live: which of its machines holds each copy, and the moves
that change it when machines are added or removed.

An operator keeps two copies of every shard of the guild. Its copy ``k`` (0 or 1) of
worker ``w``'s shards, of every owner, is one *slot* (``k * workers + w``); a slot is on
one machine. The two slots of a worker (the twins) are on two different machines, so a
machine lost takes at most one copy of any shard from its operator.

A ``Placement`` is versioned and kept in the operator's NATS KV; every change writes the
next version, compare-and-set, so a restarted driver or machine resumes from it. A
slot's ``Spot`` names its machine and, while it moves, the machine it moves to. A move
of slot ``s`` from machine A to machine B:

1. **begin** (``Placement.step``, the driver): ``to = B``. A stops its copies of ``s``
   (a leader resigns first) and marks them released, durably; it then serves their
   folders, read-only, to B.
2. **copy, catch up**: B fetches the released folders (the replica's log, snapshot,
   term and vote, and the events log), opens the copies from them and catches them up
   from their shards' leaders. Identity and vote travel together, so a copy never votes
   twice in a term, and at no version do two machines run one copy: B starts only what A
   released.
3. **arrive** (``Placement.arrive``, B): ``machine = B``; then A drops its folders.

A move keeps the slot's twin where it is and running: at most one of a worker's two
slots moves at a time, and never onto its twin's machine, so the shard always has its
operator's other copy while one is in flight. Moves go in bounded batches.

Machines are numbered ``0..machines-1``; adding one appends it, removing one takes the
highest (``plan``), whose slots move off first. A machine may go only once no spot names
it (``holds``). Pure: no clock, no I/O.
"""

from __future__ import annotations

import msgspec

from constellation.codec import decode_json
from constellation.errors import MessageError

COPIES = 2  # an operator's copies of every shard (its slots per worker)
MIN_MACHINES = 2  # twins apart
MAX_MACHINES = 64
BATCH = 4  # slots moving at once, by default


class Spot(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    machine: int
    to: int = -1  # the machine it moves to (-1: it stays)

    @property
    def moving(self) -> bool:
        return self.to >= 0


class Placement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    workers: int
    machines: int  # the machines copies may be on (others are draining, or gone)
    spots: list[Spot]  # by slot: k * workers + w
    # The change under way (or last made): where each slot goes, on ``goal_machines``
    # machines; planned once, so a restarted driver carries on with the same moves.
    goal: list[int] = []
    goal_machines: int = 0

    @classmethod
    def initial(cls, workers: int, machines: int) -> Placement:
        """Version 1: copy ``k`` of worker ``w`` on machine ``(k - w) mod machines``, so
        twins differ and the workers spread over every machine."""
        spots = [Spot((k - w) % machines) for k in range(COPIES) for w in range(workers)]
        return cls(1, workers, machines, spots)

    def __post_init__(self) -> None:
        if self.version < 1 or not 1 <= self.workers <= 256:
            raise MessageError("a placement has a version from 1 and 1..256 workers")
        if not MIN_MACHINES <= self.machines <= MAX_MACHINES:
            raise MessageError(f"a placement has {MIN_MACHINES}..{MAX_MACHINES} machines")
        if len(self.spots) != COPIES * self.workers:
            raise MessageError(f"placement v{self.version} has a spot for every slot")
        for slot, spot in enumerate(self.spots):
            if not (0 <= spot.machine < MAX_MACHINES and -1 <= spot.to < self.machines):
                raise MessageError(f"placement v{self.version}: slot {slot} names no machine")
            if spot.to == spot.machine:
                raise MessageError(f"placement v{self.version}: slot {slot} moves to itself")
        if self.goal and (
            len(self.goal) != len(self.spots)
            or not MIN_MACHINES <= self.goal_machines <= MAX_MACHINES
            or not all(0 <= m < self.goal_machines for m in self.goal)
            or any(self.goal[w] == self.goal[self.workers + w] for w in range(self.workers))
        ):
            raise MessageError(f"placement v{self.version}: its goal does not place every slot")
        for w in range(self.workers):
            a, b = self.spots[w], self.spots[self.workers + w]
            if a.moving and b.moving:
                raise MessageError(f"placement v{self.version}: both copies of {w} move")
            if {a.machine, a.to} & {b.machine, b.to} - {-1}:
                raise MessageError(f"placement v{self.version}: the copies of {w} meet")

    # -- reading -------------------------------------------------------------------------

    def slot(self, copy: int, worker: int) -> int:
        """The slot of an operator's copy ``copy`` (its ``2 * operator + k``) of a shard of
        worker ``worker``."""
        return (copy % COPIES) * self.workers + worker

    def twin(self, slot: int) -> int:
        return (slot + self.workers) % (COPIES * self.workers)

    def runs(self, machine: int) -> list[int]:
        """The slots ``machine`` runs: those on it that do not move (a moving slot runs
        at its new machine once it has it, and the machine says so with ``arrive``)."""
        return [
            s for s, spot in enumerate(self.spots) if spot.machine == machine and not spot.moving
        ]

    def incoming(self, machine: int) -> list[int]:
        return [s for s, spot in enumerate(self.spots) if spot.to == machine]

    def outgoing(self, machine: int) -> list[int]:
        return [s for s, spot in enumerate(self.spots) if spot.machine == machine and spot.moving]

    def holds(self, machine: int) -> bool:
        """Whether any slot is on ``machine`` or moves to it: it may not go while so."""
        return any(machine in (spot.machine, spot.to) for spot in self.spots)

    def load(self) -> list[int]:
        counts = [0] * max(self.machines, *(spot.machine + 1 for spot in self.spots))
        for spot in self.spots:
            counts[spot.to if spot.moving else spot.machine] += 1
        return counts

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    # -- changing ------------------------------------------------------------------------

    def plan(self, machines: int) -> list[int]:
        """Where each slot should be on ``machines`` machines: every slot on the highest
        ones beyond moves, then slots move from the fullest machine to the emptiest until
        they differ by one at most, each move the fewest (twins always apart)."""
        if not MIN_MACHINES <= machines <= MAX_MACHINES:
            raise ValueError(f"an operator runs {MIN_MACHINES}..{MAX_MACHINES} machines")
        at = [spot.to if spot.moving else spot.machine for spot in self.spots]
        load = [0] * machines
        for m in at:
            if m < machines:
                load[m] += 1

        def target(slot: int) -> int:
            twin = at[self.twin(slot)]
            return min((m for m in range(machines) if m != twin), key=lambda m: (load[m], m))

        for slot in sorted(range(len(at)), key=lambda s: (-at[s], s)):
            if at[slot] >= machines:  # forced off a machine that goes
                at[slot] = target(slot)
                load[at[slot]] += 1
        moved = {s for s in range(len(at)) if at[s] != self.spots[s].machine}
        while True:
            full = max(range(machines), key=lambda m: (load[m], -m))
            empty = min(range(machines), key=lambda m: (load[m], m))
            if load[full] - load[empty] < 2:
                return at
            # A slot moves once at most, so that no two moves wait on each other. Some
            # slot on the fullest is one to move: what moved there came when it was among
            # the emptiest; and the emptiest cannot hold the twin of each of the others.
            # Copies 1 first: the owners' preferred copies (0) lead their shards, and a
            # leader's move hands its leadership over twice (to the twin, and back).
            pick = next(
                (
                    s
                    for s in [*range(self.workers, len(at)), *range(self.workers)]
                    if at[s] == full and s not in moved and at[self.twin(s)] != empty
                ),
                None,
            )
            if pick is None:
                return at
            at[pick] = empty
            moved.add(pick)
            load[full] -= 1
            load[empty] += 1

    def _goal(self, machines: int) -> list[int]:
        if self.goal and self.goal_machines == machines:
            return self.goal
        return self.plan(machines)

    def step(self, machines: int, batch: int = BATCH) -> Placement:
        """The next version towards ``machines`` machines (the driver's one step): the
        goal planned at the change's first step (planned again where ``machines``
        changed under way), and more moves begun, up to ``batch`` moving at once;
        never both copies of a worker, never onto where the twin is. Unchanged where
        nothing more can begin (moving slots must arrive first), or all is there."""
        goal = self._goal(machines)
        spots = list(self.spots)
        moving = sum(1 for spot in spots if spot.moving)
        for slot, spot in enumerate(spots):
            if moving >= batch:
                break
            twin = spots[self.twin(slot)]
            if spot.moving or twin.moving or spot.machine == goal[slot]:
                continue
            if goal[slot] == twin.machine:
                continue  # after the twin has moved away (it does: goals keep twins apart)
            spots[slot] = Spot(spot.machine, goal[slot])
            moving += 1
        # A move under way to a machine that goes (the change was redirected) ends
        # first: the count follows once it has arrived.
        count = max(machines, *(spot.to + 1 for spot in spots))
        if spots == self.spots and count == self.machines and goal == self.goal:
            return self
        return Placement(self.version + 1, self.workers, count, spots, goal, machines)

    def done(self, machines: int) -> bool:
        """Whether a change to ``machines`` machines is over: nothing moves, and every
        slot is where the goal has it."""
        return (
            self.machines == machines
            and not any(spot.moving for spot in self.spots)
            and self._goal(machines) == [spot.machine for spot in self.spots]
        )

    def arrive(self, slot: int, machine: int) -> Placement:
        """The next version, with ``machine`` holding the slot that moved to it."""
        spot = self.spots[slot]
        if spot.to != machine:
            raise ValueError(f"slot {slot} does not move to machine {machine}")
        spots = list(self.spots)
        spots[slot] = Spot(machine)
        return msgspec.structs.replace(self, version=self.version + 1, spots=spots)


def decode_placement(data: bytes) -> Placement:
    return decode_json(data, Placement, "placement")
