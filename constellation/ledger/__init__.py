"""The ledger: partition state machines and the two-phase commit that spans them."""

from constellation.ledger.local import LocalLedger
from constellation.ledger.partition import Coin, CoinStatus, PartitionState, Prepared

__all__ = ["Coin", "CoinStatus", "LocalLedger", "PartitionState", "Prepared"]
