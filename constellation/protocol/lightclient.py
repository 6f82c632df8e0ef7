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


# -- the gateway asks its operator's indexer (request/reply, ``services.bus.lc_subject``) --


class _Query(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="q"):
    pass


class Checkpoints(_Query, frozen=True, tag="checkpoints"):
    """Signed checkpoints from height ``start`` on (at most ``count``); ``start`` -1:
    the latest only."""

    start: int
    count: int


class TxProofQuery(_Query, frozen=True, tag="tx"):
    txid: bytes


class CoinProofQuery(_Query, frozen=True, tag="coin"):
    """A coin's proof as of the latest checkpoint, from the shard of ``owner`` (an
    operator's index in the guild) that holds the coin's partition."""

    owner: int
    coin_id: bytes


class DescriptorQuery(_Query, frozen=True, tag="descriptor"):
    """Answered with the guild descriptor (bech32m text) and the ``Members`` its
    member-set root commits to."""


class Handovers(_Query, frozen=True, tag="handovers"):
    """The handovers from one key and member set to the next (``Checkpoint.next_key``)
    signed at height ``start`` or above, in height order (each an encoded
    ``SignedCheckpoint``): a light client pinned to an earlier key follows them."""

    start: int


class Members(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    threshold: int
    members: list[tuple[str, bytes]]  # (name, x-only operator key), in the guild's order


class PushQuery(_Query, frozen=True, tag="pushes"):
    """What signed checkpoint ``height`` did to the keys asked (``("address", owner)`` or
    ``("coin", coin_id)``): a ``Pushed`` for each key and transaction, in key order."""

    height: int
    keys: list[tuple[str, bytes]]
    skip: int = 0  # the first key's transactions answered already


class HistoryQuery(_Query, frozen=True, tag="history"):
    """The transactions that changed an address in any member's ledger, newest first (by
    checkpoint, then txid): those before ``(before, before_txid)``, at most ``limit``;
    each item a ``Touch``."""

    owner: bytes
    before: int
    before_txid: bytes
    limit: int


class CoinsQuery(_Query, frozen=True, tag="coins"):
    """An address's coins in any member's ledger, unspent as of the latest checkpoint
    stored, by coin id after ``after``; each item an ``Owned``."""

    owner: bytes
    after: bytes
    limit: int


Query = (
    Checkpoints
    | TxProofQuery
    | CoinProofQuery
    | DescriptorQuery
    | Handovers
    | PushQuery
    | HistoryQuery
    | CoinsQuery
)


class Owned(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A coin of an address: in member ``member``'s ledger, created under checkpoint
    ``height``."""

    coin_id: bytes
    member: int
    value_msat: int
    height: int


class Pushed(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A transaction that changed ``key`` (``kind`` "address" or "coin"), and its proof
    (``proof.encode_tx_proof``) up to the checkpoint asked about."""

    kind: str
    key: bytes
    txid: bytes
    proof: bytes


class Touch(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A transaction that changed an address, provable from checkpoint ``height`` on."""

    height: int
    txid: bytes


class Answer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What the indexer has: encoded checkpoints (``Announced``), a proof, the guild
    descriptor, pushes or history; ``error`` where it cannot answer (no checkpoint yet,
    ...), ``unavailable`` where that may change on asking again (its database down).
    ``more``: where pushes stopped short of the size limit, the index of the first
    key not wholly answered, and ``skip`` how many of its transactions were."""

    items: list[bytes] = []
    error: str = ""
    more: int = 0
    skip: int = 0
    unavailable: bool = False


# -- between members' indexers (over the peers' NATS, unsealed: what they carry is checked) --


class RangeRequest(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A member that missed checkpoints asks another for them, from ``start`` on (at
    most ``count``), with the records they cover."""

    start: int
    count: int


class FilledItem(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    announced: bytes  # ``Announced``
    records: list[tuple[int, list[bytes]]]  # (the shard's position, its records)


class Fills(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    items: list[FilledItem]
