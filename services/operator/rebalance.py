"""A ``GuildRebalance`` resource: a change of the machines a Guild's member runs, looked
at before it is made (as Strimzi's KafkaRebalance): its plan (which copies move, from
which machine to which, planned from the member's placement), an approval
(``spec.approve``) and a history.

Proposed, it shows the plan, planned again at each look while the placement changes.
Approved, the operator sets the member's ``machines`` in the Guild to the rebalance's:
the Guild's own reconcile then starts the machines, moves the copies in batches and
removes the drained machines (``services.operator.reconcile``), and the rebalance is
Done once the placement is there. One rebalance of a Guild at a time, and none begins
while another change of its machines is under way. A Guild's ``machines`` may still be
edited by hand: the rebalance is the reviewed way, not the only one.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import msgspec

from constellation.replication.placement import MAX_MACHINES, MIN_MACHINES, Placement
from services.operator.reconcile import change_conditions, condition_list
from services.operator.render import Obj
from services.operator.spec import BadGuild

PLURAL = "guildrebalances"


class RebalanceSpec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    guild: str  # the Guild resource (in this namespace) whose member's machines change
    machines: int
    approve: bool = False


class Phase(StrEnum):
    PROPOSED = "Proposed"
    MOVING = "Moving"
    DONE = "Done"


def read_rebalance(doc: Any) -> RebalanceSpec:
    """The rebalance a GuildRebalance asks for, or BadGuild saying why it is refused."""
    try:
        spec = msgspec.convert(doc, RebalanceSpec)
    except msgspec.ValidationError as exc:
        raise BadGuild(f"spec: {exc}") from None
    if not MIN_MACHINES <= spec.machines <= MAX_MACHINES:
        raise BadGuild(f"spec.machines: a member runs {MIN_MACHINES} to {MAX_MACHINES} machines")
    return spec


def planned(placement: Placement, machines: int) -> list[Obj]:
    """The copies that move for ``placement`` to be on ``machines`` machines: each
    shard's copy (``worker``, ``copy`` 0 or 1 of this member's two) from a machine to
    another (``Placement.plan``)."""
    goal = placement.plan(machines)
    return [
        {
            "worker": slot % placement.workers,
            "copy": slot // placement.workers,
            "from": spot.to if spot.moving else spot.machine,
            "to": goal[slot],
        }
        for slot, spot in enumerate(placement.spots)
        if goal[slot] != (spot.to if spot.moving else spot.machine)
    ]


def next_phase(
    phase: Phase,
    spec: RebalanceSpec,
    placement: Placement,
    asked: int,
    earlier: str | None,
) -> tuple[Phase, str]:
    """The phase a rebalance in ``phase`` is in now, and what it waits for ('' if
    nothing); ``asked``: the machines the Guild asks of its member now; ``earlier``: an
    unfinished rebalance of the Guild that goes first. BadGuild where it cannot go on."""
    if phase is Phase.DONE:
        return phase, ""
    if phase is Phase.PROPOSED:
        if earlier is not None:
            return phase, f"GuildRebalance {earlier} to finish first"
        if spec.approve and asked == spec.machines:
            # approved, and the Guild asks for its machines: Done waits for a later look,
            # so that a look at a stale body (its status from before) skips no phase
            return Phase.MOVING, "the copies to move"
        if not placement.done(asked):
            return phase, f"the change to {asked} machines under way to finish"
        if not spec.approve:
            return phase, "approval (spec.approve: true)"
        return Phase.MOVING, "the copies to move"  # the caller sets the Guild's machines
    if asked != spec.machines:
        raise BadGuild(
            f"the Guild asks for {asked} machines now, not {spec.machines}: its machines were"
            " changed since this rebalance began"
        )
    if placement.done(spec.machines):
        return Phase.DONE, ""
    moving = [
        f"{slot % placement.workers}/{slot // placement.workers} {spot.machine}->{spot.to}"
        for slot, spot in enumerate(placement.spots)
        if spot.moving
    ]
    return phase, "the copies to move" + (f": {', '.join(moving)}" if moving else "")


def rebalance_status(
    previous: Mapping[str, Any],
    generation: int,
    now: str,
    phase: Phase,
    waiting: str,
    plan: list[Obj] | None,
    placement: Placement | None,
    problem: str,
) -> Obj:
    """The GuildRebalance's status after one look: its phase and what it waits for, the
    plan (kept as it was when the moves began), its history and conditions."""
    history = list(previous.get("history", [])) or [{"phase": phase.value, "at": now}]
    if phase.value != history[-1]["phase"]:
        history.append({"phase": phase.value, "at": now})
    conds = change_conditions(phase is Phase.DONE, phase.value, waiting, problem)
    moves = plan if plan is not None else previous.get("plan", [])
    st: Obj = {
        "observedGeneration": generation,
        "phase": phase.value,
        "waitingFor": problem or waiting,
        "history": history,
        "plan": moves,
        "conditions": condition_list(conds, previous, generation, now),
    }
    if placement is not None:
        st["placementVersion"] = placement.version
    elif "placementVersion" in previous:
        st["placementVersion"] = previous["placementVersion"]
    return st
