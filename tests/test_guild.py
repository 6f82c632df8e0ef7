"""What the guild key signs: statements, checkpoints, and a signer's memory of them."""

from __future__ import annotations

import msgspec
import pytest
from coincurve import PublicKey
from hypothesis import given
from hypothesis import strategies as st

from constellation.bitcoin import SpendInput, SpendOutput, p2tr_script, taproot_sighash
from constellation.crypto import frost
from constellation.errors import Equivocation, RequestRefused
from constellation.guild import (
    Checkpoint,
    OnchainSpend,
    Purpose,
    SigningPolicy,
    Statement,
    derive,
    guild_output,
    owned_derivation,
)

ALL = frozenset(Purpose)
GUILD_PK = PublicKey.from_secret(b"\x11" * 32).format()


def checkpoint(height: int, prev: bytes = bytes(32), root: bytes = b"r" * 32) -> Checkpoint:
    return Checkpoint("g", height, prev, 0, root, b"m" * 32)


@given(st.text(min_size=1, max_size=200).filter(lambda s: len(s.encode()) != 32))
def test_a_statement_is_signed_as_its_utf8_bytes(text: str) -> None:
    derived = derive(Statement(text), GUILD_PK)
    assert derived.msg == text.encode() and derived.tweaks == ()


@pytest.mark.parametrize("text", ["", "x" * 32, "é" * 16, "y" * 1025])
def test_statements_that_could_pass_for_something_else_are_refused(text: str) -> None:
    with pytest.raises(RequestRefused):
        derive(Statement(text), GUILD_PK)


def test_checkpoint_message_commits_to_every_field() -> None:
    base = checkpoint(5, b"p" * 32)
    variants = [
        Checkpoint("h", 5, b"p" * 32, 0, b"r" * 32, b"m" * 32),
        checkpoint(6, b"p" * 32),
        checkpoint(5, b"q" * 32),
        checkpoint(5, b"p" * 32, b"s" * 32),
        msgspec.structs.replace(base, next_key=b"k" * 32, next_members=b"n" * 32),
        msgspec.structs.replace(base, next_key=b"k" * 32, next_members=b"o" * 32),
    ]
    assert len({base.message(), *(v.message() for v in variants)}) == 7
    assert len(base.message()) == 32


@pytest.mark.parametrize(
    "bad",
    [
        Checkpoint("", 1, bytes(32), 0, bytes(32), bytes(32)),
        Checkpoint("g", -1, bytes(32), 0, bytes(32), bytes(32)),
        Checkpoint("g", 2**64, bytes(32), 0, bytes(32), bytes(32)),
        Checkpoint("g", 1, bytes(31), 0, bytes(32), bytes(32)),
        Checkpoint("g", 0, b"x" * 32, 0, bytes(32), bytes(32)),
        Checkpoint("g", 1, bytes(32), -1, bytes(32), bytes(32)),
        Checkpoint("g", 1, bytes(32), 0, bytes(32), bytes(33)),
        Checkpoint("g", 1, bytes(32), 0, bytes(32), bytes(32), b"k" * 32),  # no members
        Checkpoint("g", 1, bytes(32), 0, bytes(32), bytes(32), b"k" * 31, b"n" * 32),
        Checkpoint("g", 1, bytes(32), 0, bytes(32), bytes(32), GUILD_PK[1:], b"n" * 32),
    ],
)
def test_malformed_checkpoints_are_refused(bad: Checkpoint) -> None:
    with pytest.raises(RequestRefused):
        derive(bad, GUILD_PK)


def test_policy_never_signs_two_checkpoints_at_one_height() -> None:
    policy = SigningPolicy("g", ALL)
    first = checkpoint(0)
    policy.check(first, GUILD_PK)
    policy.record(first, first.message())
    policy.check(first, GUILD_PK)  # the same one again: a retry, allowed
    with pytest.raises(Equivocation):
        policy.check(checkpoint(0, root=b"z" * 32), GUILD_PK)
    with pytest.raises(Equivocation):
        policy.check(checkpoint(1, prev=b"w" * 32), GUILD_PK)  # does not extend what we signed
    second = checkpoint(1, prev=first.message())
    policy.check(second, GUILD_PK)
    policy.record(second, second.message())
    policy.check(checkpoint(7, prev=b"w" * 32), GUILD_PK)  # nothing signed below: cannot judge


def test_policy_refuses_other_guilds_and_disallowed_purposes() -> None:
    with pytest.raises(RequestRefused, match="not ours"):
        SigningPolicy("other", ALL).check(checkpoint(0), GUILD_PK)
    only_checkpoints = SigningPolicy("g", frozenset({Purpose.CHECKPOINT}))
    with pytest.raises(RequestRefused, match="does not sign statement"):
        only_checkpoints.check(Statement("hello"), GUILD_PK)


