"""The quorum sizes of replication, checked over every set of copies for small guilds."""

from __future__ import annotations

import itertools

import pytest

from constellation.replication.quorum import COPIES_PER_OPERATOR, Copy, Quorums


def copies(n: int) -> list[Copy]:
    return [(o, c) for o in range(n) for c in range(COPIES_PER_OPERATOR)]


def subsets(n: int, size: int) -> list[frozenset[Copy]]:
    return [frozenset(s) for s in itertools.combinations(copies(n), size)]


def operators(s: frozenset[Copy]) -> int:
    return len({o for o, _ in s})


def test_three_and_four_operators() -> None:
    assert (Quorums.of(3).confirm, Quorums.of(3).elect) == (3, 4)  # of 6
    assert (Quorums.of(4).confirm, Quorums.of(4).elect) == (5, 5)  # of 8


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_every_quorum_keeps_the_rules(n: int) -> None:
    q = Quorums.of(n)
    confirming = subsets(n, q.confirm)
    electing = subsets(n, q.elect)
    # A confirmed block spans a majority of operators.
    assert all(operators(s) > n / 2 for s in confirming)
    # Every election meets every confirmation, and every other election.
    assert all(e & c for e in electing for c in confirming)
    assert all(a & b for a, b in itertools.combinations(electing, 2))
    # The sizes are the smallest: one copy fewer breaks the first rule, or the second.
    assert any(operators(s) <= n / 2 for s in subsets(n, q.confirm - 1))
    if q.elect > 1:
        smaller = subsets(n, q.elect - 1)
        assert any(not (e & c) for e in smaller for c in confirming) or any(
            not (a & b) for a, b in itertools.combinations(smaller, 2)
        )


@pytest.mark.parametrize("n", [3, 4, 5])
def test_one_operator_can_neither_confirm_nor_elect_and_the_others_can_elect(n: int) -> None:
    q = Quorums.of(n)
    owner = [(0, c) for c in range(COPIES_PER_OPERATOR)]
    others = [c for c in copies(n) if c[0] != 0]
    assert not q.confirms(owner) and not q.elects(owner)
    assert q.elects(others) and q.confirms(others)
    # The owner and one other operator's copy confirm with three operators; not with four.
    assert q.confirms([*owner, (1, 0)]) == (n == 3)


def test_one_ack_per_operator_would_be_unsafe() -> None:
    """notes/replication.md §1.2: counting operators, a block confirmed by O1.a and O2.a
    and an election by O2.b and O3.b share no copy; counting copies, neither is a
    quorum."""
    q = Quorums.of(3)
    confirmed, elected = {(0, 0), (1, 0)}, {(1, 1), (2, 1)}
    assert len({o for o, _ in confirmed}) == len({o for o, _ in elected}) == 2
    assert not confirmed & elected
    assert not q.confirms(confirmed) and not q.elects(elected)


def test_a_copy_counts_once_and_strangers_are_refused() -> None:
    q = Quorums.of(3)
    assert not q.confirms([(0, 0), (0, 0), (1, 0)])
    with pytest.raises(ValueError, match="no copy"):
        q.confirms([(3, 0)])
    with pytest.raises(ValueError, match="at least one operator"):
        Quorums.of(0)
