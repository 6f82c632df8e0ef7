"""Messages about checkpoints between an operator's services.

``Vouch``: before its signer contributes to a checkpoint, it asks its own operator's
ledger (the indexer, which follows every shard of the guild from this operator's own
copies) whether it computed the same entries. The request carries the checkpoint and the
evidence its proposer sent with it (the entries whose Merkle root it names); the answer
is a MessagePack string: a reason to refuse, or empty.
"""

from __future__ import annotations

import msgspec

from constellation.guild import Checkpoint


class Vouch(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    checkpoint: Checkpoint
    evidence: bytes
