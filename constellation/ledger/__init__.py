"""The ledger: partition state machines, and the two-phase commit that spans them
(``constellation.ledger.commit``)."""

from constellation.ledger.partition import Coin, CoinStatus, PartitionState, Prepared

__all__ = ["Coin", "CoinStatus", "PartitionState", "Prepared"]
