"""What an operator computes to make, check and prove checkpoints: a deterministic
function of the shards' confirmed blocks.

Every operator follows every shard of the guild (its own copies' events logs) into a
``GuildIndex``. The operator that proposes a checkpoint takes each shard's latest block
with events (``propose``); every signer's operator recomputes each entry from its own
index before its signer signs (``check``), so a signed checkpoint says that at least a
threshold of operators computed the same coins and records. Once signed (``signed``), a
checkpoint's entries and what they cover (``Covered``) are kept to serve proofs, and each
shard forgets the heights below its entry.

A shard's records are the changes of its blocks since the previous checkpoint's entry,
one ``Record`` per transaction (or issuance) and block, in the order the block has them;
its coin tree holds every coin it ever created: unspent, or where spent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from constellation.guild import Checkpoint
from constellation.lightclient import merkle, smt
from constellation.lightclient.proof import (
    MAX_PROOF_CHECKPOINTS,
    MAX_SHARDS,
    Change,
    ChangeKind,
    CoinLeaf,
    CoinProof,
    CoinState,
    EntryProof,
    Record,
    ShardEntry,
    SignedCheckpoint,
    TxPart,
    TxProof,
    block_state,
    shards_tree,
)
from constellation.protocol.ledger import BlockEvents

ZERO = bytes(32)
MAX_SKEW_MS = 10_000  # how far ahead of a vouching operator's clock a checkpoint may be dated
Shard = tuple[int, int]  # (owner, worker)


def records_of(events: BlockEvents) -> list[Record]:
    """A block's records: its changes grouped by transaction in the order they come,
    the commits it holds marked (with the fee)."""
    by_txid: dict[bytes, Record] = {}
    for c in events.changes:
        if c.ledger:
            kind = ChangeKind.PAID_OUT
        else:
            kind = ChangeKind.CREATED if c.created else ChangeKind.SPENT
        rec = by_txid.get(c.txid)
        if rec is None:
            rec = by_txid[c.txid] = Record(events.height, c.txid, False, 0, [])
        rec.changes.append(Change(kind, c.coin_id, c.owner, c.value_msat, c.ledger))
    for txid, fee, _ in events.committed:
        rec = by_txid.get(txid) or Record(events.height, txid, False, 0, [])
        by_txid[txid] = rec._replace(committed=True, fee_msat=fee)
    return list(by_txid.values())


def coin_changes(records: Iterable[Record]) -> list[tuple[bytes, bytes]]:
    """The coin tree's changes for records: a created coin unspent, a spent one spent."""
    out = []
    for rec in records:
        for c in rec.changes:
            if c.kind is ChangeKind.PAID_OUT:
                continue
            state = CoinState.UNSPENT if c.kind is ChangeKind.CREATED else CoinState.SPENT
            leaf = CoinLeaf(state, c.value_msat, c.owner, rec.txid, rec.height)
            out.append((c.coin_id, leaf.encode()))
    return out


class Covered(NamedTuple):
    """A shard's entry, and what it commits to: the records (encoded) and their tree, and
    the coin tree. An adopted checkpoint's (``GuildIndex.adopt``) has no records."""

    entry: ShardEntry
    records: list[bytes]
    tree: merkle.MerkleTree
    coins: smt.Tree


class _Head(NamedTuple):
    block: bytes
    root: bytes
    coins: smt.Tree


