"""Where an operator's copies live, and the moves between its machines: every version
keeps twins apart and each slot on exactly one machine, plans move few slots and end
balanced, and a change driven in batches, with arrivals in any order, ends at its plan."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constellation.errors import MessageError
from constellation.replication.placement import COPIES, Placement, decode_placement


def check(p: Placement) -> None:
    for w in range(p.workers):
        a, b = p.spots[w], p.spots[p.workers + w]
        where_a = {a.machine, a.to} - {-1}
        where_b = {b.machine, b.to} - {-1}
        assert not where_a & where_b, "twins meet"
        assert not (a.moving and b.moving), "both copies of a worker move"


def drive(p: Placement, machines: int, seed: int, batch: int = 4) -> tuple[Placement, int]:
    redirected = any(spot.moving for spot in p.spots)
    """Run a change to its end as the driver and the machines would: a step begins
    moves, the moving slots arrive in a random order; (the end, the versions written)."""
    rng = random.Random(seed)
    planned = sum(1 for s, m in enumerate(p.plan(machines)) if m != p.spots[s].machine)
    versions = arrivals = 0
    while not p.done(machines):
        nxt = p.step(machines, batch)
        if nxt is not p:
            p, versions = nxt, versions + 1
            check(p)
            p = decode_placement(p.encode())  # each version goes through the KV
        moving = [s for s, spot in enumerate(p.spots) if spot.moving]
        if not moving:
            assert p.done(machines), "nothing moves, yet the change is not over"
            break
        slot = rng.choice(moving)
        p = p.arrive(slot, p.spots[slot].to)
        versions, arrivals = versions + 1, arrivals + 1
        check(p)
        running = [p.runs(m) for m in range(64)]
        assert sorted(s for slots in running for s in slots) == [
            s for s, spot in enumerate(p.spots) if not spot.moving
        ]
    load = p.load()[:machines]
    assert max(load) - min(load) <= 1 and sum(load) == len(p.spots)
    if not redirected:
        assert arrivals == planned, "each slot moves once, as first planned"
    return p, versions


@given(st.integers(1, 64), st.integers(2, 9))
def test_the_first_placement_keeps_twins_apart_and_spreads_evenly(
    workers: int, machines: int
) -> None:
    p = Placement.initial(workers, machines)
    check(p)
    load = p.load()
    assert sum(load) == COPIES * workers and max(load) - min(load) <= 2
    assert decode_placement(p.encode()) == p


@given(st.integers(1, 64), st.integers(2, 9), st.integers(2, 9))
def test_a_plan_keeps_twins_apart_balances_and_moves_few(
    workers: int, before: int, after: int
) -> None:
    p = Placement.initial(workers, before)
    goal = p.plan(after)
    assert all(0 <= m < after for m in goal)
    for w in range(workers):
        assert goal[w] != goal[workers + w]
    load = [goal.count(m) for m in range(after)]
    assert max(load) - min(load) <= 1
    moved = sum(1 for s, m in enumerate(goal) if m != p.spots[s].machine)
    slots = COPIES * workers
    if after > before:  # each new machine takes its share, from the others
        assert moved <= -(-slots * (after - before) // after) + before
    elif after < before:  # what was on the machines that go, and a little to even out
        gone = sum(1 for spot in p.spots if spot.machine >= after)
        assert gone <= moved <= gone + 2 * after  # and at most two a kept machine
    else:
        assert moved <= before


@settings(max_examples=60)
@given(
    st.integers(1, 24),
    st.integers(2, 6),
    st.lists(st.integers(2, 6), min_size=1, max_size=3),
    st.integers(1, 6),
    st.integers(0, 2**32),
)
def test_changes_driven_in_batches_end_at_their_plans(
    workers: int, first: int, counts: list[int], batch: int, seed: int
) -> None:
    p = Placement.initial(workers, first)
    for machines in counts:
        p, _ = drive(p, machines, seed, batch)
        assert p.done(machines)
        assert not any(p.holds(m) for m in range(machines, 64))  # the machines gone hold nothing


def test_a_change_may_be_redirected_while_slots_move() -> None:
    p = Placement.initial(8, 2)
    p = p.step(4, batch=3)
    assert len([s for s in p.spots if s.moving]) == 3
    p, _ = drive(p, 3, seed=7)  # a new plan from where the moving slots go
    assert p.done(3)


def test_a_slot_arrives_only_where_it_moves_and_the_rules_are_checked_on_reading() -> None:
    p = Placement.initial(2, 2)
    with pytest.raises(ValueError):
        p.arrive(0, 1)
    with pytest.raises(ValueError):
        p.plan(1)
    bad = [
        (1, 2, 2, [[0], [1], [0], [0]]),  # twins on machine 0
        (1, 2, 3, [[0, 2], [1], [1, 2], [0]]),  # both copies of worker 0 move
        (1, 2, 3, [[0, 1], [1], [1], [0]]),  # onto its twin
        (1, 2, 2, [[0], [1]]),  # a slot missing
        (1, 2, 2, [[0, 0], [1], [1], [0]]),  # to itself
        (1, 2, 2, [[0, 5], [1], [1], [0]]),  # to a machine beyond
        (0, 2, 2, [[0], [1], [1], [0]]),  # no version 0
        (1, 2, 1, [[0], [1], [1], [0]]),  # one machine
        (1, 2, 2, [[0], [1], [1], [0, -1, 3]]),  # a field too many
    ]
    for version, workers, machines, spots in bad:
        doc = {"version": version, "workers": workers, "machines": machines, "spots": spots}
        with pytest.raises(MessageError):
            decode_placement(msgspec.json.encode(doc))
    with pytest.raises(MessageError):
        decode_placement(b"{not json")
