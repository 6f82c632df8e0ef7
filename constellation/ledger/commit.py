"""Two-phase commit between partition workers: the protocol as a deterministic state machine.

A worker's package items are handled at once, one after the other; what must wait for
the disk (a YES vote, a receipt, a decision to commit) is attached to the record that
must be durable first and runs once it is (the worker's log calls it back). Locks never
wait: a held lock is a NO vote. The engine reads no clock and draws no number itself:
both are passed in, so a seeded simulation replays a run exactly.

Coordinator (the worker of a transaction's first input): lock and verify the inputs
held here, PREPARE to every other involved worker, COMMIT on all YES (the record is
persisted before anyone hears of it), ABORT on a NO or a timeout. Nothing is logged for
an abort: a transaction the coordinator has no commit record for is aborted
(presumed abort), and a participant in doubt asks until it hears the outcome. A commit
is remembered (and told again) until every participant has said Done, then forgotten
(an ``Ended`` record).

Participant: lock and verify the inputs held here, persist the PREPARED record, vote
YES; keep the locks until the outcome arrives, through restarts; once its record of a
commit is durable, say Done.

A txid may go through several attempts (a client retries what was refused), one at a
time: messages name their attempt, and a participant still in doubt about one attempt
votes NO to the next until it learns the outcome.

Replication: the other copies of a worker's shard re-execute its blocks (``replay`` with
``verify``) and must reach the same state root (``root``): a hash of what the log
determines (coins, spent coins, issuance ids, the transactions in doubt here, the
commits remembered until their participants are done, the totals), never of what only
this process knows (what it coordinates, timers). A copy behind the log starts from a
``snapshot`` of that state (``restore``).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from constellation.codec import u16, u64
from constellation.errors import (
    AlreadyCommitted,
    CommitTimeout,
    ConstellationError,
    InFlight,
    InvalidBlock,
    InvalidSnapshot,
    MessageError,
    Misdirected,
    NotHeldHere,
    Unavailable,
    UnknownTransaction,
    ValueOutOfRange,
)
from constellation.hashing import tagged_hasher
from constellation.ledger.partition import PartitionState, Prepared, accumulator, bad_signature
from constellation.ledger.pmap import PartitionMap
from constellation.muhash import MuHash3072
from constellation.protocol import ledger as proto
from constellation.settlement import MAX_SETTLE_MSAT, check_settleable
from constellation.tx import AnyIssuance, Transaction, decode_issuance, decode_transaction

ASK_EVERY_S = 0.25
# How long a coordinator waits for a participant's Done before telling it the commit again.
RETELL_S = 1.0
# Refused requests remembered by (reply, request id): a client that sends a request again
# (its first may have gone to a leader that died) hears the same refusal, rather than
# starting a new attempt that could commit after it was told of the refusal.
REFUSALS_KEPT = 4096

Check = tuple[bytes, bytes, bytes]  # (x-only key, message, signature)

_root_hash = tagged_hasher("constellation/root")


class Send(Protocol):
    """Queue an item for a subject (``lazy``: nobody waits for it; see ``Packer.send``)."""

    def __call__(self, subject: str, item: proto.Item, lazy: bool = False) -> None: ...


@dataclass
class Coordinating:
    """A transaction this worker coordinates, waiting for votes."""

    tx: Transaction
    raw: bytes
    reply: str
    rid: int
    attempt: int
    waiting: set[int]
    participants: tuple[int, ...]
    started: float
    deadline: float
    blocks: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Decided:
    """A commit this worker coordinated, remembered until every participant has it."""

    attempt: int
    participants: tuple[int, ...]  # ascending; after a restart, all of them wait again
    waiting: set[int]  # participants that have not said Done
    told: float = 0.0  # when they were last told
    durable: bool = True  # False until the commit record is: nobody may hear of it yet


class Log(Protocol):
    """A worker's block log, as the engine sees it."""

    def add(
        self,
        record: proto.Record,
        after: Callable[[int], None] | None = None,
        lazy: bool = False,
        changes: Sequence[proto.CoinChange] = (),
        committed: Sequence[proto.Commit] = (),
    ) -> None:
        """Write ``record`` (with the coin ``changes`` it makes here and what it
        ``committed``, for the block's events); ``after(height)`` once it is
        durable. A ``lazy`` record is one nothing waits for: it may wait for the next."""

    def after_durable(self, callback: Callable[[int], None]) -> None:
        """``callback(height)`` once everything added so far is durable; where the log is
        replicated, also once this copy is known to lead still, its state holding all
        that was confirmed (what is answered from the state, an absence above all)."""


