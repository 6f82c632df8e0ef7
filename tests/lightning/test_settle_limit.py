"""An output to another ledger worth more than one payment between ledgers carries
(``MAX_SETTLE_MSAT``) is refused wherever a transaction comes in: by the ledger itself
where it admits one (so no gateway, and no ``?ledger=`` of another member's, skips it),
and first by the gateway for every ledger it serves. Once taken it would be an
obligation batched alone ahead of every later one, failing and batched again for ever.

The ledger's check is the same constant at every copy, and only where a transaction is
admitted: a copy re-executing a confirmed block does not check it again, so a block that
carries such an output (from before the limit) replays alike everywhere."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client

from constellation.address import Network
from constellation.errors import TooLargeToSettle
from constellation.keys import SigningKey
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.settlement import MAX_SETTLE_MSAT
from constellation.sighash import sign_transaction
from constellation.tx import HERE, Issuance, Transaction, TxInput, TxOutput, ledger_id
from services.bus import Batching
from services.gateway.api import Api
from services.gateway.metrics import GatewayMetrics
from services.partition.client import LedgerClient
from tests.ledger.test_replication import ISSUER, engine
from tests.strategies import KEYS

ALICE, BOB = KEYS[0], KEYS[1]
OTHER = ledger_id(SigningKey(b"\x04" * 32).pubkey)  # another member's ledger
BIG = Issuance(ISSUER.pubkey, 0, [TxOutput(60 * MAX_SETTLE_MSAT, ALICE.pubkey)]).signed_by(
    ISSUER.secret
)
COIN = BIG.output_ids[0]


def paying(remote_msat: int) -> Transaction:
    """Alice's coin: ``remote_msat`` to Bob at the other ledger, the rest kept here."""
    change = 60 * MAX_SETTLE_MSAT - remote_msat
    tx = Transaction(
        [TxInput(COIN, 60 * MAX_SETTLE_MSAT)],
        [TxOutput(remote_msat, BOB.pubkey), TxOutput(change, ALICE.pubkey)],
        ledgers=[OTHER, HERE],
    )
    return sign_transaction(tx, [ALICE])


def submit(tx: Transaction) -> tuple[list[proto.Item], list[int]]:
    """``tx`` submitted to the worker holding its input; what it sent, and which
    worker that was (the ledger has two)."""
    for me in (0, 1):
        sent: list[proto.Item] = []
        e = engine(me, sent)
        e.replay([proto.Issued(BIG.encode())], derive=False, verify=True, signatures=True)
        if COIN in e.state.coins:
            package = proto.Package(
                proto.PROTOCOL_VERSION, -1, "gw", 1, [proto.Submit(1, tx.encode())]
            )
            e.handle(package)
            return sent, [me]
    raise AssertionError("no worker holds the coin")


def test_the_ledger_refuses_an_output_to_another_ledger_no_batch_carries() -> None:
    sent, _ = submit(paying(MAX_SETTLE_MSAT + 1))
    [result] = [i for i in sent if isinstance(i, proto.Result)]
    assert result.code == TooLargeToSettle.code
    assert f"pays {MAX_SETTLE_MSAT + 1} msat to another ledger" in result.detail
    sent, _ = submit(paying(MAX_SETTLE_MSAT))  # as much as a batch carries: taken
    assert not [i for i in sent if isinstance(i, proto.Result) and i.code]


def test_a_confirmed_block_with_one_replays_alike_at_every_copy() -> None:
    """A copy does not check it again: a block confirmed before the limit (or under
    another one) re-executes at every copy as it did at its leader."""
    _, [me] = submit(paying(1))
    tx = paying(2 * MAX_SETTLE_MSAT)
    roots = set()
    for _ in range(2):  # two copies of the shard of the worker holding the coin
        e = engine(me)
        e.replay([proto.Issued(BIG.encode())], derive=False, verify=True, signatures=True)
        block: list[proto.Record] = [proto.Committed(tx.txid, tx.encode())]
        e.replay(block, derive=False, verify=True, signatures=True)
        assert e.state.outbound_msat == 2 * MAX_SETTLE_MSAT and COIN not in e.state.coins
        roots.add(e.root())
    assert len(roots) == 1


def _api(served: list[str]) -> Api:
    """The gateway of operator ``a``, serving the ledgers of ``served`` (``a``'s first),
    settling with nobody itself (no operator key): another member's ledger is checked
    all the same."""
    ledgers = {
        name: LedgerClient(Client(), name, PartitionMap.even(1), Batching(1, 0), lambda _: None)
        for name in served
    }
    ids = {"a": ledger_id(SigningKey(b"\x02" * 32).pubkey), "b": OTHER}
    ids["c"] = ledger_id(SigningKey(b"\x05" * 32).pubkey)
    unused: Any = None  # the index, limits and pushes: not what this check reads
    return Api(
        ledgers, "a", unused, unused, GatewayMetrics(), unused, Network.REGTEST, 1, 1.0, ids, {}, {}
    )


def test_the_gateway_checks_every_ledger_it_serves() -> None:
    """``POST /v1/tx?ledger=c``: a transaction of member c's ledger paying 50 times what a
    batch carries to b was once sent to c's ledger unchecked."""
    api = _api(["a", "c"])
    member = api.ledgers["c"]
    with pytest.raises(TooLargeToSettle, match="at most 1000000000 msat"):
        api._check_ledgers(member, paying(50 * MAX_SETTLE_MSAT))
    api._check_ledgers(member, paying(MAX_SETTLE_MSAT))
