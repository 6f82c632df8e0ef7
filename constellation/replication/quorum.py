"""How many copies of a shard confirm a block, and how many elect a leader.

Every operator of a guild keeps two copies of every shard, so a shard of a guild of
``n`` operators has ``2n`` copies, each an acceptor with its own vote. Quorums count
copies, never operators: "one ack per operator, once one of its copies persisted" is
unsafe (a confirming set and an electing set can then miss each other; see
``notes/replication.md`` §1.2). Two rules fix the sizes (Flexible Paxos: only an
election quorum must meet every confirming quorum, and every other election quorum):

* **A confirmed block spans a majority of operators.** ``c`` copies lie in at least
  ``ceil(c / 2)`` operators (two per operator at most), so ``c = 2 * floor(n / 2) + 1``
  copies are the fewest that always span ``floor(n / 2) + 1`` operators.
* **Every election meets every confirmation and every other election.** Any ``e`` copies
  and any ``c`` copies out of ``2n`` share one when ``e + c > 2n``; two elections share one
  when ``2e > 2n``. So ``e = max(2n - c + 1, n + 1)``.

Then a block confirmed in a term is held by some copy of every later election, and the
up-to-date rule of elections keeps it (no two confirmed blocks at one height); two
leaders of one term would need one copy to vote twice. For 3 operators: confirm on 3 of
6, elect on 4 of 6 (the owner alone, 2 copies, can do neither; the two others, 4, can
elect without it). For 4 operators: confirm on 5 of 8, elect on 5 of 8.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

COPIES_PER_OPERATOR = 2

Copy = tuple[int, int]  # (operator, which of its copies)


@dataclass(frozen=True)
class Quorums:
    """The quorum sizes of a shard replicated at the operators ``members``."""

    members: frozenset[int]
    confirm: int  # copies whose acks confirm a block
    elect: int  # copies whose votes elect a leader

    @staticmethod
    def of(operators: int) -> Quorums:
        """The quorums of operators ``0 .. operators - 1``."""
        return Quorums.among(range(operators))

    @staticmethod
    def among(members: Iterable[int]) -> Quorums:
        """The smallest sizes that keep both rules (see the module's docstring)."""
        found = frozenset(members)
        operators = len(found)
        if operators < 1:
            raise ValueError(f"a guild has at least one operator, not {operators}")
        copies = COPIES_PER_OPERATOR * operators
        confirm = COPIES_PER_OPERATOR * (operators // 2) + 1
        elect = max(copies - confirm + 1, copies // 2 + 1)
        assert confirm <= copies and elect <= copies
        return Quorums(found, confirm, elect)

    @property
    def operators(self) -> int:
        return len(self.members)

    @property
    def copies(self) -> int:
        return COPIES_PER_OPERATOR * self.operators

    def confirms(self, acks: Iterable[Copy]) -> bool:
        """Whether these copies' acks (of one block, in one term) confirm it."""
        return len(self._valid(acks)) >= self.confirm

    def elects(self, votes: Iterable[Copy]) -> bool:
        """Whether these copies' votes (for one candidate, in one term) elect it."""
        return len(self._valid(votes)) >= self.elect

    def _valid(self, copies: Iterable[Copy]) -> set[Copy]:
        found = set(copies)
        for operator, copy in found:
            if not (operator in self.members and 0 <= copy < COPIES_PER_OPERATOR):
                among = sorted(self.members)
                raise ValueError(f"no copy ({operator}, {copy}) among operators {among}")
        return found
