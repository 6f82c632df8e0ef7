"""A ``GuildChange`` resource: one member joins or leaves the guild a ``Guild`` runs a part
of, walked through the phases of ``constellation.membership``, each once the one before
is observed done and this member approved it (``spec.approve`` names the phases it
approves; ``kubectl patch --type merge``). ``status`` says the phase, what it waits for,
the history of phases with their times, and what was observed.

Every member runs the same change, each approving on its side: a member's machines take
a change of members only once their own operator agreed to it (its agreement in NATS KV,
``services.bus.publish_agreement``, written here when Voting begins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from constellation.membership import Change, KeysSeen, Kind, Observed, Phase, advance, phases
from constellation.replication.members import Agreement
from services.bus import SeenCopy
from services.operator.reconcile import change_conditions, condition_list
from services.operator.render import Obj
from services.operator.spec import BadGuild, GuildSpec

PLURAL = "guildchanges"


class ChangeSpec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    guild: str  # the Guild resource (in this namespace) whose members change
    kind: Literal["join", "leave"]
    member: str
    threshold: int  # signers the new members' key needs
    approve: list[str] = []  # the phases this member approved


def read_change(doc: Any, guild: GuildSpec, voting: Sequence[int]) -> tuple[ChangeSpec, Change]:
    """The change a GuildChange asks of ``guild``, whose members ``voting`` (operator
    numbers: positions in ``guild.members``) vote now; or BadGuild saying why it cannot
    be made."""
    try:
        spec = msgspec.convert(doc, ChangeSpec)
    except msgspec.ValidationError as exc:
        raise BadGuild(f"spec: {exc}") from None
    names = tuple(guild.members[op].name for op in voting)
    change = Change(Kind(spec.kind), spec.member, names, spec.threshold)
    why = change.malformed()
    if why:
        raise BadGuild(why)
    if change.kind is Kind.JOIN and change.member not in [m.name for m in guild.members]:
        # Its copies, shards and peers' credentials need its place in every member's
        # layout: the Guild names it first (its workloads roll onto that layout).
        raise BadGuild(f"spec.members of Guild {spec.guild} must name {change.member} first")
    known = [p.value for p in phases(change.kind)]
    unknown = [p for p in spec.approve if p not in known]
    if unknown:
        raise BadGuild(f"spec.approve: no phase {', '.join(unknown)} (phases: {', '.join(known)})")
    return spec, change


def began(agreed: Agreement, doc: Any, guild: GuildSpec) -> tuple[list[int], int]:
    """The voters when the change a GuildChange (``doc``, its spec) asks began, and where
    its own entry goes in the member's agreement: the last voters and its length; or,
    where that last entry already took the change (agreed by another hand before the
    resource was read, or a repeat of the change just done), the voters before it."""
    names = [m.name for m in guild.members]
    member = doc.get("member") if isinstance(doc, Mapping) else None
    if member not in names or len(agreed.voters) < 2:
        return agreed.voters[-1], len(agreed.voters)
    op, joins = names.index(member), doc.get("kind") == Kind.JOIN.value
    previous, last = agreed.voters[-2:]
    if (op in last) == joins and (op in previous) != joins:
        return previous, len(agreed.voters) - 1
    return last, len(agreed.voters)


def final_voters(change: Change, guild: GuildSpec) -> list[int]:
    """The operator numbers that vote once ``change`` is done."""
    names = [m.name for m in guild.members]
    return sorted(names.index(m) for m in change.after)


def to_agree(
    agreed: Agreement, at: int, final: list[int], phase: Phase, learning: list[int]
) -> Agreement | None:
    """The agreement to write for a change in ``phase`` whose own entry goes at index
    ``at`` of the member's agreement (its length when the change began), or None: not
    before Learning (a joiner's copies, ``learning``, learn every shard's log) or
    Voting, not once Done, and never twice (a change done long ago must not put back
    the voters a later change moved on from). BadGuild where another change took that
    entry."""
    if phase in (Phase.PROPOSED, Phase.DONE):
        return None
    if phase is Phase.LEARNING:
        wanted = Agreement(agreed.voters[:at], learning=learning)
    else:
        wanted = Agreement([*agreed.voters[:at], final])
    if agreed.extends(wanted):
        return None
    if len(agreed.voters) < at or not wanted.extends(agreed):
        raise BadGuild(f"the member agreed to other voters than {final} meanwhile")
    return wanted


def learnt(change: Change, guild: GuildSpec, seen: Sequence[SeenCopy]) -> bool:
    """Whether every shard names a joiner a learner (or a voter), confirmed, by what
    this member's machines report (a joiner's copies are learners till they hold the
    log: a shard's leader makes them voters only then)."""
    if change.kind is not Kind.JOIN:
        return True
    op = [m.name for m in guild.members].index(change.member)
    shards = {f"{m.name}/{w}" for m in guild.members for w in range(guild.shards)}
    done = {c.shard for c in seen if op in (*c.learners, *c.voters) and c.confirmed}
    return shards <= done


def voted(final: list[int], guild: GuildSpec, seen: Sequence[SeenCopy]) -> tuple[int, int]:
    """(shards whose ``final`` voters are confirmed, shards), by what this member's
    machines report: one of its copies of a shard confirming them is the shard
    confirming them. Every member's shards count, former members' too."""
    shards = [f"{m.name}/{w}" for m in guild.members for w in range(guild.shards)]
    done = {c.shard for c in seen if c.voters == final and not c.old and c.confirmed}
    return sum(1 for s in shards if s in done), len(shards)


def observed(shards: tuple[int, int], learned: bool, keys: KeysSeen | None) -> Observed:
    """What the member shows of a change's work: whether every shard made a joiner a
    learner, its shards that took the new voters (of all), and what its services report
    of the new key (None: nothing yet)."""
    return Observed(
        learned=learned,
        voted=shards[0] == shards[1] > 0,
        new_key=keys.key if keys else b"",
        moved=(",".join(keys.txids) or "none") if keys and keys.moved and keys.handed else "",
    )


def key_status(keys: KeysSeen | None) -> Obj:
    if keys is None:
        return {}
    return {
        "newKey": keys.key.hex(),
        "moves": keys.txids,
        "handedOver": keys.handed,
        "keyPlan": keys.waiting,
    }


def change_status(
    previous: Mapping[str, Any],
    generation: int,
    now: str,
    change: Change | None,
    before: list[int] | None,
    final: list[int] | None,
    approved: Sequence[str],
    seen: Observed,
    shards: tuple[int, int],
    problem: str,
) -> Obj:
    """The GuildChange's status after one look: the phase it moves to (at most one
    step), what it waits for, its history, the voters ``before`` it (what it is judged
    against from then on) and once it is done, and the conditions."""
    phase = Phase(previous.get("phase", Phase.PROPOSED.value))
    history = list(previous.get("history", [])) or [{"phase": phase.value, "at": now}]
    waiting = problem
    if change is not None and not problem:
        phase, waiting = advance(change.kind, phase, seen, {Phase(p) for p in approved})
        if phase.value != history[-1]["phase"]:
            history.append({"phase": phase.value, "at": now})
    conds = change_conditions(phase is Phase.DONE, phase.value, waiting, problem)
    return {
        "observedGeneration": generation,
        "phase": phase.value,
        "waitingFor": waiting,
        "history": history,
        "approved": sorted(approved),
        "before": before,
        "voters": final,
        "shardsVoted": f"{shards[0]}/{shards[1]}",
        "conditions": condition_list(conds, previous, generation, now),
    }
