"""Messages of the partition workers, and the records of their block logs.

Between workers (and from a gateway to a worker) messages travel in a ``Package``: the
items one sender has for one destination, closed by a size limit or a deadline. Items
are tagged MessagePack arrays; unknown kinds and malformed items are refused.

Two-phase commit, as items::

    gateway  --Submit-->  coordinator  --Prepare-->  participant
    gateway  <--Result--  coordinator  <--Vote-----  participant
                          coordinator  --Decide--->  participant
                          coordinator  <--Ask------  participant  (in doubt, e.g. restarted)
                          coordinator  <--Done-----  participant  (the commit is durable here)

A transaction refused or aborted may be submitted again (a client retries), so one txid
can have several rounds of two-phase commit, one at a time. Each round is an
``attempt``, a number the coordinator draws at random: every Prepare, Vote, Decide and
Ask names it, so that a message of an earlier round (late, repeated, or answering a
question about it) never counts in a later one. A coordinator remembers a commit until
every participant has said Done, then logs that it may forget it (``Ended``): what it
does not remember was aborted (presumed abort).

A worker's block log holds ``Block`` records: what it prepared (as a participant),
committed, aborted and issued, in order. Replaying them rebuilds its state.
"""

from __future__ import annotations

import itertools
from typing import Annotated, NamedTuple, Union

import msgspec

from constellation.errors import InvalidSnapshot, MessageError

PROTOCOL_VERSION = 2


class _Item(msgspec.Struct, frozen=True, array_like=True, tag_field="k"):
    pass


class Submit(_Item, frozen=True, tag="s"):
    """Gateway -> coordinator: run this encoded transaction; answer ``Result`` with ``rid``."""

    rid: int
    tx: bytes


U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack carries none above 2^64 - 1


class Issue(_Item, frozen=True, tag="i"):
    """Gateway -> a worker holding an output: apply this encoded issuance."""

    rid: int
    issuance: bytes


class Prepare(_Item, frozen=True, tag="p"):
    """Coordinator -> participant: lock and check your part of this encoded transaction."""

    tx: bytes
    attempt: U64


class Vote(_Item, frozen=True, tag="v"):
    """Participant -> coordinator: YES (``code`` empty; persisted at ``height``) or NO."""

    txid: bytes
    code: str
    detail: str
    height: int
    attempt: U64


class Decide(_Item, frozen=True, tag="d"):
    """Coordinator -> participant: the outcome of one attempt."""

    txid: bytes
    commit: bool
    attempt: U64


class Ask(_Item, frozen=True, tag="a"):
    """Participant -> coordinator: what became of this attempt, which I prepared?"""

    txid: bytes
    attempt: U64


class Result(_Item, frozen=True, tag="r"):
    """Worker -> gateway: committed (``code`` empty) with block references, or refused."""

    rid: int
    code: str
    detail: str
    blocks: list[tuple[int, int]]  # (worker, height) holding this transaction's parts


class Done(_Item, frozen=True, tag="e"):
    """Participant -> coordinator: this attempt's commit is durable here."""

    txid: bytes
    attempt: U64


Item = Union[Submit, Issue, Prepare, Vote, Decide, Ask, Done, Result]  # noqa: UP007


