"""A worker's ledger as replication sees it: its 2PC engine is the shard's ``Executor``.

A block's body is the list of records the leader's engine wrote (``proto.Record``).
Every copy replays them with every check a leader had to make (``TwoPhaseCommit.replay``
with ``verify``); a copy of the leader's own operator may skip transaction signatures,
which its leader checked (``signatures``). The state root is the engine's.
"""

from __future__ import annotations

import msgspec

from constellation.errors import InvalidBlock
from constellation.ledger.commit import TwoPhaseCommit
from constellation.protocol import ledger as proto

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[proto.Record])


def encode_body(records: list[proto.Record]) -> bytes:
    return _encoder.encode(records) if records else b""


def decode_body(body: bytes) -> list[proto.Record]:
    """A block's records, or ``InvalidBlock`` (an empty body is a block of no records:
    a new leader's first)."""
    if not body:
        return []
    try:
        return _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidBlock(0, f"the block body is malformed: {exc}") from None


class LedgerExecutor:
    """``Executor`` over one worker's engine."""

    def __init__(self, engine: TwoPhaseCommit) -> None:
        self.engine = engine

    def execute(self, body: bytes, signatures: bool) -> bytes:
        self.engine.replay(decode_body(body), False, verify=True, signatures=signatures)
        return self.engine.root()

    def root(self) -> bytes:
        return self.engine.root()

    def snapshot(self) -> bytes:
        return self.engine.snapshot()

    def restore(self, data: bytes) -> bytes:
        return self.engine.restore(data)
