"""What a light client checks: the guild's signed checkpoints, and proofs under them.

A checkpoint (``constellation.guild.Checkpoint``, one BIP340 signature under the guild
key) commits in ``shards`` to an RFC 9162 Merkle tree over one ``ShardEntry`` per shard,
ordered by (owner, worker). An entry says, for its shard at ``height`` (a confirmed
block): a hash of the block's header hash and consensus state root (``block_state``),
the root of the shard's coin tree (``smt``), and the root of an RFC 9162 tree over the
``Record`` s of the shard's blocks since the previous checkpoint's entry (``size`` of
them).

* A **transaction proof** shows, for each shard the transaction touched, its record
  (what it spent and created there, the block's height, and at its coordinator's shard
  the fee and that it committed) under an entry under a signed checkpoint. The record at
  the coordinator is the commit: a proof without one is refused (``Unconfirmed``).
* A **coin proof** shows the coin's leaf in the shard's coin tree as of a checkpoint: it
  exists and is unspent (its value and owner), or where it was spent; or that no coin of
  that id exists in that shard.

Nothing in a proof is taken from the server on trust: every hash is recomputed, every
path checked against the root above it, and the checkpoint against the pinned guild key
and member set, or the key and member set that a chain of handovers from them names for
its height (``Pin.follow``). A proof is bytes (``encode_*``/``decode_*``, big-endian,
fixed layouts); each refusal is a ``ProofRefused`` naming the check that failed.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import msgspec

from constellation.address import decode_bytes, encode_bytes
from constellation.codec import Reader, u16, u32, u64
from constellation.errors import (
    BadCheckpointSignature,
    BadCoinPath,
    BadEntryPath,
    BadHandover,
    BadRecordPath,
    DecodeError,
    InvalidAddress,
    StaleCheckpoint,
    Unconfirmed,
    UnsupportedVersion,
    WrongGuild,
    WrongMembers,
    WrongSubject,
)
from constellation.guild import GUILD_ID_MAX_LEN, Checkpoint
from constellation.hashing import tagged_hasher
from constellation.keys import schnorr_verify
from constellation.lightclient import merkle, smt

VERSION = 1
MAX_SHARDS = 4096
MAX_CHANGES = 1024  # a record's coin changes
MAX_PARTS = 64  # shards one transaction proof covers
MAX_PROOF_CHECKPOINTS = 16  # checkpoints one transaction proof spans
_members_hash = tagged_hasher("Constellation/members")
_block_state = tagged_hasher("Constellation/block-state")


def members_root(threshold: int, members: list[tuple[str, bytes]]) -> bytes:
    """The commitment to a member set: the threshold, and each member's name and x-only
    operator key, in the guild's order."""
    data = u16(threshold) + u16(len(members))
    for name, key in members:
        raw = name.encode()
        data += u16(len(raw)) + raw + key
    return _members_hash(data)


def block_state(block: bytes, root: bytes) -> bytes:
    """An entry's commitment to its block: the header hash and the consensus state root
    (one hash, as a light client checks records and coins, not the replicas' root)."""
    return _block_state(block + root)


class ShardEntry(NamedTuple):
    owner: int
    worker: int
    height: int
    size: int  # how many records the records tree has
    records: bytes  # RFC 9162 root over the records since the previous checkpoint
    coins: bytes  # the coin tree's root after the block at ``height``
    state: bytes  # block_state() of that block

    def encode(self) -> bytes:
        return (
            u16(self.owner)
            + u16(self.worker)
            + u64(self.height)
            + u32(self.size)
            + self.records
            + self.coins
            + self.state
        )

    @staticmethod
    def read(r: Reader) -> ShardEntry:
        return ShardEntry(r.u16(), r.u16(), r.u64(), _u32(r), r.bytes(32), r.bytes(32), r.bytes(32))


def shards_tree(entries: list[ShardEntry]) -> merkle.MerkleTree:
    """The tree a checkpoint's ``shards`` is the root of (entries in (owner, worker) order)."""
    return merkle.MerkleTree([e.encode() for e in entries])


class ChangeKind(Enum):
    SPENT = 0
    CREATED = 1
    PAID_OUT = 2  # an output to another ledger: owed to it, never a coin here