class Package(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    v: int
    sender: int  # worker id, or -1 for a gateway
    reply: str  # subject for answers
    map_version: int
    items: list[Item]


# -- block log records ------------------------------------------------------------------


class _Rec(msgspec.Struct, frozen=True, array_like=True, tag_field="k"):
    pass


class Prepared(_Rec, frozen=True, tag="P"):
    """This worker voted YES as a participant: locks held until the outcome is known."""

    tx: bytes
    coordinator: int
    attempt: int = 0  # 0 in logs written before attempts were named


class Committed(_Rec, frozen=True, tag="C"):
    """Committed; ``tx`` is carried by the coordinator's record (nothing prepared before)."""

    txid: bytes
    tx: bytes
    attempt: int = 0  # the coordinator's: the attempt that committed


class Aborted(_Rec, frozen=True, tag="A"):
    txid: bytes


class Issued(_Rec, frozen=True, tag="I"):
    issuance: bytes


class Ended(_Rec, frozen=True, tag="E"):
    """The coordinator's: every participant has this commit durably; nobody will ask."""

    txid: bytes


Record = Union[Prepared, Committed, Aborted, Issued, Ended]  # noqa: UP007


class Block(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    worker: int
    height: int
    records: list[Record]


# A block closes at either, so that it (and a replicated shard's Append carrying it)
# fits in one NATS message (1 MiB at most), and its events too: about 110 bytes a coin
# change, and the transactions committed, whose bytes its records carry.
MAX_BLOCK_BYTES = 256 << 10
MAX_BLOCK_CHANGES = 4096


# A package closes at this size, so that it fits in one NATS message: one item more
# (a transaction, at most about 100 kB) keeps it well within.
MAX_PACKAGE_BYTES = 512 << 10


def size_of(message: Record | Item) -> int:
    """About the encoded size of a block's record or a package's item (the transaction
    or issuance it carries, and a little more)."""
    return 64 + len(getattr(message, "tx", b"")) + len(getattr(message, "issuance", b""))


# -- snapshots of a shard's state -------------------------------------------------------
#
# A copy of a shard that is behind its log catches up from a snapshot: the state after a
# block, whose signed header carries the root the snapshot must hash to. It is another
# operator's data, so its fields are bounded here and its consistency is checked on
# restore. Lists are sorted by id, one encoding per state.

SNAPSHOT_VERSION = 2

# MessagePack integers end at 2^64 - 1: an unsigned one needs no upper bound.
Id = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Msat = Annotated[int, msgspec.Meta(ge=1)]
WorkerId = Annotated[int, msgspec.Meta(ge=0, le=255)]
U128 = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]  # big-endian: a total


class InDoubt(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A transaction prepared here (a PREPARED record) whose outcome is not known yet."""

    txid: Id
    coordinator: WorkerId
    attempt: U64
    inputs: list[Id]  # the coins held here that it locks, in the transaction's order
    outputs: list[tuple[Id, Msat, Id]]  # (coin id, value, owner) it creates here


class DecidedCommit(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A commit this worker coordinated, until every participant has said Done."""

    txid: Id
    attempt: U64
    participants: list[WorkerId]  # ascending


class Snapshot(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    version: int
    worker: WorkerId
    map_version: U64
    coins: list[tuple[Id, Msat, Id]]  # (coin id, value, owner), unspent
    spent: list[tuple[Id, Id]]  # (coin id, the txid that spent it)
    issued: list[Id]  # issuance ids applied
    in_doubt: list[InDoubt]
    decided: list[DecidedCommit]
    issued_msat: U128
    received_msat: U128
    sent_msat: U128
    fees_msat: U128
    outbound_msat: U128


# -- committed changes by block, for indexes and subscriptions --------------------------
#
# A worker derives each block's changes from the block and its state, writes them to
# its events log and publishes them. Readers follow them by (worker, height): ``prev``
# chains a worker's blocks with events, so a reader sees at once what it missed and
# asks the worker's events log for it (``EventsQuery``, answered by an ``EventsPage``).


class CoinChange(msgspec.Struct, frozen=True, array_like=True):
    """A coin created or spent here; or, with ``ledger``, an output paid to another
    ledger (created there, pending until settled: never a coin here)."""

    txid: bytes  # the transaction or issuance
    coin_id: bytes
    owner: bytes
    value_msat: int
    created: bool  # False: spent
    ledger: bytes = b""  # the other ledger's id, for an output paid to it


class Commit(NamedTuple):
    """A transaction this worker coordinated, committed: its id, its fee, and its
    encoding (so that a reader knows every part of it before the other workers' parts
    come); or an issuance that created coins here (its id, 0, nothing: each shard's part
    of one is final on its own). Events written before the encoding was carried have
    none."""

    txid: bytes
    fee_msat: int
    tx: bytes = b""


class BlockEvents(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    worker: int
    height: int
    prev: int  # the height of this worker's previous block with events; -1: none
    changes: list[CoinChange]
    committed: list[Commit]
    # A replicated shard's block: its header hash and the state root after it (what a
    # light-client checkpoint names); empty where nobody replicates the shard.
    block: bytes = b""
    root: bytes = b""


class EventsHead(msgspec.Struct, frozen=True, array_like=True):
    """The first fields of a ``BlockEvents``: enough to index an events log quickly."""

    worker: int
    height: int
    prev: int


class EventsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reader -> worker: the events of your blocks above height ``after``."""

    after: int


class EventsPage(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Worker -> reader: the next blocks' events in order (a bounded number of bytes, at
    least one block if there is any), and the height of the worker's latest block with
    events, so that the reader knows how far behind it is."""

    last: int
    blocks: list[BlockEvents]


# -- queries (request/reply) -------------------------------------------------------------


class CoinQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    coin_ids: list[bytes]


class CoinInfo(msgspec.Struct, frozen=True, array_like=True):
    coin_id: bytes
    status: str  # unspent | locked | spent | unknown
    value_msat: int
    owner: bytes  # empty unless the coin exists here
    spent_by: bytes  # empty unless spent


class StateInfo(msgspec.Struct, frozen=True):
    """A worker's totals, for operators and the tests' conservation checks."""

    worker: int
    map_version: int
    height: int
    held_msat: int
    issued_msat: int
    fees_msat: int
    coins: int
    locks: int
    in_doubt: int
    coordinating: int
    events_height: int  # the latest block with events (-1: none): what readers follow
    outbound_msat: int = 0  # paid to other ledgers (coordinated here)
    pending_msat: int = 0  # locked or to be created by transactions prepared here
    leader: int = -1  # the copy of the shard that answered, leading it (-1: not replicated)
    term: int = 0  # its term
    confirmed: int = -1  # the shard's confirmed height (-1: not replicated; see height)


_package_encoder = msgspec.msgpack.Encoder()
_package_decoder = msgspec.msgpack.Decoder(Package)
_block_decoder = msgspec.msgpack.Decoder(Block)
_events_decoder = msgspec.msgpack.Decoder(list[BlockEvents])
_block_events_decoder = msgspec.msgpack.Decoder(BlockEvents)
_page_decoder = msgspec.msgpack.Decoder(EventsPage)
_snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)
_head_decoder = msgspec.msgpack.Decoder(EventsHead)


def encode(msg: Package | Block) -> bytes:
    return _package_encoder.encode(msg)


def encode_block_events(events: BlockEvents) -> bytes:
    """One block's events, as its worker stores them."""
    return _package_encoder.encode(events)


def encode_events(blocks: list[bytes]) -> bytes:
    """One message of the events subject: consecutive blocks' encoded events of one
    worker (as ``encode_block_events`` made them), as one list."""
    return _package_encoder.encode([msgspec.Raw(b) for b in blocks])


def encode_page(last: int, blocks: list[bytes]) -> bytes:
    return _package_encoder.encode((last, [msgspec.Raw(b) for b in blocks]))


def decode_package(data: bytes) -> Package:
    try:
        pkg = _package_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed package: {exc}") from None
    if pkg.v != PROTOCOL_VERSION:
        raise MessageError(f"package version {pkg.v}, expected {PROTOCOL_VERSION}")
    return pkg


def decode_block(data: bytes) -> Block:
    try:
        return _block_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed block: {exc}") from None


def decode_events(data: bytes) -> list[BlockEvents]:
    try:
        return _events_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed block events: {exc}") from None


def decode_block_events(data: bytes) -> BlockEvents:
    try:
        return _block_events_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed block events: {exc}") from None


def decode_events_head(data: bytes) -> EventsHead:
    try:
        return _head_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed block events: {exc}") from None


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return _package_encoder.encode(snapshot)


def decode_snapshot(data: bytes) -> Snapshot:
    """A snapshot's fields, each within its bounds, or ``InvalidSnapshot``; whether they
    describe a state is for the restore to check."""
    try:
        snapshot = _snapshot_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidSnapshot(f"malformed snapshot: {exc}") from None
    if snapshot.version != SNAPSHOT_VERSION:
        raise InvalidSnapshot(f"snapshot version {snapshot.version}, expected {SNAPSHOT_VERSION}")
    return snapshot


def decode_page(data: bytes) -> EventsPage:
    """A worker's answer to an ``EventsQuery``: its blocks in order, each above the one
    before and chained to it, or ``MessageError``."""
    try:
        page = _page_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed events page: {exc}") from None
    for before, after in itertools.pairwise(page.blocks):
        if after.prev != before.height or after.height <= before.height:
            raise MessageError(f"events page: block {after.height} does not follow {before.height}")
    return page


_copy_page_decoder = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])


def encode_copy_page(whole: int, page: bytes) -> bytes:
    """A copy's answer to an ``EventsQuery`` on its own subject: how far its events log
    is whole (it holds every confirmed block's events up to there), and the page."""
    return _package_encoder.encode((whole, msgspec.Raw(page)))


def split_copy_page(data: bytes) -> tuple[int, bytes]:
    """A copy's answer: how far its log is whole, and the page as a worker encodes it."""
    try:
        whole, raw = _copy_page_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed copy's events page: {exc}") from None
    return whole, bytes(raw)


def decode_copy_page(data: bytes) -> tuple[int, EventsPage]:
    whole, raw = split_copy_page(data)
    return whole, decode_page(raw)
