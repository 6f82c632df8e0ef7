"""A GuildChange read and judged without a cluster: what it may ask of a Guild, when its
voters are written to the member's agreement (once, at Voting, at the entry it began
with; a joiner's learning first, at Learning), and how its status walks."""

from __future__ import annotations

import copy

import msgspec
import pytest

from constellation.membership import Observed, Phase
from constellation.replication.members import Agreement
from services.bus import SeenCopy
from services.operator.changes import (
    began,
    change_status,
    final_voters,
    learnt,
    read_change,
    to_agree,
)
from services.operator.spec import BadGuild, read_spec
from tests.operator.conftest import example

GUILD = read_spec(next(d for d in example() if d["kind"] == "Guild")["spec"])
LEAVE = {"guild": "g1", "kind": "leave", "member": "op2", "threshold": 2, "approve": []}


def test_a_leave_is_read_and_what_cannot_be_is_refused() -> None:
    names = [m.name for m in GUILD.members]
    spec, change = read_change(LEAVE, GUILD, list(range(len(names))))
    assert spec.approve == [] and spec.member == "op2"
    assert change.after == tuple(n for n in names if n != "op2")
    assert final_voters(change, GUILD) == [i for i, n in enumerate(names) if n != "op2"]
    for field, value, why in [
        ("member", "op9", "not a member"),
        ("threshold", 1, "majority"),
        ("kind", "join", "must name op9 first"),
        ("approve", ["Learning"], "no phase Learning"),
        ("extra", 1, "spec"),
    ]:
        bad = copy.deepcopy(LEAVE) | {field: value}
        if field == "kind":
            bad |= {"member": "op9", "threshold": 3}
        with pytest.raises(BadGuild, match=why):
            read_change(bad, GUILD, list(range(len(names))))
    # Against the voters after it, a leave reads as nothing to do: why the status keeps
    # the voters it began with (``before``) and judges it against them.
    with pytest.raises(BadGuild, match="not a member"):
        read_change(LEAVE, GUILD, [0, 1])


def test_the_voters_are_agreed_once_at_voting_at_the_change_s_own_entry() -> None:
    start = Agreement([[0, 1, 2]])
    assert to_agree(start, 1, [0, 1], Phase.PROPOSED, []) is None
    written = to_agree(start, 1, [0, 1], Phase.VOTING, [])
    assert written == Agreement([[0, 1, 2], [0, 1]])
    assert to_agree(written, 1, [0, 1], Phase.RESHARING, []) is None  # written already
    later = Agreement([[0, 1, 2], [0, 1], [0, 1, 3]])  # another change since
    assert to_agree(later, 1, [0, 1], Phase.MOVING, []) is None
    assert to_agree(later, 1, [0, 1], Phase.DONE, []) is None  # never puts [0, 1] back
    with pytest.raises(BadGuild, match="other voters"):
        to_agree(Agreement([[0, 1, 2], [1, 2]]), 1, [0, 1], Phase.VOTING, [])


def test_the_status_walks_one_phase_a_look_and_keeps_its_history() -> None:
    _, change = read_change(LEAVE, GUILD, [0, 1, 2])
    args = (change, [0, 1, 2], [0, 1])
    st = change_status({}, 1, "t0", *args, [], Observed(), (0, 6), "")
    assert st["phase"] == "Proposed" and "approval of Voting" in st["waitingFor"]
    st = change_status(st, 2, "t1", *args, ["Voting"], Observed(), (0, 6), "")
    assert st["phase"] == "Voting" and st["shardsVoted"] == "0/6"
    st = change_status(st, 2, "t2", *args, ["Voting"], Observed(voted=True), (6, 6), "")
    assert st["phase"] == "Voting" and "approval of Resharing" in st["waitingFor"]
    assert [h["phase"] for h in st["history"]] == ["Proposed", "Voting"]
    ready = {c["type"]: c["status"] for c in st["conditions"]}
    assert ready == {"Ready": "False", "Progressing": "True", "Degraded": "False"}
    refused = change_status(st, 2, "t3", *args, ["Voting"], Observed(), (0, 6), "no Guild")
    assert refused["phase"] == "Voting" and refused["waitingFor"] == "no Guild"
    degraded = [c for c in refused["conditions"] if c["type"] == "Degraded"]
    assert degraded[0]["status"] == "True" and degraded[0]["lastTransitionTime"] == "t3"