class Verifier(Protocol):
    """Signature checks elsewhere (other processes); the answer comes back later."""

    def check(self, checks: list[Check], done: Callable[[int | None], None]) -> None:
        """``done`` gets the position of the first check that failed, -1 if none did,
        None if they went unchecked."""


def _doubt_element(txid: bytes, coordinator: int, attempt: int, vote: Prepared) -> bytes:
    """A transaction in doubt here as an element of the root: who coordinates which
    attempt, what it locks and what it will create here."""
    outputs = [cid + u64(value) + owner for cid, (value, owner) in vote.outputs]
    head = b"p" + txid + bytes((coordinator,)) + u64(attempt) + u16(len(vote.inputs))
    return b"".join((head, *vote.inputs, *outputs))


def _decided_element(txid: bytes, decided: Decided) -> bytes:
    return b"d" + txid + u64(decided.attempt) + bytes(decided.participants)


def _u128(total_msat: int) -> bytes:
    return total_msat.to_bytes(16, "big")


def _outbound_of(tx: Transaction) -> list[proto.CoinChange]:
    """The outputs ``tx`` pays to other ledgers, for the coordinator's block events."""
    ids, outputs = tx.output_ids, tx.outputs
    return [
        proto.CoinChange(tx.txid, ids[i], outputs[i].owner, outputs[i].value_msat, True, ledger)
        for i, ledger in tx.remote()
    ]


def _check_attempt(attempt: int) -> None:
    if not 0 <= attempt < 1 << 64:
        raise ValueOutOfRange(f"attempt {attempt} is not a u64")


