"""Messages between the copies of a shard, and what they sign.

A shard (one worker's block log, named by its owning operator and worker index) has two
copies at every operator of the guild. A copy is numbered ``2 * operator + machine``.
Copies talk in ``Envelope`` s, each carrying one message for one shard::

    leader     --Append (blocks, confirmed height; a vote certificate for a new term)-->  copy
    leader     <--Appended (signed ack of the last block stored, or where to resume)----  copy
    candidate  --AskVote (PreVote first, then the real vote)-------------------------->  copy
    candidate  <--Voted (a signed vote, or a refusal)----------------------------------  copy
    leader     --Chunk (a snapshot, piece by piece, and the acks proving it confirmed)-->  copy
    leader     --TimeoutNow (campaign now: leadership goes back to a preferred copy)--->  copy
    copy       --Head (its latest header, to the copies of other operators)------------>  copy
    anyone     --Proof (evidence that an operator signed two blocks or two votes)----->  anyone

What binds a signer is signed with its operator's key (BIP340 over a tagged hash): a
block header by the leader's operator, an ack by the acking copy's, a vote by the
voter's. Two valid signatures by one operator on different headers at one (shard, term,
height), or on votes for two candidates in one term by one copy, are a ``Proof``
that anyone can check.
"""

from __future__ import annotations

from typing import Union

import msgspec

from constellation.errors import MessageError
from constellation.hashing import tagged_hasher

HASH_LEN = 32
_header_hash = tagged_hasher("constellation/block")
_ack_hash = tagged_hasher("constellation/ack")
_vote_hash = tagged_hasher("constellation/vote")
_members_hash = tagged_hasher("constellation/members")
_encoder = msgspec.msgpack.Encoder()


