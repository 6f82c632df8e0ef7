"""The partition state machine: the coins of a set of partitions, and their locks.

A worker holds one ``PartitionState`` for the partitions it hosts. Two-phase commit
drives it: ``prepare`` locks and checks the inputs held here (a held lock is a
refusal, never a wait) and records the outputs that will be created here; ``commit``
spends and creates; ``abort`` releases. Each call either succeeds whole or raises a
typed ``LedgerError`` and changes nothing.

Invariants (``check_invariants`` verifies them all; the hot path asserts the cheap ones):

* a coin is unspent or spent, never both, and spent at most once; at most
  ``SPENT_KEPT`` spent coins are remembered, the oldest forgotten first;
* every lock belongs to exactly one pending transaction, which holds that coin as an
  input, and every pending input is an unspent coin locked by it (no leaked locks);
* ``held_msat == sum(coin values) == issued + received - sent``: value moves only
  through commits and issuances; across the states of a ledger with nothing pending,
  ``sum(held) + sum(fees) + sum(outbound) == sum(issued)``, where ``outbound`` counts
  the outputs paid to other ledgers (recorded, like the fee, by the coordinator).

``muhash`` hashes the multiset of the state's coins, spent coins and issuance ids, kept
up to date by ``commit`` and ``issue`` (a few elements per change): the part of the
shard's state root (``TwoPhaseCommit.root``) that this state holds.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection, Iterable
from enum import Enum
from typing import NamedTuple, NoReturn

from constellation.codec import u64
from constellation.errors import (
    AlreadyCommitted,
    BadIssuance,
    BadSignature,
    CoinSpent,
    InputLocked,
    InvalidSnapshot,
    NotHeldHere,
    UnknownCoin,
    UnknownTransaction,
    ValueMismatch,
)
from constellation.keys import schnorr_verify
from constellation.muhash import MuHash3072
from constellation.protocol import ledger as proto
from constellation.sighash import sighash
from constellation.tx import PARTITIONS, AnyIssuance, Issuance, Transaction, TxOutput

Coin = TxOutput
"""A coin is an output that exists: ``(value_msat, owner)``, found by its coin id."""

SPENT_KEPT = 1_000_000
"""Spent coins a shard remembers, per worker; beyond, the oldest are forgotten. A coin
spent longer ago is then unknown: spending it again is still refused, as a coin that
does not exist (and a retry of a transaction that old, as one spending unknown coins).
A protocol constant: every copy must forget the same coins."""

Held = tuple[int, bytes]
"""How the state stores a coin: an exact tuple ``(value_msat, owner)``. CPython's
collector stops tracking an exact tuple of atoms, and then the dict holding only such
tuples, so a full collection does not walk every coin of the ledger; a named tuple
stays tracked (a million of them made each full collection take 0.2 s)."""


def _coin_element(coin_id: bytes, coin: Held) -> bytes:
    """A coin as an element of ``muhash`` (a root's elements each start with a tag byte)."""
    return b"c" + coin_id + u64(coin[0]) + coin[1]


def _spent_element(coin_id: bytes, txid: bytes) -> bytes:
    return b"s" + coin_id + txid


def _issued_element(issuance_id: bytes) -> bytes:
    return b"i" + issuance_id


def _not_here(what: str, coin_id: bytes) -> InvalidSnapshot:
    return InvalidSnapshot(f"{what} {coin_id.hex()} is in a partition not held here")


class NoRoot(MuHash3072):
    """The accumulator of a shard that nobody replicates: nothing reads its state root,
    so nothing is hashed (an element costs about 12 µs, and a payment changes four)."""

    __slots__ = ()

    def insert(self, data: bytes) -> None:
        pass

    def remove(self, data: bytes) -> None:
        pass

    def combine(self, other: MuHash3072) -> MuHash3072:
        raise AssertionError("this shard keeps no state root")

    def digest(self) -> bytes:
        raise AssertionError("this shard keeps no state root")


def accumulator(rooted: bool) -> MuHash3072:
    """The accumulator of a state root, or ``NoRoot`` where none is kept."""
    return MuHash3072() if rooted else NoRoot()


def _ascending(ids: list[bytes], what: str) -> None:
    """A snapshot lists ids in ascending order, each once: one encoding per state."""
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise InvalidSnapshot(f"{what} are not in ascending order of id, each once")


def bad_signature(index: int, coin_id: bytes) -> BadSignature:
    """The refusal of input ``index``'s signature (checked here or in a verifier process)."""
    return BadSignature(f"input {index}: signature does not verify for coin {coin_id.hex()}")


class CoinStatus(Enum):
    UNSPENT = "unspent"
    LOCKED = "locked"
    SPENT = "spent"
    PENDING = "pending"  # an output of a transaction prepared here, not yet committed
    UNKNOWN = "unknown"


class Prepared(NamedTuple):
    """A YES vote: what this state locked and will create for one transaction."""

    txid: bytes
    inputs: tuple[bytes, ...]  # coin ids held here, now locked
    outputs: tuple[tuple[bytes, Held], ...]  # (coin id, coin) to create here
    fee_msat: int  # the fee, recorded by the coordinator's state only
    coordinator: bool
    outbound_msat: int = 0  # outputs to other ledgers, recorded by the coordinator only


class PartitionState:
    """The coins, locks and pending transactions of the partitions one worker holds."""

    def __init__(
        self, partitions: Iterable[int], issuers: Iterable[bytes] = (), rooted: bool = True
    ) -> None:
        """``rooted``: keep ``muhash`` (a replicated shard's copies compare roots)."""
        self._held = bytearray(PARTITIONS)
        for p in partitions:
            if not 0 <= p < PARTITIONS:
                raise ValueError(f"partition {p} outside 0..{PARTITIONS - 1}")
            self._held[p] = 1
        self.issuers = frozenset(issuers)
        self.coins: dict[bytes, Held] = {}
        self.locks: dict[bytes, bytes] = {}  # coin id -> txid holding it
        self.pending: dict[bytes, Prepared] = {}
        self.creating: dict[bytes, bytes] = {}  # output id -> pending txid creating it
        self.spent: dict[bytes, bytes] = {}  # coin id -> txid that spent it
        self.spent_order: deque[bytes] = deque()  # the spent coins, oldest first
        self.issued_ids: set[bytes] = set()
        self.held_msat = 0
        self.issued_msat = 0
        self.received_msat = 0
        self.sent_msat = 0
        self.fees_msat = 0
        self.outbound_msat = 0
        self.muhash = accumulator(rooted)

    # -- routing -------------------------------------------------------------------------

    def holds_coin(self, coin_id: bytes) -> bool:
        return bool(self._held[(coin_id[0] << 8) | coin_id[1]])

    # -- two-phase commit ----------------------------------------------------------------

    def prepare(self, tx: Transaction, verify: bool = True) -> Prepared:
        """Lock and check the inputs held here; record the outputs to create here.

        Raises ``UnknownCoin``, ``CoinSpent``, ``AlreadyCommitted`` (an input spent or an
        output created by this transaction), ``InputLocked``,
        ``ValueMismatch``, ``BadSignature`` or ``NotHeldHere``, changing nothing. A
        repeated PREPARE of a transaction already prepared returns the same vote.
        """
        txid = tx.txid
        again = self.pending.get(txid)
        if again is not None:
            return again
        held, coins, locks = self._held, self.coins, self.locks
        witnesses = tx.witnesses
        if verify and not witnesses:
            raise BadSignature("the transaction carries no signatures")
        mine: list[bytes] = []
        for i, (cid, value) in enumerate(tx.inputs):
            if not held[(cid[0] << 8) | cid[1]]:
                continue
            coin = coins.get(cid)
            if coin is None:
                self._raise_missing(cid, txid)
            holder = locks.get(cid)
            if holder is not None:
                raise InputLocked(
                    f"input {i} coin {cid.hex()} is locked by transaction {holder.hex()}"
                )
            held_value, owner = coin
            if held_value != value:
                raise ValueMismatch(
                    f"input {i} states {value} msat, coin {cid.hex()} holds {held_value}"
                )
            if verify and not schnorr_verify(owner, sighash(txid, i, value, owner), witnesses[i]):
                raise bad_signature(i, cid)
            mine.append(cid)
        created = tuple(
            [
                (cid, (value, owner))
                for cid, (value, owner) in zip(tx.output_ids, tx.outputs, strict=False)
                if held[(cid[0] << 8) | cid[1]]
            ]
            if not tx.ledgers
            else [
                (cid, (value, owner))
                for i, (cid, (value, owner)) in enumerate(
                    zip(tx.output_ids, tx.outputs, strict=True)
                )
                if held[(cid[0] << 8) | cid[1]] and tx.here(i)
            ]
        )
        if not mine and not created:
            raise NotHeldHere(f"transaction {txid.hex()} touches no partition held here")
        for cid, _ in created:
            # Coin ids come from the txid: an output that exists was committed by this
            # very transaction (a repeated PREPARE where no input is held here).
            if cid in coins or cid in self.spent:
                raise AlreadyCommitted(f"transaction {txid.hex()} is already committed")
        for cid in mine:
            locks[cid] = txid
        for cid, _ in created:
            self.creating[cid] = txid
        first = tx.inputs[0].coin_id
        coordinator = bool(held[(first[0] << 8) | first[1]])
        outbound = sum(tx.outputs[i].value_msat for i, _ in tx.remote()) if coordinator else 0
        vote = Prepared(
            txid, tuple(mine), created, tx.fee_msat if coordinator else 0, coordinator, outbound
        )
        self.pending[txid] = vote
        return vote

    def signature_checks(
        self, tx: Transaction, vote: Prepared
    ) -> list[tuple[int, bytes, bytes, bytes]]:
        """``(input index, owner, sighash, signature)`` for each input ``vote`` locked here:
        what ``prepare(tx, verify=False)`` left unchecked, for checking elsewhere."""
        txid, coins, witnesses, mine = tx.txid, self.coins, tx.witnesses, set(vote.inputs)
        checks = []
        for i, (cid, value) in enumerate(tx.inputs):
            if cid in mine:
                owner = coins[cid][1]
                checks.append((i, owner, sighash(txid, i, value, owner), witnesses[i]))
        return checks

    def _raise_missing(self, cid: bytes, txid: bytes) -> NoReturn:
        by = self.spent.get(cid)
        if by == txid:
            raise AlreadyCommitted(f"transaction {txid.hex()} is already committed")
        if by is not None:
            raise CoinSpent(f"coin {cid.hex()} was already spent by transaction {by.hex()}")
        maker = self.creating.get(cid)
        if maker is not None:  # its receipt may be out: it exists once that commits here
            raise InputLocked(
                f"coin {cid.hex()} is being created by transaction {maker.hex()}, not yet"
                " committed here: send again"
            )
        raise UnknownCoin(f"coin {cid.hex()} does not exist (or was spent long ago)")

    def commit(self, txid: bytes) -> Prepared:
        """Spend the inputs locked by ``txid`` and create its outputs held here."""
        vote = self.pending.pop(txid, None)
        if vote is None:
            raise UnknownTransaction(f"transaction {txid.hex()} is not prepared here")
        coins, locks, spent, muhash = self.coins, self.locks, self.spent, self.muhash
        sent = received = 0
        for cid in vote.inputs:
            assert locks.pop(cid) == txid, "a lock changed hands while prepared"
            coin = coins.pop(cid)
            sent += coin[0]
            spent[cid] = txid
            self.spent_order.append(cid)
            muhash.remove(_coin_element(cid, coin))
            muhash.insert(_spent_element(cid, txid))
        if len(spent) > SPENT_KEPT:
            self._forget_spent(len(spent) - SPENT_KEPT)
        creating = self.creating
        for cid, coin in vote.outputs:
            assert cid not in coins and cid not in spent, "an output id already exists"
            del creating[cid]
            coins[cid] = coin
            received += coin[0]
            muhash.insert(_coin_element(cid, coin))
        self.sent_msat += sent
        self.received_msat += received
        self.fees_msat += vote.fee_msat
        self.outbound_msat += vote.outbound_msat
        self.held_msat += received - sent
        return vote

    def _forget_spent(self, count: int) -> None:
        """Forget the ``count`` coins spent longest ago: the same ones at every copy,
        which spent them in the same order (a snapshot keeps the order)."""
        spent, order, muhash = self.spent, self.spent_order, self.muhash
        for _ in range(count):
            cid = order.popleft()
            muhash.remove(_spent_element(cid, spent.pop(cid)))

    def abort(self, txid: bytes) -> bool:
        """Release what ``txid`` locked here; False if it was not prepared (idempotent)."""
        vote = self.pending.pop(txid, None)
        if vote is None:
            return False
        locks = self.locks
        for cid in vote.inputs:
            assert locks.pop(cid) == txid, "a lock changed hands while prepared"
        for cid, _ in vote.outputs:
            del self.creating[cid]
        return True

    # -- issuance ------------------------------------------------------------------------

    def issue(self, issuance: AnyIssuance, verify: bool = True) -> list[bytes]:
        """Create an issuance's outputs held here; returns the coin ids created.

        Only an issuer this state trusts may issue, each issued id once (an issuance's;
        each entry's of a batch, whose entries seen before are left out); one applied
        before is ``AlreadyCommitted`` whether its issuer is still trusted or not. Without
        ``verify``, its signature was checked where the caller relies on (as a
        transaction's, in ``prepare``).
        """
        issued = self.issued_ids
        if isinstance(issuance, Issuance):  # one id, recorded whatever it creates here
            if issuance.issuance_id in issued:
                raise AlreadyCommitted(f"issuance {issuance.issuance_id.hex()} already applied")
            ids = [issuance.issuance_id]
            fresh = [e for e in issuance.entries() if self.holds_coin(e[1])]
        else:  # an id an entry, recorded where its coin is
            fresh = [e for e in issuance.entries() if self.holds_coin(e[1]) and e[0] not in issued]
            if not fresh:
                raise AlreadyCommitted(f"issuance {issuance.issuance_id.hex()} already applied")
            ids = [iid for iid, _, _ in fresh]
        # "already applied" first: a retry of an issuance applied before its issuer's key
        # was retired is told so, not refused (its sender would take it as never applied)
        if issuance.issuer not in self.issuers:
            raise BadIssuance(f"{issuance.issuer.hex()} is not an issuer of this ledger")
        if verify:
            issuance.verify()
        for _, cid, (value, owner) in fresh:
            assert cid not in self.coins and cid not in self.spent, "issued id exists"
            coin = self.coins[cid] = (value, owner)
            self.issued_msat += value
            self.held_msat += value
            self.muhash.insert(_coin_element(cid, coin))
        for iid in ids:
            issued.add(iid)
            self.muhash.insert(_issued_element(iid))
        return [cid for _, cid, _ in fresh]

    # -- snapshots -----------------------------------------------------------------------

    def load(self, snapshot: proto.Snapshot) -> None:
        """Fill this new state with a snapshot's coins, spent coins, issuance ids,
        in-doubt transactions (as the votes of a participant) and totals.

        The snapshot is another operator's data: ``InvalidSnapshot`` unless it describes
        a state this one could be in (then drop this state, partly filled).
        """
        assert not (self.coins or self.spent or self.issued_ids or self.pending), "not new"
        coins, spent, muhash = self.coins, self.spent, self.muhash
        _ascending([cid for cid, _, _ in snapshot.coins], "coins")
        for cid, value, owner in snapshot.coins:
            if not self.holds_coin(cid):
                raise _not_here("coin", cid)
            coin = coins[cid] = (value, owner)
            muhash.insert(_coin_element(cid, coin))
        if len(snapshot.spent) > SPENT_KEPT:
            raise InvalidSnapshot(f"{len(snapshot.spent)} spent coins, more than {SPENT_KEPT}")
        for cid, txid in snapshot.spent:  # oldest first: the order forgetting follows
            if not self.holds_coin(cid):
                raise _not_here("spent coin", cid)
            if cid in coins or cid in spent:
                raise InvalidSnapshot(f"coin {cid.hex()} is listed twice")
            spent[cid] = txid
            self.spent_order.append(cid)
            muhash.insert(_spent_element(cid, txid))
        _ascending(snapshot.issued, "issuance ids")
        for iid in snapshot.issued:
            self.issued_ids.add(iid)
            muhash.insert(_issued_element(iid))
        _ascending([doubt.txid for doubt in snapshot.in_doubt], "transactions in doubt")
        created: set[bytes] = set()
        for doubt in snapshot.in_doubt:
            vote = self.pending[doubt.txid] = self._load_vote(doubt, created)
            self.creating.update((cid, doubt.txid) for cid, _ in vote.outputs)
        self.issued_msat = int.from_bytes(snapshot.issued_msat, "big")
        self.received_msat = int.from_bytes(snapshot.received_msat, "big")
        self.sent_msat = int.from_bytes(snapshot.sent_msat, "big")
        self.fees_msat = int.from_bytes(snapshot.fees_msat, "big")
        self.outbound_msat = int.from_bytes(snapshot.outbound_msat, "big")
        self.held_msat = sum(value for value, _ in coins.values())
        if self.held_msat != self.issued_msat + self.received_msat - self.sent_msat:
            raise InvalidSnapshot(
                f"the coins hold {self.held_msat} msat; the totals say issued "
                f"{self.issued_msat} + received {self.received_msat} - sent {self.sent_msat}"
            )

    def _load_vote(self, doubt: proto.InDoubt, created: set[bytes]) -> Prepared:
        """Lock a snapshot's in-doubt transaction's inputs; ``created`` gathers the
        outputs of those loaded before it (no two may create one coin)."""
        txid, coins, locks = doubt.txid, self.coins, self.locks
        for cid in doubt.inputs:
            if cid not in coins or cid in locks:
                raise InvalidSnapshot(f"{txid.hex()} locks {cid.hex()}, not a free coin")
            locks[cid] = txid
        outputs = []
        for cid, value, owner in doubt.outputs:
            if not self.holds_coin(cid):
                raise _not_here("output", cid)
            if cid in coins or cid in self.spent or cid in created:
                raise InvalidSnapshot(f"{txid.hex()} creates {cid.hex()}, which exists")
            created.add(cid)
            outputs.append((cid, (value, owner)))
        if not outputs and not doubt.inputs:
            raise InvalidSnapshot(f"{txid.hex()} touches no partition held here")
        return Prepared(txid, tuple(doubt.inputs), tuple(outputs), 0, False)

    # -- queries -------------------------------------------------------------------------

    def coin(self, coin_id: bytes) -> Coin | None:
        coin = self.coins.get(coin_id)
        return None if coin is None else Coin._make(coin)

    def being_created(self, coin_id: bytes) -> Held | None:
        """The value and owner of an output a transaction prepared here creates."""
        txid = self.creating.get(coin_id)
        return None if txid is None else dict(self.pending[txid].outputs)[coin_id]

    def status(self, coin_id: bytes) -> CoinStatus:
        if coin_id in self.locks:
            return CoinStatus.LOCKED
        if coin_id in self.coins:
            return CoinStatus.UNSPENT
        if coin_id in self.spent:
            return CoinStatus.SPENT
        if coin_id in self.creating:
            return CoinStatus.PENDING
        return CoinStatus.UNKNOWN

    def pending_msat(self) -> int:
        """The value that prepared transactions lock here or will create here: what a
        total read while they commit may count on one side only."""
        coins = self.coins
        return sum(
            sum(coins[cid][0] for cid in vote.inputs) + sum(c[0] for _, c in vote.outputs)
            for vote in self.pending.values()
        )

    def coins_of(self, owners: Collection[bytes]) -> dict[bytes, Coin]:
        """Unspent coins held here owned by any of ``owners`` (a scan: the services index)."""
        return {cid: Coin._make(c) for cid, c in self.coins.items() if c[1] in owners}

    def check_invariants(self) -> None:
        """Verify every invariant of the module docstring; raises AssertionError."""
        total = 0
        for cid, (value, _) in self.coins.items():
            assert self.holds_coin(cid), "a coin sits in a partition not held here"
            assert cid not in self.spent, "a coin is both unspent and spent"
            assert value > 0, "a coin has no value"
            total += value
        assert total == self.held_msat, "held_msat drifted from the coins"
        assert len(self.spent) <= SPENT_KEPT, "the spent coins grow without bound"
        assert list(self.spent_order) == list(self.spent), "spent coins out of order"
        assert self.held_msat == self.issued_msat + self.received_msat - self.sent_msat, (
            "value was created or destroyed outside commits and issuances"
        )
        locked_by_pending = {}
        for txid, vote in self.pending.items():
            assert vote.txid == txid
            for cid in vote.inputs:
                assert cid in self.coins, "a pending input is not an unspent coin"
                assert cid not in locked_by_pending, "two pending transactions share an input"
                locked_by_pending[cid] = txid
        assert locked_by_pending == self.locks, "a lock without a pending owner (leak)"
        creating = {cid: txid for txid, vote in self.pending.items() for cid, _ in vote.outputs}
        assert creating == self.creating, "an output being created without its transaction"