class Change(NamedTuple):
    kind: ChangeKind
    coin_id: bytes
    owner: bytes
    value_msat: int
    ledger: bytes  # PAID_OUT: the other ledger's id; else empty


class Record(NamedTuple):
    """One transaction's (or issuance's) changes in one shard's block."""

    height: int
    txid: bytes
    committed: bool  # this shard coordinated it, and this block holds its commit
    fee_msat: int
    changes: list[Change]

    def encode(self) -> bytes:
        out = [u64(self.height), self.txid, bytes([self.committed]), u64(self.fee_msat)]
        out.append(u16(len(self.changes)))
        for c in self.changes:
            out += [bytes([c.kind.value]), c.coin_id, c.owner, u64(c.value_msat)]
            if c.kind is ChangeKind.PAID_OUT:
                out.append(c.ledger)
        return b"".join(out)

    @staticmethod
    def decode(data: bytes) -> Record:
        r = Reader(data, "record")
        height, txid, committed, fee = r.u64(), r.bytes(32), r.u8(), r.u64()
        if committed > 1:
            raise DecodeError("record: committed is 0 or 1")
        changes = []
        for _ in range(r.count(0, MAX_CHANGES, "changes")):
            try:
                kind = ChangeKind(r.u8())
            except ValueError:
                raise DecodeError("record: unknown kind of change") from None
            coin_id, owner, value = r.bytes(32), r.bytes(32), r.u64()
            ledger = r.bytes(8) if kind is ChangeKind.PAID_OUT else b""
            changes.append(Change(kind, coin_id, owner, value, ledger))
        r.finish()
        return Record(height, txid, bool(committed), fee, changes)


class CoinState(Enum):
    SPENT = 0
    UNSPENT = 1


class CoinLeaf(NamedTuple):
    """A coin tree's value: the coin, and the transaction and height that created it
    (unspent) or spent it."""

    state: CoinState
    value_msat: int
    owner: bytes
    txid: bytes
    height: int

    def encode(self) -> bytes:
        return (
            bytes([self.state.value])
            + u64(self.value_msat)
            + self.owner
            + self.txid
            + u64(self.height)
        )

    @staticmethod
    def decode(data: bytes) -> CoinLeaf:
        r = Reader(data, "coin leaf")
        try:
            state = CoinState(r.u8())
        except ValueError:
            raise DecodeError("coin leaf: unknown state") from None
        leaf = CoinLeaf(state, r.u64(), r.bytes(32), r.bytes(32), r.u64())
        r.finish()
        return leaf


# -- what a wallet pins, and the checkpoints -----------------------------------------------


class Pin(NamedTuple):
    """What a wallet trusts: the guild's name, its key (x-only) and member set, and the
    handovers it followed from them (signed checkpoints, in height order), each naming
    the key and member set of the checkpoints above it."""

    guild: str
    key: bytes
    members: bytes
    handovers: tuple[SignedCheckpoint, ...] = ()

    def at(self, height: int) -> tuple[bytes, bytes]:
        """The key and member set of the checkpoint at ``height``."""
        key, members = self.key, self.members
        for h in self.handovers:
            if h.checkpoint.height >= height:
                break
            key, members = h.checkpoint.next_key, h.checkpoint.next_members
        return key, members

    @property
    def handed(self) -> int:
        """The height of the last handover followed (-1: none)."""
        return self.handovers[-1].checkpoint.height if self.handovers else -1

    def follow(self, signed: SignedCheckpoint) -> Pin:
        """This pin after handover ``signed``: checked (raises ``ProofRefused``) to be
        signed by the key this pin names at its height, above the last handover."""
        c = verify_checkpoint(self, signed)
        if not c.next_key:
            raise BadHandover(f"checkpoint {c.height} hands over to no key")
        if c.height <= self.handed:
            raise BadHandover(f"handover {c.height} is not above handover {self.handed}")
        return self._replace(handovers=(*self.handovers, signed))


DESCRIPTOR_HRP = "cstguild"
MAX_DESCRIPTOR = 400  # characters


