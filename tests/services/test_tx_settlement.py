"""``GET /v1/tx`` of a payment to users of another member's ledger says of each output
whether it was settled there (released as a coin) by asking that ledger once for all
of them: it once asked once per output, one after the other, each allowed the whole
timeout (256 outputs to a member that does not answer: 21 minutes for one answer)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

from aiohttp.test_utils import make_mocked_request

from constellation.address import Network
from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.settlement import release_coin
from services.gateway.api import Api
from services.gateway.metrics import GatewayMetrics
from services.partition.client import LedgerUnavailable

NET = Network.REGTEST
OP0, OP1 = b"\x00" * 7 + b"\x01", b"\x00" * 7 + b"\x02"  # the members' ledger ids
ISSUER = SigningKey(os.urandom(32)).pubkey  # op1's issuer key: its releases are its


class Member:
    """op1's ledger: holds the coins in ``released``, or does not answer."""

    operator = "op1"

    def __init__(self, released: set[bytes], answers: bool = True) -> None:
        self.released, self.answers = released, answers
        self.asked: list[int] = []

    async def coins(self, coin_ids: list[bytes], timeout_s: float) -> dict[bytes, Any]:
        self.asked.append(len(coin_ids))
        if not self.answers:
            raise LedgerUnavailable("op1 does not answer")
        return {
            c: proto.CoinInfo(c, "unspent", 1_000, b"", b"") for c in coin_ids if c in self.released
        }


class Index:
    def __init__(self, changes: list[dict[str, Any]]) -> None:
        self.changes = changes

    async def tx(self, _: bytes) -> dict[str, Any]:
        block = {"worker": 0, "height": 1}
        changes = [dict(c) for c in self.changes]
        return {"fee_msat": 0, "block": block, "at": "", "changes": changes, "tx": None}


def payroll(n: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """``n`` outputs of op0's ledger paid to users at op1's, and the coins they become."""
    changes, releases = [], []
    for _ in range(n):
        owner = SigningKey(os.urandom(32)).pubkey
        coin = os.urandom(32)
        changes.append(
            {
                "kind": "paid_out",
                "coin_id": coin.hex(),
                "owner": bytes(owner).hex(),
                "value_msat": 1_000,
                "block": {"worker": 0, "height": 1},
                "ledger_id": OP1.hex(),
            }
        )
        releases.append(release_coin(ISSUER, OP0, coin, 1_000, owner))
    return changes, releases


async def answer(op1: Member, changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ledgers: Any = {"op0": SimpleNamespace(operator="op0"), "op1": op1}
    api = Api(
        ledgers,
        "op0",
        Index(changes),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        GatewayMetrics(),
        None,  # type: ignore[arg-type]
        NET,
        1,
        5.0,
        {"op0": OP0, "op1": OP1},
        {},
        {"op1": frozenset({bytes(ISSUER)})},
    )
    txid = os.urandom(32).hex()
    response = await api.get_tx(make_mocked_request("GET", "/", match_info={"txid": txid}))
    assert response.status == 200 and response.text is not None
    shown: list[dict[str, Any]] = json.loads(response.text)["changes"]
    return shown


async def test_a_payroll_to_another_member_asks_it_once() -> None:
    changes, releases = payroll(256)
    op1 = Member({releases[0], releases[7]})
    shown = await answer(op1, changes)
    assert op1.asked == [256]  # one question: every output's coin there
    settled = [i for i, c in enumerate(shown) if c["settlement"] == "settled"]
    assert settled == [0, 7]
    assert shown[7]["released_as"] == releases[7].hex() and shown[7]["ledger"] == "op1"
    assert all(c["settlement"] == "pending" for i, c in enumerate(shown) if i not in settled)


async def test_a_member_that_does_not_answer_leaves_every_output_unknown_at_once() -> None:
    changes, _ = payroll(256)
    op1 = Member(set(), answers=False)
    shown = await answer(op1, changes)
    assert op1.asked == [256] and {c["settlement"] for c in shown} == {"unknown"}
