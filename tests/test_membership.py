"""A change of members walks its phases only in order, each once its work is observed and
it is approved; and the guild's funds move to the key the new members made, signed by
the old key, valid on the chain (and spendable by the new key afterwards)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.bitcoin import SpendOutput, p2tr_script
from constellation.crypto.roast import Group
from constellation.ecash import onchain as oc
from constellation.errors import MessageError, RequestRefused
from constellation.guild import derive, guild_output, owned_derivation
from constellation.membership import (
    Change,
    KeyPlan,
    KeysSeen,
    KeyStep,
    Kind,
    Observed,
    Phase,
    advance,
    decode_plan,
    decode_seen,
    key_step,
    move_funds,
    move_label,
    phases,
    planned,
    work_done,
)
from constellation.protocol.signer import KeyInfo
from services.lnsim.chain import Chain
from tests.crypto.test_dkg import run_dkg
from tests.crypto.test_frost import run_session

LEAVE = Change(Kind.LEAVE, "op2", ("op0", "op1", "op2"), 2)
EVERYTHING = Observed(True, True, b"\x02" + b"\x11" * 32, "ab" * 32)


def test_a_leave_waits_for_each_approval_and_each_phase_s_work() -> None:
    phase, why = advance(Kind.LEAVE, Phase.PROPOSED, Observed(), set())
    assert (phase, why) == (Phase.PROPOSED, "waiting for approval of Voting")
    phase, why = advance(Kind.LEAVE, phase, Observed(), {Phase.VOTING})
    assert phase is Phase.VOTING and why == ""
    phase, why = advance(Kind.LEAVE, phase, Observed(), {Phase.VOTING, Phase.RESHARING})
    assert phase is Phase.VOTING and "new voters" in why
    phase, why = advance(Kind.LEAVE, phase, Observed(voted=True), {Phase.VOTING})
    assert phase is Phase.VOTING and why == "waiting for approval of Resharing"
    approved = set(phases(Kind.LEAVE))
    phase, _ = advance(Kind.LEAVE, phase, Observed(voted=True), approved)
    assert phase is Phase.RESHARING
    phase, why = advance(Kind.LEAVE, phase, Observed(voted=True), approved)
    assert "DKG" in why
    phase, _ = advance(Kind.LEAVE, phase, EVERYTHING, approved)
    phase, _ = advance(Kind.LEAVE, phase, EVERYTHING, approved)
    assert phase is Phase.DONE  # the end needs no approval
    assert advance(Kind.LEAVE, phase, Observed(), set()) == (Phase.DONE, "")


@given(
    st.sampled_from(list(Kind)),
    st.lists(st.tuples(st.sampled_from(["approve", "observe"]), st.integers(0, 5)), max_size=40),
)
def test_phases_come_in_order_each_approved_after_the_last_s_work(
    kind: Kind, events: list[tuple[str, int]]
) -> None:
    order = phases(kind)
    approved: set[Phase] = set()
    seen = Observed()
    facts = ["learned", "voted", "new_key", "moved"]
    values: dict[str, object] = {"learned": True, "voted": True, "new_key": b"\x03" * 33}
    values["moved"] = "cd" * 32
    phase = Phase.PROPOSED
    for what, k in events:
        if what == "approve":
            approved.add(order[k % len(order)])
        else:
            fact = facts[k % len(facts)]
            seen = Observed(**{**seen.__dict__, fact: values[fact]})
        before = phase
        phase, why = advance(kind, phase, seen, approved)
        at = order.index(phase)
        assert order.index(before) <= at <= order.index(before) + 1
        if phase is not before:
            assert work_done(before, seen) and (phase is Phase.DONE or phase in approved)
        else:
            assert why or phase is Phase.DONE


def test_a_change_that_cannot_be_made_says_why() -> None:
    assert LEAVE.malformed() == "" and LEAVE.after == ("op0", "op1")
    join = Change(Kind.JOIN, "op3", ("op0", "op1", "op2"), 3)
    assert join.malformed() == "" and join.after == ("op0", "op1", "op2", "op3")
    assert "already" in Change(Kind.JOIN, "op1", ("op0", "op1"), 2).malformed()
    assert "not a member" in Change(Kind.LEAVE, "op9", ("op0", "op1", "op2"), 2).malformed()
    assert "at least two" in Change(Kind.LEAVE, "op1", ("op0", "op1"), 1).malformed()
    assert "majority" in Change(Kind.JOIN, "op3", ("op0", "op1", "op2"), 2).malformed()
    assert "majority" in Change(Kind.LEAVE, "op2", ("op0", "op1", "op2"), 3).malformed()


def test_the_funds_move_to_the_new_members_key_signed_by_the_old_one() -> None:
    rng = random.Random(11)
    _, old_out, _, _ = run_dkg(3, 2, rng)  # op0, op1, op2
    _, new_out, _, _ = run_dkg(2, 2, rng)  # op0 and op1, once op2 left
    old = Group(3, 2, old_out[0].threshold_pubkey, old_out[0].pubshares)
    new = Group(2, 2, new_out[0].threshold_pubkey, new_out[0].pubshares)
    old_shares = [o.secshare for o in old_out if o.secshare is not None]
    new_shares = [o.secshare for o in new_out if o.secshare is not None]
    me = b"\x30" * 32  # the member whose mint holds the coins (its x-only host key)
    coins = []
    for k, sat in enumerate([50_000, 20_000, 7_000]):
        label = bytes([k + 1]) * 32  # its deposits' addresses
        script = p2tr_script(guild_output(old.thresh_pk, owned_derivation(me, label)).xonly)
        coins.append(oc.Coin(f"{k + 1:064x}", 0, sat, script, label))
    chain = Chain(lambda _: None)
    for c in coins:
        chain.paid(c.txid, [SpendOutput(c.amount_sat, c.script)], [])

    move = move_funds(coins, new.thresh_pk, me, 2, 5_000)
    assert move is not None
    [out] = move.tx.outputs
    there = owned_derivation(me, move_label(new.thresh_pk))  # the member holds it there too
    assert out.script_pubkey == p2tr_script(guild_output(new.thresh_pk, there).xonly)
    assert out.amount_sat + move.fee_sat == 77_000
    sigs = []
    for request in oc.spend_requests(move.tx, move.spent):
        d = derive(request, old.thresh_pk, me)  # each old signer checks it as any spend
        sigs.append(run_session(old, old_shares, [0, 2], d.msg, d.tweaks, d.is_xonly))
    raw = oc.signed(move.tx, sigs).serialize()
    tx, fee = chain.check(raw)
    assert fee == move.fee_sat and fee == tx.vsize * 2
    chain.paid(tx.txid, list(tx.outputs), [(c.txid, c.vout) for c in coins])

    # The moved coin is the new key's: its two members spend it; the old key cannot.
    moved = oc.Coin(tx.txid, 0, out.amount_sat, out.script_pubkey, move_label(new.thresh_pk))
    onward = move_funds([moved], new.thresh_pk, me, 2, 5_000)
    assert onward is not None
    [request] = oc.spend_requests(onward.tx, onward.spent)
    d = derive(request, new.thresh_pk, me)
    sig = run_session(new, new_shares, [0, 1], d.msg, d.tweaks, d.is_xonly)
    chain.check(oc.signed(onward.tx, [sig]).serialize())
    with pytest.raises(RequestRefused, match="not a guild output"):
        derive(request, old.thresh_pk, me)
    assert move_funds([], new.thresh_pk, me, 2, 5_000) is None
    assert move_funds(coins[2:], new.thresh_pk, me, 2, 100) is None  # the fee limit


OLD = KeyInfo(b"\x02" + b"\x01" * 32, [0, 1, 2], 2)
NEW = KeyInfo(b"\x03" + b"\x02" * 32, [0, 1], 2)


def test_each_member_takes_the_key_plan_s_steps_in_order() -> None:
    """Agree, then the first member makes the key (the others wait for it), then, once
    approved, the coins move; the leaver takes no part."""
    plan = KeyPlan([0, 1], 2)
    assert key_step(plan, 0, [OLD], None, False) == (KeyStep.AGREE, "")
    other = KeyInfo(b"", [0, 1], 3)  # agreed to another threshold: agreed again
    assert key_step(plan, 1, [OLD], other, False) == (KeyStep.AGREE, "")
    agreed = KeyInfo(b"", [0, 1], 2)
    assert key_step(plan, 0, [OLD], agreed, False) == (KeyStep.KEYGEN, "")
    assert key_step(plan, 1, [OLD], agreed, False) == (KeyStep.WAIT, "member 0 to make the key")
    step, why = key_step(plan, 2, [OLD], None, False)
    assert step is KeyStep.WAIT and "takes no part" in why
    assert planned(plan, [OLD, NEW]) == NEW
    assert key_step(plan, 1, [OLD, NEW], None, True) == (
        KeyStep.WAIT,
        "approval to move the coins",
    )
    moving = KeyPlan([0, 1], 2, move=True)
    assert key_step(moving, 1, [OLD, NEW], None, True) == (KeyStep.MOVE, "")
    assert key_step(moving, 1, [OLD, NEW], None, False) == (KeyStep.WAIT, "")
    # every coin under the new key: the checkpoints hand over, then the old key retires
    step, why = key_step(moving, 1, [OLD, NEW], None, False, moved=True)
    assert step is KeyStep.HAND_OVER and "handover" in why
    assert key_step(moving, 1, [OLD, NEW], None, False, True, True) == (KeyStep.RETIRE, "")
    assert key_step(moving, 1, [NEW], None, False, True, True) == (KeyStep.WAIT, "")
    # the leaver hands nothing over (its indexer and signer are gone)
    assert key_step(moving, 2, [OLD, NEW], None, False, True, False)[0] is KeyStep.WAIT


@given(st.lists(st.integers(-2, 6), max_size=6), st.integers(-1, 7))
def test_a_key_plan_a_guild_cannot_make_says_why(members: list[int], t: int) -> None:
    plan = KeyPlan(members, t)
    why = plan.malformed(5)
    legal = (
        bool(members)
        and members == sorted(set(members))
        and all(0 <= m < 5 for m in members)
        and len(members) // 2 < t <= len(members)
    )
    assert (why == "") == legal, (members, t, why)


def test_key_plans_and_reports_round_trip_and_refuse_what_they_are_not() -> None:
    plan = KeyPlan([0, 2], 2, move=True)
    assert decode_plan(plan.encode()) == plan
    seen = KeysSeen([0, 2], 2, NEW.key, ["ab" * 32], True, True, "")
    assert decode_seen(seen.encode()) == seen and seen.of(plan)
    assert not KeysSeen([0, 1], 2).of(plan)
    for bad in (b"[]", b'{"members": [0], "t": 1, "extra": 1}', b"not json"):
        with pytest.raises(MessageError):
            decode_plan(bad)
    with pytest.raises(MessageError, match="33 bytes"):
        decode_seen(KeysSeen([0], 1, b"\x02" * 5).encode())