class TwoPhaseCommit:
    """The ledger logic of one worker: its partitions, and its part in two-phase commits.

    Pure: it sends through ``send``, writes records through ``log`` (whose ``after``
    callbacks say when a record is durable), reads time from ``clock`` and draws attempt
    numbers from ``draw``, so a test with a fake clock and a seeded ``draw`` replays a
    run exactly. A worker process wires it to NATS and its block log.
    """

    def __init__(
        self,
        *,
        me: int,
        pmap: PartitionMap,
        issuers: frozenset[bytes],
        prepare_timeout_ms: int,
        send: Send,
        subject_of: Callable[[int], str],
        log: Log,
        clock: Callable[[], float],
        draw: Callable[[], int],
        verifiers: Verifier | None = None,
        refused: Callable[[str], None] = lambda _: None,
        confirmed: Callable[[float], None] = lambda _: None,
        rooted: bool = True,
    ) -> None:
        """``refused(code)`` counts a refusal or abort; ``confirmed(seconds)`` a commit
        this worker coordinated, from its arrival to its durable record. ``rooted``:
        keep the state root up to date (a shard that nobody replicates need not)."""
        self.me = me
        self.rooted = rooted
        self.verifiers = verifiers  # None: signatures are checked here, inline
        self.pmap = pmap
        self.owners = pmap.owners()
        held = pmap.held_by(me)
        if not held:
            raise ValueError(f"partition map v{pmap.version} gives worker {me} no partitions")
        self.state = self._new_state(issuers)
        self.send = send
        self.subject_of = subject_of
        self.log = log
        self.clock = clock
        self.draw = draw
        self.refused = refused
        self.confirmed = confirmed
        self.timeout_s = prepare_timeout_ms / 1000
        self.coordinating: dict[bytes, Coordinating] = {}
        self.refusals: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        # txid -> (coordinator, attempt, asked at): prepared here, the outcome not known.
        self.in_doubt: dict[bytes, tuple[int, int, float]] = {}
        # Commits this worker coordinated that involved other workers, until each of
        # them has said Done: a participant in doubt asks for them (presumed abort
        # answers everything else).
        self.decided: dict[bytes, Decided] = {}
        # txid -> its element of the root, for each transaction in doubt whose PREPARED
        # record is in the log (the rest of in_doubt is having its signatures checked).
        self.logged: dict[bytes, bytes] = {}
        # The root's part that the state does not hold: ``logged`` and ``decided``.
        self.muhash = accumulator(rooted)
        self.draining = False

    def _new_state(self, issuers: frozenset[bytes]) -> PartitionState:
        held = [p for r in self.pmap.held_by(self.me) for p in r]
        return PartitionState(held, issuers, self.rooted)

    # -- recovery and replication --------------------------------------------------------

    def replay(
        self,
        records: list[proto.Record],
        derive: bool,
        *,
        verify: bool = False,
        signatures: bool = False,
    ) -> tuple[list[proto.CoinChange], list[proto.Commit]]:
        """Apply one block's records; with ``derive``, also return the block's events:
        its coin changes and the (txid, fee) of what it coordinated.

        Without ``verify``, the block is from this worker's own log (recovery): its
        transactions were checked before they were logged, and frames carry checksums,
        so nothing is checked again. With ``verify``, it is another copy's (a replica
        re-executing its leader's log): each record must be one the leader could have
        written, checked as the leader had to (output keys included; signatures too
        with ``signatures``, which a copy of the leader's own operator may skip), else
        ``InvalidBlock`` names the first that is not. The state is then partly
        applied (the records before that one are): the caller restores a snapshot
        and replays from there.
        """
        if signatures and not verify:
            raise ValueError("signatures are checked only with verify")
        changes: list[proto.CoinChange] = []
        committed: list[proto.Commit] = []
        for index, rec in enumerate(records):
            try:
                if isinstance(rec, proto.Prepared):
                    self._replay_prepared(rec, verify, signatures)
                elif isinstance(rec, proto.Committed):
                    self._replay_committed(rec, verify, signatures, derive, changes, committed)
                elif isinstance(rec, proto.Aborted):
                    if verify and rec.txid not in self.logged:
                        raise UnknownTransaction(f"{rec.txid.hex()} is not in doubt here")
                    self.in_doubt.pop(rec.txid, None)
                    self._settle(rec.txid)
                    self.state.abort(rec.txid)
                elif isinstance(rec, proto.Ended):
                    decided = self.decided.pop(rec.txid, None)
                    if decided is not None:
                        self.muhash.remove(_decided_element(rec.txid, decided))
                    elif verify:
                        raise UnknownTransaction(f"no commit of {rec.txid.hex()} is remembered")
                else:
                    issuance = decode_issuance(rec.issuance)
                    if verify and all(self._owner(c) != self.me for c in issuance.output_ids):
                        raise NotHeldHere("the issuance creates no coin here")
                    # its signature is checked as a transaction's: by copies that check
                    created = self.state.issue(issuance, verify=signatures)
                    if derive:
                        issued, done = self._issued_events(issuance, created)
                        changes += issued
                        committed += done
            except ConstellationError as exc:
                if not verify:
                    raise
                raise InvalidBlock(index, f"{type(rec).__name__}: {exc}") from exc
        return changes, committed

    def _replay_prepared(self, rec: proto.Prepared, verify: bool, signatures: bool) -> None:
        tx = decode_transaction(rec.tx, check_owners=verify)
        txid = tx.txid
        if verify:
            coordinator = self._owner(tx.inputs[0].coin_id)
            if rec.coordinator != coordinator or coordinator == self.me:
                raise Misdirected(
                    f"names coordinator {rec.coordinator}; the first input's worker is "
                    f"{coordinator}, and this is worker {self.me}"
                )
            if txid in self.state.pending:
                raise InFlight(f"{txid.hex()} is prepared here already")
            _check_attempt(rec.attempt)
        self.state.prepare(tx, verify=signatures)
        self.in_doubt[txid] = (rec.coordinator, rec.attempt, 0.0)
        self._log_doubt(txid, rec.coordinator, rec.attempt)

    def _replay_committed(
        self,
        rec: proto.Committed,
        verify: bool,
        signatures: bool,
        derive: bool,
        changes: list[proto.CoinChange],
        committed: list[proto.Commit],
    ) -> None:
        state, txid = self.state, rec.txid
        outbound: list[proto.CoinChange] = []
        if rec.tx:  # the coordinator's record: nothing was prepared before it
            tx = decode_transaction(rec.tx, check_owners=verify)
            if verify:
                if tx.txid != txid:
                    raise MessageError(f"names {txid.hex()} but carries {tx.txid.hex()}")
                first = tx.inputs[0].coin_id
                if self._owner(first) != self.me:
                    raise NotHeldHere(f"worker {self._owner(first)} coordinates {txid.hex()}")
                if txid in state.pending:
                    raise InFlight(f"{txid.hex()} is prepared here already")
                _check_attempt(rec.attempt)
            state.prepare(tx, verify=signatures)
            if others := self._involved(tx):
                participants = tuple(sorted(others))
                decided = self.decided[txid] = Decided(rec.attempt, participants, others)
                self.muhash.insert(_decided_element(txid, decided))
            if derive:
                committed.append(proto.Commit(txid, tx.fee_msat, rec.tx))
                outbound = _outbound_of(tx)
        else:
            if verify and txid not in self.logged:
                raise UnknownTransaction(f"{txid.hex()} is not in doubt here")
            self.in_doubt.pop(txid, None)
            self._settle(txid)
        if derive:  # in the order the leader wrote them
            changes += self._changes_of(txid) + outbound
        state.commit(txid)

    def _log_doubt(self, txid: bytes, coordinator: int, attempt: int) -> None:
        """``txid``'s PREPARED record goes into the log: it is in doubt in the root."""
        element = _doubt_element(txid, coordinator, attempt, self.state.pending[txid])
        self.logged[txid] = element
        self.muhash.insert(element)

    def _settle(self, txid: bytes) -> bool:
        """``txid`` is no longer in doubt: out of the root. False if no PREPARED record
        of it was logged (its outcome came while its signatures were being checked)."""
        element = self.logged.pop(txid, None)
        if element is None:
            return False
        self.muhash.remove(element)
        return True

    def root(self) -> bytes:
        """The shard's state root after the records logged so far (32 bytes): a hash of
        all that ``snapshot`` carries, so a function of the state, not of its history.
        Kept up to date as records are added; a call costs one modular inverse."""
        return self._root_of(self.state, self.muhash)

    def _root_of(self, state: PartitionState, muhash: MuHash3072) -> bytes:
        totals = (
            state.issued_msat,
            state.received_msat,
            state.sent_msat,
            state.fees_msat,
            state.outbound_msat,
        )
        return _root_hash(
            b"".join(
                (
                    state.muhash.combine(muhash).digest(),
                    u16(self.me),
                    u64(self.pmap.version),
                    *map(_u128, totals),
                )
            )
        )

    def snapshot(self) -> bytes:
        """The shard's state after the records logged so far (what ``root`` hashes),
        encoded canonically: the same state gives the same bytes in any process."""
        state = self.state
        in_doubt = []
        for txid in sorted(self.logged):
            coordinator, attempt, _ = self.in_doubt[txid]
            vote = state.pending[txid]
            assert not vote.coordinator, "a transaction in doubt here is coordinated here"
            outputs = [(cid, value, owner) for cid, (value, owner) in vote.outputs]
            in_doubt.append(proto.InDoubt(txid, coordinator, attempt, list(vote.inputs), outputs))
        return proto.encode_snapshot(
            proto.Snapshot(
                proto.SNAPSHOT_VERSION,
                self.me,
                self.pmap.version,
                [(cid, value, owner) for cid, (value, owner) in sorted(state.coins.items())],
                [(cid, state.spent[cid]) for cid in state.spent_order],  # oldest first
                sorted(state.issued_ids),
                in_doubt,
                [
                    proto.DecidedCommit(txid, d.attempt, list(d.participants))
                    for txid, d in sorted(self.decided.items())
                ],
                _u128(state.issued_msat),
                _u128(state.received_msat),
                _u128(state.sent_msat),
                _u128(state.fees_msat),
                _u128(state.outbound_msat),
            )
        )

    def restore(self, data: bytes) -> bytes:
        """Replace the state with a snapshot's and return its root, which the caller
        checks against the signed header of the snapshot's block (a copy behind the
        log catches up so). The tables are rebuilt as a replay does: each participant
        of a remembered commit waits again, and what this worker was coordinating is
        forgotten (presumed abort, as after a restart).

        The snapshot is another operator's data: ``InvalidSnapshot`` if it is
        malformed, is another worker's or map's, or describes no state a shard can be
        in; the engine is then unchanged.
        """
        snapshot = proto.decode_snapshot(data)
        if snapshot.worker != self.me or snapshot.map_version != self.pmap.version:
            raise InvalidSnapshot(
                f"a snapshot of worker {snapshot.worker} in map v{snapshot.map_version}, "
                f"not of worker {self.me} in map v{self.pmap.version}"
            )
        state = self._new_state(self.state.issuers)
        state.load(snapshot)
        others = set(self.pmap.workers) - {self.me}
        muhash = accumulator(self.rooted)
        in_doubt: dict[bytes, tuple[int, int, float]] = {}
        logged: dict[bytes, bytes] = {}
        for doubt in snapshot.in_doubt:
            txid, coordinator, attempt = doubt.txid, doubt.coordinator, doubt.attempt
            if coordinator not in others:
                raise InvalidSnapshot(f"{txid.hex()}: coordinator {coordinator} is no other worker")
            in_doubt[txid] = (coordinator, attempt, 0.0)
            element = _doubt_element(txid, coordinator, attempt, state.pending[txid])
            logged[txid] = element
            muhash.insert(element)
        decided: dict[bytes, Decided] = {}
        after = b""
        for entry in snapshot.decided:
            txid, participants = entry.txid, tuple(entry.participants)
            if txid <= after:
                raise InvalidSnapshot("remembered commits are not in ascending order")
            ascending = all(a < b for a, b in itertools.pairwise(participants))
            if not (participants and ascending and others.issuperset(participants)):
                raise InvalidSnapshot(f"{txid.hex()}: participants {list(participants)}")
            decided[txid] = Decided(entry.attempt, participants, set(participants))
            muhash.insert(_decided_element(txid, decided[txid]))
            after = txid
        self.state, self.muhash, self.logged = state, muhash, logged
        self.in_doubt, self.decided, self.coordinating = in_doubt, decided, {}
        return self.root()

    # -- routing -------------------------------------------------------------------------

    def _owner(self, coin_id: bytes) -> int:
        return self.owners[(coin_id[0] << 8) | coin_id[1]]

    def _involved(self, tx: Transaction) -> set[int]:
        """The other workers a transaction touches."""
        owners = self.owners
        others = {owners[(c[0] << 8) | c[1]] for c, _ in tx.inputs}
        if tx.ledgers:
            others.update(
                owners[(c[0] << 8) | c[1]] for i, c in enumerate(tx.output_ids) if tx.here(i)
            )
        else:
            others.update(owners[(c[0] << 8) | c[1]] for c in tx.output_ids)
        others.discard(self.me)
        return others

    def _not_held(self, what: str, coin_id: bytes) -> tuple[str, str]:
        p = (coin_id[0] << 8) | coin_id[1]
        return NotHeldHere.code, (
            f"{what}: partition {p} is held by worker {self._owner(coin_id)}, not worker "
            f"{self.me}, in partition map v{self.pmap.version}"
        )

    # -- packages ------------------------------------------------------------------------

    def handle(self, pkg: proto.Package) -> None:
        for item in pkg.items:
            if isinstance(item, proto.Submit):
                self._submit(item, pkg.reply)
            elif isinstance(item, proto.Vote):
                self._vote(item, pkg.sender)
            elif isinstance(item, proto.Prepare):
                self._prepare(item, pkg.sender, pkg.reply)
            elif isinstance(item, proto.Decide):
                self._decide(item, pkg.sender)
            elif isinstance(item, proto.Ask):
                self._ask(item, pkg.sender)
            elif isinstance(item, proto.Done):
                self._done(item, pkg.sender)
            elif isinstance(item, proto.Issue):
                self._issue(item, pkg.reply)
            # else a Result: answers go to gateways, never to a worker; ignored

    def _refuse(self, reply: str, rid: int, code: str, detail: str) -> None:
        """Answer a client's request with a refusal, and remember it for that request
        (not "in flight" nor "already committed": those are not final)."""
        self.refused(code)
        self.send(reply, proto.Result(rid, code, detail, []))
        if code not in (InFlight.code, AlreadyCommitted.code):
            self.refusals[(reply, rid)] = (code, detail)
            if len(self.refusals) > REFUSALS_KEPT:
                self.refusals.popitem(last=False)

    # -- coordinator ---------------------------------------------------------------------

    def _submit(self, item: proto.Submit, reply: str) -> None:
        if self.draining:
            self._refuse(reply, item.rid, Unavailable.code, f"worker {self.me} is shutting down")
            return
        refused = self.refusals.get((reply, item.rid))
        if refused is not None:  # sent again, and refused already
            self._refuse(reply, item.rid, *refused)
            return
        try:
            tx = decode_transaction(item.tx)
            # Where a transaction is admitted, never where a block is re-executed: every
            # copy replays a confirmed block as it was (one from before this limit too).
            check_settleable(tx, MAX_SETTLE_MSAT)
        except ConstellationError as exc:
            self._refuse(reply, item.rid, exc.code, str(exc))
            return
        first = tx.inputs[0].coin_id
        if self._owner(first) != self.me:
            self._refuse(reply, item.rid, *self._not_held("first input", first))
            return
        txid = tx.txid
        if txid in self.state.pending:
            self._refuse(reply, item.rid, InFlight.code, "this transaction is being committed")
            return
        verifiers = self.verifiers
        try:
            vote = self.state.prepare(tx, verify=verifiers is None)
        except AlreadyCommitted as exc:
            # Told once the commit is: before, a crash or a lost leadership may undo it.
            refusal = (reply, item.rid, exc.code, str(exc))
            self.log.after_durable(lambda _: self._refuse(*refusal))
            return
        except ConstellationError as exc:
            self._refuse(reply, item.rid, exc.code, str(exc))
            return
        started = self.clock()
        if verifiers is None:
            self._coordinate(tx, item.tx, reply, item.rid, started)
            return

        def checked(refusal: tuple[str, str] | None) -> None:
            if refusal is None:
                self._coordinate(tx, item.tx, reply, item.rid, started)
            else:
                self.state.abort(txid)
                self._refuse(reply, item.rid, *refusal)

        self._check_signatures(tx, vote, checked)

    def _coordinate(
        self, tx: Transaction, raw: bytes, reply: str, rid: int, started: float
    ) -> None:
        """The inputs held here are locked and verified: commit, or PREPARE the others."""
        others = self._involved(tx)
        if not others:
            self._commit(tx, raw, reply, rid, 0, started, [], ())
            return
        participants = tuple(sorted(others))
        deadline = self.clock() + self.timeout_s
        attempt = self.draw()
        self.coordinating[tx.txid] = Coordinating(
            tx, raw, reply, rid, attempt, set(others), participants, started, deadline
        )
        prepare = proto.Prepare(raw, attempt)
        for w in participants:
            self.send(self.subject_of(w), prepare)

    def _check_signatures(
        self, tx: Transaction, vote: Prepared, then: Callable[[tuple[str, str] | None], None]
    ) -> None:
        """Have the verifier processes check the signatures of the inputs ``vote`` locked;
        ``then`` gets None if all verify, else the refusal's (code, detail)."""
        assert self.verifiers is not None
        checks = self.state.signature_checks(tx, vote)
        if not checks:
            then(None)
            return

        def answered(first_bad: int | None) -> None:
            if first_bad is None:
                then((Unavailable.code, f"worker {self.me}: the signature verifiers failed; retry"))
            elif first_bad < 0:
                then(None)
            else:
                i = checks[first_bad][0]
                exc = bad_signature(i, tx.inputs[i].coin_id)
                then((exc.code, str(exc)))

        self.verifiers.check([c[1:] for c in checks], answered)

    def _commit(
        self,
        tx: Transaction,
        raw: bytes,
        reply: str,
        rid: int,
        attempt: int,
        started: float,
        blocks: list[tuple[int, int]],
        participants: tuple[int, ...],
    ) -> None:
        txid = tx.txid
        changes = self._changes_of(txid)
        if tx.ledgers:
            changes += _outbound_of(tx)
        self.state.commit(txid)
        decided = None
        if participants:
            decided = Decided(attempt, participants, set(participants), durable=False)
            self.decided[txid] = decided
            self.muhash.insert(_decided_element(txid, decided))

        def durable(height: int) -> None:
            now = self.clock()
            if decided is not None:
                decided.durable, decided.told = True, now
                decide = proto.Decide(txid, True, attempt)
                for w in participants:
                    self.send(self.subject_of(w), decide)
            self.send(reply, proto.Result(rid, "", "", [(self.me, height), *blocks]))
            self.confirmed(now - started)

        self.log.add(
            proto.Committed(txid, raw, attempt),
            durable,
            False,
            changes,
            [proto.Commit(txid, tx.fee_msat, raw)],
        )

    def _changes_of(self, txid: bytes) -> list[proto.CoinChange]:
        """The coin changes that committing ``txid`` makes here (before it commits:
        the coins it spends are still here), for the block's events."""
        vote = self.state.pending[txid]
        coins = self.state.coins
        changes = []
        for cid in vote.inputs:
            value, owner = coins[cid]
            changes.append(proto.CoinChange(txid, cid, owner, value, False))
        for cid, (value, owner) in vote.outputs:
            changes.append(proto.CoinChange(txid, cid, owner, value, True))
        return changes

    def _vote(self, vote: proto.Vote, sender: int) -> None:
        c = self.coordinating.get(vote.txid)
        if c is None or c.attempt != vote.attempt:
            # Late or repeated: that attempt is settled; tell a YES voter how.
            if not vote.code:
                self._tell(sender, vote.txid, vote.attempt)
            return
        if sender not in c.waiting:
            return
        if vote.code:
            self._abort(c, vote.code, f"worker {sender}: {vote.detail}")
            return
        c.waiting.discard(sender)
        c.blocks.append((sender, vote.height))
        if not c.waiting:
            del self.coordinating[vote.txid]
            self._commit(
                c.tx, c.raw, c.reply, c.rid, c.attempt, c.started, c.blocks, c.participants
            )

    def _abort(self, c: Coordinating, code: str, detail: str) -> None:
        txid = c.tx.txid
        del self.coordinating[txid]
        self.state.abort(txid)
        decide = proto.Decide(txid, False, c.attempt)
        for w in c.participants:
            self.send(self.subject_of(w), decide)
        self._refuse(c.reply, c.rid, code, detail)

    def expire(self, now: float) -> None:
        """Abort what waited for votes past its deadline. Deadlines grow in the order the
        transactions arrived (one timeout for all), so the scan stops at the first that
        is not due."""
        late = []
        for c in self.coordinating.values():
            if c.deadline > now:
                break
            late.append(c)
        for c in late:
            silent = ", ".join(str(w) for w in sorted(c.waiting))
            self._abort(
                c, CommitTimeout.code, f"no vote from worker {silent} in {self.timeout_s:g} s"
            )

    def _ask(self, ask: proto.Ask, sender: int) -> None:
        c = self.coordinating.get(ask.txid)
        if c is not None and c.attempt == ask.attempt:
            return  # undecided: it will hear the outcome
        self._tell(sender, ask.txid, ask.attempt)

    def _tell(self, worker: int, txid: bytes, attempt: int) -> None:
        """The outcome of a settled attempt: committed if it is the one that committed;
        else aborted (presumed abort), once the log shows this copy still leads (a leader
        deposed without knowing it may lack the commit its successor confirmed). Nothing
        while its commit is not yet durable: the asker hears it once it is."""
        decided = self.decided.get(txid)
        commit = decided is not None and decided.attempt == attempt
        if decided is not None and commit and not decided.durable:
            return
        decide = proto.Decide(txid, commit, attempt)
        if commit:
            self.send(self.subject_of(worker), decide)
        else:  # an absence: told once the log shows this state is current (see Log)
            self.log.after_durable(lambda _: self.send(self.subject_of(worker), decide))

    def _done(self, done: proto.Done, sender: int) -> None:
        decided = self.decided.get(done.txid)
        if decided is None or decided.attempt != done.attempt:
            return
        decided.waiting.discard(sender)
        if not decided.waiting:
            del self.decided[done.txid]
            self.muhash.remove(_decided_element(done.txid, decided))
            self.log.add(proto.Ended(done.txid), lazy=True)

    def retell(self, now: float, at_once: bool = False) -> None:
        """Tell the commit again to each participant that has not said Done in
        ``RETELL_S`` (``at_once``: to every one). ``now`` is ``self.clock()``."""
        for txid, decided in self.decided.items():
            if decided.durable and (at_once or now - decided.told >= RETELL_S):
                decided.told = now
                decide = proto.Decide(txid, True, decided.attempt)
                for w in decided.waiting:
                    self.send(self.subject_of(w), decide)

    # -- participant ---------------------------------------------------------------------

    def _prepare(self, item: proto.Prepare, sender: int, reply: str) -> None:
        attempt = item.attempt
        try:
            _check_attempt(attempt)
            # Every check the copies' replay makes (``_replay_prepared``), the owners of
            # the outputs too: a record they refuse would stop the shard. The sender is
            # another worker, possibly of another operator: untrusted.
            tx = decode_transaction(item.tx)
        except ConstellationError as exc:
            self.send(reply, proto.Vote(b"", exc.code, str(exc), 0, attempt))
            return
        txid = tx.txid
        coordinator = self._owner(tx.inputs[0].coin_id)
        if sender != coordinator or coordinator == self.me:
            # Only the worker of the first input coordinates: the replicas refuse a
            # PREPARED record that names another, or one written by that worker.
            detail = f"worker {coordinator} coordinates {txid.hex()}, not worker {sender}"
            self.send(reply, proto.Vote(txid, Misdirected.code, detail, 0, attempt))
            return
        doubt = self.in_doubt.get(txid)
        if doubt is not None:
            if doubt[1] != attempt:
                detail = f"worker {self.me} has not yet learned how an earlier attempt ended"
                self.send(reply, proto.Vote(txid, InFlight.code, detail, 0, attempt))
            return  # else a repeated PREPARE: the vote follows the record's block
        verifiers = self.verifiers
        try:
            vote = self.state.prepare(tx, verify=verifiers is None)
        except NotHeldHere:
            code, detail = self._not_held("transaction", tx.inputs[0].coin_id)
            self.send(reply, proto.Vote(txid, code, detail, 0, attempt))
            return
        except ConstellationError as exc:
            self.send(reply, proto.Vote(txid, exc.code, str(exc), 0, attempt))
            return
        self.in_doubt[txid] = (sender, attempt, self.clock())
        if verifiers is None:
            self._prepared(txid, item.tx, sender, attempt, reply)
            return

        def checked(refusal: tuple[str, str] | None) -> None:
            doubt = self.in_doubt.get(txid)
            if doubt is None or doubt[1] != attempt:
                return  # the outcome (an abort) came first
            if refusal is None:
                self._prepared(txid, item.tx, sender, attempt, reply)
            else:
                del self.in_doubt[txid]
                self.state.abort(txid)
                self.send(reply, proto.Vote(txid, *refusal, 0, attempt))

        self._check_signatures(tx, vote, checked)

    def _prepared(
        self, txid: bytes, raw: bytes, coordinator: int, attempt: int, reply: str
    ) -> None:
        """Locked and verified here: persist the PREPARED record, then vote YES."""

        def durable(height: int) -> None:
            self.send(reply, proto.Vote(txid, "", "", height, attempt))

        self._log_doubt(txid, coordinator, attempt)
        self.log.add(proto.Prepared(raw, coordinator, attempt), durable)

    def _decide(self, decide: proto.Decide, sender: int) -> None:
        txid, attempt = decide.txid, decide.attempt
        doubt = self.in_doubt.get(txid)
        if doubt is None:
            # Repeated, or never prepared here. A commit is told again until it is Done,
            # and only to a worker that voted YES, so that worker has applied it.
            if decide.commit:
                self.log.after_durable(lambda _: self._say_done(sender, txid, attempt))
            return
        if doubt[1] != attempt or sender != doubt[0]:
            return  # about another attempt, or not from its coordinator
        if decide.commit and txid not in self.logged:
            return  # a commit is told only to a worker that voted YES; this one has not yet
        del self.in_doubt[txid]
        logged = self._settle(txid)
        # Lazy: until it is durable, a restart finds the transaction in doubt and asks.
        if decide.commit:
            changes = self._changes_of(txid)
            self.state.commit(txid)
            self.log.add(
                proto.Committed(txid, b""),
                lambda _: self._say_done(sender, txid, attempt),
                True,
                changes,
            )
        else:
            self.state.abort(txid)
            if logged:  # else its signatures were being checked: nothing of it is logged
                self.log.add(proto.Aborted(txid), lazy=True)

    def _say_done(self, coordinator: int, txid: bytes, attempt: int) -> None:
        self.send(self.subject_of(coordinator), proto.Done(txid, attempt), lazy=True)

    def ask_in_doubt(self, now: float, at_once: bool = False) -> None:
        """Ask the coordinator of every transaction in doubt for longer than its timeout
        (``at_once``: of every one, as a restarted participant does); then again every
        ``ASK_EVERY_S`` until the outcome arrives. ``now`` is ``self.clock()``."""
        patience = self.timeout_s + ASK_EVERY_S
        for txid, (coordinator, attempt, since) in list(self.in_doubt.items()):
            if at_once or now - since >= patience:
                self.in_doubt[txid] = (coordinator, attempt, now - self.timeout_s)
                self.send(self.subject_of(coordinator), proto.Ask(txid, attempt))

    # -- issuance ------------------------------------------------------------------------

    def _issue(self, item: proto.Issue, reply: str) -> None:
        try:
            issuance = decode_issuance(item.issuance)
        except ConstellationError as exc:
            self._refuse(reply, item.rid, exc.code, str(exc))
            return
        mine = [cid for cid in issuance.output_ids if self._owner(cid) == self.me]
        if not mine:
            self._refuse(reply, item.rid, *self._not_held("issuance", issuance.output_ids[0]))
            return
        try:
            created = self.state.issue(issuance)
        except AlreadyCommitted:
            result = proto.Result(item.rid, "", "already applied", [])
            self.log.after_durable(lambda _: self.send(reply, result))
            return
        except ConstellationError as exc:
            self._refuse(reply, item.rid, exc.code, str(exc))
            return

        def durable(height: int) -> None:
            self.send(reply, proto.Result(item.rid, "", "", [(self.me, height)]))

        self.log.add(
            proto.Issued(item.issuance), durable, False, *self._issued_events(issuance, created)
        )

    def _issued_events(
        self, issuance: AnyIssuance, created: list[bytes]
    ) -> tuple[list[proto.CoinChange], list[proto.Commit]]:
        """The coins an issuance created here, and its ids as committed here (a shard's
        part of an issuance is final on its own), for the block's events."""
        made = set(created)
        changes = [
            proto.CoinChange(iid, cid, owner, value, True)
            for iid, cid, (value, owner) in issuance.entries()
            if cid in made
        ]
        return changes, [proto.Commit(iid, 0) for iid in dict.fromkeys(c.txid for c in changes)]

    # -- queries -------------------------------------------------------------------------

    def coin_infos(
        self, coin_ids: Sequence[bytes], answer: Callable[[list[proto.CoinInfo]], None]
    ) -> None:
        """``answer`` with what the state says of ``coin_ids`` now, once all of that
        state is durable (where the log is replicated: confirmed, this copy still
        leading). A coin is never said to exist, or to be spent, on the strength of a
        block that a crash or the next leader may not hold."""
        infos = [self._coin_info(c) for c in coin_ids]
        self.log.after_durable(lambda _: answer(infos))

    def _coin_info(self, coin_id: bytes) -> proto.CoinInfo:
        state = self.state
        coin = state.coins.get(coin_id) or state.being_created(coin_id)
        status = state.status(coin_id).value
        if coin is not None:
            return proto.CoinInfo(coin_id, status, coin[0], coin[1], b"")
        return proto.CoinInfo(coin_id, status, 0, b"", state.spent.get(coin_id, b""))