class Descriptor(NamedTuple):
    """What a wallet pins, as one string it can scan or paste (bech32m, ``cstguild1…``):
    the pin, and the hash of the guild's first checkpoint, where the chain of checkpoints
    a wallet follows starts."""

    pin: Pin
    first: bytes  # message() of checkpoint 0

    def encode(self) -> str:
        guild = self.pin.guild.encode()
        data = bytes([VERSION, len(guild)]) + guild + self.pin.key + self.pin.members + self.first
        return encode_bytes(DESCRIPTOR_HRP, data)

    @staticmethod
    def decode(text: str) -> Descriptor:
        try:
            data = decode_bytes(text.strip(), DESCRIPTOR_HRP, MAX_DESCRIPTOR)
        except InvalidAddress as exc:
            raise DecodeError(f"guild descriptor: {exc}") from None
        r = Reader(data, "guild descriptor")
        _version(r)
        pin = Pin(_guild_name(r), r.bytes(32), r.bytes(32))
        first = r.bytes(32)
        r.finish()
        return Descriptor(pin, first)


class SignedCheckpoint(NamedTuple):
    checkpoint: Checkpoint
    sig: bytes

    def encode(self) -> bytes:
        c = self.checkpoint
        guild = c.guild.encode()
        return (
            bytes([len(guild)])
            + guild
            + u64(c.height)
            + c.prev_hash
            + u64(c.time_ms)
            + c.shards
            + c.members
            + (b"\x01" + c.next_key + c.next_members if c.next_key else b"\x00")
            + self.sig
        )

    @staticmethod
    def read(r: Reader) -> SignedCheckpoint:
        c = Checkpoint(_guild_name(r), r.u64(), r.bytes(32), r.u64(), r.bytes(32), r.bytes(32))
        if _small(r, 0, 1, "a handover flag"):
            c = msgspec.structs.replace(c, next_key=r.bytes(32), next_members=r.bytes(32))
        return SignedCheckpoint(c, r.bytes(64))

    @staticmethod
    def decode(data: bytes) -> SignedCheckpoint:
        r = Reader(data, "signed checkpoint")
        signed = SignedCheckpoint.read(r)
        r.finish()
        return signed


def verify_checkpoint(pin: Pin, signed: SignedCheckpoint, not_below: int = 0) -> Checkpoint:
    """The checkpoint, if it is the pinned guild's, by its member set at its height,
    signed by its key at its height, and not older than ``not_below`` (the highest the
    caller has seen, where it needs the latest state)."""
    c = signed.checkpoint
    if c.guild != pin.guild:
        raise WrongGuild(f"checkpoint of guild {c.guild!r}, pinned {pin.guild!r}")
    key, members = pin.at(c.height)
    if c.members != members:
        raise WrongMembers(f"checkpoint {c.height} names member set {c.members.hex()[:16]}…")
    if not schnorr_verify(key, c.message(), signed.sig):
        raise BadCheckpointSignature(f"checkpoint {c.height} is not signed by the guild key")
    if c.height < not_below:
        raise StaleCheckpoint(f"checkpoint {c.height}, but {not_below} was seen already")
    return c


class EntryProof(NamedTuple):
    """A shard's entry, and its place in a checkpoint's tree of ``size`` entries."""

    entry: ShardEntry
    position: int
    size: int
    path: list[bytes]

    def encode(self) -> bytes:
        return self.entry.encode() + u16(self.position) + u16(self.size) + _path(self.path)

    @staticmethod
    def read(r: Reader) -> EntryProof:
        entry, position, size = ShardEntry.read(r), r.u16(), r.u16()
        if not position < size <= MAX_SHARDS:
            raise DecodeError(f"{r.what}: entry {position} of {size}, at most {MAX_SHARDS}")
        return EntryProof(entry, position, size, _read_path(r))

    def verify(self, checkpoint: Checkpoint) -> ShardEntry:
        if not merkle.verify_path(
            self.entry.encode(), self.position, self.size, self.path, checkpoint.shards
        ):
            e = self.entry
            raise BadEntryPath(
                f"shard {e.owner}/{e.worker} at {e.height} is not under checkpoint "
                f"{checkpoint.height}"
            )
        return self.entry


# -- transactions -----------------------------------------------------------------------------


class TxPart(NamedTuple):
    """The transaction's record in one shard, under checkpoint ``checkpoint`` (an index
    into the proof's checkpoints)."""

    checkpoint: int
    entry: EntryProof
    record: bytes
    position: int  # in the entry's records tree
    path: list[bytes]


class TxProof(NamedTuple):
    txid: bytes
    checkpoints: list[SignedCheckpoint]
    parts: list[TxPart]