class ShardIndex:
    """One shard's coins and the records since its last signed entry."""

    def __init__(self, owner: int, worker: int) -> None:
        self.owner, self.worker = owner, worker
        self.height = 0  # the last block with events applied (blocks start at 1)
        self.heads: dict[int, _Head] = {0: _Head(ZERO, ZERO, None)}
        self.records: list[tuple[int, bytes]] = []  # (height, encoded) since the floor
        self.floor = 0  # the height of the last signed entry
        # Entries computed since the floor, by height: proposing, vouching and taking a
        # checkpoint ask for the same one.
        self._covered: dict[int, Covered] = {}

    def apply(self, events: BlockEvents) -> None:
        """The next confirmed block with events (in height order)."""
        if events.height <= self.height or events.prev != (self.height or -1):
            raise ValueError(
                f"shard {self.owner}/{self.worker}: block {events.height} (after "
                f"{events.prev}) does not follow block {self.height}"
            )
        records = records_of(events)
        coins = smt.apply(self.heads[self.height].coins, coin_changes(records))
        self.records += [(events.height, r.encode()) for r in records]
        self.heads[events.height] = _Head(events.block or ZERO, events.root or ZERO, coins)
        self.height = events.height

    def covered(self, upto: int) -> Covered | None:
        """The entry at ``upto`` (a height with events at or above the last signed entry,
        or that entry's) over the records since the last signed entry; None where this
        index has not reached ``upto`` or has no block with events there."""
        head = self.heads.get(upto)
        if head is None or upto < self.floor:
            return None
        found = self._covered.get(upto)
        if found is not None:
            return found
        records = [r for h, r in self.records if h <= upto]
        tree = merkle.MerkleTree(records)
        entry = ShardEntry(
            self.owner,
            self.worker,
            upto,
            tree.size,
            tree.root(),
            smt.root_hash(head.coins),
            block_state(head.block, head.root),
        )
        found = self._covered[upto] = Covered(entry, records, tree, head.coins)
        return found

    def settle(self, upto: int) -> None:
        """A checkpoint with this shard's entry at ``upto`` is signed: what it covers goes."""
        self.records = [(h, r) for h, r in self.records if h > upto]
        self.heads = {h: head for h, head in self.heads.items() if h >= upto}
        self.floor = upto
        self._covered.clear()


class Signed(NamedTuple):
    """A signed checkpoint and, by shard, what its entries cover; ``tree`` is the tree
    of its entries (in shard order), whose root the checkpoint names."""

    checkpoint: SignedCheckpoint
    covered: dict[Shard, Covered]
    tree: merkle.MerkleTree