MEMBER = b"\x31" * 32  # a member's x-only host key: the requester
LABEL = b"\x41" * 32  # one of its addresses


def guild_spend(**changes: object) -> OnchainSpend:
    output_key = guild_output(GUILD_PK, owned_derivation(MEMBER, LABEL)).xonly
    spend = OnchainSpend(
        2,
        0,
        [
            SpendInput(b"\x01" * 32, 0, 0xFFFFFFFD, 50_000, p2tr_script(output_key)),
            SpendInput(b"\x02" * 32, 1, 0xFFFFFFFD, 10_000, b"\x00\x14" + b"\x05" * 20),
        ],
        [SpendOutput(45_000, b"\x51\x20" + b"\x07" * 32), SpendOutput(14_000, b"\x6a")],
        0,
        LABEL,
    )
    return msgspec.structs.replace(spend, **changes)


def test_a_spend_signs_the_bip341_sighash_of_the_guild_input_under_the_tweaked_key() -> None:
    spend = guild_spend()
    derived = derive(spend, GUILD_PK, MEMBER)
    assert derived.purpose == Purpose.SPEND
    assert derived.msg == taproot_sighash(2, 0, spend.inputs, spend.outputs, 0)
    internal = frost.tweak_context(GUILD_PK, [derived.tweaks[0]], [False]).xonly_pk
    assert derived.tweaks[1] == frost.taproot_tweak(internal)
    assert derived.is_xonly == (False, True)
    assert p2tr_script(derived.pubkey) == spend.inputs[0].script_pubkey


def test_a_member_gets_only_the_coins_of_its_own_addresses_spent() -> None:
    """The guild signs a spend of an address only at the request of the member that
    holds it: another member, naming the same label, or its own label for that
    address, is refused; so is a request that names no member or no label."""
    other = b"\x32" * 32
    with pytest.raises(RequestRefused, match="requester holds"):
        derive(guild_spend(), GUILD_PK, other)
    with pytest.raises(RequestRefused, match="requester holds"):
        derive(guild_spend(label=b"\x42" * 32), GUILD_PK, MEMBER)
    with pytest.raises(RequestRefused, match="label is 32 bytes"):
        derive(guild_spend(), GUILD_PK)
    with pytest.raises(RequestRefused, match="label is 32 bytes"):
        derive(guild_spend(label=b""), GUILD_PK, MEMBER)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"input_index": 1}, "not a guild output the requester holds"),
        ({"input_index": 2}, "names no input"),
        ({"outputs": [SpendOutput(60_001, b"\x6a")]}, "worth more"),
        ({"outputs": []}, "outputs"),
        ({"locktime": 2**32}, "32-bit"),
        ({"inputs": [SpendInput(b"\x01" * 31, 0, 0, 1, b"")]}, "malformed"),
        ({"outputs": [SpendOutput(-1, b"")]}, "out of range"),
    ],
)
def test_spends_the_signer_cannot_vouch_for_are_refused(
    changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(RequestRefused, match=reason):
        derive(guild_spend(**changes), GUILD_PK, MEMBER)
    other_guild = PublicKey.from_secret(b"\x12" * 32).format()
    with pytest.raises(RequestRefused, match="not a guild output"):
        derive(guild_spend(), other_guild, MEMBER)


def test_an_outpoint_spent_twice_is_refused() -> None:
    spend = guild_spend()
    twice = msgspec.structs.replace(spend, inputs=[spend.inputs[0], spend.inputs[0]])
    with pytest.raises(RequestRefused, match="spent twice"):
        derive(twice, GUILD_PK, MEMBER)


def test_above_a_handover_it_signed_a_signer_signs_only_with_the_key_handed_to() -> None:
    new_pk = PublicKey.from_secret(b"\x22" * 32).format()
    policy = SigningPolicy("g", ALL)
    first = checkpoint(0)
    policy.record(first, policy.check(first, GUILD_PK).msg)
    handover = msgspec.structs.replace(
        checkpoint(1, first.message()), next_key=new_pk[1:], next_members=b"n" * 32
    )
    policy.record(handover, policy.check(handover, GUILD_PK).msg)
    above = checkpoint(2, handover.message())
    with pytest.raises(Equivocation, match="signs above height 1"):
        policy.check(above, GUILD_PK)  # the old key, above its handover
    assert policy.check(above, new_pk).pubkey == new_pk[1:]
    # at and below the handover, the old key still signs what it signed
    assert policy.check(handover, GUILD_PK).msg == handover.message()