class Placed(NamedTuple):
    """A verified record, the shard it is in and the checkpoint it is under."""

    owner: int
    worker: int
    checkpoint: int
    record: Record


def encode_tx_proof(p: TxProof) -> bytes:
    out = [bytes([VERSION]), p.txid, bytes([len(p.checkpoints)])]
    out += [c.encode() for c in p.checkpoints]
    out.append(bytes([len(p.parts)]))
    for part in p.parts:
        assert part.record[8:40] == p.txid, "a part is a record of the proof's transaction"
        record = part.record[:8] + part.record[40:]  # the txid is the proof's
        out += [
            bytes([part.checkpoint]),
            part.entry.encode(),
            u16(len(record)),
            record,
            u32(part.position),
            _path(part.path),
        ]
    return b"".join(out)


def decode_tx_proof(data: bytes) -> TxProof:
    r = Reader(data, "transaction proof")
    _version(r)
    txid = r.bytes(32)
    n = _small(r, 1, MAX_PROOF_CHECKPOINTS, "checkpoints")
    checkpoints = [SignedCheckpoint.read(r) for _ in range(n)]
    parts = []
    for _ in range(_small(r, 1, MAX_PARTS, "parts")):
        cp, entry = r.u8(), EntryProof.read(r)
        if cp >= len(checkpoints):
            raise DecodeError("transaction proof: a part names a checkpoint it lacks")
        record = r.bytes(r.u16())
        if len(record) < 8:
            raise DecodeError("transaction proof: a record shorter than its height")
        record = record[:8] + txid + record[8:]
        parts.append(TxPart(cp, entry, record, _u32(r), _read_path(r)))
    r.finish()
    return TxProof(txid, checkpoints, parts)


def verify_tx(pin: Pin, proof: TxProof, txid: bytes) -> list[Placed]:
    """The transaction's records, each checked up to a signed checkpoint, each once;
    refused unless one is its commit (the coordinator's record). The records shown are
    the transaction's changes in those shards; a server may leave a shard's out (to see
    an output, ask for the coin's proof)."""
    if proof.txid != txid:
        raise WrongSubject(f"the proof is of transaction {proof.txid.hex()}, not {txid.hex()}")
    checkpoints = [verify_checkpoint(pin, c) for c in proof.checkpoints]
    placed: list[Placed] = []
    for part in proof.parts:
        checkpoint = checkpoints[part.checkpoint]
        entry = part.entry.verify(checkpoint)
        if not merkle.verify_path(part.record, part.position, entry.size, part.path, entry.records):
            raise BadRecordPath(
                f"record {part.position} is not among shard {entry.owner}/{entry.worker}'s "
                f"records under checkpoint {checkpoint.height}"
            )
        record = Record.decode(part.record)
        if record.txid != txid:
            raise WrongSubject(f"a record of transaction {record.txid.hex()}, not {txid.hex()}")
        if record.height > entry.height:
            raise BadRecordPath(f"a record at height {record.height}, above its entry's")
        if any(
            (p.owner, p.worker, p.record.height) == (entry.owner, entry.worker, record.height)
            for p in placed
        ):
            raise BadRecordPath(
                f"shard {entry.owner}/{entry.worker}'s record at {record.height} is shown twice"
            )
        placed.append(Placed(entry.owner, entry.worker, checkpoint.height, record))
    if not any(p.record.committed for p in placed):
        raise Unconfirmed(f"no record shows transaction {txid.hex()} committed")
    return placed


# -- coins ------------------------------------------------------------------------------------


class CoinProof(NamedTuple):
    coin_id: bytes
    checkpoint: SignedCheckpoint
    entry: EntryProof
    path: smt.Path


class CoinVerdict(NamedTuple):
    """A coin as of checkpoint ``checkpoint``: ``leaf`` None where no such coin exists."""

    checkpoint: int
    owner: int
    worker: int
    leaf: CoinLeaf | None