class GuildIndex:
    """Every shard of the guild, and the last signed checkpoint. ``members`` is the
    member set the next checkpoint names: the pinned one, then the one the last
    handover taken names."""

    def __init__(self, guild: str, members: bytes, shards: Iterable[Shard]) -> None:
        self.guild, self.members = guild, members
        self.shards = {s: ShardIndex(*s) for s in sorted(shards)}
        if not 0 < len(self.shards) <= MAX_SHARDS:
            raise ValueError(f"a guild of 1 to {MAX_SHARDS} shards")
        self.last: Signed | None = None

    def apply(self, owner: int, events: BlockEvents) -> None:
        self.shards[(owner, events.worker)].apply(events)

    def reached(self, entries: Iterable[ShardEntry]) -> bool:
        """Whether this index has applied blocks up to every entry's height (a shard it
        does not know is not reached: a member joined, and this operator runs the layout
        from before it until its processes restart with the new one)."""
        return all(
            (s := self.shards.get((e.owner, e.worker))) is not None and s.height >= e.height
            for e in entries
        )

    def moved(self) -> bool:
        """Whether some shard has blocks with events past the last signed checkpoint."""
        return any(s.height > s.floor for s in self.shards.values())

    @property
    def next_height(self) -> int:
        """The height of the next checkpoint."""
        return self._prev()[0]

    def _prev(self) -> tuple[int, bytes]:
        if self.last is None:
            return 0, ZERO
        c = self.last.checkpoint.checkpoint
        return c.height + 1, c.message()

    def propose(
        self, time_ms: int, handover: tuple[bytes, bytes] | None = None
    ) -> tuple[Checkpoint, list[ShardEntry]]:
        """The next checkpoint: every shard at its latest block with events; with
        ``handover`` (a key and member set), a handover to them."""
        entries = []
        for shard in self.shards.values():
            c = shard.covered(shard.height)
            assert c is not None, "a shard's latest height is covered"
            entries.append(c.entry)
        height, prev = self._prev()
        last_time = self.last.checkpoint.checkpoint.time_ms if self.last else 0
        root = shards_tree(entries).root()
        next_key, next_members = handover or (b"", b"")
        checkpoint = Checkpoint(
            self.guild,
            height,
            prev,
            max(time_ms, last_time),
            root,
            self.members,
            next_key,
            next_members,
        )
        return checkpoint, entries

    def check(self, checkpoint: Checkpoint, entries: list[ShardEntry], now_ms: int) -> str | None:
        """Why this index will not vouch for a proposed checkpoint, or None: it must
        follow the last signed one, name this guild's member set, not be dated ahead of
        ``now_ms`` (beyond ``MAX_SKEW_MS``), and carry exactly the entries this index
        computes at their heights."""
        found = self._compare(checkpoint, entries, now_ms)
        return found if isinstance(found, str) else None

    def _compare(
        self, checkpoint: Checkpoint, entries: list[ShardEntry], now_ms: int
    ) -> str | dict[Shard, Covered]:
        """``check``'s reason, or what this index covers at the entries' heights."""
        height, prev = self._prev()
        if checkpoint.guild != self.guild or checkpoint.members != self.members:
            return "another guild or member set"
        if checkpoint.time_ms > now_ms + MAX_SKEW_MS:
            return f"dated {checkpoint.time_ms - now_ms} ms ahead of this operator's clock"
        if (checkpoint.height, checkpoint.prev_hash) != (height, prev):
            return f"does not follow checkpoint {height - 1} known here"
        if self.last and checkpoint.time_ms < self.last.checkpoint.checkpoint.time_ms:
            return "older than the checkpoint it follows"
        why = self._shard_set(entries)
        if why:
            return why
        if shards_tree(entries).root() != checkpoint.shards:
            return "the entries do not make its shards root"
        covered = {}
        for e in entries:
            mine = self.shards[(e.owner, e.worker)].covered(e.height)
            if mine is None:
                return f"shard {e.owner}/{e.worker} has not reached {e.height} here"
            if mine.entry != e:
                return f"shard {e.owner}/{e.worker} at {e.height} differs here"
            covered[(e.owner, e.worker)] = mine
        return covered

    def _shard_set(self, entries: list[ShardEntry]) -> str:
        """Why a checkpoint's entries are not a shard set that may follow the last signed
        checkpoint's, or '': one entry per shard, in order, of shards known here, every
        shard of the last one among them. The set grows when a member joins (its shards
        come in from the first checkpoint proposed by a member that runs the new layout);
        it never shrinks (a leaver's shards stay, led by the others' copies)."""
        named = [(e.owner, e.worker) for e in entries]
        if named != sorted(set(named)):
            return "not one entry per shard, in order"
        if unknown := [s for s in named if s not in self.shards]:
            return f"shard {unknown[0][0]}/{unknown[0][1]} is not known here"
        before = set(self.last.covered) if self.last is not None else set()
        if missing := sorted(before - set(named)):
            return f"shard {missing[0][0]}/{missing[0][1]} of the last checkpoint is missing"
        return ""

    def signed(self, checkpoint: SignedCheckpoint, entries: list[ShardEntry]) -> Signed:
        """Take a checkpoint the guild signed (its signature checked by the caller), once
        this index computes the same entries (raises ValueError with ``check``'s reason
        otherwise, changing nothing)."""
        c = checkpoint.checkpoint
        covered = self._compare(c, entries, c.time_ms)
        if isinstance(covered, str):
            raise ValueError(f"signed checkpoint {c.height}: {covered}")
        return self._settle(Signed(checkpoint, covered, shards_tree(entries)))

    def adopt(self, checkpoint: SignedCheckpoint, entries: list[ShardEntry]) -> Signed:
        """Take a signed checkpoint above the next height, skipping those in between (this
        operator missed them: it was down), once this index computes the same coins and
        blocks at its entries' heights. Its records trees cannot be checked here (they are
        over the records since entries this index never saw), so none of its records are
        kept: another operator proves those transactions. Its member set is the caller's
        to check (the handovers it skipped may have changed it). Raises ValueError,
        changing nothing, where they differ."""
        c = checkpoint.checkpoint
        if c.height <= self.next_height or c.guild != self.guild:
            raise ValueError(f"checkpoint {c.height}: not one to adopt here")
        why = self._shard_set(entries)
        if why:
            raise ValueError(f"checkpoint {c.height}: {why}")
        covered = {}
        for e in entries:
            shard = self.shards[(e.owner, e.worker)]
            head = shard.heads.get(e.height)
            if head is None or e.height < shard.floor:
                raise ValueError(f"shard {e.owner}/{e.worker} has no block {e.height} here")
            state = block_state(head.block, head.root)
            if (e.coins, e.state) != (smt.root_hash(head.coins), state):
                raise ValueError(f"shard {e.owner}/{e.worker} at {e.height} differs here")
            covered[(e.owner, e.worker)] = Covered(e, [], merkle.MerkleTree([]), head.coins)
        return self._settle(Signed(checkpoint, covered, shards_tree(entries)))

    def _settle(self, signed: Signed) -> Signed:
        for shard, covered in signed.covered.items():
            self.shards[shard].settle(covered.entry.height)
        self.last = signed
        c = signed.checkpoint.checkpoint
        self.members = c.next_members or c.members
        return signed


