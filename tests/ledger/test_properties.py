"""Hypothesis attacks the ledger with random interleavings of two-phase commits.

Many transactions, many of them conflicting (spending the same coins, spent coins,
coins that do not exist, wrong values, bad signatures), advance one participant at a
time in random order, commit or abort partially, and interleave with each other. After
every step: each state's invariants hold; no coin is ever spent twice; once nothing
is in flight, value is conserved and no lock is held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from constellation.errors import BadSignature, LedgerError
from constellation.ledger import Coin, LocalLedger
from constellation.sighash import sign_transaction
from constellation.tx import Issuance, Transaction, TxInput, TxOutput
from tests.strategies import KEYS

ISSUER = KEYS[7]
OWNERS = KEYS[:4]
BY_PUB = {k.pubkey: k for k in OWNERS}


@dataclass
class Flight:
    tx: Transaction
    order: list[int]  # participants, the coordinator first
    prepared: list[int] = field(default_factory=list)
    outcome: str = ""  # "", "commit" or "abort"
    done: list[int] = field(default_factory=list)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = LocalLedger(3, [ISSUER.pubkey])
        self.known: dict[bytes, Coin] = {}
        self.flights: dict[bytes, Flight] = {}
        self.spends: dict[bytes, bytes] = {}  # coin -> the one tx that spent it
        self.nonce = 0

    @initialize(values=st.lists(st.integers(1, 10**6), min_size=4, max_size=12))
    def genesis(self, values: list[int]) -> None:
        self.issue(values)

    def issue(self, values: list[int]) -> None:
        outs = [TxOutput(v, OWNERS[i % len(OWNERS)].pubkey) for i, v in enumerate(values)]
        iss = Issuance(ISSUER.pubkey, self.nonce, outs).signed_by(ISSUER.secret)
        self.nonce += 1
        self.ledger.issue(iss)
        self.known.update(zip(iss.output_ids, iss.outputs, strict=True))

    @rule(values=st.lists(st.integers(1, 10**6), min_size=1, max_size=3))
    def more_issuance(self, values: list[int]) -> None:
        self.issue(values)

    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        pool = sorted(self.known)
        picks = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        if data.draw(st.integers(0, 9)) == 0:
            picks[-1] = data.draw(st.binary(min_size=32, max_size=32))  # a coin that never was
        values = [self.known[c].value_msat if c in self.known else 7 for c in picks]
        if data.draw(st.integers(0, 9)) == 0:
            values[0] += 1  # claims more than the coin holds
        total = sum(values)
        fee = data.draw(st.integers(0, min(total - 1, 1000)))
        n_out = data.draw(st.integers(1, 3))
        split = [total - fee - (n_out - 1)] + [1] * (n_out - 1)
        if split[0] < 1:
            return
        outs = [TxOutput(v, data.draw(st.sampled_from(OWNERS)).pubkey) for v in split]
        tx = Transaction([TxInput(c, v) for c, v in zip(picks, values, strict=True)], outs, fee)
        signers = [BY_PUB[self.known[c].owner] if c in self.known else OWNERS[0] for c in picks]
        if data.draw(st.integers(0, 9)) == 0:
            signers[0] = OWNERS[(OWNERS.index(signers[0]) + 1) % len(OWNERS)]  # wrong key
        tx = sign_transaction(tx, signers)
        if tx.txid in self.flights:
            return
        order = self.ledger.participants(tx)
        rest = data.draw(st.permutations(order[1:]))
        self.flights[tx.txid] = Flight(tx, [order[0], *rest])

    def _pick(self, data: st.DataObject, outcome: str) -> Flight | None:
        choices = [f for f in self.flights.values() if f.outcome == outcome]
        return data.draw(st.sampled_from(choices)) if choices else None

    @precondition(lambda self: any(not f.outcome for f in self.flights.values()))
    @rule(data=st.data())
    def prepare_next(self, data: st.DataObject) -> None:
        flight = self._pick(data, "")
        assert flight is not None
        if len(flight.prepared) == len(flight.order):
            flight.outcome = "commit" if data.draw(st.integers(0, 5)) else "abort"  # timeout
            return
        w = flight.order[len(flight.prepared)]
        try:
            self.ledger.states[w].prepare(flight.tx)
        except (LedgerError, BadSignature):
            flight.outcome = "abort"
            return
        except Exception as exc:  # a stateless rejection is a bug in the test's txs
            raise AssertionError(f"unexpected {exc!r}") from exc
        flight.prepared.append(w)

    @precondition(lambda self: any(f.outcome for f in self.flights.values()))
    @rule(data=st.data())
    def finish_next(self, data: st.DataObject) -> None:
        flight = self._pick(data, "commit") or self._pick(data, "abort")
        assert flight is not None
        remaining = [w for w in flight.prepared if w not in flight.done]
        if not remaining:
            del self.flights[flight.tx.txid]
            return
        w = data.draw(st.sampled_from(remaining))
        state = self.ledger.states[w]
        if flight.outcome == "commit":
            vote = state.commit(flight.tx.txid)  # a YES voter can always commit
            for cid in vote.inputs:
                assert cid not in self.spends, "a coin was spent twice"
                self.spends[cid] = flight.tx.txid
            self.known.update((cid, Coin._make(coin)) for cid, coin in vote.outputs)
        else:
            assert state.abort(flight.tx.txid)
        flight.done.append(w)

    @invariant()
    def states_are_consistent(self) -> None:
        for state in self.ledger.states:
            state.check_invariants()
            for cid in state.spent:
                assert cid not in state.coins

    def teardown(self) -> None:
        for flight in self.flights.values():
            for w in flight.prepared:
                if w in flight.done:
                    continue
                if flight.outcome == "commit":
                    self.ledger.states[w].commit(flight.tx.txid)
                else:
                    self.ledger.states[w].abort(flight.tx.txid)
        assert not any(s.locks or s.pending for s in self.ledger.states), "a lock leaked"
        self.ledger.check_invariants()


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestLedgerInterleavings = LedgerMachine.TestCase