def encode_coin_proof(p: CoinProof) -> bytes:
    path = p.path
    depth = len(path.siblings)
    present = 0
    for i, h in enumerate(path.siblings):
        if h != smt.EMPTY:
            present |= 1 << i
    out = [bytes([VERSION]), p.coin_id, p.checkpoint.encode(), p.entry.encode()]
    out += [u16(depth), present.to_bytes((depth + 7) // 8, "little")]
    out += [h for h in path.siblings if h != smt.EMPTY]
    if path.leaf_key:
        out += [b"\x01", path.leaf_key, u16(len(path.leaf_value)), path.leaf_value]
    else:
        out.append(b"\x00")
    return b"".join(out)


def decode_coin_proof(data: bytes) -> CoinProof:
    r = Reader(data, "coin proof")
    _version(r)
    coin_id, checkpoint, entry = r.bytes(32), SignedCheckpoint.read(r), EntryProof.read(r)
    depth = r.u16()
    if depth > smt.KEY_BITS:
        raise DecodeError("coin proof: deeper than the key")
    present = int.from_bytes(r.bytes((depth + 7) // 8), "little")
    if present >> depth:
        raise DecodeError("coin proof: bits set past the path's depth")
    siblings = [r.bytes(32) if present >> i & 1 else smt.EMPTY for i in range(depth)]
    terminal = r.u8()
    if terminal > 1:
        raise DecodeError("coin proof: unknown end of path")
    key, value = (r.bytes(32), r.bytes(r.u16())) if terminal else (b"", b"")
    r.finish()
    return CoinProof(coin_id, checkpoint, entry, smt.Path(siblings, key, value))


def verify_coin(
    pin: Pin, proof: CoinProof, coin_id: bytes, shard: tuple[int, int], not_below: int = 0
) -> CoinVerdict:
    """The coin's state as of the proof's checkpoint (which must not be older than
    ``not_below``), in ``shard`` (owner, worker): the shard that holds the coin's
    partition in its ledger, which the caller knows. A proof from another shard is
    refused: there, no such coin would say nothing."""
    if proof.coin_id != coin_id:
        raise WrongSubject(f"the proof is of coin {proof.coin_id.hex()}, not {coin_id.hex()}")
    checkpoint = verify_checkpoint(pin, proof.checkpoint, not_below)
    entry = proof.entry.verify(checkpoint)
    if (entry.owner, entry.worker) != shard:
        raise WrongSubject(
            f"the proof is from shard {entry.owner}/{entry.worker}, not {shard[0]}/{shard[1]}"
        )
    path = proof.path
    if smt.path_root(coin_id, path) != entry.coins:
        raise BadCoinPath(
            f"coin {coin_id.hex()} does not lead to shard {entry.owner}/{entry.worker}'s "
            f"coin root at checkpoint {checkpoint.height}"
        )
    if path.leaf_key and path.leaf_key != coin_id:
        if not smt.shares_prefix(path.leaf_key, coin_id, len(path.siblings)):
            raise BadCoinPath("the leaf shown in place of the coin is not on its path")
        return CoinVerdict(checkpoint.height, entry.owner, entry.worker, None)
    leaf = CoinLeaf.decode(path.leaf_value) if path.leaf_key else None
    return CoinVerdict(checkpoint.height, entry.owner, entry.worker, leaf)


# -- encoding helpers ---------------------------------------------------------------------


def _guild_name(r: Reader) -> str:
    """A guild's name: its length (1 byte), then UTF-8."""
    n = r.u8()
    if not 0 < n <= GUILD_ID_MAX_LEN:
        raise DecodeError(f"{r.what}: guild name length out of range")
    try:
        return r.bytes(n).decode()
    except UnicodeDecodeError:
        raise DecodeError(f"{r.what}: the guild name is not UTF-8") from None


def _path(path: list[bytes]) -> bytes:
    return bytes([len(path)]) + b"".join(path)


def _read_path(r: Reader) -> list[bytes]:
    n = r.u8()
    if n > merkle.MAX_PATH:
        raise DecodeError(f"{r.what}: a path of {n} hashes")
    return [r.bytes(32) for _ in range(n)]


def _u32(r: Reader) -> int:
    return int.from_bytes(r.bytes(4))


def _small(r: Reader, lo: int, hi: int, of: str) -> int:
    n = r.u8()
    if not lo <= n <= hi:
        raise DecodeError(f"{r.what}: {n} {of}, allowed {lo}..{hi}")
    return n


def _version(r: Reader) -> None:
    v = r.u8()
    if v != VERSION:
        raise UnsupportedVersion(f"{r.what}: version {v}, this reads {VERSION}")