class Held(NamedTuple):
    """A signed checkpoint as an operator keeps it (and stores it) to prove transactions
    under it: its entries, and each shard's records (by the shard's position among the
    entries; shards without records left out), encoded."""

    checkpoint: SignedCheckpoint
    entries: list[ShardEntry]
    records: dict[int, list[bytes]]


def held(signed: Signed) -> Held:
    records = {i: c.records for i, c in enumerate(signed.covered.values()) if c.records}
    return Held(signed.checkpoint, [c.entry for c in signed.covered.values()], records)


def entry_proof(signed: Signed, shard: Shard) -> EntryProof:
    i = list(signed.covered).index(shard)  # covered is in shard order
    tree = signed.tree
    return EntryProof(signed.covered[shard].entry, i, tree.size, tree.path(i))


class _Found(NamedTuple):
    """A signed checkpoint's records of one transaction: (position, index) of each."""

    checkpoint: SignedCheckpoint
    entries: list[ShardEntry]
    shards: merkle.MerkleTree
    places: list[tuple[int, int]]
    records: dict[int, list[bytes]]
    trees: dict[int, merkle.MerkleTree]


def _tx_proof(txid: bytes, found: Iterable[_Found]) -> TxProof | None:
    used: list[SignedCheckpoint] = []
    parts: list[TxPart] = []
    for f in found:
        for position, i in f.places:
            tree = f.trees.get(position) or f.trees.setdefault(
                position, merkle.MerkleTree(f.records[position])
            )
            entry = EntryProof(
                f.entries[position], position, f.shards.size, f.shards.path(position)
            )
            parts.append(TxPart(len(used), entry, f.records[position][i], i, tree.path(i)))
        used.append(f.checkpoint)
    return TxProof(txid, used, parts) if parts else None


def tx_proof(checkpoints: Iterable[Held], txid: bytes) -> TxProof | None:
    """A proof of ``txid`` from the signed checkpoints that hold its records."""
    found = []
    for h in checkpoints:
        places = [
            (position, i)
            for position, records in h.records.items()
            for i, record in enumerate(records)
            if record[8:40] == txid  # a record's txid follows its height
        ]
        if places:
            shards = shards_tree(h.entries)
            found.append(_Found(h.checkpoint, h.entries, shards, places, h.records, {}))
    return _tx_proof(txid, found)


Key = tuple[str, bytes]  # ("address", owner) or ("coin", coin id)


class Coins(NamedTuple):
    """The coins a checkpoint's records created (id, owner, the member whose ledger holds
    it, value) and spent (id): an operator's list of each address's coins."""

    created: list[tuple[bytes, bytes, int, int]]
    spent: list[bytes]

    def add(self, member: int, record: Record) -> None:
        for c in record.changes:
            if c.kind is ChangeKind.CREATED:
                self.created.append((c.coin_id, c.owner, member, c.value_msat))
            elif c.kind is ChangeKind.SPENT:
                self.spent.append(c.coin_id)


class Touched(NamedTuple):
    """What a signed checkpoint did: the keys it touches and with which transactions,
    and its coins (one reading of its records)."""

    by_key: dict[Key, list[bytes]]
    coins: Coins


