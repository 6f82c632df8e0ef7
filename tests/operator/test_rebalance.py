"""A GuildRebalance read and judged without a cluster: what it may ask, its plan from a
placement, and how its status walks (Proposed until approved and no other change of the
machines is under way, Moving until the placement is there, Done)."""

from __future__ import annotations

import pytest

from constellation.replication.placement import Placement
from services.operator.rebalance import Phase, next_phase, planned, read_rebalance
from services.operator.rebalance import rebalance_status as status
from services.operator.spec import BadGuild

SPEC = {"guild": "g1", "machines": 3}
NOW, LATER = "2026-12-02T10:00:00Z", "2026-12-02T10:05:00Z"


def settled(placement: Placement, machines: int) -> Placement:
    """``placement`` once a change to ``machines`` machines has ended."""
    while not placement.done(machines):
        placement = placement.step(machines)
        for slot, spot in enumerate(placement.spots):
            if spot.moving:
                placement = placement.arrive(slot, spot.to)
    return placement


def test_a_rebalance_is_read_and_what_cannot_be_is_refused() -> None:
    spec = read_rebalance(SPEC)
    assert (spec.guild, spec.machines, spec.approve) == ("g1", 3, False)
    for bad, why in [
        (SPEC | {"machines": 1}, "2 to 64"),
        (SPEC | {"machines": 65}, "2 to 64"),
        (SPEC | {"machines": "3"}, "spec"),
        (SPEC | {"extra": 1}, "spec"),
        ({"machines": 3}, "spec"),
    ]:
        with pytest.raises(BadGuild, match=why):
            read_rebalance(bad)


def test_the_plan_moves_the_fewest_copies_and_keeps_twins_apart() -> None:
    two = Placement.initial(8, 2)
    plan = planned(two, 3)
    goal = two.plan(3)
    assert len(plan) == sum(1 for s, spot in enumerate(two.spots) if goal[s] != spot.machine)
    assert {m["to"] for m in plan} == {2}  # only onto the new machine
    assert all(m["from"] != m["to"] and m["copy"] in (0, 1) for m in plan)
    assert len(plan) == 16 // 3  # 16 copies over 3 machines: 5 or 6 each
    three = settled(two, 3)
    assert planned(three, 3) == []  # nothing to do
    back = planned(three, 2)
    assert {m["from"] for m in back} == {2}  # only off the machine that goes
    assert len(back) == len(three.runs(2))


def test_the_status_waits_for_approval_then_moves_then_is_done() -> None:
    spec = read_rebalance(SPEC)
    two = Placement.initial(8, 2)
    phase, waiting = next_phase(Phase.PROPOSED, spec, two, 2, None)
    assert (phase, waiting) == (Phase.PROPOSED, "approval (spec.approve: true)")
    st = status({}, 1, NOW, phase, waiting, planned(two, 3), two, "")
    assert st["phase"] == "Proposed" and len(st["plan"]) == 5
    assert st["history"] == [{"phase": "Proposed", "at": NOW}]
    ready = {c["type"]: c for c in st["conditions"]}
    assert ready["Ready"]["status"] == "False" and ready["Degraded"]["status"] == "False"

    # another rebalance first; another change of the machines under way
    assert (
        next_phase(Phase.PROPOSED, spec, two, 2, "older")[1]
        == "GuildRebalance older to finish first"
    )
    moving_to_4 = two.step(4)
    assert "under way" in next_phase(Phase.PROPOSED, spec, moving_to_4, 4, None)[1]

    approved = read_rebalance(SPEC | {"approve": True})
    phase, waiting = next_phase(Phase.PROPOSED, approved, two, 2, None)
    assert phase is Phase.MOVING and waiting == "the copies to move"
    st = status(st, 1, LATER, phase, waiting, None, two, "")
    assert st["plan"] == planned(two, 3)  # kept as it was when the moves began
    assert [h["phase"] for h in st["history"]] == ["Proposed", "Moving"]

    underway = two.step(3)
    # a look at a stale body (still Proposed, the Guild already at 3): Moving, never Done
    for now_at in (underway, settled(underway, 3)):
        assert next_phase(Phase.PROPOSED, approved, now_at, 3, None)[0] is Phase.MOVING
    phase, waiting = next_phase(Phase.MOVING, approved, underway, 3, None)
    assert phase is Phase.MOVING and "->2" in waiting
    phase, waiting = next_phase(Phase.MOVING, approved, settled(underway, 3), 3, None)
    assert (phase, waiting) == (Phase.DONE, "")
    st = status(st, 1, LATER, phase, waiting, None, None, "")
    assert st["phase"] == "Done" and st["placementVersion"] == two.version
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"


def test_a_guild_whose_machines_were_changed_since_is_degraded() -> None:
    approved = read_rebalance(SPEC | {"approve": True})
    with pytest.raises(BadGuild, match="asks for 4 machines now"):
        next_phase(Phase.MOVING, approved, Placement.initial(8, 2).step(4), 4, None)
    st = status({}, 2, NOW, Phase.MOVING, "", [], None, "the Guild asks for 4 machines now")
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Degraded"]["status"] == "True" and st["waitingFor"].startswith("the Guild")