class Header(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a leader signs for a block. ``root`` is the shard's state root after it."""

    owner: int  # the operator whose ledger the shard is
    worker: int
    term: int
    height: int
    prev: bytes  # hash of the header at height - 1 (32 zero bytes below height 1)
    body: bytes  # sha256 of the block's body
    root: bytes
    leader: int  # the copy that made it
    time_ms: int  # the leader's clock; never read by execution
    members: bytes  # members_hash of the shard's members in effect from this block on
    # (and of which step they are)


class Members(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Which operators' copies of a shard count, as of a block.

    ``voters`` confirm blocks and elect leaders. While a member joins or leaves the
    change is *joint*: ``old`` holds the voters before it, and a block confirms (and a
    leader is elected) only with a quorum of ``voters`` and a quorum of ``old``.
    ``learners``' copies receive the log but never count: a joiner catches up as one
    before it votes. Each list is sorted, without repeats; an operator is in at most one
    of ``voters`` and ``learners``.
    """

    voters: list[int]
    old: list[int] = []
    learners: list[int] = []

    def operators(self) -> set[int]:
        """Every operator whose copies take part (vote, or learn)."""
        return {*self.voters, *self.old, *self.learners}


def members_hash(members: Members, step: int = 0) -> bytes:
    """What a block header names for ``members`` as step ``step`` of the changes its
    guild agreed to (0: its founders'). The same members at two steps (a guild back to
    voters it had before: one joined, then left) are two names, so a copy knows which
    step its shard is at and never takes a step again."""
    data = _encoder.encode(members)
    return _members_hash(data if step == 0 else data + _encoder.encode(step))


def header_hash(header: Header) -> bytes:
    return _header_hash(_encoder.encode(header))


def ack_digest(owner: int, worker: int, term: int, height: int, block: bytes, copy: int) -> bytes:
    """What a copy signs to ack: it stored and checked ``block`` (and all before it)."""
    return _ack_hash(_encoder.encode((owner, worker, term, height, block, copy)))


def vote_digest(
    owner: int, worker: int, term: int, candidate: int, last_term: int, last_height: int, voter: int
) -> bytes:
    return _vote_hash(
        _encoder.encode((owner, worker, term, candidate, last_term, last_height, voter))
    )


class Signed(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A header with its leader's operator signature."""

    header: Header
    sig: bytes


class Block(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    signed: Signed
    body: bytes


class Vote(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A copy's signed vote for ``candidate`` in ``term`` (a real vote, never a PreVote)."""

    term: int
    candidate: int
    last_term: int
    last_height: int
    voter: int
    sig: bytes


class Ack(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A copy's signed ack, as it sent it to its leader in ``term`` (``ack_digest``)."""

    copy: int
    term: int
    height: int
    block: bytes
    sig: bytes


class _Msg(msgspec.Struct, frozen=True, array_like=True, tag_field="k", forbid_unknown_fields=True):
    pass


class Append(_Msg, frozen=True, tag="a"):
    """Leader -> copy: blocks after ``prev_height`` (none: a heartbeat)."""

    term: int
    prev_height: int
    prev_hash: bytes
    blocks: list[Block]
    confirmed: int
    cert: list[Vote]  # the votes that elected this leader, until the copy acked this term
    # now and then: the leader's latest signed acks of this term (its own among them), by
    # which the copy proves a snapshot's block confirmed to the copies it may serve later
    acks: list[Ack] = []


class Appended(_Msg, frozen=True, tag="b"):
    """Copy -> leader. ``ok``: the copy stored and checked every block up to ``height``
    (hash ``block``), signed in ``sig``. Else ``height`` is where its log may resume
    (the leader sends from ``height + 1``); ``refused`` says a block was invalid."""

    term: int
    ok: bool
    height: int
    block: bytes
    sig: bytes
    refused: str


class AskVote(_Msg, frozen=True, tag="v"):
    term: int  # a PreVote names the term it would campaign in
    last_term: int
    last_height: int
    pre: bool
    transfer: bool  # asked by a copy the leader told to campaign now (TimeoutNow)


class Voted(_Msg, frozen=True, tag="w"):
    term: int
    granted: bool
    pre: bool
    vote: Vote | None  # a granted real vote, signed


class Chunk(_Msg, frozen=True, tag="c"):
    """Leader -> copy behind the log: a snapshot of the state after ``signed``'s block,
    and the proof that this block is confirmed, which the copy cannot check by executing
    it: the headers after it (``after``, each chaining to the one before) and the acks
    of a confirming set of copies for blocks among them (``replica.proves_confirmed``)."""

    term: int
    signed: Signed
    offset: int
    total: int
    data: bytes
    after: list[Header]
    acks: list[Ack]


class ChunkAck(_Msg, frozen=True, tag="d"):
    term: int
    height: int  # the snapshot's height
    offset: int  # bytes received so far


class TimeoutNow(_Msg, frozen=True, tag="t"):
    term: int


class Resign(_Msg, frozen=True, tag="r"):
    """Leader -> its followers but one: I stop leading in ``term`` (my copy moves to
    another machine); my lease is over. The one left out gets ``TimeoutNow``."""

    term: int


class Head(_Msg, frozen=True, tag="h"):
    """Copy -> copies of other operators: the header of my latest block (cross-check)."""

    signed: Signed


class Equivocation(
    msgspec.Struct, frozen=True, array_like=True, tag_field="k", tag="e", forbid_unknown_fields=True
):
    """Two headers one operator signed at one (shard, term, height)."""

    a: Signed
    b: Signed


class DoubleVote(
    msgspec.Struct, frozen=True, array_like=True, tag_field="k", tag="f", forbid_unknown_fields=True
):
    """Two votes one copy signed in one term, for different candidates."""

    owner: int
    worker: int
    a: Vote
    b: Vote


Evidence = Union[Equivocation, DoubleVote]  # noqa: UP007


class Proof(_Msg, frozen=True, tag="p"):
    evidence: Evidence


Message = Union[  # noqa: UP007
    Append, Appended, AskVote, Voted, Chunk, ChunkAck, TimeoutNow, Resign, Head, Proof
]


class Envelope(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    owner: int
    worker: int
    sender: int  # a copy
    msg: Message


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(data: bytes) -> Envelope:
    """An envelope, or ``MessageError``: malformed data, unknown kinds or fields, or
    hashes of the wrong length."""
    try:
        env = _envelope_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed replication message: {exc}") from None
    check_shape(env.msg)
    return env


def check_shape(msg: Message) -> None:
    """Refuse hashes of the wrong length, negative numbers and proofs longer than any
    real one (``MessageError``)."""
    signed: list[Signed] = []
    acks: list[Ack] = []
    if isinstance(msg, Append):
        _hash(msg.prev_hash)
        _nonneg(msg.term, msg.prev_height, msg.confirmed)
        signed = [b.signed for b in msg.blocks]
        acks = msg.acks
    elif isinstance(msg, Appended):
        _nonneg(msg.term, msg.height)
    elif isinstance(msg, AskVote):
        _nonneg(msg.term, msg.last_term, msg.last_height)
    elif isinstance(msg, ChunkAck):
        _nonneg(msg.term, msg.height, msg.offset)
    elif isinstance(msg, (Voted, TimeoutNow)):
        _nonneg(msg.term)
    elif isinstance(msg, Chunk):
        _nonneg(msg.term, msg.offset, msg.total)
        signed = [msg.signed]
        acks = msg.acks
    elif isinstance(msg, Head):
        signed = [msg.signed]
    elif isinstance(msg, Proof) and isinstance(msg.evidence, Equivocation):
        signed = [msg.evidence.a, msg.evidence.b]
    if len(acks) > MAX_ACKS:
        raise MessageError(f"{len(acks)} acks, more than {MAX_ACKS}")
    for ack in acks:
        _hash(ack.block)
        _nonneg(ack.copy, ack.term, ack.height)
    headers = [s.header for s in signed]
    if isinstance(msg, Chunk):
        if len(msg.after) > MAX_AFTER:
            raise MessageError(f"a snapshot's proof of {len(msg.after)} headers")
        headers += msg.after
    for h in headers:
        _hash(h.prev)
        _hash(h.body)
        _hash(h.root)
        _hash(h.members)
        _nonneg(h.term, h.height, h.leader)


def _hash(value: bytes) -> None:
    if len(value) != HASH_LEN:
        raise MessageError(f"a hash of {len(value)} bytes, expected {HASH_LEN}")


MAX_ACKS = 64  # in a proof of confirmation: two a copy of 32 operators
MAX_AFTER = 4096  # headers after a snapshot's block, in its proof
MAX_NUMBER = 1 << 48  # terms, heights, offsets: far above any real one, far below 2^64


def _nonneg(*values: int) -> None:
    if min(values) < 0 or max(values) >= MAX_NUMBER:
        raise MessageError("a term, height or offset out of range")
