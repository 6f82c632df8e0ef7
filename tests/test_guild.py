"""What the guild key signs: statements, checkpoints, and a signer's memory of them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.errors import Equivocation, RequestRefused
from constellation.guild import (
    Checkpoint,
    Purpose,
    SigningPolicy,
    Statement,
    derive,
)

ALL = frozenset(Purpose)


def checkpoint(height: int, prev: bytes = bytes(32), root: bytes = b"r" * 32) -> Checkpoint:
    return Checkpoint("g", height, prev, root)


@given(st.text(min_size=1, max_size=200).filter(lambda s: len(s.encode()) != 32))
def test_a_statement_is_signed_as_its_utf8_bytes(text: str) -> None:
    derived = derive(Statement(text))
    assert derived.msg == text.encode() and derived.tweaks == ()


@pytest.mark.parametrize("text", ["", "x" * 32, "é" * 16, "y" * 1025])
def test_statements_that_could_pass_for_something_else_are_refused(text: str) -> None:
    with pytest.raises(RequestRefused):
        derive(Statement(text))


def test_checkpoint_message_commits_to_every_field() -> None:
    base = checkpoint(5, b"p" * 32)
    variants = [
        Checkpoint("h", 5, b"p" * 32, b"r" * 32),
        checkpoint(6, b"p" * 32),
        checkpoint(5, b"q" * 32),
        checkpoint(5, b"p" * 32, b"s" * 32),
    ]
    assert len({base.message(), *(v.message() for v in variants)}) == 5
    assert len(base.message()) == 32


@pytest.mark.parametrize(
    "bad",
    [
        Checkpoint("", 1, bytes(32), bytes(32)),
        Checkpoint("g", -1, bytes(32), bytes(32)),
        Checkpoint("g", 2**64, bytes(32), bytes(32)),
        Checkpoint("g", 1, bytes(31), bytes(32)),
        Checkpoint("g", 0, b"x" * 32, bytes(32)),
    ],
)
def test_malformed_checkpoints_are_refused(bad: Checkpoint) -> None:
    with pytest.raises(RequestRefused):
        derive(bad)


def test_policy_never_signs_two_checkpoints_at_one_height() -> None:
    policy = SigningPolicy("g", ALL)
    first = checkpoint(0)
    policy.check(first)
    policy.record(first)
    policy.check(first)  # the same one again: a retry, allowed
    with pytest.raises(Equivocation):
        policy.check(checkpoint(0, root=b"z" * 32))
    with pytest.raises(Equivocation):
        policy.check(checkpoint(1, prev=b"w" * 32))  # does not extend what we signed
    second = checkpoint(1, prev=first.message())
    policy.check(second)
    policy.record(second)
    policy.check(checkpoint(7, prev=b"w" * 32))  # nothing signed below: cannot judge


def test_policy_refuses_other_guilds_and_disallowed_purposes() -> None:
    with pytest.raises(RequestRefused, match="not ours"):
        SigningPolicy("other", ALL).check(checkpoint(0))
    only_checkpoints = SigningPolicy("g", frozenset({Purpose.CHECKPOINT}))
    with pytest.raises(RequestRefused, match="does not sign statement"):
        only_checkpoints.check(Statement("hello"))