class Recent:
    """The records of the last ``keep`` signed checkpoints, in memory with their trees, to
    prove at once what each new checkpoint did to an address or a coin (what a light
    client subscribed to them is pushed).

    A checkpoint *touches* a key with a transaction when the transaction's records changing
    the key (a coin created for, spent by or paid out to an address; the coin itself) are
    under it and its commit (the coordinator's record, which ``proof.verify_tx`` asks for)
    is under it or an earlier one: a participant's change can be signed a checkpoint
    before or after the commit, and is told once both are. Commits are remembered for
    ``horizon`` checkpoints (the records for ``keep``): a change signed later than that
    after its commit, or before a commit that never comes, is not told."""

    def __init__(self, keep: int, horizon: int) -> None:
        self.keep, self.horizon = keep, max(keep, horizon)
        self.kept: dict[int, _Found] = {}  # by height; places unused: the txids' are below
        self.places: dict[bytes, list[tuple[int, int, int]]] = {}  # (height, position, i)
        self.committed: dict[bytes, int] = {}  # txid -> the height of its commit
        self.commits: dict[int, list[bytes]] = {}  # height -> txids committed there
        self.touched: dict[int, dict[Key, list[bytes]]] = {}
        self.waiting: dict[bytes, tuple[int, set[Key]]] = {}  # no commit yet: since, keys

    def add(self, signed: Signed) -> Touched:
        """A signed checkpoint just taken (in height order): the keys it touches, and with
        which transactions (a checkpoint taken again, or below one taken, touches none
        again), and its coins."""
        height = signed.checkpoint.checkpoint.height
        coins = Coins([], [])
        if self.touched and height <= max(self.touched):
            return Touched({}, coins)
        records = {i: c.records for i, c in enumerate(signed.covered.values()) if c.records}
        trees = {i: c.tree for i, c in enumerate(signed.covered.values()) if c.records}
        entries = [c.entry for c in signed.covered.values()]
        self.kept[height] = _Found(signed.checkpoint, entries, signed.tree, [], records, trees)
        changed: dict[bytes, set[Key]] = {}
        commits = self.commits[height] = []
        for position, encoded in records.items():
            for i, data in enumerate(encoded):
                record = Record.decode(data)
                coins.add(entries[position].owner, record)
                self.places.setdefault(record.txid, []).append((height, position, i))
                if record.committed:
                    self.committed[record.txid] = height
                    commits.append(record.txid)
                keys = changed.setdefault(record.txid, set())
                for c in record.changes:
                    keys.add(("address", c.owner))
                    keys.add(("coin", c.coin_id))
        touched: dict[Key, list[bytes]] = {}
        for txid, keys in changed.items():
            if txid not in self.committed:
                since, waiting = self.waiting.get(txid, (height, set()))
                self.waiting[txid] = (since, waiting | keys)
                continue
            done = self.waiting.pop(txid, (0, set()))[1]
            for key in keys | done:
                touched.setdefault(key, []).append(txid)
        self.touched[height] = touched
        while len(self.kept) > self.keep:
            self._forget(min(self.kept))
        while len(self.commits) > self.horizon:
            for txid in self.commits.pop(min(self.commits)):
                self.committed.pop(txid, None)
        return Touched(touched, coins)

    def waiting_for(self, commits: Iterable[bytes]) -> list[tuple[Key, int, bytes]]:
        """Of transactions committed under a checkpoint taken earlier without its
        records (adopted by a member that had been down) and filled in since: the keys
        that their changes under later checkpoints touch, each with the height from which
        it is provable (the latest checkpoint with a record of it here). For the history
        only, not pushed (their checkpoints were pushed already); ``filled`` once
        stored."""
        found = []
        for txid in commits:
            waiting = self.waiting.get(txid)
            if waiting is not None:
                latest = max((h for h, _, _ in self.places.get(txid, [])), default=waiting[0])
                found += [(key, latest, txid) for key in waiting[1]]
        return found

    def filled(self, height: int, commits: Iterable[bytes]) -> None:
        """Those commits, of checkpoint ``height``, are known (and stored) now: their
        waiting changes are told, and later ones are told at once."""
        for txid in commits:
            self.committed[txid] = height
            self.commits.setdefault(height, []).append(txid)
            self.waiting.pop(txid, None)

    def _forget(self, height: int) -> None:
        found = self.kept.pop(height)
        del self.touched[height]
        for encoded in found.records.values():
            for data in encoded:
                txid = data[8:40]
                places = [p for p in self.places.get(txid, []) if p[0] != height]
                if places:
                    self.places[txid] = places
                else:
                    self.places.pop(txid, None)
        for txid, (since, _) in list(self.waiting.items()):
            if since <= height:
                del self.waiting[txid]

    def proof(self, txid: bytes, upto: int) -> TxProof | None:
        """A proof of ``txid`` from its records under the kept checkpoints up to ``upto``;
        None where its commit is under one no longer kept (the store has it)."""
        if self.committed.get(txid, -1) not in self.kept:
            return None
        by_height: dict[int, list[tuple[int, int]]] = {}
        for height, position, i in self.places.get(txid, []):
            if height <= upto:
                by_height.setdefault(height, []).append((position, i))
        return _tx_proof(
            txid,
            (
                self.kept[h]._replace(places=places)
                for h, places in sorted(by_height.items())[:MAX_PROOF_CHECKPOINTS]
            ),
        )


def coin_proof(signed: Signed, shard: Shard, coin_id: bytes) -> CoinProof:
    return CoinProof(
        coin_id,
        signed.checkpoint,
        entry_proof(signed, shard),
        smt.prove(signed.covered[shard].coins, coin_id),
    )
