"""Two-phase commit across partition states held in one process.

This is the reference for the networked version: the coordinator's state (the one
holding the first input's partition) prepares first, then every other involved state;
all YES commits everywhere, any NO aborts everywhere. The demo and the property tests
drive it; the partition workers run the same steps over NATS.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from constellation.ledger.partition import Coin, CoinStatus, PartitionState, Prepared
from constellation.ledger.pmap import PartitionMap
from constellation.tx import Issuance, Transaction, partition_of


class LocalLedger:
    """A whole ledger as several partition states (simulated workers) in one process."""

    def __init__(self, workers: int, issuers: Sequence[bytes] = ()) -> None:
        self.pmap = pmap = PartitionMap.even(workers)
        self.states = [PartitionState(pmap.held_by(w)[0], issuers) for w in range(workers)]
        self._owner = pmap.owners()

    def state_of(self, coin_id: bytes) -> PartitionState:
        return self.states[self._owner[partition_of(coin_id)]]

    def participants(self, tx: Transaction) -> list[int]:
        """Indexes of the involved states, the coordinator's first."""
        coordinator = self._owner[partition_of(tx.inputs[0].coin_id)]
        involved = {self._owner[partition_of(c)] for c, _ in tx.inputs}
        involved.update(self._owner[partition_of(c)] for c in tx.output_ids)
        involved.discard(coordinator)
        return [coordinator, *sorted(involved)]

    def submit(self, tx: Transaction, verify: bool = True) -> list[Prepared]:
        """Run the two-phase commit; raises the first participant's rejection."""
        prepared: list[int] = []
        votes = []
        try:
            for w in self.participants(tx):
                votes.append(self.states[w].prepare(tx, verify))
                prepared.append(w)
        except Exception:
            for w in prepared:
                self.states[w].abort(tx.txid)
            raise
        for w in prepared:
            self.states[w].commit(tx.txid)
        return votes

    def issue(self, issuance: Issuance) -> list[bytes]:
        created = []
        for state in self.states:
            created.extend(state.issue(issuance))
        return created

    def coin(self, coin_id: bytes) -> Coin | None:
        return self.state_of(coin_id).coin(coin_id)

    def status(self, coin_id: bytes) -> CoinStatus:
        return self.state_of(coin_id).status(coin_id)

    def coins_of(self, owners: Collection[bytes]) -> dict[bytes, Coin]:
        found: dict[bytes, Coin] = {}
        for state in self.states:
            found.update(state.coins_of(owners))
        return found

    def balance_msat(self, owners: Collection[bytes]) -> int:
        return sum(c.value_msat for c in self.coins_of(owners).values())

    @property
    def total_msat(self) -> int:
        return sum(s.held_msat for s in self.states)

    @property
    def fees_msat(self) -> int:
        return sum(s.fees_msat for s in self.states)

    @property
    def issued_msat(self) -> int:
        return sum(s.issued_msat for s in self.states)

    def check_invariants(self) -> None:
        """Every state's invariants, and conservation of value across them."""
        for state in self.states:
            state.check_invariants()
        if not any(s.pending for s in self.states):
            assert self.total_msat + self.fees_msat == self.issued_msat, "value not conserved"