def test_a_join_learns_first_then_votes_and_is_judged_by_every_shard() -> None:
    """The Guild names the joiner (op2, after its two founders): the change reads
    against the founders voting, Learning agrees to op2's copies learning, Voting to
    the voters with it, and Learning is done once every shard names op2 a learner."""
    joining = msgspec.structs.replace(GUILD, founders=2)
    join = LEAVE | {"kind": "join", "member": "op2"}
    _, change = read_change(join, joining, [0, 1])
    assert change.after == ("op0", "op1", "op2") and final_voters(change, joining) == [0, 1, 2]
    with pytest.raises(BadGuild, match="a member already"):
        read_change(join, joining, [0, 1, 2])
    start = Agreement([[0, 1]])
    learning = to_agree(start, 1, [0, 1, 2], Phase.LEARNING, [2])
    assert learning == Agreement([[0, 1]], learning=[2])
    assert to_agree(learning, 1, [0, 1, 2], Phase.LEARNING, [2]) is None
    voting = to_agree(learning, 1, [0, 1, 2], Phase.VOTING, [2])
    assert voting == Agreement([[0, 1], [0, 1, 2]])
    assert to_agree(voting, 1, [0, 1, 2], Phase.RESHARING, [2]) is None
    shards = [f"op{o}/{w}" for o in range(3) for w in range(joining.shards)]
    seen = [SeenCopy(s, [0, 1], [], [2], True) for s in shards]
    assert learnt(change, joining, seen)
    assert not learnt(change, joining, seen[1:])  # a shard that has not said so
    assert not learnt(change, joining, [SeenCopy(s, [0, 1], [], [], True) for s in shards])
    st = change_status({}, 1, "t0", change, [0, 1], [0, 1, 2], ["Learning"], Observed(), (0, 0), "")
    st = change_status(st, 1, "t1", change, [0, 1], [0, 1, 2], ["Learning"], Observed(), (0, 0), "")
    assert st["phase"] == "Learning" and "every shard's log" in st["waitingFor"]


def test_a_change_begins_before_its_own_entry_where_the_agreement_took_it_already() -> None:
    """A change read once its member already agreed to it (another hand got there
    first) begins at the voters before that entry; a change not yet agreed begins at
    the last voters, and a join of a member that left is read as a new change."""
    joining = msgspec.structs.replace(GUILD, founders=2)
    join = LEAVE | {"kind": "join", "member": "op2"}
    assert began(Agreement([[0, 1]]), join, joining) == ([0, 1], 1)
    assert began(Agreement([[0, 1]], learning=[2]), join, joining) == ([0, 1], 1)
    assert began(Agreement([[0, 1], [0, 1, 2]]), join, joining) == ([0, 1], 1)
    assert began(Agreement([[0, 1, 2], [0, 1]]), join, joining) == ([0, 1], 2)
    assert began(Agreement([[0, 1, 2]]), LEAVE, joining) == ([0, 1, 2], 1)
    assert began(Agreement([[0, 1, 2], [0, 1]]), LEAVE, joining) == ([0, 1, 2], 1)
    assert began(Agreement([[0, 1], [0, 1, 2]]), LEAVE, joining) == ([0, 1, 2], 2)
    assert began(Agreement([[0, 1, 2]]), {"member": "op9"}, joining) == ([0, 1, 2], 1)
    assert began(Agreement([[0, 1, 2]]), "not a spec", joining) == ([0, 1, 2], 1)
    _, change = read_change(join, joining, began(Agreement([[0, 1], [0, 1, 2]]), join, joining)[0])
    assert change.after == ("op0", "op1", "op2")
